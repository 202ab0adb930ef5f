"""Resume on another number of ranks (launcher/cluster/reshard.py): 2 -> 1 and 1 -> 2 CPU ranks.

A reference run trains STEPS steps uninterrupted, checkpointing at step AT. A copy of its run
directory, cut back to that checkpoint, resumes on the other number of ranks: the checkpoint is
converted once into its universal form, the global batch is kept (grad_accum recomputed) and the
losses of steps AT+1.. equal the reference's (fp32: 1e-4 relative). The converted optimizer
state equals the original's for every trainable parameter, both read back from their files.
The data order is checked without ranks: the sampler continues at the same global example.

The multi-rank cases cover each ZeRO stage, each freeze policy and both directions once
(COVER); the rest of the 18 combinations run with `FTLAUNCH_RESHARD_ALL=1`.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from launcher.rank import checkpoint as ck
from launcher.cluster import reshard
from launcher.data.batching import Sampler
from launcher.config.errors import ConfigError
from test_train_engine import ROOT, rank_env

STEPS, AT = 6, 3
FREEZE = {
    "full": "{policy: full}",
    "last_layers": "{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}",
    "lora": "{policy: lora, lora: {r: 4, dropout: 0.0}}",
}
# each stage, each freeze policy and each direction once; ZeRO-3 with two parameter groups (decay
# and no decay), where DeepSpeed's universal load shared one step counter between them
COVER = [(1, "lora", 2, 1), (2, "last_layers", 1, 2), (3, "full", 2, 1)]
ALL = [(z, f, a, b) for z, f, (a, b) in itertools.product((1, 2, 3), FREEZE, ((2, 1), (1, 2)))]
CASES = ALL if os.environ.get("FTLAUNCH_RESHARD_ALL") == "1" else COVER


def torchrun(nproc: int, run_file: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "launcher", "train", run_file]
    return subprocess.run(cmd, env=rank_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def same_length(tiny, tmp_path_factory) -> str:
    """24 examples that all fill max_seq_len (cut), so every micro batch has the same number of
    tokens and the mean loss does not depend on how the global batch is split into micro batches."""
    folder = tmp_path_factory.mktemp("reshard-data")
    with open(tiny["text"]) as fh:
        texts = [json.loads(line)["text"] for line in fh][:48]
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps({"text": a + " " + b + " " + a}) + "\n"
                            for a, b in zip(texts[::2], texts[1::2])))
    return str(path)


def write_run(tiny: dict, data: str, folder, stage: int, freeze: str, world: int) -> str:
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: reshard
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {data}, max_seq_len: 16, shuffle: true}}
        train: {{max_steps: {STEPS}, micro_batch_size: 1, grad_accum: {4 // world}, lr: 3.0e-3,
                 warmup_steps: 1, checkpoint_every: {AT}, keep_checkpoints: 3, device: cpu,
                 log_every: 1, weight_decay: 0.1}}
        freeze: {FREEZE[freeze]}
        deepspeed: {{zero_stage: {stage}}}
        cluster: {{nodes: 1, gpus_per_node: {world}}}
        output: {{dir: {folder}/run, save_final: false}}
        """))
    return str(path)


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh) if "loss" in r}


