"""Fault injection for tests: inert unless FTLAUNCH_FAULT is set.

`FTLAUNCH_FAULT=point@step[:action]` with point `ckpt-write` (in checkpoint.save: after
DeepSpeed's files, before this rank's own files), `ckpt-manifest` (after every rank wrote, before
the manifest), `step` (in the training loop, after step `step`'s backward passes, before its
loss all-reduce and update), `backward` (in step `step`, before the first backward: the peers
are about to reduce gradients) or `loss` (each micro batch of step `step`; only with action
`nan`, which makes that loss NaN: the loss watchdog's case); action `exit`
(os._exit(17), a crash: default), `raise` (RuntimeError), `enospc` (OSError ENOSPC, a full disk),
`kill` (SIGKILL to itself), `abort` (SIGABRT, as NCCL's watchdog ends a rank), `freeze` (SIGSTOP to
itself: a hung rank), `sigterm` / `sigint` /
`sigusr1` (that signal to itself: the stop protocol), `stop` (create RUN_DIR/STOP) or
`abort-at-exit` (the rank goes on, and aborts if the interpreter's teardown ever runs: the
SIGABRT torch's gloo threads can cause there, which `train.leave` avoids). Several
faults are separated by commas. `FTLAUNCH_FAULT_RANK=r` limits them to one rank.

What each fault does to a run, and the test that shows it: docs/faults.md.
"""
from __future__ import annotations

import atexit
import errno
import os
import signal
import sys

from launcher.cluster import run_state


def fault(point: str, step: int, rank: int, run_dir: str | None = None) -> bool:
    """Trigger the fault FTLAUNCH_FAULT asks for at (point, step) on this rank, else nothing.
    True only for action `nan`: the caller poisons its value."""
    spec = os.environ.get("FTLAUNCH_FAULT", "")
    only = os.environ.get("FTLAUNCH_FAULT_RANK")
    if not spec or (only not in (None, "") and int(only) != rank):
        return False
    for item in spec.split(","):
        where, _, action = item.strip().partition(":")
        name, _, at = where.partition("@")
        if name != point or (at and int(at) != step):
            continue
        action = action or "exit"
        if action == "nan":
            return True
        msg = f"injected fault {point}@{step} ({action}) on rank {rank}"
        print(f"ftlaunch: {msg}", file=sys.stderr, flush=True)
        if action == "exit":
            os._exit(17)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)
            return False
        if action in ("sigterm", "sigint", "sigusr1"):
            os.kill(os.getpid(), getattr(signal, action.upper()))
            return False
        if action == "abort":
            os.abort()   # SIGABRT now: how NCCL's watchdog ends a rank whose collective timed out
        if action == "abort-at-exit":
            atexit.register(os.abort)
            return False
        if action == "stop":
            if run_dir is None:
                raise ValueError(f"fault action stop needs the run directory ({point})")
            run_state.request_stop(run_dir)
            return False
        if action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device ({msg})")
        raise RuntimeError(msg)
    return False
