"""Long sequences (docs/long-sequences.md): train.sequence_parallel, tiled_loss, tiled_mlp,
activation_offload. The tiled loss and MLP against the untiled ones (1e-6), the slices and masks
of sequence parallelism, validate's refusals, the data-parallel size in the batch arithmetic, the
memory plan's terms and --max-seq-len; on 2 gloo ranks: sequence_parallel 2 against the plain
forward (sdpa, eager, packed rows; 1e-5) and a sequence-parallel run, resumed, against one rank.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from launcher.checks import validate
from launcher.config import batch, runfile
from launcher.config.errors import ConfigError
from launcher.dsconfig import build as ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "configs")


def run_file(tmp_path, model: str, train: str = "", seq: int = 4096, gpus: int = 2,
             zero: int = 2, extra: str = "") -> str:
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: ls
        model: {{path: {model}, dtype: bf16, gradient_checkpointing: true}}
        data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: {seq}, packing: false}}
        train: {{max_steps: 10, micro_batch_size: 1, device: cuda{train}}}
        freeze: {{policy: lora}}
        deepspeed: {{zero_stage: {zero}}}
        cluster: {{nodes: 1, gpus_per_node: {gpus}, gpu_memory: 80GiB}}
        """) + extra)
    return str(path)


def problems(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        runfile.load(path, [])
    return info.value.render()


# ------------------------------------------------------------------ tiled loss and MLP
def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).float()


def test_tiled_loss_equals_the_untiled_loss_and_gradients():
    import torch

    from launcher.rank import longseq
    torch.manual_seed(1)
    head = torch.nn.Linear(32, 96, bias=False)
    h = torch.randn(2, 23, 32, requires_grad=True)  # 46 tokens: chunks of unequal size
    y = torch.randint(0, 96, (2, 23))
    y[0, :5] = longseq.IGNORE
    grads = {}
    for tiled in (False, True):
        head.zero_grad()
        h.grad = None
        loss = longseq.head_loss(head, h, y, torch.tensor(37.0), tiled, chunks=5) * 3.0
        loss.backward()  # an outer scale (DeepSpeed's 1/grad_accum) must reach lm_head too
        grads[tiled] = (loss.detach(), h.grad.clone(), head.weight.grad.clone())
    for a, b in zip(grads[False], grads[True]):
        assert float((a - b).abs().max()) < 1e-6
    assert float(grads[True][0]) > 0


def test_tiled_mlp_equals_the_untiled_mlp():
    import torch

    from launcher.rank import longseq
    plain, tiled = tiny_llama(), tiny_llama()
    assert longseq.install_tiled_mlp(tiled, shards=3) == 2  # one per decoder layer
    ids = torch.randint(0, 96, (2, 20))
    out = {}
    for name, m in (("plain", plain), ("tiled", tiled)):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    assert abs(float(out["plain"][0] - out["tiled"][0])) < 1e-6
    worst = max(float((out["plain"][1][n] - g).abs().max()) for n, g in out["tiled"][1].items())
    assert worst < 1e-6


def test_sp_collate_slices_tokens_positions_and_shifted_labels():
    from launcher.rank import longseq
    rows = [{"input_ids": list(range(10, 17)), "labels": list(range(10, 17)),
             "doc_lengths": [3, 4]}]
    parts = [longseq.sp_collate(rows, 0, size=2, rank=r) for r in (0, 1)]
    ids = parts[0]["input_ids"][0].tolist() + parts[1]["input_ids"][0].tolist()
    assert ids == [10, 11, 12, 13, 14, 15, 16, 0]  # padded to a multiple of 2
    pos = parts[0]["position_ids"][0].tolist() + parts[1]["position_ids"][0].tolist()
    assert pos == [0, 1, 2, 0, 1, 2, 3, 0]  # per document; the padding starts its own
    lab = parts[0]["shift_labels"][0].tolist() + parts[1]["shift_labels"][0].tolist()
    assert lab == [11, 12, 13, 14, 15, 16, -100, -100]
    assert int(parts[0]["num_tokens"]) + int(parts[1]["num_tokens"]) == 7


