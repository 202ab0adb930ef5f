"""Slurm at scale, on the local test cluster (9 nodes, task/affinity binding CPUs; fixture
`slurm_cluster`): each node's task gets cpus_per_task CPUs (and not without SRUN_CPUS_PER_TASK);
the preflight names, excludes and requeues past bad nodes one at a time; a killed node is
requeued around on 8 nodes with the real training entry point; a 64-node x 8-GPU job is
accepted by `sbatch --test-only` on a controller of that shape.

Never skipped in CI (the fixture fails there instead). Jobs are polled with `scontrol show job`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from ranks import loss_rows

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import (dump_runfile, job_info, kill_node, logs, restart_node, wait_final,
                     wait_until, write_exe)

from launcher.cluster import layout, slurm

pytestmark = [pytest.mark.slurm]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cluster(slurm_cluster, monkeypatch):
    for k, v in slurm_cluster["env"].items():
        monkeypatch.setenv(k, v)
    return slurm_cluster


def ns(run_file, *flags):
    return slurm.SlurmCall(run_file=run_file, **{f: True for f in flags})




def prepare(tmp_path, tree, name):
    """`ftlaunch slurm` without submitting: (job script, run dir)."""
    run_file = dump_runfile(tmp_path / f"{name}.yaml", tree)
    assert slurm.main(ns(run_file)) == 0
    run_dir = tree["output"]["dir"]
    return os.path.join(run_dir, layout.JOB_SCRIPT), run_dir


def hosts(nodelist, env):
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=60)
    return out.stdout.split()


# ------------------------------------------------------------------ CPU binding
AFFINITY_PYTHON = r"""#!/bin/bash
# Records what the node's task was given, instead of launching ranks.
grep Cpus_allowed_list /proc/self/status > "$FAKE_DIR/$SLURM_JOB_ID.$SLURM_NODEID"
echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" >> "$FAKE_DIR/$SLURM_JOB_ID.$SLURM_NODEID"
"""


def test_each_node_task_is_bound_to_cpus_per_task(cluster, tmp_path, fake_model, monkeypatch, capsys):
    """cpus_per_task 2 on 2-CPU nodes: each node's task may run on both CPUs (its affinity mask)
    and its one rank gets OMP_NUM_THREADS=2. The control, the same script without the
    SRUN_CPUS_PER_TASK line, is bound to one CPU: srun does not inherit --cpus-per-task."""
    fake = tmp_path / "fake"
    fake.mkdir()
    monkeypatch.setenv("FAKE_DIR", str(fake))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)   # sbatch passes the environment on
    monkeypatch.chdir(tmp_path)
    python = write_exe(str(tmp_path / "python"), AFFINITY_PYTHON)
    data = os.path.join(os.path.dirname(fake_model), "train.jsonl")
    tree = {"name": "cpus", "model": {"path": fake_model}, "data": {"path": data, "max_seq_len": 64},
            "train": {"max_steps": 1, "device": "cpu"}, "output": {"dir": str(tmp_path / "run")},
            "cluster": {"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 2, "python": python,
                        "preflight": False, "partition": cluster["partition"]}}
    script, run_dir = prepare(tmp_path, tree, "cpus")
    text = open(script).read()
    line = "  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK\n"
    assert text.count(line) == 1
    control = tmp_path / "control.sbatch"
    control.write_text(text.replace(line, ""))
    # one after the other: one job per run directory (a second live job would be refused)
    job = slurm.submit(script)
    info = wait_final(job, cluster["env"], 120, run_dir)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(run_dir)}"
    job_control = slurm.submit(str(control))
    info = wait_final(job_control, cluster["env"], 120, run_dir)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(run_dir)}"
    for node in (0, 1):
        assert (fake / f"{job}.{node}").read_text().split() == [
            "Cpus_allowed_list:", "0-1", "OMP_NUM_THREADS=2"]
        mask = (fake / f"{job_control}.{node}").read_text().split()
        assert mask[:1] == ["Cpus_allowed_list:"] and mask[1] in ("0", "1"), mask


GPU_ENV_PYTHON = r"""#!/bin/bash
# Records the node task's CPUs and the GPUs Slurm gave it, instead of launching ranks.
{ grep Cpus_allowed_list /proc/self/status
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
  echo "FTLAUNCH_NODE_CUDA_VISIBLE_DEVICES=${FTLAUNCH_NODE_CUDA_VISIBLE_DEVICES:-unset}"
} > "$FAKE_DIR/$SLURM_JOB_ID.$SLURM_NODEID"
"""


def test_cpus_per_task_unset_still_gives_each_rank_a_cpu(cluster, tmp_path, fake_model, monkeypatch):
    """cluster.cpus_per_task unset, 2 GPUs (ranks) per node, the deepspeed launcher: the job asks
    for a CPU per rank (--cpus-per-task=2), so each node's task may run on both CPUs, not one
    (Slurm's default for a task without --cpus-per-task); and the task keeps the GPUs Slurm gave
    it for the ranks (the deepspeed launcher rewrites CUDA_VISIBLE_DEVICES to 0..N-1)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    monkeypatch.setenv("FAKE_DIR", str(fake))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.chdir(tmp_path)
    python = write_exe(str(tmp_path / "python"), GPU_ENV_PYTHON)
    data = os.path.join(os.path.dirname(fake_model), "train.jsonl")
    tree = {"name": "cpus-unset", "model": {"path": fake_model},
            "data": {"path": data, "max_seq_len": 64}, "train": {"max_steps": 1},
            "output": {"dir": str(tmp_path / "run")},
            "cluster": {"nodes": 2, "gpus_per_node": 2, "python": python, "launcher": "deepspeed",
                        "preflight": False, "partition": cluster["partition"]}}
    script, run_dir = prepare(tmp_path, tree, "cpus-unset")
    assert "#SBATCH --cpus-per-task=2\n" in open(script).read()
    job = slurm.submit(script)
    info = wait_final(job, cluster["env"], 120, run_dir)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(run_dir)}"
    for node in (0, 1):
        seen = dict(line.replace(":\t", "=").split("=", 1)
                    for line in (fake / f"{job}.{node}").read_text().splitlines())
        assert seen["Cpus_allowed_list"] == "0-1", seen
        assert seen["OMP_NUM_THREADS"] == "1", seen
        assert seen["CUDA_VISIBLE_DEVICES"] == "0,1", seen
        assert seen["FTLAUNCH_NODE_CUDA_VISIBLE_DEVICES"] == "0,1", seen


