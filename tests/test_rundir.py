"""Run directories: refuse / resume / overwrite, nothing deleted, atomic writes."""
from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import yaml

from launcher.cluster import layout, rundir
from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig, to_dict
from launcher.config.errors import ConfigError

DS = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}


@pytest.fixture
def cfg(tmp_path) -> RunConfig:
    return RunConfig(name="r", model=ModelConfig(path="/m"), data=DataConfig(path="/d"),
                     train=TrainConfig(max_steps=10), output=dataclasses.replace(
                         RunConfig.__dataclass_fields__["output"].default_factory(),
                         dir=str(tmp_path / "run")))


def changed(cfg: RunConfig, **train) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def tree(path) -> dict[str, str]:
    """Every file below path -> its content."""
    out = {}
    for folder, _, files in os.walk(path):
        for f in files:
            full = os.path.join(folder, f)
            with open(full, encoding="utf-8") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def test_prepare_writes_the_decided_files(cfg):
    run_dir = rundir.prepare(cfg, DS, plan_text="fits\n")
    assert run_dir == cfg.run_dir
    with open(os.path.join(run_dir, layout.RESOLVED), encoding="utf-8") as fh:
        assert yaml.safe_load(fh) == to_dict(cfg)
    with open(os.path.join(run_dir, layout.DS_CONFIG), encoding="utf-8") as fh:
        assert json.load(fh) == DS
    assert tree(run_dir)[layout.PLAN] == "fits\n"
    assert os.path.isdir(os.path.join(run_dir, layout.LOGS))
    assert sorted(os.listdir(run_dir)) == sorted([layout.RESOLVED, layout.DS_CONFIG, layout.PLAN, layout.LOGS])


def test_the_same_config_reuses_the_directory(cfg):
    run_dir = rundir.prepare(cfg, DS)
    ckpt = os.path.join(run_dir, "checkpoints", "step-00000005")
    os.makedirs(ckpt)
    open(os.path.join(ckpt, "MANIFEST"), "w").close()
    assert rundir.prepare(cfg, DS) == run_dir
    assert os.path.exists(os.path.join(ckpt, "MANIFEST"))


def test_volatile_changes_are_not_a_different_run(cfg, tmp_path):
    rundir.prepare(cfg, DS)
    more = dataclasses.replace(changed(cfg, max_steps=100, checkpoint_every=5),
                               cluster=dataclasses.replace(cfg.cluster, time="48:00:00"))
    rundir.prepare(more, DS)
    with open(os.path.join(cfg.run_dir, layout.RESOLVED), encoding="utf-8") as fh:
        assert yaml.safe_load(fh)["train"]["max_steps"] == 100


def test_a_different_config_is_refused(cfg):
    rundir.prepare(cfg, DS)
    before = tree(cfg.run_dir)
    with pytest.raises(ConfigError, match=r"holds a run made with a different config "
                                          r"\(changed: train.lr, train.seed\)") as exc:
        rundir.prepare(changed(cfg, lr=1e-3, seed=7), DS)
    assert "--resume" in exc.value.problems[0].fix and "--overwrite" in exc.value.problems[0].fix
    assert exc.value.keys == ["output.dir"]
    assert tree(cfg.run_dir) == before


def test_resume_keeps_everything_and_writes_the_new_config(cfg):
    rundir.prepare(cfg, DS)
    os.makedirs(os.path.join(cfg.run_dir, "checkpoints"))
    with open(os.path.join(cfg.run_dir, "checkpoints", "x"), "w") as fh:
        fh.write("state")
    rundir.prepare(changed(cfg, lr=1e-3), DS, on_existing="resume")
    files = tree(cfg.run_dir)
    assert files[os.path.join("checkpoints", "x")] == "state"
    assert yaml.safe_load(files[layout.RESOLVED])["train"]["lr"] == 1e-3


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(cfg, tmp_path):
    rundir.prepare(cfg, DS, plan_text="old plan\n")
    with open(os.path.join(cfg.run_dir, layout.METRICS), "w") as fh:
        fh.write('{"step": 1}\n')
    old = tree(cfg.run_dir)
    rundir.prepare(changed(cfg, lr=1e-3), DS, on_existing="overwrite")
    asides = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(asides) == 1
    assert tree(tmp_path / asides[0]) == old
    assert layout.METRICS not in os.listdir(cfg.run_dir)
    # twice within one second: a second, distinct name
    rundir.prepare(cfg, DS, on_existing="overwrite")
    asides = sorted(p for p in os.listdir(tmp_path) if p.startswith("run.old-"))
    assert len(asides) == 2 and asides[1].startswith(asides[0])


