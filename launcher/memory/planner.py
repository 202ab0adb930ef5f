"""The memory plan of a run: the `Plan` and `plan()`, which add up the terms of
inventory.py, terms.py and activations.py at each moment of a training step."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from launcher.dsconfig import build as ds_config
from launcher.config import runfile
from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError, Problem
from launcher.memory.activations import activations, from_frozen_trace, from_trace, grads_map
from launcher.memory.advice import advise as changes_that_fit
from launcher.memory.inventory import Inventory, inventory
from launcher.checks.attn_kernels import resolved as resolved_kernel
from launcher.memory.clock import plan_section
from launcher.memory.longseq import (act_terms, offload_node_term, render_max_seq_len,
                                     switches_on)
from launcher.memory.node import node_memory as node_memory_of
from launcher.memory.node import node_peak, node_terms
from launcher.memory.plan_notes import allocator_notes, hpz_notes, offload_notes
from launcher.memory.render import render
from launcher.memory.traced import trace, trace_frozen
from launcher.memory.probe import cpu_runtime_terms
from launcher.memory.reference import reference_terms, sequences_per_micro_batch
from launcher.memory.terms import (CPU_FRAGMENTATION, CUDA_CONTEXT, DS_SRC, States, Term,
                                   cuda_slack, gib, nccl_communicators,
                                   nccl_range, param_groups, states)
from launcher.config.gpus import CARDS, lookup
from launcher.config.sizes import parse_size
from launcher.model.device import job_device, local_gpu_memory

DEFAULT_GPU_MEMORY = CARDS["H100-SXM"].memory   # an "80GB" H100: 81,559 MiB (79.6 GiB)
# launcher/rank/train.py keeps only `.loss` of the model output, so the lp logits die before backward
LOGITS_HELD = False
MOMENTS = ("fwd", "bwd", "step")


@dataclass
class Plan:
    """A memory plan for one run configuration on world_size ranks."""

    cfg: RunConfig
    inv: Inventory
    world_size: int
    device: str                      # "cuda" or "cpu"
    gpu_memory: int
    gpu_memory_source: str
    terms: list[Term]
    worst_moment: str                # fwd, bwd or step: when the peak happens
    peak_allocated: int              # tensor bytes at the worst moment (max_memory_allocated)
    total_per_gpu: int               # + runtime overhead and allocator slack
    node_terms: list[Term]
    node_cpu: int
    states: States | None = None     # model states on one rank, before offload
    advice: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    node_memory: int | None = None   # CPU memory of one node, None where not known
    node_memory_source: str = "unknown"
    node_phase: str = "training"     # the node's worst phase: loading, training or final save
    ds: dict[str, Any] = field(default_factory=dict)  # the DeepSpeed config planned for

    @property
    def fits_gpu(self) -> bool:
        """Per rank: a GPU's memory (CPU ranks are judged with their node)."""
        return self.device == "cpu" or self.total_per_gpu <= self.gpu_memory

    @property
    def fits_node(self) -> bool | None:
        """Per node: None where the node's memory is not known."""
        return None if self.node_memory is None else self.node_cpu <= self.node_memory

    @property
    def fits(self) -> bool:
        """Fits per GPU and per node (a node of unknown memory is not held against it)."""
        return self.fits_gpu and self.fits_node is not False

    @property
    def headroom(self) -> int:
        return self.gpu_memory - self.total_per_gpu

    @property
    def peak_reserved(self) -> int:
        """What torch.cuda.max_memory_reserved should read: the tensor peak, the allocator's slack
        and cuBLAS's workspaces (those come from torch's allocator; the context and NCCL do not)."""
        return self.peak_allocated + self.term("allocator")

    def term(self, key: str) -> int:
        return sum(t.bytes for t in self.terms if t.key == key)

    @property
    def total_low(self) -> int:
        """The total with every term known only as a range at its lower end."""
        return self.total_per_gpu - sum(t.bytes - t.low for t in self.terms if t.low is not None)

    def to_dict(self) -> dict[str, Any]:
        inv = self.inv
        return {
            "model": {"path": self.cfg.model.path, **vars(inv.shape)},
            "parameters": {"total": inv.total, "trainable": inv.trainable, "frozen": inv.frozen,
                           "quantized": inv.quantized, "weight_bytes": inv.weight_bytes,
                           "groups": inv.groups()},
            "world_size": self.world_size, "device": self.device,
            "gpu_memory": self.gpu_memory, "gpu_memory_source": self.gpu_memory_source,
            "per_gpu": [t.to_dict() for t in self.terms],
            "peak_allocated": self.peak_allocated, "peak_at": self.worst_moment,
            "peak_reserved": self.peak_reserved, "total_per_gpu": self.total_per_gpu,
            "total_per_gpu_low": self.total_low,
            "headroom": self.headroom, "fits": self.fits,
            "fits_gpu": self.fits_gpu, "fits_node": self.fits_node,
            "per_node": [t.to_dict() for t in self.node_terms], "node_cpu": self.node_cpu,
            "node_phase": self.node_phase, "node_memory": self.node_memory,
            "node_memory_source": self.node_memory_source,
            "advice": self.advice, "notes": self.notes,
        }