# ------------------------------------------------------------------ 64 nodes x 8 GPUs
def test_a_64_node_8_gpu_job_is_accepted_by_test_only(tmp_path, fake_model, monkeypatch, capsys,
                                                       slurm_cluster):
    """A controller of 64 nodes x 8 GPUs x 96 CPUs (no slurmd: `--test-only` runs nothing)
    answers the rendered 64-node job with a start on node[1-64]; 65 nodes are refused."""
    state = tmp_path / "c64"
    env = {**os.environ, "FTL_SLURM_NODES": "64", "FTL_SLURM_GPUS": "8", "FTL_SLURM_CPUS": "96",
           "FTL_SLURM_MEM": "1000000", "FTL_SLURM_CONTROLLER_ONLY": "1"}
    started = subprocess.run([os.path.join(ROOT, "tests", "cluster", "start.sh"), str(state)],
                             capture_output=True, text=True, timeout=300, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        monkeypatch.setenv("SLURM_CONF", str(state / "slurm.conf"))
        monkeypatch.chdir(tmp_path)
        data = os.path.join(os.path.dirname(fake_model), "train.jsonl")
        tree = {"name": "big", "model": {"path": fake_model}, "data": {"path": data, "max_seq_len": 64},
                "train": {"max_steps": 10}, "output": {"dir": str(tmp_path / "big")},
                "cluster": {"nodes": 64, "gpus_per_node": 8, "cpus_per_task": 96, "partition": "debug"}}
        assert slurm.main(ns(dump_runfile(tmp_path / "big.yaml", tree), "test_only")) == 0
        out = capsys.readouterr().out
        assert "to start at" in out and "using 6144 processors on nodes node[1-64]" in out, out
        tree["cluster"]["nodes"] = 65
        tree["output"]["dir"] = str(tmp_path / "too-big")
        assert slurm.main(ns(dump_runfile(tmp_path / "too-big.yaml", tree), "test_only")) == 1
        assert "Requested node configuration is not available" in capsys.readouterr().err
    finally:
        subprocess.run([os.path.join(ROOT, "tests", "cluster", "stop.sh"), str(state)],
                       capture_output=True, timeout=300)


# ------------------------------------------------------------------ preflight, one bad node at a time
# The node "image" of the test cluster: what python each node runs. Every node's torch sees the 2
# GPUs Slurm gives the task, except on the one made bad in each of four ways:
#   BAD_RO     the run directory mounted read-only (its own mount namespace)
#   BAD_SHARED another folder (a copy holding resolved.yaml) mounted over the run directory
#   BAD_MODULE deepspeed missing (a sitecustomize that hides it)
#   BAD_GPUS   the task sees one GPU (CUDA_VISIBLE_DEVICES=0)
# torch is given the GPUs Slurm sets in CUDA_VISIBLE_DEVICES (a sitecustomize, FAKE_GPUS); the ranks
# themselves are faked: they only record that training started.
NODE_PYTHON = r"""#!/bin/bash
node=$SLURMD_NODENAME
export PYTHONPATH="$FAKE_DIR/gpus:$PYTHONPATH"
[ "$node" = "$BAD_GPUS" ] && export CUDA_VISIBLE_DEVICES=0
[ "$node" = "$BAD_MODULE" ] && export PYTHONPATH="$FAKE_DIR/block:$PYTHONPATH"
if [ "$1 $2 $3" != "-m launcher preflight" ]; then
  echo "$SLURM_RESTART_COUNT $node" >> "$FAKE_DIR/trained"
  exit 0
fi
if [ "$node" = "$BAD_RO" ]; then
  exec unshare -m bash -c 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"' \
    _ "$RUN_DIR_SEEN" "$REAL_PYTHON" "$@"
fi
if [ "$node" = "$BAD_SHARED" ]; then
  exec unshare -m bash -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' \
    _ "$FAKE_DIR/elsewhere" "$RUN_DIR_SEEN" "$REAL_PYTHON" "$@"
fi
exec "$REAL_PYTHON" "$@"
"""
FAKE_GPUS = """import os, types
import torch
torch.cuda.device_count = lambda: (0 if os.environ.get("CUDA_VISIBLE_DEVICES") is None
                                  else len(torch.cuda._parse_visible_devices()))
torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(
    name="Fake GPU", major=9, minor=0, uuid=f"GPU-fake-{i}")
torch.cuda.mem_get_info = lambda i: (81000 * 2**20, 81559 * 2**20)
"""
BLOCK = FAKE_GPUS + """import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepspeed":
            raise ModuleNotFoundError("No module named 'deepspeed'")
sys.meta_path.insert(0, _Missing())
"""


def test_preflight_names_excludes_and_requeues_past_each_bad_node(cluster, tiny, tmp_path,
                                                                  monkeypatch):
    """A 2-node job, always on node1 and one more, where node2..node5 are each bad in one way:
    every start, the preflight names the bad node with its reason, the job excludes it and
    requeues; the fifth start (node1 + node6) passes, prints its all-reduce and trains."""
    fake = tmp_path / "fake"
    for d in ("gpus", "block", "elsewhere"):
        (fake / d).mkdir(parents=True)
    (fake / "gpus" / "sitecustomize.py").write_text(FAKE_GPUS)
    (fake / "block" / "sitecustomize.py").write_text(BLOCK)
    python = write_exe(str(tmp_path / "python"), NODE_PYTHON)
    run_dir = tmp_path / "run"
    bad = {"BAD_RO": "node2", "BAD_SHARED": "node3", "BAD_MODULE": "node4", "BAD_GPUS": "node5"}
    for k, v in {**bad, "FAKE_DIR": str(fake), "REAL_PYTHON": sys.executable,
                 "RUN_DIR_SEEN": str(run_dir), "PYTHONPATH": ROOT}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    tree = {"name": "pf", "model": {"path": tiny["model"]},
            "data": {"path": tiny["text"], "max_seq_len": 32},
            "train": {"max_steps": 2, "device": "cuda"}, "output": {"dir": str(run_dir)},
            "cluster": {"nodes": 2, "gpus_per_node": 2, "python": python, "max_restarts": 5,
                        "partition": cluster["partition"], "preflight_timeout_s": 60,
                        # node1 in every allocation: the batch node, whose shell (unlike the bad
                        # node's preflight here) cannot be given its own mount namespace
                        "sbatch_extra": ["--nodelist=node1"]}}
    script, rd = prepare(tmp_path, tree, "pf")
    shutil.copy(run_dir / layout.RESOLVED, fake / "elsewhere" / layout.RESOLVED)
    job = slurm.submit(script)
    info = wait_final(job, cluster["env"], 480, rd)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "4", f"{info}\n{logs(rd)}"
    assert hosts(info["NodeList"], cluster["env"]) == ["node1", "node6"]
    assert sorted((fake / "trained").read_text().splitlines()) == ["4 node1", "4 node6"]
    batch = (run_dir / "logs" / f"job-{job}.out").read_text()
    err = (run_dir / "logs" / f"job-{job}.err").read_text()
    why = {"node2": "cannot write in the run directory", "node3": "is not the one the batch node sees",
           "node4": "deepspeed is not installed",
           "node5": "1 GPU(s) visible to torch (CUDA_VISIBLE_DEVICES=0), cluster.gpus_per_node is 2"}
    for restart, (node, reason) in enumerate(why.items()):
        assert f"preflight: excluding {node} and requeueing: restart {restart + 1} of 5" in batch, batch
        lines = [x for x in err.splitlines() if x.startswith(f"  {node} ")]
        assert len(lines) == 1 and reason in lines[0], err
    assert "node[2-5]" in info["ExcNodeList"] or info["ExcNodeList"] == "node2,node3,node4,node5", info
    assert "2 node(s), all passed" in batch and "all-reduce (gloo, 2 node(s), 8 MiB x 5): bus bandwidth" in batch
    summary = json.loads((run_dir / "preflight.json").read_text())
    assert summary["bad"] == {} and sorted(summary["nodes"]) == ["node1", "node6"]
    print(f"preflight of the good pair: {summary['nodes']['node1']['seconds']} s on node1;",
          batch.split("preflight: 2 node(s), all passed")[-1].splitlines()[0])


# ------------------------------------------------------------------ a node killed mid-run
def training_tree(tiny, run_dir, partition, nodes, steps, preflight=True):
    return {"name": f"nf{nodes}", "model": {"path": tiny["model"], "dtype": "bf16"},
            "data": {"path": tiny["text"], "max_seq_len": 32, "packing": True},
            "train": {"max_steps": steps, "micro_batch_size": 4, "lr": 3.0e-3, "warmup_steps": 5,
                      "checkpoint_every": 10, "device": "cpu", "dist_timeout_s": 60},
            "freeze": {"policy": "last_layers", "trainable_layers": 1, "also_train": ["norms", "lm_head"]},
            "deepspeed": {"zero_stage": 2},
            "cluster": {"nodes": nodes, "gpus_per_node": 1, "cpus_per_task": 2, "partition": partition,
                        "preflight": preflight,
                        "python": sys.executable,
                        "env": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}},
            "output": {"dir": str(run_dir)}}




