"""Rank environment from torchrun, the deepspeed launcher, srun and a plain process (pure)."""
from __future__ import annotations

import pytest

from launcher.cluster import dist_env
from launcher.cluster.dist_env import RankEnv


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400",
           "TORCHELASTIC_RUN_ID": "x"}
    assert dist_env.from_environ(env) == RankEnv(5, 8, 1, 4, 1, 2, "n1", 29400, "torchrun")


def test_deepspeed_launcher():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert dist_env.from_environ(env) == RankEnv(3, 4, 1, 2, 1, 2, "10.0.0.1", 29500, "deepspeed")


def test_srun_without_master_derives_it():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_ID": "0",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    got = dist_env.from_environ(env)
    assert got == RankEnv(6, 8, 2, 4, 1, 2, "gpu07", 15000 + 123456 % 10000, "srun")


def test_srun_keeps_given_master():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "1", "SLURM_NNODES": "2",
           "MASTER_ADDR": "head", "MASTER_PORT": "4242", "SLURM_JOB_NODELIST": "a,b"}
    got = dist_env.from_environ(env)
    assert (got.master_addr, got.master_port, got.local_world_size) == ("head", 4242, 1)


def test_batch_shell_is_not_a_rank_list():
    # the sbatch shell has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: a plain process
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}
    assert dist_env.from_environ(env).launcher == "single"


def test_torchrun_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    got = dist_env.from_environ(env)
    assert (got.launcher, got.rank, got.world_size) == ("torchrun", 1, 2)


def test_single_process_defaults_and_export():
    got = dist_env.from_environ({})
    assert got == RankEnv(0, 1, 0, 1, 0, 1, "127.0.0.1", 0, "single")
    out: dict[str, str] = {}
    filled = dist_env.export(got, out)
    assert filled.master_port > 0
    assert out == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(filled.master_port)}


@pytest.mark.parametrize("nodes, first", [("gpu[03-05,9],cpu1", "gpu03"), ("node1", "node1"),
                                          ("a,b", "a"), ("x-y[10]", "x-y10")])
def test_first_host(nodes, first):
    assert dist_env.first_host(nodes) == first


def test_bad_number_names_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a number"):
        dist_env.from_environ({"RANK": "0", "WORLD_SIZE": "two"})
