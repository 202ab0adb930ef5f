"""What the CUDA path needs that CPU ranks can still show: the optimizer DeepSpeed builds from a GPU
run's JSON (torch's fused AdamW, no compiled op), no host synchronisation per micro batch, fp16
resumes after skipped steps, and flash attention's packed rows with their boundaries given.
(Collectives: tests/test_collectives.py; the ZeRO-3 LoRA export: tests/test_train_lora.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from launcher.dsconfig import build as ds_config
from launcher.rank import lr_schedule
from launcher.config import runfile
from launcher.cluster.dist_env import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(write_run, tiny, *overrides):
    path = write_run(f"""\
        name: gpu
        model: {{path: {tiny['model']}, dtype: bf16}}
        data: {{path: {tiny['text']}, max_seq_len: 32}}
        train: {{max_steps: 4, micro_batch_size: 2, lr: 1.0e-3, weight_decay: 0.1}}
        cluster: {{nodes: 1, gpus_per_node: 1}}
        """)
    return runfile.load(path, list(overrides))


def test_a_gpu_run_gets_torchs_fused_adamw_and_offload_keeps_deepspeeds(write_run, tiny):
    cfg = _cfg(write_run, tiny)
    params = ds_config.build(cfg, 1, device="cuda")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    cpu = ds_config.build(cfg, 1, device="cpu")["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu
    off = _cfg(write_run, tiny, "deepspeed.offload_optimizer=cpu")
    params = ds_config.build(off, 1, device="cuda")["optimizer"]["params"]
    assert "torch_adam" not in params and "fused" not in params  # DeepSpeedCPUAdam on the host


BUILD = r'''
import json, sys, torch, deepspeed
from launcher.rank.train import skip_cpu_shm_op
skip_cpu_shm_op()  # as the ranks do: an op training never uses, built in ~33 s the first time
stage, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
cfg["zero_optimization"] = {"stage": stage}
cfg.pop("scheduler", None)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
x = torch.randn(2, 8, dtype=torch.bfloat16)
loss = engine(x).float().pow(2).mean()
engine.backward(loss)
engine.step()
basic = engine.basic_optimizer
print(json.dumps({"type": f"{type(basic).__module__}.{type(basic).__name__}",
                  "fused": [g.get("fused") for g in basic.param_groups],
                  "steps": [int(s["step"]) for s in basic.state.values() if "step" in s]}))
'''


@pytest.mark.slow
def test_deepspeed_builds_torchs_fused_adamw_from_the_gpu_json(write_run, tiny, stage=2):
    """The GPU JSON's optimizer block, handed to DeepSpeed 0.19 (on CPU ranks, where torch's fused
    AdamW kernel exists too): torch.optim.AdamW with fused=True, and a step taken with it."""
    cfg = ds_config.build(_cfg(write_run, tiny), 1, device="cuda")
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", BUILD, str(stage), json.dumps(cfg)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["type"] == "torch.optim.adamw.AdamW" and set(got["fused"]) == {True}
    assert got["steps"] and min(got["steps"]) >= 1  # (the bf16 optimizer's own first step too)


# ------------------------------------------------------------------ no host sync per micro batch
def test_accumulate_never_reads_a_loss_back_to_the_host(monkeypatch):
    import torch

    from launcher.rank import loop_steps

    class DeviceLoss(torch.Tensor):
        def __float__(self):
            raise AssertionError("float() of a device loss: a host sync per micro batch")

        def item(self):
            raise AssertionError("item() of a device loss: a host sync per micro batch")

        def tolist(self):
            raise AssertionError("tolist() of a device loss: a host sync per micro batch")

    losses = [1.0, 2.0, 4.0]

    class Engine:
        calls: list = []

        def __call__(self, **batch):
            v = torch.tensor(losses[len(self.calls) // 3]).as_subclass(DeviceLoss)
            return SimpleNamespace(loss=v)

        def backward(self, loss):
            self.calls += ["backward", "-", "-"]

        def step(self):
            pass

    batches = iter([{"input_ids": torch.ones(1, 2), "num_tokens": torch.tensor(5)} for _ in range(3)])
    s = SimpleNamespace(engine=Engine(), device="cpu", env=SimpleNamespace(rank=0),
                        cfg=SimpleNamespace(run_dir="/nonexistent", train=SimpleNamespace(
                            objective="sft", sequence_parallel=1, tiled_loss=False,
                            activation_offload=False)))
    p = SimpleNamespace(accum=3, step=0)
    loss_sum, n_tokens = loop_steps.accumulate(s, p, batches)
    assert isinstance(loss_sum, torch.Tensor) and n_tokens == 15.0
    assert torch.Tensor.tolist(loss_sum.as_subclass(torch.Tensor)) == 7.0


# ------------------------------------------------------------------ fp16: skipped steps
def test_an_fp16_resume_puts_the_schedule_where_the_uninterrupted_run_has_it():
    """DeepSpeed steps neither the optimizer nor the scheduler on an overflow step; after 10 steps
    of which 3 overflowed, the uninterrupted run's scheduler stands at epoch 7: the resume too."""
    import torch
    train = SimpleNamespace(lr=1e-3, warmup_steps=4, max_steps=20, min_lr_ratio=0.1,
                            scheduler="cosine")

    def engine(skipped):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
        return SimpleNamespace(optimizer=opt, lr_scheduler=lr_schedule.install(opt, train),
                               skipped_steps=skipped)

    straight = engine(3)
    for _ in range(10 - 3):  # the 7 applied steps
        straight.optimizer.step()
        straight.lr_scheduler.step()
    resumed = engine(3)
    lr = lr_schedule.set_next(resumed, 10, train)
    assert resumed.lr_scheduler.last_epoch == straight.lr_scheduler.last_epoch == 7
    assert lr == pytest.approx(straight.optimizer.param_groups[0]["lr"])
    assert lr == pytest.approx(lr_schedule.lr_at(8, train))
    assert lr_schedule.set_next(engine(0), 10, train) == pytest.approx(lr_schedule.lr_at(11, train))


# ------------------------------------------------------------------ flash attention, packed rows
def test_flash_packed_rows_carry_the_boundaries_transformers_would_derive():
    import torch
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from launcher.data.batching import collate
    rows = [{"input_ids": list(range(1, 8)), "labels": list(range(1, 8)), "doc_lengths": [3, 4]},
            {"input_ids": list(range(1, 6)), "labels": list(range(1, 6)), "doc_lengths": [5]},
            {"input_ids": list(range(1, 7)), "labels": list(range(1, 7)), "doc_lengths": [1, 2, 3]}]
    out = collate(rows, pad_id=0, attention="flash_attention_2")
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(out["position_ids"])
    assert out["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 7, 12, 13, 15, 18]
    assert out["cu_seq_lens_q"].dtype == cu_q.dtype == torch.int32
    assert out["cu_seq_lens_k"] is out["cu_seq_lens_q"]
    assert out["max_length_q"] == out["max_length_k"] == int(max_q) == 5
    assert out["input_ids"].shape == (1, 18) and "attention_mask" not in out
    bad = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "doc_lengths": [2]}]
    with pytest.raises(ValueError, match=r"a packed row of 3 tokens has documents of \[2\] tokens"):
        collate(bad, pad_id=0, attention="flash_attention_2")


def test_to_device_passes_the_max_lengths_through():
    import torch

    from launcher.rank.loop_steps import to_device
    out = to_device({"input_ids": torch.ones(1, 3), "max_length_q": 5}, "cpu")
    assert out["max_length_q"] == 5 and out["input_ids"].device.type == "cpu"
