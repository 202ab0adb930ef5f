"""Memory plan: meta model, groups, partition arithmetic, advice, output, name rules (fast tier)."""
from __future__ import annotations

import json
import os

import pytest

from launcher import cli, memory
from launcher.memory.terms import adam8_state_bytes, flat_partition, zero3_partition

RUN = """\
name: plan-test
model: {{path: {model}, dtype: {dtype}, gradient_checkpointing: {gc}}}
data: {{path: {data}, max_seq_len: {seq}, packing: true}}
train: {{max_steps: 10, micro_batch_size: {micro}, device: {device}}}
freeze: {freeze}
deepspeed: {{zero_stage: {stage}}}
cluster: {{gpus_per_node: {gpus}}}
"""


def llama_folder(tmp_path, name="m", **kw) -> str:
    """A model folder with config.json only: no weights, no tokenizer."""
    from transformers import LlamaConfig
    args = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    args.update(kw)
    d = tmp_path / name
    LlamaConfig(**args).save_pretrained(d)
    assert sorted(os.listdir(d)) == ["config.json"]
    return str(d)


def run_cfg(tmp_path, model, *overrides, dtype="bf16", gc="false", seq=256, micro=2,
            device="cuda", freeze="{policy: full}", stage=2, gpus=1):
    from launcher.config.runfile import load
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(model=model, data=tmp_path / "d.jsonl", dtype=dtype, gc=gc, seq=seq,
                               micro=micro, device=device, freeze=freeze, stage=stage, gpus=gpus))
    return str(path), load(str(path), list(overrides))


def real_count(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in m.parameters())


def test_plan_from_config_json_only(tmp_path):
    model = llama_folder(tmp_path)
    _, cfg = run_cfg(tmp_path, model)
    p0 = memory.plan(cfg, gpu_memory="80GiB", world_size=1)
    # weight files are never opened: a corrupt one changes nothing
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    memory.clear_meta_cache()
    p = memory.plan(cfg, gpu_memory="80GiB", world_size=1)
    assert p.total_per_gpu == p0.total_per_gpu
    # embed + head 2 x 1000 x 128, 4 blocks of q,o 128x128, k,v 64x128, MLP 3 x 128x344, 2 norms
    per_block = 2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 344 + 2 * 128
    assert p.inv.total == 2 * 1000 * 128 + 4 * per_block + 128 == real_count(model)
    assert p.inv.trainable == p.inv.total and p.inv.frozen == 0
    assert p.term("weights") == 2 * p.inv.total + p.inv.buffer_bytes
    assert p.term("masters") == 4 * p.inv.total  # ZeRO-2 on one rank: the whole slice
    assert p.term("optimizer") == 8 * p.inv.total
    assert p.fits and p.total_per_gpu < p.gpu_memory


def test_groups_and_counts_after_freeze(tmp_path):
    model = llama_folder(tmp_path)
    _, cfg = run_cfg(tmp_path, model, freeze="{policy: last_layers, trainable_layers: 1, "
                     "also_train: [norms, lm_head]}")
    inv = memory.plan(cfg, world_size=1).inv
    groups = {g["group"]: g for g in inv.groups()}
    block = 2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 344
    assert groups["layers"]["trainable"] == block and groups["layers"]["frozen"] == 3 * block
    assert groups["norms"]["trainable"] == 9 * 128 and groups["norms"]["frozen"] == 0
    assert groups["lm_head"]["trainable"] == 1000 * 128
    assert groups["embeddings"]["frozen"] == 1000 * 128 and groups["embeddings"]["trainable"] == 0
    assert inv.trainable == block + 9 * 128 + 1000 * 128
    assert groups["layers"]["frozen_bytes"] == 2 * 3 * block


def test_tied_embeddings_counted_once(tmp_path):
    model = llama_folder(tmp_path, tie_word_embeddings=True)
    _, cfg = run_cfg(tmp_path, model)
    inv = memory.plan(cfg, world_size=1).inv
    assert inv.total == real_count(model)
    assert inv.shape.tied and "lm_head" not in {g["group"] for g in inv.groups()}