def checkpoints(run_dir):
    d = os.path.join(run_dir, layout.CHECKPOINTS)
    return sorted(x for x in os.listdir(d) if x.startswith("step-")) if os.path.isdir(d) else []


def kill_after_a_checkpoint(job, run_dir, cluster, node_index):
    """Wait for a complete checkpoint and 3 steps past it, then kill the job's node_index-th node."""
    def ready(info):
        if info.get("JobState") not in ("PENDING", "RUNNING"):
            return True
        if not checkpoints(run_dir) or not os.path.exists(os.path.join(run_dir, layout.METRICS)):
            return False
        return len(loss_rows(run_dir)) >= int(checkpoints(run_dir)[0][5:]) + 3
    info = wait_until(job, cluster["env"], ready, 600, run_dir, "a checkpoint")
    assert info["JobState"] == "RUNNING", f"{info}\n{logs(run_dir)}"
    victim = hosts(info["NodeList"], cluster["env"])[node_index]
    kill_node(cluster["dir"], victim)
    return victim, info


def until_requeued_and_done(job, run_dir, cluster, victim):
    info = wait_until(job, cluster["env"], lambda i: i.get("Restarts", "0") != "0"
                      or i.get("JobState") not in ("PENDING", "RUNNING"), 300, run_dir, "requeue")
    assert info.get("Restarts") == "1", f"the job ended without a requeue: {info}\n{logs(run_dir)}"
    info = wait_final(job, cluster["env"], 600, run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{logs(run_dir)}"
    assert victim not in hosts(info["NodeList"], cluster["env"]), info
    return info


@pytest.mark.slow
@pytest.mark.multirank
def test_an_8_node_job_loses_a_node_and_trains_to_the_end(cluster, tiny, tmp_path, monkeypatch):
    """8 nodes (one CPU rank each) of 9: the fourth node's slurmd and processes are SIGKILLed
    after a checkpoint. The job is requeued onto the 8 others, resumes from the last complete
    checkpoint and trains to its last step; the steps it trained before the kill and again after
    the resume have the same losses (the resumed run continues as the uninterrupted one would:
    the same weights, optimizer state, data position and learning rate), and each step is logged
    once."""
    monkeypatch.chdir(tmp_path)
    steps = 20
    script, rd = prepare(tmp_path, training_tree(tiny, tmp_path / "eight", cluster["partition"],
                                                 8, steps, preflight=False), "eight")   # CI time
    job = slurm.submit(script)
    victim = None
    try:
        victim, first = kill_after_a_checkpoint(job, rd, cluster, 3)
        before = {r["step"]: r["loss"] for r in loss_rows(rd)}  # the resume truncates these
        assert len(hosts(first["NodeList"], cluster["env"])) == 8
        info = until_requeued_and_done(job, rd, cluster, victim)
        assert len(hosts(info["NodeList"], cluster["env"])) == 8
    finally:
        if victim:
            restart_node(cluster["dir"], victim, cluster["env"])
    rows = loss_rows(rd)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    node0 = [p for p in sorted(os.listdir(os.path.join(rd, "logs"))) if p.endswith("-node0.log")]
    resumed = [line for p in node0 for line in open(os.path.join(rd, "logs", p))
               if "resumed from" in line]
    assert resumed, logs(rd)
    at = int(resumed[-1].split("(step ")[1].split(")")[0])
    again = [r for r in rows if at < r["step"] <= max(before)]
    assert len(again) >= 3, (at, sorted(before))   # the kill came 3 steps past a checkpoint
    for r in again:
        assert r["loss"] == pytest.approx(before[r["step"]], rel=1e-5, abs=1e-6), (r, before)
    for r in rows[:at]:
        assert r["loss"] == before[r["step"]], r   # the rows before the checkpoint are kept
    status = json.loads(open(os.path.join(rd, layout.EXIT_STATUS)).read())
    assert status["code"] == 0 and status["step"] == steps
    assert job_info(job, cluster["env"])["JobState"] == "COMPLETED"
