"""What the job script and `ftlaunch status` say must be true: on the real test cluster (fixture
`slurm_cluster`, ranks stood in for by tests/cluster/helpers.FAKE_METRIC_RANKS, which leave
metrics.jsonl and exit_status.json as real ones do), a STOP file ends the job COMPLETED,
`scontrol requeue` is reported as a requeue, `--export=NONE` still reaches every srun step,
and every node failing the preflight fails the job instead of excluding them all; each test
reads the run directory afterwards: one job's steps, once each. Then the fast checks of the
rules behind them (validate) and of status, stop and runs on hand-made run directories.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import metric_rows as steps
from helpers import (one_node, FAKE_METRIC_RANKS, fake_job_cluster, job_info, logs, wait_final,
                     wait_until, write_exe)

from launcher import cli
from launcher.cluster import job_lock, layout, slurm
from launcher.ops import status
from launcher.config.errors import ConfigError
from launcher.config.runfile import load


def ns(run_file, *flags, overrides=()):
    return slurm.SlurmCall(run_file=run_file, overrides=tuple(overrides), **{f: True for f in flags})


def write_runfile(tmp_path, fake_model, run_dir, cluster, name="run.yaml", max_steps=6):
    data = os.path.join(os.path.dirname(fake_model), "train.jsonl")
    tree = {"name": "truths", "model": {"path": fake_model},
            "data": {"path": data, "max_seq_len": 64}, "train": {"max_steps": max_steps},
            "cluster": cluster, "output": {"dir": str(run_dir)}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def status_json(run_dir, capsys):
    capsys.readouterr()
    assert cli.main(["status", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def cluster(slurm_cluster, monkeypatch, tmp_path):
    return fake_job_cluster(slurm_cluster, monkeypatch, tmp_path, FAKE_METRIC_RANKS)


def submit(run_file, capsys, *flags):
    capsys.readouterr()
    assert slurm.main(ns(run_file, "submit", "force", *flags)) == 0
    job = capsys.readouterr().out.strip().splitlines()[-1]
    assert job.isdigit(), job
    return job


def three_steps(job, cluster, run_dir):
    wait_until(job, cluster["env"], lambda i: (run_dir / layout.METRICS).exists()
               and len(steps(run_dir)) >= 3 or i.get("JobState") not in ("PENDING", "RUNNING"),
               180, str(run_dir), "3 steps")


# ------------------------------------------------------------------ on the test cluster
@pytest.mark.slurm
def test_ftlaunch_stop_ends_the_job_completed_and_a_resubmit_continues(cluster, tmp_path,
                                                                        fake_model, capsys,
                                                                        monkeypatch):
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(cluster))
    first = submit(run_file, capsys)
    three_steps(first, cluster, run_dir)
    assert cli.main(["stop", rd]) == 0
    assert f"Slurm job {first} ends COMPLETED" in capsys.readouterr().out
    info = wait_final(first, cluster["env"], 180, rd)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(rd)}"
    out = (run_dir / "logs" / f"job-{first}.out").read_text()
    assert "stopped on request (STOP file) after a checkpoint; continue with: sbatch" in out
    st = status_json(run_dir, capsys)
    assert st["state"] == "stopped" and st["step"] == 3 and st["time_left_s"] is None, st
    assert st["resume"] == f"sbatch {run_dir / layout.JOB_SCRIPT}"

    monkeypatch.delenv("FAKE_HOLD_STEP")
    second = submit(run_file, capsys)   # the first job ended: allowed
    info = wait_final(second, cluster["env"], 180, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], rows
    assert [r["job"] for r in rows] == [first] * 3 + [second] * 3
    assert status_json(run_dir, capsys)["state"] == "finished"


@pytest.mark.slurm
def test_scontrol_requeue_is_reported_as_a_requeue(cluster, tmp_path, fake_model, capsys):
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(cluster))
    job = submit(run_file, capsys)
    three_steps(job, cluster, run_dir)
    assert subprocess.run(["scontrol", "requeue", job], timeout=60).returncode == 0
    info = wait_final(job, cluster["env"], 300, rd)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{logs(rd)}"
    text = (run_dir / "logs" / f"job-{job}.out").read_text()
    err = (run_dir / "logs" / f"job-{job}.err").read_text()
    assert f"Slurm has requeued job {job} (TERM): it starts again and resumes" in text, logs(rd)
    assert "not requeued" not in text + err
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], rows
    assert [r["restart"] for r in rows] == [0, 0, 0, 1, 1, 1] and {r["job"] for r in rows} == {job}


@pytest.mark.slurm
def test_export_none_in_sbatch_extra_still_reaches_the_ranks(cluster, tmp_path, fake_model,
                                                             capsys, monkeypatch):
    """sbatch --export=NONE gives the batch shell no submitting environment and srun would give
    its tasks none either: the script's srun --export=ALL passes the batch shell's on (here
    cluster.env and the rendezvous)."""
    monkeypatch.delenv("FAKE_HOLD_STEP")
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(
        cluster, sbatch_extra=["--export=NONE"], env={"FAKE_STEPS": "6"}))
    monkeypatch.setenv("FAKE_STEPS", "1")   # not passed: the job must take cluster.env's 6
    job = submit(run_file, capsys)
    info = wait_final(job, cluster["env"], 180, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], rows
    assert {r["master"] for r in rows} == {"127.0.0.1"}   # the batch shell's rendezvous
    stored = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True,
                            text=True, timeout=60).stdout
    assert "#SBATCH --export=NONE" in stored


@pytest.mark.slurm
def test_every_node_failing_the_preflight_fails_the_job(cluster, tmp_path, fake_model, capsys,
                                                        monkeypatch):
    monkeypatch.setenv("FAKE_BAD_ALL", "1")
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(cluster, nodes=2,
                                                                     preflight=True))
    job = submit(run_file, capsys)
    info = wait_final(job, cluster["env"], 180, rd)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{layout.EXIT_PREFLIGHT}:0", \
        f"{info}\n{logs(rd)}"
    assert info["Restarts"] == "0" and info.get("ExcNodeList") in ("(null)", None), info
    err = (run_dir / "logs" / f"job-{job}.err").read_text()
    assert "every node of the job (2 of 2) failed the preflight" in err
    assert "0 GPUs visible, 1 expected" in err
    assert not (run_dir / layout.METRICS).exists()
    st = status_json(run_dir, capsys)
    assert st["state"] == "failed" and st["slurm"]["state"] == "FAILED", st
    assert st["job_failure"].startswith(f"job {job} FAILED, exit {layout.EXIT_PREFLIGHT}:0: "
                                        "ftlaunch: every node of the job (2 of 2) failed the "
                                        "preflight"), st


# ------------------------------------------------------------------ fast: the rules
@pytest.mark.parametrize("time_limit,grace,ok", [("24:00:00", 120, True), ("8:00", 120, True),
                                                 ("7:59", 120, False), ("10:00", 300, False)])
def test_the_time_limit_leaves_room_past_grace_and_the_early_signal(tmp_path, fake_model,
                                                                    time_limit, grace, ok):
    run_file = write_runfile(tmp_path, fake_model, tmp_path / "run",
                             {"time": time_limit, "grace_s": grace})
    if ok:
        load(run_file)
        return
    with pytest.raises(ConfigError, match=r"cluster\.time(.|\n)*before the stop signal: grace_s "
                       rf"{grace} s, and Slurm sends it up to 60 s early(.|\n)*raise cluster.time "
                       r"to at least"):
        load(run_file)


def test_a_python_command_prefix_is_refused_with_the_fix(tmp_path, fake_model):
    for python in ("env python", "apptainer exec x.sif python"):
        run_file = write_runfile(tmp_path, fake_model, tmp_path / "run", {"python": python})
        with pytest.raises(ConfigError, match=r"cluster\.python(.|\n)*is a command, not one "
                           r"program(.|\n)*wrapper script"):
            load(run_file)
    spaced = tmp_path / "my env" / "python"
    spaced.parent.mkdir()
    write_exe(str(spaced), "#!/bin/sh\n")
    load(write_runfile(tmp_path, fake_model, tmp_path / "run", {"python": str(spaced)}))


def test_export_none_is_allowed_and_other_exports_are_not(tmp_path, fake_model):
    load(write_runfile(tmp_path, fake_model, tmp_path / "run", {"sbatch_extra": ["--export=NONE"]}))
    with pytest.raises(ConfigError, match=r"--export=NONE keeps the variables of "
                       r"cluster.env_from_shell"):
        load(write_runfile(tmp_path, fake_model, tmp_path / "run", {
            "sbatch_extra": ["--export=NONE"], "env_from_shell": ["HF_TOKEN"]}))
    with pytest.raises(ConfigError, match=r"--export is set by the launcher"):
        load(write_runfile(tmp_path, fake_model, tmp_path / "run",
                           {"sbatch_extra": ["--export=ALL,X=1"]}))


# ------------------------------------------------------------------ fast: status, stop, runs
def rendered(tmp_path, fake_model, name="run", **cluster):
    run_dir = tmp_path / name
    run_file = write_runfile(tmp_path, fake_model, run_dir, cluster or {"nodes": 1},
                             name=f"{name}.yaml", max_steps=100)
    assert slurm.main(ns(run_file)) == 0
    return run_dir


def metrics_lines(run_dir, n, step_time=0.5):
    with open(run_dir / layout.METRICS, "w") as fh:
        for s in range(1, n + 1):
            fh.write(json.dumps({"step": s, "loss": 2.0, "tokens_per_s": 100.0,
                                 "step_time_s": step_time}) + "\n")


def test_status_of_a_stopped_slurm_run_says_resubmit_and_no_time_left(tmp_path, fake_model,
                                                                      capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = rendered(tmp_path, fake_model)
    metrics_lines(run_dir, 10)
    time.sleep(0.01)
    (run_dir / layout.EXIT_STATUS).write_text(json.dumps(
        {"code": 75, "step": 10, "message": "stopped on request", "rank": 0}))
    capsys.readouterr()
    assert cli.main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert f"resume     sbatch {run_dir / layout.JOB_SCRIPT}" in text, text
    assert "--resume" not in text and " left" not in text, text


def test_status_says_when_no_step_came_for_a_while(tmp_path, fake_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = rendered(tmp_path, fake_model)
    metrics_lines(run_dir, 10)
    st = status.collect(str(run_dir))
    assert st["state"] == "running" and st["no_step_for_s"] is None
    old = time.time() - 300
    os.utime(run_dir / layout.METRICS, (old, old))
    st = status.collect(str(run_dir))
    assert st["state"] == "running" and st["no_step_for_s"] >= 299, st
    assert "progress   no step for 5m0" in status.render(st)


def test_status_takes_several_run_directories_and_runs_lists_them(tmp_path, fake_model, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = rendered(tmp_path, fake_model, "a")
    b = rendered(tmp_path, fake_model, "b")
    metrics_lines(b, 7)
    (b / layout.EXIT_STATUS).write_text(json.dumps({"code": 0, "step": 100, "message": "done"}))
    capsys.readouterr()
    assert cli.main(["status", str(a), str(b), "--json", "train.max_steps=100"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [s["run_dir"] for s in both] == [str(a), str(b)]
    assert [s["state"] for s in both] == ["not started", "finished"]
    assert cli.main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("not started") and lines[0].endswith(str(a))
    assert lines[1].startswith("finished") and "7/100" in lines[1] and lines[1].endswith(str(b))


def test_stop_of_a_queued_job_says_scancel_and_makes_no_stop_file(tmp_path, fake_model, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = rendered(tmp_path, fake_model)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "squeue"), "#!/bin/sh\necho PENDING\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job_lock.record(str(run_dir), "55", "a test")
    capsys.readouterr()
    assert cli.main(["stop", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert f"job 55 of {run_dir} is PENDING, not training yet" in err and "scancel 55" in err
    assert not (run_dir / layout.STOP_REQUEST).exists()
    os.remove(bin_dir / "squeue")   # no Slurm here: a local run is asked to stop
    assert cli.main(["stop", str(run_dir)]) == 0
    assert (run_dir / layout.STOP_REQUEST).exists()


def test_an_unwritable_output_dir_is_a_clear_error_not_a_traceback(tmp_path, fake_model, capsys,
                                                                   monkeypatch):
    """A folder that cannot be made (here: below a file; for a user, a folder of someone else's)
    is refused naming output.dir, the reason and the fix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    run_file = write_runfile(tmp_path, fake_model, tmp_path / "a-file" / "run", {"nodes": 1})
    assert cli.main(["slurm", run_file]) == layout.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "output.dir: cannot write the run directory" in err and "Not a directory" in err, err
    assert "fix: set output.dir to a folder you can write" in err and "Traceback" not in err


def test_a_job_that_failed_to_launch_is_shown(tmp_path, fake_model, capsys, monkeypatch):
    """No log at all (the job could not even open logs/job-ID.out): status still shows the
    recorded job and says the run failed, with Slurm's state and exit code."""
    monkeypatch.chdir(tmp_path)
    run_dir = rendered(tmp_path, fake_model)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "squeue"), "#!/bin/sh\nexit 0\n")   # no longer queued
    write_exe(str(bin_dir / "sacct"), '#!/bin/sh\n[ "$5" = 55 ] && echo "FAILED|1:0"\nexit 0\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job_lock.record(str(run_dir), "55", "a test")
    assert not os.listdir(run_dir / layout.LOGS)
    st = status.collect(str(run_dir))
    assert st["slurm"]["job_id"] == "55" and st["state"] == "failed", st
    assert st["job_failure"] == ("job 55 FAILED, exit 1:0: no log (the job did not start, or "
                                 "could not write logs/)")
    assert "failure    job 55 FAILED" in status.render(st)


@pytest.mark.slurm
def test_without_cluster_mem_the_plan_compares_with_the_partitions_nodes(cluster, tmp_path,
                                                                         fake_model, capsys):
    """cluster.mem unset: plan.txt's node verdict is against the partition's smallest node
    (sinfo: 2048 MiB on the test cluster), not the memory of the host that submits."""
    run_dir = tmp_path / "run"
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(cluster,
                                                                     sbatch_extra=["--hold"]))
    job = submit(run_file, capsys)
    try:
        plan = (run_dir / layout.PLAN).read_text()
        assert "verdict per node: does NOT fit: needs" in plan, plan   # a 7B model's shards
        assert "of 2.00 GiB (sinfo: the smallest node of partition debug)" in plan, plan
    finally:
        subprocess.run(["scancel", job], timeout=60)
    assert job_lock.read(str(run_dir)) == job


