"""The run directory's state files: the only module that writes, reads and interprets them.

RUN_DIR/STOP (layout.STOP_REQUEST) asks every rank to stop: `ftlaunch run` creates it on
Ctrl-C (`request_stop`), the Slurm job script on SIGUSR1/SIGTERM (its own `: > STOP`, at the
path `stop_path` gives); the ranks look for it at every step boundary (`stop_requested`) and
rank 0 removes it once honoured (`clear_stop`), so a resumed run does not stop again at once.
A signal to a rank itself sets its `StopRequest`; both count in the ranks' stop agreement.

RUN_DIR/exit_status.json (layout.EXIT_STATUS) says how a launch ended: {"code", "step",
"checkpoint", "message", "rank", "host", "time"}. Rank 0 records every ending; a failing rank
records its own failure, and the first failure of a launch stands (`write_exit_status`).
`ftlaunch run` turns it into its exit code (`launch_exit_code`), since torchrun reports any
failed rank as 1.

RUN_DIR/steps.json (layout.STEPS) holds an epoch run's steps as rank 0 counted them from the
tokenized data (`write_steps`, `counted_steps`): `ftlaunch status` and `stop` read it, since the
ds_config.json a Slurm job's login node wrote holds an estimate (it cannot tokenize).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
from typing import Any, NoReturn, Optional

from launcher.cluster import layout
from launcher.common.files import write_atomic


# ------------------------------------------------------------------ stop requests
class StopRequest:
    """A rank's stop flag: SIGTERM / SIGINT / SIGUSR1 set it (the first signal names it)."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self) -> None:
        self.signal: Optional[str] = None

    def install(self) -> "StopRequest":
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            print(f"ftlaunch: {self.signal} received: stopping at the next step boundary "
                  "(after a checkpoint)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def votes(self, run_dir: str, main: bool) -> list[float]:
        """This rank's say in the ranks' stop agreement (summed over the ranks): a signal here,
        and the STOP file (looked for by rank 0 alone, so one file is one vote)."""
        return [float(self.requested), float(main and stop_requested(run_dir))]


def stop_path(run_dir: str) -> str:
    return os.path.join(run_dir, layout.STOP_REQUEST)


def resume_command(run_dir: str) -> str:
    """What continues a run that stopped on request (exit 75)."""
    return f"ftlaunch run {shlex.quote(os.path.join(run_dir, layout.RESOLVED))} --resume"


def request_stop(run_dir: str) -> None:
    """Ask the ranks of the run in run_dir to checkpoint at the next step boundary and exit 75."""
    open(stop_path(run_dir), "a").close()


def stop_requested(run_dir: str) -> bool:
    return os.path.exists(stop_path(run_dir))


def clear_stop(run_dir: str) -> None:
    """Remove a stop request (honoured, stale from an earlier launch, or too late to matter)."""
    try:
        os.remove(stop_path(run_dir))
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------ exit_status.json
def write_steps(run_dir: str, steps: int) -> None:
    """Rank 0: an epoch run's steps, counted from the tokenized data (launcher/config/epochs.py)."""
    write_atomic(os.path.join(run_dir, layout.STEPS), json.dumps({"max_steps": int(steps)}) + "\n")


def counted_steps(run_dir: str) -> int | None:
    """The steps `write_steps` recorded, None where none were (or unreadable)."""
    try:
        with open(os.path.join(run_dir, layout.STEPS), encoding="utf-8") as fh:
            n = json.load(fh)["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def status_path(run_dir: str) -> str:
    return os.path.join(run_dir, layout.EXIT_STATUS)


def read_exit_status(run_dir: str, since: float) -> dict | None:
    """RUN_DIR/exit_status.json if it was written at or after `since` (an earlier launch's
    record is not this one's), else None."""
    path = status_path(run_dir)
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def is_failure(code: object) -> bool:
    """A code that is neither success nor a stop on request."""
    return code not in (layout.EXIT_OK, layout.EXIT_STOPPED)


# A peer's error stamped up to this long before a rank's death by a hard signal (KILL, SEGV,
# ABRT, ...) is taken for its consequence: the kernel closes the dead rank's sockets (and the
# peer's collective fails) before the dead rank's guardian is told.
CONSEQUENCE_S = 2.0
# Signals a launcher sends the ranks that are still alive once one failed: never a root cause.
SENT_TO_SURVIVORS = ("SIGTERM", "SIGINT", "SIGUSR1")


def write_exit_status(run_dir: str, rank: int, code: int, step: int, checkpoint: Optional[str],
                      message: str, *, since: Optional[float] = None,
                      at: Optional[float] = None, died_by: Optional[int] = None) -> None:
    """Record how the run ended for this rank. Rank 0 records every ending; any rank records
    its own failure (code not 0 or 75), and the first failure of this launch (since `since`)
    stands: a peer's consequent error (a closed connection, a timeout) never replaces the root
    cause. `died_by` (with `at`, when it happened) is a rank's death by that signal, recorded
    by its guardian (launcher/cluster/rank_guard.py) a moment after it: a death by a hard signal
    replaces another rank's failure stamped at most CONSEQUENCE_S before it; a death by a signal
    the launcher sends the survivors, or one after the rank's own recorded error, replaces
    nothing. `step` is the last step the rank completed. A record that cannot be written is
    skipped (the exit code and stderr still tell)."""
    failed = is_failure(code)
    if not (rank == 0 or failed):
        return
    at = time.time() if at is None else at
    if failed and since is not None:
        first = read_exit_status(run_dir, since)  # this launch's, if any
        if first is not None and is_failure(first.get("code")) and not _replaces(
                first, rank, at, died_by):
            return
    try:
        write_atomic(status_path(run_dir), json.dumps(
            {"code": code, "step": step, "checkpoint": checkpoint, "message": message,
             "rank": rank, "host": socket.gethostname(),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at)),
             "at": round(at, 3)}) + "\n")
    except OSError:
        pass


