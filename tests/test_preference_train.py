"""Preference training on real DeepSpeed engines, 2 CPU ranks, several runs in one process group.

This file is also the rank script (`__main__` below): each rank builds every run in turn with
`train.setup` and trains it with `train.train_loop`, as `ftlaunch train` does, and reports the
metrics lines and what the reference holds. What it shows:
  - the first DPO step's loss is ln 2 (reference = initial policy, no dropout) at ZeRO 0 and 3
    with the reference model, at ZeRO-2 (bf16) with LoRA and the adapters switched off as the
    reference, at ZeRO-1 and ZeRO-3 with log-probs precomputed before training (every rank the
    same number of passes);
  - the reward accuracy rises above 0.5 on pairs whose chosen answer follows one rule;
  - ZeRO-3: the reference's parameters are partitioned (bytes per rank measured: half of the
    whole, as planned) and it has no optimizer state; the policy's optimizer state is that of
    its trainable parameters alone;
  - resume (ZeRO-1, the precomputed reference read back from the run directory) gives the
    losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
SUBJECTS = ["the cat", "a dog", "my friend", "the robot", "our teacher", "the bird", "a child"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "remembers", "builds"]


def write_pairs(path: str, n: int = 64, seed: int = 0) -> str:
    """Pairs whose chosen answer follows one rule: it is always `in the park.`."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} it",
                                 "chosen": " in the park.", "rejected": " at home."}) + "\n")
    return path


