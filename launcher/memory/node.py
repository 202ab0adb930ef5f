"""CPU memory of one node: what its ranks hold while loading the model and while training, and
the memory to compare it with (`--node-memory`, `cluster.mem`, or this host's for local runs).

How transformers 5 and DeepSpeed 0.19 load (read from their source, measured on CPU ranks):

- ZeRO-0/1/2 (and quantized bases): `from_pretrained` memory-maps each safetensors shard and
  the parameters start as views of it, so the checkpoint sits once in the node's page cache,
  shared by its ranks (reclaimable, but charged to the job's cgroup). A checkpoint stored in
  another dtype than model.dtype is converted: one anonymous copy per rank.
- ZeRO-3 (`zero.Init`): every rank builds only its partition; rank 0 alone reads the
  memory-mapped shards and the ranks gather module by module, so rank 0's node holds the
  checkpoint once, in its page cache: rank 0's private memory while loading is its partition
  plus the module being gathered, as on every other rank (bench/node_loading.py measured it: no
  second copy of the state dict). A checkpoint in another dtype is converted module by module.
- Offload: DeepSpeed pins each rank's fp32 masters, Adam state and fp32 gradient slice
  (optimizer offload) and its parameter partitions (parameter offload) in CPU memory.
- Each rank process: Python, torch, CUDA and NCCL libraries on a GPU node (`RANK_HOST`,
  typical); on CPU ranks, the process baseline (`CPU_RANK_BASE`) plus the plan's per-rank total.
"""
from __future__ import annotations

import json
import os
from typing import Any

from launcher.config.schema import DTYPE_BYTES, TORCH_DTYPE
from launcher.memory.nvme import node_terms as nvme_terms
from launcher.memory.terms import DS_SRC, Term, gib, param_groups
from launcher.config.sizes import parse_size, parse_slurm_mem

# bytes per element of a checkpoint dtype, by its torch name (derived from the one dtype table)
CKPT_BYTES = {**{TORCH_DTYPE[k]: DTYPE_BYTES[k] for k in TORCH_DTYPE}, "float64": 8}

RANK_HOST = 3 * 2**30        # a GPU rank's own process on the host (libraries, Python): typical
CPU_RANK_BASE = 450 * 2**20  # a CPU rank after imports, process group and warm-up (measured)
SRC_LOAD = "transformers 5 modeling_utils (_load_pretrained_model), integrations/deepspeed.py"


def host_memory() -> int | None:
    """This machine's MemTotal, or None where /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def node_memory(cfg: Any, given: str | int | None, local: bool) -> tuple[int | None, str]:
    """(bytes, where from): --node-memory, else cluster.mem, else this host for local runs."""
    if isinstance(given, int):
        return given, "given"
    if given:
        return parse_size(given, "--node-memory"), "--node-memory"
    if cfg.cluster.mem and parse_slurm_mem(cfg.cluster.mem) is not None:
        return parse_slurm_mem(cfg.cluster.mem), "cluster.mem"
    if local:
        mem = host_memory()
        if mem:
            return mem, "this host (MemTotal)"
    if cfg.cluster.mem is not None and cfg.cluster.mem.strip() == "0":
        return None, "cluster.mem 0 (all of the node's memory, whatever that is)"
    return None, "unknown"




def checkpoint_dtype(model_path: str, train_dtype: str) -> str:
    """The checkpoint's dtype on disk, from config.json (else the training dtype)."""
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
            mc = json.load(fh)
    except (OSError, ValueError):
        mc = {}
    dtype = str(mc.get("dtype") or mc.get("torch_dtype") or TORCH_DTYPE[train_dtype])
    return dtype if dtype in CKPT_BYTES else TORCH_DTYPE[train_dtype]


