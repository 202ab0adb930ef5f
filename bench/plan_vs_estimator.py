"""The plan beside DeepSpeed's own estimators, both against what the engines hold.

    .venv/bin/python bench/plan_vs_estimator.py [--from rows.json] [--doc docs/memory.md]

DeepSpeed ships `estimate_zero2_model_states_mem_needs_all_live(model, ...)` and
`estimate_zero3_model_states_mem_needs_all_live(model, ...)`: they print the memory of the
"model states" (16-bit parameters, gradients, fp32 masters, Adam moments) per GPU, counting every
parameter of the model (frozen or not) and assuming 16-bit weights. The numbers printed come from
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (no offload,
additional_buffer_factor 1.5), called here on the same meta-device model the plan uses.

Measured: the same run on 2 CPU ranks (bench/plan_vs_measured.py): the model states the engine
holds (weights + gradients + masters + optimizer state, read from its tensors) and the rank's
peak RSS. Rows whose measurements exist in --from are reused; others are measured now.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

import plan_vs_measured as pvm  # noqa: E402

BEGIN = "<!-- plan_vs_estimator:begin -->"
END = "<!-- plan_vs_estimator:end -->"
SETTINGS = ["z2 bf16 full", "z2 bf16 frozen", "z3 bf16 full", "z3 fp32 frozen"]


def estimator(model, stage: int, world: int) -> tuple[int, str]:
    """DeepSpeed's per-GPU model-states estimate (bytes) and what its _all_live prints."""
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_live)
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs, estimate_zero2_model_states_mem_needs_all_live,
        model_to_params)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if stage == 3:
            estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=world)
        else:
            estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=world)
    total = model_to_params(model)
    if stage == 3:
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world,
                                                          cpu_offload=False, cpu_offload_params=False)
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world, cpu_offload=False)
    return int(gpu), buf.getvalue()


def rows_for(model_name: str, work: str, reuse: list[dict], steps: int) -> list[dict]:
    from launcher import memory
    from launcher.config import runfile
    have = {(r["model"], r["setting"]): r for r in reuse}
    missing = [s for s in SETTINGS if (model_name, s) not in have]
    if missing:
        for r in pvm.measure(model_name, missing, work, steps):
            have[(model_name, r["setting"])] = r
    out = []
    paths = pvm.build_model(work, model_name)
    for setting in SETTINGS:
        m = have[(model_name, setting)]
        cfg = runfile.load(pvm.write_run(work, model_name, setting, paths))
        p = memory.plan(cfg, world_size=2, advise=False)
        stage = cfg.deepspeed.zero_stage
        # DeepSpeed counts parameters by data pointer: give it real (uninitialized) storage
        est, printed = estimator(copy.deepcopy(memory.meta_model_for(cfg)).to_empty(device="cpu"),
                                 stage, 2)
        plan_states = sum(p.term(k) for k in ("weights", "gradients", "masters", "optimizer"))
        eng = m["engine"]
        measured_states = eng["weights"] + eng.get("grads_storage", eng["grads"]) + eng["masters"] + eng["optimizer"]
        out.append({"model": model_name, "setting": setting, "trainable": p.inv.trainable,
                    "params": p.inv.total, "deepspeed_estimate": est, "plan_states": plan_states,
                    "measured_states": measured_states, "plan_total": p.total_per_gpu,
                    "measured_peak": m["measured_peak"], "estimator_printed": printed})
    return out


def table(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    lines = ["| model | setting | trainable / all | DeepSpeed estimate MiB | plan states MiB | "
             "engine states MiB | estimate / engine | plan / engine | peak RSS MiB | "
             "estimate / peak RSS | plan total / peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['trainable']:,} / {r['params']:,} | "
            f"{mib(r['deepspeed_estimate'])} | {mib(r['plan_states'])} | {mib(r['measured_states'])} | "
            f"{r['deepspeed_estimate'] / r['measured_states']:.2f} | "
            f"{r['plan_states'] / r['measured_states']:.3f} | {mib(r['measured_peak'])} | "
            f"{r['deepspeed_estimate'] / r['measured_peak']:.2f} | "
            f"{r['plan_total'] / r['measured_peak']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="20m")
    ap.add_argument("--from", dest="src", help="rows JSON from plan_vs_measured.py --json")
    ap.add_argument("--work")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--doc")
    a = ap.parse_args(argv)
    reuse = json.load(open(a.src, encoding="utf-8")) if a.src else []
    work = a.work or tempfile.mkdtemp(prefix="plan_vs_estimator.")
    rows = []
    for model in a.models.split(","):
        rows += rows_for(model, work, reuse, a.steps)
    print(rows[0]["estimator_printed"])
    text = table(rows)
    print(text)
    if a.doc:
        cmd = ("    .venv/bin/python bench/plan_vs_measured.py --json rows.json\n"
               "    .venv/bin/python bench/plan_vs_estimator.py --from rows.json --doc docs/memory.md\n")
        pvm.write_doc(a.doc, f"Written by `bench/plan_vs_estimator.py` ({time.strftime('%Y-%m-%d')}, "
                             f"2 CPU ranks):\n\n{cmd}\n{text}", BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
