"""One Slurm job per run directory (launcher/cluster/job_lock.py, the lock section of slurm/job.sbatch).

Fast tests with a stand-in `squeue`; then, on the real test cluster (fixture `slurm_cluster`),
a second submit, `--overwrite` and `sbatch job.sbatch` by hand while a job runs, and two
`sbatch job.sbatch` at once: each time one job's steps are in the run directory, once each.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import metric_rows as steps
from helpers import (FINAL, fake_job_cluster, job_info, logs, wait_final, wait_until,
                     write_exe)

from launcher.cluster import job_lock, layout, slurm
from launcher.config.errors import ConfigError

FAKE_SQUEUE = r"""#!/bin/bash
# squeue -h -j ID -o %T: the state in $FAKE_SQUEUE_DIR/ID, else nothing (Slurm forgot the job)
id=$3
[ -f "$FAKE_SQUEUE_DIR/$id" ] && cat "$FAKE_SQUEUE_DIR/$id"
exit 0
"""


def ns(run_file, *flags, overrides=()):
    return slurm.SlurmCall(run_file=run_file, overrides=tuple(overrides), **{f: True for f in flags})


def write_runfile(tmp_path, fake_model, run_dir, cluster, name="run.yaml"):
    data = os.path.join(os.path.dirname(fake_model), "train.jsonl")
    tree = {"name": "lock-test", "model": {"path": fake_model},
            "data": {"path": data, "max_seq_len": 64}, "train": {"max_steps": 6},
            "cluster": cluster, "output": {"dir": str(run_dir)}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture
def squeue(tmp_path, monkeypatch):
    """A stand-in squeue first on PATH: set_state(job, state) says what it answers."""
    bin_dir, states = tmp_path / "bin", tmp_path / "states"
    bin_dir.mkdir()
    states.mkdir()
    write_exe(str(bin_dir / "squeue"), FAKE_SQUEUE)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SQUEUE_DIR", str(states))

    def set_state(job, state):
        (states / job).write_text(state + "\n")
    return set_state


# ------------------------------------------------------------------ fast
def test_record_and_read(tmp_path):
    assert job_lock.read(str(tmp_path)) is None
    job_lock.record(str(tmp_path), "4242", "a test")
    assert job_lock.read(str(tmp_path)) == "4242"
    assert (tmp_path / layout.JOB_LOCK).read_text().startswith("4242\n# recorded by a test, ")


def test_a_live_job_refuses_and_an_ended_one_does_not(tmp_path, squeue):
    rd = str(tmp_path)
    job_lock.record(rd, "4242", "a test")
    squeue("4242", "RUNNING")
    with pytest.raises(ConfigError, match=r"belongs to Slurm job 4242, which is RUNNING: --submit "
                       r"now would run two jobs(.|\n)*fix: wait until job 4242 ends .*scancel 4242"):
        job_lock.refuse_if_live(rd, "--submit")
    squeue("4242", "PENDING")
    assert job_lock.live_owner(rd) == ("4242", "PENDING")
    for ended in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        squeue("4242", ended)
        job_lock.refuse_if_live(rd, "--submit")   # no error
    os.remove(tmp_path / "states" / "4242")       # no longer known to Slurm
    job_lock.refuse_if_live(rd, "--submit")


def test_claim_keeps_a_live_owner_and_replaces_an_ended_one(tmp_path, squeue):
    rd = str(tmp_path)
    job_lock.record(rd, "100", "a test")
    squeue("100", "RUNNING")
    assert job_lock.claim(rd, "101", "a test") == ("100", "RUNNING")
    assert job_lock.read(rd) == "100"
    assert job_lock.claim(rd, "100", "the same job again") is None   # a job may claim its own
    squeue("100", "COMPLETED")
    assert job_lock.claim(rd, "101", "a test") is None
    assert job_lock.read(rd) == "101"
    assert not (tmp_path / job_lock.MUTEX).exists()


def test_overwrite_of_a_live_jobs_run_directory_is_refused_before_anything_moves(
        tmp_path, fake_model, squeue, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_file = write_runfile(tmp_path, fake_model, run_dir, {"nodes": 1, "preflight": False})
    assert slurm.main(ns(run_file)) == 0      # rendered, not submitted
    job_lock.record(str(run_dir), "77", "a test")
    squeue("77", "RUNNING")
    before = {p: (run_dir / p).read_bytes() for p in (layout.RESOLVED, layout.JOB_SCRIPT)}
    for flags, doing in ((("overwrite",), "--overwrite"), (("submit", "force"), "--submit"),
                         ((), "writing its resolved.yaml and job.sbatch again")):
        with pytest.raises(ConfigError, match=rf"belongs to Slurm job 77, which is RUNNING: "
                           rf"{doing} now(.|\n)*scancel 77"):
            slurm.main(ns(run_file, *flags, overrides=["train.lr=0.001"]))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("run.old-")]   # nothing aside
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    squeue("77", "COMPLETED")
    assert slurm.main(ns(run_file, "overwrite", overrides=["train.lr=0.001"])) == 0
    assert any(name.startswith("run.old-") for name in os.listdir(tmp_path))


def test_the_job_script_names_the_lock_and_its_exit_code(tmp_path, fake_model, monkeypatch):
    """(bash -n and shellcheck of the whole script: the golden tests in test_slurm_render.py)"""
    monkeypatch.chdir(tmp_path)
    run_file = write_runfile(tmp_path, fake_model, tmp_path / "run", {"nodes": 1})
    assert slurm.main(ns(run_file)) == 0
    text = (tmp_path / "run" / layout.JOB_SCRIPT).read_text()
    assert f"JOB_LOCK={tmp_path}/run/{layout.JOB_LOCK}" in text
    assert f"EXIT_LOCKED={layout.EXIT_LOCKED}" in text
    # the check comes before anything of the run directory is touched (STOP, preflight, ranks)
    assert text.index("then take_run_dir; fi") < text.index('rm -f -- "$STOP_FILE"') \
        < text.index("srun --export=ALL")


# ------------------------------------------------------------------ on the test cluster
# Ranks that append one metrics line per step to RUN_DIR/metrics.jsonl (with their job id),
# resuming after the last line; after step FAKE_HOLD_STEP they wait for FAKE_DIR/release, so that
# the test decides when the job may end.
FAKE_RANKS = r"""#!/bin/bash
run_dir=$(dirname "${@: -1}")
m="$run_dir/metrics.jsonl"
start=1
[ -f "$m" ] && start=$(( $(wc -l < "$m") + 1 ))
for ((step = start; step <= FAKE_STEPS; step++)); do
  sleep 0.05
  echo "{\"step\": $step, \"loss\": 1.0, \"job\": \"$SLURM_JOB_ID\"}" >> "$m"
  if [ "$step" = "$FAKE_HOLD_STEP" ]; then
    for ((i = 0; i < 3000; i++)); do [ -e "$FAKE_DIR/release" ] && break; sleep 0.1; done
  fi
