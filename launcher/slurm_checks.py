"""Cluster-section rules that keep every value safe to put in an sbatch script."""
from __future__ import annotations

from typing import Iterator

from launcher.config import RunConfig
from launcher.errors import Problem


def problems(cfg: RunConfig) -> Iterator[Problem]:
    c = cfg.cluster
    for name in ("partition", "account", "qos", "constraint", "reservation", "mem", "time", "python"):
        v = getattr(c, name)
        if isinstance(v, str) and ("\n" in v or "\r" in v or "\0" in v):
            yield Problem(f"cluster.{name}", "contains a line break, which cannot be made safe in "
                          "an #SBATCH line", "remove the line break")
