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
