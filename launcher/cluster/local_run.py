"""`ftlaunch run RUN.yaml`: the whole job on this machine, ranks started for you.

    ftlaunch run RUN.yaml                  # all local GPUs, or 2 CPU ranks where there is none
    ftlaunch run RUN.yaml --nproc 4        # 4 ranks
    ftlaunch run RUN.yaml --max-steps 10   # train.max_steps=10 (the LR schedule follows it)
    ftlaunch run RUN.yaml --dry-run        # check everything, 18 steps in a temporary folder
    ftlaunch run RUN.yaml --resume         # continue a run whose config changed

Before any rank starts: the run file is parsed once and checked (exit 2 on a problem), the
device resolved (train.device auto -> cuda or cpu) and set on the typed config with
cluster.nodes=1 and cluster.gpus_per_node=N (`local_config`, dataclasses.replace: nothing is
parsed again; the rules run again on the result, the input rules with them), so the batch
arithmetic is the one that runs (global_batch_size is kept when N divides it; grad_accum is then
derived). The tokenizer and the data are loaded here once, by the ranks' own reader (`python -m
launcher.rank.inputs`, a child process given that config as YAML, run while the memory plan is
made: this half imports none of the rank half), so bad data fails in seconds with the data's own
error; with data.cache on, the ranks map what it tokenized. The check reports the training
sequences, so an epoch run's ds_config.json is written here with its exact step count: this
process is its one writer (`rundir.prepare`); the ranks build the same dict in memory from
resolved.yaml, the one file handed to them. The memory plan is printed and saved. Then
`python -m torch.distributed.run --standalone --nproc_per_node N -m launcher train
RUN_DIR/resolved.yaml` runs in its own process group.

Ctrl-C (SIGINT) or SIGTERM here writes RUN_DIR/STOP: the ranks finish the step, checkpoint and
print one line `stopped at step N ...; resume with: ...`; `ftlaunch run` exits 75 (the ranks
exit 0 so that torchrun reports no failure: run_state.rank_exit_code). A second Ctrl-C kills
torchrun and every process below it at once (found through /proc: torchrun starts each worker in
a session of its own), and says which complete checkpoint a resume takes (exit 130). The exit code is otherwise the
ranks' (read from RUN_DIR/exit_status.json, since torchrun itself reports any failure as 1).

A run directory whose last launch finished at or past train.max_steps is left as it is ("is
finished; nothing changed"); a larger --max-steps continues it. Which of --max-steps and the run
file set train.max_steps is printed.

A dry run trains step_time.DRY_WARMUP + DRY_MEASURED steps (2 + 16: on the tiny Llama of the
tests about a second; a model whose step takes 10 s, three minutes) with no LR warm-up (it does
not change a step's cost), no evaluation or checkpoint along the way, one metrics line a step,
then the final evaluation (where there is eval data) and, for a checkpoint of at most
DRY_SAVE_MAX_BYTES, one checkpoint save into its temporary folder, timed. The ranks'
wall time and CPU time are taken here and printed (`the ranks ran ...`), for a real run as for
a dry one;
launcher/cluster/step_time.py `record_dry_run` keeps what the time estimate needs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence
from dataclasses import dataclass

from launcher.cluster import layout, run_state, step_time
from launcher.config.batch import batch_sizes, local_batch_problem
from launcher.config.schema import RunConfig
from launcher.model.device import resolve_device, visible_gpus
from launcher.config.errors import ConfigError, Problem
from launcher.common import log as log_mod
from launcher.common.log import get_logger

log = get_logger(__name__)

DEFAULT_CPU_RANKS = 2
DRY_SAVE_MAX_BYTES = 2e9  # a dry run times one checkpoint save up to this size (its temporary folder)


def local_ranks(cfg: RunConfig, nproc: int | None) -> tuple[str, int]:
    """(device, ranks) for this machine: cuda with all (or nproc) GPUs, else cpu with nproc or 2."""
    device = resolve_device(cfg)
    if device == "cuda":
        gpus = visible_gpus()
        n = nproc or gpus
        if n > gpus:
            raise ConfigError([Problem("--nproc", f"{n} ranks asked, {gpus} GPUs here",
                                       f"use --nproc {gpus} or fewer")])
        return device, n
    n = nproc or DEFAULT_CPU_RANKS
    if n < 1:
        raise ConfigError([Problem("--nproc", f"{n} ranks", "use --nproc 1 or more")])
    return "cpu", n


def local_config(cfg: RunConfig, device: str, nproc: int) -> RunConfig:
    """cfg as this machine's run: train.device, one node of nproc ranks; with global_batch_size
    set, grad_accum derived from it (refused where nproc does not divide it)."""
    train = dataclasses.replace(cfg.train, device=device)
    if cfg.train.global_batch_size is not None:
        bad = local_batch_problem(cfg, nproc)
        if bad is not None:
            raise ConfigError([bad])
        train = dataclasses.replace(train, grad_accum=None)
    return dataclasses.replace(cfg, train=train, cluster=dataclasses.replace(
        cfg.cluster, nodes=1, gpus_per_node=nproc))


def with_max_steps(cfg: RunConfig, steps: int) -> RunConfig:
    """`--max-steps N`: train.max_steps N in place of the run file's steps or epochs."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps,
                                                              epochs=None))


