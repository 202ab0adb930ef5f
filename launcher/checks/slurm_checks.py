"""Cluster-section rules: every value must be safe to put in an sbatch script, and make sense to Slurm.

These run with every other cross-field rule (`launcher/checks/validate.py`), so `ftlaunch validate`
reports them before anything is rendered; `launcher/cluster/shell.py` refuses the same values again at
render time for jobs built in code.
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Iterator

from launcher.config.schema import ENV_NAME, SBATCH_EXTRA, ClusterConfig, RunConfig
from launcher.config.errors import Problem
from launcher.config.secret_env import RESERVED_ENV
from launcher.model.device import job_device

# Options the launcher sets from cluster fields (or needs for its own protocol): not in sbatch_extra.
MANAGED = {
    "--nodes": "cluster.nodes", "--ntasks": "one task per node, fixed",
    "--ntasks-per-node": "one task per node, fixed", "--gpus-per-node": "cluster.gpus_per_node",
    "--cpus-per-task": "cluster.cpus_per_task", "--mem": "cluster.mem", "--time": "cluster.time",
    "--partition": "cluster.partition", "--account": "cluster.account", "--qos": "cluster.qos",
    "--constraint": "cluster.constraint", "--reservation": "cluster.reservation",
    "--exclusive": "cluster.exclusive", "--job-name": "name",
    "--output": "logs go to the run directory's logs/",
    "--error": "logs go to the run directory's logs/", "--open-mode": "append, fixed",
    "--signal": "cluster.grace_s", "--requeue": "cluster.requeue", "--no-requeue": "cluster.requeue",
    "--chdir": "the job runs where `ftlaunch slurm` ran",
    "--gpus": "cluster.gpus_per_node", "--gpus-per-task": "cluster.gpus_per_node",
    "--array": "the tasks of an array job would share one run directory; for several runs "
               "from one run file: ftlaunch slurm RUN.yaml --sweep key=v1,v2 (a run directory "
               "and a job for each value)",
    "--dependency": "cluster.after",
    "--export": "cluster.env_from_shell (sbatch_extra may say --export=NONE)",
}
# Slurm sends --signal's signal up to this much earlier than asked (its timer's resolution).
SIGNAL_EARLY_S = 60
# Training time each start must have before the earliest grace signal (start-up, a step, a
# checkpoint): less, and a restart is signalled before it makes progress, again and again.
MIN_WORK_S = 300
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def time_limit_s(text: str) -> int | None:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (None if unreadable)."""
    m = _TIME.fullmatch(text)
    if not m:
        return None
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:   # D-H, D-H:M, D-H:M:S
        h, mi, s = (nums + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if len(nums) == 3:     # H:M:S
        return nums[0] * 3600 + nums[1] * 60 + nums[2]
    return nums[0] * 60 + (nums[1] if len(nums) == 2 else 0)   # M or M:S


def _clock(seconds: int) -> str:
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _breaks(v: str) -> bool:
    return "\n" in v or "\r" in v or "\0" in v


def problems(cfg: RunConfig) -> Iterator[Problem]:
    c = cfg.cluster
    yield from mem_problems(cfg)
    for name in ("partition", "account", "qos", "constraint", "reservation", "mem", "time", "python",
                 "container"):
        v = getattr(c, name)
        if isinstance(v, str) and _breaks(v):
            yield Problem(f"cluster.{name}", "contains a line break, which cannot be made safe in "
                          "an #SBATCH line", "remove the line break")
        elif isinstance(v, str) and not v.strip():
            yield Problem(f"cluster.{name}", "is empty", f"give a value or remove cluster.{name}")
    run_dir = cfg.run_dir
    if _breaks(run_dir) or "\\" in run_dir:
        yield Problem("output.dir", f"{run_dir!r} contains a line break or a backslash, which Slurm "
                      "log file names cannot hold (a backslash switches off %j)",
                      "choose a run directory without them")
    yield from _time_problems(c)
    yield from auto_time_problems(cfg)
    yield from _python_problems(c)
    for i, job in enumerate(c.after):
        if not re.fullmatch(r"[0-9]+(_[0-9]+)?", str(job)):
            yield Problem(f"cluster.after[{i}]", f"{job!r} is not a Slurm job id",
                          "give the number sbatch printed (e.g. 4242), as a string or a number")
    yield from _sbatch_extra_problems(c, gpus=job_device(cfg) == "cuda")
    yield from _env_problems(c)


PARTITION_DEFAULT = "partition-default"   # cluster.time: no --time, the partition's default


def _time_problems(c: ClusterConfig) -> Iterator[Problem]:
    """cluster.time against grace_s and Slurm's early signal."""
    yield from time_margin_problems(c.time, time_limit_s(c.time), c.grace_s)


def time_margin_problems(text: str, limit: int | None, grace_s: int,
                         source: str = "") -> Iterator[Problem]:
    """A time limit (limit seconds, written `text`; from `source` when not cluster.time itself)
    against grace_s and Slurm's early signal."""
    where = f" ({source})" if source else ""
    if limit and grace_s >= limit:   # 0: no time limit
        yield Problem("cluster.grace_s", f"grace_s {grace_s} s is not shorter than the time limit "
                      f"{text}{where} ({limit} s): the job would be told to stop as it starts",
                      "lower grace_s or raise cluster.time")
    elif limit and limit - grace_s - SIGNAL_EARLY_S < MIN_WORK_S:
        yield Problem("cluster.time", f"{text}{where} ({limit} s) leaves {limit - grace_s - SIGNAL_EARLY_S}"
                      f" s before the stop signal: grace_s {grace_s} s, and Slurm sends it up to "
                      f"{SIGNAL_EARLY_S} s early; each start would be stopped before it trains",
                      f"raise cluster.time to at least {_clock(grace_s + SIGNAL_EARLY_S + MIN_WORK_S)} "
                      "or lower cluster.grace_s")


def auto_time_problems(cfg: RunConfig) -> Iterator[Problem]:
    """cluster.time auto needs a step count and a step time (launcher/memory/clock.py)."""
    if cfg.cluster.time != "auto":
        return
    from launcher.cluster import step_time
    from launcher.config import epochs
    fix = "or give cluster.time as H:MM:SS"
    if cfg.train.max_steps is None and not any(
            os.path.exists(path) for path, _ in epochs._sources(cfg)):
        yield Problem("cluster.time", "auto cannot estimate the steps: train.epochs over data that "
                      "is not a local file or folder (nothing to count on the login node)",
                      f"set train.max_steps, {fix}")
    if step_time.measured(cfg, cfg.world_size) is not None:
        return
    if cfg.train.device == "cpu":
        yield Problem("cluster.time", "auto on CPU ranks needs a measured step time (there is no "
                      "peak FLOP/s for a CPU)", f"run `ftlaunch run RUN.yaml --dry-run` first, {fix}")
    elif not cfg.cluster.gpu_type:
        yield Problem("cluster.time", "auto needs the GPU's peak FLOP/s or a measured step time",
                      f"set cluster.gpu_type (e.g. H100-SXM, A100-80GB), run `ftlaunch run "
                      f"RUN.yaml --dry-run` on the cluster's GPUs, {fix}")


def _python_problems(c: ClusterConfig) -> Iterator[Problem]:
    if isinstance(c.python, str) and c.python.strip() != c.python or (
            len(c.python.split()) > 1 and not os.path.isfile(c.python)):
        yield Problem("cluster.python", f"{c.python!r} is a command, not one program: the job "
                      "runs it as a single executable path (a prefix such as `env python` or "
                      "`apptainer exec x.sif python` fails at execve)",
                      "give the path of a Python executable; for a container set "
                      "cluster.container (and container_runtime); otherwise a wrapper script "
                      'that runs the command: #!/bin/bash + exec env python "$@"')


def _sbatch_extra_problems(c: ClusterConfig, gpus: bool = True) -> Iterator[Problem]:
    for i, item in enumerate(c.sbatch_extra):
        key = f"cluster.sbatch_extra[{i}]"
        m = SBATCH_EXTRA.fullmatch(item)
        if _breaks(item):
            yield Problem(key, f"{item!r} contains a line break, which cannot be made safe in an "
                          "#SBATCH line", "remove the line break")
        elif not m:
            yield Problem(key, f"{item!r} is not an sbatch long option", "write --name=value or --flag "
                          "(short options like -N are not accepted)")
        elif m.group(1) == "--export" and m.group(2) == "NONE":
            if c.env_from_shell:   # NONE would keep those variables from the job
                yield Problem(key, "--export=NONE keeps the variables of cluster.env_from_shell "
                              "from the job", "remove one of the two (cluster.env sets values)")
        elif m.group(1) == "--gres" and gpus and gres_gpus(m.group(2) or ""):
            yield from _gres_problem(c, key, item)
        elif m.group(1) in MANAGED:
            source = MANAGED[m.group(1)]
            if source.startswith(("cluster.", "name")):
                yield Problem(key, f"{m.group(1)} is set by the launcher from {source}",
                              f"remove it from sbatch_extra and set {source}")
            else:
                yield Problem(key, f"{m.group(1)} is set or ruled out by the launcher ({source})",
                              "remove it from sbatch_extra")


def gres_gpus(value: str) -> list[str]:
    """The GPU entries of a --gres value: `gpu:2,nvme:1` -> ['gpu:2'] (`gpu`, `gpu:a100:4`)."""
    return [part for part in value.split(",") if part.split(":")[0].strip() == "gpu"]


def _gres_problem(c: ClusterConfig, key: str, item: str) -> Iterator[Problem]:
    """--gres=gpu:... beside the --gpus-per-node the launcher renders: Slurm takes GPUs from
    either, and two counts that disagree give a job the wrong number of GPUs (or one Slurm
    refuses), so the GPU count has one home, cluster.gpus_per_node (train.device cpu renders no
    --gpus-per-node: the job gets what --gres asks)."""
    gpus = gres_gpus(item.partition("=")[2])
    typed = [g.split(":")[1] for g in gpus if g.count(":") == 2]
    kind = (f"; for a GPU model ({typed[0]}) select nodes by feature with cluster.constraint, "
            "or set cluster.gpu_type for the plan") if typed else ""
    yield Problem(key, f"{item!r} asks for GPUs beside --gpus-per-node={c.gpus_per_node}, which the "
                  "launcher sets from cluster.gpus_per_node: Slurm would take two GPU requests for "
                  "one job", f"remove {', '.join(gpus)} from the --gres option (other generic "
                  f"resources, e.g. --gres=nvme:1, stay) and set cluster.gpus_per_node{kind}")


def _env_problems(c: ClusterConfig) -> Iterator[Problem]:
    """cluster.env names and values, cluster.setup lines: what the job script can carry."""
    for name, value in c.env.items():
        key = f"cluster.env.{name}"
        if not ENV_NAME.fullmatch(name):
            yield Problem(key, f"{name!r} is not a valid environment variable name",
                          "use letters, digits and _, not starting with a digit")
        elif name in RESERVED_ENV:
            yield Problem(key, f"{name} is set by the launcher for every rank",
                          f"remove {name} from cluster.env")
        if isinstance(value, str) and "\0" in value:
            yield Problem(key, "contains a NUL byte, which no environment variable can hold",
                          "remove it")
    for i, line in enumerate(c.setup):
        key = f"cluster.setup[{i}]"
        if "\0" in line:
            yield Problem(key, "contains a NUL byte", "remove it")
            continue
        try:
            shlex.split(line, comments=True)
        except ValueError as exc:
            yield Problem(key, f"{line!r} is not complete shell ({exc}); it would swallow the rest "
                          "of the job script", "close the quote or escape it")


def suggested_form(key: str, value: str) -> str | None:
    """The Slurm form of a cluster.mem or cluster.time written another way (`80GiB` -> `80G`,
    `25h` -> `1-01:00:00`), for the fix of the schema's pattern problem; None if unreadable."""
    v = value.strip()
    if key == "cluster.mem":
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT])(?:i?B)?", v, re.I)
        if m and float(m.group(1)).is_integer():
            return f"{int(float(m.group(1)))}{m.group(2).upper()}"
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT])(?:i?B)?", v, re.I)
        if m:  # 1.5T -> 1536G
            units = "KMGT"
            i = units.index(m.group(2).upper())
            return f"{int(float(m.group(1)) * 1024)}{units[i - 1]}" if i else None
        return None
    if key == "cluster.time":
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(d|days?|h|hours?|hrs?|m|min|mins|minutes?)", v, re.I)
        if not m:
            return None
        minutes = round(float(m.group(1)) * {"d": 1440, "h": 60, "m": 1}[m.group(2)[0].lower()])
        d, rem = divmod(minutes, 1440)
        h, mi = divmod(rem, 60)
        return f"{d}-{h:02d}:{mi:02d}:00" if d else f"{h:02d}:{mi:02d}:00"
    return None


def mem_problems(cfg: RunConfig) -> Iterator[Problem]:
    """cluster.mem without a unit is megabytes to Slurm: a small number is almost surely GB."""
    mem = cfg.cluster.mem
    if isinstance(mem, str) and re.fullmatch(r"[0-9]+", mem.strip()) and 0 < int(mem) < 1024:
        yield Problem("cluster.mem", f"{mem} without a unit is {mem} MB to Slurm (--mem={mem})",
                      f"write the unit: {mem}G for {mem} GB (or {mem}M to keep megabytes; 0: all "
                      "of the node's memory)")