def cut_back(src: str, dst: str, step: int) -> None:
    """A copy of run directory src as it was right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    for s, path in ck.listing(os.path.join(dst, "checkpoints")):
        if s > step:
            shutil.rmtree(path)
    os.remove(os.path.join(dst, "exit_status.json"))


# ------------------------------------------------------------------ reading optimizer state
def _load(path: str) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def original_state(ds_dir: str) -> dict[str, dict]:
    """{parameter: {fp32, exp_avg, exp_avg_sq}} whole, read from the per-rank ZeRO files."""
    import glob

    import torch
    optim = sorted(glob.glob(os.path.join(ds_dir, "*optim_states.pt")))
    shards = [_load(f)["optimizer_state_dict"] for f in optim]
    model = _load(sorted(glob.glob(os.path.join(ds_dir, "*model_states.pt")))[0])
    out: dict[str, dict] = {}
    if "param_slice_mappings" in shards[0]:  # stage 1/2: fragments at addresses per rank
        for g, shapes in enumerate(model["param_shapes"]):
            for name, shape in shapes.items():
                out[name] = {}
                for key in ("fp32", "exp_avg", "exp_avg_sq"):
                    parts = []
                    for sd in shards:
                        frag = sd["param_slice_mappings"][g].get(name)
                        if frag is None:
                            continue
                        flat = sd["single_partition_of_fp32_groups"][g] if key == "fp32" \
                            else sd["base_optimizer_state"]["state"][g][key]
                        parts.append(flat.narrow(0, frag.start, frag.numel))
                    out[name][key] = torch.cat(parts).view(shape)
        return out
    world = len(shards)  # stage 3: each rank holds ceil(numel / world) of every parameter
    for g, shapes in enumerate(model["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            part = -(-numel // world)
            out[name] = {}
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                flats = [sd["fp32_flat_groups"][g] if key == "fp32"
                         else sd["optimizer_state_dict"]["state"][g][key] for sd in shards]
                whole = torch.cat([f.narrow(0, offset, part) for f in flats])[:numel]
                out[name][key] = whole.view(shape)
            offset += part
    return out


def universal_state(uni_ds: str, names) -> dict[str, dict]:
    """The same, from the universal checkpoint's per-parameter files ({"param": t} or t alone)."""
    def read(path):
        sd = _load(path)
        return sd["param"] if isinstance(sd, dict) else sd
    return {n: {k: read(os.path.join(uni_ds, "zero", n, f"{k}.pt"))
                for k in ("fp32", "exp_avg", "exp_avg_sq")} for n in names}


# ------------------------------------------------------------------ the multi-rank cases
@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("stage,freeze,before,after", CASES,
                         ids=[f"zero{z}-{f}-{a}to{b}" for z, f, a, b in CASES])
