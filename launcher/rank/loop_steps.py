"""The pieces of the training loop (launcher/rank/train.py `train_loop` reads top to bottom over them):
where a rank stands (`Progress`, restored by `begin` from the newest checkpoint), one optimizer
step's micro batches (`accumulate`), the metrics line, evaluation, checkpoints, and the three
ways a loop ends: finished (`finish`), stopped on request (`stopped`, exit 75) or stopped by the
loss watchdog (`diverged`, exit 76). Every function takes the rank's `Setup` (launcher/rank/train.py).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from launcher.rank import checkpoint, export, faults, longseq, lr_schedule, metrics, timeouts
from launcher import data
from launcher.cluster import layout, reshard, run_state
from launcher.config.batch import batch_sizes
from launcher.rank.collectives import all_reduce_sum
from launcher.data import loader
from launcher.common.log import get_logger
from launcher.rank.watchdog import Watchdog

log = get_logger(__name__)
Setup = Any  # launcher.rank.train.Setup (built by train.setup; not imported: train imports this module)


def rank0_phase(t: Any) -> Any:
    """Collectives wait train.save_timeout_s inside, train.dist_timeout_s again after
    (launcher/rank/timeouts.py)."""
    return timeouts.rank0_phase(t.save_timeout_s, t.dist_timeout_s)


def to_device(batch: dict, device: str) -> dict:
    """The batch's tensors on `device`; other values (flash attention's max lengths) as they are."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def collate_for(s: Setup) -> Any:
    """The batches' collate: packed rows in the form the model's attention kernel needs
    (preference objectives: pairs, launcher/data/pairs.py); for a loss computed in the loop
    (launcher/rank/longseq.py), this rank's slice of the sequences."""
    if s.cfg.train.objective != "sft":
        from launcher.data.pairs import pair_collate
        return pair_collate(s.pad_id)
    if longseq.active(s.cfg):
        import functools
        return functools.partial(longseq.sp_collate, pad_id=s.pad_id, size=s.sp.size, rank=s.sp.rank)
    return data.model_collate(s.model, s.pad_id, s.cfg.model.dtype)


def evaluate(s: Setup) -> float:
    """Token-weighted mean loss over the eval split. Every rank runs the same number of forward
    passes (ZeRO-3 gathers parameters in each), padding its share with zero-weight batches."""
    import torch
    ev = s.splits.eval if s.splits else None
    if ev is None or len(ev) == 0:
        return float("nan")
    if s.cfg.train.objective != "sft":
        from launcher.rank import preference
        return preference.evaluate(s)
    (rank, world), micro = s.dp, s.cfg.train.micro_batch_size
    mine = list(range(rank, len(ev), world))
    n_batches = math.ceil(math.ceil(len(ev) / world) / micro)
    weights = [1.0 if mine[b * micro:(b + 1) * micro] else 0.0 for b in range(n_batches)]
    if s.eval_batches is None:  # built once: its workers (data.num_workers) persist
        lists = [mine[b * micro:(b + 1) * micro] or [0] for b in range(n_batches)]
        s.eval_batches = loader.batches(ev, lists, collate_for(s), s.cfg.data.num_workers)
    loss_sum, count = 0.0, 0.0
    s.engine.eval()
    with torch.no_grad():
        for weight, batch in zip(weights, s.eval_batches):
            batch.pop("num_tokens", None)
            if longseq.active(s.cfg):  # every rank of a sequence-parallel group: the same loss, n
                _, loss, n = longseq.micro_loss(s.engine, s.hidden, to_device(batch, s.device),
                                                s.sp, s.cfg.train.tiled_loss)
                loss_sum = loss_sum + loss.float() * (weight * n)
                continue
            n = float((batch["labels"][:, 1:] != data.IGNORE).sum())  # on the host, before the copy
            batch = to_device(batch, s.device)
            out = s.engine(**batch)
            loss_sum = loss_sum + out.loss.detach().float() * (weight * n)  # stays on the device
            count += weight * n
    s.engine.train()
    total, n = all_reduce_sum([loss_sum, count], s.device)
    return total / n if n else float("nan")


# ------------------------------------------------------------------ the loop
@dataclass
class Progress:
    """Where a rank's training stands (what a checkpoint records) and the current metrics window."""

    sampler: data.Sampler
    metrics: metrics.Metrics
    accum: int                       # micro batches per optimizer step
    saving: bool                     # False under FTLAUNCH_NO_SAVE=1 (dry run)
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0      # seconds trained by earlier launches (from the checkpoint)
    start: float = 0.0               # time.time() when this launch's loop began
    last_ckpt: Optional[str] = None
    last_ckpt_step: int = -1
    window_start: float = 0.0        # the tokens/s window of the next metrics line
    window_tokens: float = 0.0
    window_steps: int = 0
    resumed_at: int = -1             # the step of the checkpoint this launch resumed from
    trackers: Any = None             # metrics.Trackers (output.report_to), rank 0
    pref: dict = None                # preference objectives: this step's metric sums (accumulate)
    pref_means: dict = None          # ... and their means over all ranks (train_loop)

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.time() - self.start, 3)


