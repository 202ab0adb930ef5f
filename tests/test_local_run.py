"""`ftlaunch run`: checks before any rank starts, the local config, dry run, Ctrl-C, exit codes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launcher.cluster import local_run, run_state
from launcher.config.errors import ConfigError
from launcher.config.runfile import load
from ranks import ROOT, rank_env


def run_text(tiny: dict, tmp_path, **over) -> str:
    data = over.get("data", f"{{path: {tiny['text']}, max_seq_len: 32, packing: true}}")
    train = over.get("train", "{max_steps: 4, micro_batch_size: 4, lr: 3.0e-3, device: cpu}")
    return textwrap.dedent(f"""\
        name: local
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {data}
        train: {train}
        freeze: {{policy: last_layers, trainable_layers: 1, also_train: [lm_head]}}
        deepspeed: {{zero_stage: 1}}
        output: {{dir: {tmp_path}/run}}
        """)


def args(run_file: str, **kw) -> local_run.RunCall:
    if "overrides" in kw:
        kw["overrides"] = tuple(kw["overrides"])
    return local_run.RunCall(run_file=run_file, **kw)


# ---------------------------------------------------------------- before any rank
@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("ranks were started")
    monkeypatch.setattr(local_run, "launch", refuse)


@pytest.mark.parametrize("case, match", [
    ("missing_column", r"data.text_field"),
    ("empty", r"data.path( \([^)]*\))?: .*(no rows|empty|no examples)"),
    ("too_long", r"data.max_seq_len .*4096 exceeds the model's 256 positions"),
    ("missing_file", r"data.path.*no such file"),
])
def test_bad_data_fails_before_ranks(case, match, tiny, tmp_path, write_run, no_launch, capfd):
    """Problems the run file's own checks find raise here; the data's own (read by the ranks'
    reader in a child process) exit 2 with the same ConfigError text."""
    bad = tmp_path / "bad.jsonl"
    if case == "missing_column":
        bad.write_text('{"body": "the cat sees a dog."}\n' * 20)
    elif case == "empty":
        bad.write_text("")
    data = {"missing_column": f"{{path: {bad}, max_seq_len: 32}}",
            "empty": f"{{path: {bad}, max_seq_len: 32}}",
            "too_long": f"{{path: {tiny['text']}, max_seq_len: 4096}}",
            "missing_file": f"{{path: {tmp_path}/nope.jsonl, max_seq_len: 32}}"}[case]
    path = write_run(run_text(tiny, tmp_path, data=data))
    try:
        code = local_run.main(args(path))
    except ConfigError as exc:
        assert re.search(match, str(exc)), exc
    else:
        assert code == 2 and re.search(match, capfd.readouterr().err)
    assert not (tmp_path / "run").exists()  # no half-written run directory either


def test_local_config_keeps_global_batch(tiny, tmp_path, write_run):
    path = write_run(run_text(tiny, tmp_path, train="{max_steps: 4, micro_batch_size: 2, "
                                                      "global_batch_size: 16, device: cpu}"))
    cfg = load(path)
    local = local_run.local_config(cfg, "cpu", 2)
    assert (local.train.device, local.cluster.nodes, local.cluster.gpus_per_node,
            local.train.grad_accum) == ("cpu", 1, 2, None)
    from launcher.config.batch import batch_sizes
    assert batch_sizes(local) == (2, 4, 16)
    with pytest.raises(ConfigError, match=r"16 is not a multiple of micro_batch_size x ranks = 2 x 3"):
        local_run.local_config(cfg, "cpu", 3)


def test_cpu_device_and_default_ranks(tiny, tmp_path, write_run):
    cfg = load(write_run(run_text(tiny, tmp_path)))
    assert local_run.local_ranks(cfg, None) == ("cpu", 2)
    assert local_run.local_ranks(cfg, 3) == ("cpu", 3)


def test_exit_code_from_rank_status(tmp_path):
    """`ftlaunch run` exits with the ranks' code (run_state.launch_exit_code), not torchrun's 1."""
    since = time.time()
    run_dir = str(tmp_path)
    assert run_state.launch_exit_code(0, run_dir, since) == 0
    assert run_state.launch_exit_code(1, run_dir, since) == 1  # no status: torchrun's code
    (tmp_path / "exit_status.json").write_text(json.dumps({"code": 75}))
    assert run_state.launch_exit_code(1, run_dir, since) == 75
    assert run_state.launch_exit_code(-9, run_dir, since + 3600) == 137  # stale status ignored
    (tmp_path / "exit_status.json").write_text(json.dumps({"code": "x"}))
    assert run_state.launch_exit_code(3, run_dir, since) == 3  # unreadable code: the launcher's


# ---------------------------------------------------------------- real ranks
def ftlaunch(*argv: str, **kw) -> subprocess.Popen:
    kw.setdefault("env", rank_env())
    return subprocess.Popen([sys.executable, "-m", "launcher", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.multirank
@pytest.mark.slow
def test_dry_run_trains_its_steps_and_keeps_nothing(tiny, tmp_path, write_run):
    path = write_run(run_text(tiny, tmp_path))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    p = ftlaunch("run", path, "--dry-run", env={**rank_env(), "TMPDIR": str(scratch)})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-4000:]
    assert "freeze policy last_layers:" in out       # the report, printed by rank 0
    assert "done: 18 steps; checkpoint (not saved: dry run)" in out   # 2 warm-up + 16 timed
    assert "dry run: nothing is kept" in out
    # the tiny model's checkpoint is small: one save was timed, in the temporary folder
    m = re.search(r"ftlaunch: measured \S+ s a step \(\S+ s a micro batch; median of (\d+) steps "
                  r"after (\d+), \S+ s\), start-up and shut-down \S+ s, warm-up \S+ s, a "
                  r"checkpoint save \S+ s on 2 cpu ranks; kept in (\S+) ", out)
    assert m and int(m[1]) + int(m[2]) == 18 and int(m[1]) >= 9, out   # 2 or more warm-up steps
    with open(m[3], encoding="utf-8") as fh:
        rec = json.load(fh)
    phases = rec["startup_phases_s"]   # rank 0's start-up by phase (RUN_DIR/startup.json)
    assert list(phases) == ["launch", "interpreter and imports", "imports in the rank",
                            "distributed init", "tokenizer and data", "model load",
                            "freeze and engine", "resume and loop start"], phases
    assert all(v >= 0 for v in phases.values()) and phases["imports in the rank"] > 0.1, phases
    # inside the start-up and shut-down the launcher timed (torchrun started, to the loop)
    assert sum(phases.values()) <= rec["startup_s"] + 0.5, (phases, rec["startup_s"])
    assert not (tmp_path / "run").exists()
    assert not [n for n in os.listdir(scratch) if n.startswith("ftlaunch-dry-")]  # gone too


@pytest.mark.multirank
@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_75(tiny, tmp_path, write_run):
    path = write_run(run_text(tiny, tmp_path, train="{max_steps: 5000, micro_batch_size: 4, "
                                                      "lr: 1.0e-3, device: cpu}"))
    p = ftlaunch("run", path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-4000:]
    p.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    out, err = p.communicate(timeout=240)
    assert p.returncode == 75, err[-4000:]
    assert "stopping after this step, with a checkpoint (Ctrl-C again to stop at once)" in err
    assert "Traceback" not in err
    line = [x for x in out.splitlines() if x.startswith("stopped at step")]
    assert len(line) == 1 and "(STOP file)" in line[0] and "--resume" in line[0]
    step = int(line[0].split()[3])
    assert 3 <= step < 5000
    from launcher.rank import checkpoint as ck
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert ck.latest_complete(ckpts) == os.path.join(ckpts, ck.step_name(step))
    assert not (tmp_path / "run" / "STOP").exists()  # honoured and removed
    with open(tmp_path / "run" / "exit_status.json") as fh:
        assert json.load(fh)["code"] == 75


def test_kill_tree_reaches_processes_in_their_own_sessions(tmp_path):
    """What torchrun does to its workers (start_new_session): a process-group kill misses them;
    kill_tree finds them through /proc and ends them all, grandchildren included."""
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""\
        import os, subprocess, sys, time
        kids = [subprocess.Popen([sys.executable, "-c",
                 "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                 "'import time; time.sleep(300)']); time.sleep(300)"], start_new_session=True)
                for _ in range(2)]
        time.sleep(1.0)
        open({str(pids)!r}, "w").write(" ".join(str(k.pid) for k in kids))
        time.sleep(300)
        """)
    p = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 60
    while not pids.exists() and time.time() < deadline:
        time.sleep(0.1)
    tree = local_run.descendants(p.pid)
    assert len(tree) == 5, tree  # the parent, 2 workers in sessions of their own, 2 grandchildren
    workers = [int(x) for x in pids.read_text().split()]
    assert all(os.getsid(w) == w for w in workers)  # out of reach of killpg(p.pid)
    assert local_run.kill_tree(p.pid) == set()
    p.wait(timeout=10)
    assert not (tree & set(local_run.live_parents()))