def node_terms(r: Any, per_rank_total: int) -> list[Term]:
    """Terms of one node's CPU memory: phase "load" (from_pretrained) or "train" (the steps);
    the node's peak is the larger phase. r: the planner's setting."""
    cfg, inv, st = r.cfg, r.inv, r.st
    n = max(1, min(cfg.cluster.gpus_per_node, r.world))
    ck_dtype = checkpoint_dtype(cfg.model.path, cfg.model.dtype)
    ck = CKPT_BYTES[ck_dtype]
    ckpt = inv.total * ck if cfg.quantization.mode == "none" else \
        sum(p.numel for p in inv.params if p.group not in ("adapters", "copies")) * ck
    out: list[Term] = []
    if r.device == "cuda":
        host = Term("rank_host", f"rank processes ({n} x {gib(RANK_HOST)})", n * RANK_HOST,
                    "load train", f"{n} ranks x Python, torch, CUDA and NCCL libraries (typical)",
                    "estimate")
    else:  # CPU ranks: their tensors live here too
        host = Term("rank_host", f"rank processes ({n} x baseline)", n * CPU_RANK_BASE,
                    "load train", f"{n} ranks x {gib(CPU_RANK_BASE)} after imports (typical)",
                    "bench/plan_vs_measured.py baselines")
        at_init = st.weights + st.masters
        out.append(Term("rank_init", "each rank's weights and fp32 masters (initialize)",
                        n * at_init, "load", f"{n} ranks x (weights + fp32 masters) = {n} x "
                        f"{gib(at_init)}: deepspeed.initialize copies the mapped weights into its "
                        "buffers", "bench/node_loading.py"))
        out.append(Term("rank_train", "each rank's training memory (the per-rank total)",
                        n * per_rank_total, "train", f"{n} ranks x {gib(per_rank_total)}",
                        "the per-rank plan above"))
    out.insert(0, host)
    out.append(Term("page_cache", "checkpoint shards (page cache, shared by the node's ranks)",
                    ckpt, "load", f"P x {ck} B once per node: safetensors shards memory-mapped "
                    "(reclaimable; charged to the job's cgroup); under ZeRO-3 rank 0 alone reads "
                    "them", "bench/node_loading.py; " + SRC_LOAD))
    # ZeRO-3: rank 0 reads the mapped shards (the page cache above), no private copy (measured)
    if r.stage != 3 and ck_dtype != TORCH_DTYPE[cfg.model.dtype] and cfg.quantization.mode == "none":
        out.append(Term("load_convert", f"weights converted to {cfg.model.dtype} (each rank)",
                        n * inv.total * inv.lp_bytes, "load",
                        f"{n} ranks x P x lp: the checkpoint is {ck_dtype}", SRC_LOAD))
    if cfg.deepspeed.offload_optimizer == "cpu":
        per = st.masters + st.optim + 4 * st.opt_elems
        out.append(Term("offload", "offloaded optimizer (pinned: masters, state, fp32 grads)",
                        n * per, "train", f"{n} ranks x (masters + state + 4 B fp32 grad) = "
                        f"{n} x {gib(per)}", DS_SRC))
    if cfg.deepspeed.offload_param == "cpu":
        out.append(Term("offload_param", "offloaded parameters (pinned partitions)",
                        n * st.weights, "train", f"{n} ranks x this rank's parameter partitions",
                        DS_SRC))
    out += nvme_terms(r, n, param_groups(inv, cfg.train.weight_decay))
    if r.stage == 3 and cfg.output.save_final and cfg.freeze.policy != "lora":
        state = sum(p.nbytes for p in inv.params if p.group != "copies") + inv.buffer_bytes
        out.append(Term("final_save", "16-bit state dict gathered for the final export (rank 0)",
                        state, "save", "all weights x lp (+ buffers) on rank 0's host: "
                        "_zero3_consolidated_16bit_state_dict copies each gathered layer to the CPU; "
                        "the other terms of training stay allocated", "deepspeed 0.19 "
                        "runtime/engine.py _zero3_consolidated_16bit_state_dict; launcher/rank/export.py"))
    # what training holds stays allocated through the final save
    return [t if "train" not in t.phase.split() else
            Term(t.key, t.label, t.bytes, t.phase + " save", t.formula, t.source, t.low) for t in out]


def node_peak(terms: list[Term]) -> tuple[str, int]:
    """(phase, bytes) of the node's worst phase: loading, training or the final save."""
    phases = {name: sum(t.bytes for t in terms if key in t.phase.split())
              for key, name in (("load", "loading"), ("train", "training"), ("save", "final save"))}
    worst = max(phases, key=lambda k: (phases[k], k == "training"))
    return worst, phases[worst]