done
"""


@pytest.fixture
def cluster(slurm_cluster, monkeypatch, tmp_path):
    return fake_job_cluster(slurm_cluster, monkeypatch, tmp_path, FAKE_RANKS)


def sbatch(script):
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def ended_locked(job, cluster, rd):
    info = wait_final(job, cluster["env"], 180, rd)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{layout.EXIT_LOCKED}:0", \
        f"{info}\n{logs(rd)}"


@pytest.mark.slurm
def test_a_second_submit_overwrite_or_sbatch_touch_nothing_while_a_job_runs(cluster, tmp_path,
                                                                           fake_model, capsys):
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, {
        "nodes": 1, "gpus_per_node": 1, "partition": cluster["partition"],
        "python": cluster["python"], "preflight": False})
    assert slurm.main(ns(run_file, "submit", "force")) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.isdigit() and job_lock.read(rd) == first
    try:
        wait_until(first, cluster["env"], lambda i: (run_dir / layout.METRICS).exists()
                   and len(steps(run_dir)) >= 3 or i.get("JobState") in FINAL, 180, rd,
                   "3 steps")
        resolved = (run_dir / layout.RESOLVED).read_bytes()
        for flags in (("submit", "force"), ("overwrite", "submit", "force")):
            with pytest.raises(ConfigError, match=rf"belongs to Slurm job {first}, which is "
                               rf"RUNNING(.|\n)*scancel {first}"):
                slurm.main(ns(run_file, *flags, overrides=["train.lr=0.001"]))
        assert not [n for n in os.listdir(tmp_path) if n.startswith("run.old-")]
        assert (run_dir / layout.RESOLVED).read_bytes() == resolved

        second = sbatch(run_dir / layout.JOB_SCRIPT)   # by hand, while the first runs
        ended_locked(second, cluster, rd)
        assert job_info(first, cluster["env"])["JobState"] == "RUNNING"
        err = (run_dir / "logs" / f"job-{second}.err").read_text()
        assert f"belongs to job {first} (RUNNING): job {second} exits without touching it" in err
        assert f"scancel {first}" in err
    finally:
        (cluster["fake"] / "release").touch()
    info = wait_final(first, cluster["env"], 180, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], rows
    assert {r["job"] for r in rows} == {first}
    assert job_lock.read(rd) == first
    # the second job left its two Slurm logs and nothing else
    assert sorted(n for n in os.listdir(run_dir / "logs") if second in n) == [
        f"job-{second}.err", f"job-{second}.out"]
    assert sorted(n for n in os.listdir(run_dir) if not n.startswith(".")) == sorted(
        [layout.RESOLVED, layout.DS_CONFIG, layout.PLAN, layout.JOB_SCRIPT, layout.JOB_LOCK,
         layout.METRICS, layout.LOGS])


@pytest.mark.slurm
def test_sbatch_by_hand_twice_runs_one_job(cluster, tmp_path, fake_model):
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, {
        "nodes": 1, "gpus_per_node": 1, "partition": cluster["partition"],
        "python": cluster["python"], "preflight": False})
    assert slurm.main(ns(run_file)) == 0          # rendered only: no lock yet
    assert job_lock.read(rd) is None
    script = run_dir / layout.JOB_SCRIPT
    jobs = [sbatch(script), sbatch(script)]
    try:
        wait_until(jobs[0], cluster["env"], lambda i: any(
            job_info(j, cluster["env"]).get("JobState") in FINAL for j in jobs), 180, rd,
            "one of the two jobs ending")
        states = {j: job_info(j, cluster["env"]) for j in jobs}
        losers = [j for j in jobs if states[j]["JobState"] in FINAL]
        assert len(losers) == 1, states
        loser = losers[0]
        winner = next(j for j in jobs if j != loser)
        ended_locked(loser, cluster, rd)
        assert job_lock.read(rd) == winner
    finally:
        (cluster["fake"] / "release").touch()
    info = wait_final(winner, cluster["env"], 180, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], rows
    assert {r["job"] for r in rows} == {winner}
    assert f"belongs to job {winner}" in (run_dir / "logs" / f"job-{loser}.err").read_text()