def test_doc_mask_is_causal_within_documents():
    import torch

    from launcher.rank import longseq
    m = longseq.doc_mask(torch.tensor([[0, 1, 0, 1, 2]]))[0, 0]
    assert m.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                          [False, False, True, False, False], [False, False, True, True, False],
                          [False, False, True, True, True]]


# ------------------------------------------------------------------ validate, batch arithmetic
def test_validate_refuses_what_sequence_parallelism_cannot_split(tmp_path):
    llama = os.path.join(CONFIGS, "llama-3-8b")  # 32 heads, 8 KV heads
    text = problems(run_file(tmp_path, llama, ", sequence_parallel: 3", gpus=6))
    assert "train.sequence_parallel" in text and "32 attention heads do not divide by 3" in text
    assert "use one of [2, 4, 8, 16, 32]" in text
    assert "data.max_seq_len" in text and "4096 is not divisible by train.sequence_parallel = 3" in text
    text = problems(run_file(tmp_path, llama, ", sequence_parallel: 4", gpus=6))
    assert "4 does not divide the world size 6" in text and "use one of [2, 3, 6]" in text
    mistral = os.path.join(CONFIGS, "mistral-7b")
    with open(os.path.join(mistral, "config.json")) as fh:
        window = json.load(fh).get("sliding_window")
    if isinstance(window, int):
        text = problems(run_file(tmp_path, mistral, ", sequence_parallel: 2",
                                 seq=window * 2))
        assert f"sliding window of {window} tokens" in text


def test_validate_refuses_remote_code_tiled_mlp_at_zero3_and_offload_on_cpu(tmp_path):
    llama = os.path.join(CONFIGS, "llama-3-8b")
    path = run_file(tmp_path, llama, ", sequence_parallel: 2, tiled_mlp: true", zero=3)
    text = problems(path)
    assert "train.tiled_mlp" in text and "use deepspeed.zero_stage 2" in text
    remote = run_file(tmp_path, llama, ", sequence_parallel: 2")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        runfile.load(remote, ["model.trust_remote_code=true"])
    with pytest.raises(ConfigError, match="CPU ranks keep activations in host memory"):
        runfile.load(run_file(tmp_path, llama, ", activation_offload: true"), ["train.device=cpu"])


def test_data_parallel_size_is_world_over_n(tmp_path):
    llama = os.path.join(CONFIGS, "llama-3-8b")
    cfg = runfile.load(run_file(tmp_path, llama, ", sequence_parallel: 4, global_batch_size: 8",
                                gpus=8), [])
    assert batch.dp_size(cfg) == 2
    assert batch.batch_sizes(cfg) == (1, 4, 8)  # 1 x 4 accumulation x 2 data-parallel ranks
    ds = ds_config.build(cfg)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["sequence_parallel_size"] == 4
    text = problems(run_file(tmp_path, llama, ", sequence_parallel: 4, global_batch_size: 3",
                             gpus=8))
    assert "train.global_batch_size" in text and "(nodes x gpus_per_node) / sequence_parallel" in text
    assert validate.check(cfg) == []