def run_yaml(tiny: dict, data: str, out: str, name: str, *, stage: int, dtype: str = "fp32",
             steps: int = 1, reference: str = "model", freeze: str = "{policy: full}",
             scheduler: str = "cosine", checkpoint_every: int = 0) -> str:
    text = textwrap.dedent(f"""\
        name: {name}
        model: {{path: {tiny['model']}, dtype: {dtype}}}
        data: {{path: {data}, prompt_field: prompt, max_seq_len: 32, shuffle: true}}
        train: {{max_steps: {steps}, micro_batch_size: 2, grad_accum: 1, lr: 2.0e-3,
                 device: cpu, objective: dpo, beta: 0.1, reference: {reference},
                 scheduler: {scheduler}, checkpoint_every: {checkpoint_every}}}
        freeze: {freeze}
        deepspeed: {{zero_stage: {stage}}}
        cluster: {{nodes: 1, gpus_per_node: {WORLD}}}
        output: {{dir: {out}/{name}, save_final: false}}
        """)
    path = os.path.join(out, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


# ------------------------------------------------------------------ rank side
def reference_stats(s) -> dict:
    """ZeRO-3: the reference engine's bytes on this rank and in whole; its optimizer state."""
    from launcher.rank import engine_stats
    engine = s.reference.holder[0]
    params = list(engine.module.parameters())
    own = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    whole = sum(p.ds_numel * p.ds_tensor.element_size() for p in params)
    live = sum(p.data.numel() for p in params)  # gathered elements outside a forward: none
    policy = engine_stats.optimizer_state_bytes(s.engine)
    trainable = sum(p.ds_numel for p in s.engine.module.parameters() if p.requires_grad)
    return {"ref_own": own, "ref_whole": whole, "ref_live": live,
            "ref_trainable": sum(p.requires_grad for p in params),
            "ref_optimizer": type(engine.optimizer).__name__,
            "policy_optimizer_state": policy, "policy_trainable": trainable}


def rank_main(spec_file: str, out: str) -> None:
    import gc

    from launcher.config import runfile
    from launcher.rank import train
    from launcher.cluster.dist_env import from_environ
    env = from_environ()
    with open(spec_file, encoding="utf-8") as fh:
        spec = json.load(fh)
    results = {}
    for item in spec:
        cfg = runfile.load(item["run"], item.get("overrides", []))
        # checkpoints only where a run resumes (the others end without the final save)
        os.environ["FTLAUNCH_NO_SAVE"] = "" if item.get("save") else "1"
        s = train.setup(cfg, env)
        rec = {"code": train.train_loop(s)}
        if item.get("measure"):  # after the steps: Adam's state exists
            rec.update(reference_stats(s))
        if env.rank == 0:
            with open(os.path.join(cfg.run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
                rec["metrics"] = [json.loads(x) for x in fh if '"loss"' in x]
        results[item["key"]] = rec
        del s
        gc.collect()
    if env.rank == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    train.shutdown(barrier=True)


# ------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo"))
    data = write_pairs(os.path.join(out, "pairs.jsonl"))
    lora = "{policy: lora, lora: {r: 4, dropout: 0.0}}"
    # ZeRO-1 through the resumed runs, ZeRO-2 (bf16) through LoRA: each stage once
    resume = dict(stage=1, reference="precomputed", scheduler="constant", checkpoint_every=2)
    spec = [
        {"key": "z0", "run": run_yaml(tiny, data, out, "z0", stage=0, steps=8)},
        {"key": "z3", "run": run_yaml(tiny, data, out, "z3", stage=3), "measure": True},
        {"key": "lora_off_z2_bf16", "run": run_yaml(tiny, data, out, "lora", stage=2,
                                                    dtype="bf16", freeze=lora,
                                                    reference="adapters_off")},
        {"key": "pre_z3", "run": run_yaml(tiny, data, out, "pre3", stage=3,
                                          reference="precomputed")},
        {"key": "whole", "run": run_yaml(tiny, data, out, "whole", steps=4, **resume)},
        {"key": "first", "run": run_yaml(tiny, data, out, "cut", steps=4, **resume),
         "overrides": ["train.max_steps=2"], "save": True},
        {"key": "resumed", "run": os.path.join(out, "cut.yaml"), "save": True},
    ]
    spec_file = os.path.join(out, "spec.json")
    with open(spec_file, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    result = os.path.join(out, "result.json")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(WORLD), __file__, spec_file, result],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    with open(os.path.join(out, "ranks.log"), "w", encoding="utf-8") as fh:
        fh.write(proc.stdout + "\n----- stderr\n" + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(result, encoding="utf-8") as fh:
        return json.load(fh), out


@pytest.mark.multirank
@pytest.mark.slow
def test_first_dpo_step_is_ln2_everywhere(trained):
    results, _ = trained
    for key in ("z0", "z3", "lora_off_z2_bf16", "pre_z3", "whole"):
        first = results[key]["metrics"][0]
        assert results[key]["code"] == 0, key
        assert first["step"] == 1
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5), (key, first)
        assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5), (key, first)
        assert first["reward_accuracy"] == 0.0  # ties: neither answer is preferred yet


@pytest.mark.multirank
@pytest.mark.slow
def test_reward_accuracy_rises_on_a_learnable_rule(trained):
    lines = trained[0]["z0"]["metrics"]
    assert len(lines) == 8
    last = lines[-3:]
    assert sum(x["reward_accuracy"] for x in last) / 3 > 0.5, lines
    assert all(x["reward_margin"] > 0 for x in last), lines
    assert last[-1]["loss"] < math.log(2), lines
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        assert key in lines[-1]


@pytest.mark.multirank
@pytest.mark.slow
def test_zero3_reference_is_partitioned_without_optimizer_state(trained):
    rec = trained[0]["z3"]
    assert rec["ref_whole"] > 0
    assert rec["ref_own"] <= -(-rec["ref_whole"] // WORLD) + 64 * 4, rec  # half, padding aside
    assert rec["ref_own"] >= rec["ref_whole"] // WORLD, rec
    assert rec["ref_live"] == 0  # nothing gathered between forwards
    assert rec["ref_trainable"] == 0
    assert rec["ref_optimizer"] == "DeepSpeedZeRoOffload", rec  # parameter partitioning only
    # AdamW: 2 fp32 tensors per trainable element, this rank's half: the policy's alone
    assert rec["policy_optimizer_state"] == pytest.approx(2 * 4 * rec["policy_trainable"] / WORLD,
                                                          rel=0.01), rec


@pytest.mark.multirank
@pytest.mark.slow
def test_resume_gives_the_uninterrupted_losses(trained):
    results, out = trained
    whole = [x["loss"] for x in results["whole"]["metrics"]]
    assert [x["step"] for x in results["first"]["metrics"]] == [1, 2]
    resumed = [x["loss"] for x in results["resumed"]["metrics"]]
    assert len(whole) == 4 and len(resumed) == 4, (whole, resumed)
    assert resumed == pytest.approx(whole, abs=1e-6)
    assert os.path.exists(os.path.join(out, "cut", "reference_logps.npz"))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    rank_main(sys.argv[1], sys.argv[2])
