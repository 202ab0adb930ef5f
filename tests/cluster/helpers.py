"""Helpers for the Slurm tests: sbatch's own #SBATCH parsing, fake cluster tools, job polling.

Imported by tests/test_shell.py, tests/test_slurm_render.py and tests/test_slurm_cluster.py
(which put this folder on sys.path).
"""
from __future__ import annotations

import glob
import os
import re
import stat
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ sbatch's parser of #SBATCH lines
def sbatch_argument(text: str) -> tuple[str | None, str]:
    """The next argument of an #SBATCH line and the rest, as sbatch 22.05 reads it
    (src/sbatch/opt.c `_get_argument`): ' and " quote, \\ escapes anywhere (inside quotes too),
    an unquoted # ends the line. Raises ValueError on an unmatched quote (sbatch: fatal)."""
    i = 0
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return None, ""
    out, quote, escape = [], "", False
    while i < len(text) and (quote or not text[i].isspace()) and text[i] != "\n":
        c = text[i]
        if escape:
            escape = False
        elif c == "\\":
            escape, i = True, i + 1
            continue
        elif quote:
            if c == quote:
                quote, i = "", i + 1
                continue
        elif c in "\"'":
            quote, i = c, i + 1
            continue
        elif c == "#":
            break
        out.append(c)
        i += 1
    if quote:
        raise ValueError(f"unmatched {quote} in {text!r}")
    return "".join(out), text[i:]


def sbatch_options(script: str) -> list[str]:
    """The options sbatch takes from a script's #SBATCH lines (those before the first command)."""
    args = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            rest = line[len("#SBATCH"):]
            while True:
                arg, rest = sbatch_argument(rest)
                if arg is None:
                    break
                args.append(arg)
        elif line.strip() and not line.startswith("#"):
            break
    return args


# ------------------------------------------------------------------ fake cluster tools
FAKE_SRUN = r"""#!/bin/bash
# Fake srun: records its arguments, then runs the command once per node with that node's
# SLURM_NODEID / SLURMD_NODENAME (in the background, like real tasks), and waits.
printf '%s\0' "$@" > "$FAKE_DIR/srun.args"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((n = 0; n < ${FAKE_NNODES:-1}; n++)); do
  SLURM_NODEID=$n SLURMD_NODENAME=node$((n + 1)) SLURM_PROCID=$n SLURM_NNODES=${FAKE_NNODES:-1} "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
if [ -n "${FAKE_SIGNAL_PARENT:-}" ]; then   # a signal to the batch shell while srun ends
  kill -s "$FAKE_SIGNAL_PARENT" "$PPID"
  sleep 0.3
fi
exit $rc
"""

FAKE_SCONTROL = r"""#!/bin/bash
# Fake scontrol: hostnames node1..N, NodeAddr 127.0.0.1, requeue recorded.
case "$1 $2" in
  "show hostnames") for ((n = 1; n <= ${FAKE_NNODES:-1}; n++)); do echo "node$n"; done ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"; echo "   NodeAddr=127.0.0.1 NodeHostName=localhost" ;;
  "requeue "*) echo "$2" >> "$FAKE_DIR/requeued" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""

# A fake `python`: the per-node launcher's place. Records argv and environment (NUL-separated, per
# node), then behaves like ranks that train FAKE_STEPS steps, resuming from their progress file,
# checking the STOP file (next to the last argument, resolved.yaml) before every step; when it is
# there it stops like launcher/train.py under torchrun: node 0 (rank 0) removes STOP, and the
# launcher exits 1 (torchrun's code for any failed rank). Node FAKE_SLOW_NODE takes FAKE_SLOW_S
# more seconds to stop (a slow checkpoint).
# Node FAKE_CRASH_NODE exits 3 at step FAKE_CRASH_STEP: a dead rank.
FAKE_PYTHON = r"""#!/bin/bash
node=$SLURM_NODEID
printf '%s\0' "$@" > "$FAKE_DIR/argv.$node"
env -0 > "$FAKE_DIR/env.$node"
echo "${SLURM_RESTART_COUNT:-0}" >> "$FAKE_DIR/starts.$node"
run_dir=$(dirname "${@: -1}")
progress="$FAKE_DIR/progress.$node"
start=1
[ -f "$progress" ] && start=$(( $(cat "$progress") + 1 ))
for ((step = start; step <= ${FAKE_STEPS:-3}; step++)); do
  if [ -e "$run_dir/STOP" ]; then
    [ "$node" = "${FAKE_SLOW_NODE:-}" ] && sleep "${FAKE_SLOW_S:-0}"
    echo "$step" >> "$FAKE_DIR/stopped.$node"
    if [ "$node" = 0 ]; then   # the ranks agree on a stop; then rank 0 removes STOP
      for ((i = 0; i < 100; i++)); do
        [ "$(ls "$FAKE_DIR" | grep -c '^stopped\.')" -ge "$SLURM_NNODES" ] && break
        sleep 0.1
      done
      rm -f "$run_dir/STOP"
    fi
    exit 1
  fi
  if [ "$node" = "${FAKE_CRASH_NODE:-}" ] && [ "$step" = "${FAKE_CRASH_STEP:-}" ]; then
    echo "fake rank on node $node: crashing at step $step" >&2
    exit 3
  fi
  [ "$node" = 0 ] && : > "$FAKE_DIR/running"
  sleep "${FAKE_STEP_S:-0.05}"
  echo "$step" > "$progress"
done
echo "${SLURM_RESTART_COUNT:-0}" > "$FAKE_DIR/done.$node"
"""


def write_exe(path: str, text: str) -> str:
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def read_nul(path: str) -> list[str]:
    with open(path, "rb") as fh:
        data = fh.read()
    return [x.decode("utf-8", "surrogateescape") for x in data.split(b"\0")[:-1]]


def read_env(path: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in read_nul(path) if "=" in item)


# ------------------------------------------------------------------ real jobs
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE"}


def job_info(job_id: str, env: dict) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60)
    if out.returncode != 0:
        return {"JobState": "UNKNOWN", "error": out.stderr.strip()}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def logs(run_dir: str, limit: int = 6000) -> str:
    """The job's logs (batch shell and per node), the tail of each, for failure messages."""
    parts = []
    for path in sorted(glob.glob(os.path.join(run_dir, "logs", "*"))):
        with open(path, errors="replace") as fh:
            text = fh.read()
        parts.append(f"----- {os.path.basename(path)} ({len(text)} chars)\n{text[-limit:]}")
    return "\n".join(parts) or f"(no logs in {run_dir}/logs)"


def wait_until(job_id: str, env: dict, done, timeout: float, run_dir: str, what: str) -> dict:
    """Poll `scontrol show job` (0.2 s) until done(info) is true; on timeout fail with the job's
    state and logs."""
    end = time.monotonic() + timeout
    info = job_info(job_id, env)
    while not done(info):
        if time.monotonic() > end:
            raise AssertionError(f"job {job_id}: no {what} within {timeout:.0f} s; state "
                                 f"{info.get('JobState')} ({info.get('Reason')}), restarts "
                                 f"{info.get('Restarts')}\n{logs(run_dir)}")
        time.sleep(0.2)
        info = job_info(job_id, env)
    return info


def wait_final(job_id: str, env: dict, timeout: float, run_dir: str) -> dict:
    return wait_until(job_id, env, lambda i: i.get("JobState") in FINAL, timeout, run_dir,
                      "end")
