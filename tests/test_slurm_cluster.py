"""On a real Slurm cluster started by the tests (tests/cluster/start.sh, fixture `slurm_cluster`):
sbatch reads hostile values as the renderer meant, node ranks and environment reach each node,
the stop protocol checkpoints, requeues and resumes, impossible requests fail --test-only, and
generated jobs run the real training entry point on 2 nodes of CPU ranks (SFT, and DPO at ZeRO-3
through a preemption).

Skipped where Slurm is not installed (never in CI). Jobs are polled with `scontrol show job`.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import (dump_runfile, FAKE_PYTHON, logs, read_env, read_nul, wait_final,
                     wait_until, write_exe)

from launcher.cluster import layout, shell, slurm

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
    return slurm.SlurmCall(run_file=run_file, **{f: True for f in flags})




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
    ok = dump_runfile(tmp_path / "ok.yaml", base_tree(fake_model, tmp_path / "ok", {
        "nodes": 2, "gpus_per_node": 2, "partition": cluster["partition"]}))
    assert slurm.main(ns(ok, "test_only")) == 0
    out = capsys.readouterr().out
    assert "to start at" in out and "node[1-2]" in out, out

    impossible = dump_runfile(tmp_path / "big.yaml", base_tree(fake_model, tmp_path / "big", {
        "nodes": 2, "gpus_per_node": 4, "partition": cluster["partition"]}))
    assert slurm.main(ns(impossible, "test_only")) == 1
    err = capsys.readouterr().err
    assert "Requested node configuration is not available" in err, err
    assert "the run directory is kept" in err
    assert (tmp_path / "big" / layout.JOB_SCRIPT).is_file()


# ------------------------------------------------------------------ the protocol, with fake ranks
def test_stop_on_real_slurm_with_fake_ranks(cluster, tmp_path, fake_model, monkeypatch, capsys):
    """2 nodes, fake ranks: each node's launcher gets its own node rank and the exact environment
    (hostile values, hostile run directory); TERM to the batch shell makes both nodes stop at a
    step boundary, the slow one is not killed while it finishes, and the job ends with 75,
    not requeued (requeue and resume: the real training test below)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    py_dir = tmp_path / "py $(x) 'q'"
    py_dir.mkdir()
    python = write_exe(str(py_dir / "python"), FAKE_PYTHON)
    env_corpus = {f"FTL_V{i}": v for i, v in enumerate(HOSTILE + ["line1\nline2"])}
    run_dir = tmp_path / HOSTILE_DIR
    run_file = dump_runfile(tmp_path / "run.yaml", base_tree(fake_model, run_dir, {
        "nodes": 2, "gpus_per_node": 2, "partition": cluster["partition"], "python": python,
        "env": env_corpus}))
    for k, v in {"FAKE_DIR": str(fake), "FAKE_STEPS": "600", "FAKE_STEP_S": "0.1",
                 "FAKE_SLOW_NODE": "1", "FAKE_SLOW_S": "3"}.items():   # node 1: a slow checkpoint
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    assert slurm.main(ns(run_file, "submit", "force")) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert job_id.isdigit()
    rd = str(run_dir)

    wait_until(job_id, cluster["env"], lambda i: (fake / "running").exists()
               or i.get("JobState") not in ("PENDING", "RUNNING"), 120, rd, "running ranks")
    assert run(["scancel", "--signal=TERM", "--batch", job_id]).returncode == 0
    info = wait_final(job_id, cluster["env"], 120, rd)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{layout.EXIT_STOPPED}:0", \
        f"{info}\n{logs(rd)}"
    assert info["Restarts"] == "0"

    for node in (0, 1):
        argv = read_nul(str(fake / f"argv.{node}"))
        assert argv[:3] == ["-m", "torch.distributed.run", f"--node_rank={node}"]
        assert argv[-1] == os.path.join(rd, layout.RESOLVED)
        seen = read_env(str(fake / f"env.{node}"))
        assert seen["SLURMD_NODENAME"] == f"node{node + 1}"
        assert seen["MASTER_ADDR"] == "127.0.0.1"   # node1 does not resolve here: NodeAddr
        for k, v in env_corpus.items():
            assert seen[k] == v, k
        stopped = int((fake / f"stopped.{node}").read_text())   # node 1 wrote it 3 s later
        assert 1 < stopped < 600
        assert not (fake / f"done.{node}").exists()
    batch_log = (run_dir / "logs" / f"job-{job_id}.out").read_text()
    assert "ranks stopped on request on 2 of 2 nodes" in batch_log
    assert "TERM received" in (run_dir / "logs" / f"job-{job_id}.err").read_text()
    for node in (0, 1):
        assert (run_dir / "logs" / f"job-{job_id}-node{node}.log").exists(), logs(rd)
    assert not (run_dir / layout.STOP_REQUEST).exists()   # rank 0 (fake) removed it
    assert not (tmp_path / "x").exists() and not os.path.exists("/tmp/ftl-pwned")