@pytest.mark.slurm
def test_submit_asks_test_only_first_and_submits_nothing_slurm_cannot_run(cluster, tmp_path,
                                                                         fake_model, capsys):
    """More nodes than the partition has would pend forever: --submit asks sbatch --test-only
    first and stops with the scheduler's words; no job, no lock."""
    run_dir = tmp_path / "run"
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(cluster, nodes=20))
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                            timeout=60).stdout.split()
    assert slurm.main(ns(run_file, "submit", "force")) == 1
    err = capsys.readouterr().err
    assert "sbatch --test-only" in err and "Requested node configuration is not available" in err
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                           timeout=60).stdout.split()
    assert after == before and job_lock.read(str(run_dir)) is None


def test_cluster_after_renders_a_dependency_and_refuses_what_is_no_job_id(tmp_path, fake_model):
    from helpers import sbatch_options
    cfg = load(write_runfile(tmp_path, fake_model, tmp_path / "run", {"after": ["4242", "17_3"]}))
    text = slurm.render(slurm.build(cfg, workdir="/w"))
    assert "--dependency=afterok:4242:17_3" in sbatch_options(text)
    with pytest.raises(ConfigError, match=r"cluster\.after\[1\](.|\n)*'job 7' is not a Slurm job id"):
        load(write_runfile(tmp_path, fake_model, tmp_path / "run", {"after": ["1", "job 7"]}))
    with pytest.raises(ConfigError, match=r"--dependency is set by the launcher from cluster.after"):
        load(write_runfile(tmp_path, fake_model, tmp_path / "run",
                           {"sbatch_extra": ["--dependency=afterok:1"]}))


