"""`ftlaunch stop RUN_DIR`: ask the run's ranks to checkpoint at their next step boundary and end.

It creates RUN_DIR/STOP (launcher/cluster/run_state.py), the request the ranks look for at every step;
the Slurm job script takes a STOP file for a stop on request, so the job ends COMPLETED, and
`ftlaunch status` then says how to continue. A job still queued is not stopped this way (the
script clears a STOP file left from before it started): that is said, with `scancel`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from launcher.cluster import job_lock, run_state
from launcher.ops import status


@dataclass(frozen=True)
class StopCall:
    """What `ftlaunch stop` was asked: the run directory."""
    run_dir: str


def main(call: StopCall) -> int:
    run_dir = os.path.abspath(call.run_dir)
    cfg = run_state.load_run(run_dir)   # a ConfigError names a folder that is no run directory
    max_steps = cfg.train.max_steps or status.epoch_steps(cfg, run_dir)   # an epoch run's too
    done = run_state.finished(run_dir, max_steps)
    if done:
        print(run_state.finished_message(run_dir, done, max_steps))
        return 0
    owner = job_lock.live_owner(run_dir)
    if owner and owner[1] in ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD"):
        print(f"ftlaunch: job {owner[0]} of {run_dir} is {owner[1]}, not training yet: nothing to "
              f"stop. To keep it from running: scancel {owner[0]}", file=sys.stderr)
        return 1
    run_state.request_stop(run_dir)
    where = f"Slurm job {owner[0]} ends COMPLETED" if owner else "the run ends"
    print(f"asked the ranks of {run_dir} to stop: they checkpoint at their next step boundary "
          f"and exit, and {where}. Continue later with: {status.resume_advice(run_dir)}")
    if not owner:
        print(f"(no Slurm job of this run is queued or running; if no `ftlaunch run` uses it "
              f"either, {run_state.stop_path(run_dir)} is cleared when the run starts again)")
    return 0
