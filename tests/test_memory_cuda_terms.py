"""The plan's CUDA terms: packed rows' masks under sdpa/eager, NCCL communicators, the allocator's
slack and expandable segments, a quantized base loaded whole at ZeRO-3, the reserved figure the
ranks log. Planned on the meta device; what only a GPU shows is listed in docs/gpu-results.md."""
from __future__ import annotations

import dataclasses
import os

import pytest

from launcher.cluster import local_run
from launcher import memory
from launcher.rank import metrics
from launcher.config import runfile
from launcher.memory.traced import cuda_sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")
GIB = 2**30


def load(tmp_path, model: str, *overrides: str, seq: int = 2048, stage: int = 2, gpus: int = 8,
         extra: str = ""):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = tmp_path / "run.yaml"
    sections = {"name": "c", "model": f"{{path: {os.path.join(CONFIGS, model)}, dtype: bf16}}",
                "data": f"{{path: {tmp_path / 'd.jsonl'}, max_seq_len: {seq}, packing: true}}",
                "train": "{max_steps: 10, micro_batch_size: 1, device: cuda}",
                "deepspeed": f"{{zero_stage: {stage}}}",
                "cluster": f"{{nodes: 1, gpus_per_node: {gpus}}}"}
    for line in extra.splitlines():  # extra's sections replace the defaults
        key, _, value = line.partition(": ")
        sections[key] = value
    path.write_text("".join(f"{k}: {v}\n" for k, v in sections.items()))
    return runfile.load(str(path), list(overrides))


