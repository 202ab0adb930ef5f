"""One home per rule: each shared behaviour has one definition, and its users agree with it.

Also: no import cycles among the core modules, argparse only in cli.py, and the login half of
`ftlaunch run` importing nothing of the rank half until it checks the data.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

import launcher
from launcher.config import schema as config
from launcher.model import device, quantize
from launcher.dsconfig import build as ds_config
from launcher.cluster import local_run, rundir, shell, slurm
from launcher.checks import validate
from launcher.config.schema import ClusterConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from launcher.config.errors import ConfigError, Problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "launcher")
CORE = {"cli", "checks.validate", "dsconfig.build", "config.batch", "model.info",
        "cluster.run_state", "cluster.rundir", "cluster.local_run", "cluster.slurm",
        "checks.slurm_checks", "checks.summary", "rank.train", "common.log", "model.device",
        "rank.inputs", "config.schema", "config.runfile", "config.errors", "model.quantize",
        "model.freeze", "model.lora", "cluster.shell"}


def sources() -> dict[str, ast.Module]:
    """Every module of the launcher package, by dotted name below launcher (a.b for a/b.py)."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), PKG)[:-3].replace(os.sep, ".")
                with open(os.path.join(folder, f), encoding="utf-8") as fh:
                    out[rel.removesuffix(".__init__")] = ast.parse(fh.read())
    return out


def imports(tree: ast.Module, names: set[str]) -> set[str]:
    """launcher modules a module imports anywhere (inside functions too)."""
    out = set()
    for n in ast.walk(tree):
        mods = []
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("launcher"):
            base = n.module[len("launcher."):] if n.module != "launcher" else ""
            mods = [f"{base}.{a.name}".strip(".") for a in n.names] + [base]
        elif isinstance(n, ast.Import):
            mods = [a.name[len("launcher."):] for a in n.names if a.name.startswith("launcher.")]
        for m in mods:
            while m and m not in names:
                m = m.rpartition(".")[0]
            if m:
                out.add(m)
    return out


def make(**train) -> RunConfig:
    return RunConfig(name="t", model=ModelConfig(path="/m"), data=DataConfig(path="/d"),
                     train=TrainConfig(max_steps=1, **train))


# ------------------------------------------------------------------ imports
def test_no_import_cycle_runs_through_a_core_module():
    trees = sources()
    graph = {m: imports(t, set(trees)) - {m} for m, t in trees.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in CORE & set(graph) if m in reach(m))
    assert cycles == [], f"these core modules import themselves back through others: {cycles}"


def test_only_cli_knows_argparse():
    users = sorted(m for m, t in sources().items()
                   if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "argparse" in ast.unparse(n)
                          for n in ast.walk(t)))
    assert users == ["cli"]


