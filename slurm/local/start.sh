#!/usr/bin/env bash
# Start a SLURM cluster with accounting on this machine (Debian 12, as root, no systemd
# needed): one node called localhost, or N nodes node1..nodeN, each its own slurmd.
# Idempotent: running it again only starts what is not running.
#   MNIST_ADD_SLURM_NODES    number of nodes; 2 or more are named node1..nodeN and mapped
#                            to 127.0.0.1 in /etc/hosts                   [1: localhost]
#   MNIST_ADD_SLURM_DIR      state dir (configs, logs, spool, database) [/tmp/mnist-add-slurm]
#   MNIST_ADD_SLURM_DB_PORT  port of the private MariaDB on 127.0.0.1   [3307]
#   MNIST_ADD_SLURM_TIMEOUT  seconds to wait for the daemons, after apt   [90]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${MNIST_ADD_SLURM_DIR:-/tmp/mnist-add-slurm}
DB_PORT=${MNIST_ADD_SLURM_DB_PORT:-3307}
TIMEOUT=${MNIST_ADD_SLURM_TIMEOUT:-90}
NODES=${MNIST_ADD_SLURM_NODES:-1}
DB=$STATE/mysql
export SLURM_CONF=$STATE/etc/slurm.conf

log() { echo "start.sh: $*"; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (installs packages, starts daemons)"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "MNIST_ADD_SLURM_NODES must be a number of nodes >= 1, got '$NODES'"
# One node keeps the name localhost (no name to resolve). Several need names of their own, and those
# must resolve to this machine wherever a rank or torchrun uses the first node as its rendezvous.
if [ "$NODES" = 1 ]; then NAMES=(localhost); else mapfile -t NAMES < <(seq -f 'node%g' 1 "$NODES"); fi

# --- packages --------------------------------------------------------------------------
PKGS="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' postinst from starting system-wide daemons: we run our own.
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    # Only run 'apt-get update' when the install fails with the current package lists.
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 $missing \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 $missing; } \
        || { [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d; die "apt-get install$missing failed"; }
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

T0=$SECONDS   # start-up time, not counting apt
DEADLINE=$((SECONDS + TIMEOUT))
# wait_for WHAT LOGFILE CMD...: retry CMD until it succeeds or the deadline passes.
wait_for() {
    local what=$1 logfile=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$DEADLINE" ]; then
            echo "start.sh: ERROR: $what not ready after ${TIMEOUT}s; last lines of $logfile:" >&2
            tail -n 20 "$logfile" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.5
    done
}
# running PIDFILE NAME: true if the pid in PIDFILE is alive and is NAME (not a reused pid).
running() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }

# --- state dir and configs -------------------------------------------------------------
mkdir -p "$STATE"/etc "$STATE"/log "$STATE"/run "$STATE"/spool/ctld
for name in "${NAMES[@]}"; do mkdir -p "$STATE/spool/d/$name"; done
chmod 755 "$STATE"   # the mysql user must reach $DB
CPUS=$(nproc)
MEM=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)   # MiB, 10% headroom
# Every node gets all CPUs and a port of its own (6821, 6822, ...; 6817-6819 are the daemons').
node_lines=""
for i in "${!NAMES[@]}"; do
    node_lines+="NodeName=${NAMES[i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((6821 + i)) Weight=$((i + 1))"
    node_lines+=" CPUs=$CPUS RealMemory=$MEM State=UNKNOWN\\n"
done
ALL=$(IFS=,; echo "${NAMES[*]}")
for f in slurm.conf slurmdbd.conf; do
    sed -e "s|@STATE@|$STATE|g" -e "s|@NODES@|${node_lines%\\n}|" -e "s|@ALL@|$ALL|g" -e "s|@FIRST@|${NAMES[0]}|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" "$HERE/$f.in" >"$STATE/etc/$f.new"
    if ! cmp -s "$STATE/etc/$f.new" "$STATE/etc/$f" 2>/dev/null && running "$STATE/run/slurmctld.pid" slurmctld; then
        log "WARNING: $f changed while the cluster runs; run stop.sh and start.sh to apply it"
    fi
    mv "$STATE/etc/$f.new" "$STATE/etc/$f"