# ------------------------------------------------------------------ building a plan
def _gpu_memory(cfg: RunConfig, given: str | int | None) -> tuple[int, str]:
    if isinstance(given, int):
        return given, "given"
    if given:
        return parse_size(given), "--gpu-memory"
    if cfg.cluster.gpu_memory:
        return parse_size(cfg.cluster.gpu_memory, "cluster.gpu_memory"), "cluster.gpu_memory"
    card = lookup(cfg.cluster.gpu_type) if cfg.cluster.gpu_type else None
    if card is not None:
        return card.memory, f"cluster.gpu_type {card.name}: {card.memory // 2**20:,} MiB"
    local = local_gpu_memory()
    if local:
        return local, "local GPU"
    return DEFAULT_GPU_MEMORY, ("default (no --gpu-memory, cluster.gpu_memory, cluster.gpu_type "
                                "or local GPU): an H100's 81,559 MiB")


def plan(cfg: RunConfig, gpu_memory: str | int | None = None, world_size: int | None = None,
         advise: bool = True, ds: dict[str, Any] | None = None, kernels: int | None = None,
         node_memory: str | int | None = None, local: bool | None = None) -> Plan:
    """The memory plan of cfg on world_size ranks (default: the cluster's nodes x GPUs).

    ds: the DeepSpeed config the ranks will use (default: `ds_config.build(cfg, ...)`).
    kernels: CPU ranks only, the oneDNN kernel bytes measured on the machine that will run
    (`launcher.memory.probe.measure`); None plans them as the stated range, at its upper end.
    node_memory: one node's CPU memory (else cluster.mem, else this host's where local: default
    for train.device cpu)."""
    world = world_size or cfg.world_size
    device = job_device(cfg)
    mem, mem_src = _gpu_memory(cfg, gpu_memory)
    r = _setting(cfg, world, device, ds)
    terms = (_model_state_terms(r) + _bucket_terms(r) + _activation_terms(r) + _step_terms(r)
             + _load_terms(r) + reference_terms(r))
    worst, peak = _peak(terms)
    terms += _overhead_terms(r, peak, kernels)
    total = peak + sum(t.bytes for t in terms if t.phase == "overhead")
    node = node_terms(r, total)
    if switches_on(cfg) and cfg.train.activation_offload:
        node += [t for t in [offload_node_term(cfg, world, act_terms(
            cfg, r.inv).offloaded)] if t]
    phase, node_cpu = node_peak(node)
    local = device == "cpu" if local is None else local
    nmem, nmem_src = node_memory_of(cfg, node_memory, local)
    result = Plan(cfg, r.inv, world, device, mem, mem_src, terms, worst, peak, total, node,
                  node_cpu, states=r.st, notes=_notes(r), node_memory=nmem,
                  node_memory_source=nmem_src, node_phase=phase, ds=r.ds)
    if device == "cuda":
        result.notes += allocator_notes(result)

    def replan(changed: RunConfig) -> Plan:
        return plan(changed, mem, world if changed.cluster.nodes == cfg.cluster.nodes
                    else changed.world_size, advise=False, kernels=kernels, node_memory=nmem,
                    local=False)
    if advise and not result.fits:
        result.advice = changes_that_fit(result, replan)
    if advise:
        result.notes += offload_notes(result, replan) + hpz_notes(result)
    return result


