#!/usr/bin/env bash
# Stop the cluster started by tests/cluster/start.sh DIR: cancel its jobs, wait for them to end (so
# no slurmstepd outlives its slurmd), then stop the daemons by their PID files. Never by name:
# other clusters may run on the same machine. The folder is left in place (logs).
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 1; }
DIR=$(cd "$1" 2>/dev/null && pwd) || { echo "stop.sh: no folder $1" >&2; exit 1; }
[ -f "$DIR/slurm.conf" ] || { echo "stop.sh: $DIR holds no cluster" >&2; exit 1; }
export SLURM_CONF=$DIR/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/run/slurmctld.pid"; then
  scancel --full --quiet --partition="$(sed -n 's/^export FTL_SLURM_PARTITION=//p' "$DIR/env.sh")" 2>/dev/null
  for ((i = 0; i < 300; i++)); do
    [ -z "$(squeue -h -o %i -t PD,R,CG,S,CF,RQ,RS,SE 2>/dev/null)" ] && break
    sleep 0.1
  done
fi

stop() {  # stop PIDFILE: TERM, wait up to 10 s, then KILL
  local pidfile=$1 pid
  alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "stop.sh: $pidfile ($pid) ignored TERM; killing" >&2
  kill -KILL "$pid" 2>/dev/null
}

for f in "$DIR"/run/slurmd-*.pid; do stop "$f"; done
stop "$DIR/run/slurmctld.pid"
stop "$DIR/run/munged.pid"
echo "stop.sh: stopped the cluster in $DIR"