def begin(s: Setup) -> Progress:
    """The loop's starting point: step 0, or the newest complete checkpoint (train.resume auto),
    whose weights, optimizer, sampler position and metrics file are restored."""
    cfg, env, t = s.cfg, s.env, s.cfg.train
    dp_rank, dp_world = s.dp  # a sequence-parallel group reads one share of the data
    sampler = data.Sampler(len(s.splits.train), rank=dp_rank, world_size=dp_world,
                           micro_batch_size=t.micro_batch_size, seed=t.seed, shuffle=cfg.data.shuffle,
                           mixture=s.splits.mixture)
    os.makedirs(cfg.run_dir, exist_ok=True)
    _, accum, _ = batch_sizes(cfg, env.world_size)
    p = Progress(sampler, metrics.Metrics(os.path.join(cfg.run_dir, layout.METRICS), env.is_main),
                 accum, saving=os.environ.get("FTLAUNCH_NO_SAVE", "") != "1")
    with rank0_phase(t):  # hashing the checkpoint's files, loading it
        resume_from = checkpoint.choose_resume(cfg.run_dir) if t.resume == "auto" else None
        if resume_from:
            run_state.check_resume_step(checkpoint.step_of(resume_from), resume_from, t.max_steps)
            state, rank_state = checkpoint.load(s.engine, resume_from, cfg)
    if resume_from:
        p.step, p.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        p.elapsed_before = float(state.get("elapsed_s", 0.0))
        if "sampler" not in rank_state:  # written by another number of ranks (launcher/cluster/reshard.py)
            rank_state["sampler"] = reshard.sampler_state(state, cfg, env.world_size, log.warning)
            was = int(state["world_size"])
            log.info(f"resuming {resume_from} (written by {was} rank{'s' if was > 1 else ''}) on "
                     f"{env.world_size} through its universal checkpoint "
                     f"{reshard.universal_dir(resume_from)}"
                     + (f"; {s.resume_note}" if s.resume_note else ""))
        sampler.load_state_dict(rank_state["sampler"])
        p.metrics.truncate(int(state.get("metrics_offset", 0)))
        p.last_ckpt, p.last_ckpt_step, p.resumed_at = resume_from, p.step, p.step
        lr = lr_schedule.set_next(s.engine, p.step, t)
        log.info(f"resumed from {resume_from} (step {p.step}); step {p.step + 1} of "
                 f"{t.max_steps} runs at lr {lr:.3g}")
    elif env.is_main and p.saving:
        p.metrics.truncate(0)
    if env.is_main and p.saving:
        reshard.record_segment(cfg.run_dir, p.step, env.world_size)
    p.trackers = metrics.Trackers.open(cfg, p.step, main=env.is_main and p.saving)
    p.start = p.window_start = time.time()  # this launch's clock (elapsed_s adds elapsed_before)
    return p


def save(s: Setup, p: Progress, at: int) -> str:
    """A checkpoint of step `at` (collective); its path."""
    if not p.saving:
        return "(not saved: dry run)"
    sampler = p.sampler
    with rank0_phase(s.cfg.train):  # DeepSpeed's rank 0 writes the model states, ours prunes
        p.last_ckpt = checkpoint.save(
            s.engine, s.cfg.run_dir, at,
            {"epoch": sampler.epoch, "sampler": sampler.state_dict(), "tokens_seen": p.tokens_seen,
             "batch": dict(zip(("micro", "accum", "global"),
                               batch_sizes(s.cfg, s.env.world_size))),
             "elapsed_s": p.elapsed_before + time.time() - p.start,
             "metrics_offset": p.metrics.offset()},
            {"sampler": sampler.state_dict()}, keep=s.cfg.train.keep_checkpoints,
            exclude_frozen=s.cfg.freeze.policy == "lora")
    p.last_ckpt_step = at
    return p.last_ckpt


def stopped(s: Setup, p: Progress, stop: run_state.StopRequest, signalled: float) -> int:
    """Checkpoint (unless the newest one is of this step), say how to resume, exit 75."""
    cfg, at = s.cfg, p.step
    p.trackers.close()
    if p.last_ckpt_step == at or (at == 0 and p.last_ckpt is None):
        path = p.last_ckpt  # nothing new to save
    else:
        path = save(s, p, at)
    if s.env.is_main:
        run_state.clear_stop(cfg.run_dir)  # honoured: a resumed run must not stop again at once
        why = stop.signal or ("a signal to another rank" if signalled else "STOP file")
        where = f"checkpoint {path}" if path else "nothing trained yet, no checkpoint"
        print(f"stopped at step {at} ({why}); {where}; resume with: "
              f"{run_state.resume_command(cfg.run_dir)}", flush=True)
    run_state.write_exit_status(cfg.run_dir, s.env.rank, layout.EXIT_STOPPED, at, path,
                                "stopped on request")
    return layout.EXIT_STOPPED


