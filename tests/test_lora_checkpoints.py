"""LoRA checkpoints hold what trains, not the frozen base (`exclude_frozen_parameters`): on a 4-bit
base under ZeRO-2 on 2 CPU ranks, a run stopped at step 3 and resumed over the base loaded from
model.path gives the losses of an uninterrupted run, and its checkpoint has no base weight."""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from ranks import torchrun

STEPS = 6


def write_run(tiny: dict, folder) -> str:
    folder.mkdir()
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: lora-ckpt
        model: {{path: {tiny['model']}, dtype: bf16}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true}}
        train: {{max_steps: {STEPS}, micro_batch_size: 4, lr: 1.0e-2, warmup_steps: 0,
                 scheduler: cosine, device: cpu, checkpoint_every: 100}}
        quantization: {{mode: 4bit}}
        freeze: {{policy: lora, lora: {{r: 4, dropout: 0.0}}}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{nodes: 1, gpus_per_node: 2}}
        output: {{dir: {folder}/run, save_final: false}}
        """))
    return str(path)


def losses(run_dir) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [(r["step"], r["loss"]) for r in map(json.loads, fh) if "loss" in r]


@pytest.mark.multirank
@pytest.mark.slow
def test_a_lora_checkpoint_without_the_base_resumes_exactly(tiny, tmp_path, monkeypatch):
    import torch
    ref = torchrun(["-m", "launcher", "train", write_run(tiny, tmp_path / "a")])
    assert ref.returncode == 0, ref.stderr[-4000:]
    run_file = write_run(tiny, tmp_path / "b")
    monkeypatch.setenv("FTLAUNCH_FAULT", "step@3:sigusr1")
    monkeypatch.setenv("FTLAUNCH_FAULT_RANK", "1")
    p = torchrun(["-m", "launcher", "train", run_file])
    assert "stopped at step 3" in p.stdout, p.stderr[-4000:]
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step-00000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["frozen_excluded"] is True
    module = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    # no frozen parameter: only the adapters, and bitsandbytes' per-block quantization constants
    # of the frozen 4-bit weights (state, not parameters: a few bytes per 64 weights)
    base = [k for k in module if "lora_" not in k]
    assert [k for k in module if "lora_" in k] and all(".base_layer.weight." in k for k in base), base[:8]
    packed = sum(v.numel() * v.element_size() for k, v in module.items()
                 if k in base and isinstance(v, torch.Tensor))
    assert packed < 0.1 * os.path.getsize(os.path.join(tiny["model"], "model.safetensors"))
    monkeypatch.setenv("FTLAUNCH_FAULT", "")
    p = torchrun(["-m", "launcher", "train", run_file])
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from" in p.stderr and "(step 3)" in p.stderr
    got, expected = losses(tmp_path / "b" / "run"), losses(tmp_path / "a" / "run")
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    for (s, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5), f"step {s}: {a} != {b}"