def test_a_dead_node_ends_the_job(cluster, tmp_path, fake_model, monkeypatch, capsys):
    """One node's launcher dies (exit 3): srun ends the other node at once and the job fails,
    without requeue."""
    fake = tmp_path / "fake"
    fake.mkdir()
    python = write_exe(str(tmp_path / "python"), FAKE_PYTHON)
    run_dir = tmp_path / "run"
    run_file = dump_runfile(tmp_path / "run.yaml", base_tree(fake_model, run_dir, {
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


# ------------------------------------------------------------------ the real training entry point
STEPS = 240


def tiny_tree(tiny, run_dir, cluster_partition):
    return {"name": "slurm-tiny", "model": {"path": tiny["model"], "dtype": "bf16"},
            "data": {"path": tiny["text"], "max_seq_len": 32, "packing": True},
            "train": {"max_steps": STEPS, "micro_batch_size": 4, "lr": 3.0e-3, "warmup_steps": 5,
                      "checkpoint_every": 40, "device": "cpu", "dist_timeout_s": 120},
            "freeze": {"policy": "last_layers", "trainable_layers": 1, "also_train": ["norms", "lm_head"]},
            "deepspeed": {"zero_stage": 2},
            "cluster": {"nodes": 2, "gpus_per_node": 1, "partition": cluster_partition,
                        "python": sys.executable, "cpus_per_task": 2, "preflight": False,
                        "env": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}},
            "output": {"dir": str(run_dir)}}


def submit_tiny(tmp_path, tiny, cluster, name, capsys, **cluster_fields):
    run_dir = tmp_path / name
    tree = tiny_tree(tiny, run_dir, cluster["partition"])
    tree["cluster"].update(cluster_fields)
    run_file = dump_runfile(tmp_path / f"{name}.yaml", tree)
    assert slurm.main(ns(run_file, "submit")) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert job_id.isdigit(), job_id
    return job_id, run_dir


def metrics(run_dir):
    with open(run_dir / layout.METRICS) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if "loss" in r]


def node_logs(run_dir, job_id):
    return {n: (run_dir / "logs" / f"job-{job_id}-node{n}.log").read_text() for n in (0, 1)}


def preempt_after(job: str, run_dir, cluster: dict, steps: int) -> None:
    """Once the job has logged `steps` steps (or ended), USR1 to its batch shell: the stop
    protocol's preemption notice."""
    wait_until(job, cluster["env"], lambda i: (run_dir / layout.METRICS).exists()
               and len(metrics(run_dir)) >= steps or i.get("JobState") not in ("PENDING", "RUNNING"),
               600, str(run_dir), "training steps")
    assert run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0


@pytest.mark.slow
@pytest.mark.multirank
def test_real_training_on_two_nodes_unpreempted_and_preempted(cluster, tiny, tmp_path, capsys,
                                                              monkeypatch):
    """Two generated 2-node jobs of `python -m launcher train` (one CPU rank per node, gloo,
    ZeRO-2), submitted together by `ftlaunch slurm --submit`:
    (a) runs to completion and leaves checkpoints, metrics and the export;
    (b) gets USR1 in its batch shell mid-run: the ranks checkpoint and stop, the job requeues
        itself, restarts, resumes from that checkpoint and ends at the same step with the same
        losses as (a);
    (c) is (a) with the deepspeed launcher instead of torchrun: the same losses."""
    monkeypatch.chdir(tmp_path)
    job_a, run_a = submit_tiny(tmp_path, tiny, cluster, "unpreempted", capsys)
    job_b, run_b = submit_tiny(tmp_path, tiny, cluster, "preempted", capsys)
    job_c, run_c = submit_tiny(tmp_path, tiny, cluster, "deepspeed-launcher", capsys,
                               launcher="deepspeed")
    rb = str(run_b)
    preempt_after(job_b, run_b, cluster, 10)

    # (a)
    info = wait_final(job_a, cluster["env"], 600, str(run_a))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(str(run_a))}"
    status = json.loads((run_a / layout.EXIT_STATUS).read_text())
    assert status["code"] == 0 and status["step"] == STEPS
    ref = metrics(run_a)
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert ref[-1]["loss"] < ref[0]["loss"]
    ckpts = sorted(os.listdir(run_a / layout.CHECKPOINTS))
    assert ckpts and ckpts[-1] == f"step-{STEPS:08d}", ckpts
    assert (run_a / layout.FINAL).is_dir()
    assert f"done: {STEPS} steps" in node_logs(run_a, job_a)[0]
    assert "ranks finished" in (run_a / "logs" / f"job-{job_a}.out").read_text()

    # (b)
    info = wait_until(job_b, cluster["env"], lambda i: i.get("Restarts") == "1"
                      or i.get("JobState") not in ("PENDING", "RUNNING"), 600, rb, "requeue")
    assert info.get("Restarts") == "1", f"the job ended without a requeue: {info}\n{logs(rb)}"
    info = wait_final(job_b, cluster["env"], 600, rb)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{logs(rb)}"
    text = node_logs(run_b, job_b)
    stopped = [int(x) for x in re.findall(r"stopped at step (\d+)", text[0])]
    assert len(stopped) == 1 and 10 <= stopped[0] < STEPS, text[0][-3000:]
    assert f"resumed from {run_b / layout.CHECKPOINTS}/step-{stopped[0]:08d} (step {stopped[0]})" \
        in text[0], text[0][-3000:]
    assert f"done: {STEPS} steps" in text[0]
    batch = (run_b / "logs" / f"job-{job_b}.out").read_text()
    assert "ranks stopped on request on 2 of 2 nodes" in batch and "requeueing: restart 1 of 3" in batch
    status = json.loads((run_b / layout.EXIT_STATUS).read_text())
    assert status["code"] == 0 and status["step"] == STEPS
    rows = metrics(run_b)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for got, want in zip(rows, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), (got, want)

    # (c)
    info = wait_final(job_c, cluster["env"], 600, str(run_c))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(str(run_c))}"
    assert "deepspeed.launcher.launch" in node_logs(run_c, job_c)[1]
    rows = metrics(run_c)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for got, want in zip(rows, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), (got, want)


