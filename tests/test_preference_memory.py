"""The plan of a DPO run against 2 CPU ranks (bench/plan_vs_measured.py's rank side): the
reference copy's bytes as planned, and the whole rank's peak within 10% of the plan's
per-GPU figure (kernels warmed below the baseline, as tests/test_memory_engine.py does)."""
from __future__ import annotations

import textwrap

import pytest
from test_memory_engine import BENCH


def test_plan_counts_two_sequences_and_the_reference(tiny, tmp_path):
    """Torch-light: the planned terms move with the objective and the reference kind."""
    from launcher import memory
    from launcher.config import runfile
    base = tmp_path / "base.yaml"
    base.write_text(RUN.format(model=tiny["model"], data=tiny["qa"], out=tmp_path, stage=2,
                               dtype="bf16", objective="sft", reference="model", micro=4))
    sft = memory.plan(runfile.load(str(base)), world_size=2, advise=False, kernels=0)
    plans = {}
    for obj, ref in (("dpo", "model"), ("dpo", "precomputed"), ("simpo", "model")):
        over = [f"train.objective={obj}", f"train.reference={ref}", "data.prompt_field=prompt"]
        plans[(obj, ref)] = memory.plan(runfile.load(str(base), over), world_size=2,
                                        advise=False, kernels=0)
    dpo = plans[("dpo", "model")]
    assert dpo.term("reference") == sft.inv.total * 2 + sft.inv.buffer_bytes  # bf16 copy, whole
    assert plans[("dpo", "precomputed")].term("reference") == 0
    assert plans[("simpo", "model")].term("reference") == 0
    # two rows per pair: the activations of micro batch 4 are those of 8 sequences
    eight = memory.plan(runfile.load(str(base), ["train.micro_batch_size=8"]), world_size=2,
                        advise=False, kernels=0)
    assert plans[("simpo", "model")].term("activations") == eight.term("activations")


RUN = textwrap.dedent("""\
    name: dpo-mem
    model: {{path: {model}, dtype: {dtype}}}
    data: {{path: {data}, max_seq_len: 64}}
    train: {{max_steps: 10, micro_batch_size: {micro}, device: cpu, objective: {objective},
             reference: {reference}}}
    deepspeed: {{zero_stage: {stage}}}
    cluster: {{gpus_per_node: 2}}
    output: {{dir: {out}/runs}}
    """)


@pytest.mark.multirank
@pytest.mark.slow
def test_dpo_peak_within_10_percent_of_plan(tiny, tmp_path):
    from launcher import memory
    from launcher.config import runfile
    bench = BENCH  # bench/plan_vs_measured.py, as tests/test_memory_engine.py loads it
    run = tmp_path / "dpo.yaml"
    run.write_text(RUN.format(model=tiny["model"], data=tiny["qa"], out=tmp_path, stage=2,
                              dtype="bf16", objective="dpo", reference="model", micro=8)
                   .replace("max_seq_len: 64}", "max_seq_len: 128, prompt_field: prompt}"))
    p = memory.plan(runfile.load(str(run)), world_size=2, advise=False, kernels=0)
    ranks = bench.run_ranks([str(run)], str(tmp_path / "dpo.json"), steps=3,
                            extra_env={"PVM_WARM_SHAPES": "1"})[0]
    for r in ranks:
        assert r["reference"] == p.term("reference"), (r["reference"], p.term("reference"))
        assert abs(r["peak"] / p.total_per_gpu - 1) <= 0.10, (r["peak"], p.total_per_gpu, p.terms)


def test_advice_offers_the_reference_without_a_copy(tmp_path):
    """A DPO plan that fits only without the second copy: the advice lists the reference
    changes first (adapters off under LoRA, then precomputed log-probs)."""
    import json

    from launcher import memory
    from launcher.config import runfile
    model = tmp_path / "llama-1b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
        "torch_dtype": "bfloat16"}))
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    run = tmp_path / "run.yaml"
    run.write_text(textwrap.dedent(f"""\
        name: dpo-advice
        model: {{path: {model}, dtype: bf16, gradient_checkpointing: true}}
        data: {{path: {tmp_path}/pairs.jsonl, prompt_field: prompt, max_seq_len: 512}}
        train: {{max_steps: 10, micro_batch_size: 1, objective: dpo}}
        freeze: {{policy: lora}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{gpus_per_node: 8}}
        """))
    cfg = runfile.load(str(run))
    full = memory.plan(cfg, gpu_memory=80 * 2**30, advise=False)
    ref = full.term("reference")
    base = sum(p.numel for p in full.inv.params if p.group != "adapters")
    assert ref == 2 * base + full.inv.buffer_bytes and base > 9 * 10**8  # bf16, 0.94B
    tight = full.total_per_gpu - ref // 2  # fits without the copy, not with it
    p = memory.plan(cfg, gpu_memory=tight)
    assert not p.fits
    changes = [a["change"] for a in p.advice]
    assert changes[:2] == ["train.reference: adapters_off", "train.reference: precomputed"], changes
