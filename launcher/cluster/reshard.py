"""Resume on another world size: a checkpoint written by W ranks continues on V ranks.

DeepSpeed's ZeRO checkpoints are partitioned per rank; a different rank count cannot load them.
DeepSpeed's universal format (deepspeed/checkpoint/ds_to_universal.py) stores every trainable
parameter's fp32 master and Adam moments whole, one folder per parameter, which any world size
partitions again at load (`checkpoint.load_universal`). Here that happens by itself:

    step-00000020/ds/           the checkpoint as written by W ranks
    step-00000020/universal/ds  its universal form, converted once by rank 0 on first use
                                (into `.tmp-universal`, renamed when complete: a half-written
                                one never replaces a good one; the manifest does not list it)

What else a resume on V ranks keeps:
- the global batch: grad_accum is recomputed so that micro x accum x V equals the checkpoint's
  global batch (`keep_batch`), unless the run file changed the batch; a batch that cannot be
  kept is a ConfigError with the fix;
- the data order: the sampler continues at the same global example (`sampler_state`);
- the weights of frozen parameters come from model.path (they never change), the trainable
  ones and their optimizer state from the universal checkpoint.

What cannot: ZeRO stage 0 (no partitioned optimizer for the converter to read), fp16 (its loss
scaler is per rank), 8-bit optimizers (their state is not Adam's exp_avg / exp_avg_sq) and
NVMe optimizer offload (the state lives in swap files) and sequence parallelism (its
data-parallel layout): refused with the reason (`unsupported`),
and by `validate` when cluster.min_nodes lets the world size change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
from typing import Any, Optional

from launcher.config.batch import batch_sizes, derived_accum
from launcher.config.errors import ConfigError, Problem
from launcher.config.schema import RunConfig

UNIVERSAL = "universal"
TMP_UNIVERSAL = ".tmp-universal"


def unsupported(cfg: RunConfig) -> list[Problem]:
    """Why a checkpoint of this run cannot be resumed on another world size ([] if it can)."""
    out = []
    d = cfg.deepspeed
    if d.zero_stage == 0:
        out.append(Problem("deepspeed.zero_stage", "a checkpoint resumes on another number of ranks "
                           "only through DeepSpeed's universal format, which is read from ZeRO's "
                           "partitioned optimizer (stage 1-3); stage 0 has none",
                           "set deepspeed.zero_stage: 1 (or 2, 3), or resume on the ranks that "
                           "wrote the checkpoint"))
    if cfg.model.dtype == "fp16":
        out.append(Problem("model.dtype", "fp16's dynamic loss scaler is not carried into a "
                           "universal checkpoint, so a resume on another number of ranks would "
                           "restart its scale", "use model.dtype: bf16 (or fp32), or resume on the "
                           "ranks that wrote the checkpoint"))
    if cfg.train.optimizer != "adamw":
        out.append(Problem("train.optimizer", f"{cfg.train.optimizer}'s quantized state is not "
                           "Adam's exp_avg / exp_avg_sq, which a universal checkpoint holds",
                           "use train.optimizer: adamw, or resume on the ranks that wrote the "
                           "checkpoint"))
    if getattr(d, "offload_optimizer", "none") == "nvme":
        out.append(Problem("deepspeed.offload_optimizer", "NVMe-offloaded optimizer state lives in "
                           "per-rank swap files that the universal converter does not read",
                           "use offload_optimizer: cpu or none, or resume on the ranks that wrote "
                           "the checkpoint"))
    if cfg.train.sequence_parallel > 1:
        out.append(Problem("train.sequence_parallel", "a sequence-parallel run's batch and ZeRO "
                           "partitions are laid out over world / N data-parallel ranks, which "
                           "the universal conversion here does not recompute",
                           "resume on the ranks that wrote the checkpoint, or train without "
                           "sequence parallelism"))
    return out


def check_supported(cfg: RunConfig, path: str, saved_world: int, world: int) -> None:
    """ConfigError (with the reason and the fix) if this run cannot resume `path` on `world` ranks."""
    problems = unsupported(cfg)
    if problems:
        raise ConfigError([dataclasses.replace(
            p, message=f"{path} was written by {saved_world} ranks, this launch has {world}: "
            + p.message) for p in problems])


# ------------------------------------------------------------------ the batch
def saved_batch(state: dict, cfg: RunConfig) -> tuple[int, int]:
    """(micro batch, global batch) the checkpoint was trained with (older checkpoints without the
    record: the run file's, at the checkpoint's world size)."""
    batch = state.get("batch") or {}
    if "global" in batch and "micro" in batch:
        return int(batch["micro"]), int(batch["global"])
    micro, _, glob = batch_sizes(cfg, int(state["world_size"]))
    return micro, glob


def keep_batch(cfg: RunConfig, state: dict, world: int) -> tuple[RunConfig, Optional[str]]:
    """The run config for `world` ranks resuming the checkpoint whose trainer_state is `state`:
    grad_accum recomputed so the global batch stays the checkpoint's, unless the run file changed
    the batch since (then its batch is used). Returns (config, a note for the resume line or
    None). ConfigError naming the keys and the fix if the batch cannot be kept."""
    saved_world = int(state["world_size"])
    if saved_world == world:
        return cfg, None
    micro, glob = saved_batch(state, cfg)
    t = cfg.train
    try:
        then = batch_sizes(cfg, saved_world)[2]
    except ValueError:
        then = None
    if t.micro_batch_size != micro or then != glob:
        return cfg, "the run file changed the batch since the checkpoint"
    try:
        now = batch_sizes(cfg, world)[2]
    except ValueError:
        now = None
    old_accum = glob // (micro * saved_world)
    if now == glob:  # the run file's global_batch_size keeps it by itself
        accum = glob // (micro * world)
        return cfg, (f"grad_accum {old_accum} -> {accum} keeps the global batch of {glob}"
                     if accum != old_accum else None)
    accum = derived_accum(glob, micro, world)
    if accum is None:
        from launcher.config.batch import dividing_ranks
        sizes = [m for m in range(1, glob + 1) if glob % (m * world) == 0]
        fixes = [f"set train.micro_batch_size to {sizes[-1]} (keeps {glob})"] if sizes else []
        fixes.append(f"set train.global_batch_size to a multiple of {micro * world} (changes the "
                     "batch from here on)")
        fixes.append("resume on " + ", ".join(map(str, dividing_ranks(glob, micro, 16)))
                     + " ranks")
        fix = ", or ".join(fixes)
        raise ConfigError([Problem("train.grad_accum", f"the checkpoint's global batch of {glob} "
                                   f"(written by {saved_world} ranks) cannot be kept on {world} "
                                   f"ranks: it is not a multiple of micro_batch_size x ranks = "
                                   f"{micro} x {world}", fix)])
    train = dataclasses.replace(t, grad_accum=accum, global_batch_size=glob)
    return dataclasses.replace(cfg, train=train), \
        f"grad_accum {old_accum} -> {accum} keeps the global batch of {glob}"


# ------------------------------------------------------------------ the data order
def sampler_state(state: dict, cfg: RunConfig, world: int, warn: Any = None) -> dict:
    """The sampler position for `world` ranks of micro batch train.micro_batch_size that continues
    at the global example where the checkpoint's ranks stopped."""
    saved = state["sampler"]
    micro, _ = saved_batch(state, cfg)
    consumed = int(saved["position"]) * int(state["world_size"]) * micro
    per_micro = cfg.train.micro_batch_size * world
    position, rest = divmod(consumed, per_micro)
    if rest and warn:
        warn(f"the data position ({consumed} examples into epoch {saved['epoch']}) is not a whole "
             f"number of micro batches of {per_micro} over {world} ranks: {per_micro - rest} "
             "examples of this epoch are skipped")
    return {"epoch": int(saved["epoch"]), "position": position + (1 if rest else 0)}


