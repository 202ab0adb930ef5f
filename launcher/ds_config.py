"""Preset from ds_configs/ + run config -> the complete DeepSpeed config: no "auto" left.

Three layers, later wins: the preset (tuning knobs only), the keys the launcher fills from the
run file (FILLED below: the table from run-file fields to DeepSpeed keys), then the user's
`deepspeed.overrides`. Overrides are checked: unknown keys (DeepSpeed silently ignores them),
"auto" values (DeepSpeed silently drops them) and keys owned by a run-file field are refused.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterator

from launcher.config import RunConfig
from launcher.errors import Problem, did_you_mean
from launcher.validate import batch_sizes

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")

# DeepSpeed key (dotted) -> the run-file field that decides it.
FILLED: dict[str, str] = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "fp16": "model.dtype",
    "bf16": "model.dtype",
    "optimizer": "train.optimizer / lr / betas / eps / weight_decay",
    "scheduler": "train.scheduler / warmup_steps / max_steps / min_lr_ratio",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
    "zero_allow_untested_optimizer": "train.optimizer",
    "seed": "train.seed",
}

# Top-level keys DeepSpeed 0.19 reads (an unknown one is ignored by DeepSpeed without a word).
KNOWN_TOP = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "zero_optimization", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "communication_data_type",
    "seq_parallel_communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "gradient_allreduce_op", "sparse_gradients", "flops_profiler", "tensorboard", "wandb",
    "csv_monitor", "comet", "comms_logger", "checkpoint", "data_types", "dump_state",
    "memory_breakdown", "aio", "elasticity", "compression_training", "torch_autocast", "amp",
    "disable_allgather", "dataloader_drop_last", "timers", "compile", "data_efficiency",
    "curriculum_learning", "autotuning", "nebula", "pipeline", "sparse_attention",
    "disable_python_gc", "log_level", "use_data_before_expert_parallelism",
    "managed_gradient_accumulation", "tensor_parallel", "weight_quantization", "hybrid_engine",
    "check_overflow", "graph_harvesting", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "zero_optimization_stage", "seed",
}
# Keys of zero_optimization in DeepSpeed 0.19 (DeepSpeedZeroConfig fields and aliases).
KNOWN_ZERO = {
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
    "use_multi_rank_bucket_allreduce", "allgather_partitions", "allgather_bucket_size",
    "overlap_comm", "compute_grad_norm", "load_from_fp32_weights", "elastic_checkpoint",
    "offload_param", "offload_optimizer", "zenflow", "sub_group_size", "cpu_offload_param",
    "cpu_offload_use_pin_memory", "cpu_offload", "prefetch_bucket_size",
    "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold",
    "stage3_model_persistence_threshold", "max_live_parameters", "stage3_max_live_parameters",
    "max_reuse_distance", "stage3_max_reuse_distance", "gather_16bit_weights_on_model_save",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "module_granularity_threshold", "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential", "stage3_allgather_sequential", "ignore_unused_parameters",
    "legacy_stage1", "round_robin_gradients", "parameter_alignment", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
    "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "enable_sanity_checks", "save_muon_momentum_buffer_in_memory",
    "leaf_module",
}


def preset_name(cfg: RunConfig) -> str:
    """The preset used: deepspeed.preset, or zero{stage}[_offload]."""
    ds = cfg.deepspeed
    if ds.preset:
        return ds.preset
    offload = "none" != ds.offload_optimizer or "none" != ds.offload_param
    name = f"zero{ds.zero_stage}" + ("_offload" if offload and ds.zero_stage >= 2 else "")
    return name


def presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    path = os.path.join(PRESET_DIR, f"{name}.json")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        out["nvme_path"] = nvme_path
    return out


def filled(cfg: RunConfig, world_size: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The keys the launcher decides from the run file (see FILLED)."""
    t, ds = cfg.train, cfg.deepspeed
    micro, accum, global_batch = batch_sizes(cfg, world_size)
    device = device or ("cpu" if t.device == "cpu" else "cuda")
    out: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": ({"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
                 if cfg.model.dtype == "fp16" else {"enabled": False}),
        "seed": t.seed,
    }
    if t.optimizer == "adamw":
        params: dict[str, Any] = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                  "weight_decay": t.weight_decay}
        if device == "cpu" and ds.offload_optimizer == "none":
            params["torch_adam"] = True  # fused_adam is a CUDA kernel; torch's AdamW on CPU
        out["optimizer"] = {"type": "AdamW", "params": params}
        out["zero_allow_untested_optimizer"] = False
    else:
        # bitsandbytes' 8-bit optimizer is built by the ranks and passed to deepspeed.initialize
        out["zero_allow_untested_optimizer"] = True
    warm = max(1, t.warmup_steps)
    if t.scheduler == "constant":
        out["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": warm,
            "warmup_type": "linear"}}
    elif t.scheduler == "linear":
        out["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": t.max_steps, "warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
            "warmup_num_steps": warm, "warmup_type": "linear"}}
    else:
        out["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": t.max_steps, "warmup_min_ratio": 0.0, "warmup_num_steps": warm,
            "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear"}}
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.offload_param != "none":
        zero["offload_param"] = _offload(ds.offload_param, ds.nvme_path)
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    out["zero_optimization"] = zero
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, top wins; neither input is modified."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def find_auto(tree: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys whose value is the string "auto"."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from find_auto(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from find_auto(v, f"{prefix}[{i}]")
    elif isinstance(tree, str) and tree.strip().lower() == "auto":
        yield prefix


def override_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Problems with deepspeed.overrides and deepspeed.preset."""
    if cfg.deepspeed.preset and cfg.deepspeed.preset not in presets():
        hint = did_you_mean(cfg.deepspeed.preset, presets())
        yield Problem("deepspeed.preset", f"no preset {cfg.deepspeed.preset!r} in ds_configs/",
                      hint or f"use one of: {', '.join(presets())}")
    ov = cfg.deepspeed.overrides
    for key in find_auto(ov):
        yield Problem(f"deepspeed.overrides.{key}", '"auto" is not resolved by DeepSpeed outside '
                      "the HF Trainer and would be dropped", "give a concrete value")
    for k, v in ov.items():
        if k not in KNOWN_TOP:
            hint = did_you_mean(k, KNOWN_TOP)
            yield Problem(f"deepspeed.overrides.{k}", "not a DeepSpeed config key (DeepSpeed would "
                          "ignore it silently)", hint or "remove it")
        elif k in FILLED and k not in ("fp16", "bf16"):
            yield Problem(f"deepspeed.overrides.{k}", f"set by the launcher from {FILLED[k]}",
                          f"set {FILLED[k].split(' /')[0]} in the run file instead")
        elif k in ("fp16", "bf16") and isinstance(v, dict):
            pass  # precision agreement is checked in validate._precision; loss-scale knobs allowed
    zero = ov.get("zero_optimization")
    if isinstance(zero, dict):
        for k in zero:
            dotted = f"zero_optimization.{k}"
            if k not in KNOWN_ZERO:
                hint = did_you_mean(k, KNOWN_ZERO)
                yield Problem(f"deepspeed.overrides.{dotted}", "not a zero_optimization key",
                              hint or "remove it")
            elif dotted in FILLED:
                yield Problem(f"deepspeed.overrides.{dotted}", f"set by the launcher from {FILLED[dotted]}",
                              f"set {FILLED[dotted]} in the run file instead")
    elif zero is not None:
        yield Problem("deepspeed.overrides.zero_optimization", "must be a mapping",
                      "write zero_optimization: {key: value}")


def build(cfg: RunConfig, world_size: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The complete DeepSpeed config for cfg on world_size ranks ("cuda" or "cpu" device)."""
    out = merge(merge(load_preset(preset_name(cfg)), filled(cfg, world_size, device)),
                cfg.deepspeed.overrides)
    left = list(find_auto(out))
    if left:  # a preset with "auto" is a bug in ds_configs/, overrides were checked earlier
        raise ValueError(f'"auto" left in the DeepSpeed config at: {", ".join(left)}')
    return out


def dumps(ds: dict[str, Any]) -> str:
    return json.dumps(ds, indent=2, sort_keys=False) + "\n"
