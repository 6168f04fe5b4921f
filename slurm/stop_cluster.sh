#!/usr/bin/env bash
# Stop the single-node cluster started by slurm/start_cluster.sh: only the daemons it started, found
# by their pid files (never by name). Jobs still running are cancelled first.
#   PURGE=1       also delete $FEDRUN_SLURM_BASE (saved job state, logs, the accounting database)
#   KEEP_MUNGE=1  leave munged running
set -uo pipefail
BASE=${FEDRUN_SLURM_BASE:-/tmp/fedrun-slurm}

say() { echo "[stop_cluster] $*"; }
stop() {  # stop NAME PIDFILE: TERM, wait up to 15 s, then KILL
  local name=$1 pidfile=$2 pid
  if [ ! -f "$pidfile" ]; then say "$name: not started here"; return 0; fi
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; say "$name ($pid) killed"; else say "$name ($pid) stopped"; fi
  else
    say "$name: not running"
  fi
  rm -f "$pidfile"
}

if [ -f "$BASE/run/slurmctld.pid" ] && command -v scancel >/dev/null; then
  scancel --full --quiet --state=RUNNING --user=root 2>/dev/null || true
  scancel --quiet --state=PENDING --user=root 2>/dev/null || true
fi
stop slurmd "$BASE/run/slurmd.pid"
stop slurmctld "$BASE/run/slurmctld.pid"
stop slurmdbd "$BASE/run/slurmdbd.pid"
stop mariadbd /run/mysqld/mariadb.pid
[ "${KEEP_MUNGE:-0}" = 1 ] || stop munged /run/munge/munged.pid
if [ "${PURGE:-0}" = 1 ]; then rm -rf "$BASE"; say "removed $BASE"; fi