@pytest.mark.multirank
@pytest.mark.slow
def test_double_ctrl_c_ends_every_process_of_the_run(tiny, tmp_path, write_run):
    """Ctrl-C twice on 2 CPU ranks: exit 130, no process of the run left 5 s after the exit,
    one message naming the checkpoint a resume takes, and the STOP file kept."""
    path = write_run(run_text(tiny, tmp_path, train="{max_steps: 5000, micro_batch_size: 4, "
                                                      "lr: 1.0e-3, device: cpu, checkpoint_every: 2}"))
    # rank 1 hangs in step 6 (SIGSTOP to itself), so the first Ctrl-C cannot end the run: what
    # makes a user press it twice; checkpoints at steps 2 and 4 are complete by then
    env = {**rank_env(), "FTLAUNCH_FAULT": "step@6:freeze", "FTLAUNCH_FAULT_RANK": "1"}
    p = ftlaunch("run", path, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    assert p.poll() is None, p.communicate()[1][-4000:]
    run = local_run.descendants(p.pid) - {p.pid}
    assert len(run) >= 3  # torchrun and its 2 workers
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-4000:]
    time.sleep(5)
    assert not (run & set(local_run.live_parents())), "processes of the run still alive"
    lines = [x for x in err.splitlines() if "stopped at once" in x]
    assert len(lines) == 1, err[-4000:]
    from launcher.rank import checkpoint as ck
    kept = ck.latest_complete(str(tmp_path / "run" / "checkpoints"), warn=lambda m: None)
    assert ck.step_of(kept) == 4 and f"kept {kept} (step 4)" in lines[0]
    assert "every process of the run ended" in lines[0] and "--resume" in lines[0]
    assert "no complete checkpoint" not in err
    assert (tmp_path / "run" / "STOP").exists()


def test_a_run_directory_of_another_config_is_refused_before_the_plan(tiny, tmp_path, write_run,
                                                                     no_launch, monkeypatch):
    """Refused in a second, before the memory plan and the tokenizing (they are not reached)."""
    from launcher.cluster import rundir
    path = write_run(run_text(tiny, tmp_path))
    cfg = local_run.local_config(load(path), "cpu", 2)
    rundir.prepare(cfg, {}, on_existing="refuse")
    def not_reached(*a, **k):
        raise AssertionError("planned or tokenized before the run directory was checked")
    monkeypatch.setattr(local_run, "plan_text", not_reached)
    monkeypatch.setattr(local_run, "check_data", not_reached)
    with pytest.raises(ConfigError, match=r"(?s)holds a run made with a different config \(changed: "
                                          r"train.lr\).*--resume"):
        local_run.main(args(path, overrides=["train.lr=0.5"]))