def test_flat_partition_matches_deepspeed_rules():
    # 10 + 7 + 5 = 22 elements, aligned to 2 x N = 4 -> 24, slices of 12 each
    size, held = flat_partition([10, 7, 5], 2)
    assert size == 12
    # rank 0 [0,12): params 10 (0..10) and 7 (10..17) overlap -> 17 held; rank 1 [12,24): 7 and 5
    assert held == 17
    assert flat_partition([8], 4) == (2, 8)
    assert flat_partition([], 2) == (0, 0)
    assert zero3_partition(7, 2) == 4 and zero3_partition(8, 2) == 4


def test_partitioning_by_stage(tmp_path):
    model = llama_folder(tmp_path)
    base = {}
    for stage in (0, 1, 2, 3):
        _, cfg = run_cfg(tmp_path, model, stage=stage, gpus=4)
        base[stage] = memory.plan(cfg, world_size=4)
    P = base[0].inv.total
    assert base[0].term("optimizer") == 8 * P and base[0].term("masters") == 4 * P
    assert base[0].term("gradients") == 2 * P
    for stage in (1, 2):
        assert abs(base[stage].term("optimizer") - 8 * P / 4) <= 8 * 8
        assert abs(base[stage].term("masters") - 4 * P / 4) <= 4 * 8
        assert base[stage].term("weights") == base[0].term("weights")
    # ZeRO-3: weights partitioned too; parameters under the persistence threshold (10 x hidden,
    # the HF Trainer's size: the 128-element norms here) also stay whole on every rank
    inv = base[3].inv
    thr = base[3].ds["zero_optimization"]["stage3_param_persistence_threshold"]
    assert thr == 10 * inv.shape.hidden
    small = sum(p.numel for p in inv.params if p.numel <= thr)
    assert small == sum(p.numel for p in inv.params if "norm" in p.name) > 0
    assert base[3].term("weights") == 2 * (sum(zero3_partition(p.numel, 4) for p in inv.params)
                                           + small) + inv.buffer_bytes
    assert base[3].term("gradients") == 2 * sum(zero3_partition(p.numel, 4) for p in base[3].inv.params)


def test_zero3_partitions_large_parameters(tmp_path):
    model = llama_folder(tmp_path, vocab_size=32000, hidden_size=512, intermediate_size=1376,
                         num_attention_heads=8, num_key_value_heads=8)
    _, cfg3 = run_cfg(tmp_path, model, stage=3, gpus=8)
    _, cfg2 = run_cfg(tmp_path, model, stage=2, gpus=8)
    p3, p2 = memory.plan(cfg3, world_size=8), memory.plan(cfg2, world_size=8)
    big = sum(p.numel for p in p3.inv.params if p.numel > 100_000)
    small = sum(p.numel for p in p3.inv.params if p.numel <= 100_000)
    expect = 2 * (sum(zero3_partition(p.numel, 8) for p in p3.inv.params) + small) + p3.inv.buffer_bytes
    assert p3.term("weights") == expect
    assert p3.term("weights") < p2.term("weights") / 4
    assert big > 10 * small


def test_adam8_bytes_formula():
    assert adam8_state_bytes([100]) == 800            # under 4096: two fp32 moments
    assert adam8_state_bytes([4096]) == 2 * 4096 + 8 * 16
    assert adam8_state_bytes([4097]) == 2 * 4097 + 8 * 17


def test_cpu_plan_counts_only_written_bucket_pages(tmp_path):
    model = llama_folder(tmp_path)
    _, gpu = run_cfg(tmp_path, model, gpus=2)
    _, cpu = run_cfg(tmp_path, model, device="cpu", gpus=2)
    pg, pc = memory.plan(gpu, world_size=2), memory.plan(cpu, world_size=2)
    assert pg.term("buckets") == 2 * 500_000_000 * 2  # zero2 preset: overlap_comm, 2 buffers
    assert pc.term("buckets") == 2 * pc.inv.trainable  # pages written: the gradients once
    assert pc.device == "cpu" and pg.device == "cuda"


