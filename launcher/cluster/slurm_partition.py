"""The partition a job goes to, as `scontrol show partition` describes it: its time limits.

`ftlaunch slurm --submit` asks before sbatch (a job whose time Slurm cannot give pends forever,
reason PartitionTimeLimit): cluster.time above the partition's MaxTime is refused; with
`cluster.time: partition-default` (no --time rendered) the time the job will get, DefaultTime
(else MaxTime), must leave room past cluster.grace_s, as a time of its own would
(launcher/checks/slurm_checks.py time_margin_problems). Without scontrol, or without an answer, nothing
is checked here (sbatch --test-only still is).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from launcher.config.schema import RunConfig
from launcher.config.errors import Problem
from launcher.checks.slurm_checks import PARTITION_DEFAULT, time_limit_s, time_margin_problems

NO_LIMIT = ("UNLIMITED", "INFINITE")


@dataclass(frozen=True)
class Partition:
    name: str
    max_time: str       # as scontrol writes it: UNLIMITED, 1-00:00:00, 02:00:00
    default_time: str   # NONE where the partition sets none

    def seconds(self, text: str) -> Optional[int]:
        """Seconds of one of the two limits; None for none (UNLIMITED, NONE) or unreadable."""
        return None if text in NO_LIMIT or text == "NONE" else time_limit_s(text)

    def job_time(self) -> tuple[str, str]:
        """(the time a job without --time gets, where it comes from)."""
        if self.default_time not in ("NONE", ""):
            return self.default_time, f"partition {self.name}'s DefaultTime"
        return self.max_time, f"partition {self.name}'s MaxTime (it sets no DefaultTime)"


def parse(text: str, name: Optional[str]) -> Optional[Partition]:
    """The partition `name` (None: the one with Default=YES) of `scontrol show partition -o`."""
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if not fields.get("PartitionName"):
            continue
        if (name and fields["PartitionName"] == name) or (not name and fields.get("Default") == "YES"):
            return Partition(fields["PartitionName"], fields.get("MaxTime", "UNLIMITED"),
                             fields.get("DefaultTime", "NONE"))
    return None


def lookup(name: Optional[str]) -> Optional[Partition]:
    """The partition from scontrol; None without scontrol, an answer or such a partition."""
    if shutil.which("scontrol") is None:
        return None
    try:
        p = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse(p.stdout, name) if p.returncode == 0 else None


def time_problems(cfg: RunConfig, part: Optional[Partition]) -> list[Problem]:
    """cluster.time against the partition's limits (nothing to say without the partition)."""
    c = cfg.cluster
    if part is None:
        return []
    max_s = part.seconds(part.max_time)
    if c.time == PARTITION_DEFAULT:
        text, source = part.job_time()
        return list(time_margin_problems(text, part.seconds(text), c.grace_s, source))
    limit = time_limit_s(c.time)
    if max_s and limit and limit > max_s:
        return [Problem("cluster.time", f"{c.time} is above partition {part.name}'s MaxTime "
                        f"{part.max_time}: the job would pend forever (PartitionTimeLimit)",
                        f"lower cluster.time to {part.max_time} or less, or set cluster.time: "
                        f"{PARTITION_DEFAULT} to take the partition's own")]
    return []


def describe_time(cfg: RunConfig, part: Optional[Partition]) -> Optional[str]:
    """What `--submit` prints about the time limit of a job rendered without --time."""
    if cfg.cluster.time != PARTITION_DEFAULT:
        return None
    if part is None:
        return ("time limit: the partition's default (cluster.time: partition-default); "
                "scontrol did not say which")
    text, source = part.job_time()
    return f"time limit: {text}, {source} (cluster.time: {PARTITION_DEFAULT})"
