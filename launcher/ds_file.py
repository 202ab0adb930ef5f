"""`deepspeed.config_file`: a user's DeepSpeed JSON as the base of the config, "auto" resolved.

Users bring the JSON files the HF Trainer takes, full of "auto". They are resolved by the HF
Trainer's rules (transformers/integrations/deepspeed.py, `HfTrainerDeepSpeedConfig`'s
`trainer_config_process` and `trainer_config_finalize`), with the run file in the place of
`TrainingArguments`:

    train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size   the batch
    gradient_clipping                                    train.grad_clip
    optimizer.params.lr / betas / eps / weight_decay     train.lr / betas / eps / weight_decay
    scheduler.params.warmup_min_lr                       0 (not a run-file value)
    scheduler.params.warmup_max_lr                       train.lr
    scheduler.params.total_num_steps                     the run's steps (epochs counted)
    scheduler.params.warmup_num_steps                    max(1, warmup steps)
    fp16.enabled, bf16.enabled                           model.dtype
    zero_optimization.reduce_bucket_size                 hidden x hidden        \\ from config.json,
    zero_optimization.stage3_prefetch_bucket_size        int(0.9 x hidden^2)     > only when one of
    zero_optimization.stage3_param_persistence_threshold 10 x hidden            /  them is "auto"

As in the Trainer, a concrete value where the run file decides must equal the run file's (the
Trainer's "mismatches"); so must the ZeRO stage, the offload devices, the optimizer (AdamW) and
the scheduler type (WarmupLR = constant, WarmupDecayLR = linear, WarmupCosineLR = cosine). Any
other "auto" is refused (the Trainer leaves it and DeepSpeed drops it). What is left, the
tuning keys, is checked like `deepspeed.overrides` (unknown keys refused, types, ranges) and
becomes the base the launcher's keys and the overrides are merged onto, in place of a preset.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional

from launcher import epochs, model_info
from launcher.batch import batch_sizes
from launcher.config import RunConfig
from launcher.errors import ConfigError, Problem

KEY = "deepspeed.config_file"
SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
OPTIMIZERS = ("adam", "adamw")
HIDDEN_KEYS = ("zero_optimization.reduce_bucket_size",
               "zero_optimization.stage3_prefetch_bucket_size",
               "zero_optimization.stage3_param_persistence_threshold")
_ALIASES = {"zero_optimization.prefetch_bucket_size": "zero_optimization.stage3_prefetch_bucket_size",
            "zero_optimization.param_persistence_threshold":
                "zero_optimization.stage3_param_persistence_threshold",
            "bfloat16.enabled": "bf16.enabled"}


def read(path: str) -> tuple[Optional[dict], list[Problem]]:
    """The JSON object in path, or (None, the problem)."""
    try:
        with open(path, encoding="utf-8") as fh:
            tree = json.load(fh)
    except FileNotFoundError:
        return None, [Problem(KEY, f"no such file: {path}", "give the path of your DeepSpeed JSON")]
    except (OSError, ValueError) as exc:
        return None, [Problem(KEY, f"cannot read {path} as JSON: {exc}", "fix the JSON syntax")]
    if not isinstance(tree, dict):
        return None, [Problem(KEY, f"{path} holds {type(tree).__name__}, not a JSON object",
                              "write the DeepSpeed config as one {...} object")]
    return tree, []


def _get(tree: dict, dotted: str) -> tuple[Optional[dict], str]:
    """(the dict holding the last part of dotted, that part), or (None, part) if absent."""
    *parents, last = dotted.split(".")
    node: Any = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def _run_values(cfg: RunConfig, world: Optional[int]) -> dict[str, tuple[Any, str, bool]]:
    """dotted DeepSpeed key -> (the run file's value, the run-file field, must match)."""
    t = cfg.train
    micro, accum, global_batch = batch_sizes(cfg, world)
    steps, _ = epochs.planned_steps(cfg, world)
    return {
        "train_micro_batch_size_per_gpu": (micro, "train.micro_batch_size", True),
        "gradient_accumulation_steps": (accum, "train.grad_accum", True),
        "train_batch_size": (global_batch, "train.global_batch_size", True),
        "gradient_clipping": (t.grad_clip, "train.grad_clip", True),
        "optimizer.params.lr": (t.lr, "train.lr", True),
        "optimizer.params.betas": (list(t.betas), "train.betas", True),
        "optimizer.params.eps": (t.eps, "train.eps", True),
        "optimizer.params.weight_decay": (t.weight_decay, "train.weight_decay", True),
        "scheduler.params.warmup_min_lr": (0.0, "(0)", False),
        "scheduler.params.warmup_max_lr": (t.lr, "train.lr", True),
        "scheduler.params.total_num_steps": (steps, "train.max_steps / epochs", True),
        "scheduler.params.warmup_num_steps": (max(1, epochs.warmup_steps(cfg, steps)),
                                              "train.warmup_steps / warmup_ratio", True),
        "fp16.enabled": (cfg.model.dtype == "fp16", "model.dtype", True),
        "bf16.enabled": (cfg.model.dtype == "bf16", "model.dtype", True),
    }


def _hidden_values(cfg: RunConfig) -> Optional[dict[str, int]]:
    mc = model_info.model_config(cfg.model.path)
    h = model_info.hidden_size(mc) if mc else None
    if h is None:
        return None
    return {HIDDEN_KEYS[0]: h * h, HIDDEN_KEYS[1]: int(0.9 * h * h), HIDDEN_KEYS[2]: 10 * h}


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() == "auto"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def _resolve_auto(tree: dict, cfg: RunConfig, world: Optional[int], path: str) -> Iterator[Problem]:
    """Fill "auto" in place; report contradictions with the run file."""
    for alias, canonical in _ALIASES.items():  # resolve under the name DeepSpeed reads
        node, last = _get(tree, alias)
        if node is not None and last in node:
            cnode, clast = _get(tree, canonical)
            if cnode is not None and clast not in cnode:
                cnode[clast] = node.pop(last)
    for dotted, (value, field, must) in _run_values(cfg, world).items():
        node, last = _get(tree, dotted)
        if node is None or last not in node:
            continue
        if _is_auto(node[last]):
            node[last] = value
        elif must and not _same(node[last], value):
            yield Problem(KEY, f"{path}: {dotted} is {json.dumps(node[last])}, but the run file "
                          f"gives {json.dumps(value)} ({field})",
                          f'set {dotted} to "auto" in the JSON, or change {field}')
    autos = [k for k in HIDDEN_KEYS if _is_auto((_get(tree, k)[0] or {}).get(_get(tree, k)[1]))]
    if autos:
        hidden = _hidden_values(cfg)
        if hidden is None:
            yield Problem(KEY, f"{path}: {', '.join(autos)} \"auto\" needs the model's hidden size, "
                          f"and {cfg.model.path}/config.json has none", "give integers instead")
        else:
            for k in HIDDEN_KEYS:
                node, last = _get(tree, k)
                if node is not None and _is_auto(node.get(last)):
                    node[last] = hidden[k]


def _launcher_keys(tree: dict, cfg: RunConfig, path: str) -> Iterator[Problem]:
    """Contradictions in the keys the launcher fills beyond the Trainer's list."""
    ds, t = cfg.deepspeed, cfg.train
    zero = tree.get("zero_optimization") if isinstance(tree.get("zero_optimization"), dict) else {}
    stage = zero.get("stage")
    if stage is not None and not _is_auto(stage) and stage != ds.zero_stage:
        yield Problem(KEY, f"{path}: zero_optimization.stage is {stage}, deepspeed.zero_stage is "
                      f"{ds.zero_stage}", f"set deepspeed.zero_stage: {stage}")
    for part, run_value in (("offload_optimizer", ds.offload_optimizer),
                            ("offload_param", ds.offload_param)):
        block = zero.get(part)
        device = block.get("device", "none") if isinstance(block, dict) else "none"
        if device != run_value:
            yield Problem(KEY, f"{path}: zero_optimization.{part}.device is {device}, "
                          f"deepspeed.{part} is {run_value}", f"set deepspeed.{part}: {device}")
    opt = tree.get("optimizer")
    if isinstance(opt, dict):
        kind = str(opt.get("type", "")).lower()
        if kind not in OPTIMIZERS or t.optimizer != "adamw":
            yield Problem(KEY, f"{path}: optimizer type {opt.get('type')!r}; the launcher trains "
                          f"with train.optimizer ({t.optimizer})", "remove the optimizer block "
                          "(or use AdamW), and choose the optimizer with train.optimizer")
    sched = tree.get("scheduler")
    if isinstance(sched, dict):
        kind = SCHEDULERS.get(str(sched.get("type")))
        if kind is None:
            yield Problem(KEY, f"{path}: scheduler type {sched.get('type')!r} is not one the run file "
                          f"can give ({', '.join(SCHEDULERS)})", "remove the scheduler block and "
                          "set train.scheduler")
        elif kind != t.scheduler:
            yield Problem(KEY, f"{path}: scheduler {sched['type']} is train.scheduler {kind}, the "
                          f"run file says {t.scheduler}", f"set train.scheduler: {kind}")


def _strip_filled(tree: dict) -> dict:
    """The tuning keys: everything but what the launcher fills from the run file."""
    from launcher.ds_keys import TOP_KEYS
    out = {k: v for k, v in tree.items() if TOP_KEYS.get(k) != "filled"}
    for k in ("fp16", "bf16"):
        if isinstance(out.get(k), dict):
            out[k] = {a: b for a, b in out[k].items() if a != "enabled"}
            if not out[k]:
                del out[k]
    zero = out.get("zero_optimization")
    if isinstance(zero, dict):
        zero = {k: v for k, v in zero.items() if k != "stage"}
        for part in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(part), dict):
                zero[part] = {k: v for k, v in zero[part].items() if k not in ("device", "nvme_path")}
                if not zero[part]:
                    del zero[part]
        out["zero_optimization"] = zero
    return out


