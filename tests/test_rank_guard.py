"""A rank that dies by a signal (NCCL's watchdog: SIGABRT; the OOM killer: SIGKILL) still has
its end recorded in exit_status.json, by its guardian (launcher/cluster/rank_guard.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from launcher.cluster import layout, rank_guard
from launcher.ops import status
from test_train_engine import ROOT, rank_env


def test_death_messages_name_the_usual_sender():
    abort = rank_guard.death_message(signal.SIGABRT, 3, 600, "/runs/x")
    assert abort.startswith("rank 3 died by SIGABRT without a Python error: on GPUs, NCCL's "
                            "watchdog aborts a rank whose collective waited longer than "
                            "train.dist_timeout_s (600 s)")
    assert "/runs/x/logs/nccl-trace-rank-3" in abort and "train.save_timeout_s" in abort
    assert "out-of-memory killer" in rank_guard.death_message(signal.SIGKILL, 0, 600, "/r")
    assert "native code" in rank_guard.death_message(signal.SIGSEGV, 0, 600, "/r")


def test_guard_is_off_in_the_child_and_on_request():
    assert rank_guard.wanted({})
    assert not rank_guard.wanted({rank_guard.GUARDED_ENV: "1"})
    assert not rank_guard.wanted({rank_guard.SWITCH_ENV: "0"})


def run_file(tiny, folder) -> str:
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: guard
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true}}
        train: {{max_steps: 4, micro_batch_size: 4, device: cpu, dist_timeout_s: 30}}
        freeze: {{policy: last_layers, trainable_layers: 1}}
        deepspeed: {{zero_stage: 2}}
        output: {{dir: {folder}/run, save_final: false}}
        """))
    return str(path)


def ftlaunch_run(path: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "run", path, "--nproc", "1"],
                          cwd=ROOT, env={**rank_env(), "FTLAUNCH_FAULT": "step@2:abort", **env},
                          capture_output=True, text=True, timeout=400)


@pytest.mark.multirank
@pytest.mark.slow
def test_a_rank_aborted_like_nccls_watchdog_is_recorded(tiny, tmp_path):
    """The rank aborts (SIGABRT, as NCCL's watchdog ends it) at step 2: torchrun still sees
    `exitcode: -6` (the guardian dies by the same signal), exit_status.json says code 134 and
    why, `ftlaunch run` exits 134 and `ftlaunch status` shows the run failed with that reason."""
    p = ftlaunch_run(run_file(tiny, tmp_path))
    log = p.stdout + p.stderr
    assert p.returncode == 128 + signal.SIGABRT, log[-4000:]
    assert "injected fault step@2 (abort) on rank 0" in p.stderr
    assert "exitcode  : -6" in log and "SIGABRT" in log, log[-4000:]
    rec = json.loads((tmp_path / "run" / layout.EXIT_STATUS).read_text())
    assert (rec["code"], rec["rank"]) == (134, 0), rec
    assert rec["message"].startswith("rank 0 died by SIGABRT without a Python error: on GPUs, "
                                     "NCCL's watchdog aborts"), rec
    st = status.collect(str(tmp_path / "run"))
    assert st["state"] == "failed" and st["last_failure"]["code"] == 134, st


@pytest.mark.multirank
@pytest.mark.slow
def test_without_the_guard_nothing_records_the_abort(tiny, tmp_path):
    """The control: the same abort with FTLAUNCH_RANK_GUARD=0 leaves no failure record, and
    `ftlaunch run` can only say torchrun's 1."""
    p = ftlaunch_run(run_file(tiny, tmp_path), FTLAUNCH_RANK_GUARD="0")
    assert p.returncode == 1, (p.stdout + p.stderr)[-4000:]
    assert not os.path.exists(tmp_path / "run" / layout.EXIT_STATUS)
