"""Preset from ds_configs/ + run config -> the complete DeepSpeed config: no "auto" left.

Three layers, later wins: the preset (tuning knobs only), the keys the launcher fills from the
run file (FILLED below: the table from run-file fields to DeepSpeed keys), then the user's
`deepspeed.overrides`. A user's own JSON file (`deepspeed.config_file`) takes the place of the
first two: taken as written, "auto" resolved as the HF Trainer does and only the run file's keys
set in it (launcher/dsconfig/user_file.py). Overrides are checked here, on the login node, against the tables of the
keys DeepSpeed 0.19 reads (launcher/dsconfig/keys.py, re-exported here): unknown keys (DeepSpeed
ignores a misspelt top-level key
without a word), "auto" values (DeepSpeed silently drops them), keys removed from DeepSpeed,
wrong types and ranges, keys owned by a run-file field, and the combinations DeepSpeed would
only refuse on the ranks. Alias names (`prefetch_bucket_size` / `stage3_prefetch_bucket_size`,
`bfloat16` / `bf16`) are written in one form, so a preset and an override never name the same
setting twice.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterator

from launcher.config import epochs
from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError, Problem, did_you_mean
from launcher.config.batch import batch_problem, batch_sizes
from launcher.model.device import job_device
from launcher.dsconfig.keys import (  # noqa: F401  (the tables, re-exported for callers)
    FILLED, LAUNCHER_DEFAULTS, TOP_KEYS, ZERO_KEYS, BF16_KEYS, FP16_KEYS,
    OFFLOAD_PARAM_KEYS, OFFLOAD_OPTIMIZER_KEYS, SECTIONS, KNOWN_TOP, KNOWN_ZERO, REMOVED_TOP,
    REMOVED_ZERO, UNSUPPORTED_TOP, check_value, normalise, find_auto, key_problems)

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ds_configs")

def preset_name(cfg: RunConfig) -> str:
    """The preset used: deepspeed.preset, else zero3_nvme for NVMe offload (ZeRO-3 only), else
    zero{stage}[_offload]."""
    ds = cfg.deepspeed
    if ds.preset:
        return ds.preset
    if "nvme" in (ds.offload_optimizer, ds.offload_param) and ds.zero_stage == 3:
        return "zero3_nvme"
    offload = "none" != ds.offload_optimizer or "none" != ds.offload_param
    return f"zero{ds.zero_stage}" + ("_offload" if offload and ds.zero_stage >= 2 else "")


def model_sized(cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """Keys sized from the model's config.json (torch-free), between the preset and the run
    file's keys (overrides may change them). ZeRO-3: the HF Trainer's bucket rules
    (transformers/integrations/deepspeed.py `trainer_config_finalize`: reduce_bucket_size h x h,
    stage3_prefetch_bucket_size 0.9 h x h, stage3_param_persistence_threshold 10 h). NVMe
    parameter offload: offload_param.buffer_size at least the largest parameter's partition
    (DeepSpeed asserts every swapped partition fits one buffer)."""
    from launcher.model import info as model_info
    ds = cfg.deepspeed
    mc = model_info.model_config(cfg.model.path)
    h = model_info.hidden_size(mc) if mc else None
    if ds.zero_stage != 3 or h is None:
        return {}
    zero: dict[str, Any] = {"reduce_bucket_size": h * h,
                            "stage3_prefetch_bucket_size": int(0.9 * h * h),
                            "stage3_param_persistence_threshold": 10 * h}
    largest = model_info.largest_matrix(mc) if mc else None
    if ds.offload_param == "nvme" and largest:
        world = world_size or cfg.world_size
        zero["offload_param"] = {"buffer_size": max(10**8, -(-largest // world))}
    return {"zero_optimization": zero}


def presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    path = os.path.join(PRESET_DIR, f"{name}.json")
    with open(path, encoding="utf-8") as fh:
        return normalise(json.load(fh))


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        out["nvme_path"] = nvme_path
    return out


def filled(cfg: RunConfig, world_size: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The keys the launcher decides from the run file (see FILLED)."""
    t, ds = cfg.train, cfg.deepspeed
    micro, accum, global_batch = batch_sizes(cfg, world_size)
    device = device or job_device(cfg)
    out: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": ({"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
                 if cfg.model.dtype == "fp16" else {"enabled": False}),
    }
    if t.optimizer == "adamw":
        params: dict[str, Any] = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                  "weight_decay": t.weight_decay}
        if ds.offload_optimizer == "none":
            # torch's AdamW, never DeepSpeed's FusedAdam: that one is CUDA code JIT-compiled with
            # nvcc at first use, on every rank at once. On GPUs torch's own fused kernel (built
            # into torch, no compiler); on CPU ranks the default (single-tensor) implementation.
            params["torch_adam"] = True
            if device != "cpu":
                params["fused"] = True
        out["optimizer"] = {"type": "AdamW", "params": params}
        out["zero_allow_untested_optimizer"] = False
    else:
        # bitsandbytes' 8-bit optimizer is built by the ranks and passed to deepspeed.initialize
        out["zero_allow_untested_optimizer"] = True
    steps, _ = epochs.planned_steps(cfg, world_size)
    warm = max(1, epochs.warmup_steps(cfg, steps))
    if t.scheduler == "constant":
        out["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": warm,
            "warmup_type": "linear"}}
    elif t.scheduler == "linear":
        out["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": steps, "warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
            "warmup_num_steps": warm, "warmup_type": "linear"}}
    else:
        out["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": steps, "warmup_min_ratio": 0.0, "warmup_num_steps": warm,
            "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear"}}
    if t.sequence_parallel > 1:  # zero.Init's batch check before the ranks pass the groups
        out["sequence_parallel_size"] = t.sequence_parallel
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