# ------------------------------------------------------------------ preference tuning
DPO_STEPS = 60   # enough steps that the stop (USR1 after step 4) lands mid-run on a fast CPU


def submit_dpo(tmp_path, tiny, cluster, pairs, name, capsys):
    """A 2-node DPO job: full fine-tune at ZeRO-3, the reference a frozen copy of the model
    partitioned over the two ranks (train.reference: model)."""
    run_dir = tmp_path / name
    tree = tiny_tree(tiny, run_dir, cluster["partition"])
    tree["model"]["dtype"] = "fp32"
    tree["data"] = {"path": pairs, "prompt_field": "prompt", "max_seq_len": 32, "shuffle": True}
    tree["train"].update(max_steps=DPO_STEPS, micro_batch_size=2, lr=2.0e-3, warmup_steps=2,
                         checkpoint_every=20, objective="dpo", beta=0.1, reference="model")
    tree["freeze"] = {"policy": "full"}
    tree["deepspeed"] = {"zero_stage": 3}
    run_file = dump_runfile(tmp_path / f"{name}.yaml", tree)
    assert slurm.main(ns(run_file, "submit")) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert job_id.isdigit(), job_id
    return job_id, run_dir


@pytest.mark.slow
@pytest.mark.multirank
def test_dpo_zero3_on_two_nodes_preempted_resumes_with_the_unpreempted_losses(
        cluster, tiny, tmp_path, capsys, monkeypatch):
    """Two 2-node DPO jobs (ZeRO-3, train.reference: model, one CPU rank per node): one runs
    through; the other gets USR1 in its batch shell mid-run, its ranks checkpoint and stop, the
    job requeues itself (scontrol requeue), restarts and resumes, the reference loaded again from
    the model: the losses of the first, step for step, and each job's first loss ln 2."""
    from test_preference_train import write_pairs
    monkeypatch.chdir(tmp_path)
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"))
    job_a, run_a = submit_dpo(tmp_path, tiny, cluster, pairs, "dpo-unpreempted", capsys)
    job_b, run_b = submit_dpo(tmp_path, tiny, cluster, pairs, "dpo-preempted", capsys)
    rb = str(run_b)
    preempt_after(job_b, run_b, cluster, 4)

    info = wait_final(job_a, cluster["env"], 600, str(run_a))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(str(run_a))}"
    ref = metrics(run_a)
    assert [r["step"] for r in ref] == list(range(1, DPO_STEPS + 1))
    assert ref[0]["loss"] == pytest.approx(math.log(2), abs=1e-4), ref[0]
    assert ref[-1]["loss"] < ref[0]["loss"] and ref[-1]["reward_margin"] > 0, ref[-1]

    info = wait_final(job_b, cluster["env"], 600, rb)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{logs(rb)}"
    text = node_logs(run_b, job_b)[0]
    stopped = [int(x) for x in re.findall(r"stopped at step (\d+)", text)]
    assert len(stopped) == 1 and 1 <= stopped[0] < DPO_STEPS, text[-3000:]
    assert f"resumed from {run_b / layout.CHECKPOINTS}/step-{stopped[0]:08d} (step {stopped[0]})" \
        in text, text[-3000:]
    assert "requeueing: restart 1 of 3" in (run_b / "logs" / f"job-{job_b}.out").read_text()
    rows = metrics(run_b)
    assert [r["step"] for r in rows] == list(range(1, DPO_STEPS + 1))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4), rows[0]
    for got, want in zip(rows, ref):
        for key in ("loss", "reward_margin"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (key, got, want)


# ------------------------------------------------------------------ secrets
@pytest.mark.slow
@pytest.mark.multirank
def test_a_secret_reaches_the_job_and_no_file(cluster, tiny, tmp_path, capsys, monkeypatch,
                                              umask_kept):
    """One short whole run (preflight, 4 steps with checkpoints, TensorBoard and W&B, final/)
    with output.private and cluster.env_from_shell: [FTL_TEST_API_TOKEN]: the node's task (and so
    its ranks) sees the submitting shell's value; that value, and an HF_TOKEN planted beside it,
    are in no file of the run directory, of `ftlaunch export`'s folder, in `ftlaunch status`, in
    `scontrol show job` or in the batch script Slurm stored; every file written is 0600."""
    import hashlib
    import uuid
    secret, planted = f"ftl-secret-{uuid.uuid4().hex}", f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("FTL_TEST_API_TOKEN", secret)
    monkeypatch.setenv("HF_TOKEN", planted)
    seen = tmp_path / "seen"
    seen.mkdir()
    monkeypatch.setenv("FTL_SEEN_DIR", str(seen))
    python = write_exe(str(tmp_path / "python"), (
        "#!/bin/bash\n"
        'if [ "$1 $2" = "-m torch.distributed.run" ]; then\n'
        '  printf %s "${FTL_TEST_API_TOKEN:-}" | sha256sum | cut -d" " -f1 > "$FTL_SEEN_DIR/node$SLURM_NODEID"\n'
        "fi\n"
        f"exec {shell.quote(sys.executable)} \"$@\"\n"))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "private"
    tree = tiny_tree(tiny, run_dir, cluster["partition"])
    tree["train"].update(max_steps=4, checkpoint_every=2, warmup_steps=0)
    tree["cluster"].update(nodes=1, python=python, preflight=True,
                           env_from_shell=["FTL_TEST_API_TOKEN"])
    tree["output"].update(private=True, report_to=["tensorboard", "wandb"])
    run_file = dump_runfile(tmp_path / "private.yaml", tree)
    assert slurm.main(ns(run_file, "submit")) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    rd = str(run_dir)
    info = wait_final(job_id, cluster["env"], 600, rd)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(rd)}"
    assert (seen / "node0").read_text().strip() == hashlib.sha256(secret.encode()).hexdigest()

    shown = run(["scontrol", "show", "job", job_id]).stdout
    stored = run(["scontrol", "write", "batch_script", job_id, "-"]).stdout
    assert job_id in shown and "--export=ALL,FTL_TEST_API_TOKEN" in stored, (shown, stored)
    out = tmp_path / "export"
    done = run([sys.executable, "-m", "launcher", "export", rd, "-o", str(out)], cwd=tmp_path,
               preexec_fn=lambda: os.umask(0o022))   # private because the run is, not by umask
    assert done.returncode == 0, done.stderr
    status = run([sys.executable, "-m", "launcher", "status", rd, "--json"], cwd=tmp_path)
    assert json.loads(status.stdout)["state"] == "finished", status.stdout

    written = [os.path.join(d, n) for top in (rd, str(out)) for d, _, names in os.walk(top)
               for n in names]
    for name in (layout.RESOLVED, layout.JOB_SCRIPT, layout.METRICS, "preflight.json",
                 f"logs/job-{job_id}.out", f"logs/job-{job_id}-node0.log"):
        assert os.path.join(rd, name) in written, name
    assert any("/tensorboard/" in p for p in written) and any("/wandb/" in p for p in written)
    assert any("/checkpoints/" in p for p in written) and any("/final/" in p for p in written)
    assert any(p.startswith(str(out) + "/") for p in written)
    for value in (secret, planted):
        holding = [p for p in written if value.encode() in open(p, "rb").read()]
        assert holding == [], holding
        for text in (shown, stored, status.stdout, status.stderr, done.stdout, done.stderr):
            assert value not in text
    loose = [p for p in written if os.stat(p).st_mode & 0o077]
    assert loose == [], [(p, oct(os.stat(p).st_mode)) for p in loose]
    assert stat_mode(rd) == 0o700 and stat_mode(str(out)) == 0o700


def stat_mode(path):
    return os.stat(path).st_mode & 0o777