def resolve(cfg: RunConfig, world: Optional[int] = None,
            reader: Callable[[str], tuple[Optional[dict], list[Problem]]] = read
            ) -> tuple[dict, list[Problem]]:
    """(the tuning keys of the file, "auto" resolved, or {}; every problem with the file)."""
    from launcher.ds_keys import find_auto, key_problems, normalise
    path = cfg.deepspeed.config_file
    assert path is not None
    tree, problems = reader(path)
    if tree is None:
        return {}, problems
    tree = json.loads(json.dumps(tree))  # a private copy
    problems += list(_resolve_auto(tree, cfg, world, path))
    problems += list(_launcher_keys(tree, cfg, path))
    base = _strip_filled(tree)
    for k in find_auto(base):
        problems.append(Problem(f"{KEY}.{k}", f'{path}: "auto" here is not resolved by the HF '
                                "Trainer's rules (DeepSpeed would drop it silently)",
                                "give a concrete value"))
    problems += [Problem(p.key, f"{path}: {p.key[len(KEY) + 1:]}: {p.message}", p.fix)
                 for p in key_problems(base, "", root=KEY)]
    return normalise(base), problems


def base(cfg: RunConfig, world: Optional[int] = None) -> dict:
    """The tuning keys of deepspeed.config_file; ConfigError if the file has problems."""
    tree, problems = resolve(cfg, world)
    if problems:
        raise ConfigError(problems, "ds-config")
    return tree
