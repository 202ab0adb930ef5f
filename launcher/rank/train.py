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
    freeze policy (launcher/model/freeze.py)                   (before the optimizer and initialize, so
                                                          ZeRO allocates state for trainable only)
    deepspeed.initialize(model_parameters=trainable)
    data -> loop -> checkpoints -> export

Stopping: SIGTERM, SIGINT and SIGUSR1 set a flag, and the file RUN_DIR/STOP asks for a stop too
(launcher/cluster/run_state.py). At an optimizer-step boundary the ranks agree
(launcher/rank/loop_sync.py: at the step where it is seen while the loss watchdog is on, one step
later without it), write a checkpoint, print `stopped at step N; checkpoint PATH; resume with:
...`, remove STOP and exit with 75 (layout.EXIT_STOPPED). Rank 0 writes
RUN_DIR/exit_status.json as it exits (a rank that fails first writes it with its own error:
run_state.write_exit_status). A dead peer ends the job: every collective times out after
train.dist_timeout_s.

Resume (train.resume: auto): the newest complete checkpoint whose files check out (size and
sha256, launcher/rank/checkpoint.py) restores weights, optimizer, LR schedule, sampler position, RNG
states and the metrics file, so the losses continue exactly as without the interruption.

FTLAUNCH_NO_SAVE=1 (set by `ftlaunch run --dry-run`) skips checkpoints and the export.
On CPU, DeepSpeed's shm_comm op is not built (see `skip_cpu_shm_op`).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from launcher.rank import checkpoint, faults, inputs, longseq, lr_schedule, timeouts
from launcher import data
from launcher.model import decay, tokens
from launcher.cluster import dist_env, layout, run_state, rundir
from launcher.config import epochs
from launcher.rank.watchdog import Watchdog
from launcher.config.schema import RunConfig
from launcher.data import loader
from launcher.model.device import (rank_device_index, resolve_device, restore_node_devices, torch_dtype,
                             visible_gpus)
from launcher.cluster.dist_env import RankEnv
from launcher.config.errors import ConfigError
from launcher.model.freeze import FreezeReport
from launcher.common.log import get_logger
from launcher.rank.loop_sync import StepSync
from launcher.rank.startup import StartClock
from launcher.rank.loop_steps import (Progress, accumulate, begin,  # noqa: F401
                                 collate_for, diverged, evaluate, finish, log_step, save,
                                 stopped, to_device, write_eval)

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


MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer",
                "deepspeed.runtime.zero.muon.original_muon")