def override_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Problems with deepspeed.overrides and deepspeed.preset on their own: unknown, removed,
    launcher-owned keys, wrong types and ranges, "auto"."""
    ds = cfg.deepspeed
    if ds.preset and ds.preset not in presets():
        hint = did_you_mean(ds.preset, presets())
        yield Problem("deepspeed.preset", f"no preset {ds.preset!r} in ds_configs/",
                      hint or f"use one of: {', '.join(presets())}")
    for key in find_auto(ds.overrides):
        yield Problem(f"deepspeed.overrides.{key}", '"auto" is not resolved by DeepSpeed outside '
                      "the HF Trainer and would be dropped silently", "give a concrete value")
    yield from key_problems(ds.overrides, "")


def override_cross_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Overrides that are fine alone but that DeepSpeed refuses with this run file (on the
    ranks, after the queue wait), or that would do nothing."""
    ov = normalise(cfg.deepspeed.overrides)
    ds, stage = cfg.deepspeed, cfg.deepspeed.zero_stage
    zero = ov.get("zero_optimization") if isinstance(ov.get("zero_optimization"), dict) else {}
    key = "deepspeed.overrides.zero_optimization"
    if zero.get("compute_grad_norm") is False:
        if stage not in (1, 2):
            yield Problem(f"{key}.compute_grad_norm", f"false is supported only with ZeRO stage 1 "
                          f"or 2 (zero_stage is {stage})", "remove it or set deepspeed.zero_stage: 1/2")
        if cfg.train.grad_clip > 0:
            yield Problem(f"{key}.compute_grad_norm", "false needs gradient clipping off",
                          "set train.grad_clip: 0")
        if ds.offload_optimizer != "none":
            yield Problem(f"{key}.compute_grad_norm", "false does not work with optimizer offload",
                          "remove it or set deepspeed.offload_optimizer: none")
    for part, field_ in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        sub = zero.get(part)
        if isinstance(sub, dict) and sub and field_ == "none":
            yield Problem(f"{key}.{part}", f"tunes {part}, but deepspeed.{part} is none",
                          f"set deepspeed.{part}: cpu or nvme, or remove these keys")
    opt = zero.get("offload_optimizer") if isinstance(zero.get("offload_optimizer"), dict) else {}
    for name in ("ratio", "super_offload"):
        value = opt.get(name)
        partial = name == "ratio" and isinstance(value, (int, float)) and value < 1
        if (partial or (name == "super_offload" and value is True)) and stage != 3:
            yield Problem(f"{key}.offload_optimizer.{name}", f"only with ZeRO stage 3 (zero_stage "
                          f"is {stage})", "remove it or set deepspeed.zero_stage: 3")
    fp16 = ov.get("fp16") if isinstance(ov.get("fp16"), dict) else {}
    bf16 = ov.get("bf16") if isinstance(ov.get("bf16"), dict) else {}
    for block, name in ((fp16, "fp16.fp16_master_weights_and_grads"),
                        (bf16, "bf16.bf16_master_weights_and_grads"),
                        (bf16, "bf16.bf16_optimizer_states")):
        if block.get(name.split(".")[1]) is True and stage == 0:
            yield Problem(f"deepspeed.overrides.{name}", "only with ZeRO stage 1, 2 or 3",
                          "remove it or set deepspeed.zero_stage")
    if bf16.get("bf16_optimizer_states") is True and bf16.get("bf16_master_weights_and_grads") is not True:
        yield Problem("deepspeed.overrides.bf16.bf16_optimizer_states", "needs "
                      "bf16.bf16_master_weights_and_grads: true", "set both, or neither")
    aio = ov.get("aio") if isinstance(ov.get("aio"), dict) else {}
    if aio.get("use_gds") is True and cfg.train.device != "cuda":
        yield Problem("deepspeed.overrides.aio.use_gds", "GPUDirect Storage needs CUDA ranks "
                      f"(DeepSpeed asserts it; train.device is {cfg.train.device})",
                      "set train.device: cuda, or remove use_gds")
    op = ov.get("gradient_allreduce_op")
    if op == "sum":
        compile_ = ov.get("compile") if isinstance(ov.get("compile"), dict) else {}
        for why, bad in (("ZeRO stage 3", stage == 3), ("ZenFlow", zero.get("zenflow") is not None),
                         ("DeepCompile", bool(compile_.get("deepcompile")))):
            if bad:
                yield Problem("deepspeed.overrides.gradient_allreduce_op",
                              f"'sum' is not supported with {why}", "use mean (the default)")