def test_checkpointing_and_micro_batch_shrink_activations(tmp_path):
    model = llama_folder(tmp_path)
    _, a = run_cfg(tmp_path, model, micro=8, seq=1024)
    _, b = run_cfg(tmp_path, model, micro=8, seq=1024, gc="true")
    _, c = run_cfg(tmp_path, model, micro=4, seq=1024)
    pa, pb, pc = (memory.plan(x, world_size=1) for x in (a, b, c))
    assert pb.term("activations") < pa.term("activations") / 3
    assert pc.term("activations") == pytest.approx(pa.term("activations") / 2, rel=0.01)


def test_advice_ranked_by_cost_and_each_fits(tmp_path):
    model = llama_folder(tmp_path, vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=8)
    _, cfg = run_cfg(tmp_path, model, stage=0, micro=8, seq=2048, gpus=8)
    p = memory.plan(cfg, gpu_memory="12GiB", world_size=8)
    assert not p.fits
    changes = [a["change"] for a in p.advice]
    assert changes, memory.render(p)
    ranks = [a["rank"] for a in p.advice]
    assert ranks == sorted(ranks)  # cheapest first
    for a in p.advice:
        assert a["fits"] and a["total_per_gpu"] <= p.gpu_memory
    text = memory.render(p)
    assert "does NOT fit" in text and changes[0] in text


def test_advice_leaves_a_margin_not_a_few_megabytes(tmp_path):
    """A change that would fit with 20 MB to spare is not advised: advice keeps 1% of the GPU."""
    import dataclasses
    model = llama_folder(tmp_path, vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=8)
    _, cfg = run_cfg(tmp_path, model, stage=0, micro=8, seq=2048, gpus=8)
    gc = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=True))
    with_gc = memory.plan(gc, gpu_memory=2**40, world_size=8).total_per_gpu
    tight = memory.plan(cfg, gpu_memory=with_gc + 20 * 2**20, world_size=8)
    assert not tight.fits
    assert "model.gradient_checkpointing: true" not in [a["change"] for a in tight.advice]
    assert all(a["total_per_gpu"] <= 0.99 * tight.gpu_memory for a in tight.advice)
    roomy = memory.plan(cfg, gpu_memory=int(with_gc / 0.98), world_size=8)
    assert not roomy.fits and "model.gradient_checkpointing: true" in [a["change"] for a in roomy.advice]