def dry_run_config(cfg: RunConfig, out_dir: str) -> RunConfig:
    """`--dry-run`: step_time.DRY_WARMUP + DRY_MEASURED steps, each logged, no warmup, evaluation,
    checkpoint or resume (one save is timed at the end where asked: dry_save), into out_dir."""
    train = dataclasses.replace(cfg.train, max_steps=step_time.DRY_WARMUP + step_time.DRY_MEASURED,
                                epochs=None, warmup_steps=0, warmup_ratio=0.0, checkpoint_every=0,
                                eval_every=0, resume="never", keep_checkpoints=1, log_every=1)
    return dataclasses.replace(cfg, train=train,
                               output=dataclasses.replace(cfg.output, dir=out_dir))


def plan_text(cfg: RunConfig, force: bool = False) -> str | None:
    """The memory plan, or None where it cannot be made (printed as a warning); ConfigError
    when it does not fit per GPU or per node (this host) and force is off."""
    from launcher import memory
    try:
        kernels = None
        if cfg.train.device == "cpu":  # these ranks run here: measure what the plan cannot derive
            from launcher.memory.probe import measure
            kernels = measure(cfg)
        return memory.checked_text(memory.plan(cfg, kernels=kernels, local=True), force)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the plan is advice; the run does not depend on it
        log.warning(f"no memory plan: {type(exc).__name__}: {exc}")
        return None


