#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine, for CI and for trying `fedrun submit/sweep`
# locally: munged, mariadbd + slurmdbd (accounting, so `sacct` works: submitit polls it), slurmctld and
# slurmd, all on localhost. Run as root, on a Debian/Ubuntu machine without systemd (containers, CI VMs).
#
# Idempotent: while the cluster is up, re-running only checks it (and reconfigures if slurm.conf changed).
# Stop it with `bash slurm/stop_cluster.sh`.
#
# Environment knobs (all optional):
#   FEDRUN_SLURM_BASE       state, spool, log and pid folder                   (default /tmp/fedrun-slurm)
#   FEDRUN_SLURM_CPUS       CPUs the node advertises                           (default max(nproc, 8))
#   FEDRUN_SLURM_MEM_MB     RealMemory of the node in MB                        (default 90% of MemTotal)
#   FEDRUN_SLURM_PARTITION  name of the (default) partition                    (default debug)
#   FEDRUN_SLURM_WAIT_S     how long to wait for each daemon and the node      (default 90)
set -euo pipefail

BASE=${FEDRUN_SLURM_BASE:-/tmp/fedrun-slurm}
NCPU=$(nproc)
# Advertise more CPUs than the machine has (slurmd accepts it thanks to SlurmdParameters=config_overrides):
# a 2-core CI runner can then hold a 2-task job and a 4-element array at once. Jobs are tiny there.
CPUS=${FEDRUN_SLURM_CPUS:-$(( NCPU > 8 ? NCPU : 8 ))}
MEM_MB=${FEDRUN_SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)}
PARTITION=${FEDRUN_SLURM_PARTITION:-debug}
WAIT_S=${FEDRUN_SLURM_WAIT_S:-90}
NODE=$(hostname -s)
CLUSTER=fedrun
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
DBSOCK=/run/mysqld/mysqld.sock
START=$SECONDS

