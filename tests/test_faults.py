"""Faults on 2 real DeepSpeed CPU ranks through `ftlaunch run --nproc 2`: a rank SIGKILLed mid
training or raising ends the whole run, bounded in time, non-zero, naming the rank (and the cause
where there is one); a frozen rank (SIGSTOP) is ended by train.dist_timeout_s; SIGTERM to a rank
stops both at a step boundary with a verified checkpoint.

Also: the FTLAUNCH_FAULT spec itself (launcher/rank/faults.py), and docs/faults.md kept honest: every
test the table cites must exist.

The elapsed-time bounds are hang detectors (timeout + a wide margin on a loaded machine), not
speed claims.
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from launcher.rank import checkpoint as ck
from launcher.rank import faults
from test_train_engine import ROOT, rank_env

TIMEOUT_S = 20      # train.dist_timeout_s for these runs
HUNG_TIMEOUT_S = 10  # the smallest allowed: the hung-rank test waits for it
MARGIN_S = 90       # startup (imports, ~10 s a rank) + a loaded machine
STEPS = 6


def run_file(tiny: dict, folder, steps: int = STEPS, timeout: int = TIMEOUT_S) -> str:
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: faults
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true}}
        train: {{max_steps: {steps}, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 0,
                 checkpoint_every: 2, device: cpu, dist_timeout_s: {timeout}, log_every: 1}}
        freeze: {{policy: last_layers, trainable_layers: 1, also_train: [lm_head]}}
        deepspeed: {{zero_stage: 2}}
        output: {{dir: {folder}/run, save_final: false}}
        """))
    return str(path)


def ftlaunch_run(path: str, fault: str = "", rank: str = "", *extra: str):
    """`ftlaunch run PATH --nproc 2` with a fault injected; (completed process, seconds)."""
    env = dict(rank_env(), FTLAUNCH_FAULT=fault, FTLAUNCH_FAULT_RANK=rank)
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "launcher", "run", path, "--nproc", "2", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT_S + MARGIN_S + 120)
    return p, time.monotonic() - started


def root_cause(log: str) -> str:
    """The "Root Cause (first observed failure)" block of torchrun's failure summary."""
    m = re.search(r"Root Cause \(first observed failure\):\n(.*?)\n=+", log, re.S)
    assert m, log[-4000:]
    return m.group(1)


def status(folder) -> dict:
    with open(folder / "run" / "exit_status.json") as fh:
        return json.load(fh)


@pytest.mark.multirank
@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_run(tiny, tmp_path):
    p, took = ftlaunch_run(run_file(tiny, tmp_path), "step@3:kill", "1")
    print(f"rank 1 SIGKILLed: the run ended after {took:.1f} s")
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-4000:]
    assert took < TIMEOUT_S + MARGIN_S, f"{took:.0f} s: a rank waited for the dead one"
    assert "injected fault step@3 (kill) on rank 1" in p.stderr
    # torchrun's failure summary: the root cause is rank 1 on this host, killed by SIGKILL
    cause = root_cause(log)
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", cause), log[-4000:]
    assert re.search(r"exitcode\s*:\s*-9 .*SIGKILL", cause), log[-4000:]
    assert re.search(r"host\s*:\s*\S+", cause), log[-4000:]
    # the record names rank 1, its death and its last step (2: killed inside step 3), not rank
    # 0's consequent connection error; status says the same
    st = status(tmp_path)
    assert (st["code"], st["rank"], st["step"]) == (137, 1, 2), st
    assert st["message"].startswith("rank 1 died by SIGKILL") and "after step 2" in st["message"]
    from launcher.ops import status as status_cmd
    shown = status_cmd.render(status_cmd.collect(str(tmp_path / "run")))
    assert "state      failed: exit 137 at step 2 (" in shown, shown
    assert "failure    rank 1 on " in shown, shown
    # step 2's checkpoint is still there and good
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert ck.latest_complete(ckpts) == os.path.join(ckpts, ck.step_name(2))
    assert ck.problem(os.path.join(ckpts, ck.step_name(2)), hashes=True) is None