def test_resume_on_another_world_size(tiny, same_length, tmp_path, stage, freeze, before, after):
    import torch

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = torchrun(before, write_run(tiny, same_length, ref_dir, stage, freeze, before))
    assert ref.returncode == 0, ref.stderr[-4000:]
    expected = losses(str(ref_dir / "run"))
    assert sorted(expected) == list(range(1, STEPS + 1))

    folder = tmp_path / "resumed"
    cut_back(str(ref_dir / "run"), str(folder / "run"), AT)
    run_file = write_run(tiny, same_length, folder, stage, freeze, before)  # the same run file
    p = torchrun(after, run_file)
    assert p.returncode == 0, p.stderr[-4000:]
    ckpt = os.path.join(folder, "run", "checkpoints", ck.step_name(AT))
    line = (f"resuming {ckpt} (written by {before} rank{'s' if before > 1 else ''}) on {after} "
            "through its universal "
            f"checkpoint {ckpt}/universal; grad_accum {4 // before} -> {4 // after} keeps the "
            "global batch of 4")
    assert line in p.stderr, p.stderr[-3000:]
    got = losses(str(folder / "run"))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(AT + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)
    assert got[STEPS] < got[1]  # it trained on after the resume

    # the converted optimizer state is the original's, parameter by parameter
    orig = original_state(os.path.join(ckpt, "ds"))
    assert orig, "no trainable parameter found in the checkpoint"
    conv = universal_state(os.path.join(ckpt, "universal", "ds"), orig)
    for name, keys in orig.items():
        for key, tensor in keys.items():
            assert torch.equal(conv[name][key].view(tensor.shape), tensor), (name, key)
    # the checkpoints written after the resume record the new world size and the same batch
    with open(os.path.join(folder, "run", "checkpoints", ck.step_name(STEPS),
                           ck.TRAINER_STATE)) as fh:
        last = json.load(fh)
    assert last["world_size"] == after
    assert last["batch"] == {"micro": 1, "accum": 4 // after, "global": 4}
    with open(os.path.join(ref_dir, "run", "checkpoints", ck.step_name(STEPS),
                           ck.TRAINER_STATE)) as fh:
        ref_last = json.load(fh)
    consumed = lambda st: (st["sampler"]["epoch"], st["sampler"]["position"] * st["world_size"])  # noqa: E731
    assert consumed(last) == consumed(ref_last)


# ------------------------------------------------------------------ without ranks
def _cfg(tmp_path, train: str, gpus: int = 2, extra: str = ""):
    """A run config from its text, the file checks left out (no model or data needed here)."""
    from launcher.config import runfile
    cfg, problems = runfile.parse(textwrap.dedent(f"""\
        name: r
        model: {{path: {tmp_path}, dtype: fp32}}
        data: {{path: {tmp_path}/d.jsonl}}
        train: {{max_steps: 10, {train}}}
        cluster: {{nodes: 1, gpus_per_node: {gpus}}}
        output: {{dir: {tmp_path}/run}}
        {extra}"""), [], source="run.yaml", base_dir=str(tmp_path))
    assert cfg is not None, problems
    return cfg


@pytest.mark.parametrize("before,after,micro,accum", [(2, 1, 1, 2), (1, 2, 1, 4), (4, 2, 2, 1),
                                                      (2, 4, 1, 4), (3, 2, 2, 2)])
def test_data_order_continues_at_the_same_global_example(before, after, micro, accum):
    """Every example once per epoch over a run that changes world size mid-epoch at a step
    boundary, in the order an uninterrupted run sees them."""
    n, glob = 48, micro * accum * before
    order = lambda w, state, count: _take(Sampler(n, rank=0, world_size=w, micro_batch_size=micro,  # noqa: E731
                                                  seed=5), w, state, count)
    steps_before = 3
    first, state = order(before, None, steps_before * accum)
    st = {"world_size": before, "sampler": state, "batch": {"micro": micro, "global": glob}}

    class C:  # the fields sampler_state reads
        class train:
            micro_batch_size = micro
    new_state = reshard.sampler_state(st, C, after)
    per_epoch = (n // glob) * glob
    rest, _ = order(after, new_state, (per_epoch - steps_before * glob) // (micro * after))
    seen = first + rest
    assert sorted(seen) == sorted(set(seen)) and len(seen) == per_epoch
    whole, _ = order(before, None, per_epoch // (micro * before))
    assert seen == whole


def _take(sampler: Sampler, world: int, state, micro_steps: int) -> tuple[list[int], dict]:
    """The examples all `world` ranks take in micro_steps micro steps, in global order."""
    samplers = [Sampler(sampler.n, rank=r, world_size=world, micro_batch_size=sampler.micro_batch_size,
                        seed=sampler.seed) for r in range(world)]
    its = []
    for s in samplers:
        if state:
            s.load_state_dict(state)
        its.append(iter(s))
    out: list[int] = []
    for _ in range(micro_steps):
        for it in its:
            out += next(it)
    return out, samplers[0].state_dict()


def test_keep_batch_recomputes_accumulation(tmp_path):
    cfg = _cfg(tmp_path, "micro_batch_size: 2, grad_accum: 2", gpus=4)
    state = {"world_size": 4, "batch": {"micro": 2, "accum": 2, "global": 16}}
    new, note = reshard.keep_batch(cfg, state, 2)
    assert (new.train.grad_accum, new.train.global_batch_size) == (4, 16)
    assert note == "grad_accum 2 -> 4 keeps the global batch of 16"
    same, note = reshard.keep_batch(cfg, state, 4)
    assert same is cfg and note is None
    by_global = _cfg(tmp_path, "micro_batch_size: 2, global_batch_size: 16", gpus=4)
    same, note = reshard.keep_batch(by_global, state, 2)
    assert same is by_global and note == "grad_accum 2 -> 4 keeps the global batch of 16"


def test_keep_batch_refuses_what_cannot_be_kept(tmp_path):
    cfg = _cfg(tmp_path, "micro_batch_size: 2, grad_accum: 1", gpus=4)
    state = {"world_size": 4, "batch": {"micro": 2, "accum": 1, "global": 8}}
    with pytest.raises(ConfigError, match=r"global batch of 8 \(written by 4 ranks\) cannot be "
                       r"kept on 3 ranks(.|\n)*fix: set train.global_batch_size to a multiple of "
                       r"6 \(changes the batch from here on\), or resume on 1, 2, 4 ranks"):
        reshard.keep_batch(cfg, state, 3)
    cfg = _cfg(tmp_path, "micro_batch_size: 4, grad_accum: 1", gpus=3)
    state = {"world_size": 3, "batch": {"micro": 4, "accum": 1, "global": 12}}
    with pytest.raises(ConfigError, match=r"fix: set train.micro_batch_size to 6 \(keeps 12\)"):
        reshard.keep_batch(cfg, state, 2)


def test_keep_batch_follows_a_changed_run_file(tmp_path):
    cfg = _cfg(tmp_path, "micro_batch_size: 2, grad_accum: 4", gpus=4)
    state = {"world_size": 4, "batch": {"micro": 2, "accum": 2, "global": 16}}
    same, note = reshard.keep_batch(cfg, state, 2)
    assert same is cfg and note == "the run file changed the batch since the checkpoint"


def test_zero0_fp16_and_8bit_optimizers_are_refused_with_the_reason(tmp_path):
    cfg = _cfg(tmp_path, "micro_batch_size: 1", extra="deepspeed: {zero_stage: 0}")
    with pytest.raises(ConfigError, match=r"ck was written by 2 ranks, this launch has 1: (.|\n)*"
                       r"stage 0 has none(.|\n)*fix: set deepspeed.zero_stage: 1"):
        reshard.check_supported(cfg, "ck", 2, 1)
    ok = _cfg(tmp_path, "micro_batch_size: 1", extra="deepspeed: {zero_stage: 3}")
    assert reshard.unsupported(ok) == []
    import dataclasses
    fp16 = dataclasses.replace(ok, model=dataclasses.replace(ok.model, dtype="fp16"))
    with pytest.raises(ConfigError, match=r"model.dtype: ck was written by 2 ranks, this launch "
                       r"has 1: fp16's dynamic loss scaler(.|\n)*fix: use model.dtype: bf16"):
        reshard.check_supported(fp16, "ck", 2, 1)
    bnb = dataclasses.replace(ok, train=dataclasses.replace(ok.train, optimizer="adamw_8bit"))
    assert [p.key for p in reshard.unsupported(bnb)] == ["train.optimizer"]


def test_conversion_is_atomic(tmp_path):
    """A conversion that fails leaves no universal folder, and the checkpoint as it was."""
    path = tmp_path / "step-00000003"
    (path / "ds").mkdir(parents=True)
    (path / "ds" / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FileNotFoundError, match="optim_states.pt"):
        reshard.convert(str(path))
    assert not (path / "universal").exists() and not reshard.ready(str(path))
    assert sorted(os.listdir(path / "ds")) == ["junk.pt"]


def test_segments_span_each_launch_to_the_next(tmp_path):
    reshard.record_segment(str(tmp_path), 0, 3)
    reshard.record_segment(str(tmp_path), 20, 2)
    got = reshard.segments(str(tmp_path), 37)
    assert [(g["from"], g["to"], g["world_size"]) for g in got] == [(0, 20, 3), (20, 37, 2)]
    assert reshard.segments(str(tmp_path / "none"), 5) == []