@pytest.mark.slurm
def test_a_run_chained_after_another_job_waits_for_it(cluster, tmp_path, fake_model, capsys,
                                                      monkeypatch):
    monkeypatch.delenv("FAKE_HOLD_STEP")
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = submit(write_runfile(tmp_path, fake_model, first_dir, one_node(
        cluster, sbatch_extra=["--hold"]), name="first.yaml"), capsys)
    second = submit(write_runfile(tmp_path, fake_model, second_dir, one_node(
        cluster, after=[first]), name="second.yaml"), capsys)
    try:
        info = job_info(second, cluster["env"])
        assert info["JobState"] == "PENDING" and info["Reason"] == "Dependency", info
        assert info["Dependency"].startswith(f"afterok:{first}"), info
        subprocess.run(["scontrol", "release", first], check=True, timeout=60)
        info = wait_final(second, cluster["env"], 180, str(second_dir))
        assert info["JobState"] == "COMPLETED", f"{info}\n{logs(str(second_dir))}"
        assert job_info(first, cluster["env"])["JobState"] == "COMPLETED"
        assert [r["step"] for r in steps(second_dir)] == [1, 2, 3, 4, 5, 6]
        assert [r["step"] for r in steps(first_dir)] == [1, 2, 3, 4, 5, 6]
    finally:
        subprocess.run(["scancel", first, second], timeout=60)


