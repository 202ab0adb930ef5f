"""Every example run file in examples/ (globbed): valid, and its DeepSpeed config accepted.

The examples point at examples/build/..., which `make demo` creates and a clean clone lacks.
The session fixture `tiny` builds the same assets; every path field that points into
examples/build/ is redirected there with an override, exactly as a user would.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import json
import os

import pytest
import yaml

from launcher.dsconfig import build as ds_config
from launcher.config import runfile
from launcher.config.schema import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))
BUILD = os.path.join(ROOT, "examples", "build")


def path_keys(cls=RunConfig, prefix="") -> list[str]:
    """Dotted keys of the schema's path fields."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = runfile.type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += path_keys(tp, key)
        elif f.metadata.get("path"):
            out.append(key)
    return out


def redirect(example: str, build_root: str, out_dir: str) -> list[str]:
    """Overrides that point the example's examples/build/... paths at build_root."""
    with open(example, encoding="utf-8") as fh:
        tree = yaml.safe_load(fh)
    overrides = [f"output.dir={out_dir}"]
    for key in path_keys():
        value = tree
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, str):
            continue
        full = os.path.normpath(os.path.join(os.path.dirname(example), value))
        if full == BUILD or full.startswith(BUILD + os.sep):
            overrides.append(f"{key}={os.path.join(build_root, os.path.relpath(full, BUILD))}")
    mix = (tree.get("data") or {}).get("mix")
    if mix:  # data.mix: the whole list again, its paths redirected
        for m in mix:
            full = os.path.normpath(os.path.join(os.path.dirname(example), m["path"]))
            m["path"] = os.path.join(build_root, os.path.relpath(full, BUILD))
        overrides.append(f"data.mix={json.dumps(mix)}")
    if any("/chat/" in o for o in overrides):  # the chat example's assets (examples/chat_demo.py)
        import chat_demo
        chat_demo.build_assets(os.path.join(build_root, "chat"))
    return overrides


@contextlib.contextmanager
def world(n: int):
    import deepspeed.comm as dist
    saved = dist.get_rank, dist.get_world_size
    dist.get_rank, dist.get_world_size = (lambda group=None: 0), (lambda group=None: n)
    try:
        yield
    finally:
        dist.get_rank, dist.get_world_size = saved


def test_there_are_examples():
    assert EXAMPLES, "examples/*.yaml is empty"


@pytest.mark.parametrize("example", EXAMPLES, ids=[os.path.basename(e) for e in EXAMPLES])
def test_example_validates_and_deepspeed_accepts_its_config(example, tiny, tmp_path):
    build_root = os.path.dirname(tiny["model"])
    overrides = redirect(example, build_root, str(tmp_path / "run"))
    assert any(o.startswith("model.path=") for o in overrides), "examples train the tiny model"
    cfg = runfile.load(example, overrides)
    assert cfg.model.path.startswith(build_root)
    assert all(p.startswith(build_root) for p in [cfg.data.path] + [m.path for m in cfg.data.mix] if p)
    assert os.path.isfile(os.path.join(cfg.model.path, "config.json"))
    built = ds_config.build(cfg)
    assert list(ds_config.find_auto(built)) == []
    from deepspeed.runtime.config import DeepSpeedConfig
    with world(cfg.world_size):
        parsed = DeepSpeedConfig(copy.deepcopy(built))
    assert parsed.train_batch_size == built["train_batch_size"]
    assert parsed.zero_optimization_stage == cfg.deepspeed.zero_stage
