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

Stopping: SIGTERM, SIGINT and SIGUSR1 set a flag, and the file RUN_DIR/STOP asks for a stop too.
At every optimizer-step boundary the ranks agree (one all_reduce that also carries the loss),
write a checkpoint, print `stopped at step N; checkpoint PATH; resume with: ...`, remove STOP and
exit with 75 (layout.EXIT_STOPPED). Rank 0 writes RUN_DIR/exit_status.json as it exits (a rank
that fails first writes it with its own error: see _write_status). A dead
peer ends the job: every collective times out after train.dist_timeout_s.

Resume (train.resume: auto): the newest complete checkpoint whose files check out (size and
sha256, launcher/checkpoint.py) restores weights, optimizer, LR schedule, sampler position, RNG
states and the metrics file, so the losses continue exactly as without the interruption.

FTLAUNCH_NO_SAVE=1 (set by `ftlaunch run --dry-run`) skips checkpoints and the export.
On CPU, DeepSpeed's shm_comm op is not built (see `skip_cpu_shm_op`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from launcher import checkpoint, data, dist_env, export, faults, layout
from launcher.config import RunConfig
from launcher.dist_env import RankEnv
from launcher.errors import ConfigError, Problem
from launcher.freeze import FreezeReport

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ------------------------------------------------------------------ stop requests
class StopRequest:
    """SIGTERM / SIGINT / SIGUSR1 set a flag (first signal wins the name); see module doc."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self) -> None:
        self.signal: Optional[str] = None

    def install(self) -> "StopRequest":
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            print(f"ftlaunch: {self.signal} received: stopping at the next step boundary "
                  "(after a checkpoint)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None


# ------------------------------------------------------------------ setup pieces
def resolve_device(cfg: RunConfig) -> str:
    """"cuda" or "cpu": train.device, with auto -> cuda when a GPU is visible."""
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    from launcher import ds_config
    try:
        return ds_config.build(cfg, env.world_size, "cpu" if device == "cpu" else "cuda")
    except ValueError as exc:
        raise ConfigError([Problem("train.global_batch_size", f"{exc} (world size {env.world_size})",
                                   "make global_batch_size a multiple of micro_batch_size x ranks")])


def load_tokenizer(cfg: RunConfig, *, main: bool = True) -> Any:
    """The tokenizer (model.tokenizer or the model folder); no pad token -> EOS, with a warning."""
    from transformers import AutoTokenizer
    path = cfg.model.tokenizer or cfg.model.path
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError([Problem("model.tokenizer" if cfg.model.tokenizer else "model.path",
                                   f"cannot load a tokenizer from {path}: {exc}",
                                   "point model.tokenizer at a folder saved with save_pretrained")])
    if tok.pad_token is None and tok.eos_token is not None:
        if main:
            print("ftlaunch: warning: the tokenizer has no pad token; using its EOS token "
                  f"{tok.eos_token!r} (padding is masked out of attention and loss)",
                  file=sys.stderr, flush=True)
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: RunConfig, device: str, ds_config: dict) -> tuple[Any, Any]:
    """from_pretrained in model.dtype (quantized with bitsandbytes if asked). Under ZeRO-3 an
    HfDeepSpeedConfig is made first, so zero.Init partitions the weights as they load; it is
    returned and must stay alive as long as the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher import quantize
    hf_ds = None
    kwargs: dict[str, Any] = {"dtype": getattr(torch, DTYPES[cfg.model.dtype]),
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
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           optimizer=optimizer, config=ds_config)
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

    from launcher import freeze, validate
    env = env or dist_env.from_environ()
    hf_logging.disable_progress_bar()
    device = init_distributed(cfg, env)
    ds_config = build_ds_config(cfg, env, device)
    seed_everything(cfg.train.seed)  # identical new-module weights (LoRA) on every rank
    tokenizer = load_tokenizer(cfg, main=env.is_main)
    splits = None
    if load_data:  # before the model: bad data fails in seconds, not after a 100 GB load
        mcfg = validate.model_config(cfg.model.path) or {}
        splits = data.load(cfg, tokenizer, max_positions=validate.max_positions(mcfg))
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


