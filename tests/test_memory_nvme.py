"""NVMe offload in the plan: the pinned swap buffers against DeepSpeed 0.19's own arithmetic
(its sub-grouping and its OptimizerSwapper, built with a stand-in aio handle on the meta device),
for Llama-2-7B and 70B (tests/configs), and the builder's NVMe branch."""
from __future__ import annotations

import contextlib
import os
import types

import pytest

from launcher.dsconfig import build as ds_config
from launcher import memory
from launcher.memory import nvme
from launcher.memory.inventory import meta_model
from launcher.config.runfile import load

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
deepspeed = pytest.importorskip("deepspeed")  # the test extra installs it


def run_cfg(tmp_path, model, nodes, *overrides, offload="offload_optimizer: nvme", gpus=8):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "nvme").mkdir(exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(f"""\
name: nv
model: {{path: {os.path.join(CONFIGS, model)}, dtype: bf16}}
data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: 512, packing: true}}
train: {{max_steps: 10, micro_batch_size: 1, device: cuda}}
deepspeed: {{zero_stage: 3, {offload}, nvme_path: {tmp_path / 'nvme'}}}
cluster: {{nodes: {nodes}, gpus_per_node: {gpus}}}
""")
    return load(str(path), list(overrides))


@contextlib.contextmanager
def rank0():
    import deepspeed.comm as dist
    saved = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = saved


class MetaAio:
    """Stands in for the aio handle: DeepSpeed's SwapBufferManager asks it for page-locked
    tensors; meta tensors give their sizes without the memory."""

    @staticmethod
    def new_cpu_locked_tensor(numel, example):
        import torch
        return torch.empty(int(numel), dtype=example.dtype, device="meta")


def deepspeed_optimizer_swap_bytes(numels, world, sub_group_size, buffer_count, tmp_path):
    """What DeepSpeed pins: stage3.py `_create_fp16_sub_groups` over the trainable parameters
    (partition_numel = ceil(numel / N)), the largest sub-group's partition elements as
    `largest_numel` (stage3.py `_configure_tensor_swapping`), then OptimizerSwapper.__init__'s
    SwapBufferManager (swap_tensor/optimizer_utils.py, utils.py)."""
    import torch
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    params = [types.SimpleNamespace(partition_numel=(lambda n=n: -(-n // world))) for n in numels]
    groups = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(
        types.SimpleNamespace(sub_group_size=sub_group_size), params)
    largest = max(sum(p.partition_numel() for p in g) for g in groups)
    aio = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1,
           "single_submit": False, "overlap_events": True, "use_gds": False}
    swapper = OptimizerSwapper.__new__(OptimizerSwapper)
    with rank0():
        OptimizerSwapper.__init__(swapper, types.SimpleNamespace(buffer_count=buffer_count), aio,
                                  str(tmp_path / "swap"), None, largest, "cpu", torch.float32,
                                  None, MetaAio())
    return sum(b.numel() * b.element_size() for b in swapper.swap_buffer_manager.all_buffers)


@pytest.mark.parametrize("model, world", [("llama-2-7b", 8), ("llama-2-7b", 64),
                                          ("llama-2-70b", 64), ("llama-2-70b", 128)])
@pytest.mark.parametrize("sub_group_size", [10**9, 10**8])
def test_optimizer_swap_buffers_equal_deepspeeds(tmp_path, model, world, sub_group_size):
    numels = [p.numel() for p in meta_model(os.path.join(CONFIGS, model)).parameters()]
    ours = nvme.pinned([numels], world, 2, {"sub_group_size": sub_group_size}, {}, True, False)
    assert ours["optimizer_swap"] == deepspeed_optimizer_swap_bytes(numels, world, sub_group_size,
                                                                    4, tmp_path)


def test_the_7b_default_sub_group_pins_13_5_gb_per_rank():
    numels = [p.numel() for p in meta_model(os.path.join(CONFIGS, "llama-2-7b")).parameters()]
    per_rank = nvme.pinned([numels], 8, 2, {"sub_group_size": 10**9}, {}, True, False)["optimizer_swap"]
    assert 13.4e9 < per_rank < 13.6e9  # 4 x 842M fp32 elements: the whole partition, 4 times
    smaller = nvme.pinned([numels], 8, 2, {"sub_group_size": 10**8}, {}, True, False)["optimizer_swap"]
    assert smaller < 0.15 * per_rank


def test_parameter_swap_buffers_follow_deepspeeds_formula():
    # partitioned_param_swapper.py _configure_aio: buffers = aligned(buffer_size) x buffer_count
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
    fake = types.SimpleNamespace(numel_alignment=1024 * 2 // 2)  # intra_op 2, bf16
    size = 123_456_789
    aligned = AsyncPartitionedParameterSwapper._io_aligned_numel(fake, size)
    zero = {"offload_param": {"buffer_size": size, "buffer_count": 6, "max_in_cpu": 10**9}}
    got = nvme.pinned([[10**6]], 8, 2, zero, {"intra_op_parallelism": 2}, False, True)
    assert got["param_swap"] == 6 * aligned * 2
    assert got["param_cpu"] == -(-10**6 // 8) * 2 and "param_reuse" not in got


def test_nvme_runs_get_the_nvme_preset_with_aio_and_sized_buffers(tmp_path):
    cfg = run_cfg(tmp_path, "llama-2-70b", 1, offload="offload_optimizer: nvme, offload_param: nvme",
                  gpus=2)
    built = ds_config.build(cfg)
    z = built["zero_optimization"]
    assert ds_config.preset_name(cfg) == "zero3_nvme"
    assert z["sub_group_size"] == 10**8 and built["aio"]["block_size"] == 1048576
    assert z["offload_optimizer"]["device"] == z["offload_param"]["device"] == "nvme"
    # the embedding (32000 x 8192) split over 2 ranks is above DeepSpeed's 1e8 default buffer
    assert z["offload_param"]["buffer_size"] == 32000 * 8192 // 2
    assert ds_config.build(cfg, 8)["zero_optimization"]["offload_param"]["buffer_size"] == 10**8
    assert z["reduce_bucket_size"] == 8192 * 8192  # the HF Trainer's hidden x hidden
    from test_ds_config import deepspeed_parse
    parsed = deepspeed_parse(built, 2)
    assert parsed.zero_config.offload_param.buffer_size == z["offload_param"]["buffer_size"]
    assert parsed.aio_config["queue_depth"] == 32


def test_the_plan_counts_the_pinned_buffers_on_the_node(tmp_path):
    cfg = run_cfg(tmp_path, "llama-2-7b", 1, "deepspeed.overrides.zero_optimization.sub_group_size=1000000000")
    p = memory.plan(cfg, gpu_memory="80GB", advise=False)
    terms = {t.key: t for t in p.node_terms}
    assert 8 * 13.4e9 < terms["nvme_optimizer_swap"].bytes < 8 * 13.6e9
    assert p.node_cpu >= terms["nvme_optimizer_swap"].bytes + terms["nvme_grads"].bytes
    tuned = memory.plan(run_cfg(tmp_path, "llama-2-7b", 1), gpu_memory="80GB", advise=False)
    assert tuned.node_cpu < p.node_cpu - 8 * 11e9  # the preset's 1e8 sub-groups
