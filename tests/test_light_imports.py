"""The login-node commands run where torch, deepspeed, transformers, datasets, bitsandbytes and
peft cannot be imported: a sitecustomize on PYTHONPATH makes importing them raise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "deepspeed", "transformers", "datasets", "bitsandbytes", "peft", "accelerate")
BLOCKER = f"""\
import importlib.abc, importlib.machinery, sys

HEAVY = {HEAVY!r}


class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"import of {{spec.name}} blocked by the light-import test")

    def exec_module(self, module):  # pragma: no cover - create_module raises first
        raise ImportError(module.__name__)


class _Block(importlib.abc.MetaPathFinder):
    # find_spec answers (so importlib.util.find_spec still says the package exists);
    # importing it raises.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None


sys.meta_path.insert(0, _Block())
"""
RUN = """\
name: light
model: {path: model}
data: {path: train.jsonl, max_seq_len: 64}
train: {max_steps: 10, global_batch_size: 8, micro_batch_size: 2}
quantization: {mode: 4bit, storage_dtype: bf16}
freeze: {policy: lora}
deepspeed: {zero_stage: 3, offload_param: cpu, offload_optimizer: cpu}
cluster: {nodes: 2, gpus_per_node: 2}
"""


@pytest.fixture
def blocked(tmp_path, fake_model):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "run.yaml").write_text(RUN)

    def run(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), ROOT]))
        return subprocess.run([sys.executable, *args], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=120)
    return run


@pytest.mark.parametrize("module", HEAVY)
def test_the_blocker_really_blocks(blocked, module):
    res = blocked("-c", f"import {module}")
    assert res.returncode == 1
    assert f"ImportError: import of {module} blocked by the light-import test" in res.stderr


def test_the_blocker_leaves_find_spec_working(blocked):
    res = blocked("-c", "import importlib.util; print(importlib.util.find_spec('bitsandbytes') is not None)")
    assert res.returncode == 0 and res.stdout.strip() == "True"


def test_validate_runs_without_the_heavy_packages(blocked):
    res = blocked("-m", "launcher", "validate", "run.yaml")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK run.yaml") and "4bit nf4" in res.stdout


def test_validate_reports_problems_without_the_heavy_packages(blocked):
    res = blocked("-m", "launcher", "validate", "run.yaml", "deepspeed.zero_stage=2")
    assert res.returncode == 2
    assert "deepspeed.offload_param (run.yaml:7): parameter offload needs ZeRO-3, zero_stage is 2" \
           in res.stderr


def test_ds_config_runs_without_the_heavy_packages(blocked, tmp_path):
    res = blocked("-m", "launcher", "ds-config", "run.yaml", "-o", "ds.json")
    assert res.returncode == 0, res.stderr
    ds = json.loads((tmp_path / "ds.json").read_text())
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_login_node_modules_import_nothing_heavy(blocked):
    code = textwrap.dedent("""\
        import sys
        from launcher import cli, reference
        from launcher.convert import command as convert, llamafactory as convert_llamafactory, peers as convert_peers
        from launcher.dsconfig import build as ds_config, user_file as ds_file
        from launcher.config import epochs, runfile
        from launcher.cluster import rundir
        from launcher.checks import summary, validate
        cfg = runfile.load("run.yaml")
        print(summary.summary(cfg).splitlines()[0])
        ds = ds_config.build(cfg)
        rundir.prepare(cfg, ds, plan_text="plan\\n")
        reference.fields_table()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
        print("heavy:", heavy)
        """).replace("{heavy!r}", repr(set(HEAVY)))
    res = blocked("-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "heavy: []"
