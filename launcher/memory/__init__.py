"""`ftlaunch plan`: memory per GPU and per node, whether it fits, and what to change if not.

    plan(cfg, gpu_memory=None, world_size=None) -> Plan     # .fits, .total_per_gpu, .terms
    plan_text(cfg) -> str                                    # what `run --dry-run` / plan.txt show
    checked_text(plan, force) -> str                         # its text; ConfigError if it does not fit
    render(plan, explain=False) -> str                       # the text of a Plan
    main(PlanCall(...)) -> int                               # the CLI: 0 fits, 1 does not, 2 config

One module per part, each importing only those above it:

    inventory.py    the meta-device model from config.json, every parameter's group,
                    trainability and storage bytes (torch and transformers, imported lazily)
    terms.py        the model-state formulas (weights, gradients, masters, optimizer state) and
                    the runtime constants, one `Term` per thing that holds memory
    activations.py  what autograd keeps during a step
    nvme.py         the pinned host buffers of NVMe offload, as DeepSpeed's swappers allocate them
    node.py         a node's CPU memory while loading, training and the final save, and the
                    memory it has
    render.py       the text of a plan, with --explain
    advice.py       the cheapest changes that make a plan fit (re-planned through a callable)
    planner.py      the `Plan` and `plan()`, which put the above together

The attention kernel transformers will use is launcher/checks/attn_kernels.py (outside this package:
validate checks a requested kernel without importing the planner).

On CPU ranks (train.device cpu) the same terms describe each rank process's memory above its
baseline (see docs/memory.md for how that is measured and what it can and cannot verify).
"""
from __future__ import annotations

from launcher.memory.inventory import clear_meta_cache, meta_model_for
from launcher.memory.planner import DEFAULT_GPU_MEMORY, Plan, checked_text, main, plan, plan_text
from launcher.memory.render import render

__all__ = ["DEFAULT_GPU_MEMORY", "Plan", "checked_text", "clear_meta_cache", "main", "meta_model_for", "plan",
           "plan_text", "render"]
