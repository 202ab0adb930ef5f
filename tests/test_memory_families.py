"""The plan on real architectures (tests/configs: config.json from the published
hyperparameters, no weights): parameter counts, attention kernels, model states per ZeRO stage
against the ZeRO paper's formulas, node memory and the advice at real sizes."""
from __future__ import annotations

import os

import pytest

from launcher import cli, memory
from launcher.config.runfile import load

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
PUBLISHED = {  # parameters, as published with each model (model cards / safetensors index)
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096, "mixtral-8x7b": 46_702_792_704,
    "qwen2-7b": 7_615_616_512, "gemma-2-9b": 9_241_705_984, "phi-3-mini": 3_821_079_552,
    "gpt2": 124_439_808, "falcon-7b": 6_921_720_704, "opt-1.3b": 1_315_758_080,
    "gpt-neox-20b": 20_554_567_680,
}


def cfg_for(tmp_path, model, *overrides, stage=2, nodes=1, gpus=8, seq=2048, micro=1,
            freeze="{policy: full}", extra=""):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = tmp_path / f"{model}.yaml"
    path.write_text(f"""\
name: fam
model: {{path: {os.path.join(CONFIGS, model)}, dtype: bf16}}
data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: {seq}, packing: true}}
train: {{max_steps: 10, micro_batch_size: {micro}, device: cuda}}
freeze: {freeze}
deepspeed: {{zero_stage: {stage}}}
cluster: {{nodes: {nodes}, gpus_per_node: {gpus}{extra}}}
""")
    return str(path), load(str(path), list(overrides))


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_parameter_counts_equal_the_published_ones(tmp_path, model):
    _, cfg = cfg_for(tmp_path, model, seq=512)
    p = memory.plan(cfg, world_size=8, advise=False)
    assert p.inv.total == PUBLISHED[model]


def test_attention_kernel_is_the_one_transformers_uses(tmp_path, capsys):
    from launcher.checks import attn_kernels as kernels
    assert kernels.resolved("gemma2", None) == "eager"  # no sdpa: softcapping
    assert kernels.resolved("llama", None) == "sdpa"
    _, cfg = cfg_for(tmp_path, "gemma-2-9b")
    p = memory.plan(cfg, world_size=8, advise=False)
    act = next(t for t in p.terms if t.key == "activations")
    assert "eager" in act.formula
    # validate refuses sdpa for Gemma-2, naming the kernels it supports
    run, _ = cfg_for(tmp_path, "llama-2-7b")
    gemma = os.path.join(CONFIGS, "gemma-2-9b")
    assert cli.main(["validate", run, f"model.path={gemma}", "model.attn_implementation=sdpa"]) == 2
    err = capsys.readouterr().err
    assert "model.attn_implementation" in err and "gemma2 models do not support sdpa" in err
    assert "eager, flash_attention_2" in err
    assert cli.main(["validate", run, f"model.path={gemma}", "model.attn_implementation=eager"]) == 2
    err = capsys.readouterr().err  # the folder has no weights (validate says so), but eager is fine
    assert "model.path" in err and "model.attn_implementation" not in err


def test_model_states_match_the_zero_paper_formulas(tmp_path):
    """Rajbhandari et al. (ZeRO), Figure 1: per GPU, mixed precision Adam, N GPUs:
    16P (stage 0), 4P + 12P/N (1), 2P + 14P/N (2), 16P/N (3)."""
    n = 64
    got = {}
    for stage in (0, 1, 2, 3):
        _, cfg = cfg_for(tmp_path, "llama-2-7b", stage=stage, nodes=8)
        p = memory.plan(cfg, world_size=n, advise=False)
        got[stage] = sum(p.term(k) for k in ("weights", "gradients", "masters", "optimizer"))
        P = p.inv.total
    want = {0: 16 * P, 1: 4 * P + 12 * P / n, 2: 2 * P + 14 * P / n, 3: 16 * P / n}
    for stage in want:  # ZeRO-2: DeepSpeed keeps whole every gradient overlapping a rank's
        # slice (here the 131M-element embedding), 1.8% above the paper's 2P/N
        assert abs(got[stage] / want[stage] - 1) < (0.03 if stage == 2 else 0.01), stage
    # stage 1 keeps full gradients: twice stage 2's gradients and more
    assert got[1] - got[2] > 1.9 * P


