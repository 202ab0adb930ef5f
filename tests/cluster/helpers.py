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
# Fake srun: records its arguments (the training step's, the one with --kill-on-bad-exit=1, in
# srun.args; every call's first line in srun.calls), then runs the command once per node with
# that node's SLURM_NODEID / SLURMD_NODENAME (in the background, like real tasks), and waits.
case " $* " in *" --kill-on-bad-exit=1 "*) printf '%s\0' "$@" > "$FAKE_DIR/srun.args" ;; esac
all="$*"
echo "${all//$'\n'/ }" >> "$FAKE_DIR/srun.calls"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((n = 0; n < ${FAKE_NNODES:-1}; n++)); do
  SLURM_NODEID=$n SLURMD_NODENAME=node$((n + 1)) SLURM_PROCID=$n SLURM_NNODES=${FAKE_NNODES:-1} "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
if [ -n "${FAKE_SIGNAL_PARENT:-}" ] && [ -e "$FAKE_DIR/srun.args" ]; then   # a signal to the batch shell while the training step ends
  kill -s "$FAKE_SIGNAL_PARENT" "$PPID"
  sleep 0.3
fi
exit $rc
"""

FAKE_SCONTROL = r"""#!/bin/bash
# Fake scontrol: hostnames node1..N, NodeAddr 127.0.0.1, ExcNodeList FAKE_EXCLUDED, requeue and
# update recorded.
case "$1 $2" in
  "show hostnames") for ((n = 1; n <= ${FAKE_NNODES:-1}; n++)); do echo "node$n"; done ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"; echo "   NodeAddr=127.0.0.1 NodeHostName=localhost" ;;
  "show job") echo "JobId=$4 JobName=x JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None ReqNodeList=(null) ExcNodeList=${FAKE_EXCLUDED:-(null)} NodeList=node1" ;;
  "requeue "*) echo "$2" >> "$FAKE_DIR/requeued" ;;
  "update "*) echo "$2 $3" >> "$FAKE_DIR/updated" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""

# A fake `python`: the per-node launcher's place. Records argv and environment (NUL-separated, per
# node), then behaves like ranks that train FAKE_STEPS steps, resuming from their progress file,
# checking the STOP file (next to the last argument, resolved.yaml) before every step; when it is
# there it stops like launcher/rank/train.py under torchrun: node 0 (rank 0) removes STOP, and the
# launcher exits 1 (torchrun's code for any failed rank). Node FAKE_SLOW_NODE takes FAKE_SLOW_S
# more seconds to stop (a slow checkpoint).
# Node FAKE_CRASH_NODE exits 3 at step FAKE_CRASH_STEP: a dead rank. With FAKE_CHECKPOINTS set,
# node 0 makes a checkpoint folder at every step (progress, for the requeue decision).
FAKE_PYTHON = r"""#!/bin/bash
node=$SLURM_NODEID
if [ "$1 $2 $3" = "-m launcher preflight" ]; then   # the preflight: passes, or node 0 names FAKE_BAD
  printf '%s\0' "$@" > "$FAKE_DIR/preflight.$node"
  env -0 > "$FAKE_DIR/preflight-env.$node"
  if [ -n "${FAKE_BAD:-}" ]; then
    [ "$node" = 0 ] && printf '%s\n' "$FAKE_BAD" > "${5#--bad-nodes=}"
    exit 1
  fi
  exit 0
fi
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
  if [ "$node" = 0 ] && [ -n "${FAKE_CHECKPOINTS:-}" ]; then   # a checkpoint every step
    mkdir -p "$run_dir/checkpoints/step-$(printf %08d "$step")"
  fi
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


# ------------------------------------------------------------------ node failure and repair
def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return {}
    return dict(x.decode("utf-8", "replace").split("=", 1) for x in data.split(b"\0") if b"=" in x)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _on_node(env: dict[str, str], node: str, conf: str) -> bool:
    return env.get("SLURMD_NODENAME") == node and env.get("SLURM_CONF") == conf


def kill_node(cluster_dir: str, node: str) -> list[int]:
    """Power a node off, as far as one machine allows: SIGKILL its slurmd (by its PID file), every
    job process that runs on it (their environment says SLURMD_NODENAME=node and this cluster's
    SLURM_CONF: another test cluster on the same host, under another test worker, has a node of
    the same name) and the slurmstepd above them. The processes killed, slurmd first."""
    pid_file = os.path.join(cluster_dir, "run", f"slurmd-{node}.pid")
    with open(pid_file) as fh:
        slurmd = int(fh.read().strip())
    conf = os.path.join(cluster_dir, "slurm.conf")
    tasks = [int(p) for p in os.listdir("/proc") if p.isdigit()
             and _on_node(_environ(int(p)), node, conf)]
    stepds = {_parent(p) for p in tasks}
    stepds = {p for p in stepds if _cmdline(p).startswith("slurmstepd")}
    victims = [slurmd, *sorted(stepds), *tasks]
    for pid in victims:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return victims


def restart_node(cluster_dir: str, node: str, env: dict, timeout: float = 60) -> None:
    """Start the node's slurmd again and wait until Slurm has it back (idle; ReturnToService=2)."""
    full = {**os.environ, **env}
    subprocess.run(["slurmd", "-N", node], check=True, env=full, timeout=60)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True,
                             text=True, env=full, timeout=60).stdout.strip()
        if out == "idle":
            return
        if "down" in out or "drain" in out:
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"],
                           capture_output=True, env=full, timeout=60)
        time.sleep(0.2)
    raise AssertionError(f"{node} is not idle {timeout:.0f} s after its slurmd started: {out}")