say() { echo "[start_cluster] $*"; }
die() { say "ERROR: $*" >&2; exit 1; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# until_ok SECONDS WHAT CMD...: poll CMD (quietly) until it succeeds, or fail after SECONDS.
until_ok() {
  local limit=$(( SECONDS + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$limit" ] || { say "timed out waiting for $what"; return 1; }
    sleep 0.3
  done
}

[ "$(id -u)" = 0 ] || die "run as root (it starts system daemons and writes /etc/slurm)"

# 1. Packages (Slurm 22.05 on Debian 12). apt-get update only when the install needs it. --------------
missing=()
for pkg in slurm-wlm munge slurmdbd mariadb-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y "${missing[@]}" >/dev/null 2>&1; then
    apt-get update >/dev/null
    apt-get install -y "${missing[@]}" >/dev/null
  fi
fi

# 2. munge: one key shared by every daemon and client (a single node here). --------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  head -c 1024 /dev/urandom >/etc/munge/munge.key
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
munge_ok() { munge -n </dev/null | unmunge; }
if ! munge_ok >/dev/null 2>&1; then
  rm -f /run/munge/munge.socket.2* /run/munge/munged.pid   # stale socket from a killed munged
  runuser -u munge -- /usr/sbin/munged
  until_ok "$WAIT_S" munged munge_ok || die "munged did not start"
  say "munged started"
fi

# 3. slurm.conf: written only when its content changes, so a re-run does not disturb running jobs. ----
mkdir -p "$BASE"/{state,spool,log,run,mysql} /etc/slurm
conf=$(mktemp)
cat >"$conf" <<EOF
# Written by fedrun slurm/start_cluster.sh: a single-node cluster for CI and local tries.
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible again after cred_expire seconds (default 120): keep requeue tests fast.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Test pending jobs every 2 s (default 60): a requeued job starts as soon as it is eligible again.
SchedulerParameters=bf_interval=2,sched_interval=2
# Accept the CPUs/RealMemory below even where they exceed the hardware (oversubscription on small runners).
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
MaxArraySize=10001
MinJobAge=600
# submitit ignores SIGTERM (it waits for its own USR2); a short KillWait ends killed/requeued jobs quickly.
KillWait=3
SlurmctldTimeout=120
SlurmdTimeout=300
InactiveLimit=0
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if ! cmp -s "$conf" "$CONF"; then
  install -m 644 "$conf" "$CONF"
  conf_changed=1
  say "wrote $CONF (node $NODE, CPUs=$CPUS, RealMemory=${MEM_MB}MB, partition $PARTITION)"
fi
rm -f "$conf"

# 4. Accounting: mariadb (socket only, no network) and slurmdbd. -------------------------------------
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld "$BASE/mysql"
db_ok() { mariadb --socket="$DBSOCK" -uroot -e 'SELECT 1'; }
if ! db_ok >/dev/null 2>&1; then
  if [ ! -d "$BASE/mysql/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$BASE/mysql" --auth-root-authentication-method=socket \
      --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $BASE/log)"
  fi
  # mariadbd does not daemonize: start it detached; pid and error log live where the mysql user can write.
  setsid /usr/sbin/mariadbd --user=mysql --datadir="$BASE/mysql" --socket="$DBSOCK" \
    --pid-file=/run/mysqld/mariadb.pid --log-error="$BASE/mysql/mariadb.err" --skip-networking \
    --skip-log-bin --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 &
  until_ok "$WAIT_S" mariadb db_ok || { tail -n 20 "$BASE/mysql/mariadb.err" >&2; die "mariadb did not start"; }
  say "mariadb started"
fi
mariadb --socket="$DBSOCK" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
dbd=$(mktemp)
cat >"$dbd" <<EOF
# Written by fedrun slurm/start_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=${BASE}/log/slurmdbd.log
PidFile=${BASE}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
cmp -s "$dbd" "$DBDCONF" || install -m 600 "$dbd" "$DBDCONF"
rm -f "$dbd"
if ! running "$BASE/run/slurmdbd.pid"; then
  /usr/sbin/slurmdbd
  until_ok "$WAIT_S" slurmdbd sacctmgr -n show cluster || { tail -n 20 "$BASE/log/slurmdbd.log" >&2; die "slurmdbd"; }
  say "slurmdbd started"
fi

# 5. slurmctld and slurmd. ---------------------------------------------------------------------------
if running "$BASE/run/slurmctld.pid"; then
  if [ "$conf_changed" = 1 ]; then say "slurm.conf changed: scontrol reconfigure"; scontrol reconfigure || true; fi
else
  if scontrol ping 2>/dev/null | grep -q UP; then
    die "a slurmctld not started by this script answers on this host; stop it first"
  fi
  /usr/sbin/slurmctld   # no -c: keep the saved job state of an earlier start
  say "slurmctld started"
fi
until_ok "$WAIT_S" slurmctld scontrol ping || { tail -n 20 "$BASE/log/slurmctld.log" >&2; die "slurmctld"; }
if ! running "$BASE/run/slurmd.pid"; then
  /usr/sbin/slurmd -N "$NODE"
  say "slurmd started"
fi

# 6. Ready = the node accepts jobs and the cluster is registered in slurmdbd (else sacct shows nothing). -
limit=$(( SECONDS + WAIT_S ))
while :; do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle* | mixed* | allocated* | completing*) break ;;
    down* | drain* | fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  if [ "$SECONDS" -ge "$limit" ]; then
    tail -n 20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 || true
    die "node $NODE not ready after ${WAIT_S}s (state '${state:-?}')"
  fi
  sleep 0.5
done
until_ok "$WAIT_S" "registration in slurmdbd" \
  sh -c "sacctmgr -n -P show cluster format=cluster,controlport | grep -q '^${CLUSTER}|6817'" \
  || say "warning: cluster not registered in slurmdbd yet; sacct may lag"
say "ready: node $NODE ($state), partition $PARTITION, CPUs=$CPUS, $(( SECONDS - START ))s; logs in $BASE/log"
