"""Batch arithmetic (launcher/config/batch.py): one definition, asked by validate, ds_config, summary,
`ftlaunch run` and the ranks; each caller's numbers agree with it."""
from __future__ import annotations

import ast
import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.config import batch
from launcher.dsconfig import build as ds_config
from launcher.cluster import local_run
from launcher.checks import summary, validate
from launcher.config.schema import ClusterConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from launcher.config.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(g=None, m=1, a=None, nodes=1, gpus=1) -> RunConfig:
    return RunConfig(name="t", model=ModelConfig(path="/m"), data=DataConfig(path="/d"),
                     train=TrainConfig(max_steps=1, micro_batch_size=m, grad_accum=a,
                                       global_batch_size=g),
                     cluster=ClusterConfig(nodes=nodes, gpus_per_node=gpus))


def test_batch_sizes_derives_grad_accum():
    cfg = make(g=64, m=2, nodes=2, gpus=4)
    assert batch.batch_sizes(cfg) == (2, 4, 64)
    assert batch.batch_sizes(cfg, world_size=4) == (2, 8, 64)
    with pytest.raises(ValueError, match=r"not a multiple of micro_batch_size x world size = 2 x 3 = 6"):
        batch.batch_sizes(cfg, world_size=3)


def test_derived_accum_and_dividing_ranks():
    assert batch.derived_accum(64, 2, 4) == 8
    assert batch.derived_accum(64, 2, 3) is None
    assert batch.dividing_ranks(12, 2) == [1, 2, 3, 6]


@settings(max_examples=200, deadline=None, database=None)
@given(g=st.integers(1, 512), m=st.integers(1, 16), a=st.one_of(st.none(), st.integers(1, 16)),
       nodes=st.integers(1, 4), gpus=st.integers(1, 8))
def test_every_suggested_batch_fix_works(g, m, a, nodes, gpus):
    cfg = make(g, m, a, nodes, gpus)
    problem = batch.batch_problem(cfg)
    try:
        batch.batch_sizes(cfg)
        assert problem is None
        return
    except ValueError:
        assert problem is not None
    options = batch.batch_options(cfg, cfg.world_size)
    assert options, "a failing batch must come with at least one fix"
    for opt in options:
        fixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **opt))
        micro, accum, total = batch.batch_sizes(fixed)
        assert micro * accum * nodes * gpus == total


@settings(max_examples=200, deadline=None, database=None)
@given(g=st.one_of(st.none(), st.integers(1, 256)), m=st.integers(1, 8),
       a=st.one_of(st.none(), st.integers(1, 8)), nodes=st.integers(1, 3), gpus=st.integers(1, 4))
def test_every_caller_agrees_with_the_one_definition(g, m, a, nodes, gpus):
    """validate (the rule), ds_config (the JSON) and summary (the batch line) say what
    batch.batch_sizes says, or all refuse."""
    cfg = make(g, m, a, nodes, gpus)
    try:
        micro, accum, total = batch.batch_sizes(cfg)
    except ValueError:
        assert "train.global_batch_size" in {p.key for p in validate.check(cfg)}
        with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
            ds_config.build(cfg)
        return
    assert "train.global_batch_size" not in {p.key for p in validate.check(cfg)}
    ds = ds_config.filled(cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (micro, accum, total)
    assert f"{micro} micro x {accum} accum x {cfg.world_size} ranks = {total} sequences" \
        in summary.summary(cfg)


@pytest.mark.parametrize("nproc", [1, 2, 3, 4, 5, 8])
def test_local_run_keeps_the_global_batch_exactly_when_batch_derives_it(nproc):
    """`ftlaunch run` refuses a rank count exactly when the arithmetic cannot split the global
    batch over it, and otherwise the resolved config trains with the derived accumulation."""
    cfg = make(g=24, m=2, a=3, nodes=2, gpus=2)
    local = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=None),
                                cluster=ClusterConfig(nodes=1, gpus_per_node=nproc))
    if 24 % (2 * nproc):
        with pytest.raises(ConfigError, match=rf"24 is not a multiple of micro_batch_size x ranks "
                                              rf"= 2 x {nproc} on this machine"):
            local_run.local_config(cfg, "cpu", nproc)
        assert batch.batch_problem(local) is not None
    else:
        got = local_run.local_config(cfg, "cpu", nproc)
        assert got == dataclasses.replace(local, train=dataclasses.replace(local.train,
                                                                           device="cpu"))
        assert batch.batch_sizes(local) == (2, 24 // (2 * nproc), 24)


def test_no_other_module_does_the_arithmetic():
    """Only config/batch.py divides the global batch: the callers import it (no copy to disagree)."""
    for name in ("checks/validate", "dsconfig/build", "checks/summary", "cluster/local_run",
                 "rank/loop_steps"):
        with open(os.path.join(ROOT, "launcher", f"{name}.py"), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not defined & {"batch_sizes", "batch_problem", "batch_options", "derived_accum"}, name
        asks = any(isinstance(n, ast.ImportFrom) and (n.module == "launcher.config.batch" or (
            n.module == "launcher.config" and "batch" in {a.name for a in n.names})) for n in ast.walk(tree))
        assert asks, f"{name} does not ask launcher/config/batch.py"
        assert "global_batch_size %" not in ast.unparse(tree), f"{name} divides the global batch itself"
