"""Checkpoints that can be trusted: atomic save, verified resume, keep the last K.

A checkpoint is a folder `checkpoints/step-00000020/`:

    ds/                      DeepSpeed's save_checkpoint output (tag "ds": model, ZeRO partitions,
                             optimizer and LR scheduler state of every rank)
    zero_to_fp32.py          DeepSpeed's consolidation script (copied by DeepSpeed)
    trainer_state.json       step, epoch, sampler position, metrics.jsonl offset, tokens, time
    rank/rank-00003.pt       per rank: RNG states (python, numpy, torch[, cuda]) and sampler state
    MANIFEST.json            written LAST: every file with its size and sha256

How a save stays atomic: every rank writes into `checkpoints/.tmp-step-00000020/`; the ranks
then report success to each other (one all_gather); each hashes an interleaved share of the files
(so the hashing is spread over the ranks); rank 0 writes MANIFEST.json and renames the folder to
`step-00000020`. A crash or a full disk at any point before the rename leaves only a `.tmp-`
folder, which is ignored (and removed by the next successful save); the newest good checkpoint
is never touched, and a failed save raises `CheckpointError` naming the rank, the cause and the
checkpoint that is still good. Only after the rename are older checkpoints beyond
`train.keep_checkpoints` deleted (renamed to `.trash-...` first, then removed).

Resume: `latest_complete` returns the newest folder whose manifest parses and whose files all
exist with their recorded sizes (an incomplete or corrupt one is skipped with a warning);
`choose_resume` (collective) also checks the sha256 of every file, each rank a share.

Fault injection for tests (`FTLAUNCH_FAULT`, points `ckpt-write` and `ckpt-manifest` here):
launcher/rank/faults.py. The final export of the trained model: launcher/rank/export.py.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any, Callable

from launcher.rank import faults
from launcher.rank.collectives import broadcast_object, gather_object, rank_world
from launcher.cluster.checkpoint_files import (MANIFEST, PREFIX, complete, content_files,  # noqa: F401
                                               latest_complete, listing, problem, read_manifest,
                                               root, sha256, step_name, step_of)
from launcher.common.log import get_logger
from launcher.common.files import write_atomic

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
TRAINER_STATE = "trainer_state.json"
DS_TAG = "ds"
RANK_DIR = "rank"
FORMAT = 1


_warn = get_logger(__name__).warning  # stderr, rank 0 only (launcher/common/log.py)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what is still good."""


# ------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _check_all(ok: bool, message: str, what: str, good: str | None) -> None:
    """Raise CheckpointError on every rank if any rank failed (all ranks call it)."""
    results = gather_object((ok, message))
    bad = [(r, m) for r, (o, m) in enumerate(results) if not o]
    if bad:
        causes = "; ".join(f"rank {r}: {m}" for r, m in bad)
        keep = f"the previous checkpoint {good} is untouched" if good else \
            "there is no earlier checkpoint"
        raise CheckpointError(f"{what} failed ({causes}); {keep}")


