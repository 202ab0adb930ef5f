"""`ftlaunch status RUN_DIR [--json]`: where a run stands, from its files (and Slurm's tools).

    run        demo  (runs/demo)
    state      stopped: exit 75 at step 12 (2026-05-01T10:12:03): stopped on request
    step       12 of 400 (3%)
    loss       2.3451 at step 12; eval loss 2.4012 at step 10
    speed      10234 tokens/s, 0.051 s/step; about 20s left
    checkpoint runs/demo/checkpoints/step-00000012 (step 12), the newest complete one
    slurm      job 4242 PENDING (Resources)

Read without torch: resolved.yaml (train.max_steps; overrides apply), metrics.jsonl (the
newest loss and eval loss lines), exit_status.json (launcher/run_state.py: finished 0, stopped
75, anything else a failure with its message), checkpoints/ (the newest with a complete
manifest, launcher/checkpoint.py), and, where Slurm's tools are installed, the job that runs
the run's job.sbatch (`squeue`) or, once it left the queue, the newest job of logs/job-ID.out
(`sacct`, then `scontrol show job`). States: finished, stopped, failed, running, queued,
not started.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import time
from typing import Any, Optional

from launcher import checkpoint, job_lock, layout, run_state

RECENT_STEPS = 20  # step times averaged for the time left


def _metrics(run_dir: str) -> tuple[list[dict], Optional[dict]]:
    """(the newest train lines, newest first; the newest eval line)."""
    train: list[dict] = []
    last_eval = None
    try:
        with open(os.path.join(run_dir, layout.METRICS), encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if "loss" in rec:
                    train.append(rec)
                elif "eval_loss" in rec:
                    last_eval = rec
    except OSError:
        pass
    return train[::-1][:RECENT_STEPS], last_eval


def _step_time(recent: list[dict]) -> Optional[float]:
    times = [r["step_time_s"] for r in recent if isinstance(r.get("step_time_s"), (int, float))]
    if times:
        return sum(times) / len(times)
    if recent and recent[0].get("elapsed_s") and recent[0].get("step"):
        return float(recent[0]["elapsed_s"]) / float(recent[0]["step"])
    return None


def _run(cmd: list[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def slurm_job(run_dir: str, name: str) -> Optional[dict]:
    """The Slurm job of this run directory: queued or running (squeue: the job whose command is
    RUN_DIR/job.sbatch), else the newest of the job in RUN_DIR/job.lock and the jobs with a log in
    RUN_DIR/logs (sacct, scontrol).
    None without a job script, Slurm's tools or a job."""
    script = os.path.realpath(os.path.join(run_dir, layout.JOB_SCRIPT))
    if not os.path.exists(script):
        return None  # a local run: no Slurm job to ask about
    out = _run(["squeue", "-h", "--name", name, "-o", "%i|%T|%r|%o"])
    for line in (out or "").splitlines():
        job, state, reason, command = (line.split("|", 3) + ["", "", "", ""])[:4]
        if command and os.path.realpath(command) == script:
            return {"job_id": job, "state": state, "reason": reason, "source": "squeue"}
    ids = sorted({int(m.group(1)) for f in glob.glob(os.path.join(run_dir, layout.LOGS, "job-*.out"))
                  if (m := re.search(r"job-(\d+)\.out$", f))}
                 | {int(j) for j in [job_lock.read(run_dir)] if j})   # no log: failed to launch
    if not ids:
        return None
    job = str(ids[-1])
    out = _run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode"])
    if out and out.strip():
        state, _, code = out.strip().splitlines()[0].partition("|")
        return {"job_id": job, "state": state.split()[0], "reason": "", "exit_code": code,
                "source": "sacct"}
    out = _run(["scontrol", "show", "job", job])
    m = re.search(r"JobState=(\S+)", out or "")
    if m:
        reason = re.search(r"Reason=(\S+)", out or "")
        return {"job_id": job, "state": m.group(1), "reason": reason.group(1) if reason else "",
                "source": "scontrol"}
    return {"job_id": job, "state": "UNKNOWN", "reason": "no longer known to Slurm",
            "source": "logs"}