@dataclass(frozen=True)
class _Setting:
    """What every term depends on: the run, its parameters, DeepSpeed's config and model states."""

    cfg: RunConfig
    inv: Inventory
    st: States                       # model states on one rank, before offload
    ds: dict[str, Any]
    zero: dict[str, Any]             # ds["zero_optimization"]
    world: int
    device: str                      # "cuda" or "cpu"

    @property
    def stage(self) -> int:
        return self.cfg.deepspeed.zero_stage

    @property
    def off_opt(self) -> bool:
        return self.cfg.deepspeed.offload_optimizer != "none"


def _setting(cfg: RunConfig, world: int, device: str, ds: dict[str, Any] | None) -> _Setting:
    inv = inventory(cfg)
    ds = ds if ds is not None else ds_config.build(cfg, world, device=device)
    zero = ds.get("zero_optimization", {})
    st = states(inv, cfg.deepspeed.zero_stage, world, zero, cfg.train.optimizer,
                groups=param_groups(inv, cfg.train.weight_decay))
    return _Setting(cfg, inv, st, ds, zero, world, device)


def _adder(terms: list[Term]) -> Callable[[str, str, float, str, str, str], None]:
    def add(key: str, label: str, n: float, phase: str, formula: str, source: str) -> None:
        terms.append(Term(key, label, int(n), phase, formula, source))
    return add


# Moments of a step: "fwd" end of forward / start of backward (activations all alive),
# "bwd" end of backward (gradients reduced), "step" the optimizer step. A term lists the
# moments it is alive at; "static" terms are alive throughout.
def _model_state_terms(r: _Setting) -> list[Term]:
    """Weights, gradients, fp32 masters and optimizer state on the GPU (what is not offloaded)."""
    cfg, inv, st, stage, lp = r.cfg, r.inv, r.st, r.stage, r.inv.lp_bytes
    off_opt, off_par = r.off_opt, cfg.deepspeed.offload_param != "none"
    terms: list[Term] = []
    add = _adder(terms)
    w_on_gpu = st.weights if not off_par else inv.buffer_bytes
    add("weights", "weights", w_on_gpu, "static",
        st.weights_f if not off_par else "offload_param: partitions on CPU, gathered below", DS_SRC)
    grads_gpu = st.grads if not (off_opt and stage == 2) else 0
    add("gradients", "gradients", grads_gpu, "static" if stage == 3 else "bwd step",
        (st.grads_f if grads_gpu or not st.grads else "offload_optimizer: reduced into CPU fp32 slices")
        + (" (allocated at initialize)" if stage == 3 else " (from the backward to the step)"),
        DS_SRC)
    add("masters", "fp32 master weights", 0 if off_opt else st.masters, "static",
        "offloaded to CPU" if off_opt else
        ("none: fp32 parameters are optimized in place" if stage == 0 and lp == 4 else
         "4 B x optimizer elements (T at ZeRO-0, this rank's slice at ZeRO-1/2/3)"), DS_SRC)
    add("optimizer", f"optimizer state ({cfg.train.optimizer})", 0 if off_opt else st.optim,
        "static", "offloaded to CPU" if off_opt else st.optim_f,
        "torch AdamW / bitsandbytes Optimizer2State.init_state")
    if r.device == "cpu" and cfg.quantization.mode == "8bit":
        add("bnb_cpu", "bitsandbytes 8-bit CPU path", 2 * inv.quantized, "static",
            "2 B x quantized elements: measured on CPU ranks after the first step (MatMul8bitFp "
            "dequantizes per call; the memory is not held by Python-visible tensors)",
            "bench/plan_vs_measured.py (20M Llama, 6.4M and 19.5M quantized elements)")
    return terms


