"""What a plan says beside its verdict: offload that is not needed (and what offload costs),
ZeRO++ hpZ for multi-node ZeRO-3 (with its memory), and the allocator setting where its slack
decides the verdict. Each takes the finished `Plan` (launcher/memory/planner.py)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError
from launcher.memory.terms import expandable_segments, gib

Plan = Any  # launcher.memory.planner.Plan (not imported: the planner imports this module)


OFFLOAD_COST = ("offload costs throughput: the optimizer step runs on the CPU (often 2x slower "
                "steps) and offloaded parameters cross PCIe in every forward and backward")


def offload_notes(p: Plan, replan: Callable[[RunConfig], Plan]) -> list[str]:
    """For a run with offload: whether it fits without (then offload is not needed), and what
    offload costs."""
    ds = p.cfg.deepspeed
    if ds.offload_optimizer == "none" and ds.offload_param == "none":
        return []
    bare = replace(p.cfg, deepspeed=replace(ds, offload_optimizer="none", offload_param="none",
                                            nvme_path=None))
    try:
        without = replan(bare)
    except (ConfigError, ValueError):
        return [OFFLOAD_COST]
    if without.fits:
        return [f"fits without offload too ({gib(without.total_per_gpu)} per rank, node "
                f"{gib(without.node_cpu)}): set deepspeed.offload_optimizer and offload_param to "
                f"none; {OFFLOAD_COST}"]
    return [f"offload is needed: without it {gib(without.total_per_gpu)} per rank, node "
            f"{gib(without.node_cpu)} do not fit; {OFFLOAD_COST}"]


def hpz_notes(p: Plan) -> list[str]:
    """Multi-node ZeRO-3 on GPUs: ZeRO++'s hierarchical partitioning (hpZ), with its memory."""
    c = p.cfg
    if p.device != "cuda" or c.deepspeed.zero_stage != 3 or c.cluster.nodes < 2 or \
            c.cluster.gpus_per_node < 2 or ds_zero(p).get("zero_hpz_partition_size", 1) > 1:
        return []
    g = c.cluster.gpus_per_node
    extra = sum(-(-q.numel // g) * p.inv.lp_bytes for q in p.inv.params if q.quant == "none")
    return [f"multi-node ZeRO-3: ZeRO++ hpZ keeps a second copy of the weights partitioned within "
            f"each node, so the forward and backward all-gathers stay on the node's links "
            f"(deepspeed.overrides: {{zero_optimization: {{zero_hpz_partition_size: {g}}}}}); it "
            f"costs {gib(extra)} more per GPU (weights x lp / {g})"]


def ds_zero(p: Plan) -> dict[str, Any]:
    """The zero_optimization block the plan was made with."""
    return p.ds.get("zero_optimization", {}) if p.ds else {}


def allocator_notes(p: Plan) -> list[str]:
    """Where the allocator's slack decides the verdict and expandable segments are not on: say
    how to turn them on (the plan counts less slack with them)."""
    slack = p.term("allocator")
    if expandable_segments(p.cfg.cluster.env) or p.headroom > 2 * slack:
        return []
    return [f"fragmentation margin matters here ({gib(p.headroom)} headroom, {gib(slack)} "
            "counted as allocator slack): set cluster.env: {PYTORCH_CUDA_ALLOC_CONF: "
            "\"expandable_segments:True\"} (the job script and `ftlaunch run` pass it to every "
            "rank; torch then grows segments in place instead of caching fixed blocks)"]