def test_run_starts_without_the_rank_half():
    """`ftlaunch run` imports no rank-half module until it checks the data (then launcher.rank.inputs,
    never launcher.rank.train)."""
    code = ("import sys, launcher.cluster.local_run, launcher.cli; "
            "print(sorted(m for m in sys.modules if m in ('launcher.rank.train', 'launcher.rank.inputs', "
            "'launcher.data', 'transformers', 'datasets', 'deepspeed')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert "rank.train" not in imports(sources()["cluster.local_run"], set(sources()))


# ------------------------------------------------------------------ on_existing
def test_on_existing_has_one_definition_in_rundir():
    defs = sorted(m for m, t in sources().items()
                  for n in ast.walk(t) if isinstance(n, ast.FunctionDef) and n.name == "on_existing")
    assert defs == ["cluster.rundir"]
    for user in ("cluster.local_run", "cluster.slurm"):
        assert "cli" not in imports(sources()[user], set(sources())), user
    flags = lambda r, o: SimpleNamespace(resume=r, overwrite=o)  # noqa: E731
    assert [rundir.on_existing(flags(r, o)) for r, o in ((True, False), (False, True), (False, False))] \
        == ["resume", "overwrite", "refuse"]


# ------------------------------------------------------------------ dtypes
def test_one_dtype_table_and_torch_agrees_with_it():
    torch = pytest.importorskip("torch")
    for name, torch_name in config.TORCH_DTYPE.items():
        dt = device.torch_dtype(name)
        assert dt is getattr(torch, torch_name)
        assert dt.itemsize == config.DTYPE_BYTES[name], name
    assert set(config.DTYPE_BYTES) == set(config.TORCH_DTYPE)


def test_no_module_keeps_its_own_dtype_table():
    """A run-file dtype name mapped to a torch dtype or a byte count appears in config/schema.py only."""
    entry = re.compile(r"""['"](bf16|fp16|fp32)['"]\s*:\s*(['"](bfloat16|float16|float32)['"]"""
                       r"""|torch\.\w+|[1248]\s*[,}])""")
    copies = sorted(m for m, t in sources().items() if m != "config.schema" and entry.search(ast.unparse(t)))
    assert copies == []
    assert entry.search(ast.unparse(sources()["config.schema"]))  # the pattern does find a table


def test_the_plan_train_and_quantize_use_the_one_table():
    pytest.importorskip("torch")
    for info in pkgutil.walk_packages(launcher.__path__, "launcher."):
        if info.name.startswith("launcher.memory"):
            importlib.import_module(info.name)
    holders = [m for name, m in sys.modules.items()
               if name.startswith("launcher.") and hasattr(m, "DTYPE_BYTES")]
    assert len(holders) >= 2  # config and the plan's inventory
    assert all(m.DTYPE_BYTES is config.DTYPE_BYTES for m in holders)
    import torch
    cfg = dataclasses.replace(make(), model=ModelConfig(path="/m", dtype="fp16"),
                              quantization=config.QuantizationConfig(mode="4bit", storage_dtype="fp32"))
    bnb = quantize.bnb_config(cfg)
    assert bnb.bnb_4bit_compute_dtype is torch.float16 and bnb.bnb_4bit_quant_storage is torch.float32


# ------------------------------------------------------------------ resolve_device
def test_one_resolve_device(monkeypatch):
    torch = pytest.importorskip("torch")
    defs = sorted(m for m, t in sources().items()
                  for n in ast.walk(t) if isinstance(n, ast.FunctionDef) and n.name == "resolve_device")
    assert defs == ["model.device"]
    from launcher.rank import train
    assert train.resolve_device is device.resolve_device
    cuda = make(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.device: cuda asked but no GPU is visible here"):
        device.resolve_device(cuda)
    with pytest.raises(ConfigError, match=r"train.device: cuda asked but no GPU is visible here"):
        local_run.local_ranks(cuda, None)
    assert device.resolve_device(make(device="auto")) == "cpu"
    assert local_run.local_ranks(make(device="auto"), None) == ("cpu", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device.resolve_device(make(device="auto")) == "cuda"
    assert local_run.local_ranks(make(device="auto"), None) == ("cuda", 2)
    assert local_run.local_ranks(make(device="cpu"), 3) == ("cpu", 3)
    with pytest.raises(ConfigError, match=r"--nproc: 3 ranks asked, 2 GPUs here"):
        local_run.local_ranks(make(device="cuda"), 3)


# ------------------------------------------------------------------ ranks' DeepSpeed config
def test_build_ds_config_keeps_the_key_of_a_config_error(monkeypatch):
    from launcher.rank import train
    from launcher.cluster.dist_env import RankEnv
    env = RankEnv(rank=0, world_size=3, local_rank=0, local_world_size=3, node_rank=0, nnodes=1,
                  master_addr="127.0.0.1", master_port=0, launcher="torchrun")
    bad_batch = make(micro_batch_size=2, global_batch_size=8)
    with pytest.raises(ConfigError, match=r"micro_batch_size x world size = 2 x 3 = 6") as exc:
        train.build_ds_config(bad_batch, env, "cpu")
    assert exc.value.keys == ["train.global_batch_size"]

    def refuse(*a, **k):
        raise ConfigError([Problem("deepspeed.preset", "no preset 'x'", "use zero2")], "ds-config")
    monkeypatch.setattr(ds_config, "build", refuse)
    with pytest.raises(ConfigError, match=r"deepspeed.preset: no preset 'x'") as exc:
        train.build_ds_config(make(), env, "cpu")
    assert exc.value.keys == ["deepspeed.preset"]

    def bug(*a, **k):
        raise ValueError('"auto" left in the DeepSpeed config at: zero_optimization.stage')
    monkeypatch.setattr(ds_config, "build", bug)
    with pytest.raises(ValueError, match=r'"auto" left'):  # a bug, not a batch problem
        train.build_ds_config(make(), env, "cpu")


# ------------------------------------------------------------------ bitsandbytes
def test_validate_and_the_ranks_report_a_missing_bitsandbytes_alike(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = dataclasses.replace(make(optimizer="adamw_8bit"),
                              quantization=config.QuantizationConfig(mode="8bit"))
    with pytest.raises(ConfigError, match=r"bitsandbytes is not installed") as exc:
        quantize.check_installed(cfg)
    said = [p for p in validate.check(cfg) if "bitsandbytes is not installed" in p.message]
    assert said == exc.value.problems
    assert [p.key for p in said] == ["quantization.mode", "train.optimizer"]


# ------------------------------------------------------------------ cluster value forms
@pytest.mark.parametrize("name", ["NCCL_DEBUG", "_x1", "a", "1A", "A-B", "A B", "é", "", "A=B"])
def test_env_names_are_refused_by_validate_exactly_when_the_script_would(name):
    cfg = dataclasses.replace(make(), cluster=ClusterConfig(env={name: "v"}))
    refused = any(p.key == f"cluster.env.{name}" and "not a valid environment variable name" in p.message
                  for p in validate.check(cfg))
    try:
        shell.export(name, "v", f"cluster.env.{name}")
        rendered = True
    except ConfigError:
        rendered = False
    assert refused is not rendered


@pytest.mark.parametrize("item", ["--comment=x y", "--hint=nomultithread", "--wait-all-nodes=1",
                                  "--flag", "-N", "--=x", "--a b=c", "---x", "--9x", "comment=x",
                                  "--x_y=1"])
def test_sbatch_extra_forms_are_refused_by_validate_exactly_when_the_script_would(item, fake_model):
    cfg = dataclasses.replace(make(), model=ModelConfig(path=fake_model),
                              cluster=ClusterConfig(sbatch_extra=[item]))
    refused = any(p.key == "cluster.sbatch_extra[0]" for p in validate.check(cfg))
    try:
        text = slurm.render(slurm.build(cfg, workdir="/w", source="/w/run.yaml"))
        rendered = True
    except ConfigError:
        rendered = False
    assert refused is not rendered
    if rendered:
        option = item.partition("=")[0]
        assert any(line.startswith(f"#SBATCH {option}") for line in text.splitlines())
