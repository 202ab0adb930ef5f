"""Slurm jobs in three separate steps: build a job description, render its script, submit it.

`build(cfg, workdir=...)` turns a run config into a `Job` (every sbatch option, the environment,
the setup lines, the per-node launch); `render(job)` fills slurm/job.sbatch with it, strictly (a
placeholder without a value, or a value without a placeholder, is an error) and without touching
any cluster tool; `submit(path)` is the only place that runs a program (sbatch). `main(SlurmCall)` is
`ftlaunch slurm`. The script's variables are listed in slurm/README.md; what it does at run time
(rendezvous, stop protocol, requeue) in docs/slurm.md.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

from launcher import __version__
from launcher.cluster import dist_env, layout, run_state
from launcher.common.log import get_logger
from launcher.config.schema import SBATCH_EXTRA as _EXTRA, ClusterConfig, RunConfig
from launcher.model.device import NODE_DEVICES_ENV, job_device
from launcher.checks.slurm_checks import PARTITION_DEFAULT
from launcher.cluster.shell import (Raw, comment, export, join, quote, require_set, sbatch_line,
                            slurm_filename)

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "slurm",
                        "job.sbatch")
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")
log = get_logger(__name__)


class TemplateError(Exception):
    """The template and the values given for it do not match."""


class SubmitError(Exception):
    """sbatch refused the job (or is not there); the message is sbatch's own."""


@dataclass(frozen=True)
class SbatchOption:
    option: str                 # --name
    value: Optional[str]        # None: a flag
    key: str                    # the config key it comes from (named in errors)


_CLUSTER = ClusterConfig()  # the run file's cluster defaults: a Job made by hand takes the same