def _replaces(first: dict, rank: int, at: float, died_by: Optional[int]) -> bool:
    """Whether this rank's failure (at `at`; a death by signal `died_by`) replaces `first`, a
    failure already recorded in this launch."""
    if died_by is None:
        return first.get("rank") == rank   # a rank's own later words about its failure
    if first.get("rank") == rank or signal.Signals(died_by).name in SENT_TO_SURVIVORS:
        return False
    stamped = first.get("at")
    return isinstance(stamped, (int, float)) and stamped >= at - CONSEQUENCE_S


# ------------------------------------------------------------------ a rank's progress
# The write end of a pipe to the rank's guardian (launcher/cluster/rank_guard.py): the rank writes each
# step it completes there, so a rank killed by a signal is recorded with its last step.
PROGRESS_FD_ENV = "FTLAUNCH_PROGRESS_FD"
_last_step = -1


def report_step(step: int) -> None:
    """This rank completed `step` (or resumed at it): kept for its own failure record, and told
    to its guardian, if it has one."""
    global _last_step
    _last_step = step
    fd = os.environ.get(PROGRESS_FD_ENV)
    if fd and fd.isdigit():
        try:
            os.write(int(fd), f"{step}\n".encode())
        except OSError:
            pass   # the guardian is gone: only this rank's own record can say the step


def last_step() -> int:
    """The last step this rank completed (-1: none yet, still loading)."""
    return _last_step


def launch_exit_code(rc: int, run_dir: str, since: float) -> int:
    """The exit code of a launch whose launcher exited with rc: torchrun says 1 for any failed
    rank; exit_status.json (written during this launch, at or after `since`) says which code.
    Killed by a signal (rc < 0): 128 + the signal, the shell's convention. rc 0 with a stop
    recorded is 75 (ranks under `ftlaunch run` exit 0 on a stop: see `rank_exit_code`)."""
    rec = read_exit_status(run_dir, since - 1)  # mtime granularity: a second's slack
    if rc == 0:
        return layout.EXIT_STOPPED if rec and rec.get("code") == layout.EXIT_STOPPED else 0
    try:
        code = int(rec["code"]) if rec else 0
    except (KeyError, TypeError, ValueError):
        code = 0
    if code != 0:
        return code
    return rc if rc > 0 else 128 - rc


