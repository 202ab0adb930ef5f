"""`ftlaunch status RUN_DIR [--json]`: where a run stands, from its files (and Slurm's tools).

    run        demo  (runs/demo)
    state      stopped: exit 75 at step 12 (2026-05-01T10:12:03): stopped on request
    step       12 of 400 (3%)
    loss       2.3451 at step 12; eval loss 2.4012 at step 10
    speed      10234 tokens/s, 0.051 s/step; about 20s left
    checkpoint runs/demo/checkpoints/step-00000012 (step 12), the newest complete one
    slurm      job 4242 PENDING (Resources)

Read without torch: resolved.yaml (train.max_steps; overrides apply), metrics.jsonl (the
newest loss and eval loss lines), exit_status.json (launcher/cluster/run_state.py: finished 0, stopped
75, anything else a failure with its message), checkpoints/ (the newest with a complete
manifest, launcher/cluster/checkpoint_files.py), and, where Slurm's tools are installed, the job that runs
the run's job.sbatch (`squeue`) or, once it left the queue, the newest job of logs/job-ID.out
(`sacct`, then `scontrol show job`). States: finished, stopped, failed, running, queued,
not started, unknown (squeue is installed and did not answer: the job may still run).
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
from dataclasses import dataclass

from launcher.cluster import checkpoint_files as checkpoint
from launcher.cluster import job_lock, layout, reshard, run_state

RECENT_STEPS = 20  # step times averaged for the time left
STALE_MIN_S = 60   # a running run with no step for this long (and 10 step times) is said to be stale
# Slurm states of a job that ended without success.
JOB_FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
              "DEADLINE", "PREEMPTED")


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


SLURM_TIMEOUT_S = 30   # a Slurm tool that has not answered by then did not answer
NO_ANSWER = "NO_ANSWER"   # _run: the tool is there and did not answer (timed out or failed)


def _run(cmd: list[str]) -> Optional[str]:
    """The tool's output; None where it is not installed; NO_ANSWER where it timed out or failed."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return NO_ANSWER
    except OSError:
        return None
    if p.returncode == 0:
        return p.stdout
    return NO_ANSWER if job_lock.unanswered(p.stderr) else None


def slurm_job(run_dir: str, name: str) -> Optional[dict]:
    """The Slurm job of this run directory: queued or running (squeue: the job whose command is
    RUN_DIR/job.sbatch), else the newest of the job in RUN_DIR/job.lock and the jobs with a log in
    RUN_DIR/logs (sacct, scontrol).
    None without a job script, Slurm's tools or a job."""
    script = os.path.realpath(os.path.join(run_dir, layout.JOB_SCRIPT))
    if not os.path.exists(script):
        return None  # a local run: no Slurm job to ask about
    out = _run(["squeue", "-h", "--name", name, "-o", "%i|%T|%r|%o"])
    if out == NO_ANSWER:   # Slurm may still run it: never taken for ended (the lock holds)
        job = job_lock.read(run_dir)
        return {"job_id": job or "?", "state": job_lock.UNKNOWN, "source": "squeue",
                "reason": f"squeue did not answer within {SLURM_TIMEOUT_S} s, or failed"}
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
    if out and out != NO_ANSWER and out.strip():
        state, _, code = out.strip().splitlines()[0].partition("|")
        return {"job_id": job, "state": state.split()[0], "reason": "", "exit_code": code,
                "source": "sacct"}
    out = _run(["scontrol", "show", "job", job])
    out = "" if out == NO_ANSWER else out
    m = re.search(r"JobState=(\S+)", out or "")
    if m:
        reason = re.search(r"Reason=(\S+)", out or "")
        code = re.search(r" ExitCode=(\S+)", out or "")
        return {"job_id": job, "state": m.group(1), "reason": reason.group(1) if reason else "",
                "exit_code": code.group(1) if code else "", "source": "scontrol"}
    return {"job_id": job, "state": "UNKNOWN", "reason": "no longer known to Slurm",
            "source": "logs"}


