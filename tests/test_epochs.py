"""train.epochs, warmup_ratio, "every epoch", max_samples, tf32 and the loss watchdog.

The step count of an epoch run is checked three ways: the arithmetic against the ranks' own
sampler iterated by hand, the sequences against the data tokenized by hand (with and without
packing), and real runs on 2 ranks (packed) and 1 rank (not packed) that take exactly that many
steps. A third run has its loss made NaN and is stopped by the watchdog.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from launcher.config import epochs, runfile
from launcher.cluster import layout
from launcher.data import Sampler
from launcher.rank.watchdog import Watchdog
from launcher.config.schema import WatchdogConfig
from test_train_engine import ROOT, rank_env, torchrun


def by_hand(n: int, world: int, micro: int, accum: int, n_epochs: int) -> int:
    """Steps until every rank's sampler has dealt out n_epochs whole epochs, iterated by hand."""
    samplers = [Sampler(n, rank=r, world_size=world, micro_batch_size=micro, seed=3)
                for r in range(world)]
    its = [iter(s) for s in samplers]
    steps = 0
    while True:
        for it in its:
            for _ in range(accum):
                next(it)
        steps += 1
        st = samplers[0].state_dict()
        if st["epoch"] * len(samplers[0]) + st["position"] >= n_epochs * len(samplers[0]):
            return steps


@pytest.mark.parametrize("n, world, micro, accum, n_epochs", [
    (150, 2, 4, 2, 2), (100, 1, 8, 2, 1), (37, 2, 3, 4, 3), (5, 2, 4, 1, 2), (1000, 2, 2, 7, 1)])
def test_epoch_steps_equal_the_sampler_iterated_by_hand(n, world, micro, accum, n_epochs):
    assert epochs.steps_for_epochs(n_epochs, n, world, micro, accum) == \
        by_hand(n, world, micro, accum, n_epochs)


def test_epoch_ends_and_fractional_epochs():
    # 18 micro batches an epoch, 2 a step: epochs end at steps 9, 18, 27
    ends = [s for s in range(1, 28) if epochs.ends_epoch(s, 18, 2)]
    assert ends == [9, 18, 27]
    assert [s for s in range(1, 28) if epochs.due("epoch", s, 18, 2)] == ends
    assert [s for s in range(1, 13) if epochs.due(4, s, 18, 2)] == [4, 8, 12]
    assert not any(epochs.due(0, s, 18, 2) for s in range(1, 20))
    assert epochs.steps_for_epochs(1.5, 100, 1, 8, 2) == 9  # 12 micro batches an epoch
    # 7 micro batches an epoch, 3 a step: the epoch ends inside steps 3 and 5
    assert [s for s in range(1, 8) if epochs.ends_epoch(s, 7, 3)] == [3, 5, 7]


