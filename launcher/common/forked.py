"""Work split over forked processes, with an end that cannot hang, and children that die with
their parent.

`fork_map(fn, parts)` is `[fn(p) for p in parts]`, each part computed in its own forked process,
the results in order. Fork, because the work (a tokenizer, a chat template) is already in memory
and `python -m launcher` is not import-safe for spawn; nothing is pickled on the way in.

Why not `multiprocessing.Pool`: its end (`terminate`) holds the task queue's lock and stops the
workers with SIGTERM. A worker forked from a rank carries the rank's SIGTERM handler (a stop
request, launcher/cluster/run_state.py) until its initializer runs; a worker still starting when
the pool ended took the SIGTERM as a stop request, then waited on the lock forever, and the rank
waited on the worker. Here each child has its own pipe (no shared queue, no lock), sends one
message and exits: the parent reads the pipes in order and joins. No signal is sent on the normal
path; on an error the children are killed (SIGKILL). A child dies with its parent
(PR_SET_PDEATHSIG): a killed rank leaves no worker behind.
"""
from __future__ import annotations

import os
import pickle
import signal
import traceback
from typing import Any, Callable, Sequence


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child: `sig` when the parent dies (Linux prctl PR_SET_PDEATHSIG; nothing elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(fn: Callable[[Any], Any], part: Any, conn, parent: int) -> None:
    die_with_parent()
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)   # a rank's handlers are the rank's, not a worker's
    try:
        out = (True, fn(part))
    except BaseException as e:   # noqa: BLE001 - every failure goes back to the parent
        out = (False, _picklable(e))
    conn.send(out)
    conn.close()


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:   # noqa: BLE001 - any exception that does not survive the pipe
        return RuntimeError("".join(traceback.format_exception(e)).rstrip())


def fork_map(fn: Callable[[Any], Any], parts: Sequence[Any]) -> list:
    """[fn(p) for p in parts], each part in a forked process; a part's exception is raised here
    (the first part's that failed), after every child has ended."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    children, readers = [], []
    try:
        for part in parts:
            reader, writer = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_child, args=(fn, part, writer, os.getpid()))
            child.start()
            writer.close()
            children.append(child)
            readers.append(reader)
        results = [_receive(r, c) for r, c in zip(readers, children)]
    except BaseException:
        for child in children:
            if child.exitcode is None:
                child.kill()
        raise
    finally:
        for child in children:
            child.join()
        for reader in readers:
            reader.close()
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def _receive(reader, child) -> tuple[bool, Any]:
    try:
        return reader.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"a forked worker (pid {child.pid}) ended without a result "
                           f"(exit code {child.exitcode}: a negative code is the signal that "
                           f"killed it, -9 often the out-of-memory killer)") from None
