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
Trainer's "mismatches", each reported by key); so must the ZeRO stage, the offload devices and
`nvme_path`, the optimizer (AdamW), the scheduler type (WarmupLR = constant, WarmupDecayLR =
linear, WarmupCosineLR = cosine) and its `cos_min_ratio` (train.min_lr_ratio). Any other "auto"
is refused (the Trainer leaves it and DeepSpeed drops it).

The file is then taken as written (`apply`): only the keys the run file decides are set in it
(the batch sizes, accumulation, clipping, `enabled` of fp16/bf16, the stage, offload devices and
paths, lr / betas / eps / weight_decay in the optimizer's params, the step counts and peak lr in
the scheduler's); every other value stays the user's (fp16 loss scaling, `pin_memory`,
`stage3_gather_16bit_weights_on_model_save`, `warmup_type`, `torch_adam`, ...), and the
launcher's own defaults are not added. A block the file lacks (optimizer, scheduler) is the
launcher's. What the ranks do differently from a kept value (they run launcher/rank/lr_schedule.py's
linear warmup, whatever `warmup_type` says) is said by `notes`, which `ftlaunch ds-config`
prints.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Iterator, Optional

from launcher.config import epochs
from launcher.model import info as model_info
from launcher.config.batch import batch_sizes
from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError, Problem

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
    t, ds = cfg.train, cfg.deepspeed
    micro, accum, global_batch = batch_sizes(cfg, world)
    steps, _ = epochs.planned_steps(cfg, world)
    nvme = {f"zero_optimization.{part}.nvme_path": (ds.nvme_path, "deepspeed.nvme_path", True)
            for part, device in (("offload_optimizer", ds.offload_optimizer),
                                 ("offload_param", ds.offload_param)) if device == "nvme"}
    return {**nvme,
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
        "scheduler.params.cos_min_ratio": (t.min_lr_ratio, "train.min_lr_ratio", True),
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


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
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
        elif must and not same_value(node[last], value):
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
    if t.optimizer != "adamw" and tree.get("zero_allow_untested_optimizer") is False:
        yield Problem(KEY, f"{path}: zero_allow_untested_optimizer is false, but train.optimizer "
                      f"{t.optimizer} passes bitsandbytes' optimizer to DeepSpeed, which needs it true",
                      'set zero_allow_untested_optimizer to true or "auto", or remove it')
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
    from launcher.dsconfig.keys import TOP_KEYS
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
    """(the whole file, "auto" resolved and aliases in one form, or {}; every problem with it)."""
    from launcher.dsconfig.keys import find_auto, key_problems, normalise
    path = cfg.deepspeed.config_file
    assert path is not None
    tree, problems = reader(path)
    if tree is None:
        return {}, problems
    tree = json.loads(json.dumps(tree))  # a private copy
    problems += list(_resolve_auto(tree, cfg, world, path))
    problems += list(_launcher_keys(tree, cfg, path))
    tuning = _strip_filled(tree)
    for k in find_auto(tuning):
        problems.append(Problem(f"{KEY}.{k}", f'{path}: "auto" here is not resolved by the HF '
                                "Trainer's rules (DeepSpeed would drop it silently)",
                                "give a concrete value"))
    problems += [Problem(p.key, f"{path}: {p.key[len(KEY) + 1:]}: {p.message}", p.fix)
                 for p in key_problems(tuning, "", root=KEY)]
    return normalise(tree), problems


def base(cfg: RunConfig, world: Optional[int] = None) -> dict:
    """The file, "auto" resolved; ConfigError if the file has problems."""
    tree, problems = resolve(cfg, world)
    if problems:
        raise ConfigError(problems, "ds-config")
    return tree


# the top-level keys the run file decides, set in the file as they are in the launcher's config
RUN_FILE_TOP = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping")
OPTIMIZER_RUN_PARAMS = ("lr", "betas", "eps", "weight_decay")
SCHEDULER_RUN_PARAMS = ("warmup_max_lr", "total_num_steps", "warmup_num_steps", "cos_min_ratio")


def _block(tree: dict, key: str) -> dict:
    value = tree.get(key)
    tree[key] = value if isinstance(value, dict) else {}
    return tree[key]


def apply(tree: dict, decided: dict) -> dict:
    """The user's file (resolved: `base`) with the run file's keys set from `decided` (the
    launcher's `ds_config.filled`); every other value as the user wrote it."""
    out = copy.deepcopy(tree)
    for k in RUN_FILE_TOP:
        out[k] = decided[k]
    for k in ("fp16", "bf16"):
        _block(out, k)["enabled"] = decided[k]["enabled"]
    zero = _block(out, "zero_optimization")
    dzero = decided["zero_optimization"]
    zero["stage"] = dzero["stage"]
    for part in ("offload_optimizer", "offload_param"):
        if part in dzero:
            block = _block(zero, part)
            block.update({k: dzero[part][k] for k in ("device", "nvme_path") if k in dzero[part]})
    if "optimizer" in decided:
        if isinstance(out.get("optimizer"), dict):
            params = _block(out["optimizer"], "params")
            dparams = decided["optimizer"]["params"]
            params.update({k: copy.deepcopy(dparams[k]) for k in OPTIMIZER_RUN_PARAMS})
            params.update({k: v for k, v in dparams.items() if k not in params})  # torch_adam on CPU
        else:
            out["optimizer"] = copy.deepcopy(decided["optimizer"])
    if decided["zero_allow_untested_optimizer"] or "zero_allow_untested_optimizer" not in out:
        out["zero_allow_untested_optimizer"] = decided["zero_allow_untested_optimizer"]
    if isinstance(out.get("scheduler"), dict):
        params = _block(out["scheduler"], "params")
        dparams = decided["scheduler"]["params"]
        params.update({k: dparams[k] for k in SCHEDULER_RUN_PARAMS if k in dparams})
    else:
        out["scheduler"] = copy.deepcopy(decided["scheduler"])
    return out


def notes(cfg: RunConfig, built: dict) -> list[str]:
    """What the ranks do otherwise than a value the user's file keeps, and the blocks the file
    lacked (the launcher's are used): one line each, for `ftlaunch ds-config` to print."""
    if not cfg.deepspeed.config_file:
        return []
    tree, _ = resolve(cfg)
    out: list[str] = []
    for block, what in (("optimizer", f"DeepSpeed's AdamW from train: (lr {cfg.train.lr:g})"),
                        ("scheduler", f"the launcher's {built['scheduler']['type']} from train:")):
        if block in built and not isinstance(tree.get(block), dict):
            out.append(f"{KEY}: the file has no {block} block; {what} is written")
    sched = tree.get("scheduler") if isinstance(tree.get("scheduler"), dict) else {}
    params = sched.get("params") if isinstance(sched.get("params"), dict) else {}
    if sched:
        kind = params.get("warmup_type", "log (DeepSpeed's default)")
        if kind != "linear":
            out.append(f"{KEY}: scheduler.params.warmup_type is {kind}: kept in the JSON, but the "
                       "ranks warm up linearly (launcher/rank/lr_schedule.py, train.warmup_steps)")
        for k in ("warmup_min_lr", "warmup_min_ratio"):
            if isinstance(params.get(k), (int, float)) and params[k]:
                out.append(f"{KEY}: scheduler.params.{k} is {params[k]:g}: kept in the JSON, but "
                           "the ranks' warmup starts from lr x 1/warmup_steps "
                           "(launcher/rank/lr_schedule.py)")
    zero = built.get("zero_optimization", {})
    if zero.get("stage") == 3 and cfg.output.save_final and \
            not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        out.append(f"{KEY}: stage3_gather_16bit_weights_on_model_save is false: kept, but the final "
                   "export (output.save_final) gathers the 16-bit weights on rank 0 all the same "
                   "(launcher/rank/export.py); set output.save_final: false to skip it")
    return out