def skip_muon_import() -> None:
    """Do not import DeepSpeed's Muon optimizer modules (about 1.4 s of CPU on every rank's start).

    DeepSpeed imports deepspeed.runtime.zero.muon's muon_optimizer and original_muon inside
    `deepspeed.initialize` (the ZeRO optimizer check, the ZeRO-3 and bf16 optimizers' set-up) and
    on ZeRO's gradient paths, only to ask `isinstance(optimizer, MuonWithAuxAdam)` or to have
    `muon_update` at hand for parameters marked `use_muon`; their `@compiler.compile()`
    decorators import torch._inductor. ftlaunch never builds a Muon optimizer (train.optimizer is
    adamw or a bitsandbytes 8-bit one; validate refuses an optimizer block of another type) and
    never marks a parameter, so stand-in modules answer: a MuonWithAuxAdam class nothing is an
    instance of, and functions that refuse to run."""
    import types

    class MuonWithAuxAdam:  # nothing is an instance of it
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _no_muon()

    def _no_muon(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ftlaunch does not train with DeepSpeed's Muon optimizer "
                           "(train.optimizer chooses the optimizer)")

    for name in MUON_MODULES:
        if name in sys.modules:
            continue
        module = types.ModuleType(name, "ftlaunch's stand-in: launcher/rank/train.py "
                                        "skip_muon_import")
        module.MuonWithAuxAdam = MuonWithAuxAdam  # type: ignore[attr-defined]
        module.muon_update = module.adam_update = _no_muon  # type: ignore[attr-defined]
        sys.modules[name] = module


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
    collective timeout train.dist_timeout_s. Returns the device string ("cpu" or "cuda:N", N
    from launcher/model/device.py `rank_device_index`: the local rank modulo the visible devices)."""
    import datetime

    restore_node_devices(os.environ, env.launcher)  # before CUDA reads CUDA_VISIBLE_DEVICES
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
    skip_muon_import()
    if device == "cpu":
        skip_cpu_shm_op()
    else:
        timeouts.nccl_debug_env(cfg.run_dir)  # before the NCCL group: a timeout leaves its trace
        index = rank_device_index(env.local_rank, visible_gpus())
        torch.cuda.set_device(index)
        # DeepSpeed takes LOCAL_RANK for the device ordinal (init_process_group's
        # device_id=cuda:LOCAL_RANK in deepspeed/comm/torch.py, the engine's
        # `_set_distributed_vars`, zero.Init's local_device): it must name this rank's GPU
        os.environ["LOCAL_RANK"] = str(index)
        set_tf32(cfg.train.tf32)
    timeout = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl",
                               auto_mpi_discovery=False, verbose=False, timeout=timeout)
    inherit_timeout(timeout)
    return "cpu" if device == "cpu" else f"cuda:{index}"


def set_tf32(on: bool) -> None:
    """train.tf32: fp32 matmuls and cuDNN convolutions in TF32 (or strict IEEE fp32)."""
    import torch
    precision = "tf32" if on else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def build_ds_config(cfg: RunConfig, env: RankEnv, device: str) -> dict:
    """The DeepSpeed config for this launch's world size. A batch that does not split over
    env.world_size ranks is a ConfigError naming train.global_batch_size (ds_config.build)."""
    from launcher.dsconfig import build as ds_config
    return ds_config.build(cfg, env.world_size, device.split(":")[0])  # cuda:N -> cuda


def load_model(cfg: RunConfig, device: str, ds_config: dict) -> tuple[Any, Any]:
    """from_pretrained in model.dtype (quantized with bitsandbytes if asked). Under ZeRO-3 an
    HfDeepSpeedConfig is made first, so zero.Init partitions the weights as they load; it is
    returned and must stay alive as long as the model."""
    from transformers import AutoModelForCausalLM

    from launcher.model import quantize
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


def build_engine(cfg: RunConfig, model: Any, ds_config: dict, masked: Optional[list] = None,
                 mpu: Any = None) -> Any:
    """deepspeed.initialize over the parameters that require grad now (call after the freeze
    policy), in the HF Trainer's weight-decay groups (launcher/model/decay.py: no decay on biases and
    norms). adamw: DeepSpeed builds the optimizer from ds_config; 8-bit: bitsandbytes'."""
    import deepspeed

    from launcher.model import quantize
    params = decay.param_groups(model, masked or [], cfg.train.weight_decay)
    optimizer = None
    if cfg.train.optimizer != "adamw":
        optimizer = quantize.build_8bit_optimizer(cfg, params)
    # launcher/rank/lr_schedule.py's schedule wins over ds_config.json's (no zero-lr step)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config, mpu=mpu,
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
    eval_batches: Any = None  # the eval loader (data.loader.batches), made by the first evaluate
    resume_note: Optional[str] = None  # how the batch was kept for a resume on another world size
    reference: Any = None     # preference objectives: launcher/rank/preference.py Reference (or None)
    sp: Any = None            # longseq.SeqPar: this rank's sequence-parallel group
    clock: Any = None         # launcher/rank/startup.py StartClock: the start-up's phases
    hidden: Any = None        # longseq.HiddenStates when the loss is computed in the loop

    @property
    def dp(self) -> tuple[int, int]:
        """(data-parallel rank, size): ranks of one sequence-parallel group read the same data."""
        return longseq.dp_layout(self.env.rank, self.env.world_size, self.cfg.train.sequence_parallel)

    @property
    def model(self) -> Any:
        return self.engine.module


