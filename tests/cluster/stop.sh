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

stop() {  # stop PIDFILE...: TERM to all, wait up to 15 s for each, then KILL
  local pidfile pid pids=()
  for pidfile in "$@"; do
    alive "$pidfile" && pids+=("$(cat "$pidfile")")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop.sh: process $pid ignored TERM for 15 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  done
}

stop "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"
stop "$DIR/run/munged.pid"
if [ -f "$DIR/run/munge-socket-dir" ]; then
  socket_dir=$(cat "$DIR/run/munge-socket-dir")
  case $socket_dir in /tmp/ftlaunch-munge.*) rm -rf -- "$socket_dir" ;; esac
fi
echo "stop.sh: stopped the cluster in $DIR"