class Metrics:
    """metrics.jsonl, one JSON object a line, appended by rank 0 and flushed every line."""

    def __init__(self, path: str, main: bool):
        self.path, self.main = path, main

    def offset(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def truncate(self, offset: int) -> None:
        """Drop lines written after a checkpoint we resume from (they will be written again)."""
        if self.main and os.path.exists(self.path) and os.path.getsize(self.path) > offset:
            with open(self.path, "r+b") as fh:
                fh.truncate(offset)

    def write(self, record: dict) -> None:
        if self.main:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def _write_status(cfg: RunConfig, env: RankEnv, code: int, step: int, ckpt: Optional[str],
                  message: str, *, since: Optional[float] = None) -> None:
    """RUN_DIR/exit_status.json: how the run ended. Rank 0 records every ending; any rank records
    its own failure (code not 0 or 75), and the first failure recorded since `since` (this
    launch's start) stands: a peer's consequent error (a closed connection, a timeout) never
    replaces the root cause."""
    failed = code not in (layout.EXIT_OK, layout.EXIT_STOPPED)
    if not (env.is_main or failed):
        return
    import socket

    from launcher.rundir import read_exit_status, write_atomic
    if failed and since is not None:
        first = read_exit_status(cfg.run_dir, since)  # this launch's, if any
        if (first is not None and first.get("code") not in (layout.EXIT_OK, layout.EXIT_STOPPED)
                and first.get("rank") != env.rank):
            return
    try:
        write_atomic(os.path.join(cfg.run_dir, layout.EXIT_STATUS), json.dumps(
            {"code": code, "step": step, "checkpoint": ckpt, "message": message,
             "rank": env.rank, "host": socket.gethostname(),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    except OSError:
        pass


def resume_command(cfg: RunConfig) -> str:
    import shlex
    resolved = os.path.join(cfg.run_dir, layout.RESOLVED)
    return f"ftlaunch run {shlex.quote(resolved)} --resume"


# ------------------------------------------------------------------ the loop
def train_loop(s: Setup, stop: Optional[StopRequest] = None) -> int:
    """Train from the newest checkpoint (or step 0) to train.max_steps. Returns the exit code:
    0 done, 75 stopped on request after a checkpoint."""
    import torch
    from tqdm import tqdm

    from launcher.validate import batch_sizes
    cfg, env, engine, t = s.cfg, s.env, s.engine, s.cfg.train
    stop = stop or StopRequest()
    run_dir, main = cfg.run_dir, s.env.is_main
    saving = os.environ.get("FTLAUNCH_NO_SAVE", "") != "1"
    stop_file = os.path.join(run_dir, layout.STOP_REQUEST)
    _, accum, _ = batch_sizes(cfg, env.world_size)
    train_set = s.splits.train
    sampler = data.Sampler(len(train_set), rank=env.rank, world_size=env.world_size,
                           micro_batch_size=t.micro_batch_size, seed=t.seed, shuffle=cfg.data.shuffle)
    os.makedirs(run_dir, exist_ok=True)
    metrics = Metrics(os.path.join(run_dir, layout.METRICS), main)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    last_ckpt, last_ckpt_step = None, -1
    resume_from = checkpoint.choose_resume(run_dir) if t.resume == "auto" else None
    if resume_from:
        state, rank_state = checkpoint.load(engine, resume_from)
        step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        elapsed_before = float(state.get("elapsed_s", 0.0))
        sampler.load_state_dict(rank_state["sampler"])
        metrics.truncate(int(state.get("metrics_offset", 0)))
        last_ckpt, last_ckpt_step = resume_from, step
        if main:
            print(f"ftlaunch: resumed from {resume_from} (step {step})", file=sys.stderr, flush=True)
    elif main and saving:
        metrics.truncate(0)

    def save(at: int) -> str:
        nonlocal last_ckpt, last_ckpt_step
        if not saving:
            return "(not saved: dry run)"
        last_ckpt = checkpoint.save(
            engine, run_dir, at,
            {"epoch": sampler.epoch, "sampler": sampler.state_dict(), "tokens_seen": tokens_seen,
             "elapsed_s": elapsed_before + time.time() - start, "metrics_offset": metrics.offset()},
            {"sampler": sampler.state_dict()}, keep=t.keep_checkpoints)
        last_ckpt_step = at
        return last_ckpt

    def stopped(at: int, signalled: float) -> int:
        if last_ckpt_step == at or (at == 0 and last_ckpt is None):
            path = last_ckpt  # nothing new to save
        else:
            path = save(at)
        if main:
            if os.path.exists(stop_file):
                os.remove(stop_file)  # honoured: a resumed run must not stop again at once
            why = stop.signal or ("a signal to another rank" if signalled else "STOP file")
            where = f"checkpoint {path}" if path else "nothing trained yet, no checkpoint"
            print(f"stopped at step {at} ({why}); {where}; resume with: {resume_command(cfg)}",
                  flush=True)
        _write_status(cfg, env, layout.EXIT_STOPPED, at, path, "stopped on request")
        return layout.EXIT_STOPPED

    start = time.time()
    bar = tqdm(total=t.max_steps, initial=step, disable=not main, desc="train", unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    batches = iter(sampler)
    window_t, window_tokens = time.time(), 0.0
    engine.train()
    # agree on a stop before the first step too (a signal while loading, a STOP left behind)
    signalled, stop_file_seen = _all_reduce_sum([float(stop.requested),
                                                 float(main and os.path.exists(stop_file))])
    if signalled or stop_file_seen:
        bar.close()
        return stopped(step, signalled)
    while step < t.max_steps:
        lr = float(engine.optimizer.param_groups[0]["lr"])  # what this step applies
        loss_sum, tokens = 0.0, 0.0
        for micro in range(accum):
            batch = _to_device(data.collate([train_set[i] for i in next(batches)], s.pad_id),
                               s.device)
            loss = engine(**batch).loss
            if micro == 0:
                faults.fault("backward", step + 1, env.rank, run_dir)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach().float())
            tokens += float(batch["attention_mask"].sum())
        step += 1
        faults.fault("step", step, env.rank, run_dir)
        # one collective a step: the loss for the log and the stop agreement
        loss_all, micro_all, tokens_all, signalled, stop_file_seen = _all_reduce_sum(
            [loss_sum, float(accum), tokens, float(stop.requested),
             float(main and os.path.exists(stop_file))])
        tokens_seen += int(tokens_all)
        window_tokens += tokens_all
        if step % t.log_every == 0 or step == t.max_steps:
            now = time.time()
            norm = engine.get_global_grad_norm()
            rec = {"step": step, "loss": loss_all / micro_all, "lr": lr,
                   "grad_norm": float(norm) if norm is not None else None,
                   "tokens_per_s": window_tokens / max(now - window_t, 1e-9),
                   "elapsed_s": round(elapsed_before + now - start, 3)}
            metrics.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            window_t, window_tokens = now, 0.0
        bar.update(1)
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            metrics.write({"step": step, "eval_loss": evaluate(s),
                           "elapsed_s": round(elapsed_before + time.time() - start, 3)})
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
            save(step)
        if (signalled or stop_file_seen) and step < t.max_steps:
            bar.close()
            return stopped(step, signalled)
    bar.close()
    if s.splits.eval is not None:
        ev = evaluate(s)
        metrics.write({"step": step, "eval_loss": ev,
                       "elapsed_s": round(elapsed_before + time.time() - start, 3)})
        if main:
            print(f"ftlaunch: eval loss {ev:.4f} at step {step}", file=sys.stderr, flush=True)
    path = save(step) if last_ckpt_step != step else last_ckpt
    if saving and cfg.output.save_final:
        final = export.save_final(engine, cfg, s.tokenizer, os.path.join(run_dir, layout.FINAL))
        if main:
            print(f"ftlaunch: exported {final}", file=sys.stderr, flush=True)
    if main and os.path.exists(stop_file):
        os.remove(stop_file)  # asked too late to matter: the run is complete
    _write_status(cfg, env, layout.EXIT_OK, step, path, "done")
    if main:
        print(f"done: {step} steps; checkpoint {path}", flush=True)
    return layout.EXIT_OK


# ------------------------------------------------------------------ entry point
def _ensure_run_dir(cfg: RunConfig, env: RankEnv, ds_config_dict: dict) -> None:
    """A rank started by hand on a run file: create the run directory (rank 0) if needed."""
    from launcher import rundir
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
    stop = StopRequest().install()
    try:
        s = setup(cfg, env)
        _ensure_run_dir(cfg, env, s.ds_config)
        if env.is_main:
            text = s.report.render()
            from launcher.rundir import write_atomic
            write_atomic(os.path.join(cfg.run_dir, layout.FREEZE_REPORT), text)
            print(text, end="", flush=True)
        code = train_loop(s, stop)
        shutdown(barrier=True)
        return code
    except ConfigError as exc:
        if env.is_main:  # every rank has the same problem: rank 0 speaks for them
            print(exc.render(), file=sys.stderr, flush=True)
            _write_status(cfg, env, layout.EXIT_CONFIG, -1, None, exc.render())
        return layout.EXIT_CONFIG
    except checkpoint.CheckpointError as exc:
        print(f"ftlaunch: rank {env.rank}: {exc}", file=sys.stderr, flush=True)
        if env.is_main:  # checkpoint errors are agreed collectively and name the rank
            _write_status(cfg, env, 1, -1, None, str(exc))
        return 1
    except Exception as exc:
        _write_status(cfg, env, 1, -1, None, f"rank {env.rank}: {type(exc).__name__}: {exc}",
                      since=started)
        raise