def _bucket_terms(r: _Setting) -> list[Term]:
    """DeepSpeed's gradient buckets, and the parameters ZeRO-3 gathers for the forward."""
    stage, lp, T, device, zero = r.stage, r.inv.lp_bytes, r.inv.trainable, r.device, r.zero
    bucket = int(float(zero.get("reduce_bucket_size", 5e8)))
    overlap = bool(zero.get("overlap_comm", stage == 3))
    contiguous = bool(zero.get("contiguous_gradients", True))
    terms: list[Term] = []
    add = _adder(terms)
    if stage in (1, 2) and contiguous:
        n_buf = 2 if overlap else 1
        if device == "cuda":
            add("buckets", "DeepSpeed reduce buckets", n_buf * bucket * lp, "fwd bwd",
                f"{n_buf} x reduce_bucket_size {bucket:,} x lp, from the first gradient of the "
                "backward to its end", "stage_1_and_2.py setup_buckets / _release_ipg_buffers")
        else:
            elems = min(bucket, T) + (min(bucket, max(T - bucket, 0)) if overlap else 0)
            add("buckets", "DeepSpeed reduce buckets", elems * lp, "bwd",
                "lp x gradient elements written into the buckets (CPU: untouched pages of "
                f"torch.empty({bucket:,}) are not resident; filled as activations are freed)",
                "stage_1_and_2.py setup_buckets")
    elif stage == 3:
        nb = bucket * lp if device == "cuda" else min(bucket, T) * lp
        add("buckets", "DeepSpeed reduce bucket", nb, "static",
            f"reduce_bucket_size {bucket:,} x lp" + ("" if device == "cuda" else
                                                    " (CPU: pages written, <= T elements)"),
            "stage3.py (allocated at initialize)")
        add("gathered", "ZeRO-3 gathered parameters", r.st.gather, "fwd", r.st.gather_f,
            "stage3 max_live_parameters / max_reuse_distance; 2 copies measured at the peak")
        big = max((p.numel for p in r.inv.params if p.trainable and p.numel > bucket), default=0)
        if big:
            add("grad_unbucketed", "gradient larger than the reduce bucket", big * lp, "bwd",
                f"lp x the largest trainable parameter above reduce_bucket_size ({big:,} "
                "elements): kept whole as param.grad until the next gradient reduces it",
                "stage3.py __add_grad_to_ipg_bucket / reduce_independent_p_g_buckets_and_remove_grads")
    return terms