# ------------------------------------------------------------------ save
def save(engine: Any, run_dir: str, step: int, trainer_state: dict, rank_state: dict, *,
         keep: int, exclude_frozen: bool = False) -> str:
    """Write the checkpoint of `step` atomically (collective: every rank calls it). Returns its
    folder. trainer_state: JSON-able, written by rank 0; rank_state: this rank's (sampler ...),
    saved with its RNG states. exclude_frozen: leave the frozen parameters out (LoRA runs: the
    base comes from model.path at every start, so each checkpoint holds only what trains).
    Raises CheckpointError if any rank failed (nothing replaced)."""
    import torch

    rank, world = rank_world()
    ckpt_root = root(run_dir)
    final = os.path.join(ckpt_root, step_name(step))
    if broadcast_object(os.path.isdir(final) and problem(final) is None):
        return final  # this step is saved already (a stop right after a resume)
    good = latest_complete(ckpt_root, warn=lambda m: None)
    tmp = os.path.join(ckpt_root, TMP_PREFIX + step_name(step))
    ok, msg = True, ""
    if rank == 0:
        try:
            os.makedirs(ckpt_root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(os.path.join(tmp, RANK_DIR))
        except OSError as exc:
            ok, msg = False, str(exc)
    _check_all(ok, msg, f"checkpoint at step {step}", good)
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
        faults.fault("ckpt-write", step, rank)
        torch.save({"rng": rng_state(), **rank_state},
                   os.path.join(tmp, RANK_DIR, f"rank-{rank:05d}.pt"))
        if rank == 0:
            state = {"format": FORMAT, "step": step, "world_size": world,
                     "frozen_excluded": exclude_frozen, **trainer_state}
            write_atomic(os.path.join(tmp, TRAINER_STATE), json.dumps(state, indent=2) + "\n")
        faults.fault("ckpt-manifest", step, rank)
        ok, msg = True, ""
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        ok, msg = False, f"{type(exc).__name__}: {exc}"
    _check_all(ok, msg, f"writing the checkpoint at step {step}", good)
    files = content_files(tmp)
    mine = {rel: {"size": os.path.getsize(os.path.join(tmp, rel)),
                  "sha256": sha256(os.path.join(tmp, rel))}
            for i, rel in enumerate(files) if i % world == rank}
    tables = gather_object(mine)
    ok, msg = True, ""
    if rank == 0:
        try:
            table: dict[str, Any] = {}
            for t in tables:
                table.update(t)
            manifest = {"format": FORMAT, "step": step, "world_size": world,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": table}
            write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1) + "\n")
            _fsync_dir(tmp)
            if os.path.exists(final):  # an incomplete leftover of this step
                os.rename(final, os.path.join(ckpt_root, f"{TRASH_PREFIX}{step_name(step)}-{time.time_ns()}"))
            os.rename(tmp, final)
            _fsync_dir(ckpt_root)
        except OSError as exc:
            ok, msg = False, str(exc)
    _check_all(ok, msg, f"completing the checkpoint at step {step}", good)
    if rank == 0:
        prune(ckpt_root, keep)
    return final


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(ckpt_root: str, keep: int) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep`, leftover `.tmp-`/`.trash-` folders.
    Returns the removed paths. Call on one rank, after a successful save."""
    removed = []
    done = complete(ckpt_root)
    doomed = [p for _, p in done[:-keep]] if keep > 0 else []
    for p in doomed:
        trash = os.path.join(ckpt_root, f"{TRASH_PREFIX}{os.path.basename(p)}-{time.time_ns()}")
        os.rename(p, trash)  # no half-deleted step-N folder is ever visible
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    for name in os.listdir(ckpt_root):
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
            removed.append(os.path.join(ckpt_root, name))
    return removed


# ------------------------------------------------------------------ resume
def choose_resume(run_dir: str, *, warn: Callable[[str], None] = _warn) -> str | None:
    """The newest checkpoint whose manifest, sizes and sha256 all check out (collective: every
    rank hashes a share of the files). Skipped ones are reported with a warning on rank 0."""
    rank, world = rank_world()
    candidates = broadcast_object([p for _, p in listing(root(run_dir))] if rank == 0 else None)
    for path in reversed(candidates):
        why = problem(path, hashes=True, share=(rank, world))
        whys = [w for w in gather_object(why) if w]
        if not whys:
            return path
        if rank == 0:
            warn(f"skipping checkpoint {path}: {whys[0]}")
    return None


def load(engine: Any, path: str, cfg: Any = None) -> tuple[dict, dict]:
    """Load a checkpoint into the engine (collective). Returns (trainer_state, this rank's state)
    and restores this rank's RNG states. A checkpoint written by another number of ranks loads
    through its universal form (launcher/cluster/reshard.py; cfg: the run config, needed then); the
    returned rank state then has no "sampler" (the caller maps the saved position)."""
    import torch

    rank, world = rank_world()
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as fh:
        trainer_state = json.load(fh)
    saved_world = int(trainer_state.get("world_size") or 0)
    if saved_world != world:
        return trainer_state, _load_resharded(engine, path, cfg, saved_world, trainer_state)
    # a checkpoint without the frozen parameters loads over the model from model.path: the
    # module's frozen keys are missing from it on purpose
    load_path, _ = engine.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True,
                                          load_module_strict=not trainer_state.get("frozen_excluded"))
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}/{DS_TAG}")
    rank_state = torch.load(os.path.join(path, RANK_DIR, f"rank-{rank:05d}.pt"), weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return trainer_state, rank_state


def _load_resharded(engine: Any, path: str, cfg: Any, saved_world: int, state: dict) -> dict:
    """Convert (rank 0, once) and load the universal form of a checkpoint of saved_world ranks.
    The optimizer's per-group hyperparameters other than the lr are kept as this run set them
    (DeepSpeed's ZeRO-3 universal load copies group 0's onto every group: weight decay would
    reach the no-decay group) and every state gets its own step counter (`_unshare_steps`).
    Returns this rank's state: its RNG restored where the checkpoint has a rank of its number;
    the sampler position is the caller's to map."""
    import torch

    from launcher.cluster import reshard
    rank, world = rank_world()
    if cfg is None or not saved_world:
        raise CheckpointError(f"{path} was written by {saved_world or 'an unknown number of'} "
                              f"ranks, this run has {world}")
    reshard.check_supported(cfg, path, saved_world, world)
    ok, msg, uni = True, "", None
    if rank == 0:
        try:
            uni = reshard.convert(path, DS_TAG)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            ok, msg = False, f"{type(exc).__name__}: {exc}"
    _check_all(ok, msg, f"converting {path} (written by {saved_world} ranks) to a universal "
               f"checkpoint for {world} ranks", None)
    uni = reshard.universal_dir(path)
    groups = engine.optimizer.param_groups
    kept = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
    engine._config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(uni, tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=False)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {uni}/{DS_TAG}")
    for g, k in zip(engine.optimizer.param_groups, kept):
        g.update(k)
    _unshare_steps(getattr(engine.optimizer, "optimizer", engine.optimizer))
    mine = os.path.join(path, RANK_DIR, f"rank-{rank:05d}.pt")
    rank_state: dict = {}
    if os.path.exists(mine):
        rank_state = torch.load(mine, weights_only=False)
        set_rng_state(rank_state.pop("rng"))
    rank_state.pop("sampler", None)
    return rank_state


def _unshare_steps(optimizer: Any) -> None:
    """Give every optimizer state its own `step` tensor. DeepSpeed's ZeRO-3 universal load puts
    one tensor object in the state of every sub-group; torch's AdamW increments it in place, once
    per sub-group, so with two groups (decay and no decay) the bias correction would run ahead."""
    import torch
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def peek(run_dir: str) -> dict | None:
    """trainer_state.json of the newest complete checkpoint (sizes checked, not hashes), or None:
    what a rank needs to know before building its engine (the world size it was written by).
    `choose_resume` later verifies the hashes."""
    path = latest_complete(root(run_dir), warn=lambda m: None)
    if path is None:
        return None
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