def accumulate(s: Setup, p: Progress, batches: Any) -> tuple[Any, float]:
    """One optimizer step's accum micro batches forward and backward. The last `engine.step()`
    (where DeepSpeed applies the update) is left to the caller, after the ranks agreed on the
    loss (the watchdog). Returns (sum of the micro losses, a 0-d tensor on the device; tokens seen)."""
    engine = s.engine
    loss_sum: Any = 0.0  # a tensor on the engine's device after the first micro batch: no host
    n_tokens = 0.0       # synchronisation per micro batch (the step's all-reduce reads it once)
    p.pref = {}
    for micro in range(p.accum):
        batch = next(batches)  # collated (data.loader.train_batches)
        n_tokens += float(batch.pop("num_tokens"))
        batch = to_device(batch, s.device)
        if s.cfg.train.objective != "sft":  # a micro batch of pairs (launcher/rank/preference.py)
            from launcher.rank import preference
            loss, stats = preference.forward(s, batch)
            shown = loss
            p.pref = {k: p.pref.get(k, 0.0) + v for k, v in stats.items()}
        elif longseq.active(s.cfg):  # the loss computed here: sequence parallel, tiled
            loss, shown, _ = longseq.micro_loss(engine, s.hidden, batch, s.sp, s.cfg.train.tiled_loss,
                                                s.cfg.train.activation_offload and s.device != "cpu")
        else:
            loss = shown = engine(**batch).loss
        if faults.fault("loss", p.step + 1, s.env.rank, s.cfg.run_dir):
            loss = loss * float("nan")  # injected: FTLAUNCH_FAULT=loss@N:nan
            shown = shown * float("nan")
        if micro == 0:
            faults.fault("backward", p.step + 1, s.env.rank, s.cfg.run_dir)
        engine.backward(loss)
        if micro < p.accum - 1:
            engine.step()
        loss_sum = loss_sum + shown.detach().float()
    return loss_sum, n_tokens


def diverged(s: Setup, p: Progress, why: str) -> int:
    """The watchdog fired (launcher/rank/watchdog.py): checkpoint the last good step, exit 76."""
    cfg, at = s.cfg, p.step
    path = p.last_ckpt if p.last_ckpt_step == at or at == 0 else save(s, p, at)
    msg = f"loss watchdog: {why}; stopped at step {at}, its update not applied"
    if s.env.is_main:
        where = f"checkpoint of the last good step: {path}" if path else "nothing saved (step 0)"
        print(f"ftlaunch: {msg}; {where}. {Watchdog.advice()} "
              f"({run_state.resume_command(cfg.run_dir)})", file=sys.stderr, flush=True)
    run_state.write_exit_status(cfg.run_dir, s.env.rank, layout.EXIT_DIVERGED, at, path, msg)
    return layout.EXIT_DIVERGED


def log_step(s: Setup, p: Progress, bar: Any, loss: float, lr: float) -> None:
    """A metrics line for the step just taken (rates over the window since the last line)."""
    now = time.time()
    norm = s.engine.get_global_grad_norm()
    window = max(now - p.window_start, 1e-9)
    rec = {"step": p.step, "loss": loss, "lr": lr,
           "grad_norm": float(norm) if norm is not None else None,
           "tokens_per_s": p.window_tokens / window,
           "step_time_s": round(window / max(p.window_steps, 1), 4),
           **(p.pref_means or {}), **metrics.memory_fields(s.device),
           "elapsed_s": round(p.elapsed_before + now - p.start, 3)}
    p.metrics.write(rec)
    p.trackers.log(p.step, {k: v for k, v in rec.items() if k not in ("step", "elapsed_s")}, "train")
    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}",
                    tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
    p.window_start, p.window_tokens, p.window_steps = now, 0.0, 0


def finish(s: Setup, p: Progress) -> int:
    """After the last step: final evaluation, checkpoint, export; exit 0."""
    cfg, run_dir = s.cfg, s.cfg.run_dir
    if s.splits.eval is not None and p.resumed_at != p.step:  # else it is in metrics.jsonl
        write_eval(p, evaluate(s))
    path = save(s, p, p.step) if p.last_ckpt_step != p.step else p.last_ckpt
    if p.saving and cfg.output.save_final:
        with rank0_phase(cfg.train):  # rank 0 merges and writes while the others wait
            final = export.save_final(s.engine, cfg, s.tokenizer,
                                      os.path.join(run_dir, layout.FINAL))
        log.info(f"exported {final}")
    if s.env.is_main:
        run_state.clear_stop(run_dir)  # asked too late to matter: the run is complete
    run_state.write_exit_status(run_dir, s.env.rank, layout.EXIT_OK, p.step, path, "done")
    if s.env.is_main:
        print(f"done: {p.step} steps; checkpoint {path}", flush=True)
    p.trackers.close()
    return layout.EXIT_OK


def write_eval(p: Progress, loss: float) -> float:
    """Record an evaluation (metrics.jsonl, trackers) and print it, mid-run as at the end."""
    log.info(f"eval loss {loss:.4f} at step {p.step}")
    p.metrics.write({"step": p.step, "eval_loss": loss, "elapsed_s": p.elapsed()})
    p.trackers.log(p.step, {"loss": loss}, "eval")
    return loss