def test_a_folder_that_is_not_a_run_directory(cfg):
    os.makedirs(cfg.run_dir)
    with open(os.path.join(cfg.run_dir, "notes.txt"), "w") as fh:
        fh.write("mine")
    for how in ("refuse", "resume"):
        with pytest.raises(ConfigError, match=rf"exists, is not empty and is not a run directory "
                                              rf"\(no resolved.yaml\): nothing to {how}"):
            rundir.prepare(cfg, DS, on_existing=how)
    assert tree(cfg.run_dir) == {"notes.txt": "mine"}
    rundir.prepare(cfg, DS, on_existing="overwrite")
    aside = [p for p in os.listdir(os.path.dirname(cfg.run_dir)) if p.startswith("run.old-")]
    assert tree(os.path.join(os.path.dirname(cfg.run_dir), aside[0])) == {"notes.txt": "mine"}


def test_an_empty_existing_folder_is_used(cfg):
    os.makedirs(cfg.run_dir)
    rundir.prepare(cfg, DS)
    assert layout.RESOLVED in os.listdir(cfg.run_dir)


def test_a_folder_with_only_run_directory_entries_is_used(cfg):
    os.makedirs(os.path.join(cfg.run_dir, layout.LOGS))  # e.g. made by Slurm for its log files
    with open(os.path.join(cfg.run_dir, layout.LOGS, "job-1.out"), "w") as fh:
        fh.write("log")
    rundir.prepare(cfg, DS)
    assert tree(cfg.run_dir)[os.path.join(layout.LOGS, "job-1.out")] == "log"


def test_a_file_in_the_way_is_refused(cfg):
    with open(cfg.run_dir, "w") as fh:
        fh.write("x")
    with pytest.raises(ConfigError, match=r"exists and is not a folder"):
        rundir.prepare(cfg, DS, on_existing="overwrite")


def test_an_unreadable_resolved_yaml_counts_as_a_different_run(cfg):
    rundir.prepare(cfg, DS)
    with open(os.path.join(cfg.run_dir, layout.RESOLVED), "w") as fh:
        fh.write("a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"changed: resolved.yaml unreadable"):
        rundir.prepare(cfg, DS)
    rundir.prepare(cfg, DS, on_existing="resume")
    with open(os.path.join(cfg.run_dir, layout.RESOLVED), encoding="utf-8") as fh:
        assert yaml.safe_load(fh) == to_dict(cfg)


def test_bad_on_existing(cfg):
    with pytest.raises(ValueError, match="on_existing must be refuse, resume or overwrite, not 'keep'"):
        rundir.prepare(cfg, DS, on_existing="keep")  # type: ignore[arg-type]


def test_config_changes_ignores_volatile_keys():
    old = {"train": {"lr": 1.0, "max_steps": 1}, "cluster": {"nodes": 1}, "output": {"dir": "a"}}
    new = {"train": {"lr": 2.0, "max_steps": 9}, "cluster": {"nodes": 4}, "output": {"dir": "b"},
           "model": {"path": "/m"}}
    assert rundir.config_changes(old, new) == ["model.path", "train.lr"]


# ------------------------------------------------------------------ atomic writes
def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.json"
    rundir.write_atomic(str(target), "one\n")
    rundir.write_atomic(str(target), "two\n")
    assert target.read_text() == "two\n"
    assert os.listdir(tmp_path) == ["f.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask


def test_write_atomic_failure_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_text("old\n")

    def broken(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        rundir.write_atomic(str(target), "new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["f.json"]
