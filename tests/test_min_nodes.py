"""cluster.min_nodes on the login node: the node range in the script, the node count taken from
Slurm at run time, and what validate refuses (combinations a universal checkpoint cannot carry,
a global batch some node count cannot keep). The job itself: tests/test_slurm_fewer_nodes.py."""
from __future__ import annotations

import pytest

from launcher.checks import rules
from launcher.config.errors import ConfigError
from test_slurm_render import check_script, make_cfg, render


def test_min_nodes_renders_a_node_range_and_takes_the_count_slurm_gives(fake_model, tmp_path):
    cfg = make_cfg(fake_model, {"nodes": 4, "min_nodes": 2, "gpus_per_node": 8},
                   train={"global_batch_size": 96})
    text = render(cfg)
    assert "#SBATCH --nodes=2-4" in text.splitlines()
    assert 'NNODES="$SLURM_JOB_NUM_NODES"' in text.splitlines()
    # with it, Slurm would start the job on MIN nodes although MAX are free
    assert "#SBATCH --ntasks-per-node=1" not in text
    check_script(tmp_path, text)
    fixed = render(make_cfg(fake_model, {"nodes": 4, "min_nodes": 4, "gpus_per_node": 8}))
    assert "#SBATCH --nodes=4" in fixed.splitlines() and "NNODES=4" in fixed.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in fixed.splitlines()


def test_min_nodes_above_nodes_is_refused(fake_model):
    with pytest.raises(ConfigError, match=r"cluster.min_nodes \(run file:2\): 5 is more than "
                       r"cluster.nodes 4\n      fix: set cluster.min_nodes to at most 4"):
        make_cfg(fake_model, {"nodes": 4, "min_nodes": 5})


def test_a_batch_some_node_count_cannot_keep_is_refused_with_the_least_min_nodes(fake_model):
    # 36 sequences in micro batches of 2 over 2 ranks a node: 1 node (accum 9) and 3 (accum 3)
    # keep it, 2 nodes (8 per micro step) do not
    with pytest.raises(ConfigError, match=r"cluster.min_nodes \(run file:\d\): the global batch of "
                       r"36 cannot be kept on 2 node\(s\)(.|\n)*fix: set cluster.min_nodes to 3"):
        make_cfg(fake_model, {"nodes": 3, "min_nodes": 1, "gpus_per_node": 2},
                 train={"global_batch_size": 36, "micro_batch_size": 2})


def test_zero0_with_min_nodes_is_refused_naming_the_way_out(fake_model):
    cfg = make_cfg(fake_model, {"nodes": 2, "min_nodes": 1})
    import dataclasses
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=0))
    found = [p for p in rules.check(cfg) if p.key == "deepspeed.zero_stage"]
    assert len(found) == 1
    assert "cluster.min_nodes lets the job continue on fewer nodes" in found[0].message
    assert "stage 0 has none" in found[0].message
    assert found[0].fix == "set deepspeed.zero_stage: 1 (or 2, 3), or remove cluster.min_nodes"
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=2))
    assert not [p for p in rules.check(cfg) if p.key == "deepspeed.zero_stage"]
