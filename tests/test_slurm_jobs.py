"""Many jobs and their truths: sweeps (launcher/cluster/sweep.py), the plan's verdict at --submit, the
partition's default time (launcher/cluster/slurm_partition.py), `ftlaunch run` and `status` beside a
live job whose ranks froze, squeue that does not answer, --gres beside --gpus-per-node, and the
rendezvous and preflight ports against the ephemeral range.

On the real test cluster (fixture `slurm_cluster`, one per session; ranks stood in for by
tests/cluster/helpers.FAKE_METRIC_RANKS, which leave metrics.jsonl and exit_status.json as real
ones do), each test reads the run directories afterwards: each job's steps, once each.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from ranks import metric_rows as steps
from helpers import (write_runfile, one_node, FAKE_METRIC_RANKS, fake_job_cluster, job_info, logs, sbatch_options,
                     wait_final, wait_until, write_exe)

from launcher import cli
from launcher.cluster import dist_env, job_lock, layout, run_state, slurm, sweep
from launcher.ops import status
from launcher.config.errors import ConfigError
from launcher.config.runfile import load


def ns(run_file, *flags, overrides=(), sweeps=()):
    return slurm.SlurmCall(run_file=run_file, overrides=tuple(overrides), sweep=tuple(sweeps),
                           **{f: True for f in flags})




@pytest.fixture
def cluster(slurm_cluster, monkeypatch, tmp_path):
    return fake_job_cluster(slurm_cluster, monkeypatch, tmp_path, FAKE_METRIC_RANKS)


def bin_dir(tmp_path, monkeypatch, **tools):
    """Stand-in Slurm tools first on PATH."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, text in tools.items():
        write_exe(str(d / name), text)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    return d


# ------------------------------------------------------------------ sweeps
def test_sweep_values_split_outside_brackets_and_name_each_point():
    assert sweep.split_values("1e-5,3e-5") == ["1e-5", "3e-5"]
    assert sweep.split_values("[a,b],[c]") == ["[a,b]", "[c]"]
    assert sweep.split_values("'x,y',z") == ["'x,y'", "z"]
    found = sweep.axes(["train.lr=1e-5,3e-5", "train.grad_accum=4,8"])
    assert found == [("train.lr", ["1e-5", "3e-5"]), ("train.grad_accum", ["4", "8"])]
    assert sweep.labels([("model.dtype", []), ("quantization.dtype", [])]) == {
        "model.dtype": "model.dtype", "quantization.dtype": "quantization.dtype"}
    with pytest.raises(ConfigError, match=r"--sweep: 3 problems(.|\n)*'train.lr' is not "
                       r"KEY=V1,V2(.|\n)*output.dir tells the points apart(.|\n)*has an empty value"):
        sweep.axes(["train.lr", "output.dir=a,b", "train.seed=1,"])


def test_one_bad_sweep_point_refuses_the_sweep_and_writes_nothing(tmp_path, fake_model,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_file = write_runfile(tmp_path, fake_model, tmp_path / "runs" / "demo", {"nodes": 1})
    with pytest.raises(ConfigError, match=r"sweep of .*run.yaml \(4 points; nothing written or "
                       r"submitted\)(.|\n)*train.micro_batch_size \(sweep point train.lr=1e-5 "
                       r"train.micro_batch_size=0(.|\n)*train.micro_batch_size \(sweep point "
                       r"train.lr=3e-5 train.micro_batch_size=0"):
        slurm.main(ns(run_file, sweeps=["train.lr=1e-5,3e-5", "train.micro_batch_size=2,0"]))
    assert not (tmp_path / "runs").exists()
    assert cli.main(["slurm", run_file, "--sweep", "train.lr=1e-5,3e-5"]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "runs")) == ["demo_lr-1e-5", "demo_lr-3e-5"], out
    cfg = load(str(tmp_path / "runs" / "demo_lr-3e-5" / layout.RESOLVED))
    assert (cfg.train.lr, cfg.name) == (3e-5, "jobs_lr-3e-5")


def test_an_array_is_refused_with_the_way_to_a_sweep(tmp_path, fake_model):
    with pytest.raises(ConfigError, match=r"cluster.sbatch_extra\[0\](.|\n)*--array is set or "
                       r"ruled out by the launcher \(the tasks of an array job would share one run "
                       r"directory; for several runs from one run file: ftlaunch slurm RUN.yaml "
                       r"--sweep key=v1,v2"):
        load(write_runfile(tmp_path, fake_model, tmp_path / "run", {"sbatch_extra": ["--array=0-3"]}))