# The ranks of `ftlaunch run` exit 0 after a stop on request (torchrun would print a failure
# report with a traceback for 75); exit_status.json still says 75 and `ftlaunch run` exits 75.
STOPPED_EXIT_ENV = "FTLAUNCH_STOPPED_EXIT"


def rank_exit_code(code: int) -> int:
    """The process exit code of a rank whose run ended with `code`."""
    if code == layout.EXIT_STOPPED and os.environ.get(STOPPED_EXIT_ENV) == "0":
        return 0
    return code


def leave(code: int) -> NoReturn:
    """End a rank whose files are written and whose process group is destroyed, skipping the
    interpreter's teardown: there gloo's worker threads can still hold tensors and abort the
    process (SIGABRT, "terminate called without an active exception") after a clean finish or
    stop, and torchrun then calls the whole job failed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------ a finished run
def last_status(run_dir: str) -> dict | None:
    """RUN_DIR/exit_status.json, whenever written (None if absent or unreadable)."""
    return read_exit_status(run_dir, 0.0)


def finished(run_dir: str, max_steps: int) -> dict | None:
    """The exit record of a run whose last launch finished (code 0) at or past max_steps."""
    rec = last_status(run_dir)
    try:
        if rec and rec.get("code") == layout.EXIT_OK and int(rec.get("step", -1)) >= max_steps:
            return rec
    except (TypeError, ValueError):
        pass
    return None


def announce_finished(run_dir: str, max_steps: int, main: bool) -> bool:
    """True (and, on the main rank, the "is finished" line) for a run that finished."""
    done = finished(run_dir, max_steps)
    if done and main:
        print(finished_message(run_dir, done, max_steps), flush=True)
    return done is not None


def check_resume_step(step: int | None, path: str, max_steps: int) -> None:
    """Refuse to resume from a checkpoint past train.max_steps (the schedule has no such step)."""
    from launcher.config.errors import ConfigError, Problem
    if step is not None and step > max_steps:
        raise ConfigError([Problem(
            "train.max_steps", f"the newest checkpoint {path} is at step {step}, beyond "
            f"train.max_steps {max_steps}: there is no schedule to continue",
            f"set train.max_steps (or --max-steps) above {step} to train further, or pass "
            "--overwrite to start again")])


def finished_message(run_dir: str, rec: dict, max_steps: int) -> str:
    step = rec.get("step")
    return (f"ftlaunch: {run_dir} is finished: step {step} of {max_steps} done "
            f"({rec.get('time', '?')}); nothing changed. To train further: --max-steps N "
            f"(N > {step}); to start again: --overwrite")


# ------------------------------------------------------------------ the run's config
def load_run(run_dir: str, overrides: Any = ()) -> Any:
    """The RunConfig in RUN_DIR/resolved.yaml with overrides applied, for commands that read a
    run after the fact (export, status): problems of the inputs it names (data moved, ...) do
    not matter there, so only a config that cannot be built is refused (ConfigError)."""
    from launcher.config.errors import ConfigError, Problem
    from launcher.config.runfile import parse
    path = os.path.join(run_dir, layout.RESOLVED)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([Problem("<run dir>", f"cannot read {path}: {exc.strerror or exc}",
                                   "give a run directory made by ftlaunch run or ftlaunch slurm "
                                   "(it holds resolved.yaml)")]) from None
    cfg, problems = parse(text, list(overrides), source=path, base_dir=run_dir)
    if cfg is None:
        raise ConfigError(problems, path)
    return cfg
