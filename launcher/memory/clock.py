"""How long a run takes: tokens, FLOPs per step, wall time and GPU-hours, and the job's --time.

    est = estimate(cfg)          # Estimate: steps, tokens, FLOPs, seconds, where each comes from
    text(est)                    # the lines `ftlaunch plan` prints
    auto_time(cfg, est)          # (--time, the lines saying how) for cluster.time: auto

The step time is, in this order of preference:
1. measured: the run directory's own logged steps (metrics.jsonl), else a dry run's of the
   same settings (`ftlaunch run --dry-run` keeps it in the cache; launcher/cluster/step_time.py);
2. estimated: FLOPs per step per GPU (launcher/memory/flops.py) / (the card's peak dense FLOP/s
   for the training dtype (launcher/config/gpus.py) x an assumed model FLOPs utilization, ASSUMED_MFU).

After a dry run, the estimate of the whole run adds, as separate terms (`fixed_terms`): the
ranks' start-up and shut-down, the first steps' warm-up, the evaluations and the checkpoint
saves at their configured intervals (each timed once by the dry run; a checkpoint too large to
write in a dry run at the assumed 1 GB/s per node), and the export (assumed rate).
`Estimate.total_s` is their sum with the training steps.

Tokens per epoch come from the tokenized cache where the data was tokenized already (the data
check of `ftlaunch run`, or a rank, wrote it: launcher/data/cache.py), else from the data files
(characters / 4, stated as an estimate). A step's FLOPs are counted for rows of max_seq_len
tokens when packing (every row is full), else for rows of the mean sequence length when the
cache knows it (batches pad to their longest row: the work is somewhat higher), else for rows
of max_seq_len (an upper bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from launcher.config.schema import RunConfig

ASSUMED_MFU = 0.35       # model FLOPs utilization assumed before anything was measured
LOAD_BYTES_PER_S = 1e9   # reading the weights, writing checkpoints: 1 GB/s per node, assumed
LOAD_FIXED_S = 120       # start-up: imports, process group, tokenizer, data (assumed)
TRAIN_MARGIN = 0.10      # on top of the training time: step-time spread, evaluation


@dataclass
class Estimate:
    steps: int
    steps_how: str
    sequences_per_step: int          # global batch
    seq: int                         # tokens per row the FLOPs are counted for
    seq_how: str
    tokens_per_epoch: Optional[int]
    tokens_how: str
    flops_per_sequence: Any          # flops.StepFlops
    world: int
    peak: Optional[float]            # peak FLOP/s of one GPU for the training dtype
    peak_how: str
    mfu: float
    step_s: Optional[float]          # seconds per optimizer step
    step_how: str
    notes: list[str] = field(default_factory=list)
    fixed: list[tuple[str, float]] = field(default_factory=list)  # (what, seconds): fixed_terms

    @property
    def flops_per_step(self) -> int:
        return self.flops_per_sequence.total * self.sequences_per_step

    @property
    def train_s(self) -> Optional[float]:
        return None if self.step_s is None else self.step_s * self.steps

    @property
    def total_s(self) -> Optional[float]:
        """The whole run: the steps plus the fixed terms (start-up, warm-up, evaluations,
        checkpoints, export) where a dry run measured them."""
        return None if self.train_s is None else self.train_s + sum(s for _, s in self.fixed)

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.train_s is None else self.train_s * self.world / 3600

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "steps_how": self.steps_how,
                "sequences_per_step": self.sequences_per_step, "seq": self.seq,
                "tokens_per_epoch": self.tokens_per_epoch, "tokens_how": self.tokens_how,
                "flops_per_sequence": self.flops_per_sequence.to_dict(),
                "flops_per_step": self.flops_per_step, "world": self.world, "peak": self.peak,
                "peak_how": self.peak_how, "mfu": self.mfu, "step_s": self.step_s,
                "step_how": self.step_how, "train_s": self.train_s, "gpu_hours": self.gpu_hours,
                "fixed": [{"what": w, "seconds": x} for w, x in self.fixed],
                "total_s": self.total_s, "notes": self.notes}


def _cached_stats(cfg: RunConfig) -> Optional[dict]:
    """The tokenized data's stats (train_examples, train_tokens) where the cache holds it, found
    from the data and tokenizer files alone (launcher/data/cache.py `known_stats`: no tokenizer
    loaded, so no transformers import); None where it holds none (the estimate from the files)."""
    from launcher.model import info as model_info
    from launcher.data.cache import known_stats
    try:
        return known_stats(cfg, model_info.folder_max_positions(cfg.model.path))
    except Exception:   # noqa: BLE001 - an unreadable entry: the estimate from the files
        return None


def _tokens(cfg: RunConfig, world: int) -> tuple[int, str, Optional[int], str, int, str]:
    """(steps, how; tokens per epoch, how; row length for the FLOPs, how)."""
    from launcher.config import epochs
    from launcher.config.batch import batch_sizes
    d, t = cfg.data, cfg.train
    stats = _cached_stats(cfg)
    if stats and stats.get("train_examples") and stats.get("train_tokens"):
        n, tokens = int(stats["train_examples"]), int(stats["train_tokens"])
        tok_how = f"{n:,} sequences, counted by the tokenized cache"
        if t.max_steps is not None:
            steps, steps_how = t.max_steps, "train.max_steps"
        else:
            micro, accum, _ = batch_sizes(cfg, world)
            steps = epochs.steps_for_epochs(t.epochs or 1, n, world, micro, accum)
            steps_how = f"train.epochs {t.epochs:g} over {n:,} tokenized sequences"
        mean = max(1, round(tokens / n))
        if d.packing:
            seq, seq_how = d.max_seq_len, "packed rows of max_seq_len"
        else:
            seq, seq_how = min(mean, d.max_seq_len), ("the mean sequence length (batches pad to "
                                                      "their longest row: somewhat more work)")
        return steps, steps_how, tokens, tok_how, seq, seq_how
    n, how = epochs.estimated_sequences(cfg)
    steps, note = epochs.planned_steps(cfg, world)
    steps_how = "train.max_steps" if not note else f"train.epochs {t.epochs:g}, {note}"
    tokens = n * d.max_seq_len if d.packing else None
    tok_how = (f"estimated: {how} (characters / {epochs.CHARS_PER_TOKEN}), not tokenized yet"
               if d.packing else f"not tokenized yet ({how}): `ftlaunch data` or a dry run counts them")
    seq_how = "packed rows of max_seq_len" if d.packing else \
        "max_seq_len (the data is not tokenized yet: an upper bound)"
    return steps, steps_how, tokens, tok_how, d.max_seq_len, seq_how


def estimate(cfg: RunConfig, world: Optional[int] = None) -> Estimate:
    """The run's time estimate on `world` ranks (default: the cluster's)."""
    from launcher.cluster import step_time
    from launcher.config.batch import batch_sizes
    from launcher.config.gpus import lookup
    from launcher.memory.flops import count
    world = world or cfg.world_size
    steps, steps_how, tokens, tok_how, seq, seq_how = _tokens(cfg, world)
    _, _, global_batch = batch_sizes(cfg, world)
    fl = count(cfg, seq)
    card = lookup(cfg.cluster.gpu_type) if cfg.cluster.gpu_type else None
    notes: list[str] = []
    peak, peak_how = None, "no cluster.gpu_type: no peak FLOP/s to divide by"
    if cfg.train.device == "cpu":
        peak_how = "CPU ranks: no peak in the table, only a measured step time counts"
    elif card is not None:
        peak, unit = card.peak_flops(cfg.model.dtype, cfg.train.tf32)
        peak_how = (f"{card.name}: {peak / 1e12:,.1f} TFLOP/s {unit} dense ({card.source})"
                    if peak else f"{card.name} has no {cfg.model.dtype} figure")
    got = step_time.measured(cfg, world)
    if got is not None:
        step_s, step_how = got
    elif peak:
        step_s = fl.total * global_batch / world / (peak * ASSUMED_MFU)
        step_how = (f"estimated: FLOPs per GPU / ({peak / 1e12:,.0f} TFLOP/s x assumed MFU "
                    f"{ASSUMED_MFU:.0%}); `ftlaunch run --dry-run` or the job's first steps "
                    "replace it with a measured one")
    else:
        step_s, step_how = None, "unknown: set cluster.gpu_type, or measure it with `ftlaunch run --dry-run`"
    stale = step_time.stale_note(cfg)
    if stale and got is None:
        notes.append(stale)
    if cfg.quantization.mode != "none" and got is None:
        notes.append("quantized base: dequantizing the weights in every product makes the real "
                     "utilization lower than the assumed one")
    rec = step_time.dry_record(cfg)
    fixed = fixed_terms(cfg, steps, rec) if rec is not None and step_s is not None else []
    return Estimate(steps, steps_how, global_batch, seq, seq_how, tokens, tok_how, fl, world,
                    peak, peak_how, ASSUMED_MFU, step_s, step_how, notes, fixed)


# ------------------------------------------------------------------ the run's fixed costs
def times_due(every: Any, steps: int, epochs: Optional[float]) -> int:
    """How often an eval_every / checkpoint_every of `every` (0, N or "epoch") acts before the
    last step (launcher/rank/train.py: at step s < steps with s % N == 0, or at an epoch's end);
    the one at the end of the run (`finish`) is not counted here."""
    if every == "epoch":
        return max(0, math.ceil(epochs or 1) - 1)
    return (steps - 1) // int(every) if every and steps > 0 else 0


def run_terms(rec: dict, evals: int, saves: int, save_assumed: Optional[tuple[float, str]],
              export: Optional[tuple[float, str]] = None) -> list[tuple[str, float]]:
    """(what, seconds) a run spends besides its steps, from a dry run's record `rec`
    (launcher/cluster/step_time.py `record_dry_run`): start-up and shut-down, the first steps'
    warm-up, `evals` evaluations and `saves` checkpoint saves (timed once each by the dry run;
    a save it did not time: save_assumed = (seconds, how)), and the export (seconds, how)."""
    out: list[tuple[str, float]] = []
    if rec.get("startup_s") is not None:
        out.append(("start-up and shut-down (dry run: the ranks' wall time less their loop)",
                    float(rec["startup_s"])))
    if rec.get("warmup_extra_s") is not None and rec.get("warmup_steps"):
        out.append((f"warm-up (dry run: the first {rec['warmup_steps']} steps beyond the median)",
                    float(rec["warmup_extra_s"])))
    if evals:
        if rec.get("eval_s") is not None:
            each = float(rec["eval_s"])
            out.append((f"{evals} evaluation{'s' if evals > 1 else ''} x {each:.3g} s (dry run)",
                        evals * each))
        else:
            out.append((f"{evals} evaluation{'s' if evals > 1 else ''} (not timed: the dry run "
                        "had no eval data)", 0.0))
    if saves:
        plural = "s" if saves > 1 else ""
        if rec.get("checkpoint_s") is not None:
            each = float(rec["checkpoint_s"])
            out.append((f"{saves} checkpoint save{plural} x {each:.3g} s (dry run)", saves * each))
        elif save_assumed is not None:
            each, how = save_assumed
            out.append((f"{saves} checkpoint save{plural} x {each:.3g} s ({how})", saves * each))
    if export is not None:
        out.append(export)
    return out


def fixed_terms(cfg: RunConfig, steps: int, rec: dict) -> list[tuple[str, float]]:
    """run_terms for cfg: evaluations and checkpoints at train.eval_every / checkpoint_every
    over `steps` steps, plus the one each at the end (the final evaluation where there is eval
    data; the final checkpoint always)."""
    t, d = cfg.train, cfg.data
    has_eval = bool(d.eval_path) or d.eval_fraction > 0
    evals = times_due(t.eval_every, steps, t.epochs) + 1 if has_eval else 0
    saves = times_due(t.checkpoint_every, steps, t.epochs) + 1
    save_assumed = export = None
    needs_inventory = rec.get("checkpoint_s") is None or cfg.output.save_final
    inv = _inventory(cfg) if needs_inventory else None
    rate = LOAD_BYTES_PER_S * max(1, cfg.cluster.nodes)
    if inv is not None:
        size = _checkpoint_bytes(cfg, inv)
        save_assumed = (size / rate, f"{size / 1e9:.2g} GB at 1 GB/s per node, assumed")
        if cfg.output.save_final:
            lora_only = cfg.freeze.policy == "lora" and not cfg.output.merge_lora
            exported = inv.trainable * inv.lp_bytes if lora_only else inv.weight_bytes
            export = (f"export (output.save_final: {exported / 1e9:.2g} GB at 1 GB/s, assumed)",
                      exported / LOAD_BYTES_PER_S)
    return run_terms(rec, evals, saves, save_assumed, export)


def _inventory(cfg: RunConfig) -> Any:
    from launcher.memory.inventory import inventory
    try:
        return inventory(cfg)
    except Exception:   # noqa: BLE001 - no model to count: the term is left out
        return None


def _h(seconds: float) -> str:
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _t(seconds: float) -> str:
    """A duration for the wall-time line: tenths of a second under a minute."""
    return f"{seconds:.1f}s" if seconds < 60 else _h(seconds)


def _f(x: float) -> str:
    return f"{x:.3g}"


def text(est: Estimate) -> str:
    """The time section of `ftlaunch plan`."""
    fl = est.flops_per_sequence
    lines = ["time:"]
    if est.tokens_per_epoch:
        lines.append(f"  tokens per epoch   {est.tokens_per_epoch:,} ({est.tokens_how})")
    else:
        lines.append(f"  tokens per epoch   {est.tokens_how}")
    lines.append(f"  steps              {est.steps:,} ({est.steps_how}), {est.sequences_per_step} "
                 f"sequences of {est.seq} tokens a step ({est.seq_how})")
    lines.append(f"  FLOPs per step     {_f(est.flops_per_step)}: forward {_f(fl.forward * est.sequences_per_step)} "
                 f"(attention n^2 {_f(fl.attention_forward * est.sequences_per_step)}), backward "
                 f"{_f(fl.backward * est.sequences_per_step)} (activations "
                 f"{_f(fl.backward_input * est.sequences_per_step)}, weights "
                 f"{_f(fl.backward_weight * est.sequences_per_step)}, attention "
                 f"{_f(fl.backward_attention * est.sequences_per_step)}), recompute "
                 f"{_f(fl.recompute * est.sequences_per_step)}")
    lines.append(f"  per GPU            {_f(est.flops_per_step / est.world)} FLOPs a step on "
                 f"{est.world} ranks; peak {est.peak_how}")
    if est.step_s is None:
        lines.append(f"  step time          {est.step_how}")
    else:
        lines.append(f"  step time          {est.step_s:.3g} s ({est.step_how})")
        if est.fixed:
            lines.append(f"  wall time          {_t(est.total_s)} = training {_t(est.train_s)} "
                         f"({est.steps:,} steps x {est.step_s:.3g} s)"
                         + "".join(f" + {what} {_t(x)}" for what, x in est.fixed)
                         + f"; {est.gpu_hours:,.1f} GPU-hours of training on {est.world} ranks")
        else:
            lines.append(f"  wall time          {_h(est.train_s)} of training, {est.gpu_hours:,.1f} "
                         f"GPU-hours on {est.world} ranks (load, checkpoints and export not "
                         "included: a dry run measures them)")
    for n in est.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ cluster.time: auto
def checkpoint_bytes(cfg: RunConfig) -> int:
    """Bytes a checkpoint of cfg writes (`_checkpoint_bytes` over the model's inventory)."""
    from launcher.memory.inventory import inventory
    return _checkpoint_bytes(cfg, inventory(cfg))


def _checkpoint_bytes(cfg: RunConfig, inv: Any) -> int:
    """Bytes a checkpoint writes: the weights in the training dtype (LoRA: adapters alone), fp32
    masters and two Adam moments of what trains."""
    trainable = inv.trainable
    weights = trainable * inv.lp_bytes if cfg.freeze.policy == "lora" else inv.weight_bytes
    return weights + 12 * trainable


def _checkpoints(cfg: RunConfig, steps: int) -> int:
    every = cfg.train.checkpoint_every
    if every == "epoch":
        return max(1, math.ceil(cfg.train.epochs or 1))
    return steps // int(every) if every else 0


def margin(cfg: RunConfig, est: Estimate) -> list[tuple[str, float]]:
    """(what, seconds) added to the training time for --time."""
    from launcher.memory.inventory import inventory
    from launcher.checks.slurm_checks import SIGNAL_EARLY_S
    inv = inventory(cfg)
    rate = LOAD_BYTES_PER_S * max(1, cfg.cluster.nodes)
    ckpt = _checkpoint_bytes(cfg, inv)
    n_ckpt = _checkpoints(cfg, est.steps) + 1
    out = [("load (start-up + weights at 1 GB/s per node)", LOAD_FIXED_S + inv.weight_bytes / rate)]
    if cfg.cluster.preflight:
        out.append(("preflight (cluster.preflight_timeout_s)", float(cfg.cluster.preflight_timeout_s)))
    out.append((f"{n_ckpt} checkpoint(s) of {ckpt / 1e9:.1f} GB at 1 GB/s per node", n_ckpt * ckpt / rate))
    if cfg.output.save_final:
        lora_only = cfg.freeze.policy == "lora" and not cfg.output.merge_lora
        exported = inv.trainable * inv.lp_bytes if lora_only else inv.weight_bytes
        out.append(("export (output.save_final)", exported / LOAD_BYTES_PER_S))
    out.append((f"{TRAIN_MARGIN:.0%} of the training time", TRAIN_MARGIN * (est.train_s or 0)))
    out.append((f"grace_s {cfg.cluster.grace_s} + Slurm's early signal {SIGNAL_EARLY_S} s",
                float(cfg.cluster.grace_s + SIGNAL_EARLY_S)))
    return out


def auto_time(cfg: RunConfig, est: Estimate, max_time: Optional[str]) -> tuple[str, list[str]]:
    """(--time for cluster.time: auto, the lines that say how); max_time: the partition's
    MaxTime (None: no cap). ConfigError when the step time is unknown."""
    from launcher.config.errors import ConfigError, Problem
    from launcher.checks.slurm_checks import MIN_WORK_S, SIGNAL_EARLY_S, time_limit_s
    from launcher.cluster.step_time import time_limit
    if est.train_s is None:
        raise ConfigError([Problem("cluster.time", f"auto cannot estimate the run's time: step "
                                   f"time {est.step_how}",
                                   "set cluster.gpu_type (the peak FLOP/s), run `ftlaunch run "
                                   "--dry-run` to measure a step, or give cluster.time as H:MM:SS")],
                          "time estimate")
    parts = margin(cfg, est)
    total = est.train_s + sum(s for _, s in parts)
    total = max(total, cfg.cluster.grace_s + SIGNAL_EARLY_S + MIN_WORK_S)
    limit = time_limit(total)
    lines = [f"cluster.time auto: {limit} = training {_h(est.train_s)} ({est.step_how.split(':')[0]})"
             + "".join(f" + {what} {_h(s)}" for what, s in parts)]
    cap = time_limit_s(max_time) if max_time else None
    if cap and time_limit_s(limit) > cap:
        jobs = math.ceil(total / max(1, cap - cfg.cluster.grace_s - SIGNAL_EARLY_S - LOAD_FIXED_S))
        lines.append(f"capped at the partition's MaxTime {max_time}: the run continues through the "
                     f"time-limit signal (checkpoint grace_s {cfg.cluster.grace_s} s before the "
                     f"limit), requeue and resume, about {jobs} jobs"
                     + ("" if cfg.cluster.requeue and cfg.cluster.max_restarts >= jobs - 1 else
                        f"; cluster.requeue {str(cfg.cluster.requeue).lower()}, max_restarts "
                        f"{cfg.cluster.max_restarts}: raise max_restarts to {jobs - 1} or more, or "
                        "the run stops before it is done"))
        limit = max_time
    return limit, lines


def plan_time_lines(cfg: RunConfig, est: Estimate) -> list[str]:
    """What cluster.time auto would set (and its cap), for `ftlaunch plan`; [] for a given time
    or when the step time is unknown (validate says why)."""
    from launcher.cluster.step_time import partition_max_time
    if cfg.cluster.time != "auto" or est.train_s is None:
        return []
    return auto_time(cfg, est, partition_max_time(cfg.cluster.partition))[1]


def plan_section(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """The time section of `ftlaunch plan`: (its text, its JSON)."""
    est = estimate(cfg)
    limit = plan_time_lines(cfg, est)
    return (text(est) + "".join(f"  {line}\n" for line in limit),
            {**est.to_dict(), "time_limit": limit})


def resolve_time(cfg: RunConfig) -> tuple[RunConfig, list[str], dict[str, Any]]:
    """cfg with cluster.time auto replaced by the estimate (capped at the partition's MaxTime
    from `scontrol show partition`); the lines saying how; the estimate as a dict (written to
    RUN_DIR/estimate.json for `ftlaunch status`)."""
    import dataclasses

    from launcher.cluster.step_time import partition_max_time
    est = estimate(cfg)
    limit, lines = auto_time(cfg, est, partition_max_time(cfg.cluster.partition))
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, time=limit))
    return cfg, lines, {**est.to_dict(), "time_limit": limit, "how": lines}