def _job_failure(run_dir: str, job: Optional[dict]) -> Optional[str]:
    """Why an ended, failed Slurm job failed, in its own words: the last `ftlaunch:` line of
    logs/job-ID.err (else its last line), with Slurm's state and exit code."""
    if not job or job["state"] not in JOB_FAILED:
        return None
    why = ""
    try:
        with open(os.path.join(run_dir, layout.LOGS, f"job-{job['job_id']}.err"),
                  encoding="utf-8", errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
        ours = [line for line in lines if line.startswith("ftlaunch:")]
        why = (ours or lines or [""])[-1]
    except OSError:
        why = "no log (the job did not start, or could not write logs/)"
    code = f", exit {job['exit_code']}" if job.get("exit_code") else ""
    return f"job {job['job_id']} {job['state']}{code}" + (f": {why}" if why else "")


def _state(exit_rec: Optional[dict], job: Optional[dict], metrics_mtime: float,
           exit_mtime: float) -> str:
    if job and job["state"] in ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD"):
        return "queued"
    if job and job["state"] in ("RUNNING", "COMPLETING", "SUSPENDED"):
        return "running"
    if job and job["state"] == job_lock.UNKNOWN and job["source"] == "squeue":
        return "unknown"   # squeue did not answer: the job may be queued, running or ended
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


def epoch_steps(cfg: Any, run_dir: str) -> int:
    """An epoch run's steps: the count rank 0 recorded (RUN_DIR/steps.json), else the one in
    RUN_DIR/ds_config.json (the scheduler's total_num_steps: exact where `ftlaunch run` wrote
    it after its data check, the login node's estimate where `ftlaunch slurm` did), else the
    estimate."""
    counted = run_state.counted_steps(run_dir)
    if counted is not None:
        return counted
    try:
        with open(os.path.join(run_dir, layout.DS_CONFIG), encoding="utf-8") as fh:
            n = json.load(fh)["scheduler"]["params"]["total_num_steps"]
        if isinstance(n, int) and n > 0:
            return n
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from launcher.config import epochs
    return epochs.planned_steps(cfg)[0]


def collect(run_dir: str, overrides: Any = ()) -> dict:
    """Everything `ftlaunch status` shows, as a JSON-able dict."""
    run_dir = os.path.abspath(run_dir)
    cfg = run_state.load_run(run_dir, overrides)
    recent, last_eval = _metrics(run_dir)
    exit_rec = run_state.last_status(run_dir)
    job = slurm_job(run_dir, cfg.name)
    ckpt = checkpoint.latest_complete(checkpoint.root(run_dir), warn=lambda m: None)
    max_steps = cfg.train.max_steps or epoch_steps(cfg, run_dir)
    step = int(recent[0]["step"]) if recent else (checkpoint.step_of(ckpt) if ckpt else 0)
    per_step = _step_time(recent)
    metrics_mtime = _mtime(os.path.join(run_dir, layout.METRICS))
    state = _state(exit_rec, job, metrics_mtime, _mtime(run_state.status_path(run_dir)))
    job_failure = _job_failure(run_dir, job)
    if job_failure and state in ("not started", "running"):   # the job ended before the ranks did
        state = "failed"
    else:
        job_failure = None
    since_step = time.time() - metrics_mtime if metrics_mtime else None
    stale = (state == "running" and since_step is not None
             and since_step > max(STALE_MIN_S, 10 * (per_step or 0)))
    return {
        "run": cfg.name, "run_dir": run_dir, "state": state, "step": step, "max_steps": max_steps,
        "loss": recent[0]["loss"] if recent else None,
        "lr": recent[0].get("lr") if recent else None,
        "eval_loss": last_eval["eval_loss"] if last_eval else None,
        "eval_step": last_eval["step"] if last_eval else None,
        "tokens_per_s": recent[0].get("tokens_per_s") if recent else None,
        "step_time_s": per_step,
        "time_left_s": (None if per_step is None or state not in ("running", "queued")
                        else round(per_step * max(0, max_steps - step), 1)),
        "no_step_for_s": round(since_step) if stale else None,
        **_clock(run_dir, recent, per_step, max_steps, step, state),
        "checkpoint": ckpt, "checkpoint_step": checkpoint.step_of(ckpt) if ckpt else None,
        "exit": exit_rec,
        "last_failure": exit_rec if exit_rec and run_state.is_failure(exit_rec.get("code")) else None,
        "slurm": job,
        "job_failure": job_failure,
        "resume": resume_advice(run_dir) if state == "stopped" else None,
        "segments": reshard.segments(run_dir, step),
    }


def _clock(run_dir: str, recent: list[dict], per_step: Optional[float], max_steps: int,
           step: int, state: str) -> dict:
    """Estimated training time (RUN_DIR/estimate.json, written where cluster.time was auto),
    training time elapsed (metrics.jsonl's elapsed_s, over every launch) and the projected end
    (now + the steps left at the measured step time)."""
    estimated = None
    try:
        with open(os.path.join(run_dir, layout.ESTIMATE), encoding="utf-8") as fh:
            estimated = json.load(fh).get("train_s")
    except (OSError, ValueError, AttributeError):
        pass
    elapsed = recent[0].get("elapsed_s") if recent else None
    end = None
    if per_step is not None and state == "running":
        end = time.strftime("%Y-%m-%d %H:%M", time.localtime(
            time.time() + per_step * max(0, max_steps - step)))
    return {"estimated_s": estimated, "elapsed_s": elapsed, "projected_end": end}


def resume_advice(run_dir: str) -> str:
    """How to continue the run where it lives: a Slurm run is submitted again (its job script
    resumes from the newest complete checkpoint); a local one runs again with --resume."""
    from launcher.cluster.shell import quote
    script = os.path.join(run_dir, layout.JOB_SCRIPT)
    if os.path.exists(script):
        return f"sbatch {quote(script)}"
    return run_state.resume_command(run_dir)


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
        step = ex.get("step")
        when = (f"at step {step}" if isinstance(step, int) and step >= 0
                else "before the first step (while loading)")
        state += f": exit {ex.get('code')} {when} ({ex.get('time', '?')}): " \
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
    if st.get("estimated_s") is not None or st.get("elapsed_s") is not None:
        parts = []
        if st.get("estimated_s") is not None:
            parts.append(f"estimated {_duration(st['estimated_s'])} of training")
        if st.get("elapsed_s") is not None:
            parts.append(f"elapsed {_duration(st['elapsed_s'])}")
        if st.get("projected_end"):
            parts.append(f"projected end {st['projected_end']}")
        rows.append(("time", ", ".join(parts)))
    if st.get("no_step_for_s"):
        rows.append(("progress", f"no step for {_duration(st['no_step_for_s'])}: a node may be down "
                     "or the ranks stuck; see the logs in " + os.path.join(st["run_dir"], layout.LOGS)))
    if len(st.get("segments") or []) > 1:  # launches, each with its world size
        rows.append(("segments", "; ".join(
            f"steps {g['from']}-{g['to']} on {g['world_size']} rank{'s' if g['world_size'] != 1 else ''}"
            + (f" (job {g['job']})" if g.get("job") else "") for g in st["segments"])))
    rows.append(("checkpoint", f"{st['checkpoint']} (step {st['checkpoint_step']}), the newest "
                 "complete one" if st["checkpoint"] else "none complete"))
    if st["last_failure"]:
        rows.append(("failure", f"rank {st['last_failure'].get('rank')} on "
                     f"{st['last_failure'].get('host')}: {st['last_failure'].get('message')}"))
    if st.get("job_failure"):
        rows.append(("failure", st["job_failure"]))
    if st["slurm"]:
        j = st["slurm"]
        rows.append(("slurm", f"job {j['job_id']} {j['state']}"
                     + (f" ({j['reason']})" if j.get("reason") and j["reason"] != "None" else "")))
    if st.get("resume"):
        rows.append(("resume", st["resume"]))
    return "".join(f"{k:<11}{v}\n" for k, v in rows)


@dataclass(frozen=True)
class StatusCall:
    """What `ftlaunch status` was asked: run directories (key=value words among them are
    overrides), more overrides, JSON output."""
    run_dir: str | tuple[str, ...]
    overrides: tuple[str, ...] = ()
    json: bool = False


def main(call: StatusCall) -> int:
    """One run directory or several (a key=value word that is not a folder is an override)."""
    words = [call.run_dir] if isinstance(call.run_dir, str) else list(call.run_dir)
    dirs = [w for w in words if "=" not in w or os.path.isdir(w)]
    overrides = [w for w in words if w not in dirs] + list(call.overrides)
    runs = [collect(d, overrides) for d in dirs]
    if call.json:
        print(json.dumps(runs[0] if len(runs) == 1 else runs, indent=2))
    else:
        print("\n".join(render(st) for st in runs), end="")
    return 0


# ------------------------------------------------------------------ ftlaunch runs [DIR]
def find_runs(top: str, depth: int = 2) -> list[str]:
    """Run directories (folders holding resolved.yaml) at or below top, at most depth levels
    down, sorted; folders moved aside by --overwrite (NAME.old-TIME) included."""
    found = []
    top = os.path.abspath(top)
    for folder, subdirs, files in os.walk(top):
        level = folder[len(top):].count(os.sep)
        if layout.RESOLVED in files:
            found.append(folder)
            subdirs[:] = []   # a run directory's own folders hold no runs
        elif level >= depth:
            subdirs[:] = []
        else:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found)


@dataclass(frozen=True)
class RunsCall:
    """What `ftlaunch runs` was asked: the folder to look in (None: runs/, else .), JSON output."""
    dir: str | None = None
    json: bool = False


def runs_main(call: RunsCall) -> int:
    """`ftlaunch runs [DIR]`: one line per run directory under DIR (default runs/ if there,
    else .): state, step of max, Slurm job, path."""
    top = call.dir or ("runs" if os.path.isdir("runs") else ".")
    rows = []
    for run_dir in find_runs(top):
        try:
            st = collect(run_dir)
        except Exception as exc:   # noqa: BLE001 - one unreadable run does not hide the others
            rows.append({"run_dir": run_dir, "error": str(exc).splitlines()[0]})
            continue
        rows.append(st)
    if call.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no run directories (with {layout.RESOLVED}) under {os.path.abspath(top)}")
        return 0
    for st in rows:
        if "error" in st:
            print(f"{'?':<12} {'':<14} {'':<22} {st['run_dir']}  ({st['error']})")
            continue
        job = st["slurm"]
        print(f"{st['state']:<12} {st['step']:>6}/{st['max_steps']:<7} "
              f"{(job['job_id'] + ' ' + job['state']) if job else '-':<22} {st['run_dir']}")
    return 0
