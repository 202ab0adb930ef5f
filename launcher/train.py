"""The per-rank entry point: `ftlaunch train RUN.yaml [key.sub=value ...]`.

Every rank runs this file top to bottom; the launcher only decides how many run and where:

    ftlaunch run RUN.yaml                                        # does the next line for you
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m launcher train RUN.yaml
    deepspeed --num_gpus 8 --module launcher train RUN.yaml      # the deepspeed launcher
    srun ... torchrun --nnodes $SLURM_NNODES --node_rank $SLURM_NODEID ... -m launcher train RUN.yaml
    python -m launcher train RUN.yaml                            # one process, rank 0 of 1

The order is the point of the project:

    rank environment -> deepspeed.init_distributed       (before from_pretrained: ZeRO-3 partitions
                                                          the weights while they load)
    tokenizer, model (quantized if asked)
    gradient checkpointing
    freeze policy (launcher/freeze.py)                   (before the optimizer and initialize, so
                                                          ZeRO allocates state for trainable only)
    deepspeed.initialize(model_parameters=trainable)
    data -> loop -> checkpoints -> export

Stopping: SIGTERM, SIGINT and SIGUSR1 set a flag, and the file RUN_DIR/STOP asks for a stop too
(launcher/run_state.py). At every optimizer-step boundary the ranks agree (one all_reduce that
also carries the loss), write a checkpoint, print `stopped at step N; checkpoint PATH; resume
with: ...`, remove STOP and exit with 75 (layout.EXIT_STOPPED). Rank 0 writes
RUN_DIR/exit_status.json as it exits (a rank that fails first writes it with its own error:
run_state.write_exit_status). A dead peer ends the job: every collective times out after
train.dist_timeout_s.

Resume (train.resume: auto): the newest complete checkpoint whose files check out (size and
sha256, launcher/checkpoint.py) restores weights, optimizer, LR schedule, sampler position, RNG
states and the metrics file, so the losses continue exactly as without the interruption.

FTLAUNCH_NO_SAVE=1 (set by `ftlaunch run --dry-run`) skips checkpoints and the export.
On CPU, DeepSpeed's shm_comm op is not built (see `skip_cpu_shm_op`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from launcher import (checkpoint, data, dist_env, export, faults, inputs, layout, lr_schedule,
                      metrics, run_state, rundir)
from launcher.batch import batch_sizes
from launcher.config import RunConfig
from launcher.device import resolve_device, torch_dtype
from launcher.dist_env import RankEnv
from launcher.errors import ConfigError
from launcher.freeze import FreezeReport
from launcher.log import get_logger

log = get_logger(__name__)


# ------------------------------------------------------------------ setup pieces
def skip_cpu_shm_op() -> None:
    """Do not build DeepSpeed's CPU shm_comm op (about 33 s and 4 GB the first time).

    deepspeed/comm/torch.py builds it in `TorchBackend.__init__` and uses it only in
    `inference_all_reduce` (tensor-parallel inference kernels); training collectives go
    through torch.distributed (gloo) either way. DeepSpeed treats a missing op as "not
    compatible" (build_shm_op returns None), which is what this arranges."""
    import importlib
    mod = importlib.import_module("deepspeed.comm.torch")
    mod = sys.modules.get("deepspeed.comm.torch", mod)  # `deepspeed.comm.torch` the attribute is torch
    if hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


def inherit_timeout(timeout: Any) -> None:
    """Make every process group created from now on use `timeout`. DeepSpeed reduces gradients
    on groups of its own (`dist.new_group` without a timeout), which torch would give its 30-min
    default: a rank frozen mid-backward would then hang the job for half an hour instead of
    train.dist_timeout_s."""
    from torch.distributed import distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def init_distributed(cfg: RunConfig, env: RankEnv) -> str:
    """Export the rank variables, start the process group (gloo on CPU, nccl on GPUs) with the
    collective timeout train.dist_timeout_s. Returns the device string ("cpu" or "cuda:N")."""
    import datetime

    device = resolve_device(cfg)
    dist_env.export(env)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import warnings

    import torch
    import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls these torch collectives by their old names on every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    if device == "cpu":
        skip_cpu_shm_op()
    else:
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl",
                               auto_mpi_discovery=False, verbose=False, timeout=timeout)
    inherit_timeout(timeout)
    return "cpu" if device == "cpu" else f"cuda:{env.local_rank}"


def build_ds_config(cfg: RunConfig, env: RankEnv, device: str) -> dict:
    """The DeepSpeed config for this launch's world size. A batch that does not split over
    env.world_size ranks is a ConfigError naming train.global_batch_size (ds_config.build)."""
    from launcher import ds_config
    return ds_config.build(cfg, env.world_size, "cpu" if device == "cpu" else "cuda")


