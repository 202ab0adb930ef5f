"""The run directory: what was decided (resolved.yaml, ds_config.json, plan.txt) and what happened.

`prepare` writes the decided files atomically and refuses to mix runs: an existing run
directory made from a different config is refused unless the caller asks to resume (keep its
checkpoints, accept the changes) or to overwrite (move the old contents aside, never delete).
"""
from __future__ import annotations

import json
import os
import time
from typing import Literal, Protocol

import yaml

from launcher.cluster import layout
from launcher.common.files import (make_private, set_umask_state, umask_state,  # noqa: F401
                                   write_atomic)
from launcher.config.schema import RunConfig, to_dict
from launcher.config.errors import ConfigError, Problem

OnExisting = Literal["refuse", "resume", "overwrite"]


class ExistingFlags(Protocol):
    """What a command line said about an existing run directory (`--resume`, `--overwrite`)."""

    resume: bool
    overwrite: bool


def on_existing(flags: ExistingFlags) -> OnExisting:
    """The policy for an existing run directory: resume, overwrite, or refuse (neither flag)."""
    return "resume" if flags.resume else "overwrite" if flags.overwrite else "refuse"

# Fields that may change between a run and its continuation without mixing anything.
_VOLATILE = ("train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.resume", "train.dist_timeout_s", "cluster.",
             "output.")


def keep_private(cfg: RunConfig) -> None:
    """output.private: from now on everything this process (and what it starts) creates is the
    user's alone: umask 077, so folders 0700 and files 0600 (write_atomic and export follow).
    Called first by every command that writes into a run directory or an export."""
    if cfg.output.private:
        make_private()


def _make_run_dir(run_dir: str, private: bool) -> None:
    """run_dir and its logs/; private: run_dir 0700 (also when it exists), while the folders
    above it that are made here get the user's own umask (runs/ may be shared on purpose)."""
    if private:
        made, up = [], os.path.dirname(os.path.abspath(run_dir))
        while not os.path.isdir(up):
            made.append(up)
            up = os.path.dirname(up)
        for folder in reversed(made):
            os.makedirs(folder, exist_ok=True)
            os.chmod(folder, 0o777 & ~umask_state()[0])
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        os.chmod(run_dir, 0o700)
    os.makedirs(os.path.join(run_dir, layout.LOGS), exist_ok=True)


def move_aside(path: str) -> str:
    """Rename path to path.old-<time>[-N] (a name not taken) and return the new name."""
    base = f"{path}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = base, 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{base}-{n}"
    os.rename(path, aside)
    return aside


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


# Entries a run directory may hold (launcher/cluster/layout.py), e.g. logs/ made by Slurm before the
# job wrote resolved.yaml: a folder holding only these is a run directory.
_LAYOUT = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}


def _ours(folder: str) -> bool:
    return all(name in _LAYOUT or name.startswith(".") for name in os.listdir(folder))


def _refuse(message: str, fix: str) -> ConfigError:
    return ConfigError([Problem("output.dir", message, fix)], "run directory")


def check(cfg: RunConfig, on_existing: OnExisting = "refuse") -> None:
    """The refusals of `prepare`, without touching anything: `ftlaunch run` asks before the plan
    and the tokenizing, so a run directory made with another config is refused in a second."""
    if on_existing not in ("refuse", "resume", "overwrite"):
        raise ValueError(f"on_existing must be refuse, resume or overwrite, not {on_existing!r}")
    run_dir = cfg.run_dir
    resolved = os.path.join(run_dir, layout.RESOLVED)
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise _refuse(f"{run_dir} exists and is not a folder", "set output.dir to a folder path")
    if os.path.exists(resolved):
        try:
            with open(resolved, encoding="utf-8") as fh:
                old = yaml.safe_load(fh)
            changed = config_changes(old if isinstance(old, dict) else {}, to_dict(cfg))
            if not isinstance(old, dict):
                changed = [f"{layout.RESOLVED} is not a run config"]
        except (OSError, yaml.YAMLError) as exc:
            changed = [f"{layout.RESOLVED} unreadable: {exc.__class__.__name__}"]
        if changed and on_existing == "refuse":
            raise _refuse(f"{run_dir} holds a run made with a different config (changed: "
                          f"{', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''})",
                          "pass --resume to continue it with the new config, --overwrite to move "
                          "the old run aside, or set output.dir")
    elif os.path.isdir(run_dir) and not _ours(run_dir) and on_existing != "overwrite":
        raise _refuse(f"{run_dir} exists, is not empty and is not a run directory "
                      f"(no {layout.RESOLVED}): nothing to {on_existing}",
                      "choose another output.dir, or pass --overwrite to move it aside")


def prepare(cfg: RunConfig, ds_config: dict, *, plan_text: str | None = None,
            on_existing: OnExisting = "refuse") -> str:
    """Create or reuse cfg.run_dir and write resolved.yaml, ds_config.json (and plan.txt).

    An existing run directory made from the same config (volatile fields aside) is reused.
    One made from a different config is refused, unless on_existing is "resume" (keep it,
    write the new config) or "overwrite" (move it aside to <dir>.old-<time>, start fresh).
    A folder holding anything but run-directory entries (launcher/cluster/layout.py) is only ever
    moved aside (overwrite), never written into.
    Nothing is deleted.
    """
    check(cfg, on_existing)
    run_dir = cfg.run_dir
    exists = os.path.exists(os.path.join(run_dir, layout.RESOLVED))
    if on_existing == "overwrite" and (exists or os.path.isdir(run_dir) and not _ours(run_dir)):
        move_aside(run_dir)
    new = to_dict(cfg)
    resolved = os.path.join(run_dir, layout.RESOLVED)
    try:
        _make_run_dir(run_dir, cfg.output.private)
        write_atomic(resolved, yaml.safe_dump(new, sort_keys=False, allow_unicode=True))
        write_atomic(os.path.join(run_dir, layout.DS_CONFIG), json.dumps(ds_config, indent=2) + "\n")
        if plan_text is not None:
            write_atomic(os.path.join(run_dir, layout.PLAN), plan_text)
    except OSError as exc:   # a folder not ours to write, a full disk, a file in the way
        where = exc.filename or run_dir
        raise _refuse(f"cannot write the run directory {run_dir}: {exc.strerror or exc} ({where})",
                      "set output.dir to a folder you can write, or make this one writable "
                      "for you") from None
    return run_dir
