"""Preset from ds_configs/ + run config -> the complete DeepSpeed config: no "auto" left.

Three layers, later wins: the preset (tuning knobs only; or the user's own JSON file,
`deepspeed.config_file`, "auto" resolved as the HF Trainer does: launcher/ds_file.py), the keys the launcher fills from the
run file (FILLED below: the table from run-file fields to DeepSpeed keys), then the user's
`deepspeed.overrides`. Overrides are checked here, on the login node, against tables of the
keys DeepSpeed 0.19 reads (TOP_KEYS, ZERO_KEYS, ...; tests/test_ds_config.py keeps them equal
to DeepSpeed's own pydantic models): unknown keys (DeepSpeed ignores a misspelt top-level key
without a word), "auto" values (DeepSpeed silently drops them), keys removed from DeepSpeed,
wrong types and ranges, keys owned by a run-file field, and the combinations DeepSpeed would
only refuse on the ranks. Alias names (`prefetch_bucket_size` / `stage3_prefetch_bucket_size`,
`bfloat16` / `bf16`) are written in one form, so a preset and an override never name the same
setting twice.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from typing import Any, Iterator

from launcher import epochs
from launcher.config import RunConfig
from launcher.errors import ConfigError, Problem, did_you_mean
from launcher.batch import batch_problem, batch_sizes

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")

# DeepSpeed key (dotted) -> the run-file field that decides it.
FILLED: dict[str, str] = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "fp16.enabled": "model.dtype",
    "bf16.enabled": "model.dtype",
    "optimizer": "train.optimizer / lr / betas / eps / weight_decay (+ torch_adam on CPU ranks)",
    "scheduler": "train.scheduler / warmup_steps / max_steps / min_lr_ratio",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_optimizer.nvme_path": "deepspeed.nvme_path",
    "zero_optimization.offload_param.device": "deepspeed.offload_param",
    "zero_optimization.offload_param.nvme_path": "deepspeed.nvme_path",
    "zero_allow_untested_optimizer": "train.optimizer",
}

# Defaults the launcher writes that are not run-file fields; overrides may change them.
LAUNCHER_DEFAULTS: dict[str, Any] = {
    "fp16.loss_scale": 0, "fp16.initial_scale_power": 16, "fp16.loss_scale_window": 1000,
    "fp16.hysteresis": 2, "fp16.min_loss_scale": 1,
    "zero_optimization.offload_optimizer.pin_memory": True,
    "zero_optimization.offload_param.pin_memory": True,
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": True,
}

# Value specs: kind [?=null allowed] [bounds]; kinds: bool int float str path mapping choice(a|b).
# "section": its keys have a table below; "filled": set from the run file (see FILLED);
# "alias:X": the same setting as X; "deprecated:X": DeepSpeed wants X instead.
TOP_KEYS: dict[str, str] = {
    "train_batch_size": "filled", "train_micro_batch_size_per_gpu": "filled",
    "gradient_accumulation_steps": "filled", "gradient_clipping": "filled",
    "optimizer": "filled", "scheduler": "filled", "zero_allow_untested_optimizer": "filled",
    "fp16": "section", "bf16": "section", "bfloat16": "alias:bf16", "zero_optimization": "section",
    "steps_per_print": "int>0", "wall_clock_breakdown": "bool", "memory_breakdown": "bool",
    "dump_state": "bool", "disable_allgather": "bool", "prescale_gradients": "bool",
    "gradient_predivide_factor": "float>0", "gradient_allreduce_op": "choice(mean|sum)",
    "communication_data_type": "choice(fp32|fp16|bf16)?",
    "seq_parallel_communication_data_type": "choice(fp32|fp16|bf16)?",
    "dataloader_drop_last": "bool", "log_level": "choice(debug|info|warning|error|critical)?",
    "use_data_before_expert_parallelism": "bool", "disable_python_gc": "bool",
    "zero_force_ds_cpu_optimizer": "bool", "vocabulary_size": "int?>0",
    "managed_gradient_accumulation": "bool",
    # blocks whose contents DeepSpeed checks itself (on the ranks)
    **{k: "mapping" for k in (
        "activation_checkpointing", "aio", "autotuning", "checkpoint", "comet", "comms_logger",
        "compile", "csv_monitor", "data_efficiency", "data_types", "datastates_ckpt",
        "expert_parallel", "flops_profiler", "hybrid_engine", "pipeline", "tensor_parallel",
        "tensorboard", "timers", "torch_autocast", "wandb", "weight_quantization")},
}

# Top-level keys DeepSpeed 0.19 refuses (removed features), and ones the launcher cannot honour.
REMOVED_TOP = {"nebula", "compression_training", "amp", "quantize_training", "sparse_gradients",
               "eigenvalue", "sparse_attention", "elasticity", "graph_harvesting",
               "curriculum_learning", "progressive_layer_drop"}
REMOVED_ZERO = {"mics_shard_size", "mics_hierarchical_params_gather", "zeropp_loco_param"}
UNSUPPORTED_TOP = {"sequence_parallel_size": "sequence parallelism changes the data-parallel world "
                   "size the batch arithmetic is done for; the launcher trains data-parallel only"}

# zero_optimization: DeepSpeedZeroConfig fields (by their JSON name) and aliases.
ZERO_KEYS: dict[str, str] = {
    "stage": "choice(0|1|2|3)", "contiguous_gradients": "bool", "reduce_scatter": "bool",
    "reduce_bucket_size": "int>0", "use_multi_rank_bucket_allreduce": "bool",
    "allgather_partitions": "bool", "allgather_bucket_size": "int>=0", "overlap_comm": "bool?",
    "compute_grad_norm": "bool", "load_from_fp32_weights": "bool", "elastic_checkpoint": "bool",
    "offload_param": "section", "offload_optimizer": "section", "zenflow": "mapping?",
    "sub_group_size": "int>=0",
    "cpu_offload_param": "deprecated:offload_param",
    "cpu_offload_use_pin_memory": "deprecated:offload_param or offload_optimizer",
    "cpu_offload": "deprecated:offload_optimizer",
    "stage3_prefetch_bucket_size": "int>=0", "prefetch_bucket_size": "alias:stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold": "int>=0",
    "param_persistence_threshold": "alias:stage3_param_persistence_threshold",
    "stage3_model_persistence_threshold": "int>=0",
    "model_persistence_threshold": "alias:stage3_model_persistence_threshold",
    "stage3_max_live_parameters": "int>=0", "max_live_parameters": "alias:stage3_max_live_parameters",
    "stage3_max_reuse_distance": "int>=0", "max_reuse_distance": "alias:stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save": "bool",
    "gather_16bit_weights_on_model_save": "alias:stage3_gather_16bit_weights_on_model_save",
    "stage3_module_granularity_threshold": "int",
    "module_granularity_threshold": "alias:stage3_module_granularity_threshold",
    "stage3_use_all_reduce_for_fetch_params": "bool",
    "use_all_reduce_for_fetch_params": "alias:stage3_use_all_reduce_for_fetch_params",
    "stage3_allgather_sequential": "bool", "allgather_sequential": "alias:stage3_allgather_sequential",
    "stage3_gather_fp16_weights_on_model_save": "deprecated:gather_16bit_weights_on_model_save",
    "ignore_unused_parameters": "bool", "legacy_stage1": "bool", "round_robin_gradients": "bool",
    "parameter_alignment": "bool", "zero_hpz_partition_size": "int>=0",
    "zero_quantized_weights": "bool", "zero_quantized_nontrainable_weights": "bool",
    "zero_quantized_gradients": "bool", "memory_efficient_linear": "bool",
    "pipeline_loading_checkpoint": "bool", "override_module_apply": "bool",
    "log_trace_cache_warnings": "bool", "enable_sanity_checks": "bool",
    "save_muon_momentum_buffer_in_memory": "bool", "leaf_module": "mapping",
}
OFFLOAD_PARAM_KEYS: dict[str, str] = {
    "device": "choice(none|cpu|nvme)", "nvme_path": "path?", "buffer_count": "int>=0",
    "buffer_size": "int>=0", "max_in_cpu": "int>=0", "pin_memory": "bool",
}
OFFLOAD_OPTIMIZER_KEYS: dict[str, str] = {
    "device": "choice(none|cpu|nvme)", "nvme_path": "path?", "buffer_count": "int>=0",
    "pin_memory": "bool", "pipeline_read": "bool", "pipeline_write": "bool", "fast_init": "bool",
    "ratio": "float>=0.0<=1.0", "super_offload": "bool", "cpuadam_cores_perc": "float>=0.0<=1.0",
}
# fp16: loss_scale, loss_scale_window and min_loss_scale are stricter than the pydantic types:
# DeepSpeed's validators refuse negative / zero values there too.
FP16_KEYS: dict[str, str] = {
    "enabled": "bool", "auto_cast": "bool", "loss_scale": "float>=0", "initial_scale_power": "int",
    "loss_scale_window": "int>0", "hysteresis": "int", "consecutive_hysteresis": "bool",
    "min_loss_scale": "int>0", "fp16_master_weights_and_grads": "bool",
}
BF16_KEYS: dict[str, str] = {
    "enabled": "bool", "immediate_grad_update": "bool", "check_grad_overflow": "bool",
    "bf16_master_weights_and_grads": "bool", "bf16_optimizer_states": "bool",
}
SECTIONS: dict[str, dict[str, str]] = {
    "": TOP_KEYS, "fp16": FP16_KEYS, "bf16": BF16_KEYS, "zero_optimization": ZERO_KEYS,
    "zero_optimization.offload_param": OFFLOAD_PARAM_KEYS,
    "zero_optimization.offload_optimizer": OFFLOAD_OPTIMIZER_KEYS,
}
# Kept for callers that only need the names.
KNOWN_TOP = frozenset(TOP_KEYS)
KNOWN_ZERO = frozenset(ZERO_KEYS)

_SPEC = re.compile(r"(?P<kind>bool|int|float|str|path|mapping|choice\((?P<choices>[^)]*)\))"
                   r"(?P<null>\?)?(?P<bounds>(?:(?:>=|<=|>|<)-?[0-9.]+)*)")


def check_value(spec: str, value: Any) -> str | None:
    """None if value fits the spec, else what is wrong (for a Problem message)."""
    m = _SPEC.fullmatch(spec)
    assert m, f"bad spec {spec!r}"  # a bug in the tables above
    kind = m["kind"]
    if value is None:
        return None if m["null"] else "must not be null"
    if kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if kind == "mapping":
        return None if isinstance(value, dict) else f"expected a mapping, got {value!r}"
    if kind in ("str", "path"):
        if not isinstance(value, str) or (kind == "path" and not value.strip()):
            return f"expected a {'path' if kind == 'path' else 'string'}, got {value!r}"
        return None
    if kind.startswith("choice"):
        choices = m["choices"].split("|")
        text = value.lower() if isinstance(value, str) else value
        if isinstance(value, bool) or str(text) not in choices or (
                isinstance(value, float) and not value.is_integer()):
            return f"{value!r} is not one of {', '.join(choices)}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if kind == "int" and isinstance(value, float) and not value.is_integer():
        return f"expected an integer, got {value!r}"
    for op, bound in re.findall(r"(>=|<=|>|<)(-?[0-9.]+)", m["bounds"] or ""):
        b = float(bound)
        ok = {">": value > b, ">=": value >= b, "<": value < b, "<=": value <= b}[op]
        if not ok:
            return f"must be {op} {bound.rstrip('0').rstrip('.') if '.' in bound else bound}, got {value!r}"
    return None


def _coerce(spec: str, value: Any) -> Any:
    """An integral float given for an int key (5.0e+8) as an int; choices lower-cased."""
    if spec.startswith("int") and isinstance(value, float) and value.is_integer():
        return int(value)
    if spec.startswith("choice(0|") and isinstance(value, float):
        return int(value)
    if spec.startswith("choice") and isinstance(value, str):
        return value.lower()
    return value


def normalise(tree: dict[str, Any], section: str = "") -> dict[str, Any]:
    """A DeepSpeed config (or part of one) with alias keys renamed to one form and values
    coerced to their types; keys not in the tables are kept as they are."""
    table = SECTIONS.get(section)
    out: dict[str, Any] = {}
    for k, v in tree.items():
        spec = table.get(k, "") if table is not None else ""
        if spec.startswith("alias:"):
            k, spec = spec[6:], table[spec[6:]]  # type: ignore[index]
        sub = f"{section}.{k}" if section else k
        if isinstance(v, dict) and sub in SECTIONS:
            v = normalise(v, sub)
        elif spec and _SPEC.fullmatch(spec):
            v = _coerce(spec, v)
        out[k] = v
    return out


def preset_name(cfg: RunConfig) -> str:
    """The preset used: deepspeed.preset, or zero{stage}[_offload]."""
    ds = cfg.deepspeed
    if ds.preset:
        return ds.preset
    offload = "none" != ds.offload_optimizer or "none" != ds.offload_param
    return f"zero{ds.zero_stage}" + ("_offload" if offload and ds.zero_stage >= 2 else "")


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
            yield from find_auto(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from find_auto(v, f"{prefix}[{i}]")
    elif isinstance(tree, str) and tree.strip().lower() == "auto":
        yield prefix


# ------------------------------------------------------------------ checking overrides
def _key_problems(tree: dict[str, Any], section: str,
                  root: str = "deepspeed.overrides") -> Iterator[Problem]:
    table = SECTIONS[section]
    names: dict[str, str] = {}  # canonical name -> the key written
    for k, v in tree.items():
        dotted = f"{section}.{k}" if section else str(k)
        key = f"{root}.{dotted}"
        spec = table.get(k)
        if not isinstance(k, str) or spec is None:
            if section == "" and k in REMOVED_TOP:
                yield Problem(key, "removed from DeepSpeed (0.19 refuses the config)", "remove it")
            elif section == "" and k in UNSUPPORTED_TOP:
                yield Problem(key, UNSUPPORTED_TOP[k], "remove it")
            elif section == "zero_optimization" and k in REMOVED_ZERO:
                yield Problem(key, "removed from DeepSpeed (0.19 refuses the config)", "remove it")
            else:
                where = f"a {section} key" if section else "a DeepSpeed config key"
                yield Problem(key, f"not {where} (DeepSpeed would ignore or refuse it)",
                              did_you_mean(str(k), table) or "remove it")
            continue
        canonical = k
        if spec.startswith("alias:"):
            canonical, spec = spec[6:], table[spec[6:]]
        if canonical in names:
            yield Problem(key, f"the same setting as {names[canonical]!r}, given twice",
                          "keep one of the two names")
            continue
        names[canonical] = k
        sub = f"{section}.{canonical}" if section else canonical
        if spec.startswith("deprecated:"):
            yield Problem(key, f"deprecated in DeepSpeed; use {spec[11:]}",
                          "use deepspeed.offload_optimizer / offload_param in the run file"
                          if "offload" in spec else f"write {spec[11:]}")
        elif spec == "filled" or (sub in FILLED and sub not in ("fp16.enabled", "bf16.enabled")):
            yield Problem(key, f"set by the launcher from {FILLED[sub]}",
                          f"set {FILLED[sub].split(' /')[0]} in the run file instead")
        elif spec == "section":
            if not isinstance(v, dict):
                yield Problem(key, f"expected a mapping, got {v!r}", f"write {canonical}: {{key: value}}")
            else:
                yield from _key_problems(v, sub, root)
        elif not (isinstance(v, str) and v.strip().lower() == "auto"):  # "auto": reported already
            msg = check_value(spec, v)
            if msg:
                yield Problem(key, msg, f"give {_spec_words(spec)}")


def _spec_words(spec: str) -> str:
    m = _SPEC.fullmatch(spec)
    assert m
    kind = m["kind"]
    words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "path": "a path", "mapping": "a mapping"}.get(kind)
    if words is None:
        words = "one of " + ", ".join(m["choices"].split("|"))
    if m["bounds"]:
        words += " " + " and ".join(re.findall(r"(?:>=|<=|>|<)-?[0-9.]+", m["bounds"]))
    return words + (" (or null)" if m["null"] else "")


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
    yield from _key_problems(ds.overrides, "")


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
    if cfg.deepspeed.config_file:  # the user's JSON, "auto" resolved, in place of a preset
        from launcher import ds_file
        start = ds_file.base(cfg, world_size)
    else:
        start = load_preset(preset_name(cfg))
    out = merge(merge(start, decided), normalise(cfg.deepspeed.overrides))
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
