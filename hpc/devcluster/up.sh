#!/usr/bin/env bash
# Bring up a private, real Slurm 22.05 cluster entirely under STATE_DIR:
# munged, MariaDB, slurmdbd, slurmctld and two slurmd (fake nodes n1, n2).
#
#   hpc/devcluster/up.sh STATE_DIR [--max-array-size N]
#
# Idempotent: when the cluster is already up with the same settings it only
# checks that it answers.  When the settings differ (e.g. another
# --max-array-size) it rewrites slurm.conf and restarts slurmctld and both
# slurmd.  Ports can be overridden with the environment variables below.
# Needs root and Debian (apt) for the packages.  Stop it with down.sh.
#
# Safe on a shared host: STATE_DIR must be root's, not writable by others, and hold no
# symlink and no file root does not own; the munge key is one this script created (its sha256
# is kept beside it); every daemon listens on 127.0.0.1 only; /etc/hosts gets one exact tagged
# line, written by rename (see lib.sh); a policy-rc.d it adds is removed on any exit.
set -euo pipefail

usage() { echo "usage: $0 STATE_DIR [--max-array-size N]" >&2; exit 2; }

[[ $# -ge 1 ]] || usage
STATE_ARG=$1; shift
MAX_ARRAY_SIZE=1001
while [[ $# -gt 0 ]]; do
    case $1 in
        --max-array-size) [[ $# -ge 2 ]] || usage; MAX_ARRAY_SIZE=$2; shift 2 ;;
        --max-array-size=*) MAX_ARRAY_SIZE=${1#*=}; shift ;;
        *) usage ;;
    esac
done
[[ $MAX_ARRAY_SIZE =~ ^[0-9]+$ ]] || { echo "up.sh: --max-array-size must be an integer" >&2; exit 2; }

CTLD_PORT=${COT_HPC_SLURMCTLD_PORT:-16817}
DBD_PORT=${COT_HPC_SLURMDBD_PORT:-16819}
N1_PORT=${COT_HPC_SLURMD_PORT_N1:-16821}
N2_PORT=${COT_HPC_SLURMD_PORT_N2:-16822}
DB_PORT=${COT_HPC_MARIADB_PORT:-16306}
WAIT_S=${COT_HPC_SLURM_WAIT_S:-60}

T0=$(date +%s.%N)
[[ $(id -u) -eq 0 ]] || { echo "up.sh: must run as root" >&2; exit 1; }

# ---------------------------------------------------------------- packages
PKGS=(slurm-wlm munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    command -v apt-get >/dev/null || { echo "up.sh: missing ${missing[*]} and no apt-get" >&2; exit 1; }
    echo "up.sh: installing ${missing[*]}" >&2
    # Keep the packaged services from starting (we run our own daemons). Our policy-rc.d is
    # removed however this script ends: an error, Ctrl-C or a kill by the test's timeout.
    POLICY=${COT_HPC_POLICY_RC_D:-/usr/sbin/policy-rc.d}
    own_policy=0
    if [[ ! -e $POLICY ]]; then
        trap 'rm -f "$POLICY"' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        own_policy=1
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod 755 "$POLICY"
    fi
    rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >&2 || rc=$?
    if [[ $own_policy -eq 1 ]]; then rm -f "$POLICY"; trap - EXIT INT TERM; fi
    [[ $rc -eq 0 ]] || { echo "up.sh: apt-get install failed" >&2; exit 1; }
fi

# ---------------------------------------------------------------- layout
# The daemons run as root from this folder: refuse one that anyone else could have prepared
# (in a shared /tmp, another user may create the path first and plant symlinks or a key).
refuse() { echo "up.sh: refusing STATE_DIR $STATE_ARG: $*" >&2; exit 1; }
[[ ! -L $STATE_ARG ]] || refuse "it is a symlink"
umask 022
mkdir -p "$STATE_ARG"
S=$(cd "$STATE_ARG" && pwd -P)
[[ $(stat -c %u "$S") -eq 0 ]] || refuse "it is owned by uid $(stat -c %u "$S"), not root"
[[ $(( 0$(stat -c %a "$S") & 022 )) -eq 0 ]] || refuse "others may write to it (mode $(stat -c %a "$S"))"
bad=$(find "$S" -type l -print -quit)
[[ -z $bad ]] || refuse "it contains a symlink ($bad)"
bad=$(find "$S" ! -user 0 -print -quit)
[[ -z $bad ]] || refuse "it contains a file root does not own ($bad)"
# Only a munge key this script created is ever used: its sha256 is kept beside it at creation.
key=$S/munge/munge.key
if [[ -e $key ]] && ! [[ -s $key.cot-hpc-sha256 &&
    $(sha256sum <"$key") == "$(<"$key.cot-hpc-sha256")" ]]; then
    refuse "$key was not created by up.sh (no matching $key.cot-hpc-sha256); remove it to let up.sh create this cluster's own key"
fi
CONF=$S/slurm.conf
DBDCONF=$S/slurmdbd.conf
MUNGE_SOCK=$S/munge/munge.socket.2
DB_SOCK=$S/db/mysqld.sock
HOSTS_LINE="127.0.0.1 n1 n2 # cot-hpc-devcluster:$S"
if [[ ${#MUNGE_SOCK} -ge 100 || ${#DB_SOCK} -ge 100 ]]; then
    echo "up.sh: STATE_DIR path too long for unix sockets: $S" >&2; exit 1
fi
mkdir -p "$S/munge" "$S/db" "$S/ctld" "$S/spool" "$S/run" "$S/log"
chmod 755 "$S/munge" "$S/run" "$S/log"
chmod 700 "$S/db" "$S/ctld"
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- helpers
die() {
    echo "up.sh: $*" >&2
    for f in "$S"/log/*.log; do
        [[ -f $f ]] || continue
        echo "---- tail $f" >&2; tail -n 15 "$f" >&2
    done
    exit 1
}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stopped=()

# waitfor DESCRIPTION COMMAND... : retry every 0.1 s for WAIT_S seconds
waitfor() {
    local what=$1 end; shift
    end=$(($(date +%s) + WAIT_S))
    until "$@" >/dev/null 2>&1; do
        [[ $(date +%s) -lt $end ]] || die "timed out waiting for $what"
        sleep 0.1
    done
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

nodes_idle() {
    local out
    out=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
    # idle after a cold start; mix/alloc allowed when jobs survive a reconfigure
    grep -Eqx 'n1 (idle|mix|alloc)' <<<"$out" && grep -Eqx 'n2 (idle|mix|alloc)' <<<"$out"
}

# write_if_changed FILE MODE CONTENT -> 0 if the file was (re)written
write_if_changed() {
    if [[ -f $1 ]] && [[ $(<"$1") == "$3" ]]; then return 1; fi
    printf '%s\n' "$3" >"$1.tmp"; chmod "$2" "$1.tmp"; mv -f "$1.tmp" "$1"
    return 0
}

# ---------------------------------------------------------------- configs
HOST=$(hostname -s)
read -r SOCKETS CORES THREADS < <(slurmd -C | awk '
    /^NodeName=/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                   b = v["Boards"] ? v["Boards"] : 1
                   print b * v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"] }')
[[ -n ${THREADS:-} ]] || die "cannot parse 'slurmd -C'"

[[ -s $S/db/pass ]] || { head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$S/db/pass"; chmod 600 "$S/db/pass"; }
DB_PASS=$(<"$S/db/pass")

SLURM_CONF_TEXT="# Generated by hpc/devcluster/up.sh; rewritten on every change.
ClusterName=cothpc
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$N1_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=5
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
ReturnToService=2
KillWait=5
JobRequeue=1
MailProg=/bin/true
MpiDefault=none
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
MaxArraySize=$MAX_ARRAY_SIZE
MaxJobCount=100000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$N1_PORT Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$N2_PORT Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP"

DBD_CONF_TEXT="# Generated by hpc/devcluster/up.sh
AuthType=auth/munge
CommunicationParameters=NoInAddrAny
AuthInfo=socket=$MUNGE_SOCK
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$S/run/slurmdbd.pid
LogFile=$S/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db"

DB_ARGS=(--no-defaults --user=root --datadir="$S/db/data" --socket="$DB_SOCK"
         --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve
         --pid-file="$S/run/mariadbd.pid" --log-error="$S/log/mariadbd.log"
         --innodb-buffer-pool-size=32M --innodb-log-file-size=8M --max-connections=50)

printf 'export SLURM_CONF=%s\n' "$CONF" >"$S/env.sh.tmp" && mv -f "$S/env.sh.tmp" "$S/env.sh"

# ---------------------------------------------------------------- /etc/hosts
hosts_add "$HOSTS_LINE" || die "cannot add the n1 n2 line to $HOSTS_FILE"

# ---------------------------------------------------------------- munged
if ! alive "$S/run/munged.pid" munged; then
    if [[ ! -e $key ]]; then
        rm -f "$key.cot-hpc-sha256"
        mungekey --create --keyfile="$key" >/dev/null || die "mungekey failed"
        sha256sum <"$key" >"$key.cot-hpc-sha256.tmp" && mv -f "$key.cot-hpc-sha256.tmp" "$key.cot-hpc-sha256"
    fi
    chmod 600 "$key"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    munged --socket="$MUNGE_SOCK" --key-file="$S/munge/munge.key" \
        --pid-file="$S/run/munged.pid" --seed-file="$S/munge/munged.seed" \
        --log-file="$S/log/munged.log" </dev/null >/dev/null 2>&1 || die "munged failed to start"
fi
waitfor "munged" munge -n -S "$MUNGE_SOCK"

# ---------------------------------------------------------------- mariadb
db_args_text="${DB_ARGS[*]}"
if alive "$S/run/mariadbd.pid" mariadbd && [[ $(cat "$S/db/args" 2>/dev/null) != "$db_args_text" ]]; then
    stop "$S/run/mariadbd.pid" mariadbd
    stop "$S/run/slurmdbd.pid" slurmdbd
fi
if ! alive "$S/run/mariadbd.pid" mariadbd; then
    if [[ ! -d $S/db/data/mysql ]]; then
        rm -rf "$S/db/data"
        mariadb-install-db --no-defaults --user=root --datadir="$S/db/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$S/log/mariadb-install-db.log" 2>&1 || die "mariadb-install-db failed"
    fi
    printf '%s\n' "$db_args_text" >"$S/db/args"
    setsid mariadbd "${DB_ARGS[@]}" </dev/null >>"$S/log/mariadbd.log" 2>&1 &
    waitfor "mariadbd" mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping
fi
mariadb --no-defaults --socket="$DB_SOCK" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "cannot create the SQL user"

# ---------------------------------------------------------------- slurmdbd
if write_if_changed "$DBDCONF" 600 "$DBD_CONF_TEXT"; then
    stop "$S/run/slurmdbd.pid" slurmdbd
fi
if ! alive "$S/run/slurmdbd.pid" slurmdbd; then
    slurmdbd </dev/null >/dev/null 2>&1 || die "slurmdbd failed to start"
fi
waitfor "slurmdbd port $DBD_PORT" tcp_open "$DBD_PORT"

# ---------------------------------------------------------------- slurmctld, slurmd
daemons_up() {
    alive "$S/run/slurmctld.pid" slurmctld && alive "$S/run/slurmd.n1.pid" slurmd &&
        alive "$S/run/slurmd.n2.pid" slurmd
}
action=unchanged
if write_if_changed "$CONF" 644 "$SLURM_CONF_TEXT"; then
    if alive "$S/run/slurmctld.pid" slurmctld || alive "$S/run/slurmd.n1.pid" slurmd ||
        alive "$S/run/slurmd.n2.pid" slurmd; then
        action=reconfigured
        stop "$S/run/slurmd.n1.pid" slurmd
        stop "$S/run/slurmd.n2.pid" slurmd
        stop "$S/run/slurmctld.pid" slurmctld
    fi
fi
if ! alive "$S/run/slurmctld.pid" slurmctld; then
    ctld_opts=()
    if [[ $action != reconfigured ]]; then
        # Cold start: forget jobs and node states of an earlier session.
        ctld_opts=(-c); action=started
    fi
    slurmctld -f "$CONF" "${ctld_opts[@]}" </dev/null >/dev/null 2>&1 || die "slurmctld failed to start"
fi
for n in n1 n2; do
    if ! alive "$S/run/slurmd.$n.pid" slurmd; then
        mkdir -p "$S/spool/$n"
        [[ $action == unchanged ]] && action=started
        slurmd -f "$CONF" -N "$n" </dev/null >/dev/null 2>&1 || die "slurmd $n failed to start"
    fi
done

waitfor "scontrol ping" scontrol ping
waitfor "nodes n1 n2 up" nodes_idle
waitfor "sacct" sacct -n -X -S now-1minutes
daemons_up || die "a daemon died during start-up"

# Every daemon listens on loopback only (NoCtldInAddrAny, NoInAddrAny; mariadbd --bind-address).
if command -v ss >/dev/null; then
    for port in "$CTLD_PORT" "$DBD_PORT" "$N1_PORT" "$N2_PORT" "$DB_PORT"; do
        while read -r addr; do
            [[ $addr == 127.* || $addr == "[::1]" ]] ||
                die "port $port listens on $addr, not loopback (does $HOST resolve to 127.0.0.1?)"
        done < <(ss -Hltn "sport = :$port" | awk '{ a = $4; sub(/:[0-9]+$/, "", a); print a }')
    done
fi

T1=$(date +%s.%N)
printf 'devcluster %s: %s (SLURM_CONF=%s, ctld :%s, dbd :%s, nodes n1,n2 idle, MaxArraySize=%s, sacct ok) in %.1fs\n' \
    "$action" "$S" "$CONF" "$CTLD_PORT" "$DBD_PORT" "$MAX_ARRAY_SIZE" "$(awk -v a="$T0" -v b="$T1" 'BEGIN { print b - a }')"