# Ranks that leave what real ones leave in the run directory, one node's worth: node 0 appends a
# metrics.jsonl line per step (with the job id, restart and MASTER_ADDR it saw), resuming after
# the last line, and writes exit_status.json (0 done, 75 stopped). STOP (RUN_DIR/STOP) is honoured
# at each step boundary as launcher/rank/train.py does under torchrun: removed, 75 recorded, exit 1.
# After step FAKE_HOLD_STEP the ranks wait for FAKE_DIR/release or STOP. The preflight passes, or
# with FAKE_BAD_ALL every node fails it the same way (node 0 lists them all).
FAKE_METRIC_RANKS = r"""#!/bin/bash
if [ "$1 $2 $3" = "-m launcher preflight" ]; then
  if [ -n "${FAKE_BAD_ALL:-}" ]; then
    if [ "$SLURM_NODEID" = 0 ]; then
      scontrol show hostnames "$SLURM_JOB_NODELIST" | sed 's/$/ 0 GPUs visible, 1 expected/' > "${5#--bad-nodes=}"
    fi
    exit 1
  fi
  exit 0
fi
run_dir=$(dirname "${@: -1}")
m="$run_dir/metrics.jsonl"
[ "$SLURM_NODEID" = 0 ] || exit 0
start=1
[ -f "$m" ] && start=$(( $(wc -l < "$m") + 1 ))
for ((step = start; step <= ${FAKE_STEPS:-0}; step++)); do
  if [ -e "$run_dir/STOP" ]; then
    rm -f "$run_dir/STOP"
    printf '{"code": 75, "step": %d, "message": "stopped on request", "rank": 0}\n' "$((step - 1))" > "$run_dir/exit_status.json"
    exit 1
  fi
  sleep "${FAKE_STEP_S:-0.05}"
  printf '{"step": %d, "loss": 1.0, "job": "%s", "restart": %d, "master": "%s"}\n' "$step" \
    "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" "${MASTER_ADDR:-}" >> "$m"
  if [ "$step" = "${FAKE_HOLD_STEP:-}" ]; then
    for ((i = 0; i < 3000; i++)); do
      [ -e "${FAKE_DIR:-/nonexistent}/release" ] || [ -e "$run_dir/STOP" ] && break
      sleep 0.1
    done
  fi
done
printf '{"code": 0, "step": %d, "message": "done", "rank": 0}\n' "${FAKE_STEPS:-0}" > "$run_dir/exit_status.json"
"""


def fake_job_cluster(slurm_cluster: dict, monkeypatch, tmp_path, ranks_script: str) -> dict:
    """The test cluster's environment, a folder the fake ranks (FAKE_DIR: 6 steps, held at step 3
    until `release` appears there) write to, and `ranks_script` as the job's python: what the
    job-lock and Slurm-truth tests share."""
    for k, v in slurm_cluster["env"].items():
        monkeypatch.setenv(k, v)
    fake = tmp_path / "fake"
    fake.mkdir()
    for k, v in {"FAKE_DIR": str(fake), "FAKE_STEPS": "6", "FAKE_HOLD_STEP": "3"}.items():
        monkeypatch.setenv(k, v)   # sbatch passes the environment on to the job
    monkeypatch.chdir(tmp_path)
    return {**slurm_cluster, "fake": fake, "python": write_exe(str(tmp_path / "python"), ranks_script)}


# ------------------------------------------------------------------ run files and their records
# (the metrics a run writes: tests/ranks.py)
def one_node(cluster: dict, **more) -> dict:
    """A one-node, one-rank `cluster:` section on the test cluster with the fake ranks' python."""
    return {"nodes": 1, "gpus_per_node": 1, "partition": cluster["partition"],
            "python": cluster["python"], "preflight": False, **more}


# ------------------------------------------------------------------ run files for the job tests
def dump_runfile(path, tree: dict) -> str:
    """Write `tree` as a run file at `path`; its path as text."""
    import yaml
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return str(path)


def write_runfile(tmp_path, fake_model, run_dir=None, cluster=None, *, name: str = "run.yaml",
                  run_name: str = "jobs", steps: int = 6, train: dict | None = None,
                  output: dict | None = None) -> str:
    """A run file over the fake model and its train.jsonl (64 tokens a row), `steps` steps, run
    directory `run_dir` (default tmp_path/runs/run_name), at tmp_path/name."""
    data = os.path.join(os.path.dirname(fake_model), "train.jsonl")
    tree = {"name": run_name, "model": {"path": fake_model},
            "data": {"path": data, "max_seq_len": 64},
            "train": {"max_steps": steps, **(train or {})}, "cluster": cluster or {},
            "output": {"dir": str(run_dir or tmp_path / "runs" / run_name), **(output or {})}}
    return dump_runfile(tmp_path / name, tree)


def stub_plan(monkeypatch, fits: bool, text: str) -> None:
    """Replace the memory plan (it imports torch) by a fixed verdict and text: `ftlaunch slurm`
    then refuses or renders through memory.checked_text as it does with a real plan."""
    import types

    from launcher import memory
    from launcher.memory import planner
    monkeypatch.setattr(memory, "plan", lambda cfg, **k: types.SimpleNamespace(
        fits=fits, fits_gpu=fits, fits_node=None))
    monkeypatch.setattr(planner, "render", lambda plan, *a, **k: text)
