"""`ftlaunch validate` and `ftlaunch ds-config`: through the real CLI (a subprocess) and main()."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launcher import cli
from launcher.cluster import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = """\
name: cli-run
model: {path: model, dtype: bf16}
data: {path: train.jsonl, max_seq_len: 64}
train: {max_steps: 20, micro_batch_size: 2, global_batch_size: 32, lr: 2e-5}
deepspeed: {zero_stage: 3, offload_optimizer: cpu}
cluster: {nodes: 2, gpus_per_node: 4, time: 24:00:00}
"""
BAD = """\
name: cli-run
model: {path: model, dtype: bf17}
data: {path: train.jsonl, max_seq_len: 64}
train: {max_steps: 20, micro_batch_size: 4, global_batch_size: 100, lrr: 1}
cluster: {nodes: 2, gpus_per_node: 4}
"""


def ftlaunch(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def files(tmp_path, fake_model):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(BAD)
    return tmp_path


def test_validate_prints_ok_and_a_one_screen_summary(files):
    res = ftlaunch("validate", "good.yaml", cwd=str(files))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "OK good.yaml"
    assert len(lines) <= 24
    text = res.stdout
    assert f"model         {files / 'model'} (bf16)" in text
    assert "2 node(s) x 4 GPU(s) = 8" in text
    assert "2 micro x 2 accum x 8 ranks = 32 sequences = 2,048 tokens/step" in text
    assert "ZeRO-3, preset zero3_offload, offload optimizer->cpu" in text
    assert "slurm         time 24:00:00, requeue up to 3x" in text
    assert res.stderr == ""


def test_validate_lists_every_problem_and_exits_2(files):
    res = ftlaunch("validate", "bad.yaml", cwd=str(files))
    assert res.returncode == layout.EXIT_CONFIG == 2
    assert res.stdout == ""
    err = res.stderr
    assert err.startswith("bad.yaml: 3 problems\n")
    assert "  model.dtype (bad.yaml:2): 'bf17' is not one of 'bf16', 'fp16', 'fp32'\n" \
           "      fix: did you mean 'bf16'?" in err
    assert "  train.lrr (bad.yaml:4): unknown key\n      fix: did you mean 'lr'?" in err
    assert "train.global_batch_size (bad.yaml:4): global_batch_size 100 is not a multiple of " \
           "micro_batch_size x nodes x gpus_per_node = 4 x 2 x 4 = 32" in err
    assert "fix: use one of: global_batch_size: 96 (grad_accum 3); global_batch_size: 128" in err


def test_validate_takes_overrides(files):
    res = ftlaunch("validate", "bad.yaml", "model.dtype=bf16", "train.global_batch_size=96",
                   "train.lrr=", cwd=str(files))
    assert res.returncode == 2 and res.stderr.startswith("bad.yaml: 1 problem\n")
    assert "train.lrr (override 'train.lrr='): unknown key" in res.stderr


def test_validate_missing_file(files):
    res = ftlaunch("validate", "nope.yaml", cwd=str(files))
    assert res.returncode == 2 and "no such run file: nope.yaml" in res.stderr


def test_ds_config_prints_the_json(files):
    res = ftlaunch("ds-config", "good.yaml", "train.lr=1e-4", cwd=str(files))
    assert res.returncode == 0, res.stderr
    ds = json.loads(res.stdout)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_ds_config_writes_a_file(files):
    res = ftlaunch("ds-config", "good.yaml", "-o", "out.json", cwd=str(files))
    assert res.returncode == 0 and res.stdout == ""
    assert res.stderr.strip() == "wrote out.json"
    assert json.loads((files / "out.json").read_text())["train_micro_batch_size_per_gpu"] == 2
    assert [p.name for p in files.iterdir() if p.name.startswith(".out.json")] == []


def test_ds_config_refuses_a_bad_run_file(files):
    res = ftlaunch("ds-config", "bad.yaml", cwd=str(files))
    assert res.returncode == 2 and res.stdout == "" and "3 problems" in res.stderr


def test_main_validate_and_ds_config(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    assert cli.main(["validate", "good.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK good.yaml\n") and "ZeRO-3" in out
    assert cli.main(["validate", "bad.yaml"]) == 2
    assert "3 problems" in capsys.readouterr().err
    assert cli.main(["ds-config", "good.yaml", "--world-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["gradient_accumulation_steps"] == 4


def test_ds_config_world_size_that_does_not_divide(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    assert cli.main(["ds-config", "good.yaml", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "global_batch_size 32 is not a multiple of micro_batch_size x world size = 2 x 3 = 6" in err
    assert "global_batch_size: 30 (grad_accum 5)" in err


@pytest.mark.parametrize("value, message", [("0", "must be at least 1, got 0"),
                                            ("two", "expected a whole number, got 'two'")])
def test_ds_config_world_size_must_be_positive(files, capsys, monkeypatch, value, message):
    monkeypatch.chdir(files)
    with pytest.raises(SystemExit, match="2"):
        cli.main(["ds-config", "good.yaml", "--world-size", value])
    assert message in capsys.readouterr().err


def test_ds_config_output_folder_missing(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    assert cli.main(["ds-config", "good.yaml", "-o", "no/such/dir/ds.json"]) == 2
    assert "cannot write no/such/dir/ds.json: No such file or directory" in capsys.readouterr().err


def test_help_lists_the_commands():
    res = subprocess.run([sys.executable, "-m", "launcher", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert res.returncode == 0
    for command in ("validate", "ds-config", "plan", "slurm", "run", "train"):
        assert command in res.stdout
