# Shared by up.sh, down.sh and restart-controller.sh (sourced, not run).
# Processes are found by pid file only, and checked by name, so nothing else is ever touched.

# alive PIDFILE COMM -> 0 if the pid in PIDFILE runs a process named COMM
alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat -- "$1" 2>/dev/null) || return 1  # the daemon removes it as it exits
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$2" ]] || return 1
    # a zombie (not reaped when PID 1 does not reap) counts as stopped
    [[ $(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# stop PIDFILE COMM: TERM, wait up to 15 s, then KILL; appends COMM to the array `stopped`
stop() {
    local pid i
    alive "$1" "$2" || { rm -f "$1"; return 0; }
    pid=$(<"$1")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        alive "$1" "$2" || break
        sleep 0.1
    done
    if alive "$1" "$2"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
    rm -f "$1"
    stopped+=("$2")
}

# ---------------------------------------------------------------- /etc/hosts
# HOSTS_FILE (default /etc/hosts) is edited one exact line at a time: hosts_add LINE and
# hosts_remove LINE match the whole line, so the tag of /tmp/a never matches /tmp/ab's.
# The new content is written to a temp file beside it, fsync'd and renamed over it in one step,
# so an interruption leaves the old file or the new one, never an empty one. Where the file is a
# bind mount (containers), rename fails with EBUSY: then a line is added by one append, and
# removed by one truncate when it is the last line (as hosts_add leaves it), or else by an
# in-place rewrite made only after a backup copy (HOSTS_FILE.cot-hpc.bak) is on disk.
HOSTS_FILE=${COT_HPC_HOSTS_FILE:-/etc/hosts}

_hosts_rename() {  # _hosts_rename CONTENT_FILE -> 0 when renamed over HOSTS_FILE
    local new=$1
    chmod --reference="$HOSTS_FILE" "$new" 2>/dev/null || chmod 644 "$new"
    sync "$new" 2>/dev/null || sync
    mv -f -T "$new" "$HOSTS_FILE" 2>/dev/null
}

hosts_add() {
    local line=$1 tmp
    grep -qxF -- "$line" "$HOSTS_FILE" 2>/dev/null && return 0
    tmp=$(mktemp "$(dirname "$HOSTS_FILE")/.hosts.cot-hpc.XXXXXX")
    cat -- "$HOSTS_FILE" >"$tmp" 2>/dev/null || true
    [[ -s $tmp && $(tail -c 1 "$tmp" | od -An -c | tr -d ' ') != '\n' ]] && echo >>"$tmp"
    printf '%s\n' "$line" >>"$tmp"
    _hosts_rename "$tmp" && return 0
    rm -f "$tmp"
    # A bind mount: one append (a single short write) never empties the file.
    [[ -s $HOSTS_FILE && $(tail -c 1 "$HOSTS_FILE" | od -An -c | tr -d ' ') != '\n' ]] &&
        line=$'\n'$line
    printf '%s\n' "$line" >>"$HOSTS_FILE"
}

hosts_remove() {
    local line=$1 tmp size keep n
    grep -qxF -- "$line" "$HOSTS_FILE" 2>/dev/null || return 0
    tmp=$(mktemp "$(dirname "$HOSTS_FILE")/.hosts.cot-hpc.XXXXXX")
    grep -vxF -- "$line" "$HOSTS_FILE" >"$tmp" || true
    _hosts_rename "$tmp" && return 0
    # A bind mount. Our line last: cut the file where it starts (one truncate).
    size=$(stat -c %s "$HOSTS_FILE")
    n=$(printf '%s\n' "$line" | wc -c)  # bytes, not characters
    keep=$((size - n))
    if [[ $keep -ge 0 ]] && [[ $(tail -c "$n" "$HOSTS_FILE") == "$line" ]] &&
        { [[ $keep -eq 0 ]] || [[ $(head -c "$keep" "$HOSTS_FILE" | tail -c 1 | od -An -c | tr -d ' ') == '\n' ]]; }; then
        rm -f "$tmp"
        truncate -s "$keep" "$HOSTS_FILE"
        return 0
    fi
    cp -p -- "$HOSTS_FILE" "$HOSTS_FILE.cot-hpc.bak" && sync "$HOSTS_FILE.cot-hpc.bak" 2>/dev/null
    cat -- "$tmp" >"$HOSTS_FILE"
    rm -f "$tmp" "$HOSTS_FILE.cot-hpc.bak"
}
