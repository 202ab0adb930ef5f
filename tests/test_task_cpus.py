"""The CPUs of each node's Slurm task (launcher/cluster/slurm.py `task_cpus`): always requested, shown
by `ftlaunch validate`. The real binding is tested on the local cluster
(tests/test_slurm_scale.py::test_cpus_per_task_unset_still_gives_each_rank_a_cpu)."""
from __future__ import annotations

import pytest

from launcher.config import runfile
from launcher.cluster import slurm
from launcher.checks import summary


def cfg_of(tmp_path, fake_model, cluster: str, data: str = ""):
    text = f"""
name: cpus
model: {{path: {fake_model}}}
data: {{path: {tmp_path}/train.jsonl, max_seq_len: 64{data}}}
train: {{max_steps: 1}}
cluster: {cluster}
"""
    cfg, problems = runfile.parse(text, [], source="run.yaml", base_dir=str(tmp_path))
    assert problems == []
    return cfg


@pytest.mark.parametrize("cluster, data, want", [
    ("{gpus_per_node: 8}", "", 8),                            # a CPU per rank
    ("{gpus_per_node: 8}", ", num_workers: 3", 32),           # and per data worker
    ("{gpus_per_node: 8, cpus_per_task: 96}", ", num_workers: 3", 96),   # as asked
])
def test_each_node_task_gets_cpus(tmp_path, fake_model, cluster, data, want):
    cfg = cfg_of(tmp_path, fake_model, cluster, data)
    assert slurm.task_cpus(cfg)[0] == want
    opts = {o.option: o.value for o in slurm.build(cfg, workdir=str(tmp_path)).sbatch}
    assert opts["--cpus-per-task"] == str(want)


def test_validate_summary_says_what_each_task_gets(tmp_path, fake_model):
    text = summary.summary(cfg_of(tmp_path, fake_model, "{gpus_per_node: 4}", ", num_workers: 1"))
    assert ("cpus          8 per node's task (cluster.cpus_per_task unset: 4 rank(s) x (1 + "
            "data.num_workers 1)), bound to them by Slurm; each rank 2 thread(s) "
            "(OMP_NUM_THREADS)") in text
