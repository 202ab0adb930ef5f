"""Collective timeouts (launcher/rank/timeouts.py): a phase where rank 0 works alone gets the long
timeout on every process group (two real gloo processes); NCCL's flight recorder is pointed at
the run directory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from launcher.rank import timeouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two ranks on gloo with a 2 s collective timeout. Rank 0 works alone for 4 s (sleeps), rank 1
# waits for it in a barrier on the world group and in one on a group made afterwards (as
# DeepSpeed makes its own), then both do an all-reduce with the normal timeout.
RANKS = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from launcher.rank import timeouts
    rank, use_phase = int(os.environ["RANK"]), sys.argv[1] == "phase"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    other = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    try:
        if use_phase:
            with timeouts.rank0_phase(30, 2):
                if rank == 0:
                    time.sleep(4)
                dist.barrier()
                if rank == 0:
                    time.sleep(4)
                dist.barrier(group=other)
        else:
            if rank == 0:
                time.sleep(4)
            dist.barrier()
        t = torch.ones(1)
        dist.all_reduce(t)
        print(f"rank {rank}: ok {t.item():g}", flush=True)
    except Exception as exc:
        print(f"rank {rank}: {type(exc).__name__}: {exc}"[:300], flush=True)
        os._exit(3)
    os._exit(0)
""")


def run_two(tmp_path, mode: str) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), mode], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, text, ""))
    return out


@pytest.mark.multirank
def test_rank0_phase_lets_the_others_wait_past_the_collective_timeout(tmp_path):
    r0, r1 = run_two(tmp_path, "phase")
    assert (r0.returncode, r1.returncode) == (0, 0), r0.stdout + r1.stdout
    assert "rank 1: ok 2" in r1.stdout and "rank 0: ok 2" in r0.stdout


@pytest.mark.multirank
def test_without_the_phase_the_waiting_rank_times_out(tmp_path):
    """The control: the same 4 s of rank 0 alone ends rank 1's barrier after 2 s."""
    r0, r1 = run_two(tmp_path, "plain")
    assert r1.returncode == 3, r1.stdout
    assert "rank 1: RuntimeError: " in r1.stdout and "Timed out waiting 2000ms" in r1.stdout, r1.stdout


def test_set_timeout_without_a_process_group_changes_nothing():
    assert timeouts.set_timeout(5) == 0


def test_nccl_flight_recorder_dumps_into_the_run_directory(tmp_path):
    env: dict[str, str] = {}
    timeouts.nccl_debug_env(str(tmp_path / "run"), env)
    assert env == {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                   "TORCH_NCCL_ENABLE_MONITORING": "1",
                   "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "run" / "logs" / "nccl-trace-rank-")}
    assert (tmp_path / "run" / "logs").is_dir()
    mine = {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/x/trace-"}
    timeouts.nccl_debug_env(str(tmp_path / "run"), mine)
    assert mine["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0" and "TORCH_FR_DUMP_TEMP_FILE" not in mine


def test_checkpoints_and_the_export_wait_with_the_long_timeout(tmp_path, fake_model, monkeypatch):
    """loop_steps.finish: the checkpoint and the export run under train.save_timeout_s, the
    steps around them under train.dist_timeout_s (recorded: set_timeout, checkpoint.save and
    export.save_final replaced)."""
    import types

    from launcher.rank import checkpoint, export, loop_steps
    from launcher.config import runfile
    text = f"""
name: to
model: {{path: {fake_model}}}
data: {{path: {tmp_path}/train.jsonl, max_seq_len: 64}}
train: {{max_steps: 4, dist_timeout_s: 20, save_timeout_s: 900}}
output: {{dir: {tmp_path}/run}}
"""
    cfg, problems = runfile.parse(text, [], source="run.yaml", base_dir=str(tmp_path))
    assert problems == []
    current = [20.0]
    calls = []
    monkeypatch.setattr(timeouts, "set_timeout", lambda sec: (current.__setitem__(0, sec), 1)[1])
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: calls.append(("save", current[0]))
                        or "/ck")
    monkeypatch.setattr(export, "save_final", lambda *a, **k: calls.append(("export", current[0]))
                        or "/final")
    sampler = types.SimpleNamespace(epoch=0, state_dict=lambda: {})
    p = loop_steps.Progress(sampler, types.SimpleNamespace(offset=lambda: 0), 1, True, step=4,
                            trackers=types.SimpleNamespace(close=lambda: None))
    s = types.SimpleNamespace(cfg=cfg, engine=None, tokenizer=None, splits=types.SimpleNamespace(eval=None),
                              env=types.SimpleNamespace(is_main=False, rank=1, world_size=2))
    assert loop_steps.finish(s, p) == 0
    assert calls == [("save", 900), ("export", 900)]
    assert current == [20]


def test_a_save_timeout_shorter_than_the_step_timeout_is_refused(tmp_path, fake_model):
    from launcher.config import runfile
    text = f"""
name: to
model: {{path: {fake_model}}}
data: {{path: {tmp_path}/train.jsonl, max_seq_len: 64}}
train: {{max_steps: 4, dist_timeout_s: 900, save_timeout_s: 600}}
"""
    _, problems = runfile.parse(text, [], source="run.yaml", base_dir=str(tmp_path))
    assert [(p.key, p.message, p.fix) for p in problems] == [(
        "train.save_timeout_s", "600 s is shorter than train.dist_timeout_s 900 s: the ranks would "
        "wait less while rank 0 writes a checkpoint or the export than for a training step",
        "set train.save_timeout_s to 900 or more")]