def rank_command(resolved: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", "launcher", "train", resolved]


def rank_environ(device: str, nproc: int, *, dry_run: bool,
                 cluster_env: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: this process's, with cluster.env set over it (as the job script
    exports it: e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which the plan reads)."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (cluster_env or {}).items()})
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if dry_run:
        env["FTLAUNCH_NO_SAVE"] = "1"
    env[run_state.STOPPED_EXIT_ENV] = "0"  # a stop is 75 in exit_status.json, 0 to torchrun
    env[log_mod.SHOWN_ENV] = json.dumps(log_mod.shown_warnings())  # each warning once
    # the ranks import this package: make sure they find the same one
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def kept(run_dir: str) -> str:
    """What a run directory keeps after its ranks were killed: the newest complete checkpoint."""
    from launcher.cluster import checkpoint_files as checkpoint
    path = checkpoint.latest_complete(checkpoint.root(run_dir), warn=lambda m: None)
    if path is None:
        return "no complete checkpoint: a new launch starts from step 0"
    return (f"kept {path} (step {checkpoint.step_of(path)}), the newest complete checkpoint; "
            f"steps after it are lost; resume with: {run_state.resume_command(run_dir)}")


def live_parents() -> dict[int, int]:
    """pid -> parent pid of every live process, from /proc (zombies left out: they are gone)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "(comm)", which may hold spaces
        if len(fields) > 1 and fields[0] != "Z":
            out[int(name)] = int(fields[1])
    return out


def descendants(root: int) -> set[int]:
    """Every live process below root (children, their children, ...), root included when alive.
    torchrun starts each worker in its own session, so only the parent links reach them all."""
    kids: dict[int, list[int]] = {}
    parents = live_parents()
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = set(), [root] if root in parents else []
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(kids.get(pid, []))
    return found


def kill_tree(root: int, wait_s: float = 10.0) -> set[int]:
    """SIGKILL root and every process below it; returns those still alive after wait_s (none,
    normally). The tree is first frozen (SIGSTOP, until no new process appears), so that no
    process forks, restarts a worker or is reparented away between the listing and the kill."""
    stopped: set[int] = set()
    for _ in range(20):
        new = descendants(root) - stopped
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    deadline = time.time() + wait_s
    alive = set(stopped)
    while alive and time.time() < deadline:
        live = live_parents()
        alive = {p for p in alive if p in live}
        if alive:
            time.sleep(0.05)
    return alive


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def launch(cmd: Sequence[str], env: dict[str, str], run_dir: str) -> int:
    """Run the ranks in their own process group; Ctrl-C asks them to stop (see module doc). The
    second Ctrl-C kills torchrun and every process below it (its workers run in sessions of
    their own, out of reach of a process-group kill) and says which checkpoint a resume takes."""
    started = time.time()
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    presses = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            run_state.request_stop(run_dir)
            print(f"\nftlaunch: {signal.Signals(signum).name}: stopping after this step, with a "
                  "checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        elif presses == 2:
            left = kill_tree(proc.pid)
            if left:
                print(f"ftlaunch: processes {sorted(left)} did not end after SIGKILL",
                      file=sys.stderr, flush=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if presses >= 2:
        # the STOP file stays: a rank that outlived the kill still stops at its next step
        print(f"ftlaunch: stopped at once, every process of the run ended; {kept(run_dir)}",
              file=sys.stderr, flush=True)
        return 130
    return run_state.launch_exit_code(rc, run_dir, started)


class DataCheck:
    """The ranks' tokenizer and data reader, run once in a child process before any rank starts
    (`python -m launcher.rank.inputs CONFIG.yaml --rows-to FILE`, CONFIG.yaml the typed config
    dumped as resolved.yaml will be). It runs while the memory plan is made; `wait()` prints what
    it printed (after the plan, as if the two had run one after the other) and returns its exit
    code: 0, or 2 after the data's problem; `rows` is then the training sequences it counted.
    With data.cache on, the tokenized data it leaves in the cache is what the ranks map."""

    def __init__(self, cfg: RunConfig):
        from launcher.config.runfile import dump
        self.dir = tempfile.mkdtemp(prefix="ftlaunch-data-check-")
        self.config = os.path.join(self.dir, "config.yaml")
        self.rows_file = os.path.join(self.dir, "rows.json")
        with open(self.config, "w", encoding="utf-8") as fh:
            fh.write(dump(cfg))
        self.rows: int | None = None
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.rank.inputs", self.config,
                                      "--rows-to", self.rows_file], stdout=self.out, stderr=self.err)

    def wait(self) -> int:
        code = self.proc.wait()
        for fh, stream in ((self.out, sys.stdout), (self.err, sys.stderr)):
            fh.seek(0)
            stream.write(fh.read())
            stream.flush()
            fh.close()
        try:
            with open(self.rows_file, encoding="utf-8") as fh:
                self.rows = int(json.load(fh)["train"])
        except (OSError, ValueError, KeyError, TypeError):
            self.rows = None
        shutil.rmtree(self.dir, ignore_errors=True)
        return code

    def cancel(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.out.close()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def check_data(cfg: RunConfig) -> DataCheck:
    """Start the data check (`DataCheck`)."""
    return DataCheck(cfg)


def final_steps(cfg: RunConfig, rows: int | None, nproc: int) -> RunConfig:
    """The config ds_config.json is built from: an epoch run's steps counted from the rows the
    data check read, as the ranks count them (launcher/config/epochs.py `resolve`)."""
    if cfg.train.epochs is None or rows is None:
        return cfg
    from launcher.config import epochs
    return epochs.resolve(cfg, rows, nproc)


def max_steps_source(base: RunConfig, run_file: str, flag: int | None) -> str:
    """Which of --max-steps and the run file set train.max_steps (printed by `main`)."""
    if flag is None and base.train.epochs is not None:
        return f"train.epochs {base.train.epochs:g} (from {run_file}): the steps are counted from the data"
    if flag is None:
        return f"train.max_steps {base.train.max_steps} (from {run_file})"
    if flag == base.train.max_steps:
        return f"train.max_steps {flag} (--max-steps, the same as {run_file})"
    return f"train.max_steps {flag} (--max-steps wins over {base.train.max_steps} in {run_file})"


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's children that ended so far (torchrun and,
    as torchrun waits for them, its ranks): around `launch`, what the ranks used, which shows
    how much of the machine they got (a shared machine gives them less)."""
    import resource
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def dry_save(cfg: RunConfig) -> bool:
    """Whether the dry run times one checkpoint save (in its temporary folder): where the
    checkpoint (launcher/memory/clock.py `checkpoint_bytes`) is at most DRY_SAVE_MAX_BYTES; a
    larger one is estimated at the assumed write rate instead."""
    from launcher.memory.clock import checkpoint_bytes
    try:
        return checkpoint_bytes(cfg) <= DRY_SAVE_MAX_BYTES
    except Exception:   # noqa: BLE001 - no model inventory: the assumed rate
        return False


def record_step_time(base: RunConfig, dry_dir: str, nproc: int, device: str,
                     ranks_s: float) -> None:
    """Keep the dry run's measured step time and fixed costs for runs of these settings
    (launcher/cluster/step_time.py)."""
    rec = step_time.record_dry_run(os.path.join(dry_dir, layout.METRICS), base, nproc, device,
                                   ranks_s)
    if rec is not None:
        extra = "".join(f", {what} {rec[key]:.3g} s" for what, key in (
            ("start-up and shut-down", "startup_s"), ("warm-up", "warmup_extra_s"),
            ("an evaluation", "eval_s"), ("a checkpoint save", "checkpoint_s"))
            if rec.get(key) is not None)
        print(f"ftlaunch: measured {rec['step_time_s']:.3g} s a step ({rec['micro_batch_s']:.3g} s "
              f"a micro batch; median of {rec['steps']} steps after {rec['warmup_steps']}, "
              f"{rec['low_s']:.3g}-{rec['high_s']:.3g} s){extra} on {nproc} {device} "
              f"rank{'s' if nproc > 1 else ''}; kept in {step_time.store_path(base)} for "
              "`ftlaunch plan` and cluster.time: auto", flush=True)


@dataclass(frozen=True)
class RunCall:
    """What `ftlaunch run` was asked: the run file and overrides, the ranks, a dry run."""
    run_file: str
    overrides: tuple[str, ...] = ()
    nproc: int | None = None
    max_steps: int | None = None
    dry_run: bool = False
    force: bool = False        # start although the memory plan does not fit
    resume: bool = False
    overwrite: bool = False


def main(call: RunCall) -> int:
    from launcher.dsconfig import build as ds_config
    from launcher.cluster import rundir
    from launcher.config import runfile, secret_env
    base = runfile.load(call.run_file, call.overrides)   # the one parse of the run file
    device, nproc = local_ranks(base, call.nproc)
    cfg = local_config(base, device, nproc)
    if call.max_steps is not None:
        cfg = with_max_steps(cfg, call.max_steps)
    tmp = None
    if call.dry_run:
        tmp = tempfile.mkdtemp(prefix=f"ftlaunch-dry-{base.name}-")
        cfg = dry_run_config(cfg, tmp)
    cfg = runfile.recheck(cfg, call.run_file, inputs=True)
    secret_env.warn_in_clear(cfg)
    secret_env.require(cfg)   # the ranks inherit this environment: the same check as sbatch's
    rundir.keep_private(cfg)
    if not call.dry_run:
        print(f"ftlaunch: {max_steps_source(base, call.run_file, call.max_steps)}", flush=True)
        done = run_state.finished(cfg.run_dir, cfg.train.max_steps)
        if (done and cfg.train.resume == "auto" and not call.overwrite
                and os.path.exists(os.path.join(cfg.run_dir, layout.RESOLVED))):
            print(run_state.finished_message(cfg.run_dir, done, cfg.train.max_steps), flush=True)
            return layout.EXIT_OK
    if not call.dry_run:  # before the plan and the tokenizing: refused in a second
        from launcher.cluster import job_lock   # a Slurm job queued or running on it owns it
        job_lock.refuse_if_live(cfg.run_dir, "ftlaunch run" + (" --overwrite" if call.overwrite
                                                               else ""))
        rundir.check(cfg, rundir.on_existing(call))
    try:
        checking = check_data(cfg)  # beside the plan
        try:
            plan = plan_text(cfg, call.force)
        except BaseException:
            checking.cancel()
            raise
        if plan:
            print(plan, end="", flush=True)
        code = checking.wait()
        if code:
            return code
        ds = ds_config.build(final_steps(cfg, checking.rows, nproc), nproc, device)
        run_dir = rundir.prepare(cfg, ds, plan_text=plan, on_existing="overwrite" if call.dry_run
                                 else rundir.on_existing(call))
        run_state.clear_stop(run_dir)  # a stop asked of an earlier launch is not one for this launch
        micro, accum, global_batch = batch_sizes(cfg, nproc)
        print(f"ftlaunch: {nproc} {device} rank{'s' if nproc > 1 else ''}, global batch "
              f"{micro} micro x {accum} accum x {nproc} rank{'s' if nproc > 1 else ''} = "
              f"{global_batch} sequences, run directory {run_dir}"
              + (" (dry run: nothing is kept)" if call.dry_run else ""), flush=True)
        cmd = rank_command(os.path.join(run_dir, layout.RESOLVED), nproc)
        env = rank_environ(device, nproc, dry_run=call.dry_run, cluster_env=dict(cfg.cluster.env))
        if call.dry_run and dry_save(base):
            env[layout.TIME_SAVE_ENV] = "1"
        started, cpu = time.monotonic(), children_cpu_s()
        env[layout.LAUNCHED_ENV] = repr(time.time())   # the ranks time their start from it
        code = launch(cmd, env, run_dir)
        ranks_s, cpu = time.monotonic() - started, children_cpu_s() - cpu
        print(f"ftlaunch: the ranks ran {ranks_s:.2f} s (torchrun started to exited; {cpu:.1f} "
              f"CPU seconds, {cpu / max(ranks_s, 1e-9):.2f} cores on average)", flush=True)
        if call.dry_run and code == layout.EXIT_OK:   # the step time, for plan and time: auto
            record_step_time(base, run_dir, nproc, device, ranks_s)
        return code
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