# ------------------------------------------------------------------ conversion
def universal_dir(path: str) -> str:
    return os.path.join(path, UNIVERSAL)


def ready(path: str) -> bool:
    """A complete universal form of the checkpoint at path exists (it is renamed into place
    only when complete)."""
    return os.path.isdir(os.path.join(universal_dir(path), "ds", "zero"))


def convert(path: str, tag: str = "ds") -> str:
    """Convert the checkpoint folder `path` (DeepSpeed tag `tag`) into its universal form, once:
    written into path/.tmp-universal and renamed to path/universal when complete. Call on one
    rank. Returns the universal folder. HF models carry no universal-checkpoint info in their
    state, which the converter's --inject_missing_state adds."""
    from deepspeed.checkpoint import ds_to_universal

    final = universal_dir(path)
    if ready(path):
        return final
    tmp = os.path.join(path, TMP_UNIVERSAL)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    args = converter_args(input_folder=os.path.join(path, tag),
                              output_folder=os.path.join(tmp, tag))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        ds_to_universal.main(args)
    if os.path.exists(final):  # an incomplete leftover (renamed in only when complete: not ours)
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def converter_args(**paths: str) -> Any:
    """ds_to_universal.main's arguments: one process (no worker pool inside a rank), strict
    checks, the universal info injected."""
    import types
    return types.SimpleNamespace(num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True, **paths)


# ------------------------------------------------------------------ segments
def record_segment(run_dir: str, step: int, world: int) -> None:
    """Append this launch to RUN_DIR/segments.jsonl (rank 0): the step it starts from and its
    world size, which `ftlaunch status` shows per segment."""
    import json
    import time

    from launcher.cluster import layout
    rec = {"step": step, "world_size": world, "job": os.environ.get("SLURM_JOB_ID"),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(os.path.join(run_dir, layout.SEGMENTS), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


def segments(run_dir: str, step: int) -> list[dict]:
    """The launches of a run as segments {"from", "to", "world_size", "job"}: each from the step
    it started at to the next launch's start (the last to `step`, where the run stands)."""
    import json

    from launcher.cluster import layout
    try:
        with open(os.path.join(run_dir, layout.SEGMENTS), encoding="utf-8") as fh:
            recs = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return []
    out = []
    for i, r in enumerate(recs):
        end = recs[i + 1]["step"] if i + 1 < len(recs) else max(step, r["step"])
        out.append({"from": r["step"], "to": end, "world_size": r["world_size"], "job": r.get("job")})
    return out
