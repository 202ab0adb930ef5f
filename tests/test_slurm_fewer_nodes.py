"""A job that continues on fewer nodes (cluster.min_nodes), on the local test cluster.

A 3-node job (`--nodes=2-3`, one CPU rank each, kept to node1-3 by `--exclude`: no spare) loses
its third node after a checkpoint. Slurm requeues it; it starts on the 2 nodes left, resumes the
3-rank checkpoint through its universal form with the global batch kept, and trains to the end.
Its losses equal, within fp32 tolerance, those of an uninterrupted 2-node run of the same global
batch (on other nodes of the cluster, at the same time), step for step, before and after the loss
of the node. `ftlaunch status` shows the two segments with their world sizes.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import logs, restart_node, wait_final
from test_slurm_scale import (cluster, hosts, kill_after_a_checkpoint, metrics,  # noqa: F401
                              prepare, until_requeued_and_done)

from launcher.cluster import slurm
from launcher.ops import status

pytestmark = [pytest.mark.slurm]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def tree(tiny, data, run_dir, partition, nodes, min_nodes, keep_to):
    return {"name": f"fewer{nodes}", "model": {"path": tiny["model"], "dtype": "fp32"},
            "data": {"path": data, "max_seq_len": 16},
            "train": {"max_steps": STEPS, "micro_batch_size": 1, "global_batch_size": 6,
                      "lr": 3.0e-3, "warmup_steps": 3, "checkpoint_every": 10, "device": "cpu",
                      "dist_timeout_s": 60},
            "freeze": {"policy": "last_layers", "trainable_layers": 1, "also_train": ["norms", "lm_head"]},
            "deepspeed": {"zero_stage": 2},
            "cluster": {"nodes": nodes, "min_nodes": min_nodes, "gpus_per_node": 1,
                        "cpus_per_task": 2, "partition": partition, "preflight": False,
                        "python": sys.executable, "sbatch_extra": [f"--exclude={keep_to}"],
                        "env": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}},
            "output": {"dir": str(run_dir), "save_final": False}}


@pytest.mark.slow
@pytest.mark.multirank
def test_a_3_node_job_loses_a_node_and_finishes_on_2(cluster, tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "long.jsonl"  # every example cut to max_seq_len: equal micro batches
    with open(tiny["text"]) as fh:
        texts = [json.loads(line)["text"] for line in fh][:72]
    data.write_text("".join(json.dumps({"text": a + " " + b}) + "\n"
                            for a, b in zip(texts[::2], texts[1::2])))
    part = cluster["partition"]
    script, rd = prepare(tmp_path, tree(tiny, str(data), tmp_path / "three", part, 3, 2,
                                        "node[4-9]"), "three")
    ref_script, ref_dir = prepare(tmp_path, tree(tiny, str(data), tmp_path / "two", part, 2, None,
                                                 "node[1-3]"), "two")
    assert "#SBATCH --nodes=2-3" in open(script).read()
    job, ref_job = slurm.submit(script), slurm.submit(ref_script)
    victim = None
    try:
        victim, first = kill_after_a_checkpoint(job, rd, cluster, 2)
        assert len(hosts(first["NodeList"], cluster["env"])) == 3
        info = until_requeued_and_done(job, rd, cluster, victim)
        assert len(hosts(info["NodeList"], cluster["env"])) == 2
        ref_info = wait_final(ref_job, cluster["env"], 600, ref_dir)
        assert ref_info["JobState"] == "COMPLETED", f"{ref_info}\n{logs(ref_dir)}"
    finally:
        if victim:
            restart_node(cluster["dir"], victim, cluster["env"])
    rows, ref = metrics(rd), metrics(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) == [r["step"] for r in ref]
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows, ref))
    print(f"largest relative loss difference to the uninterrupted 2-node run: {worst:.2e}")
    assert worst < 1e-4, (rows, ref)
    text = logs(rd, limit=200000)
    assert "(written by 3 ranks) on 2 through its universal checkpoint" in text
    assert "grad_accum 2 -> 3 keeps the global batch of 6" in text
    segs = status.collect(rd)["segments"]
    assert [g["world_size"] for g in segs] == [3, 2] and segs[1]["to"] == STEPS
    assert "on 3 ranks" in status.render(status.collect(rd))