def load_model(cfg: RunConfig, device: str, ds_config: dict) -> tuple[Any, Any]:
    """from_pretrained in model.dtype (quantized with bitsandbytes if asked). Under ZeRO-3 an
    HfDeepSpeedConfig is made first, so zero.Init partitions the weights as they load; it is
    returned and must stay alive as long as the model."""
    from transformers import AutoModelForCausalLM

    from launcher import quantize
    hf_ds = None
    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg.model.dtype),
                              "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.quantization.mode != "none":
        quantize.check_installed(cfg)
        kwargs.update(quantize.load_kwargs(cfg, device))
    elif cfg.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **kwargs)
    quantize.prepare(model, cfg)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, hf_ds


def build_engine(cfg: RunConfig, model: Any, ds_config: dict) -> Any:
    """deepspeed.initialize over the parameters that require grad now (call after the freeze
    policy). adamw: DeepSpeed builds the optimizer from ds_config; 8-bit: bitsandbytes'."""
    import deepspeed

    from launcher import quantize
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if cfg.train.optimizer != "adamw":
        optimizer = quantize.build_8bit_optimizer(cfg, trainable)
    # launcher/lr_schedule.py's schedule wins over ds_config.json's (no zero-lr step)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: lr_schedule.install(opt, cfg.train))
    return engine


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (transformers.set_seed would import peft and bitsandbytes,
    seconds per rank)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything a rank trains with; `setup()` builds it, `train_loop()` uses it."""

    cfg: RunConfig
    env: RankEnv
    device: str
    ds_config: dict
    engine: Any
    tokenizer: Any
    report: FreezeReport
    splits: Optional[data.Splits]
    pad_id: int
    hf_ds_config: Any = None  # keeps ZeRO-3's zero.Init hook alive (transformers holds a weakref)

    @property
    def model(self) -> Any:
        return self.engine.module


def setup(cfg: RunConfig, env: Optional[RankEnv] = None, *, load_data: bool = True) -> Setup:
    """Distributed init, tokenizer, model, freeze policy, engine, data (see the module docstring
    for why in this order). Collective: every rank calls it."""
    import torch
    from transformers.utils import logging as hf_logging

    from launcher import freeze
    env = env or dist_env.from_environ()
    hf_logging.disable_progress_bar()
    device = init_distributed(cfg, env)
    ds_config = build_ds_config(cfg, env, device)
    seed_everything(cfg.train.seed)  # identical new-module weights (LoRA) on every rank
    tokenizer = inputs.load_tokenizer(cfg)
    splits = None
    if load_data:  # before the model: bad data fails in seconds, not after a 100 GB load
        splits = inputs.load_data(cfg, tokenizer)
    pad_id = data.tokenizer_pad_id(tokenizer, warn=lambda m: None)
    model, hf_ds = load_model(cfg, device, ds_config)
    model, report = freeze.apply(model, cfg)
    engine = build_engine(cfg, model, ds_config)
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout differs per rank, reproducibly
    return Setup(cfg, env, device, ds_config, engine, tokenizer, report, splits, pad_id, hf_ds)


# ------------------------------------------------------------------ loop helpers
def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(s: Setup) -> float:
    """Token-weighted mean loss over the eval split. Every rank runs the same number of forward
    passes (ZeRO-3 gathers parameters in each), padding its share with zero-weight batches."""
    import torch
    ev = s.splits.eval if s.splits else None
    if ev is None or len(ev) == 0:
        return float("nan")
    micro, rank, world = s.cfg.train.micro_batch_size, s.env.rank, s.env.world_size
    mine = list(range(rank, len(ev), world))
    n_batches = math.ceil(math.ceil(len(ev) / world) / micro)
    loss_sum, count = 0.0, 0.0
    s.engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * micro:(b + 1) * micro]
            weight = 1.0 if idx else 0.0
            batch = _to_device(data.collate([ev[i] for i in (idx or [0])], s.pad_id), s.device)
            out = s.engine(**batch)
            n = float((batch["labels"][:, 1:] != data.IGNORE).sum())
            loss_sum += weight * float(out.loss.float()) * n
            count += weight * n
    s.engine.train()
    total, n = _all_reduce_sum([loss_sum, count])
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

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.time() - self.start, 3)


def begin(s: Setup) -> Progress:
    """The loop's starting point: step 0, or the newest complete checkpoint (train.resume auto),
    whose weights, optimizer, sampler position and metrics file are restored."""
    cfg, env, t = s.cfg, s.env, s.cfg.train
    sampler = data.Sampler(len(s.splits.train), rank=env.rank, world_size=env.world_size,
                           micro_batch_size=t.micro_batch_size, seed=t.seed, shuffle=cfg.data.shuffle)
    os.makedirs(cfg.run_dir, exist_ok=True)
    _, accum, _ = batch_sizes(cfg, env.world_size)
    p = Progress(sampler, metrics.Metrics(os.path.join(cfg.run_dir, layout.METRICS), env.is_main),
                 accum, saving=os.environ.get("FTLAUNCH_NO_SAVE", "") != "1")
    resume_from = checkpoint.choose_resume(cfg.run_dir) if t.resume == "auto" else None
    if resume_from:
        run_state.check_resume_step(checkpoint.step_of(resume_from), resume_from, t.max_steps)
        state, rank_state = checkpoint.load(s.engine, resume_from)
        p.step, p.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        p.elapsed_before = float(state.get("elapsed_s", 0.0))
        sampler.load_state_dict(rank_state["sampler"])
        p.metrics.truncate(int(state.get("metrics_offset", 0)))
        p.last_ckpt, p.last_ckpt_step, p.resumed_at = resume_from, p.step, p.step
        lr = lr_schedule.set_next(s.engine, p.step, t)
        log.info(f"resumed from {resume_from} (step {p.step}); step {p.step + 1} of "
                 f"{t.max_steps} runs at lr {lr:.3g}")
    elif env.is_main and p.saving:
        p.metrics.truncate(0)
    p.trackers = metrics.Trackers.open(cfg, p.step, main=env.is_main and p.saving)
    p.start = p.window_start = time.time()  # this launch's clock (elapsed_s adds elapsed_before)
    return p


def save(s: Setup, p: Progress, at: int) -> str:
    """A checkpoint of step `at` (collective); its path."""
    if not p.saving:
        return "(not saved: dry run)"
    sampler = p.sampler
    p.last_ckpt = checkpoint.save(
        s.engine, s.cfg.run_dir, at,
        {"epoch": sampler.epoch, "sampler": sampler.state_dict(), "tokens_seen": p.tokens_seen,
         "elapsed_s": p.elapsed_before + time.time() - p.start, "metrics_offset": p.metrics.offset()},
        {"sampler": sampler.state_dict()}, keep=s.cfg.train.keep_checkpoints)
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


def accumulate(s: Setup, p: Progress, batches: Any) -> tuple[float, float]:
    """One optimizer step: accum micro batches forward and backward (DeepSpeed steps the
    optimizer on the last). Returns (sum of the micro losses, tokens seen)."""
    engine = s.engine
    loss_sum, tokens = 0.0, 0.0
    for micro in range(p.accum):
        batch = _to_device(data.collate([s.splits.train[i] for i in next(batches)], s.pad_id),
                           s.device)
        loss = engine(**batch).loss
        if micro == 0:
            faults.fault("backward", p.step + 1, s.env.rank, s.cfg.run_dir)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach().float())
        tokens += float(batch["attention_mask"].sum())
    return loss_sum, tokens


def log_step(s: Setup, p: Progress, bar: Any, loss: float, lr: float) -> None:
    """A metrics line for the step just taken (rates over the window since the last line)."""
    now = time.time()
    norm = s.engine.get_global_grad_norm()
    window = max(now - p.window_start, 1e-9)
    rec = {"step": p.step, "loss": loss, "lr": lr,
           "grad_norm": float(norm) if norm is not None else None,
           "tokens_per_s": p.window_tokens / window,
           "step_time_s": round(window / max(p.window_steps, 1), 4),
           "memory_bytes": metrics.memory_bytes(s.device),
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
        log.info(f"eval loss {write_eval(p, evaluate(s)):.4f} at step {p.step}")
    path = save(s, p, p.step) if p.last_ckpt_step != p.step else p.last_ckpt
    if p.saving and cfg.output.save_final:
        final = export.save_final(s.engine, cfg, s.tokenizer, os.path.join(run_dir, layout.FINAL))
        log.info(f"exported {final}")
    if s.env.is_main:
        run_state.clear_stop(run_dir)  # asked too late to matter: the run is complete
    run_state.write_exit_status(run_dir, s.env.rank, layout.EXIT_OK, p.step, path, "done")
    if s.env.is_main:
        print(f"done: {p.step} steps; checkpoint {path}", flush=True)
    p.trackers.close()
    return layout.EXIT_OK


def write_eval(p: Progress, loss: float) -> float:
    p.metrics.write({"step": p.step, "eval_loss": loss, "elapsed_s": p.elapsed()})
    p.trackers.log(p.step, {"loss": loss}, "eval")
    return loss


def train_loop(s: Setup, stop: Optional[run_state.StopRequest] = None) -> int:
    """Train from the newest checkpoint (or step 0) to train.max_steps. Returns the exit code:
    0 done, 75 stopped on request after a checkpoint."""
    from tqdm import tqdm

    t, engine = s.cfg.train, s.engine
    stop = stop or run_state.StopRequest()
    if t.resume == "auto" and run_state.announce_finished(s.cfg.run_dir, t.max_steps, s.env.is_main):
        return layout.EXIT_OK  # the last launch finished at or past max_steps: nothing changes
    p = begin(s)
    bar = tqdm(total=t.max_steps, initial=p.step, disable=not s.env.is_main, desc="train",
               unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    batches = iter(p.sampler)
    engine.train()
    # agree on a stop before the first step too (a signal while loading, a STOP left behind)
    signalled, stop_file_seen = _all_reduce_sum(stop.votes(s.cfg.run_dir, s.env.is_main))
    if signalled or stop_file_seen:
        bar.close()
        return stopped(s, p, stop, signalled)
    while p.step < t.max_steps:
        lr = float(engine.optimizer.param_groups[0]["lr"])  # what this step applies
        loss_sum, tokens = accumulate(s, p, batches)
        p.step += 1
        faults.fault("step", p.step, s.env.rank, s.cfg.run_dir)
        # one collective a step: the loss for the log and the stop agreement
        loss_all, micro_all, tokens_all, signalled, stop_file_seen = _all_reduce_sum(
            [loss_sum, float(p.accum), tokens] + stop.votes(s.cfg.run_dir, s.env.is_main))
        p.tokens_seen += int(tokens_all)
        p.window_tokens += tokens_all
        p.window_steps += 1
        if p.step % t.log_every == 0 or p.step == t.max_steps:
            log_step(s, p, bar, loss_all / micro_all, lr)
        bar.update(1)
        if t.eval_every and p.step % t.eval_every == 0 and p.step < t.max_steps:
            write_eval(p, evaluate(s))
        if t.checkpoint_every and p.step % t.checkpoint_every == 0 and p.step < t.max_steps:
            save(s, p, p.step)
        if (signalled or stop_file_seen) and p.step < t.max_steps:
            bar.close()
            return stopped(s, p, stop, signalled)
    bar.close()
    return finish(s, p)


# ------------------------------------------------------------------ entry point
def _ensure_run_dir(cfg: RunConfig, env: RankEnv, ds_config_dict: dict) -> None:
    """A rank started by hand on a run file: create the run directory (rank 0) if needed."""
    if env.is_main and not os.path.exists(os.path.join(cfg.run_dir, layout.RESOLVED)):
        rundir.prepare(cfg, ds_config_dict, on_existing="resume")
    os.makedirs(cfg.run_dir, exist_ok=True)


def shutdown(*, barrier: bool) -> None:
    """Leave the process group cleanly (a rank that exits while a peer still talks to it can
    make gloo abort the peer)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def main(args: Any) -> int:
    from launcher import runfile
    cfg = runfile.load(args.run_file, args.overrides)
    env = dist_env.from_environ()
    started = time.time() - 1  # mtime granularity: a failure in this launch is at or after it
    stop = run_state.StopRequest().install()
    try:
        s = setup(cfg, env)
        _ensure_run_dir(cfg, env, s.ds_config)
        if env.is_main:
            text = s.report.render()
            rundir.write_atomic(os.path.join(cfg.run_dir, layout.FREEZE_REPORT), text)
            print(text, end="", flush=True)
        code = train_loop(s, stop)
        shutdown(barrier=True)
        print(f"DBG {env.rank} shutdown done {time.time():.2f}", flush=True)
        import threading; print("DBG threads", [t.name for t in threading.enumerate()], flush=True)
        return run_state.rank_exit_code(code)
    except ConfigError as exc:
        if env.is_main:  # every rank has the same problem: rank 0 speaks for them
            print(exc.render(), file=sys.stderr, flush=True)
            run_state.write_exit_status(cfg.run_dir, env.rank, layout.EXIT_CONFIG, -1, None,
                                        exc.render())
        return layout.EXIT_CONFIG
    except checkpoint.CheckpointError as exc:
        print(f"ftlaunch: rank {env.rank}: {exc}", file=sys.stderr, flush=True)
        if env.is_main:  # checkpoint errors are agreed collectively and name the rank
            run_state.write_exit_status(cfg.run_dir, env.rank, 1, -1, None, str(exc))
        return 1
    except Exception as exc:
        run_state.write_exit_status(cfg.run_dir, env.rank, 1, -1, None,
                                    f"rank {env.rank}: {type(exc).__name__}: {exc}", since=started)
        raise
