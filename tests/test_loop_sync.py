"""The training loop's host synchronisations (launcher/rank/loop_sync.py), counted by a recorder.

This file is also the rank script (`__main__`): one process (rank 0 of 1, a real process group)
trains the tiny Llama with `train.main`, while a recorder wraps `collectives.all_reduce_sum` (a
value reduced and read on the host: one host synchronisation) and `collectives.all_reduce_start`
(the stop vote, host numbers on the gloo group: none), noting the step each call is made in.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, LOG_EVERY = 7, 3


def run_yaml(tiny: dict, out: str, watchdog_nan: bool) -> str:
    return textwrap.dedent(f"""\
        name: sync
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true, shuffle: false}}
        train: {{max_steps: {STEPS}, micro_batch_size: 2, grad_accum: 1, lr: 1.0e-3, device: cpu,
                 log_every: {LOG_EVERY}, checkpoint_every: 0, eval_every: 0,
                 watchdog: {{nan: {str(watchdog_nan).lower()}}}}}
        deepspeed: {{zero_stage: 0}}
        output: {{dir: {out}/run, save_final: false}}
        """)


def record(tiny: dict, out, watchdog_nan: bool, fault: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.yaml"
    run_file.write_text(run_yaml(tiny, str(out), watchdog_nan))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", FTLAUNCH_NO_SAVE="1",
               FTLAUNCH_FAULT=fault, TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, __file__, str(run_file), str(out / "calls.json")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 75), (p.stdout + p.stderr)[-4000:]
    calls = json.loads((out / "calls.json").read_text())
    with open(out / "run" / "metrics.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(x) for x in fh]
    return {"calls": calls, "losses": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "stdout": p.stdout, "code": p.returncode}


def per_step(calls: list, kind: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, step, phase in calls:
        if k == kind and phase == "loop":
            out[step] = out.get(step, 0) + 1
    return out


def test_a_kept_buffer_gives_the_sums_new_tensors_give():
    import torch

    from launcher.rank import collectives
    buf = torch.full((4,), 9.0, dtype=torch.float64)
    for values in ([torch.tensor(2.5, dtype=torch.bfloat16), 1.0, 7, 0],
                   [torch.tensor(1.25), 2.0, 0, torch.tensor([3.0])]):
        assert collectives.all_reduce_sum(values, "cpu", buf) == \
            collectives.all_reduce_sum(values, "cpu")
    assert buf.tolist() == [1.25, 2.0, 0.0, 3.0]  # filled in place, every value overwritten


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("sync")
    return {"on": record(tiny, base / "on", True), "off": record(tiny, base / "off", False)}


@pytest.mark.slow
def test_without_the_watchdog_the_host_reads_once_per_metrics_line(runs):
    sums = per_step(runs["off"]["calls"], "sum")
    # step 0: the stop vote before the first step; then the metrics lines (3, 6, and the last
    # step 7, where the tokens counted since are summed for the end too)
    assert sums == {0: 1, 3: 1, 6: 1, 7: 2}, sums
    # the stop vote of every step rides on the host group, started after each update
    assert per_step(runs["off"]["calls"], "start") == {s: 1 for s in range(1, STEPS + 1)}


@pytest.mark.slow
def test_with_the_watchdog_each_step_reads_its_loss_once_and_votes_ride_along(runs):
    assert per_step(runs["on"]["calls"], "sum") == {0: 1, **{s: 1 for s in range(1, STEPS + 1)}}
    assert per_step(runs["on"]["calls"], "start") == {}


@pytest.mark.slow
def test_the_logged_losses_do_not_depend_on_when_they_are_read(runs):
    on, off = runs["on"]["losses"], runs["off"]["losses"]
    assert sorted(on) == [3, 6, 7] and on == off, (on, off)


@pytest.mark.slow
def test_a_stop_without_the_watchdog_is_honoured_one_step_later(tiny, tmp_path):
    """STOP appears during step 3 (after its backward): with the watchdog on the ranks stop at
    step 3 (tests/test_faults.py), without it at the end of step 4, as docs/training.md says."""
    r = record(tiny, tmp_path, False, fault="step@3:stop")
    assert r["code"] == 75
    lines = [x for x in r["stdout"].splitlines() if x.startswith("stopped at step")]
    assert len(lines) == 1 and lines[0].startswith("stopped at step 4 (STOP file); "), \
        r["stdout"][-2000:]
    assert sorted(r["losses"]) == [3]  # log_every 3: step 4 is not a metrics line


if __name__ == "__main__":
    import types

    from launcher.cluster import run_state
    from launcher.rank import collectives, train

    state = {"step": 0, "phase": "loop"}
    calls: list = []
    sum_, start_ = collectives.all_reduce_sum, collectives.all_reduce_start

    def counted_sum(values, device, out=None):
        calls.append(("sum", state["step"], state["phase"]))
        return sum_(values, device, out)

    def counted_start(values):
        calls.append(("start", state["step"], state["phase"]))
        return start_(values)

    accumulate = train.accumulate

    def step_counted(s, p, batches):
        state["step"] += 1
        return accumulate(s, p, batches)

    def ended(fn):
        def wrapped(*a, **k):
            state["phase"] = "end"
            return fn(*a, **k)
        return wrapped

    collectives.all_reduce_sum, collectives.all_reduce_start = counted_sum, counted_start
    train.accumulate = step_counted
    train.finish, train.stopped = ended(train.finish), ended(train.stopped)
    leave = run_state.leave

    def report_and_leave(code):
        with open(sys.argv[2], "w", encoding="utf-8") as fh:
            json.dump(calls, fh)
        leave(code)

    run_state.leave = report_and_leave
    sys.exit(train.main(types.SimpleNamespace(run_file=sys.argv[1], overrides=[])))