@dataclass(frozen=True)
class Job:
    """Everything the job script says, decided before rendering."""
    name: str
    run_dir: str
    workdir: str                                # the job's working directory (--chdir)
    source: str                                 # the run file it was made from (header only)
    nodes: int
    nproc_per_node: int
    sbatch: tuple[SbatchOption, ...]
    min_nodes: Optional[int] = None             # cluster.min_nodes: the job runs on what it gets
    setup: tuple[Raw, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    env_from_shell: tuple[str, ...] = ()        # names taken from the submitting environment
    private: bool = False                       # output.private: umask 077 in the job
    launcher: str = _CLUSTER.launcher            # torchrun | deepspeed
    python: str = _CLUSTER.python
    command: tuple[str, ...] = ()               # the rank command, run as `python -m <command>`
    requeue: bool = _CLUSTER.requeue
    max_restarts: int = _CLUSTER.max_restarts
    preflight: bool = _CLUSTER.preflight        # `ftlaunch preflight` on every node first
    container_prefix: tuple[str, ...] = ()      # words before python (apptainer/singularity exec)
    srun_container: tuple[str, ...] = ()        # srun options (pyxis's --container-image)

    @property
    def job_script(self) -> str:
        return os.path.join(self.run_dir, layout.JOB_SCRIPT)


# ------------------------------------------------------------------ build
def node_range(nodes: int, min_nodes: Optional[int]) -> str:
    """`--nodes`: N, or MIN-N with cluster.min_nodes (Slurm starts the job on MIN to N nodes)."""
    return f"{min_nodes}-{nodes}" if min_nodes not in (None, nodes) else str(nodes)


def task_cpus(cfg: RunConfig) -> tuple[int, str]:
    """(CPUs of each node's task, where the number comes from). The job runs one task per node
    that starts every rank of the node; without `--cpus-per-task` Slurm gives that task one CPU
    (unless the partition sets DefCpuPerGPU) and binds it there, so every rank and data worker of
    the node would share one CPU. cluster.cpus_per_task unset: one CPU per rank and per DataLoader
    worker of each rank, gpus_per_node x (1 + data.num_workers)."""
    c = cfg.cluster
    if c.cpus_per_task is not None:
        return c.cpus_per_task, "cluster.cpus_per_task"
    return (c.gpus_per_node * (1 + cfg.data.num_workers),
            f"cluster.cpus_per_task unset: {c.gpus_per_node} rank(s) x (1 + data.num_workers "
            f"{cfg.data.num_workers})")


def build(cfg: RunConfig, *, workdir: str, source: str = "") -> Job:
    """The job for cfg; workdir is where it runs (the directory `ftlaunch slurm` ran in)."""
    c = cfg.cluster
    run_dir = cfg.run_dir
    logs = slurm_filename(os.path.join(run_dir, layout.LOGS), "output.dir")
    opts = [SbatchOption("--job-name", cfg.name, "name"),
            SbatchOption("--chdir", workdir, "working directory"),
            SbatchOption("--nodes", node_range(c.nodes, c.min_nodes), "cluster.nodes")]
    if c.min_nodes in (None, c.nodes):
        # with a node range, --ntasks-per-node=1 makes Slurm count MIN tasks and allocate MIN
        # nodes even when MAX are free (measured, Slurm 22.05); without it each node gets one
        # task's worth (cpus-per-task) and the srun lines say --ntasks-per-node=1 themselves
        opts.append(SbatchOption("--ntasks-per-node", "1", "cluster.nodes"))
    if job_device(cfg) == "cuda":   # CPU ranks need no GPUs; gpus_per_node is then ranks per node
        opts.append(SbatchOption("--gpus-per-node", str(c.gpus_per_node), "cluster.gpus_per_node"))
    opts.append(SbatchOption("--cpus-per-task", str(task_cpus(cfg)[0]), "cluster.cpus_per_task"))
    if c.time == "auto":   # `ftlaunch slurm` replaces it with the estimate (resolve_time)
        from launcher.config.errors import ConfigError, Problem
        raise ConfigError([Problem("cluster.time", "auto must be resolved before the job is "
                                   "built", "build the job through `ftlaunch slurm`, or pass the "
                                   "config through launcher.memory.clock.resolve_time first")])
    for name, option in (("mem", "--mem"), ("time", "--time"),
                         ("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
                         ("constraint", "--constraint"), ("reservation", "--reservation")):
        value = getattr(c, name)
        if value is not None and not (name == "time" and value == PARTITION_DEFAULT):
            opts.append(SbatchOption(option, str(value), f"cluster.{name}"))
    if c.exclusive:
        opts.append(SbatchOption("--exclusive", None, "cluster.exclusive"))
    opts += [SbatchOption("--output", f"{logs}/job-%j.out", "output.dir"),
             SbatchOption("--error", f"{logs}/job-%j.err", "output.dir"),
             SbatchOption("--open-mode", "append", "output.dir"),
             SbatchOption("--signal", f"B:USR1@{c.grace_s}", "cluster.grace_s"),
             SbatchOption("--requeue" if c.requeue else "--no-requeue", None, "cluster.requeue")]
    if c.after:
        opts.append(SbatchOption("--dependency", "afterok:" + ":".join(str(j) for j in c.after),
                                 "cluster.after"))
    if c.env_from_shell:   # sbatch's default is ALL: kept, and the names said (and checked) here
        opts.append(SbatchOption("--export", export_list(c.env_from_shell), "cluster.env_from_shell"))
    for i, item in enumerate(c.sbatch_extra):
        m = _EXTRA.fullmatch(item)
        option, value = (m.group(1), m.group(2)) if m else (item, None)
        opts.append(SbatchOption(option, value, f"cluster.sbatch_extra[{i}]"))
    prefix, srun_opts = container_words(cfg, workdir)
    return Job(name=cfg.name, run_dir=run_dir, workdir=workdir, source=source, nodes=c.nodes,
               min_nodes=c.min_nodes if c.min_nodes not in (None, c.nodes) else None,
               nproc_per_node=c.gpus_per_node, sbatch=tuple(opts),
               setup=tuple(Raw(line) for line in c.setup), env=tuple(c.env.items()),
               env_from_shell=tuple(c.env_from_shell), private=cfg.output.private,
               launcher=c.launcher, python=c.python,
               command=("launcher", "train", os.path.join(run_dir, layout.RESOLVED)),
               requeue=c.requeue, max_restarts=c.max_restarts, preflight=c.preflight,
               container_prefix=prefix, srun_container=srun_opts)


def container_words(cfg: RunConfig, workdir: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(words before python, srun options) that run the preflight and the ranks in
    cluster.container: `apptainer exec [--nv] --bind RUN_DIR IMAGE` (singularity alike), or
    pyxis's `--container-image=IMAGE --container-mounts=RUN_DIR --container-workdir=WORKDIR`."""
    c = cfg.cluster
    if not c.container:
        return (), ()
    run_dir = cfg.run_dir
    if c.container_runtime == "pyxis":
        return (), (f"--container-image={c.container}", f"--container-mounts={run_dir}",
                    f"--container-workdir={workdir}")
    gpu = ("--nv",) if job_device(cfg) == "cuda" else ()
    return (c.container_runtime, "exec", *gpu, "--bind", run_dir, c.container), ()


# ------------------------------------------------------------------ render
def fill(template: str, values: dict[str, str], name: str = "template") -> str:
    """template with every {{name}} replaced; any placeholder without a value, value without a
    placeholder, or malformed {{...}} is a TemplateError (nothing renders as empty by accident)."""
    used = set(_PLACEHOLDER.findall(template))
    stray = re.findall(r"\{\{.*?\}\}|\{\{|\}\}", _PLACEHOLDER.sub("", template))
    missing, unknown = sorted(used - values.keys()), sorted(values.keys() - used)
    if missing or unknown or stray:
        raise TemplateError(f"{name}: " + "; ".join(
            part for part in (f"no value for {missing}" if missing else "",
                              f"no placeholder for {unknown}" if unknown else "",
                              f"malformed placeholders {stray}" if stray else "") if part))
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _node_launch(job: Job) -> tuple[str, str]:
    """(node_setup lines, NODE_LAUNCH array words): python, its module, the launcher's options,
    then the rank command. The node rank is added inside each task (see the template)."""
    rank_cmd = ["--module", *job.command]
    if job.launcher == "deepspeed":
        setup = "\n".join([
            'HOSTFILE="$RUN_DIR/logs/hostfile-$SLURM_JOB_ID"   # deepspeed\'s launcher: a line per node',
            'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots=$NPROC_PER_NODE/" > "$HOSTFILE"'])
        words = [job.python, "deepspeed.launcher.runner", Raw('--hostfile="$HOSTFILE"'), "--no_ssh",
                 Raw('--num_nodes="$NNODES"'), Raw('--num_gpus="$NPROC_PER_NODE"'),
                 Raw('--master_addr="$MASTER_ADDR"'), Raw('--master_port="$MASTER_PORT"'),
                 "--no_local_rank", *rank_cmd]
    else:
        setup = "# torchrun (python -m torch.distributed.run): static rendezvous, ranks numbered node by node"
        words = [job.python, "torch.distributed.run", Raw('--nnodes="$NNODES"'),
                 Raw('--nproc-per-node="$NPROC_PER_NODE"'), "--rdzv-backend=static",
                 Raw('--rdzv-id="$SLURM_JOB_ID"'), Raw('--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"'),
                 "--max-restarts=0", *rank_cmd]
    lines = [join(words[:2], "cluster.python")] + [quote(w, "command") for w in words[2:-len(rank_cmd)]]
    lines.append(join(rank_cmd, "command"))
    return setup, "\n  ".join(lines)


def _header(job: Job) -> str:
    resolved = os.path.join(job.run_dir, layout.RESOLVED)
    lines = [f"Generated by ftlaunch {__version__} (`ftlaunch slurm`) from {job.source or resolved}.",
             "Edits are lost when it is generated again; change the run file instead.",
             f"Run directory: {job.run_dir}",
             f"Submit (again; a restart resumes from the newest complete checkpoint): "
             f"sbatch {quote(job.job_script)}",
             f"Generate again: ftlaunch slurm {quote(resolved)} --resume"]
    return "\n".join("# " + comment(line) for line in lines)


def export_list(names) -> str:
    """sbatch's --export value: the whole submitting environment (sbatch's default) and, named,
    the variables the job needs from it: `ALL,HF_TOKEN,WANDB_API_KEY` (names, never values)."""
    return ",".join(["ALL", *names])


def _exports(job: Job) -> str:
    """The environment section: cluster.env's exports; the check that each env_from_shell
    variable reached the job (by name: its value is never written); output.private's umask."""
    lines = [export(k, v, f"cluster.env.{k}") for k, v in job.env] or ["# (no variables)"]
    if job.env_from_shell:
        lines.append("# cluster.env_from_shell: from the environment sbatch ran in (--export), "
                     "never written here")
        lines += [require_set(name, _unset(name), "cluster.env_from_shell")
                  for name in job.env_from_shell]
    if job.private:
        lines += ["# output.private: what the job creates is the user's alone (folders 0700, "
                  "files 0600)", "umask 077"]
    return "\n".join(lines)


def _unset(name: str) -> str:
    return (f"cluster.env_from_shell: {name} is not set in the environment of the job: export it "
            "in the shell that runs sbatch (and keep SBATCH_EXPORT unset or ALL)")


def render(job: Job, template: str | None = None) -> str:
    """The job script's text. Pure: reads only the template file."""
    name = "job template"
    if template is None:
        name = TEMPLATE
        with open(TEMPLATE, encoding="utf-8") as fh:
            template = fh.read()
    node_setup, node_launch = _node_launch(job)
    resolved = os.path.join(job.run_dir, layout.RESOLVED)
    values = {
        "header": _header(job),
        "sbatch_options": "\n".join(sbatch_line(o.option, o.value, o.key) for o in job.sbatch),
        "run_dir": quote(job.run_dir, "output.dir"),
        "job_script": quote(job.job_script, "output.dir"),
        "stop_file": quote(run_state.stop_path(job.run_dir), "output.dir"),
        "node_log": quote(slurm_filename(os.path.join(job.run_dir, layout.LOGS), "output.dir")
                          + "/job-%j-node%n.log", "output.dir"),
        "nodes": Raw('"$SLURM_JOB_NUM_NODES"') if job.min_nodes else quote(job.nodes),
        "nproc_per_node": quote(job.nproc_per_node),
        "requeue": "1" if job.requeue else "0", "max_restarts": quote(job.max_restarts),
        "exit_stopped": quote(layout.EXIT_STOPPED),
        "exit_diverged": quote(layout.EXIT_DIVERGED),
        "setup": "\n".join(quote(line, f"cluster.setup[{i}]") for i, line in enumerate(job.setup))
                 or "# (no setup lines)",
        "exports": _exports(job),
        "node_setup": node_setup,
        "node_launch": node_launch,
        "preflight": "1" if job.preflight else "0",
        "exit_preflight": quote(layout.EXIT_PREFLIGHT),
        "exit_locked": quote(layout.EXIT_LOCKED),
        "job_lock": quote(os.path.join(job.run_dir, layout.JOB_LOCK), "output.dir"),
        "preflight_launch": join([job.python, "-m", "launcher", "preflight", resolved], "cluster.python"),
        "port_base": quote(dist_env.PORT_BASE), "port_span": quote(dist_env.PORT_SPAN),
        "node_devices_env": NODE_DEVICES_ENV,
        "container": join(job.container_prefix, "cluster.container") if job.container_prefix
                     else "",
        "srun_container": join(job.srun_container, "cluster.container") if job.srun_container
                          else "",
    }
    return fill(template, values, name)


# ------------------------------------------------------------------ submit
def submit(script_path: str, test_only: bool = False, export: str | None = None) -> str:
    """Run sbatch on the script: the job id, or (test_only) the scheduler's answer. SubmitError
    carries sbatch's own words when it refuses. export: the script's --export again on the command
    line, where SBATCH_EXPORT in the environment cannot override it."""
    cmd = ["sbatch", "--test-only"] if test_only else ["sbatch", "--parsable"]
    cmd += [f"--export={export}"] if export else []
    cmd.append(script_path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run this on a Slurm login node (the script is "
                          f"ready: {script_path})") from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"sbatch did not answer within 300 s ({join(cmd)})") from None
    answer = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise SubmitError(f"{join(cmd)} failed (exit {proc.returncode}):\n{answer}")
    if test_only:
        return answer
    return proc.stdout.strip().split(";")[0]


# ------------------------------------------------------------------ ftlaunch slurm
def partition_node_memory(partition: str | None) -> Optional[tuple[int, str]]:
    """(bytes, where from): the memory of the smallest node of the partition (the default one
    when None), from `sinfo -o %m` (MiB per node); None without sinfo or an answer."""
    cmd = ["sinfo", "-h", "-o", "%m"] + (["-p", partition] if partition else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sizes = [int(m.group(1)) for line in proc.stdout.split()
             if (m := re.fullmatch(r"(\d+)\+?", line.strip()))] if proc.returncode == 0 else []
    if not sizes:
        return None
    where = f"partition {partition}" if partition else "the default partition"
    return min(sizes) * 2**20, f"sinfo: the smallest node of {where}"


def _memory_plan(cfg: RunConfig, force: bool) -> str:
    """The plan text; ConfigError when the plan does not fit and force is off. Without
    cluster.mem, a node's memory is the partition's smallest node's (sinfo), never this host's."""
    from launcher import memory
    from launcher.config.errors import ConfigError, Problem
    from launcher.config.sizes import parse_slurm_mem
    node = None if cfg.cluster.mem and parse_slurm_mem(cfg.cluster.mem) is not None else \
        partition_node_memory(cfg.cluster.partition)
    plan = memory.plan(cfg, node_memory=node[0] if node else None, local=False)
    if node:
        plan.node_memory_source = node[1]
    text = memory.render(plan)
    if not plan.fits and not force:
        raise ConfigError([Problem("cluster", "the memory plan says the job does not fit:\n"
                                   + text, "change what the plan suggests, or pass --force "
                                   "to submit anyway")], "memory plan")
    return text


@dataclass(frozen=True)
class SlurmCall:
    """What `ftlaunch slurm` was asked: the run file and overrides, and what to do with the job."""
    run_file: str
    overrides: tuple[str, ...] = ()
    submit: bool = False
    test_only: bool = False
    force: bool = False        # submit a job whose memory plan does not fit
    resume: bool = False
    overwrite: bool = False
    sweep: tuple[str, ...] = ()   # KEY=V1,V2 each: a run directory and a job per combination


@dataclass
class Point:
    """One job of `ftlaunch slurm`: its config and what was decided for it before any write."""
    label: str                   # a sweep point's values ("train.lr=1e-5 ..."); "" for one run
    cfg: RunConfig
    plan_text: Optional[str] = None
    part_note: Optional[str] = None
    job: Optional[Job] = None
    passed: Optional[str] = None
    time_lines: list = field(default_factory=list)   # cluster.time auto: how --time was set
    estimate: Optional[dict] = None                  # ... and the estimate, kept in the run dir


def _check_point(call: SlurmCall, label: str, overrides: list[str]) -> Point:
    """Everything that can refuse a job before anything is written: the run file and its inputs
    (when queueing), the live job owning the run directory, the existing run directory, the
    memory plan, a finished run, the partition's time limits. ConfigError names the problem."""
    from launcher.cluster import job_lock, rundir, slurm_partition
    from launcher.config import secret_env
    from launcher.config.errors import ConfigError, Problem
    from launcher.cluster.rundir import on_existing
    from launcher.config.runfile import load
    queue = call.submit or call.test_only
    # rendering only: the job can be written before the weights and data are all in place (a
    # model folder with its config.json alone); what the job would fail on is said, and
    # --submit / --test-only refuse it
    cfg = load(call.run_file, overrides, inputs=queue)
    if not queue:
        from launcher.checks.rules import input_problems
        for problem in input_problems(cfg):
            log.warning(f"{problem.key}: {problem.message}; the job would fail on it: fix it "
                        f"before --submit ({problem.fix})")
    secret_env.warn_in_clear(cfg)
    if call.submit:
        secret_env.require(cfg)   # before anything is written
    job_lock.refuse_if_live(cfg.run_dir, "--submit" if call.submit else "--overwrite"
                            if call.overwrite else "writing its resolved.yaml and job.sbatch again")
    rundir.check(cfg, on_existing(call))
    point = Point(label, cfg)
    if cfg.cluster.time == "auto":   # the plan's estimate (builds the meta-device model)
        from launcher.memory.clock import resolve_time
        cfg, point.time_lines, point.estimate = resolve_time(cfg)
        point.cfg = cfg
    if not call.submit:
        return point
    part = slurm_partition.lookup(cfg.cluster.partition)   # cheap checks first: then the plan
    problems = slurm_partition.time_problems(cfg, part)
    if problems:
        raise ConfigError(problems, f"partition {part.name if part else ''}".strip())
    point.part_note = slurm_partition.describe_time(cfg, part)
    done = None if call.overwrite else run_state.finished(cfg.run_dir, cfg.train.max_steps)
    if done:   # a job would hold its nodes only to say so
        raise ConfigError([Problem(
            "train.max_steps", f"{cfg.run_dir} is finished: step {done.get('step')} of "
            f"{cfg.train.max_steps} done; a job would train nothing",
            f"raise train.max_steps (train.max_steps=N, N > {done.get('step')}) to train further, "
            "or pass --overwrite to start again")], "run directory")
    point.plan_text = _memory_plan(cfg, call.force)
    return point


def _write_point(call: SlurmCall, point: Point) -> None:
    """The run directory and its job script."""
    from launcher.dsconfig import build as ds_config
    from launcher.cluster import rundir
    from launcher.cluster.rundir import on_existing
    cfg = point.cfg
    rundir.keep_private(cfg)
    run_dir = rundir.prepare(cfg, ds_config.build(cfg), plan_text=point.plan_text,
                             on_existing=on_existing(call))
    if point.estimate is not None:
        import json
        rundir.write_atomic(os.path.join(run_dir, layout.ESTIMATE),
                            json.dumps(point.estimate, indent=2) + "\n")
    for line in point.time_lines:
        print(line)
    job = build(cfg, workdir=os.getcwd(), source=os.path.abspath(call.run_file))
    rundir.write_atomic(job.job_script, render(job))
    os.chmod(job.job_script, 0o700 if job.private else 0o755)
    point.job = job
    point.passed = export_list(job.env_from_shell) if job.env_from_shell else None
    print(f"wrote {run_dir}/ ({layout.RESOLVED}, {layout.DS_CONFIG}, {layout.JOB_SCRIPT})"
          + (f"  [{point.label}]" if point.label else ""))
    print(f"submit with: sbatch {quote(job.job_script)}")


def verdict_lines(plan_text: str) -> list[str]:
    """The memory plan's verdict lines (per GPU, per node, overall), as `--submit` shows them."""
    return [line.strip() for line in plan_text.splitlines() if line.strip().startswith("verdict")]


def _submit_point(point: Point) -> str:
    """Submit one written point: its job id (the run directory's lock taken) or SubmitError."""
    from launcher.cluster import job_lock
    job = point.job
    run_dir = job.run_dir
    job_id = submit(job.job_script, export=point.passed)
    owner = job_lock.claim(run_dir, job_id, "ftlaunch slurm --submit")
    if owner is not None:   # another submit or sbatch came in between: this one goes
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
        raise SubmitError(f"job {owner[0]} ({owner[1]}) took {run_dir} while job {job_id} "
                          f"was submitted: job {job_id} is cancelled (one job per run "
                          f"directory); to run this one instead: scancel {owner[0]}, then "
                          f"sbatch {quote(job.job_script)}")
    return job_id


def main(call: SlurmCall) -> int:
    from launcher.config import secret_env
    from launcher.config.errors import ConfigError, Problem
    sweep = list(call.sweep)
    if sweep:
        from launcher.cluster import sweep as sweeps
        labelled = sweeps.expand(call.run_file, list(call.overrides), sweep)
    else:
        labelled = [("", list(call.overrides))]
    points, problems = [], []
    for label, overrides in labelled:   # every point checked before anything is written
        try:
            points.append(_check_point(call, label, overrides))
        except ConfigError as exc:
            if not label:
                raise
            problems += [Problem(p.key, p.message, p.fix, f"sweep point {label}"
                                 + (f", {p.where}" if p.where else "")) for p in exc.problems]
    if problems:
        raise ConfigError(problems, f"sweep of {call.run_file} ({len(labelled)} points; nothing "
                          "written or submitted)")
    for point in points:
        _write_point(call, point)
    first = points[0].job
    if first.env_from_shell and not call.submit:
        print(f"the job takes {', '.join(first.env_from_shell)} from the environment sbatch runs in "
              "(cluster.env_from_shell): export them first")
        for problem in secret_env.missing(points[0].cfg):
            log.warning(f"{problem.key}: {problem.message}")
    ids: list[str] = []
    try:
        if call.test_only or call.submit:   # a job Slurm cannot run (time over the partition's
            # MaxTime, more nodes than it has) would pend forever: asked first, in 0.1 s, for
            # every point before any is submitted
            for point in points:
                answer = submit(point.job.job_script, test_only=True, export=point.passed)
                if call.test_only:
                    print((f"[{point.label}] " if point.label else "") + answer)
        if call.submit:
            for point in points:
                for line in [*verdict_lines(point.plan_text or ""), point.part_note or ""]:
                    if line:
                        print((f"[{point.label}] " if point.label else "") + f"plan: {line}"
                              if line.startswith("verdict") else line)
            for point in points:
                job_id = _submit_point(point)
                ids.append(job_id)
                print(f"submitted; logs in {os.path.join(point.job.run_dir, layout.LOGS)}"
                      + (f"  [{point.label}]" if point.label else "") + "; job id:")
                print(job_id)
            if len(ids) > 1:
                print(f"{len(ids)} jobs: {' '.join(ids)}; list them with: ftlaunch runs "
                      f"{quote(os.path.dirname(points[0].job.run_dir))}")
    except SubmitError as exc:
        kept = (f"the run directory is kept: {points[0].job.run_dir}" if len(points) == 1 else
                f"the run directories are kept; submitted before this: {' '.join(ids) or 'none'}")
        print(f"ftlaunch: {exc}\n{kept}", file=sys.stderr)
        return 1
    return 0
