"""The operator's edges without ranks: overrides anywhere, --help, a closed pipe, the LR schedule,
the stop exit codes, a second Ctrl-C, and `status` on a failed run directory's files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from launcher import cli
from launcher.cluster import local_run, run_state
from launcher.rank import lr_schedule
from launcher.config.schema import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_file(tmp_path, fake_model):
    path = tmp_path / "base.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: base
        model: {{path: {fake_model}}}
        data: {{path: {tmp_path}/train.jsonl, max_seq_len: 64}}
        train: {{max_steps: 10, lr: 2.0e-5}}
        output: {{dir: {tmp_path}/run}}
        """))
    return str(path)


# ---------------------------------------------------------------- the command line
def test_overrides_after_options_are_overrides(run_file, tmp_path):
    args = cli.parse(["run", run_file, "--dry-run", "train.lr=1e-3", "--nproc", "3", "x.y=1"])
    assert args.dry_run and args.nproc == 3
    assert args.overrides == ["train.lr=1e-3", "x.y=1"]
    args = cli.parse(["run", run_file, "a.b=1", "--dry-run", "c=2"])
    assert args.overrides == ["a.b=1", "c=2"]  # in command-line order
    out = tmp_path / "x.json"
    assert cli.main(["ds-config", run_file, "-o", str(out), "train.lr=1e-3"]) == 0
    assert json.loads(out.read_text())["optimizer"]["params"]["lr"] == 1e-3
    args = cli.parse(["export", "runs/x", "-o", "out", "model.path=/m", "--dtype", "bf16"])
    assert (args.source, args.output, args.dtype, args.overrides) == ("runs/x", "out", "bf16",
                                                                      ["model.path=/m"])


def test_an_unknown_option_gets_the_commands_usage(run_file, capsys):
    with pytest.raises(SystemExit, match="2"):
        cli.parse(["ds-config", run_file, "--bogus", "train.lr=1"])
    err = capsys.readouterr().err
    assert "usage: ftlaunch ds-config" in err and "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_commands_help_shows_flags_and_override_syntax(command, capsys):
    with pytest.raises(SystemExit, match="0"):
        cli.parse([command, "--help"])
    out = capsys.readouterr().out
    assert f"usage: ftlaunch {command}" in out and "-h, --help" in out
    assert "key.sub=value anywhere on the command line" in out
    assert f"ftlaunch {command} " in out.split("overrides:")[1]  # an example


def test_no_broken_pipe_traceback_into_head(run_file):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for command in ("ds-config", "validate"):  # head -c 0 exits before the first write
        p = subprocess.run(f"{sys.executable} -m launcher {command} {run_file} | head -c 0",
                           shell=True, capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=60)
        assert p.stderr == "", p.stderr  # no BrokenPipeError traceback


# ---------------------------------------------------------------- the LR schedule
@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_no_step_runs_at_lr_zero(scheduler, warmup):
    t = TrainConfig(max_steps=20, lr=1e-3, warmup_steps=warmup, scheduler=scheduler)
    lrs = [lr_schedule.lr_at(k, t) for k in range(1, 21)]
    assert min(lrs) > 0, lrs
    assert lrs[warmup] == pytest.approx(1e-3)  # the first step after warmup runs at lr
    assert lrs[:warmup] == pytest.approx([1e-3 * k / warmup for k in range(1, warmup + 1)])


def test_the_lambda_schedule_applies_lr_at_and_a_resume_continues_the_new_one():
    import torch
    t20 = TrainConfig(max_steps=20, lr=1e-3, warmup_steps=2, scheduler="cosine")
    t30 = TrainConfig(max_steps=30, lr=1e-3, warmup_steps=2, scheduler="cosine")
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=5.0)
    sched = lr_schedule.install(opt, t20)
    applied = []
    for _ in range(20):
        applied.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert applied == pytest.approx([lr_schedule.lr_at(k, t20) for k in range(1, 21)])

    class Engine:  # what set_next touches
        optimizer, lr_scheduler = opt, sched
    state = sched.state_dict()
    sched30 = lr_schedule.install(opt, t30)
    sched30.load_state_dict(state)
    Engine.lr_scheduler = sched30
    assert lr_schedule.set_next(Engine, 20, t30) == pytest.approx(lr_schedule.lr_at(21, t30))
    more = []
    for _ in range(10):
        more.append(opt.param_groups[0]["lr"])
        opt.step()
        sched30.step()
    assert more == pytest.approx([lr_schedule.lr_at(k, t30) for k in range(21, 31)])
    assert min(more) > 0


# ---------------------------------------------------------------- stops and exit codes
def test_a_stop_is_exit_0_to_torchrun_and_75_to_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv(run_state.STOPPED_EXIT_ENV, "0")
    assert run_state.rank_exit_code(75) == 0 and run_state.rank_exit_code(1) == 1
    monkeypatch.delenv(run_state.STOPPED_EXIT_ENV)
    assert run_state.rank_exit_code(75) == 75
    since = time.time()
    run_state.write_exit_status(str(tmp_path), 0, 75, 3, None, "stopped on request")
    assert run_state.launch_exit_code(0, str(tmp_path), since) == 75


def test_a_second_ctrl_c_stops_at_once_and_says_what_was_kept(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    (ckpt / "MANIFEST.json").write_text('{"files": {}}')
    (tmp_path / "checkpoints" / "step-00000005").mkdir()  # no manifest: incomplete
    cmd = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
           "signal.SIG_IGN); time.sleep(120)"]  # ranks that would take their time
    pid = os.getpid()

    def presses():
        time.sleep(1.0)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        os.kill(pid, signal.SIGINT)
    threading.Thread(target=presses, daemon=True).start()
    started = time.time()
    code = local_run.launch(cmd, dict(os.environ), str(tmp_path))
    assert code == 130 and time.time() - started < 60
    err = capsys.readouterr().err
    assert "stopping after this step, with a checkpoint (Ctrl-C again to stop at once)" in err
    assert (f"stopped at once, every process of the run ended; kept {ckpt} (step 3), the newest "
            f"complete checkpoint; steps after it are lost; resume with: ftlaunch run "
            f"{tmp_path}/resolved.yaml --resume") in err
    # the STOP file stays (a rank that outlived the kill still stops); the next launch clears it
    assert run_state.stop_requested(str(tmp_path))


def test_max_steps_source_says_which_won(run_file):
    from launcher.config.runfile import load
    base = load(run_file)
    assert local_run.max_steps_source(base, "base.yaml", None) == \
        "train.max_steps 10 (from base.yaml)"
    assert local_run.max_steps_source(base, "base.yaml", 30) == \
        "train.max_steps 30 (--max-steps wins over 10 in base.yaml)"
