"""The run directory: what was decided (resolved.yaml, ds_config.json, plan.txt) and what happened.

`prepare` writes the decided files atomically and refuses to mix runs: an existing run
directory made from a different config is refused unless the caller asks to resume (keep its
checkpoints, accept the changes) or to overwrite (move the old contents aside, never delete).
"""
from __future__ import annotations

import json
import os
import time
from typing import Literal

import yaml

from launcher import layout
from launcher.config import RunConfig, to_dict
from launcher.errors import ConfigError, Problem

OnExisting = Literal["refuse", "resume", "overwrite"]

# Fields that may change between a run and its continuation without mixing anything.
_VOLATILE = ("train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.resume", "train.dist_timeout_s", "cluster.",
             "output.")


def write_atomic(path: str, text: str) -> None:
    """Write text to path through a temporary file and rename: readers never see half of it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, tree


def config_changes(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring the volatile ones."""
    a, b = dict(_flatten(old)), dict(_flatten(new))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(
        k == v or (v.endswith(".") and k.startswith(v)) for v in _VOLATILE)]


def prepare(cfg: RunConfig, ds_config: dict, *, plan_text: str | None = None,
            on_existing: OnExisting = "refuse") -> str:
    """Create or reuse cfg.run_dir and write resolved.yaml, ds_config.json (and plan.txt)."""
    run_dir = cfg.run_dir
    resolved = os.path.join(run_dir, layout.RESOLVED)
    new = to_dict(cfg)
    if os.path.exists(resolved):
        with open(resolved, encoding="utf-8") as fh:
            old = yaml.safe_load(fh) or {}
        changed = config_changes(old, new)
        if changed and on_existing == "refuse":
            raise ConfigError([Problem("output.dir", f"{run_dir} holds a run made with a different "
                                       f"config (changed: {', '.join(changed[:8])}"
                                       f"{', ...' if len(changed) > 8 else ''})",
                                       "pass --resume to continue it with the new config, "
                                       "--overwrite to move the old run aside, or set output.dir")],
                              "run directory")
        if on_existing == "overwrite":
            aside = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(run_dir, aside)
    elif os.path.isdir(run_dir) and os.listdir(run_dir) and on_existing == "refuse":
        raise ConfigError([Problem("output.dir", f"{run_dir} exists, is not empty and is not a run "
                                   "directory", "choose another output.dir or pass --overwrite")],
                          "run directory")
    elif os.path.isdir(run_dir) and os.listdir(run_dir) and on_existing == "overwrite":
        os.rename(run_dir, f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.join(run_dir, layout.LOGS), exist_ok=True)
    write_atomic(resolved, yaml.safe_dump(new, sort_keys=False, allow_unicode=True))
    write_atomic(os.path.join(run_dir, layout.DS_CONFIG), json.dumps(ds_config, indent=2) + "\n")
    if plan_text is not None:
        write_atomic(os.path.join(run_dir, layout.PLAN), plan_text)
    return run_dir
