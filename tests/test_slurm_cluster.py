"""On a real Slurm cluster started by the tests (tests/cluster/start.sh, fixture `slurm_cluster`):
sbatch reads hostile values as the renderer meant, node ranks and environment reach each node,
the stop protocol checkpoints, requeues and resumes, impossible requests fail --test-only, and
generated jobs run the real training entry point on 2 nodes of CPU ranks.

Skipped where Slurm is not installed (never in CI). Jobs are polled with `scontrol show job`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import (FAKE_PYTHON, job_info, logs, read_env, read_nul, wait_final,  # noqa: E402
                     wait_until, write_exe)

from launcher import layout, shell, slurm  # noqa: E402

pytestmark = [pytest.mark.slurm]

HOSTILE = ["two words", "it's", 'say "hi"', "$(touch /tmp/ftl-pwned)", "`id`", "${HOME}", "a;b",
           "a && b", "*", "?[ab]", "~", "x#y", "-n", "é ü 中文 🚀", "100%", "back\\slash", "tab\there",
           "'\"'\"'", "!x", "--x=1 --nodes=9"]
HOSTILE_DIR = "run 'q' \"d\" $(touch x) `id` ; && é 100%j -x"


@pytest.fixture
def cluster(slurm_cluster, monkeypatch):
    """The session cluster, with its SLURM_CONF in this test's environment (sbatch and jobs)."""
    for k, v in slurm_cluster["env"].items():
        monkeypatch.setenv(k, v)
    return slurm_cluster


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def ns(run_file, *flags):
    a = argparse.Namespace(run_file=run_file, overrides=[], submit=False, test_only=False,
                           force=False, resume=False, overwrite=False)
    for f in flags:
        setattr(a, f, True)
    return a


def write_runfile(path, tree):
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return str(path)


def base_tree(fake_model, run_dir, cluster):
    data = os.path.join(os.path.dirname(fake_model), "train.jsonl")
    return {"name": "slurm-test", "model": {"path": fake_model},
            "data": {"path": data, "max_seq_len": 64}, "train": {"max_steps": 4},
            "cluster": cluster, "output": {"dir": str(run_dir)}}


# ------------------------------------------------------------------ sbatch reads what we wrote
def test_sbatch_reads_hostile_values_exactly(cluster, tmp_path):
    """The real sbatch parses each rendered #SBATCH value back to exactly the value (the same
    parsing tests/cluster/helpers.sbatch_argument models for the fast tests)."""
    ids = {}
    try:
        for i, value in enumerate(HOSTILE):
            script = tmp_path / f"held{i}.sbatch"
            script.write_text("#!/bin/bash\n" + shell.sbatch_line("--comment", value, "k") + "\n"
                              "#SBATCH --hold\n#SBATCH --output=/dev/null\ntrue\n")
            ids[value] = slurm.submit(str(script))
        for value, job_id in ids.items():
            out = run(["scontrol", "show", "job", job_id])
            comment = [line.strip()[len("Comment="):] for line in out.stdout.splitlines()
                       if line.strip().startswith("Comment=")]
            assert comment == [value + " "] or comment == [value], (value, out.stdout)
    finally:
        if ids:
            run(["scancel", *ids.values()])
    assert not os.path.exists("/tmp/ftl-pwned")