# ------------------------------------------------------------------ the memory plan
def test_plan_models_each_switch(tmp_path):
    from launcher import memory
    llama = os.path.join(CONFIGS, "llama-3.1-8b")
    path = run_file(tmp_path, llama, ", tiled_loss: true", seq=65536)
    base = runfile.load(path, [])
    plans = {}
    for name, over in (("loss", []), ("sp", ["train.sequence_parallel=2"]),
                       ("mlp", ["train.tiled_mlp=true"]),
                       ("offload", ["train.activation_offload=true"])):
        plans[name] = memory.plan(runfile.load(path, over), advise=False)
    act = {k: p.term("activations") for k, p in plans.items()}
    # the tiled loss keeps no log-probabilities: fewer activations than its 4 b s V
    assert act["sp"] < act["loss"] and plans["sp"].term("sp_all_to_all") > 0
    assert act["loss"] < 4 * 65536 * 128256  # no fp32 log-probabilities of every token kept
    # the tiled MLP shrinks the block recomputed in the backward (its intermediates: one chunk)
    assert plans["mlp"].term("loss_backward") < plans["loss"].term("loss_backward")
    assert "tiled_mlp: - 4 lp b s_l i per block" in next(
        t.formula for t in plans["mlp"].terms if t.key == "activations")
    assert act["offload"] < act["loss"] / 10 and plans["offload"].term("offload_staging") > 0
    offloaded = [t for t in plans["offload"].node_terms if t.key == "activation_offload"]
    assert offloaded and offloaded[0].bytes > act["loss"] / 2
    assert base.train.tiled_loss


def test_plan_max_seq_len_grows_with_every_switch(tmp_path, capsys):
    from launcher.cli import main
    llama = os.path.join(CONFIGS, "llama-3.1-8b")
    path = run_file(tmp_path, llama, ", tiled_loss: true", gpus=8, seq=32768)
    main(["plan", path, "--max-seq-len"])
    out = capsys.readouterr().out
    table = out[out.index("longest sequence that fits per GPU"):]
    rows = {m.group(1): int(m.group(2).replace(",", "")) for m in
            re.finditer(r"^  (\S.*?)\s{2,}([\d,]+)(?:  \(.*\))?$", table, re.M)}
    assert rows["as configured"] > 0
    assert rows["+ train.sequence_parallel: 8"] > 4 * rows["as configured"]
    assert [k for k in rows if k.startswith("all of them")]
    best = max(v for k, v in rows.items() if k.startswith("all of them"))
    assert best >= max(rows.values())


# ------------------------------------------------------------------ 2 gloo ranks
@pytest.mark.multirank
def test_sequence_parallel_matches_the_plain_forward(tmp_path):
    out = tmp_path / "sp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    port = str(29400 + os.getpid() % 500)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "longseq_worker.py"),
                           str(out), port], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert set(got) == {"sdpa", "sdpa-packed", "eager", "eager-packed"}
    for case, r in got.items():
        assert r["grads"] and r["loss"] < 1e-5 and r["grad"] < 1e-5, (case, r)


def sp_run(tiny: dict, folder, n: int, steps: int) -> str:
    path = folder / f"sp{n}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: sp{n}
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true}}
        train: {{max_steps: {steps}, micro_batch_size: 4, lr: 3.0e-3, scheduler: constant,
                 checkpoint_every: 2, device: cpu, sequence_parallel: {n}}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{nodes: 1, gpus_per_node: {n}}}
        output: {{dir: {folder}/run{n}, save_final: false}}
        """))
    return str(path)


def torchrun(nproc: int, args: list[str]) -> subprocess.Popen:
    from test_train_engine import rank_env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "launcher", "train", *args]
    return subprocess.Popen(cmd, env=rank_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r]


@pytest.mark.multirank
@pytest.mark.slow
def test_sequence_parallel_training_resumes_and_matches_one_rank(tiny, tmp_path):
    """sequence_parallel 2 on 2 ranks (1 data-parallel rank), stopped after step 2 and resumed
    to step 4, against 1 rank without it: the same losses (the gradients agree, or step 3 and 4
    would not)."""
    one = torchrun(1, [sp_run(tiny, tmp_path, 1, 4)])
    two = torchrun(2, [sp_run(tiny, tmp_path, 2, 2)])
    for proc in (two, one):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    again = torchrun(2, [sp_run(tiny, tmp_path, 2, 2), "train.max_steps=4"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "resumed from" in out + err and "step-00000002" in out + err
    ref, got = losses(tmp_path / "run1"), losses(tmp_path / "run2")
    assert len(ref) == len(got) == 4
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