done
chmod 600 "$STATE/etc/slurmdbd.conf"   # slurmdbd insists (it holds the DB password)

# --- node names resolve to this machine ---------------------------------------------------
# scontrol show hostnames gives node names, and the ranks connect to the first one.
for name in "${NAMES[@]}"; do
    addr=$(getent ahostsv4 "$name" 2>/dev/null | awk 'NR == 1 {print $1}' || true)
    case $addr in
        127.*) ;;
        "") log "adding $name to /etc/hosts (127.0.0.1)"
            echo "127.0.0.1 $name   # mnist-add slurm/local" >>/etc/hosts \
                || die "cannot add $name to /etc/hosts; map it to 127.0.0.1 there" ;;
        *) die "node name $name resolves to $addr, not to this machine; remove it from /etc/hosts or DNS" ;;
    esac
done

# --- munge: slurm's authentication ------------------------------------------------------
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    # munged refuses to run as root or with a key/socket dir it does not own.
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/run/munged.ours"   # stop.sh only stops a munged that we started
    wait_for munged /var/log/munge/munged.log sh -c 'munge -n </dev/null | unmunge'
fi

# --- MariaDB: private instance, data in the state dir, TCP on 127.0.0.1 only --------------
if [ ! -d "$DB/mysql" ]; then
    log "initialising MariaDB in $DB"
    mkdir -p "$DB"
    mariadb-install-db --no-defaults --datadir="$DB" --user=mysql \
        --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
        || { tail -n 20 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
fi
DBCLI=(--no-defaults --socket="$DB/mysql.sock" -u root)   # root via unix-socket auth
if ! running "$DB/mariadb.pid" mariadbd; then
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    touch "$STATE/log/mariadb.log" && chown mysql: "$STATE/log/mariadb.log"   # it runs as mysql
    # mariadbd does not daemonize: detach it so it outlives this script.
    # The innodb values are slurmdbd's recommended minimums (it logs an error otherwise).
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB" --socket="$DB/mysql.sock" \
        --pid-file="$DB/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
fi
wait_for MariaDB "$STATE/log/mariadb.log" mariadb-admin "${DBCLI[@]}" ping
mariadb "${DBCLI[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- slurmdbd, then register the cluster before slurmctld talks to it --------------------
if ! running "$STATE/run/slurmdbd.pid" slurmdbd; then
    log "starting slurmdbd"
    slurmdbd   # reads slurmdbd.conf next to $SLURM_CONF; daemonizes
fi
wait_for slurmdbd "$STATE/log/slurmdbd.log" sacctmgr -n show cluster
[ -n "$(sacctmgr -n -P show cluster mnistadd format=cluster)" ] || sacctmgr -i add cluster mnistadd >/dev/null
# (Adding the cluster also creates account root with user root. AccountingStorageEnforce is
# off, so any user may submit without an association.)

# --- slurmctld and slurmd ---------------------------------------------------------------
if ! running "$STATE/run/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    slurmctld -i   # -i: ignore unreadable state files from an old run
fi
wait_for slurmctld "$STATE/log/slurmctld.log" scontrol ping
for name in "${NAMES[@]}"; do
    if ! running "$STATE/run/slurmd-$name.pid" slurmd; then
        log "starting slurmd $name"
        slurmd -N "$name"   # this slurmd is node $name, whatever the host name is
    fi
done

# node_up NAME: the node answers; one left down or drained by an earlier run is put back into service.
node_up() {
    local st; st=$(sinfo -h -n "$1" -o %T 2>/dev/null)
    case $st in
        idle | mixed | allocated | completing) return 0 ;;
        down* | drain* | *drain) scontrol update nodename="$1" state=resume 2>/dev/null; return 1 ;;
        *) return 1 ;;
    esac
}
for name in "${NAMES[@]}"; do
    wait_for "node $name" "$STATE/log/slurmd-$name.log" node_up "$name"
done
wait_for sacct "$STATE/log/slurmdbd.log" sacct -n -X -S now-1minutes

log "cluster up after $((SECONDS - T0))s: $(sinfo -h -o '%P %D %T %C %N' | tr '\n' ' ')"
echo "export SLURM_CONF=$SLURM_CONF"