def setup(cfg: RunConfig, env: Optional[RankEnv] = None, *, load_data: bool = True,
          clock: Optional[StartClock] = None) -> Setup:
    """Distributed init, tokenizer, model, freeze policy, engine, data (see the module docstring
    for why in this order). Collective: every rank calls it. clock: marks each phase's time."""
    import torch
    from transformers.utils import logging as hf_logging

    from launcher.model import freeze
    given, clock = clock, clock or StartClock()
    env = env or dist_env.from_environ()
    hf_logging.disable_progress_bar()
    clock.mark("imports in the rank")
    device = init_distributed(cfg, env)
    clock.mark("distributed init")
    sp = longseq.init_groups(cfg.train.sequence_parallel, env.rank)
    seed_everything(cfg.train.seed)  # identical new-module weights (LoRA) on every rank
    tokenizer = inputs.load_tokenizer(cfg)  # model.pad_token / special_tokens / add_tokens added
    splits = None
    resume_note = None
    if load_data:  # before the model: bad data fails in seconds, not after a 100 GB load
        splits = inputs.load_data(cfg, tokenizer)
        if cfg.train.resume == "auto":  # a checkpoint of another world size: keep its batch
            cfg, resume_note = resume_batch(cfg, env.world_size)
        if cfg.train.epochs is not None:
            log.info(epochs.describe(cfg, len(splits.train), env.world_size))
        cfg = epochs.resolve(cfg, len(splits.train), env.world_size)  # max_steps from epochs
    clock.mark("tokenizer and data")
    ds_config = build_ds_config(cfg, env, device)
    pad_id = data.tokenizer_pad_id(tokenizer, warn=lambda m: None)
    model, hf_ds = load_model(cfg, device, ds_config)
    clock.mark("model load")
    new_rows = tokens.resize(model, tokenizer)  # before the freeze
    model, report = freeze.apply(model, cfg)
    masked = tokens.train_new_rows(model, new_rows, cfg)
    hidden = longseq.prepare_model(model, cfg, sp)
    engine = build_engine(cfg, model, ds_config, masked, longseq.mpu_for(sp))
    clock.mark("freeze and engine")
    s = Setup(cfg, env, device, ds_config, engine, tokenizer, report, splits, pad_id, hf_ds,
              sp=sp, hidden=hidden, resume_note=resume_note, clock=given)
    if cfg.train.objective != "sft":  # DPO/IPO's frozen reference (precomputed: from the data)
        from launcher.rank import preference
        s.reference = preference.build_reference(s, load_model)
        clock.mark("reference model")
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout differs per rank, reproducibly
    return s


def resume_batch(cfg: RunConfig, world: int) -> tuple[RunConfig, Optional[str]]:
    """The run config for resuming the newest checkpoint on `world` ranks: if it was written by
    another number of ranks, grad_accum recomputed to keep its global batch (launcher/cluster/reshard.py)."""
    from launcher.cluster import reshard
    state = checkpoint.peek(cfg.run_dir)
    if not state or int(state.get("world_size") or world) == world:
        return cfg, None
    return reshard.keep_batch(cfg, state, world)


