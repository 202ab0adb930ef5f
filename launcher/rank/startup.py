"""Where a rank's start-up goes: the seconds of each phase from its process's start to its first
step, written by rank 0 to RUN_DIR/startup.json (one launch's; the next launch replaces it).

    clock = StartClock()          # at the rank's entry: the interpreter and imports before it
    clock.mark("distributed init")
    ...
    clock.write(run_dir)          # rank 0, before the first step

The phases: "interpreter and imports" (from the process's start, read from /proc, to the entry;
absent where /proc is not), "launch" (from the launcher's start of torchrun, layout.LAUNCHED_ENV,
to this process's start: torchrun's own start and the rank guard), then each phase `mark`ed. The dry
run keeps them with its step time (launcher/cluster/step_time.py `record_dry_run`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from launcher.cluster import layout


def process_started() -> Optional[float]:
    """This process's start, in seconds since the epoch (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])   # field 22: starttime
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class StartClock:
    """The phases of a rank's start-up, in order (see the module docstring)."""

    def __init__(self) -> None:
        self.at = time.time()
        self.phases: dict[str, float] = {}
        begun = process_started()
        launched = os.environ.get(layout.LAUNCHED_ENV)
        if begun is not None and launched:
            try:
                self.phases["launch"] = round(max(0.0, begun - float(launched)), 3)
            except ValueError:
                pass
        if begun is not None:
            self.phases["interpreter and imports"] = round(max(0.0, self.at - begun), 3)

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self.at, 3)
        self.at = now

    def write(self, run_dir: str) -> None:
        from launcher.cluster.rundir import write_atomic
        write_atomic(os.path.join(run_dir, layout.STARTUP),
                     json.dumps({"phases_s": self.phases}, indent=1)
                     + "\n")
