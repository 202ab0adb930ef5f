"""Real DeepSpeed on 2 CPU ranks, ZeRO 0-3: what the freeze-before-initialize order buys.

One run per ZeRO stage (module-scoped fixture) feeds every assertion: this file is also the
rank script (`__main__` below) that builds the engine with `train.setup`, snapshots the
parameters, trains with `train.train_loop`, reads the engine's memory, records logits and
exports. Stages 0 and 2 run in bf16, 1 and 3 in fp32, so both master-weight layouts are seen.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE = {0: "bf16", 1: "fp32", 2: "bf16", 3: "fp32"}
WORLD = 2


def run_yaml(tiny: dict, out_dir: str, stage: int) -> str:
    return textwrap.dedent(f"""\
        name: engine-z{stage}
        model: {{path: {tiny['model']}, dtype: {DTYPE[stage]}}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true, eval_fraction: 0.05}}
        train: {{max_steps: 16, micro_batch_size: 4, grad_accum: 2, lr: 3.0e-3, warmup_steps: 2,
                 device: cpu, log_every: 1}}
        freeze: {{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}}
        deepspeed: {{zero_stage: {stage}}}
        cluster: {{nodes: 1, gpus_per_node: {WORLD}}}
        output: {{dir: {out_dir}/run}}
        """)


def rank_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(WORLD), *args]
    return subprocess.run(cmd, env=rank_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda s: f"zero{s}")
def trained(request, tiny, tmp_path_factory):
    stage = request.param
    out = tmp_path_factory.mktemp(f"engine-z{stage}")
    run_file = out / "run.yaml"
    run_file.write_text(run_yaml(tiny, str(out), stage))
    proc = torchrun([__file__, str(run_file), str(out)])
    (out / "ranks.log").write_text(proc.stdout + "\n----- stderr\n" + proc.stderr)
    errors = [x for x in proc.stderr.splitlines() if "Error" in x or "what()" in x]
    assert proc.returncode == 0, "\n".join(errors[:20]) + proc.stderr[-3000:]
    import torch
    result = torch.load(out / "result.pt", weights_only=False)
    result.update(stage=stage, out=str(out), stdout=proc.stdout, run_dir=str(out / "run"))
    return result


@pytest.mark.multirank
@pytest.mark.slow
def test_loss_falls(trained):
    with open(os.path.join(trained["run_dir"], "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 16 and [r["step"] for r in rows if "loss" in r] == list(range(1, 17))
    assert losses[-1] < losses[0] - 0.5, losses
    assert any("eval_loss" in r for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] is not None for r in rows if "loss" in r)


@pytest.mark.multirank
@pytest.mark.slow
def test_frozen_identical_trainable_changed(trained):
    before, after, trainable = trained["before"], trained["after"], trained["trainable"]
    assert set(before) == set(after) and trainable and set(trainable) < set(before)
    import torch
    for name in before:
        same = torch.equal(before[name], after[name])
        if name in trainable:
            assert not same, f"{name} is trainable but did not change"
        else:
            assert same, f"{name} is frozen but changed"


@pytest.mark.multirank
@pytest.mark.slow
def test_engine_state_matches_trainable_count(trained):
    """AdamW: 2 fp32 tensors per trainable element; masters: 1 fp32 (none at ZeRO-0 fp32);
    partitioned over the ranks from ZeRO-1 on, whole on every rank at ZeRO-0."""
    stage, n = trained["stage"], trained["trainable_params"]
    copies = WORLD if stage == 0 else 1  # ZeRO-0 keeps a whole copy on every rank
    per_rank = trained["stats"]
    assert sum(s["optimizer_state_bytes"] for s in per_rank) == copies * 2 * 4 * n
    master = 0 if (stage == 0 and DTYPE[stage] == "fp32") else copies * 4 * n
    assert sum(s["fp32_master_bytes"] for s in per_rank) == master
    grad_size = 2 if DTYPE[stage] == "bf16" else 4
    assert sum(s["grad_bytes"] for s in per_rank) == copies * grad_size * n
    if stage > 0:  # evenly partitioned
        assert per_rank[0]["optimizer_state_bytes"] == per_rank[1]["optimizer_state_bytes"]


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("trained", [2], indirect=True, ids=["zero2"])
def test_control_freezing_after_initialize_keeps_full_state(trained):
    """The same model frozen only after deepspeed.initialize (built in the ZeRO-2 run): state
    for every parameter, twice what freezing first allocates here."""
    control = trained["control"]
    total = trained["total_params"]
    assert sum(control) == 2 * 4 * total
    assert sum(control) > 2 * 4 * trained["trainable_params"]


@pytest.mark.multirank
@pytest.mark.slow
def test_every_process_group_has_the_run_timeout(trained):
    """DeepSpeed reduces gradients on process groups it creates itself; each must time out after
    train.dist_timeout_s like the world group, not torch's 30-min default (a rank frozen
    mid-backward would hang the job that long: tests/test_faults.py shows the whole run)."""
    timeouts = trained["timeouts"]
    assert len(timeouts) >= 2, f"only the world group: {timeouts}"
    assert set(timeouts) == {float(trained["dist_timeout_s"])}, timeouts


@pytest.mark.multirank
@pytest.mark.slow
def test_export_loads_and_matches_engine_logits(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = os.path.join(trained["run_dir"], "final")
    dtype = torch.bfloat16 if DTYPE[trained["stage"]] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(final, dtype=dtype).eval()
    assert AutoTokenizer.from_pretrained(final).pad_token_id == 0
    with torch.no_grad():
        logits = model(input_ids=trained["probe_ids"]).logits
    torch.testing.assert_close(logits, trained["engine_logits"])


# ---------------------------------------------------------------- the rank script
def full_params(model) -> dict:
    """name -> full tensor copy (ZeRO-3 partitions gathered)."""
    import deepspeed
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().clone().cpu() for n, p in params.items()}


def rank_main(run_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from launcher.rank import engine_stats, train
    from launcher.model import freeze
    from launcher.config import runfile
    cfg = runfile.load(run_file)
    s = train.setup(cfg)
    before = full_params(s.model)
    assert train.train_loop(s) == 0
    after = full_params(s.model)
    probe_ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    s.engine.eval()
    with torch.no_grad():
        logits = s.engine(input_ids=probe_ids).logits.detach().cpu()
    s.engine.train()
    # gradients at an accumulation boundary, then the state the steps above allocated
    for _ in range(s.engine.gradient_accumulation_steps()):
        loss = s.engine(input_ids=probe_ids, labels=probe_ids).loss
        s.engine.backward(loss)
        if not s.engine.is_gradient_accumulation_boundary():
            s.engine.step()
    stats = {"optimizer_state_bytes": engine_stats.optimizer_state_bytes(s.engine),
             "fp32_master_bytes": engine_stats.fp32_master_bytes(s.engine),
             "grad_bytes": engine_stats.grad_bytes(s.engine)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    control = None
    if cfg.deepspeed.zero_stage == 2:
        model2, _ = train.load_model(cfg, s.device, s.ds_config)
        engine2 = train.build_engine(cfg, model2, s.ds_config)  # everything trainable here
        freeze.apply(model2, cfg)                                  # ... frozen too late
        for _ in range(engine2.gradient_accumulation_steps()):
            loss = engine2(input_ids=probe_ids, labels=probe_ids).loss
            engine2.backward(loss)
            engine2.step()
        control = [None] * dist.get_world_size()
        dist.all_gather_object(control, engine_stats.optimizer_state_bytes(engine2))
    from torch.distributed import distributed_c10d as c10d
    timeouts = [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for pg in c10d._world.pg_map]
    if dist.get_rank() == 0:
        torch.save({"timeouts": timeouts, "dist_timeout_s": cfg.train.dist_timeout_s,
                    "before": before, "after": after, "trainable": sorted(s.report.trainable),
                    "trainable_params": s.report.trainable_params,
                    "total_params": s.report.total_params, "stats": gathered,
                    "control": control, "probe_ids": probe_ids, "engine_logits": logits},
                   os.path.join(out, "result.pt"))
    train.shutdown(barrier=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    rank_main(sys.argv[1], sys.argv[2])
