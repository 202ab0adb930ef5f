"""Shared fixtures: tiny models, tokenizers and data built locally (no hub), once per session."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

# Quiet, deterministic, cheap ranks; one shared DeepSpeed extension cache so ops compile once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ftlaunch-torch-extensions"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama (2 blocks, hidden 64), its tokenizer and jsonl data: paths by name."""
    import tiny_recipe
    return tiny_recipe.build(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def write_run(tmp_path):
    """write_run(yaml_text) -> path of a run file in a fresh folder."""
    def _write(text: str, name: str = "run.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)
    return _write


@pytest.fixture
def fake_model(tmp_path) -> str:
    """A folder with only a config.json: enough for the login-node checks."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 512}')
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    return str(d)
