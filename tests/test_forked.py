"""launcher/common/forked.py: the forked workers of preprocessing end without a signal on the
normal path, report their errors, and die with their parent."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launcher.common import forked


def test_results_come_back_in_order_from_separate_processes():
    got = forked.fork_map(lambda n: (n * n, os.getpid()), [3, 1, 2])
    assert [v for v, _ in got] == [9, 1, 4]
    pids = {p for _, p in got}
    assert len(pids) == 3 and os.getpid() not in pids


def test_a_part_error_is_raised_here_with_its_type_and_message():
    def fn(n):
        if n == 2:
            raise ValueError(f"row {n} is not a conversation")
        return n
    with pytest.raises(ValueError, match="row 2 is not a conversation"):
        forked.fork_map(fn, [1, 2, 3])


def test_an_exception_that_cannot_be_pickled_still_comes_back_as_its_text():
    class Local(Exception):  # a class defined in a function: pickle cannot find it
        pass

    def fn(n):
        raise Local(f"part {n} failed")
    with pytest.raises(RuntimeError, match="part 1 failed"):
        forked.fork_map(fn, [1])


def test_a_worker_killed_by_a_signal_is_named():
    with pytest.raises(RuntimeError, match=r"ended without a result \(exit code -9"):
        forked.fork_map(lambda n: os.kill(os.getpid(), signal.SIGKILL), [1])


def test_a_worker_of_a_rank_that_handles_sigterm_does_not():
    """A rank takes SIGTERM as a stop request (launcher/cluster/run_state.py); its workers end on it."""
    old = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        got = forked.fork_map(lambda _: signal.getsignal(signal.SIGTERM), [0, 1])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [signal.SIG_DFL, signal.SIG_DFL]


def test_workers_die_with_their_parent(tmp_path):
    pids = tmp_path / "pids"
    code = textwrap.dedent(f"""
        import os, time
        from launcher.common import forked
        def work(n):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(120)
        forked.fork_map(work, [0, 1])
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(_lines(pids)) < 2:
            time.sleep(0.05)
        workers = [int(p) for p in _lines(pids)]
        assert len(workers) == 2
        parent.kill()
        parent.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers), "a worker outlived its killed parent"
    finally:
        parent.kill()


def _lines(path):
    return path.read_text().split() if path.exists() else []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