def _state(exit_rec: Optional[dict], job: Optional[dict], metrics_mtime: float,
           exit_mtime: float) -> str:
    if job and job["state"] in ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD"):
        return "queued"
    if job and job["state"] in ("RUNNING", "COMPLETING", "SUSPENDED"):
        return "running"
    if exit_rec is None or metrics_mtime > exit_mtime:
        return "running" if metrics_mtime else "not started"
    code = exit_rec.get("code")
    if code == layout.EXIT_OK:
        return "finished"
    if code == layout.EXIT_STOPPED:
        return "stopped"
    return "failed"


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def collect(run_dir: str, overrides: Any = ()) -> dict:
    """Everything `ftlaunch status` shows, as a JSON-able dict."""
    run_dir = os.path.abspath(run_dir)
    cfg = run_state.load_run(run_dir, overrides)
    recent, last_eval = _metrics(run_dir)
    exit_rec = run_state.last_status(run_dir)
    job = slurm_job(run_dir, cfg.name)
    ckpt = checkpoint.latest_complete(checkpoint.root(run_dir), warn=lambda m: None)
    max_steps = cfg.train.max_steps
    step = int(recent[0]["step"]) if recent else (checkpoint.step_of(ckpt) if ckpt else 0)
    per_step = _step_time(recent)
    state = _state(exit_rec, job, _mtime(os.path.join(run_dir, layout.METRICS)),
                   _mtime(run_state.status_path(run_dir)))
    return {
        "run": cfg.name, "run_dir": run_dir, "state": state, "step": step, "max_steps": max_steps,
        "loss": recent[0]["loss"] if recent else None,
        "lr": recent[0].get("lr") if recent else None,
        "eval_loss": last_eval["eval_loss"] if last_eval else None,
        "eval_step": last_eval["step"] if last_eval else None,
        "tokens_per_s": recent[0].get("tokens_per_s") if recent else None,
        "step_time_s": per_step,
        "time_left_s": (None if per_step is None or state == "finished"
                        else round(per_step * max(0, max_steps - step), 1)),
        "checkpoint": ckpt, "checkpoint_step": checkpoint.step_of(ckpt) if ckpt else None,
        "exit": exit_rec,
        "last_failure": exit_rec if exit_rec and run_state.is_failure(exit_rec.get("code")) else None,
        "slurm": job,
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def render(st: dict) -> str:
    rows = [("run", f"{st['run']}  ({st['run_dir']})")]
    ex = st["exit"]
    state = st["state"]
    if ex and state in ("finished", "stopped", "failed"):
        state += f": exit {ex.get('code')} at step {ex.get('step')} ({ex.get('time', '?')}): " \
                 f"{str(ex.get('message', '')).strip().splitlines()[-1] if ex.get('message') else ''}"
    rows.append(("state", state))
    pct = 100.0 * st["step"] / st["max_steps"] if st["max_steps"] else 0.0
    rows.append(("step", f"{st['step']} of {st['max_steps']} ({pct:.0f}%)"))
    if st["loss"] is not None:
        loss = f"{st['loss']:.4f} at step {st['step']}"
        if st["eval_loss"] is not None:
            loss += f"; eval loss {st['eval_loss']:.4f} at step {st['eval_step']}"
        rows.append(("loss", loss))
    if st["tokens_per_s"] is not None:
        speed = f"{st['tokens_per_s']:.0f} tokens/s"
        if st["step_time_s"] is not None:
            speed += f", {st['step_time_s']:.3g} s/step"
        if st["time_left_s"] is not None:
            speed += f"; about {_duration(st['time_left_s'])} left"
        rows.append(("speed", speed))
    rows.append(("checkpoint", f"{st['checkpoint']} (step {st['checkpoint_step']}), the newest "
                 "complete one" if st["checkpoint"] else "none complete"))
    if st["last_failure"]:
        rows.append(("failure", f"rank {st['last_failure'].get('rank')} on "
                     f"{st['last_failure'].get('host')}: {st['last_failure'].get('message')}"))
    if st["slurm"]:
        j = st["slurm"]
        rows.append(("slurm", f"job {j['job_id']} {j['state']}"
                     + (f" ({j['reason']})" if j.get("reason") and j["reason"] != "None" else "")))
    if st["state"] == "stopped":
        rows.append(("resume", run_state.resume_command(st["run_dir"])))
    return "".join(f"{k:<11}{v}\n" for k, v in rows)


def main(args: Any) -> int:
    st = collect(args.run_dir, args.overrides)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(render(st), end="")
    return 0