@pytest.mark.multirank
@pytest.mark.slow
def test_exception_in_one_rank_ends_the_run(tiny, tmp_path):
    p, took = ftlaunch_run(run_file(tiny, tmp_path), "step@3:raise", "1")
    print(f"rank 1 raised: the run ended after {took:.1f} s")
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-4000:]
    assert took < TIMEOUT_S + MARGIN_S, f"{took:.0f} s: a rank waited for the failed one"
    # the cause, from the rank itself, and the rank in torchrun's summary
    assert "RuntimeError: injected fault step@3 (raise) on rank 1" in log, log[-4000:]
    cause = root_cause(log)
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", cause), log[-4000:]
    assert re.search(r"host\s*:\s*\S+", cause), log[-4000:]
    # exit_status.json keeps the root cause, not rank 0's consequent connection error
    st = status(tmp_path)
    assert (st["code"], st["rank"], st["host"]) == (1, 1, socket.gethostname()), st
    assert st["message"] == "rank 1: RuntimeError: injected fault step@3 (raise) on rank 1", st
    assert ck.latest_complete(str(tmp_path / "run" / "checkpoints")) is not None


@pytest.mark.multirank
@pytest.mark.slow
def test_sigterm_to_a_rank_stops_at_a_step_with_a_checkpoint(tiny, tmp_path):
    path = run_file(tiny, tmp_path)
    p, _ = ftlaunch_run(path, "step@3:sigterm", "0")
    assert p.returncode == 75, (p.stdout + p.stderr)[-4000:]
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert f"stopped at step 3 (SIGTERM); checkpoint {ckpts}/step-00000003" in p.stdout
    assert ck.latest_complete(ckpts) == os.path.join(ckpts, ck.step_name(3))
    assert ck.problem(os.path.join(ckpts, ck.step_name(3)), hashes=True) is None
    assert status(tmp_path)["code"] == 75 and status(tmp_path)["step"] == 3

    # resuming from a checkpoint written on a stop request to the end:
    # tests/test_train_resume.py::test_interrupted_run_matches_uninterrupted (same stop path)


