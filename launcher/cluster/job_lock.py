"""One Slurm job per run directory: RUN_DIR/job.lock names the job that owns it.

`ftlaunch slurm --submit` records the job id sbatch gave (`record`), and the job script records
its own id when it starts (the same check in bash, slurm/job.sbatch): a job that finds the lock
naming another job that Slurm still has queued or running exits at once (layout.EXIT_LOCKED)
without touching the run directory. `refuse_if_live` is the login-node side: writing the run
directory again (a second submit, re-rendering, --overwrite) while the recorded job is live is
refused, naming the job and `scancel` as the fix.

The file: the job id on the first line, then who recorded it and when (for people reading it).
A requeued job keeps its id, so its restarts own the directory as before.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Optional

from launcher.cluster import layout

# Slurm job states after which the job never runs again; any other state known to squeue is live.
ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                   "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED"})


def path(run_dir: str) -> str:
    return os.path.join(run_dir, layout.JOB_LOCK)


def read(run_dir: str) -> Optional[str]:
    """The job id recorded in RUN_DIR/job.lock (None: no lock, or no id in it)."""
    try:
        with open(path(run_dir), encoding="utf-8") as fh:
            first = fh.readline().strip()
    except OSError:
        return None
    return first if first.isdigit() else None


def record(run_dir: str, job_id: str, by: str) -> None:
    """Write job_id as the owner of run_dir (atomically: readers see the old id or the new)."""
    from launcher.common.files import write_atomic
    write_atomic(path(run_dir), f"{job_id}\n# recorded by {by}, "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")


MUTEX = ".job.lock.mutex"   # a folder held while the lock is checked and written (the job's too)


def claim(run_dir: str, job_id: str, by: str, wait_s: float = 30.0) -> Optional[tuple[str, str]]:
    """Record job_id as run_dir's owner unless another job recorded there is live: then nothing
    is written and (its id, its state) is returned. Holds the mutex the job script holds for
    its own check (RUN_DIR/.job.lock.mutex, made by mkdir); one older than wait_s is taken."""
    mutex = os.path.join(run_dir, MUTEX)
    end = time.monotonic() + wait_s
    held = False
    while not held:
        try:
            os.mkdir(mutex)
            held = True
        except FileExistsError:
            if time.monotonic() > end:
                break   # left by a process killed while it held it
            time.sleep(0.1)
    try:
        current = read(run_dir)
        if current is not None and current != job_id:
            state = live_state(current)
            if state:
                return current, state
        record(run_dir, job_id, by)
        return None
    finally:
        try:
            os.rmdir(mutex)
        except OSError:
            pass


SQUEUE_TIMEOUT_S = 60   # squeue that has not answered by then: Slurm's state is unknown
UNKNOWN = "UNKNOWN"     # live_state when squeue did not answer: the job may still run
# squeue's words for a job id slurmctld no longer knows (the job ended long ago)
FORGOTTEN = "Invalid job id"


def unanswered(stderr: str) -> bool:
    """A Slurm tool's failure that leaves the job's state unknown (slurmctld unreachable, busy,
    timed out), as against a job id Slurm forgot or a machine where Slurm is not configured
    (the tool is installed, its slurm.conf is not): those say no job of ours runs."""
    return FORGOTTEN not in stderr and "configuration" not in stderr


def live_state(job_id: str) -> Optional[str]:
    """The job's state while Slurm may still run it (PENDING, RUNNING, ...), else None (ended,
    forgotten by Slurm, or no squeue here). UNKNOWN when squeue is there but did not answer
    (timed out, slurmctld unreachable): the job is then not taken for ended, so its lock holds."""
    if shutil.which("squeue") is None:
        return None
    try:
        p = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                           text=True, timeout=SQUEUE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return UNKNOWN
    except OSError:
        return None
    if p.returncode != 0:
        return UNKNOWN if unanswered(p.stderr) else None
    state = p.stdout.strip().split("\n")[0].strip()
    return state if state and state not in ENDED else None


def live_owner(run_dir: str) -> Optional[tuple[str, str]]:
    """(job id, state) of the job recorded in run_dir while it is queued or running."""
    job = read(run_dir)
    if job is None:
        return None
    state = live_state(job)
    return (job, state) if state else None


def refuse_if_live(run_dir: str, doing: str) -> None:
    """ConfigError (key output.dir) while the job recorded in run_dir is queued or running:
    `doing` it now would put a second job, or new files, under a job that uses them."""
    from launcher.config.errors import ConfigError, Problem
    owner = live_owner(run_dir)
    if owner is None:
        return
    job, state = owner
    if state == UNKNOWN:
        state = (f"{UNKNOWN} (squeue did not answer within {SQUEUE_TIMEOUT_S} s, or failed: "
                 "the job may still run)")
    raise ConfigError([Problem(
        "output.dir", f"{run_dir} belongs to Slurm job {job}, which is {state}: {doing} now "
        "would run two jobs on one run directory (or change the files the job reads)",
        f"wait until job {job} ends (ftlaunch status {run_dir}), or cancel it: scancel {job}; "
        "or set output.dir to another folder")], "run directory")