# ------------------------------------------------------------------ --test-only
def test_test_only_answers_with_the_schedulers_words(cluster, tmp_path, fake_model, capsys,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok = write_runfile(tmp_path / "ok.yaml", base_tree(fake_model, tmp_path / "ok", {
        "nodes": 2, "gpus_per_node": 2, "partition": cluster["partition"]}))
    assert slurm.main(ns(ok, "test_only")) == 0
    out = capsys.readouterr().out
    assert "to start at" in out and "node[1-2]" in out, out

    impossible = write_runfile(tmp_path / "big.yaml", base_tree(fake_model, tmp_path / "big", {
        "nodes": 2, "gpus_per_node": 4, "partition": cluster["partition"]}))
    assert slurm.main(ns(impossible, "test_only")) == 1
    err = capsys.readouterr().err
    assert "Requested node configuration is not available" in err, err
    assert "the run directory is kept" in err
    assert (tmp_path / "big" / layout.JOB_SCRIPT).is_file()


# ------------------------------------------------------------------ the protocol, with fake ranks
def test_stop_requeue_resume_on_real_slurm_with_fake_ranks(cluster, tmp_path, fake_model,
                                                           monkeypatch, capsys):
    """2 nodes: each node's launcher gets its own node rank and the exact environment; USR1 to the
    batch shell makes both nodes stop at a step boundary, the job requeues itself, restarts
    (SLURM_RESTART_COUNT 1), resumes and finishes every step."""
    fake = tmp_path / "fake"
    fake.mkdir()
    py_dir = tmp_path / "py $(x) 'q'"
    py_dir.mkdir()
    python = write_exe(str(py_dir / "python"), FAKE_PYTHON)
    env_corpus = {f"FTL_V{i}": v for i, v in enumerate(HOSTILE + ["line1\nline2"])}
    run_dir = tmp_path / HOSTILE_DIR
    run_file = write_runfile(tmp_path / "run.yaml", base_tree(fake_model, run_dir, {
        "nodes": 2, "gpus_per_node": 2, "partition": cluster["partition"], "python": python,
        "env": env_corpus, "max_restarts": 2}))
    monkeypatch.setenv("FAKE_DIR", str(fake))
    monkeypatch.setenv("FAKE_STEPS", "40")
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    monkeypatch.setenv("FAKE_SLOW_NODE", "0")      # node 0 takes 3 s more to stop: not killed
    monkeypatch.setenv("FAKE_SLOW_S", "3")
    monkeypatch.chdir(tmp_path)
    assert slurm.main(ns(run_file, "submit", "force")) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert job_id.isdigit()
    rd = str(run_dir)

    wait_until(job_id, cluster["env"], lambda i: (fake / "running").exists()
               or i.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED"), 120, rd, "running ranks")
    assert run(["scancel", "--signal=USR1", "--batch", job_id]).returncode == 0
    info = wait_until(job_id, cluster["env"], lambda i: i.get("Restarts") == "1"
                      or i.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED"), 120, rd, "requeue")
    assert info.get("Restarts") == "1", logs(rd)
    # The restart waits for the revoked credential to expire (cred_expire=10 s); an earlier
    # `scontrol update StartTime=now` makes slurmd refuse it ("Job credential revoked").
    info = wait_final(job_id, cluster["env"], 240, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"

    for node in (0, 1):
        argv = read_nul(str(fake / f"argv.{node}"))
        assert argv[:3] == ["-m", "torch.distributed.run", f"--node_rank={node}"]
        assert argv[-1] == os.path.join(rd, layout.RESOLVED)
        seen = read_env(str(fake / f"env.{node}"))
        assert seen["SLURMD_NODENAME"] == f"node{node + 1}"
        assert seen["MASTER_ADDR"] == "127.0.0.1"   # node1 does not resolve here: NodeAddr
        for k, v in env_corpus.items():
            assert seen[k] == v, k
        assert (fake / f"starts.{node}").read_text() == "0\n1\n"          # started, restarted
        stopped = int((fake / f"stopped.{node}").read_text())
        assert 1 < stopped < 40                                           # stopped mid-run
        assert (fake / f"progress.{node}").read_text() == "40\n"          # resumed to the end
        assert (fake / f"done.{node}").read_text() == "1\n"
    batch_log = (run_dir / "logs" / f"job-{job_id}.out").read_text()
    assert "ranks stopped on request on 2 of 2 nodes" in batch_log
    assert "requeueing: restart 1 of 2" in batch_log and "ranks finished" in batch_log
    assert "USR1 received" in (run_dir / "logs" / f"job-{job_id}.err").read_text()
    for node in (0, 1):
        assert (run_dir / "logs" / f"job-{job_id}-node{node}.log").exists(), logs(rd)
    assert not (tmp_path / "x").exists() and not os.path.exists("/tmp/ftl-pwned")


def test_a_dead_node_ends_the_job(cluster, tmp_path, fake_model, monkeypatch, capsys):
    """One node's launcher dies (exit 3): srun ends the other node at once and the job fails,
    without requeue."""
    fake = tmp_path / "fake"
    fake.mkdir()
    python = write_exe(str(tmp_path / "python"), FAKE_PYTHON)
    run_dir = tmp_path / "run"
    run_file = write_runfile(tmp_path / "run.yaml", base_tree(fake_model, run_dir, {
        "nodes": 2, "partition": cluster["partition"], "python": python}))
    for k, v in {"FAKE_DIR": str(fake), "FAKE_STEPS": "600", "FAKE_STEP_S": "0.1",
                 "FAKE_CRASH_NODE": "1", "FAKE_CRASH_STEP": "3"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    assert slurm.main(ns(run_file, "submit", "force")) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    info = wait_final(job_id, cluster["env"], 120, str(run_dir))   # node 0 alone would take 60 s
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", f"{info}\n{logs(str(run_dir))}"
    assert info["Restarts"] == "0"
    assert not (fake / "done.0").exists() and not (fake / "progress.0").read_text() == "600\n"
    assert "crashing at step 3" in (run_dir / "logs" / f"job-{job_id}-node1.log").read_text()
    assert "ranks failed (srun exit" in (run_dir / "logs" / f"job-{job_id}.err").read_text()