def test_submitting_a_finished_run_is_refused_before_sbatch(tmp_path, fake_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = rendered(tmp_path, fake_model)   # max_steps 100
    (run_dir / layout.EXIT_STATUS).write_text(json.dumps({"code": 0, "step": 100}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "sbatch"), f"#!/bin/sh\ntouch {tmp_path}/sbatch-ran\necho 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match=r"train\.max_steps(.|\n)*is finished: step 100 of 100 "
                       r"done; a job would train nothing(.|\n)*train\.max_steps=N, N > 100"):
        slurm.main(ns(str(tmp_path / "run.yaml"), "submit", "force"))
    assert not (tmp_path / "sbatch-ran").exists()
    assert slurm.main(ns(str(tmp_path / "run.yaml"), "submit", "force",
                         overrides=["train.max_steps=120"])) == 0
    assert (tmp_path / "sbatch-ran").exists()


# ------------------------------------------------------------------ containers
FAKE_APPTAINER = r"""#!/bin/bash
# A stand-in runtime: records its arguments, then runs the command after the image, like
# `apptainer exec [--nv] [--bind DIR] IMAGE CMD...` does inside the image.
printf '%s\0' "$@" > "$FAKE_DIR/container.$SLURM_NODEID.$$"
[ "$1" = exec ] || { echo "fake apptainer: not exec: $1" >&2; exit 99; }
shift
while [ "${1#--}" != "$1" ]; do
  case $1 in --bind) shift 2 ;; *) shift ;; esac
done
shift   # the image
exec "$@"
"""


def test_a_container_is_rendered_quoted_for_each_runtime(tmp_path, fake_model):
    image = "/images/it's a (test).sif"
    for runtime in ("apptainer", "singularity"):
        cfg = load(write_runfile(tmp_path, fake_model, tmp_path / "run",
                                 {"container": image, "container_runtime": runtime}))
        text = slurm.render(slurm.build(cfg, workdir="/w"))
        words = f"{runtime} exec --nv --bind {tmp_path}/run '/images/it'\"'\"'s a (test).sif'"
        assert f"CONTAINER=({words})" in text, text
        assert "SRUN_CONTAINER=()" in text
    cfg = load(write_runfile(tmp_path, fake_model, tmp_path / "run",
                             {"container": "nvcr.io#nvidia/pytorch:24.01-py3",
                              "container_runtime": "pyxis"}))
    text = slurm.render(slurm.build(cfg, workdir="/w"))
    assert "CONTAINER=()" in text
    assert (f"SRUN_CONTAINER=('--container-image=nvcr.io#nvidia/pytorch:24.01-py3' "
            f"--container-mounts={tmp_path}/run --container-workdir=/w)") in text, text


@pytest.mark.slurm
def test_the_preflight_and_ranks_run_in_the_container(cluster, tmp_path, fake_model, capsys,
                                                      monkeypatch):
    """cluster.container with a stand-in `apptainer` on PATH: the preflight and the node's
    launcher both run through `apptainer exec --bind RUN_DIR IMAGE`, and train."""
    monkeypatch.delenv("FAKE_HOLD_STEP")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "apptainer"), FAKE_APPTAINER)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    image = str(tmp_path / "image dir" / "x.sif")
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(
        cluster, preflight=True, container=image))
    job = submit(run_file, capsys)
    info = wait_final(job, cluster["env"], 180, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"
    assert [r["step"] for r in steps(run_dir)] == [1, 2, 3, 4, 5, 6]
    from helpers import read_nul
    calls = [read_nul(str(p)) for p in cluster["fake"].glob("container.0.*")]
    want = ["exec", "--nv", "--bind", rd, image, cluster["python"], "-m"]
    assert sorted(c[:8] for c in calls) == sorted([want + ["launcher"],
                                                   want + ["torch.distributed.run"]]), calls