def build(cfg: RunConfig, world_size: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The complete DeepSpeed config for cfg on world_size ranks ("cuda" or "cpu" device).

    Raises ConfigError if the batch arithmetic does not work for world_size.
    """
    bad = batch_problem(cfg, world_size)
    if bad is not None:
        raise ConfigError([bad], "ds-config")
    decided = filled(cfg, world_size, device)
    if cfg.deepspeed.config_file:  # the user's JSON as written, "auto" and the run file's keys set
        from launcher.dsconfig import user_file as ds_file
        out = ds_file.apply(ds_file.base(cfg, world_size), decided)
    else:
        out = merge(merge(load_preset(preset_name(cfg)), model_sized(cfg, world_size)), decided)
    out = merge(out, normalise(cfg.deepspeed.overrides))
    out = _ordered(out, list(decided))  # the decided keys first, for a reader of the JSON
    if isinstance(out.get("zero_optimization"), dict):
        out["zero_optimization"] = _ordered(out["zero_optimization"], ["stage"])
    left = list(find_auto(out))
    if left:  # a preset with "auto" is a bug in ds_configs/, overrides were checked earlier
        raise ValueError(f'"auto" left in the DeepSpeed config at: {", ".join(left)}')
    return out


def _ordered(tree: dict[str, Any], first: list[str]) -> dict[str, Any]:
    return {**{k: tree[k] for k in first if k in tree}, **{k: v for k, v in tree.items() if k not in first}}


def dumps(ds: dict[str, Any]) -> str:
    return json.dumps(ds, indent=2, sort_keys=False) + "\n"
