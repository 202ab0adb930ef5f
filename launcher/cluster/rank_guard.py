"""A rank's guardian: the rank's work runs in a child process, so that a death by a signal is
still recorded in exit_status.json.

NCCL's watchdog aborts a rank whose collective timed out (SIGABRT: launcher/rank/timeouts.py), the
kernel's out-of-memory killer sends SIGKILL, native code can crash (SIGSEGV): none of them runs
the rank's own `except`, and exit_status.json would not say what ended the run (`ftlaunch
status` would show it still running). `ftlaunch train` therefore runs the same command again as
its child (GUARDED_ENV set there) and waits for it. It forwards SIGTERM, SIGINT and SIGUSR1 (the
stop protocol; SIGTERM with a SIGCONT, so that a stopped child receives it), passes the child's
exit code on, and when the child died by a signal it records the failure (code 128 + the signal,
this rank, the signal and what usually sends it; the first failure of a launch stands,
run_state.write_exit_status) and then dies by the same signal, so that torchrun, the deepspeed
launcher and srun report what they would have reported. The child dies with its guardian
(PR_SET_PDEATHSIG). `FTLAUNCH_RANK_GUARD=0` runs the rank without one.

Imports no torch: the guardian costs one small Python process per rank.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from launcher.common import forked

GUARDED_ENV = "FTLAUNCH_RANK_GUARDED"   # set in the child: it does the work
SWITCH_ENV = "FTLAUNCH_RANK_GUARD"      # "0": no guardian
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def wanted(env: Optional[dict] = None) -> bool:
    env = os.environ if env is None else env
    return env.get(GUARDED_ENV) != "1" and env.get(SWITCH_ENV, "1") != "0"


def death_message(signum: int, rank: int, dist_timeout_s: Optional[int], run_dir: str) -> str:
    """What a rank's death by signal usually means, and where to look."""
    name = signal.Signals(signum).name
    head = f"rank {rank} died by {name} without a Python error"
    if signum == signal.SIGABRT:
        timeout = f"train.dist_timeout_s ({dist_timeout_s} s)" if dist_timeout_s else \
            "train.dist_timeout_s"
        return (f"{head}: on GPUs, NCCL's watchdog aborts a rank whose collective waited longer "
                f"than {timeout} (a peer died, hung, or worked alone too long: see "
                "train.save_timeout_s); its log says 'Watchdog caught collective operation "
                "timeout', and NCCL's record of the last collectives is in "
                f"{os.path.join(run_dir, 'logs')}/nccl-trace-rank-{rank}. Otherwise a native "
                "library aborted: see the rank's log")
    if signum == signal.SIGKILL:
        return (f"{head}: usually the kernel's out-of-memory killer (see `dmesg` on the node, "
                "and the per-node memory of `ftlaunch plan`), or the launcher or Slurm ending "
                "the job")
    if signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE):
        return f"{head}: a crash in native code (CUDA, NCCL, a compiled op): see the rank's log"
    return f"{head}: sent by another process (the launcher, Slurm, a user)"


def _where(run_file: str, overrides: Sequence[str]) -> tuple[Optional[str], Optional[int], int]:
    """(run directory, dist_timeout_s, rank) for the record; None where the run file does not
    load (the child then reports that itself)."""
    from launcher.cluster import dist_env
    try:
        rank = dist_env.from_environ().rank
    except ValueError:
        rank = 0
    try:
        from launcher.config.runfile import load
        cfg = load(run_file, overrides)
    except Exception:  # noqa: BLE001 - the child reports the run file's problems
        return None, None, rank
    return cfg.run_dir, cfg.train.dist_timeout_s, rank


class _Progress:
    """Reads the steps the child reports (one line each) in a thread; `last` is the newest."""

    def __init__(self, fd: int) -> None:
        import threading
        self._fd, self._step = fd, -1
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with os.fdopen(self._fd, "rb") as fh:
            for line in fh:   # ends when every holder of the write end is gone
                if line.strip().isdigit():
                    self._step = int(line)

    def last(self, wait_s: float) -> int:
        """The newest step, after waiting up to wait_s for lines still in the pipe (its write
        end may outlive the child in a data worker it forked)."""
        self._thread.join(wait_s)
        return self._step


def run(run_file: str, overrides: Sequence[str] = (), command: Optional[list[str]] = None) -> int:
    """Run the rank's work as a child and wait; its exit code, or its signal recorded and
    raised again here."""
    from launcher.cluster import run_state
    started = time.time() - 1   # mtime granularity, as train.main
    command = command or [sys.executable, "-m", "launcher", "train", run_file, *overrides]
    read_fd, write_fd = os.pipe()   # the child writes each step it completes (report_step)
    child = subprocess.Popen(command, env={**os.environ, GUARDED_ENV: "1",
                                           run_state.PROGRESS_FD_ENV: str(write_fd)},
                             preexec_fn=forked.die_with_parent, pass_fds=(write_fd,))
    os.close(write_fd)
    progress = _Progress(read_fd)

    def forward(signum: int, frame: Any) -> None:
        try:
            child.send_signal(signum)
            if signum == signal.SIGTERM:   # a stopped rank (SIGSTOP, a debugger, a freezer)
                child.send_signal(signal.SIGCONT)   # gets it now, not at torchrun's SIGKILL 30 s on
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    rc = child.wait()
    died_at = time.time()
    if rc >= 0:
        return rc
    signum = -rc
    step = progress.last(wait_s=0.5)
    run_dir, timeout, rank = _where(run_file, overrides)
    message = death_message(signum, rank, timeout, run_dir or ".")
    if step >= 0:
        message += f" (after step {step}, the last it completed)"
    print(f"ftlaunch: {message}", file=sys.stderr, flush=True)
    if run_dir is not None:
        run_state.write_exit_status(run_dir, rank, 128 + signum, step, None, message,
                                    since=started, at=died_at, died_by=signum)
    sys.stdout.flush()
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # the child's core (if any) is the one
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum   # a signal that does not end a process by default