def _activation_terms(r: _Setting) -> list[Term]:
    """What autograd keeps from the forward, and the backward's worst temporaries."""
    cfg, inv = r.cfg, r.inv
    s, b = cfg.data.max_seq_len, sequences_per_micro_batch(cfg)
    attn = resolved_kernel(inv.shape.model_type, cfg.model.attn_implementation)
    linear3 = r.stage == 3 and bool(r.zero.get("memory_efficient_linear", True))
    kernel = "eager" if attn == "eager" else "sdpa"  # flash_attention_2 saves like sdpa
    if switches_on(cfg):  # sequence parallel, tiled, offloaded: the formula's terms
        return act_terms(cfg, inv, linear3).terms
    # packed rows carry a (b, 1, s, s) mask except under flash attention (launcher/data/batching.py)
    packed = cfg.data.packing and attn != "flash_attention_2"
    # padded rows: transformers builds a (b, 1, s, s) mask for sdpa/eager; flash attention unpads
    # them with the 2-D mask instead (varlen), keeping no mask and k/v at the kv heads
    padded = not cfg.data.packing and attn != "flash_attention_2"
    sm = _card_sm(cfg)
    act, why = None, ""
    if cfg.freeze.policy == "full" and cfg.quantization.mode == "none":
        tr = trace(cfg.model.path, b, s, cfg.model.dtype, kernel, cfg.model.trust_remote_code,
                   padded=padded, device=r.device, packed=packed, sm=sm)
        if isinstance(tr, str):
            why = f" [formula: the meta-device trace failed: {tr}]"
        else:
            act = from_trace(tr, inv.shape, b, s, inv.lp_bytes, cfg.model.gradient_checkpointing,
                             LOGITS_HELD)
    else:
        names = frozenset(p.name.removesuffix(" (trained copy)") for p in inv.params if p.trainable)
        lora = (cfg.freeze.lora.r, cfg.freeze.lora.dropout) if cfg.freeze.policy == "lora" else None
        quantized = frozenset(p.name.rpartition(".")[0] for p in inv.params if p.quant != "none")
        ft, fc = (trace_frozen(cfg.model.path, b, s, cfg.model.dtype, kernel, names,
                               cfg.model.trust_remote_code, padded=padded,
                               device=r.device, checkpointing=gc, lora=lora, quantized=quantized,
                               quant_mode=cfg.quantization.mode, zero3_linear=linear3,
                               packed=packed, sm=sm)
                  for gc in (False, cfg.model.gradient_checkpointing))
        failed = next((t for t in (ft, fc) if isinstance(t, str)), None)
        if failed:
            why = f" [formula: the meta-device trace failed: {failed}]"
        else:
            act = from_frozen_trace(ft, fc if cfg.model.gradient_checkpointing else None,
                                    inv.shape, b, s, inv.lp_bytes, LOGITS_HELD)
    if act is None:  # what trains decides what is kept: the enumerated formula, by block
        blocks, head = grads_map(inv, cfg.freeze.lora.dropout, cfg.freeze.lora.r, zero3=linear3) \
            if inv.shape.known else (None, None)
        act = activations(inv.shape, b, s, inv.lp_bytes, kernel,
                          cfg.model.gradient_checkpointing, padded=padded or packed,
                          logits_held=LOGITS_HELD, blocks=blocks, head=head)
        act = replace(act, formula=act.formula + why)
    terms: list[Term] = []
    add = _adder(terms)
    add("activations", "activations", act.saved, "fwd",
        f"b={b}, s={s}, {attn}{', checkpointing' if cfg.model.gradient_checkpointing else ''}: "
        + act.formula, act.source)
    add("loss_backward", "backward temporaries", act.backward_extra, "fwd",
        "fp32 gradients of the loss (8bsV) or a recomputed block", act.source)
    if packed:
        per = 1 if attn == "sdpa" else inv.lp_bytes
        add("packed_mask", "packed rows' attention mask", per * b * s * s, "fwd bwd",
            f"{'bool' if per == 1 else 'lp'} (b, 1, s, s) = {per} x b s^2, the batch's mask, on the "
            "device from the forward to the end of the backward (the copies sdpa makes of it per "
            "block, and k/v repeated to every head, are in the activations above)",
            "launcher/data/batching.py _packed; transformers sdpa_attention use_gqa_in_sdpa")
    return terms


def _card_sm(cfg: RunConfig) -> tuple[int, int]:
    """The compute capability the plan assumes: cluster.gpu_type's, else an sm90 card (H100)."""
    from launcher.config.gpus import lookup
    card = lookup(cfg.cluster.gpu_type) if cfg.cluster.gpu_type else None
    return card.sm if card is not None and card.sm else (9, 0)


def _step_terms(r: _Setting) -> list[Term]:
    """Transients of the optimizer step on the GPU (none when the optimizer is offloaded)."""
    cfg, inv, st, stage, lp, T = r.cfg, r.inv, r.st, r.stage, r.inv.lp_bytes, r.inv.trainable
    terms: list[Term] = []
    add = _adder(terms)
    if r.off_opt:
        return terms
    if stage == 0:
        fp32_grads = 4 * T if lp < 4 else 0
        fmt = "4T (fp32 copies of the gradients)" if lp < 4 else "0"
    else:
        fp32_grads = 4 * st.opt_elems
        fmt = "4 B x this rank's slice (fp32 gradient for the step)"
    add("step_grads", "fp32 gradients at the step", fp32_grads, "step", fmt, DS_SRC)
    opt_params = r.ds.get("optimizer", {}).get("params", {})
    torch_adam = bool(opt_params.get("torch_adam"))
    if cfg.train.optimizer == "adamw" and torch_adam and opt_params.get("fused"):
        add("step_temp", "optimizer temporaries", 0, "step",
            "torch AdamW (fused): one kernel updates each group's tensors in place, no temporaries",
            "torch/optim/adam.py _fused_adam")
    elif cfg.train.optimizer == "adamw" and torch_adam and r.device == "cpu":
        biggest = st.opt_elems if stage else max((p.numel for p in inv.params if p.trainable), default=0)
        add("step_temp", "optimizer temporaries", 8 * biggest, "step",
            "torch AdamW (single tensor): sqrt and division of the largest state tensor, 2 x 4 B",
            "torch/optim/adamw.py _single_tensor_adamw")
    elif cfg.train.optimizer == "adamw" and torch_adam:
        add("step_temp", "optimizer temporaries", 4 * st.opt_elems, "step",
            "torch AdamW (foreach on GPU): one fp32 temporary per state tensor (sqrt of v)",
            "torch/optim/adamw.py _multi_tensor_adamw")
    return terms


