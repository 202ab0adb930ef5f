"""Faults on 2 real DeepSpeed CPU ranks through `ftlaunch run --nproc 2`: a rank SIGKILLed mid
training or raising ends the whole run, bounded in time, non-zero, naming the rank (and the cause
where there is one); SIGTERM to a rank leaves a checkpoint a resume continues from to the end.

Also keeps docs/faults.md honest: every test the table cites must exist.

The elapsed-time bounds are hang detectors (timeout + a wide margin on a loaded machine), not
speed claims.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from launcher import checkpoint as ck
from test_train_engine import ROOT, rank_env

TIMEOUT_S = 20      # train.dist_timeout_s for these runs
MARGIN_S = 90       # startup (imports, ~10 s a rank) + a loaded machine
STEPS = 6


def run_file(tiny: dict, folder, steps: int = STEPS) -> str:
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: faults
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true}}
        train: {{max_steps: {steps}, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 0,
                 checkpoint_every: 2, device: cpu, dist_timeout_s: {TIMEOUT_S}, log_every: 1}}
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
    # torchrun's failure summary names the rank and the signal
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", log), log[-4000:]
    assert re.search(r"exitcode\s*:\s*-9", log) and "SIGKILL" in log, log[-4000:]
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
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", log), log[-4000:]
    assert ck.latest_complete(str(tmp_path / "run" / "checkpoints")) is not None


@pytest.mark.multirank
@pytest.mark.slow
def test_sigterm_to_a_rank_checkpoints_and_resume_finishes(tiny, tmp_path):
    path = run_file(tiny, tmp_path)
    p, _ = ftlaunch_run(path, "step@3:sigterm", "0")
    assert p.returncode == 75, (p.stdout + p.stderr)[-4000:]
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert f"stopped at step 3 (SIGTERM); checkpoint {ckpts}/step-00000003" in p.stdout
    assert ck.latest_complete(ckpts) == os.path.join(ckpts, ck.step_name(3))
    assert ck.problem(os.path.join(ckpts, ck.step_name(3)), hashes=True) is None
    assert status(tmp_path)["code"] == 75 and status(tmp_path)["step"] == 3

    p, _ = ftlaunch_run(path, "", "", "--resume")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert f"resumed from {ckpts}/step-00000003 (step 3)" in p.stderr
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        steps = [r["step"] for r in map(json.loads, fh) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # continued, nothing logged twice
    assert status(tmp_path)["code"] == 0 and status(tmp_path)["step"] == STEPS


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