def hand_sequences(tiny: dict, max_seq_len: int, packing: bool, max_samples=None) -> int:
    """Training sequences of tiny['text'], tokenized here with the tokenizer alone."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    with open(tiny["text"]) as fh:
        texts = [json.loads(line)["text"] for line in fh if json.loads(line)["text"].strip()]
    texts = texts[:max_samples] if max_samples else texts
    if not packing:
        return len(texts)
    # neat packing: whole examples (+ EOS, cut to max_seq_len), longest first, each into the
    # row with the most room left that holds it, else a new row (worst-fit decreasing)
    lengths = sorted((min(len(tok(t)["input_ids"]) + 1, max_seq_len) for t in texts), reverse=True)
    rooms: list[int] = []
    for n in lengths:
        best = max(range(len(rooms)), key=lambda r: rooms[r], default=None)
        if best is not None and rooms[best] >= n:
            rooms[best] -= n
        else:
            rooms.append(max_seq_len - n)
    return len(rooms)


def run_yaml(tiny: dict, out, **train) -> str:
    data = train.pop("data")
    extra = ", ".join(f"{k}: {v}" for k, v in train.items())
    return textwrap.dedent(f"""\
        name: epochs
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, {data}}}
        train: {{lr: 3.0e-3, device: cpu, {extra}}}
        freeze: {{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{nodes: 1, gpus_per_node: {train.get('_world', 2)}}}
        output: {{dir: {out}/run, save_final: false}}
        """).replace("_world: 1, ", "").replace(", _world: 1", "")


@pytest.mark.parametrize("packing, max_samples", [(True, None), (False, 100)])
def test_loaded_sequences_equal_the_data_tokenized_by_hand(tiny, tmp_path, packing, max_samples):
    from launcher.rank import inputs
    data = f"max_seq_len: 32, packing: {str(packing).lower()}"
    data += f", max_samples: {max_samples}" if max_samples else ""
    path = tmp_path / "run.yaml"
    path.write_text(run_yaml(tiny, tmp_path, data=data, epochs=2, micro_batch_size=4))
    cfg = runfile.load(str(path))
    splits = inputs.load_data(cfg, inputs.load_tokenizer(cfg))
    assert len(splits.train) == hand_sequences(tiny, 32, packing, max_samples)


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.multirank
@pytest.mark.slow
def test_two_ranks_packed_train_exactly_the_epochs(tiny, tmp_path):
    n = hand_sequences(tiny, 32, packing=True)
    want = by_hand(n, 2, 4, 2, 2)
    path = tmp_path / "run.yaml"
    path.write_text(run_yaml(tiny, tmp_path, data=f"max_seq_len: 32, packing: true, "
                             f"eval_path: {tiny['text']}", epochs=2,
                             micro_batch_size=4, grad_accum=2, warmup_ratio=0.25,
                             eval_every="epoch", checkpoint_every="epoch", keep_checkpoints=5))
    p = torchrun(["-m", "launcher", "train", str(path)])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = metrics(str(tmp_path / "run"))
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, want + 1)), (n, want, p.stderr[-2000:])
    assert f"epochs: 2 x {n} sequences / global batch 16" in p.stderr and f"= {want} steps" in p.stderr
    ends = [s for s in steps if epochs.ends_epoch(s, n // 8, 2)]
    assert len(ends) == 2 and ends[-1] == want
    assert [r["step"] for r in rows if "eval_loss" in r] == ends  # the last one: the final eval
    ckpts = sorted(os.listdir(tmp_path / "run" / layout.CHECKPOINTS))
    assert [int(c.split("-")[1]) for c in ckpts] == ends
    ds = json.loads((tmp_path / "run" / layout.DS_CONFIG).read_text())
    assert ds["scheduler"]["params"]["total_num_steps"] == want
    assert ds["scheduler"]["params"]["warmup_num_steps"] == math.ceil(0.25 * want)


@pytest.mark.multirank
@pytest.mark.slow
def test_one_rank_unpacked_trains_exactly_the_epochs(tiny, tmp_path):
    n = hand_sequences(tiny, 32, packing=False, max_samples=100)
    want = by_hand(n, 1, 8, 2, 1) + 3  # 1.5 epochs: 6 steps an epoch, 9 in all
    path = tmp_path / "run.yaml"
    path.write_text(run_yaml(tiny, tmp_path, data="max_seq_len: 32, max_samples: 100",
                             epochs=1.5, micro_batch_size=8, grad_accum=2, _world=1))
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "launcher", "train", str(path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [r["step"] for r in metrics(str(tmp_path / "run")) if "loss" in r]
    assert n == 100 and want == 9 and steps == list(range(1, want + 1))
    assert "epochs: 1.5 x 100 sequences / global batch 16" in p.stderr and "= 9 steps" in p.stderr


@pytest.mark.multirank
@pytest.mark.slow
def test_the_watchdog_stops_a_nan_loss_with_a_checkpoint_of_the_last_good_step(tiny, tmp_path,
                                                                                 monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text(run_yaml(tiny, tmp_path, data="max_seq_len: 32, packing: true", max_steps=6,
                             micro_batch_size=4, grad_accum=2))
    monkeypatch.setenv("FTLAUNCH_FAULT", "loss@4:nan")
    monkeypatch.setenv("FTLAUNCH_FAULT_RANK", "1")
    p = torchrun(["-m", "launcher", "train", str(path)])
    assert p.returncode != 0
    run = tmp_path / "run"
    st = json.loads((run / layout.EXIT_STATUS).read_text())
    assert st["code"] == layout.EXIT_DIVERGED == 76 and st["step"] == 3, st
    assert st["checkpoint"].endswith("step-00000003") and os.path.isdir(st["checkpoint"])
    assert "the loss of step 4 is nan" in st["message"]
    assert "loss watchdog: the loss of step 4 is nan; stopped at step 3" in p.stderr
    assert "checkpoint of the last good step" in p.stderr
    rows = metrics(str(run))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    from launcher.rank import checkpoint
    assert checkpoint.choose_resume(str(run)) == st["checkpoint"]  # complete and verified


def test_the_watchdog_counts_steps_above_the_threshold():
    dog = Watchdog(WatchdogConfig(max_loss=5.0, patience=3))
    assert [dog.check(s, x) for s, x in enumerate([6.0, 7.0, 4.0, 6.0, 6.5], 1)] == [None] * 5
    why = dog.check(6, 9.0)
    assert why == ("the loss stayed above train.watchdog.max_loss 5 for 3 steps (steps 4-6; "
                   "last 9)")
    assert Watchdog(WatchdogConfig(nan=False)).check(1, float("inf")) is None
    assert Watchdog(WatchdogConfig()).check(2, float("inf")) == "the loss of step 2 is inf"


def test_tf32_sets_torchs_fp32_precision():
    import torch
    from launcher.rank.train import set_tf32
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        set_tf32(False)
        assert (torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_validate_prints_the_estimate_and_ds_config_resolves_the_ratio(tiny, tmp_path, capsys):
    from launcher import cli
    from launcher.dsconfig import build as ds_config
    path = tmp_path / "run.yaml"
    path.write_text(run_yaml(tiny, tmp_path, data=f"max_seq_len: 32, eval_path: {tiny['text']}",
                             epochs=2, micro_batch_size=4, warmup_ratio=0.1, eval_every="epoch"))
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    # 400 rows, 8 sequences a step on 2 ranks: 50 steps an epoch
    assert "2 epochs = about 100 steps (estimated from 400 rows;" in out and "warmup 0.1 x steps = 10" in out
    sched = ds_config.build(runfile.load(str(path)))["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"]) == (100, 10)


@pytest.mark.parametrize("value, ok", [("epoch", True), (5, True), ("'3'", False), ("weekly", False),
                                       ("null", False)])
def test_every_takes_a_count_or_epoch(tmp_path, fake_model, value, ok):
    text = (f"name: t\nmodel: {{path: {fake_model}}}\ndata: {{path: {tmp_path}/train.jsonl, "
            f"max_seq_len: 64, eval_fraction: 0.1}}\ntrain: {{epochs: 1, eval_every: {value}, "
            f"checkpoint_every: {value}}}\n")
    cfg, problems = runfile.parse(text)
    if ok:
        assert problems == [] and cfg.train.eval_every == cfg.train.checkpoint_every == value
    else:
        assert {p.key for p in problems} == {"train.eval_every", "train.checkpoint_every"}
        assert all("expected an integer or one of 'epoch'" in p.message for p in problems), problems