def _peak(terms: list[Term]) -> tuple[str, int]:
    """(the moment holding the most, the tensor bytes then): a moment of the training step, or
    the load (terms of phase "load" alone: before deepspeed.initialize nothing else exists)."""
    static = sum(t.bytes for t in terms if t.phase == "static")
    moments = {m: static + sum(t.bytes for t in terms if m in t.phase.split()) for m in MOMENTS}
    if any(t.phase == "load" for t in terms):
        moments["load"] = sum(t.bytes for t in terms if t.phase == "load")
    worst = max(moments, key=lambda m: moments[m])
    return worst, moments[worst]


def _load_terms(r: _Setting) -> list[Term]:
    """A quantized base at ZeRO-3 on GPUs: transformers skips zero.Init for quantized models
    (modeling_utils: `is_deepspeed_zero3_enabled() and not _is_quantized`) and the ranks load it
    with device_map {"": their GPU} (launcher/model/quantize.py load_kwargs), so every rank holds the
    whole quantized model until deepspeed.initialize partitions it (DeepSpeedZeRoOffload
    `_convert_to_zero_parameters`, parameter by parameter)."""
    cfg, inv = r.cfg, r.inv
    if r.device != "cuda" or r.stage != 3 or cfg.quantization.mode == "none":
        return []
    transient = inv.lp_bytes * max((p.numel for p in inv.params if p.quant != "none"), default=0)
    return [Term("load_whole", "quantized model loaded whole (before ZeRO-3 partitions it)",
                 inv.weight_bytes, "load",
                 "every parameter as stored (quantized weights packed, the rest lp) + buffers: "
                 "from_pretrained puts the whole model on each rank's GPU",
                 "transformers modeling_utils (no zero.Init when quantized); launcher/model/quantize.py "
                 "device_map; deepspeed parameter_offload._convert_to_zero_parameters"),
            Term("load_transient", "weight being quantized", transient, "load",
                 "lp x the largest quantized weight: read in lp, then quantized on the GPU (its "
                 "ZeRO-3 partition, made later, is smaller)",
                 "transformers quantizers (param by param); deepspeed _zero_init_param")]


def _overhead_terms(r: _Setting, peak: int, kernels: int | None) -> list[Term]:
    """Memory outside the tensor peak: the runtime (CUDA context and NCCL's communicators, or a
    CPU rank's kernels and gloo) and the allocator's slack over the peak."""
    cfg, device = r.cfg, r.device
    terms: list[Term] = []
    add = _adder(terms)
    if device == "cuda":
        add("runtime", "CUDA context and cuBLAS workspaces", CUDA_CONTEXT, "overhead",
            "constant: the driver's context and loaded kernels (outside torch's allocator: in "
            "nvidia-smi, not in max_memory_reserved) + cuBLAS/cuBLASLt workspaces (in reserved)",
            "estimate for sm80/sm90, CUDA 12 lazy module loading; docs/gpu-results.md")
        comms = nccl_communicators(r.stage, r.world, r.zero)
        lo, hi = nccl_range()
        terms.append(Term(
            "nccl", f"NCCL communicators ({len(comms)} x {gib(lo)}-{gib(hi)})", len(comms) * hi,
            "overhead", (f"{len(comms)} communicator(s) this rank joins: " + "; ".join(comms)
                         if comms else "one rank: no NCCL peers") + "; each holds its channels' "
            "buffers (NCCL_BUFFSIZE 4 MiB x protocols x channels x peers, NVLS buffers on "
            "NVSwitch nodes), counted at the upper end",
            "deepspeed 0.19 utils/groups.py (_clone_world_group, _create_zero_param_parallel_group),"
            " runtime/zero/partition_parameters.py (ds_process_group = world); sizes: NCCL "
            "docs and reports from NVLink nodes, to confirm on a GPU run", low=len(comms) * lo))
        frac, how = cuda_slack(cfg.cluster.env)
        add("allocator", "allocator slack", int(frac * peak), "overhead",
            f"{frac:.0%} of the tensor peak: the caching allocator's fragmentation, {how} "
            "(max_memory_reserved - max_memory_allocated)", "estimate; docs/gpu-results.md")
    else:
        terms += cpu_runtime_terms(cfg, kernels)
        if CPU_FRAGMENTATION:
            add("allocator", "malloc slack", int(CPU_FRAGMENTATION * peak), "overhead",
                f"{CPU_FRAGMENTATION:.0%} of the tensor peak", "bench/plan_vs_measured.py")
    return terms