def train_loop(s: Setup, stop: Optional[run_state.StopRequest] = None) -> int:
    """Train from the newest checkpoint (or step 0) to train.max_steps. Returns the exit code:
    0 done, 75 stopped on request after a checkpoint, 76 stopped by the loss watchdog."""
    from tqdm import tqdm

    t, engine = s.cfg.train, s.engine
    stop = stop or run_state.StopRequest()
    if t.resume == "auto" and run_state.announce_finished(s.cfg.run_dir, t.max_steps, s.env.is_main):
        return layout.EXIT_OK  # the last launch finished at or past max_steps: nothing changes
    p = begin(s)
    run_state.report_step(p.step)
    dog = Watchdog(t.watchdog)
    per_epoch = p.sampler.batches_per_epoch  # eval_every / checkpoint_every: epoch
    bar = tqdm(total=t.max_steps, initial=p.step, disable=not s.env.is_main, desc="train",
               unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    batches = loader.train_batches(p.sampler, s.splits.train, collate_for(s),
                                   s.cfg.data.num_workers)
    engine.train()
    sync = StepSync(s, stop)  # the loop's collectives (launcher/loop_sync.py)
    if s.clock is not None:
        s.clock.mark("resume and loop start")
        if s.env.is_main:
            s.clock.write(s.cfg.run_dir)   # RUN_DIR/startup.json
    # agree on a stop before the first step too (a signal while loading, a STOP left behind)
    signalled, stop_file_seen = sync.first_votes()
    if signalled or stop_file_seen:
        bar.close()
        return stopped(s, p, stop, signalled)
    while p.step < t.max_steps:
        lr = float(engine.optimizer.param_groups[0]["lr"])  # what this step applies
        before = p.sampler.state_dict()
        loss_sum, n_tokens = accumulate(s, p, batches)
        faults.fault("step", p.step + 1, s.env.rank, s.cfg.run_dir)
        log_due = (p.step + 1) % t.log_every == 0 or p.step + 1 == t.max_steps
        # before the update: with the watchdog on, the step's loss (and the stop votes); on a
        # logged step, a preference objective's reward metrics too
        loss, tokens_all, votes, pref = sync.agree(loss_sum, p.accum, n_tokens, log_due,
                                                   list(p.pref.values()))
        if pref is not None:
            p.pref_means = dict(zip(p.pref, pref))
        why = dog.check(p.step + 1, loss) if loss is not None and sync.blocking else None
        if why:
            bar.close()
            p.sampler.load_state_dict(before)  # the data of the refused step comes again
            return diverged(s, p, why)
        engine.step()  # the update (DeepSpeed applies it at the accumulation boundary)
        p.step += 1
        run_state.report_step(p.step)
        _count(p, tokens_all)
        p.window_steps += 1
        if log_due:
            log_step(s, p, bar, loss, lr)
        bar.update(1)
        if epochs.due(t.eval_every, p.step, per_epoch, p.accum) and p.step < t.max_steps:
            write_eval(p, evaluate(s))
        if epochs.due(t.checkpoint_every, p.step, per_epoch, p.accum) and p.step < t.max_steps:
            _count(p, sync.flush())
            save(s, p, p.step)
        signalled, stop_file_seen = sync.stop_votes(votes)
        if (signalled or stop_file_seen) and p.step < t.max_steps:
            bar.close()
            sync.close()
            _count(p, sync.flush())
            return stopped(s, p, stop, signalled)
    bar.close()
    sync.close()
    _count(p, sync.flush())
    return finish(s, p)


def _count(p: Progress, tokens: float) -> None:
    """Tokens summed over the ranks: into the total and the metrics line's window."""
    p.tokens_seen += int(tokens)
    p.window_tokens += tokens


# ------------------------------------------------------------------ entry point
def _ensure_run_dir(cfg: RunConfig, env: RankEnv, ds_config_dict: dict) -> None:
    """A rank started by hand on a run file: create the run directory (rank 0) if needed."""
    if env.is_main and not os.path.exists(os.path.join(cfg.run_dir, layout.RESOLVED)):
        rundir.prepare(cfg, ds_config_dict, on_existing="resume")
    os.makedirs(cfg.run_dir, exist_ok=True)


def shutdown(*, barrier: bool, t: Any = None) -> None:
    """Leave the process group cleanly (a rank that exits while a peer still talks to it can
    make gloo abort the peer). The barrier waits train.save_timeout_s (t): rank 0 may still be
    publishing the export (replacing an older final/)."""
    from launcher.rank import collectives
    if collectives.initialized():
        if barrier:
            if t is not None:
                timeouts.set_timeout(t.save_timeout_s)
            collectives.barrier()
        import torch.distributed as dist
        dist.destroy_process_group()


@dataclass(frozen=True)
class TrainCall:
    """What `ftlaunch train` (each rank) was asked: the run file and its overrides."""
    run_file: str
    overrides: tuple[str, ...] = ()


def main(call: TrainCall) -> int:
    clock = StartClock()   # the interpreter and imports so far: from the process's start
    from launcher.config import runfile
    cfg = runfile.load(call.run_file, call.overrides)
    rundir.keep_private(cfg)   # checkpoints, metrics, trackers, the export: output.private
    env = dist_env.from_environ()
    started = time.time() - 1  # mtime granularity: a failure in this launch is at or after it
    stop = run_state.StopRequest().install()
    try:
        s = setup(cfg, env, clock=clock)
        _ensure_run_dir(cfg, env, s.ds_config)
        if env.is_main and cfg.train.epochs is not None:  # what `ftlaunch status` shows
            run_state.write_steps(cfg.run_dir, s.cfg.train.max_steps)
        if env.is_main:
            text = s.report.render()
            rundir.write_atomic(os.path.join(cfg.run_dir, layout.FREEZE_REPORT), text)
            print(text, end="", flush=True)
        code = train_loop(s, stop)
        shutdown(barrier=True, t=cfg.train)
        run_state.leave(run_state.rank_exit_code(code))
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
        run_state.write_exit_status(cfg.run_dir, env.rank, 1, run_state.last_step(), None,
                                    f"rank {env.rank}: {type(exc).__name__}: {exc}", since=started)
        raise