@pytest.mark.slurm
def test_a_sweep_is_a_job_per_point_each_with_its_run_directory(cluster, tmp_path, fake_model,
                                                                capsys, monkeypatch):
    """2 x 2 points: four run directories named by their values, four jobs (the plan's verdict
    shown before any is submitted), each run directory holding its own job's 6 steps once;
    `ftlaunch runs` lists the four, finished, with their jobs."""
    monkeypatch.delenv("FAKE_HOLD_STEP")
    runs = tmp_path / "runs"
    run_file = write_runfile(tmp_path, fake_model, runs / "demo", one_node(cluster))
    capsys.readouterr()
    assert cli.main(["slurm", run_file, "--submit", "--force", "--sweep", "train.lr=1e-5,3e-5",
                     "--sweep", "train.grad_accum=4,8"]) == 0
    out = capsys.readouterr().out
    names = ["demo_lr-1e-5_grad_accum-4", "demo_lr-1e-5_grad_accum-8",
             "demo_lr-3e-5_grad_accum-4", "demo_lr-3e-5_grad_accum-8"]
    assert sorted(os.listdir(runs)) == names, out
    jobs = re.findall(r"job id:\n(\d+)", out)
    assert len(set(jobs)) == 4, out
    # the verdicts (per GPU, per node, overall) of every point come before the first submit
    verdicts = [m.start() for m in re.finditer(r"\] plan: verdict", out)]
    assert len(verdicts) == 12 and max(verdicts) < out.index("submitted;"), out
    assert "[train.lr=1e-5 train.grad_accum=4] plan: verdict per GPU:" in out
    for name, job in zip(names, jobs):   # submitted in the order of the points
        run_dir = runs / name
        info = wait_final(job, cluster["env"], 180, str(run_dir))
        assert info["JobState"] == "COMPLETED", f"{info}\n{logs(str(run_dir))}"
        assert job_lock.read(str(run_dir)) == job and info["JobName"] == f"jobs_{name[5:]}"
        rows = steps(run_dir)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and {r["job"] for r in rows} == {job}
        cfg = load(str(run_dir / layout.RESOLVED))
        lr, accum = re.match(r"demo_lr-(.*)_grad_accum-(\d)", name).groups()
        assert (cfg.train.lr, cfg.train.grad_accum) == (float(lr), int(accum))
    assert cli.main(["runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines
    for line, name, job in zip(lines, names, jobs):
        assert line.startswith("finished") and "6/6" in line and f"{job} " in line, line
        assert line.endswith(str(runs / name)), line


# ------------------------------------------------------------------ the partition's default time
def test_partition_default_renders_no_time(tmp_path, fake_model):
    cfg = load(write_runfile(tmp_path, fake_model, tmp_path / "run", {"time": "partition-default"}))
    opts = sbatch_options(slurm.render(slurm.build(cfg, workdir="/w")))
    assert not [o for o in opts if o.startswith("--time")] and "--nodes=1" in opts, opts


@pytest.mark.slurm
def test_submit_checks_the_time_against_the_partitions_default_and_max(cluster, tmp_path,
                                                                        fake_model, capsys):
    """scontrol show partition: DefaultTime 5 min leaves no room past grace_s (refused, no job);
    10 min does (the job gets it); a cluster.time above MaxTime is refused (it would pend)."""
    env = {**os.environ, **cluster["env"]}
    part = cluster["partition"]

    def partition(**values):
        subprocess.run(["scontrol", "update", f"PartitionName={part}",
                        *[f"{k}={v}" for k, v in values.items()]], check=True, env=env, timeout=60)

    run_dir = tmp_path / "run"
    default = write_runfile(tmp_path, fake_model, run_dir, one_node(
        cluster, time="partition-default", sbatch_extra=["--hold"]))
    try:
        partition(DefaultTime="00:05:00", MaxTime="01:00:00")
        with pytest.raises(ConfigError, match=r"partition debug: 1 problem(.|\n)*cluster.time: "
                           r"00:05:00 \(partition debug's DefaultTime\) \(300 s\) leaves 120 s "
                           r"before the stop signal(.|\n)*fix: raise cluster.time to at least"):
            slurm.main(ns(default, "submit", "force"))
        assert job_lock.read(str(run_dir)) is None
        with pytest.raises(ConfigError, match=r"cluster.time: 02:00:00 is above partition debug's "
                           r"MaxTime 01:00:00: the job would pend forever(.|\n)*fix: lower "
                           r"cluster.time to 01:00:00 or less, or set cluster.time: partition-default"):
            slurm.main(ns(default, "submit", "force", overrides=["cluster.time=02:00:00"]))
        partition(DefaultTime="00:10:00")
        capsys.readouterr()
        assert slurm.main(ns(default, "submit", "force")) == 0
        out = capsys.readouterr().out
        job = out.strip().splitlines()[-1]
        assert "time limit: 00:10:00, partition debug's DefaultTime (cluster.time: " \
               "partition-default)" in out, out
        assert job_info(job, cluster["env"])["TimeLimit"] == "00:10:00"
        subprocess.run(["scancel", job], env=env, timeout=60)
    finally:
        partition(DefaultTime="UNLIMITED", MaxTime="INFINITE")   # as before (NONE cannot be set)


# ------------------------------------------------------------------ a live job: run, status
def job_processes(job: str) -> list[int]:
    """The job's task processes (the fake ranks and what they run), from /proc."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(x.split(b"=", 1) for x in fh.read().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job.encode() and b"SLURM_STEP_ID" in env \
                and env.get(b"SLURM_STEP_ID") != b"batch":
            found.append(pid)
    return found


def signal_if_alive(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.slurm
def test_frozen_ranks_show_as_running_with_no_step_and_ftlaunch_run_is_refused(
        cluster, tmp_path, fake_model, capsys, monkeypatch):
    """A node that stopped working (its ranks frozen: SIGSTOP) while Slurm still says RUNNING:
    `status` says running and how long no step came; `ftlaunch run` into the run directory is
    refused, naming the job and scancel. Thawed, the job ends with its 6 steps once each."""
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(cluster))
    assert slurm.main(ns(run_file, "submit", "force")) == 0
    job = capsys.readouterr().out.strip().splitlines()[-1]
    frozen = []
    try:
        wait_until(job, cluster["env"], lambda i: (run_dir / layout.METRICS).exists()
                   and len(steps(run_dir)) >= 3 or i.get("JobState") not in ("PENDING", "RUNNING"),
                   180, rd, "3 steps")
        frozen = job_processes(job)
        assert frozen, f"no task process of job {job}"
        for pid in frozen:
            signal_if_alive(pid, signal.SIGSTOP)   # a `sleep` of the ranks' loop may just have ended
        monkeypatch.setattr(status, "STALE_MIN_S", 2)   # instead of a minute
        time.sleep(3)
        st = status.collect(rd)
        assert st["slurm"]["state"] == "RUNNING" and st["state"] == "running", st
        assert st["step"] == 3 and st["no_step_for_s"] >= 3, st
        assert "progress   no step for " in status.render(st)
        assert ": a node may be down or the ranks stuck" in status.render(st)

        capsys.readouterr()
        assert cli.main(["run", run_file]) == layout.EXIT_CONFIG
        err = capsys.readouterr().err
        assert f"belongs to Slurm job {job}, which is RUNNING: ftlaunch run now" in err, err
        assert f"scancel {job}" in err
    finally:
        for pid in frozen:
            signal_if_alive(pid, signal.SIGCONT)
        (cluster["fake"] / "release").touch()
    info = wait_final(job, cluster["env"], 180, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"
    assert [r["step"] for r in steps(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert not (run_dir / layout.STOP_REQUEST).exists()


# ------------------------------------------------------------------ squeue does not answer
SQUEUE_DOWN = """#!/bin/sh
echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2
exit 1
"""
SQUEUE_SLOW = "#!/bin/sh\nsleep 30\n"


def test_squeue_that_does_not_answer_never_ends_a_job(tmp_path, fake_model, monkeypatch, capsys):
    """A stand-in squeue that fails (slurmctld unreachable), then one that hangs: the job in
    job.lock is not taken for ended: status says unknown, a new submit is refused, the lock
    stays. A job id Slurm forgot, or a machine where Slurm is not configured, is no job."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_file = write_runfile(tmp_path, fake_model, run_dir, {"nodes": 1})
    assert slurm.main(ns(run_file)) == 0
    job_lock.record(str(run_dir), "88", "a test")
    (run_dir / layout.METRICS).write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    tools = bin_dir(tmp_path, monkeypatch, squeue=SQUEUE_DOWN)
    monkeypatch.setattr(job_lock, "SQUEUE_TIMEOUT_S", 1)
    monkeypatch.setattr(status, "SLURM_TIMEOUT_S", 1)
    for text in (SQUEUE_DOWN, SQUEUE_SLOW):
        write_exe(str(tools / "squeue"), text)
        assert job_lock.live_state("88") == job_lock.UNKNOWN
        st = status.collect(str(run_dir))
        assert st["state"] == "unknown" and st["slurm"]["job_id"] == "88", st
        assert "slurm      job 88 UNKNOWN (squeue did not answer within 1 s, or failed)" in \
            status.render(st)
        with pytest.raises(ConfigError, match=r"belongs to Slurm job 88, which is UNKNOWN \(squeue "
                           r"did not answer within 1 s, or failed: the job may still run\)(.|\n)*"
                           r"scancel 88"):
            slurm.main(ns(run_file, "submit", "force"))
        assert job_lock.read(str(run_dir)) == "88"
    for stderr in ("slurm_load_jobs error: Invalid job id specified",
                   "scontrol: fatal: Could not establish a configuration source"):
        write_exe(str(tools / "squeue"), f"#!/bin/sh\necho '{stderr}' >&2\nexit 1\n")
        assert job_lock.live_state("88") is None
        job_lock.refuse_if_live(str(run_dir), "--submit")   # no error


@pytest.mark.slurm
def test_a_job_whose_squeue_does_not_answer_leaves_the_run_directory_alone(
        cluster, tmp_path, fake_model, monkeypatch):
    """The job script's own check (sbatch by hand, a stand-in squeue that cannot reach
    slurmctld first on the job's PATH): the recorded job is not taken for ended, so the new job
    exits 73 touching nothing."""
    run_dir = tmp_path / "run"
    rd = str(run_dir)
    run_file = write_runfile(tmp_path, fake_model, run_dir, one_node(cluster))
    assert slurm.main(ns(run_file)) == 0
    job_lock.record(rd, "999999", "a test")
    bin_dir(tmp_path, monkeypatch, squeue=SQUEUE_DOWN)   # sbatch passes PATH on to the job
    done = subprocess.run(["sbatch", "--parsable", str(run_dir / layout.JOB_SCRIPT)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    info = wait_final(job, cluster["env"], 180, rd)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{layout.EXIT_LOCKED}:0", \
        f"{info}\n{logs(rd)}"
    err = (run_dir / "logs" / f"job-{job}.err").read_text()
    assert f"belongs to job 999999 (UNKNOWN): job {job} exits without touching it" in err, err
    assert job_lock.read(rd) == "999999" and not (run_dir / layout.METRICS).exists()


# ------------------------------------------------------------------ --gres beside --gpus-per-node
def test_gres_gpus_beside_gpus_per_node_are_refused_other_gres_kept(tmp_path, fake_model):
    for item in ("--gres=gpu:2", "--gres=gpu:a100:2,nvme:1", "--gres=gpu"):
        with pytest.raises(ConfigError, match=r"cluster.sbatch_extra\[0\](.|\n)*asks for GPUs beside "
                           r"--gpus-per-node=4, which the launcher sets from cluster.gpus_per_node"
                           r"(.|\n)*fix: remove gpu.* from the --gres option"):
            load(write_runfile(tmp_path, fake_model, tmp_path / "run",
                               {"gpus_per_node": 4, "sbatch_extra": [item]}))
    with pytest.raises(ConfigError, match=r"for a GPU model \(a100\) select nodes by feature with "
                       r"cluster.constraint"):
        load(write_runfile(tmp_path, fake_model, tmp_path / "run",
                           {"sbatch_extra": ["--gres=gpu:a100:1"]}))
    cfg = load(write_runfile(tmp_path, fake_model, tmp_path / "run",
                             {"sbatch_extra": ["--gres=nvme:1"]}))
    assert "--gres=nvme:1" in sbatch_options(slurm.render(slurm.build(cfg, workdir="/w")))
    # CPU ranks render no --gpus-per-node: the job's --gres is the only GPU request
    load(write_runfile(tmp_path, fake_model, tmp_path / "run", {"sbatch_extra": ["--gres=gpu:1"]},
                       train={"device": "cpu"}))


# ------------------------------------------------------------------ ports
def test_the_jobs_ports_are_below_the_ephemeral_range_and_the_preflight_says_so(tmp_path):
    ports = {dist_env.slurm_port(str(j)) for j in range(0, 20000, 7)}
    stores = {dist_env.preflight_port(p) for p in ports}
    assert min(ports) == 15000 and max(ports) <= 24999 and max(stores) < min(ports)
    assert min(stores) >= 1024 and not ports & stores
    assert max(ports | stores) < 32768   # Linux's default ip_local_port_range: 32768 60999
    rng = tmp_path / "ip_local_port_range"
    rng.write_text("32768\t60999\n")
    note = dist_env.port_note({"rendezvous": 15042, "preflight store": 5042}, str(rng))
    assert note == "ports: rendezvous 15042, preflight store 5042, outside this node's " \
                   "ephemeral range 32768-60999"
    rng.write_text("1024\t65535\n")
    note = dist_env.port_note({"rendezvous": 15042, "preflight store": 5042}, str(rng))
    assert note.startswith("WARNING: ports: rendezvous 15042, preflight store 5042; rendezvous "
                           "and preflight store inside this node's ephemeral range 1024-65535"), note
    assert "net.ipv4.ip_local_reserved_ports" in note
    here = dist_env.ephemeral_range()
    assert here is None or here[0] <= here[1]


# ------------------------------------------------------------------ a killed rank's record
def test_a_rank_killed_by_a_signal_is_recorded_with_its_last_step_before_a_peers_error(
        tmp_path, fake_model, monkeypatch):
    """Rank 1's guardian reads the steps its rank reports; the rank dies by SIGKILL after step
    4; rank 0's consequent error, recorded first but stamped after the death, is replaced."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_file = write_runfile(tmp_path, fake_model, run_dir, {"nodes": 1})
    assert slurm.main(ns(run_file)) == 0
    child = (f"import os, signal, time\nfrom launcher.cluster import run_state\n"
             f"for s in range(5): run_state.report_step(s)\n"
             f"run_state.write_exit_status({str(run_dir)!r}, 0, 1, 3, None, "
             f"'rank 0: RuntimeError: Connection closed by peer', since=0, at=time.time() + 5)\n"
             f"os.kill(os.getpid(), signal.SIGKILL)\n")
    guard = ("import sys\nfrom launcher.cluster import rank_guard\n"
             f"sys.exit(rank_guard.run({run_file!r}, (), [sys.executable, '-c', {child!r}]))")
    p = subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       env={**os.environ, "RANK": "1", "WORLD_SIZE": "2"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    rec = run_state.last_status(str(run_dir))
    assert (rec["code"], rec["rank"], rec["step"]) == (137, 1, 4), rec
    assert rec["message"].startswith("rank 1 died by SIGKILL"), rec
    assert rec["message"].endswith("(after step 4, the last it completed)"), rec
    st = status.collect(str(run_dir))
    assert st["state"] == "failed" and st["last_failure"]["rank"] == 1, st
    assert "state      failed: exit 137 at step 4 (" in status.render(st)


def test_which_death_by_signal_replaces_a_recorded_failure(tmp_path):
    from launcher.cluster.run_state import last_status, write_exit_status
    rd, now = str(tmp_path), time.time()

    def record(rank, code, died_by=None, at=None):
        write_exit_status(rd, rank, code, 2, None, f"rank {rank} code {code}", since=now - 10,
                          at=at, died_by=died_by)
        return (last_status(rd)["rank"], last_status(rd)["code"])

    # rank 0's connection error, stamped a moment before rank 1's SIGKILL was seen: replaced
    assert record(0, 1, at=now) == (0, 1)
    assert record(1, 137, signal.SIGKILL, at=now + 0.5) == (1, 137)
    # the launcher's SIGTERM to the survivor after it: replaces nothing
    assert record(0, 143, signal.SIGTERM, at=now + 1) == (1, 137)
    # a peer's error long before a death: the error is the root cause
    (tmp_path / "exit_status.json").unlink()
    assert record(0, 1, at=now - 5) == (0, 1)
    assert record(1, 137, signal.SIGKILL, at=now) == (0, 1)
    # a rank's own error, then its death by a signal while exiting: its error stands
    assert record(0, 134, signal.SIGABRT, at=now + 0.1) == (0, 1)


def test_stop_of_a_finished_epoch_run_changes_nothing(tmp_path, fake_model, capsys, monkeypatch):
    """train.epochs (no max_steps in the run file): the steps rank 0 counted (steps.json,
    over ds_config.json's estimate) decide that the run is finished; no STOP file is made."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_file = write_runfile(tmp_path, fake_model, run_dir, {"nodes": 1},
                             train={"max_steps": None, "epochs": 2})
    assert slurm.main(ns(run_file)) == 0
    run_state.write_steps(str(run_dir), 5)
    (run_dir / layout.EXIT_STATUS).write_text(json.dumps({"code": 0, "step": 5}))
    capsys.readouterr()
    assert cli.main(["stop", str(run_dir)]) == 0
    assert f"{run_dir} is finished: step 5 of 5 done" in capsys.readouterr().out
    assert not (run_dir / layout.STOP_REQUEST).exists()