def descendants(parent: int) -> list[int]:
    """Every process below parent (via /proc)."""
    todo, found = [parent], []
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                kids = [int(c) for c in fh.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def rank_pid(parent: int, local_rank: int) -> int | None:
    """The pid of the rank process with LOCAL_RANK=local_rank below parent: the one doing the
    work, below its guardian (launcher/cluster/rank_guard.py), when there is one."""
    found = None
    for pid in descendants(parent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in env:  # torchrun sets it in the ranks' only
            if b"FTLAUNCH_RANK_GUARDED=1" in env:
                return pid
            found = found or pid
    return found


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("fault", [
    # frozen between steps: rank 0 waits in the per-step loss all-reduce (the world group)
    "step@3:freeze",
    # frozen before its backward: rank 0 waits in ZeRO's gradient reduction, on the process
    # group DeepSpeed creates for itself (which must get the same timeout)
    "backward@4:freeze",
])
def test_a_hung_rank_is_ended_by_the_collective_timeout(tiny, tmp_path, fault):
    """Rank 1 frozen (SIGSTOP): nothing dies, so only train.dist_timeout_s can end the run."""
    path = run_file(tiny, tmp_path, steps=100000, timeout=HUNG_TIMEOUT_S)
    # no checkpoint collectives in the way: the fault decides where rank 0 waits
    env = dict(rank_env(), FTLAUNCH_FAULT=fault, FTLAUNCH_FAULT_RANK="1")
    p = subprocess.Popen([sys.executable, "-m", "launcher", "run", path,
                          "train.checkpoint_every=0", "--nproc", "2"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    frozen_at = None
    out = err = ""
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None and frozen_at is None:
            pid = rank_pid(p.pid, 1)
            if pid is not None:
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                            frozen_at = time.monotonic()
                except OSError:
                    pass
            time.sleep(0.2)
        if frozen_at is None or p.poll() is not None:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"rank 1 did not reach the fault: {(out + err)[-4000:]}")
        out, err = p.communicate(timeout=HUNG_TIMEOUT_S + MARGIN_S + 60)
        took = time.monotonic() - frozen_at
        print(f"rank 1 frozen ({fault}): the run ended {took:.1f} s later "
              f"(dist_timeout_s {HUNG_TIMEOUT_S})")
    finally:
        if p.poll() is None:
            for pid in descendants(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.kill()
            p.communicate()
    log = out + err
    assert f"injected fault {fault.split(':')[0]} (freeze) on rank 1" in err, log[-4000:]
    assert p.returncode != 0, log[-4000:]
    assert took < HUNG_TIMEOUT_S + MARGIN_S, f"{took:.0f} s: rank 0 waited past the collective timeout"
    assert re.search(r"[Tt]imed out|[Tt]imeout", log), log[-4000:]
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)", root_cause(log)), log[-4000:]
    st = status(tmp_path)  # the frozen rank wrote nothing: rank 0's timeout is the record
    assert (st["code"], st["rank"]) == (1, 0), st
    assert re.search(r"[Tt]imeout|[Tt]imed out", st["message"]), st


# ---------------------------------------------------------------- FTLAUNCH_FAULT (launcher/rank/faults.py)
def test_fault_spec(monkeypatch):
    monkeypatch.setenv("FTLAUNCH_FAULT", "step@3:raise,ckpt-write@4:enospc")
    faults.fault("step", 2, 0)  # other step: nothing
    faults.fault("ckpt-manifest", 3, 0)  # other point: nothing
    with pytest.raises(RuntimeError, match=r"injected fault step@3 \(raise\) on rank 0"):
        faults.fault("step", 3, 0)
    with pytest.raises(OSError, match="No space left on device"):
        faults.fault("ckpt-write", 4, 1)
    monkeypatch.setenv("FTLAUNCH_FAULT_RANK", "1")
    faults.fault("step", 3, 0)  # limited to rank 1


def test_fault_stop_creates_stop_file(monkeypatch, tmp_path):
    monkeypatch.setenv("FTLAUNCH_FAULT", "step@5:stop")
    faults.fault("step", 5, 0, str(tmp_path))
    assert (tmp_path / "STOP").exists()


# ---------------------------------------------------------------- exit_status.json, first failure wins
def test_the_first_failure_of_a_launch_is_the_recorded_one(tmp_path):
    from launcher.cluster.run_state import write_exit_status
    run_dir = str(tmp_path)

    def record() -> dict:
        return json.loads((tmp_path / "exit_status.json").read_text())

    write_exit_status(run_dir, 1, 0, 5, None, "done")            # only rank 0 reports success
    assert not (tmp_path / "exit_status.json").exists()
    write_exit_status(run_dir, 0, 0, 5, "ck5", "done")
    assert (record()["code"], record()["rank"]) == (0, 0)
    os.utime(tmp_path / "exit_status.json", (1, 1))                     # an earlier launch's
    since = time.time() - 1
    write_exit_status(run_dir, 1, 1, -1, None, "rank 1: ValueError: bad", since=since)
    assert record()["message"] == "rank 1: ValueError: bad"             # replaces the stale one
    write_exit_status(run_dir, 0, 1, -1, None, "rank 0: RuntimeError: Connection closed",
                      since=since)
    assert (record()["rank"], record()["message"]) == (1, "rank 1: ValueError: bad")
    # without a failure from another rank in this launch, rank 0's own error is the record
    os.utime(tmp_path / "exit_status.json", (1, 1))
    write_exit_status(run_dir, 0, 1, -1, None, "rank 0: RuntimeError: timeout", since=since)
    assert (record()["rank"], record()["message"]) == (0, "rank 0: RuntimeError: timeout")


# ---------------------------------------------------------------- docs/faults.md stays current
def test_the_fault_table_cites_only_tests_that_exist():
    """Every `tests/FILE.py::name` in docs/faults.md names a test function in that file."""
    with open(os.path.join(ROOT, "docs", "faults.md"), encoding="utf-8") as fh:
        text = fh.read()
    cited = re.findall(r"tests/(test_\w+\.py)::(\w+)", text)
    assert len(cited) >= 15, "the table lost its rows"
    names: dict[str, set[str]] = {}
    for fname, _ in cited:
        if fname not in names:
            with open(os.path.join(ROOT, "tests", fname), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            names[fname] = {n.name for n in ast.walk(tree)
                            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                            and n.name.startswith("test")}
    missing = [f"tests/{f}::{n}" for f, n in cited if n not in names[f]]
    assert not missing, f"docs/faults.md cites tests that do not exist: {missing}"
