"""DeepSpeed 0.19's config keys as tables, and the checks of a config tree against them.

The tables (TOP_KEYS, ZERO_KEYS, ...; tests/test_ds_config.py keeps them equal to DeepSpeed's own
pydantic models) give each key a value spec; FILLED maps the keys the launcher fills to the
run-file field that decides them. `key_problems` reports unknown, removed, deprecated, doubled
(alias) and launcher-owned keys and wrong values; `normalise` writes alias keys in one form;
`find_auto` finds the "auto" values DeepSpeed would silently drop. Used by launcher/dsconfig/build.py
(presets and overrides) and launcher/dsconfig/user_file.py (a user's own DeepSpeed JSON).
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterator

from launcher.config.errors import Problem, did_you_mean

# DeepSpeed key (dotted) -> the run-file field that decides it.
FILLED: dict[str, str] = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "fp16.enabled": "model.dtype",
    "bf16.enabled": "model.dtype",
    "optimizer": "train.optimizer / lr / betas / eps / weight_decay (+ torch_adam, and fused on GPUs, "
                 "unless offloaded)",
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
    # blocks DeepSpeed reads key by key with defaults (a misspelt key is ignored without a word):
    # checked here against the keys DeepSpeed 0.19 reads (tables below)
    "activation_checkpointing": "section", "aio": "section", "checkpoint": "section",
    "flops_profiler": "section", "data_types": "section",
    # blocks DeepSpeed parses with pydantic models that refuse unknown keys (on the ranks), or
    # hands to a subsystem the launcher does not use: kept as given, they must be mappings
    **{k: "mapping" for k in (
        "autotuning", "comet", "comms_logger", "compile", "csv_monitor", "data_efficiency",
        "datastates_ckpt", "expert_parallel", "hybrid_engine", "pipeline", "tensor_parallel",
        "tensorboard", "timers", "torch_autocast", "wandb", "weight_quantization")},
}

# Top-level keys DeepSpeed 0.19 refuses (removed features), and ones the launcher cannot honour.
REMOVED_TOP = {"nebula", "compression_training", "amp", "quantize_training", "sparse_gradients",
               "eigenvalue", "sparse_attention", "elasticity", "graph_harvesting",
               "curriculum_learning", "progressive_layer_drop"}
REMOVED_ZERO = {"mics_shard_size", "mics_hierarchical_params_gather", "zeropp_loco_param"}
UNSUPPORTED_TOP = {"sequence_parallel_size": "sequence parallelism changes the data-parallel world "
                   "size the batch arithmetic is done for: the launcher sets it from "
                   "train.sequence_parallel (remove it here and set that)"}

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
# deepspeed/runtime/swap_tensor/aio_config.py get_aio_config (constants.py: defaults)
AIO_KEYS: dict[str, str] = {
    "block_size": "int>0", "queue_depth": "int>0", "intra_op_parallelism": "int>0",
    "single_submit": "bool", "overlap_events": "bool", "use_gds": "bool",
}
# deepspeed/runtime/activation_checkpointing/config.py DeepSpeedActivationCheckpointingConfig
ACTIVATION_CHECKPOINTING_KEYS: dict[str, str] = {
    "partition_activations": "bool", "number_checkpoints": "int?>0",
    "contiguous_memory_optimization": "bool", "synchronize_checkpoint_boundary": "bool",
    "profile": "bool", "cpu_checkpointing": "bool",
}
# deepspeed/profiling/config.py DeepSpeedFlopsProfilerConfig (profiling/constants.py)
FLOPS_PROFILER_KEYS: dict[str, str] = {
    "enabled": "bool", "recompute_fwd_factor": "float>=0", "profile_step": "int>=1",
    "module_depth": "int", "top_modules": "int>=1", "detailed": "bool", "output_file": "path?",
}
# deepspeed/runtime/config.py (tag_validation, load_universal, use_node_local_storage,
# parallel_write) and runtime/model_checkpointing/config.py get_checkpoint_config (the rest)
CHECKPOINT_KEYS: dict[str, str] = {
    "tag_validation": "choice(warn|ignore|fail)", "load_universal": "bool",
    "use_node_local_storage": "bool", "parallel_write": "section",
    "checkpoint_serialization": "bool", "writer": "section",
}
CHECKPOINT_PARALLEL_WRITE_KEYS: dict[str, str] = {"pipeline_stage": "bool"}
CHECKPOINT_WRITER_KEYS: dict[str, str] = {
    "type": "choice(mock|python|fast)", "io_buffer_size": "int>0", "io_buffer_double": "bool",
    "show_statistics": "bool", "data_parallel": "choice(replica|socket|machine)",
    "decoupled": "bool", "io_multiplier": "int>0",
}
# deepspeed/runtime/config.py (DATA_TYPES in runtime/constants.py); keep_in_fp32_modules is
# "auto" (which DeepSpeed itself resolves) or a list of name patterns
DATA_TYPES_KEYS: dict[str, str] = {
    "grad_accum_dtype": "choice(fp32|fp16|bf16)?", "param_dtype": "choice(fp32|fp16|bf16)?",
    "buffer_dtype": "choice(fp32|fp16|bf16)?", "keep_in_fp32_modules": "list",
}
# "auto" that DeepSpeed resolves itself (not the HF Trainer's): kept
AUTO_READ_BY_DEEPSPEED = frozenset({"data_types.keep_in_fp32_modules"})
SECTIONS: dict[str, dict[str, str]] = {
    "aio": AIO_KEYS, "activation_checkpointing": ACTIVATION_CHECKPOINTING_KEYS,
    "flops_profiler": FLOPS_PROFILER_KEYS, "checkpoint": CHECKPOINT_KEYS,
    "checkpoint.parallel_write": CHECKPOINT_PARALLEL_WRITE_KEYS,
    "checkpoint.writer": CHECKPOINT_WRITER_KEYS, "data_types": DATA_TYPES_KEYS,
    "": TOP_KEYS, "fp16": FP16_KEYS, "bf16": BF16_KEYS, "zero_optimization": ZERO_KEYS,
    "zero_optimization.offload_param": OFFLOAD_PARAM_KEYS,
    "zero_optimization.offload_optimizer": OFFLOAD_OPTIMIZER_KEYS,
}
# Kept for callers that only need the names.
KNOWN_TOP = frozenset(TOP_KEYS)
KNOWN_ZERO = frozenset(ZERO_KEYS)

_SPEC = re.compile(r"(?P<kind>bool|int|float|str|path|mapping|list|choice\((?P<choices>[^)]*)\))"
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
    if kind == "list":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else f"expected a list of strings, got {value!r}"
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


def find_auto(tree: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys whose value is the string "auto"."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from find_auto(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from find_auto(v, f"{prefix}[{i}]")
    elif isinstance(tree, str) and tree.strip().lower() == "auto" and \
            prefix not in AUTO_READ_BY_DEEPSPEED:
        yield prefix


# ------------------------------------------------------------------ checking overrides
def key_problems(tree: dict[str, Any], section: str,
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
                yield from key_problems(v, sub, root)
        elif not (isinstance(v, str) and v.strip().lower() == "auto"):  # "auto": reported already
            msg = check_value(spec, v)
            if msg:
                yield Problem(key, msg, f"give {_spec_words(spec)}")


def _spec_words(spec: str) -> str:
    m = _SPEC.fullmatch(spec)
    assert m
    kind = m["kind"]
    words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "path": "a path", "mapping": "a mapping", "list": "a list of strings"}.get(kind)
    if words is None:
        words = "one of " + ", ".join(m["choices"].split("|"))
    if m["bounds"]:
        words += " " + " and ".join(re.findall(r"(?:>=|<=|>|<)-?[0-9.]+", m["bounds"]))
    return words + (" (or null)" if m["null"] else "")