def _notes(r: _Setting) -> list[str]:
    notes = list(r.inv.notes)
    if r.device == "cpu":
        notes.append("train.device cpu: per-rank figures are each rank process's memory above "
                     "its baseline (after imports and first use of the code); measured with "
                     "MALLOC_MMAP_THRESHOLD_=65536, without it glibc keeps freed activations and "
                     "ranks peak up to 2x higher (docs/memory.md)")
    if r.cfg.quantization.mode != "none" and r.stage == 3:
        notes.append("ZeRO-3 with a quantized base: weights counted as partitioned while "
                     "training; every rank first loads the whole quantized model (the load terms)")
    if r.device == "cuda" and r.cfg.data.packing and resolved_kernel(
            r.inv.shape.model_type, r.cfg.model.attn_implementation) != "flash_attention_2":
        notes.append("packed rows under sdpa/eager carry a (b, 1, s, s) mask: flash is off, k/v "
                     "are repeated to every head and sdpa keeps a copy of the mask per block "
                     "(counted); model.attn_implementation: flash_attention_2 packs without a "
                     "mask (varlen), if the flash_attn package is installed on the nodes")
    return notes


def plan_text(cfg: RunConfig, gpu_memory: str | int | None = None,
              world_size: int | None = None, kernels: int | None = None) -> str:
    """The plan's text: what `ftlaunch plan`, `run --dry-run` and plan.txt show."""
    return render(plan(cfg, gpu_memory, world_size, kernels=kernels))


def checked_text(p: Plan, force: bool = False, what: str = "run") -> str:
    """The plan's text; a ConfigError carrying it when the plan does not fit and force is off
    (`what`: the run, or the job `ftlaunch slurm` would submit)."""
    text = render(p)
    if not p.fits and not force:
        where = " and ".join(w for w, ok in (("per GPU", p.fits_gpu), ("per node", p.fits_node))
                             if ok is False)
        raise ConfigError([Problem("cluster", f"the memory plan says the {what} does not fit {where}:\n"
                                   + text, "change what the plan suggests, or pass --force to "
                                   + ("submit" if what == "job" else "run") + " anyway")],
                          "memory plan")
    return text


@dataclass(frozen=True)
class PlanCall:
    """What `ftlaunch plan` was asked: the run file and overrides, sizes, output form, the probe."""
    run_file: str
    overrides: tuple[str, ...] = ()
    gpu_memory: str | None = None
    node_memory: str | None = None
    json: bool = False
    explain: bool = False
    probe: bool = False
    max_seq_len: bool = False   # also the longest sequence that fits (launcher/memory/longseq.py)


def main(call: PlanCall) -> int:
    """`ftlaunch plan`: 0 fits, 1 does not (a ConfigError is the caller's: exit 2)."""
    cfg = runfile.load(call.run_file, call.overrides)
    kernels = None
    if call.probe and cfg.train.device == "cpu":
        from launcher.memory.probe import measure
        kernels = measure(cfg)
    p = plan(cfg, call.gpu_memory, kernels=kernels,
             node_memory=call.node_memory)
    if call.json:   # + the time estimate (launcher/memory/clock.py)
        sys.stdout.write(json.dumps({**p.to_dict(), "time": plan_section(cfg)[1]}, indent=2) + "\n")
    else:
        sys.stdout.write(render(p, explain=call.explain) + plan_section(cfg)[0])
    if call.max_seq_len:
        sys.stdout.write(render_max_seq_len(p))
    return 0 if p.fits else 1
