"""Shared helpers for the tests that start real ranks: their environment, torchrun, and the
metrics a run writes. (tests/cluster/helpers.py holds the Slurm side.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_env(**extra: str) -> dict[str, str]:
    """os.environ for CPU ranks: one thread each, DeepSpeed's CPU accelerator, this checkout first
    on PYTHONPATH, the plan's model facts kept on disk (FTLAUNCH_PLAN_CACHE=1, as users have it:
    keyed by the code that derives them, so a process started here computes what it would
    compute; only this process computes its own, as its tests may patch that code), and `extra`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               FTLAUNCH_PLAN_CACHE="1", **extra)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _command(args: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), *args]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 400, cwd: str = ROOT,
             check: bool = False, **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC ARGS`, waited for; with check, a non-zero
    exit fails the test with the ends of both streams."""
    proc = subprocess.run(_command(args, nproc), env=rank_env(**extra_env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def start_torchrun(args: list[str], nproc: int = 2, **extra_env: str) -> subprocess.Popen:
    """The same, started and not waited for (text pipes for both streams)."""
    return subprocess.Popen(_command(args, nproc), env=rank_env(**extra_env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metric_rows(run_dir) -> list[dict]:
    """Every line of a run directory's metrics.jsonl, in order."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def loss_rows(run_dir) -> list[dict]:
    """The rows of metrics.jsonl that carry a training loss."""
    return [r for r in metric_rows(run_dir) if "loss" in r]