def test_node_memory_refuses_a_70b_offload_that_needs_more_than_cluster_mem(tmp_path, capsys):
    run, cfg = cfg_for(tmp_path, "llama-2-70b", "deepspeed.offload_optimizer=cpu",
                       "deepspeed.offload_param=cpu", stage=3, nodes=8, extra=", mem: 128G")
    p = memory.plan(cfg, gpu_memory="80GiB", world_size=64, advise=False)
    assert p.fits_gpu and p.node_memory == 128 * 2**30 and p.node_memory_source == "cluster.mem"
    assert p.fits_node is False and not p.fits
    # 8 ranks x (masters + Adam + fp32 grads) of P/64 each: 16 B x P / 8 per node
    offload = sum(t.bytes for t in p.node_terms if t.key == "offload")
    assert abs(offload - 16 * p.inv.total / 8) / offload < 0.01
    flags = ["deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu", "--gpu-memory", "80GiB"]
    assert cli.main(["plan", run, *flags]) == 1
    out = capsys.readouterr().out
    assert "verdict per node: does NOT fit" in out and "128.00 GiB (cluster.mem)" in out
    # with the memory given on the command line it fits
    assert cli.main(["plan", run, *flags, "--node-memory", "2TiB"]) == 0
    assert "--node-memory" in capsys.readouterr().out


def test_unknown_node_memory_is_said_with_the_figure_needed(tmp_path):
    _, cfg = cfg_for(tmp_path, "llama-2-7b")
    p = memory.plan(cfg, gpu_memory="80GiB", world_size=8, advise=False)
    assert p.node_memory is None and p.fits_node is None
    text = memory.render(p)
    assert "node memory unknown: pass --node-memory (or set cluster.mem to the size)" in text
    assert "of CPU memory per node" in text


def test_zero3_loading_is_not_a_full_copy_per_rank(tmp_path):
    _, c2 = cfg_for(tmp_path, "llama-2-7b", stage=2)
    _, c3 = cfg_for(tmp_path, "llama-2-7b", stage=3)
    n2 = memory.plan(c2, world_size=8, advise=False)
    n3 = memory.plan(c3, world_size=8, advise=False)
    P = n2.inv.total
    # the checkpoint (fp16 on disk, bf16 training: converted once per rank at ZeRO-0/1/2)
    conv = sum(t.bytes for t in n2.node_terms if t.key == "load_convert")
    assert conv == 8 * 2 * P
    # ZeRO-3: rank 0 reads the mapped shards, converting module by module: the page cache once,
    # no copy per rank and no private copy on rank 0 (tests/test_memory_node_loading.py)
    assert [t.key for t in n3.node_terms if "load" in t.phase.split()] == ["rank_host", "page_cache"]
    assert sum(t.bytes for t in n3.node_terms if t.key == "page_cache") == 2 * P


def test_advice_keeps_the_full_fine_tune_with_zero3_and_offload(tmp_path):
    _, cfg = cfg_for(tmp_path, "llama-2-70b", stage=0, extra=", mem: 2000G")
    p = memory.plan(cfg, gpu_memory="80GiB", world_size=8)
    assert not p.fits
    changes = [a["change"] for a in p.advice]
    assert any("zero_stage: 3" in c and "offload" in c for c in changes), changes
    assert all(a["rank"] <= b["rank"] for a, b in zip(p.advice, p.advice[1:]))
    assert all("lora" not in c for c in changes[:1]), changes


