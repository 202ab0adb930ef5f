"""Stop, crash, full disk and resume on 2 real DeepSpeed CPU ranks: the losses of an interrupted
run equal those of an uninterrupted one (fp32, same seed), and no fault loses a good checkpoint.

One run directory goes through, in order:
  1. SIGUSR1 to rank 1 after step 3        -> the ranks agree, checkpoint step 3, exit 75
  2. resume; disk full (ENOSPC) on rank 1 while writing step 4 -> error naming rank 1 and the
     cause; step 3 untouched
  3. resume from 3; rank 0 SIGKILLed in the middle of writing step 6 (after step 4 completed)
     -> step 4 is the newest complete checkpoint, step 6 only a temporary folder
  4. resume from 4 to the end
and its metrics.jsonl must equal an uninterrupted run's, step for step.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from launcher.rank import checkpoint as ck
from test_train_engine import torchrun

STEPS = 8


def write_run(tiny: dict, folder) -> str:
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: resume
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true}}
        train: {{max_steps: {STEPS}, micro_batch_size: 4, grad_accum: 2, lr: 3.0e-3,
                 warmup_steps: 2, checkpoint_every: 2, keep_checkpoints: 2, device: cpu}}
        freeze: {{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{nodes: 1, gpus_per_node: 2}}
        output: {{dir: {folder}/run, save_final: false}}
        """))
    return str(path)


def train(run_file: str, monkeypatch, fault: str = "", rank: str = ""):
    monkeypatch.setenv("FTLAUNCH_FAULT", fault)
    monkeypatch.setenv("FTLAUNCH_FAULT_RANK", rank)
    return torchrun(["-m", "launcher", "train", run_file])


def losses(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [(r["step"], r["loss"]) for r in map(json.loads, fh) if "loss" in r]


def status(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "exit_status.json")) as fh:
        return json.load(fh)


@pytest.mark.multirank
@pytest.mark.slow
def test_interrupted_run_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_file, run_file = write_run(tiny, tmp_path / "a"), write_run(tiny, tmp_path / "b")
    ref = train(ref_file, monkeypatch)
    assert ref.returncode == 0, ref.stderr[-4000:]
    expected = losses(str(tmp_path / "a" / "run"))
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))

    run_dir = str(tmp_path / "b" / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    # 1. a signal to one rank: both stop at the same step boundary, after a checkpoint
    p = train(run_file, monkeypatch, "step@3:sigusr1", "1")
    assert p.returncode != 0
    assert status(run_dir)["code"] == 75 and status(run_dir)["step"] == 3
    assert (f"stopped at step 3 (a signal to another rank); checkpoint {ckpts}/step-00000003; "
            "resume with: ftlaunch run") in p.stdout
    assert [s for s, _ in ck.complete(ckpts)] == [2, 3]

    # 2. full disk on rank 1 while writing step 4: the error names it, step 3 stays good
    p = train(run_file, monkeypatch, "ckpt-write@4:enospc", "1")
    assert p.returncode != 0 and status(run_dir)["code"] == 1
    assert "rank 1: OSError: [Errno 28] No space left on device" in p.stderr
    assert f"the previous checkpoint {ckpts}/step-00000003 is untouched" in p.stderr
    assert ck.problem(os.path.join(ckpts, "step-00000003"), hashes=True) is None
    assert ck.latest_complete(ckpts) == os.path.join(ckpts, "step-00000003")

    # 3. rank 0 killed in the middle of writing step 6 (DeepSpeed's files written, no manifest)
    p = train(run_file, monkeypatch, "ckpt-manifest@6:kill", "0")
    assert p.returncode != 0
    assert "resumed from" in p.stderr and "step-00000003" in p.stderr
    assert ck.latest_complete(ckpts) == os.path.join(ckpts, "step-00000004")
    assert os.path.isdir(os.path.join(ckpts, ".tmp-step-00000006"))
    assert ck.problem(os.path.join(ckpts, "step-00000004"), hashes=True) is None

    # 4. resume from step 4 to the end: the same losses as without any interruption
    p = train(run_file, monkeypatch)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"resumed from {ckpts}/step-00000004 (step 4)" in p.stderr
    got = losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # no step logged twice
    for (s, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), f"step {s}: {a} != {b}"
    assert [s for s, _ in ck.complete(ckpts)] == [6, 8]  # keep_checkpoints: 2
    assert not [n for n in os.listdir(ckpts) if n.startswith(".")]  # leftovers removed
    assert status(run_dir)["code"] == 0