def with_flash(cfg):
    """cfg with flash_attention_2 (set after loading: validate refuses it here, where the
    flash_attn package is not installed)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, attn_implementation="flash_attention_2"))


# ------------------------------------------------------------------ packed rows' masks
def test_packed_llama3_8b_at_8k_under_sdpa_counts_the_masks_and_repeated_kv(tmp_path):
    """Llama-3-8B, one packed row of 8,192 tokens: under sdpa transformers gets a (1, 1, s, s)
    boolean mask, so it repeats k/v to all 32 heads (use_gqa_in_sdpa: no GQA with a mask) and
    torch turns the mask into a bf16 bias at every block's call; flash attention packs with
    position ids only. The difference, per block: lp s^2 + 2 lp s (a - kv) d."""
    sdpa = memory.plan(load(tmp_path, "llama-3-8b", seq=8192), advise=False)
    flash = memory.plan(with_flash(load(tmp_path, "llama-3-8b", seq=8192)), advise=False)
    s, lp, L, a, kv, d = 8192, 2, 32, 32, 8, 128
    mask, kv_rep = lp * s * s, 2 * lp * s * (a - kv) * d
    assert "traced on the meta device" in next(t for t in sdpa.terms if t.key == "activations").formula
    assert sdpa.term("activations") - flash.term("activations") == L * (mask + kv_rep)
    assert L * mask == 4 * GIB and L * kv_rep == 3 * GIB
    assert sdpa.term("packed_mask") == s * s and flash.term("packed_mask") == 0
    assert not any(t.key == "packed_mask" for t in flash.terms)
    assert any("packed rows under sdpa/eager carry a (b, 1, s, s) mask" in n for n in sdpa.notes)
    assert not any("packed rows" in n for n in flash.notes)


def test_packed_rows_under_eager_hold_an_additive_mask_in_the_training_dtype(tmp_path):
    p = memory.plan(load(tmp_path, "llama-2-7b", "model.attn_implementation=eager", seq=1024),
                    advise=False)
    term = next(t for t in p.terms if t.key == "packed_mask")
    assert term.bytes == 2 * 1024 * 1024 and term.phase == "fwd bwd"
    assert "launcher/data/batching.py _packed" in term.source


def test_unpacked_rows_have_no_packed_mask_term(tmp_path):
    p = memory.plan(load(tmp_path, "llama-2-7b", "data.packing=false", seq=1024), advise=False)
    assert p.term("packed_mask") == 0


@pytest.mark.parametrize("args, kernel", [
    (("bf16", 128, 128, False, True, (9, 0)), "flash"),      # packed with flash / no mask: GQA in flash
    (("bf16", 128, 128, True, False, (9, 0)), "efficient"),  # any mask: flash refuses it
    (("fp16", 128, 128, True, False, (8, 0)), "efficient"),
    (("fp32", 128, 128, False, True, (8, 0)), "efficient"),  # flash takes no fp32
    (("bf16", 288, 288, False, False, (9, 0)), "efficient"),  # flash: head dim <= 256
    (("bf16", 128, 128, True, False, (7, 0)), "math"),       # V100: no bf16 kernel at all
    (("fp16", 128, 128, False, False, (7, 5)), "efficient"),  # T4: flash needs sm80
    (("fp16", 100, 100, False, False, (9, 0)), "math"),      # head dim not a multiple of 8
])
def test_cuda_sdpa_kernel_follows_torchs_rules(args, kernel):
    assert cuda_sdpa_kernel(*args) == kernel


def test_on_a_v100_the_math_kernel_keeps_the_attention_scores(tmp_path):
    """bf16 with a mask on sm70: neither flash nor memory-efficient: the trace runs torch's math
    path, which keeps the (b, a, s, s) scores (bf16 on V100 is refused by validate; the plan of
    such a config still shows why)."""
    from launcher.memory.traced import trace
    path = os.path.join(CONFIGS, "llama-2-7b")
    fused = trace(path, 1, 512, "fp16", "sdpa", packed=True, sm=(9, 0))
    math = trace(path, 1, 512, "bf16", "sdpa", packed=True, sm=(7, 0))
    assert math.per_block - fused.per_block >= 2 * 32 * 512 * 512  # at least the lp scores


# ------------------------------------------------------------------ runtime overheads
def test_nccl_communicators_follow_deepspeeds_process_groups(tmp_path):
    one = memory.plan(load(tmp_path, "llama-2-7b", gpus=1, seq=512), advise=False)
    two = memory.plan(load(tmp_path, "llama-2-7b", seq=512), advise=False)
    hpz = memory.plan(load(tmp_path, "llama-2-7b", seq=512, stage=3, extra=(
        "deepspeed: {zero_stage: 3, overrides: {zero_optimization: {zero_hpz_partition_size: 8}}}\n")),
        advise=False)
    t1, t2, t3 = (next(t for t in p.terms if t.key == "nccl") for p in (one, two, hpz))
    lo, hi = 512 * 2**20, 1638 * 2**20
    assert (t1.bytes, t1.low) == (0, 0) and "one rank" in t1.formula
    assert (t2.bytes, t2.low) == (2 * hi, 2 * lo) and "_clone_world_group" in t2.source
    assert t3.bytes == 3 * hi and "ZeRO++ hpZ group of 8 ranks" in t3.formula
    assert two.total_low == two.total_per_gpu - 2 * (hi - lo)


def test_explain_names_and_sources_every_cuda_term(tmp_path, capsys):
    from launcher.memory.render import render
    p = memory.plan(load(tmp_path, "llama-2-7b", seq=512), advise=False)
    out = render(p, explain=True)
    for label, source in (("CUDA context and cuBLAS workspaces", "estimate for sm80/sm90"),
                          ("NCCL communicators (2 x 512.0 MiB-1.60 GiB)", "deepspeed 0.19 utils/groups.py"),
                          ("allocator slack", "estimate; docs/gpu-results.md"),
                          ("packed rows' attention mask", "launcher/data/batching.py _packed")):
        at = out.index(label)
        assert source in out[at:out.index("source:", at) + 200], label
    assert "+ allocator slack (max_memory_reserved)" in out


def test_expandable_segments_in_cluster_env_lower_the_slack_and_the_advice_proposes_them(tmp_path):
    plain = memory.plan(load(tmp_path, "llama-2-7b", seq=512), advise=False)
    env = memory.plan(load(tmp_path, "llama-2-7b", seq=512, extra=(
        "cluster: {nodes: 1, gpus_per_node: 8, env: {PYTORCH_CUDA_ALLOC_CONF: "
        "'expandable_segments:True'}}\n")), advise=False)
    assert plain.term("allocator") == int(0.05 * plain.peak_allocated)
    assert env.term("allocator") == int(0.02 * env.peak_allocated)
    assert plain.peak_reserved == plain.peak_allocated + plain.term("allocator")
    assert plain.to_dict()["peak_reserved"] == plain.peak_reserved
    # a card just too small without them: the free change is the first advice, and the note says so
    tight = plain.total_per_gpu - plain.term("allocator") // 10  # (advice keeps a 1% margin)
    p = memory.plan(load(tmp_path, "llama-2-7b", seq=512), gpu_memory=tight)
    assert not p.fits
    assert p.advice[0]["change"] == "cluster.env.PYTORCH_CUDA_ALLOC_CONF: expandable_segments:True"
    assert any("fragmentation margin matters here" in n for n in p.notes)
    assert not any("fragmentation margin" in n for n in env.notes)


def test_the_job_environment_of_ftlaunch_run_carries_cluster_env():
    env = local_run.rank_environ("cuda", 1, dry_run=True,
                                 cluster_env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# ------------------------------------------------------------------ quantized base at ZeRO-3
def test_a_4bit_base_at_zero3_peaks_while_loading_whole_on_every_gpu(tmp_path):
    """transformers skips zero.Init for quantized models and the ranks load with device_map
    {"": their GPU}: each GPU holds the whole 4-bit model until deepspeed.initialize partitions it."""
    lora = "freeze: {policy: lora}\nquantization: {mode: 4bit, storage_dtype: bf16}\n"
    z3 = memory.plan(load(tmp_path, "llama-2-70b", "model.gradient_checkpointing=true", seq=1024,
                          stage=3, extra=lora), advise=False)
    z2 = memory.plan(load(tmp_path, "llama-2-70b", "model.gradient_checkpointing=true", seq=1024,
                          stage=2, extra=lora), advise=False)
    whole = next(t for t in z3.terms if t.key == "load_whole")
    assert whole.bytes == z3.inv.weight_bytes and whole.phase == "load"
    assert z3.term("weights") < whole.bytes / 4  # partitioned over 8 while training
    assert z3.worst_moment == "load"
    assert z3.peak_allocated == whole.bytes + z3.term("load_transient")
    assert z3.peak_allocated > z3.term("weights") + z3.term("activations")
    assert not any(t.phase == "load" for t in z2.terms)  # the whole model is the weights term there
    assert "every rank first loads the whole quantized model" in " ".join(z3.notes)


def test_an_unquantized_zero3_model_loads_partitioned(tmp_path):
    p = memory.plan(load(tmp_path, "llama-2-7b", seq=512, stage=3), advise=False)
    assert not any(t.phase == "load" for t in p.terms) and p.worst_moment != "load"


# ------------------------------------------------------------------ what the ranks log
def test_metrics_log_reserved_beside_allocated_on_gpus(monkeypatch):
    import torch
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: calls.append("a") or 7 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: calls.append("r") or 8 * GIB)
    assert metrics.memory_fields("cuda:0") == {"memory_bytes": 7 * GIB,
                                               "memory_reserved_bytes": 8 * GIB}
    assert calls == ["a", "r"]
    assert set(metrics.memory_fields("cpu")) == {"memory_bytes"}


def test_flash_attention_keeps_no_mask_for_padded_rows_either(tmp_path):
    """Unpacked rows are padded: sdpa gets a (b, 1, s, s) mask (k/v repeated, a bias per block),
    flash attention unpads them (varlen) and keeps neither."""
    cfg = load(tmp_path, "llama-3-8b", "data.packing=false", seq=4096)
    sdpa = memory.plan(cfg, advise=False)
    flash = memory.plan(with_flash(cfg), advise=False)
    s, lp, L, a, kv, d = 4096, 2, 32, 32, 8, 128
    diff = sdpa.term("activations") - flash.term("activations")
    assert abs(diff - L * (lp * s * s + 2 * lp * s * (a - kv) * d)) <= 64  # + a few bytes outside