def test_qlora_65b_class_model_fits_with_paged_8bit_adam_on_48gib(tmp_path):
    _, cfg = cfg_for(tmp_path, "llama-2-70b", "quantization.mode=4bit", stage=2, gpus=1,
                     seq=512, micro=1, freeze="{policy: lora, lora: {r: 64}}")
    p = memory.plan(cfg, gpu_memory="48GiB", world_size=1)
    paged = memory.plan(load_args(cfg, optimizer="paged_adamw_8bit"), gpu_memory="48GiB",
                        world_size=1, advise=False)
    assert paged.total_per_gpu <= p.total_per_gpu
    # the QLoRA paper's setting (4-bit base, LoRA r=64 on every linear layer, paged 8-bit AdamW,
    # gradient checkpointing: "<48GB" for 65B) is advised, on this GPU, keeping the fine-tune
    assert not p.fits_gpu
    advised = {a["change"]: a for a in p.advice}
    pick = advised["train.optimizer: paged_adamw_8bit + model.gradient_checkpointing: true"]
    assert pick["fits"] and pick["total_per_gpu"] <= 48 * 2**30
    assert "paged" in pick["cost"] and "8-bit" in pick["cost"]
    # the same change without the 8-bit state does not fit: the optimizer is what it saves
    import dataclasses
    ckpt = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=True))
    assert not memory.plan(ckpt, gpu_memory="48GiB", world_size=1, advise=False).fits_gpu
    assert memory.plan(load_args(ckpt, "paged_adamw_8bit"), gpu_memory="48GiB", world_size=1,
                       advise=False).fits_gpu


def load_args(cfg, optimizer):
    import dataclasses
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer=optimizer))


def test_an_offloaded_run_that_fits_without_offload_is_told_so(tmp_path):
    _, cfg = cfg_for(tmp_path, "llama-2-7b", "deepspeed.offload_optimizer=cpu", stage=3, seq=1024)
    p = memory.plan(cfg, gpu_memory="80GB")
    assert p.fits and p.advice == []
    said = [n for n in p.notes if "offload" in n]
    assert len(said) == 1 and said[0].startswith("fits without offload too") and "throughput" in said[0]


def test_an_offloaded_run_that_needs_it_is_told_what_it_costs(tmp_path):
    _, cfg = cfg_for(tmp_path, "llama-2-70b", "deepspeed.offload_optimizer=cpu", stage=3, seq=1024,
                     gpus=8, extra=", mem: 2000G")
    p = memory.plan(cfg, gpu_memory="80GB")
    said = [n for n in p.notes if "offload" in n]
    assert p.fits and len(said) == 1 and said[0].startswith("offload is needed"), p.notes
    assert "throughput" in said[0]


def test_multi_node_zero3_is_pointed_at_hpz_and_hpz_is_planned(tmp_path):
    _, cfg = cfg_for(tmp_path, "llama-2-7b", stage=3, nodes=2, seq=1024)
    p = memory.plan(cfg, gpu_memory="80GB")
    hpz = [n for n in p.notes if "zero_hpz_partition_size: 8" in n]
    assert len(hpz) == 1 and "per GPU" in hpz[0]
    _, cfg = cfg_for(tmp_path, "llama-2-7b",
                     "deepspeed.overrides.zero_optimization.zero_hpz_partition_size=8",
                     stage=3, nodes=2, seq=1024)
    with_hpz = memory.plan(cfg, gpu_memory="80GB")
    assert not [n for n in with_hpz.notes if "hpZ" in n]
    extra = with_hpz.term("weights") - p.term("weights")
    assert 0.9 * 6.7e9 * 2 / 8 < extra < 6.8e9 * 2 / 8  # about one more weight copy over 8 GPUs
    _, one = cfg_for(tmp_path, "llama-2-7b", stage=3, nodes=1, seq=1024)
    assert not [n for n in memory.plan(one, gpu_memory="80GB").notes if "hpZ" in n]