def test_json_output_and_exit_codes(tmp_path, capsys):
    model = llama_folder(tmp_path)
    run, _ = run_cfg(tmp_path, model)
    assert cli.main(["plan", run, "--json", "--gpu-memory", "40GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["gpu_memory"] == 40 * 2**30
    assert out["gpu_memory_source"] == "--gpu-memory"
    keys = {t["key"] for t in out["per_gpu"]}
    assert {"weights", "gradients", "masters", "optimizer", "activations"} <= keys
    assert out["parameters"]["total"] == real_count(model)
    assert sum(t["bytes"] for t in out["per_gpu"]) >= out["total_per_gpu"] - 1
    assert cli.main(["plan", run, "--gpu-memory", "1MiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_explain_shows_every_formula(tmp_path, capsys):
    model = llama_folder(tmp_path)
    run, _ = run_cfg(tmp_path, model)
    assert cli.main(["plan", run, "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.count("source:") >= 8
    assert "Korthikanti" in out or "saved tensors enumerated" in out or "traced on the meta device" in out
    assert "default (no --gpu-memory" in out  # the 80 GiB default is said, not silent


def test_gpu_memory_from_cluster_section(tmp_path):
    model = llama_folder(tmp_path)
    _, cfg = run_cfg(tmp_path, model, "cluster.gpu_memory=24GiB")
    p = memory.plan(cfg, world_size=1)
    assert p.gpu_memory == 24 * 2**30 and p.gpu_memory_source == "cluster.gpu_memory"


def test_cluster_gpu_memory_and_the_flag_read_sizes_alike(tmp_path, capsys):
    model = llama_folder(tmp_path)
    _, cfg = run_cfg(tmp_path, model, "cluster.gpu_memory=40G")  # once refused by the loader
    from_file = memory.plan(cfg, world_size=1, advise=False)
    run, plain = run_cfg(tmp_path, model)
    from_flag = memory.plan(plain, gpu_memory="40G", world_size=1, advise=False)
    assert from_file.gpu_memory == from_flag.gpu_memory == 40 * 2**30
    assert cli.main(["plan", run, "--json", "--gpu-memory", "80"]) == 0  # GiB, not 80 bytes
    assert json.loads(capsys.readouterr().out)["gpu_memory"] == 80 * 2**30


def test_bad_gpu_memory_flag_names_the_flag_and_the_fix(tmp_path, capsys):
    run, _ = run_cfg(tmp_path, llama_folder(tmp_path))
    assert cli.main(["plan", run, "--gpu-memory", "0"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory: a memory size must be more than 0 bytes, got '0'" in err
    assert "fix: write a size such as 80GiB" in err


def test_freeze_pattern_matching_nothing_is_config_error(tmp_path, capsys):
    model = llama_folder(tmp_path)
    run, _ = run_cfg(tmp_path, model, freeze="{policy: patterns, train: ['layers\\.9\\.']}")
    assert cli.main(["plan", run]) == 2
    err = capsys.readouterr().err
    assert "freeze.train[0]" in err and "matches no parameter" in err


def test_lora_target_matching_nothing_is_config_error(tmp_path, capsys):
    model = llama_folder(tmp_path)
    run, _ = run_cfg(tmp_path, model, freeze="{policy: lora, lora: {target_modules: [qkv_proj]}}")
    assert cli.main(["plan", run]) == 2
    assert "freeze.lora.target_modules[0]" in capsys.readouterr().err


def test_lora_counts_adapters_and_copies(tmp_path):
    from launcher.model import lora
    model = llama_folder(tmp_path)
    _, cfg = run_cfg(tmp_path, model, freeze="{policy: lora, also_train: [lm_head], "
                     "lora: {r: 4, target_modules: [q_proj, v_proj]}}")
    p = memory.plan(cfg, world_size=1)
    adapters = sum(x.numel for x in p.inv.params if x.group == "adapters")
    assert adapters == lora.adapter_param_count(memory.meta_model_for(cfg), cfg.freeze.lora)
    assert adapters == 4 * 4 * ((128 + 128) + (128 + 64))
    copies = [x for x in p.inv.params if x.group == "copies"]
    assert [c.numel for c in copies] == [1000 * 128] and all(c.trainable for c in copies)
    assert p.inv.trainable == adapters + 1000 * 128


def test_plan_text_is_what_run_and_slurm_print(tmp_path):
    model = llama_folder(tmp_path)
    _, cfg = run_cfg(tmp_path, model)
    text = memory.plan_text(cfg)
    assert text.startswith("model llama: 4 blocks") and "verdict: fits" in text


def test_cpu_kernels_are_a_stated_range_unless_measured(tmp_path):
    """The processor-dependent kernels term: a range counted at its upper end where it is not
    measured, the measured figure where it is; the other CPU overhead is the stage's constant."""
    from launcher.memory.probe import BOOKKEEPING, KERNELS_RANGE
    model = llama_folder(tmp_path)
    _, cpu = run_cfg(tmp_path, model, device="cpu", gpus=2)
    p = memory.plan(cpu, world_size=2)
    lo, hi = KERNELS_RANGE["bf16"]
    (k,) = [t for t in p.terms if t.key == "kernels"]
    assert (k.low, k.bytes) == (lo, hi) and "not measured" in k.label
    assert p.total_per_gpu - p.total_low == hi - lo
    assert p.term("runtime") == BOOKKEEPING[2]
    text = memory.render(p, explain=True)
    assert "range: a term is not measured" in text and "plan --probe" in text
    m = memory.plan(cpu, world_size=2, kernels=3 * 2**20)
    assert m.term("kernels") == 3 * 2**20 and m.total_low == m.total_per_gpu
    assert m.total_per_gpu == p.total_per_gpu - hi + 3 * 2**20
    assert "measured here" in memory.render(m)
    assert "total_per_gpu_low" in m.to_dict()
    _, gpu = run_cfg(tmp_path, model, gpus=2)
    assert memory.plan(gpu, world_size=2).term("kernels") == 0  # GPUs: CUDA context instead


def test_plan_probe_measures_kernels_here_and_caches_them(tmp_path, capsys, monkeypatch):
    from launcher.memory import probe as runtime_probe
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    model = llama_folder(tmp_path, num_hidden_layers=2)
    run, cfg = run_cfg(tmp_path, model, device="cpu", gpus=2, seq=64)
    assert cli.main(["plan", run, "--probe", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    (k,) = [t for t in measured["per_gpu"] if t["key"] == "kernels"]
    assert "low" not in k and k["bytes"] > 0 and "measured here" in k["label"]
    cached = json.loads((tmp_path / "cache" / "runtime-probe.json").read_text())
    assert list(cached.values()) == [k["bytes"]]
    monkeypatch.setattr(runtime_probe.subprocess, "run", None)  # a second plan runs no probe
    assert runtime_probe.measure(cfg) == k["bytes"]


def _imported(tree) -> set[str]:
    """Modules an AST imports, at any level; `from a import b` counts a and a.b."""
    import ast
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_planner_modules_import_each_other_without_cycles():
    """Every import between launcher/memory/ modules, function-level ones included, goes one way."""
    import ast
    import glob
    graph: dict[str, set[str]] = {}
    for path in glob.glob(os.path.join(os.path.dirname(memory.__file__), "*.py")):
        name = ("launcher.memory." + os.path.basename(path)[:-3]).removesuffix(".__init__")
        graph[name] = _imported(ast.parse(open(path, encoding="utf-8").read()))
    assert {"launcher.memory", "launcher.memory.planner", "launcher.memory.advice"} <= set(graph)
    done: set[str] = set()
    while len(done) < len(graph):  # peel off the modules whose imports are all peeled off
        ready = {m for m, deps in graph.items() if m not in done and deps & set(graph) <= done}
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        done |= ready


def _cell_ends(line: str) -> list[int]:
    """Where each cell of a table line ends (cells are two or more spaces apart)."""
    import re
    return [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)]


def test_tables_keep_twelve_digit_counts_apart(tmp_path):
    # 14 blocks of Llama-70B's shape (meta device, nothing allocated): 2 trained beside 12 frozen
    model = llama_folder(tmp_path, vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=14, num_attention_heads=64, num_key_value_heads=8)
    _, cfg = run_cfg(tmp_path, model, freeze="{policy: last_layers, trainable_layers: 2}")
    lines = memory.render(memory.plan(cfg, world_size=8, advise=False)).splitlines()
    head = next(x for x in lines if x.split()[:2] == ["group", "trainable"])
    row = next(x for x in lines if x.split()[:1] == ["layers"])
    assert row.split()[:4] == ["layers", "1,711,276,032", "10,267,656,192", "0"]
    assert "1,711,276,032  10,267,656,192" in row  # two spaces at least between columns
    assert _cell_ends(row)[1:] == _cell_ends(head)[1:]  # numbers right-aligned under headers
    per_gpu = lines.index(next(x for x in lines if x.startswith("per GPU")))
    node = next(i for i, x in enumerate(lines) if x.startswith("per node (CPU memory"))
    terms = lines[per_gpu + 2:node]  # below the header
    assert len({_cell_ends(x)[1] for x in terms}) == 1  # one bytes column for every term
