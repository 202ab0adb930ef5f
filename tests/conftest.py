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
os.environ.setdefault("FTLAUNCH_CACHE", os.path.join("/tmp", f"ftlaunch-test-data-cache-{os.getuid()}"))
os.environ.setdefault("FTLAUNCH_PLAN_CACHE", "0")  # each test computes its own plan facts
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ftlaunch-torch-extensions"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama (2 blocks, hidden 64), its tokenizer and jsonl data: paths by name."""
    import tiny_recipe
    return tiny_recipe.build(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def umask_kept():
    """output.private changes the process's umask (launcher/cluster/rundir.py keep_private): a test that
    runs a private run in this process gets the test's umask back afterwards."""
    from launcher.cluster import rundir
    mask = os.umask(0o022)
    os.umask(mask)
    user, _ = rundir.umask_state()
    yield
    rundir.set_umask_state(user, mask)


@pytest.fixture
def write_run(tmp_path):
    """write_run(yaml_text) -> path of a run file in a fresh folder."""
    def _write(text: str, name: str = "run.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)
    return _write


def write_fake_model(d) -> str:
    """config.json, a safetensors file with a 2-block Llama's parameter names (tiny shapes) and a
    two-token tokenizer.json: enough for the login-node checks (launcher/checks/input_checks.py and the
    name checks of freeze patterns and LoRA targets)."""
    import json
    import struct
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 512}')
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm")] + [f"model.layers.{i}.self_attn.q_proj.bias" for i in range(2)]
    header = {n: {"dtype": "F32", "shape": [2, 4], "data_offsets": [32 * i, 32 * (i + 1)]}
              for i, n in enumerate(names)}
    head = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(32 * len(names)))
    (d / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}')
    return str(d)


@pytest.fixture
def fake_model(tmp_path) -> str:
    """A model folder for the login-node checks (write_fake_model) and train.jsonl beside it."""
    d = write_fake_model(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    return d


# ------------------------------------------------------------------ the local Slurm cluster
# 9 nodes: an 8-node job can lose one and restart without it; a node silent for 12 s is DOWN.
SLURM_CLUSTER_SHAPE = {"FTL_SLURM_NODES": "9", "FTL_SLURM_SLURMD_TIMEOUT": "12"}
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm cluster on this machine (tests/cluster/start.sh), started once per session:
    slurmctld + node1..node9 (2 CPUs bound by task/affinity, 2048 MiB, 2 fake GPUs each),
    partition `debug`.

    Yields {"dir": state folder (logs in dir/log), "partition": ..., "env": {"SLURM_CONF": ...}}.
    Skipped with the reason where Slurm is not installed or this is not root, except with CI=true,
    where that is a failure: the cluster tests never skip in CI."""
    import shutil
    import subprocess
    tools = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")
    missing = [t for t in tools if shutil.which(t) is None]
    why = (f"Slurm is not installed (missing: {', '.join(missing)}); install with apt-get install "
           "slurmctld slurmd slurm-client munge" if missing else
           "the local Slurm cluster must run as root" if os.geteuid() != 0 else "")
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}. CI=true: the Slurm tests must run in CI, not skip")
        pytest.skip(why)
    state = str(tmp_path_factory.mktemp("slurm"))
    scripts = os.path.join(ROOT, "tests", "cluster")
    started = subprocess.run([os.path.join(scripts, "start.sh"), state], capture_output=True,
                             text=True, timeout=300, env={**os.environ, **SLURM_CLUSTER_SHAPE})
    if started.returncode != 0:
        subprocess.run([os.path.join(scripts, "stop.sh"), state], capture_output=True, timeout=300)
        pytest.fail(f"tests/cluster/start.sh {state} failed:\n{started.stdout}{started.stderr}")
    try:
        # the jobs' processes keep the plan's model facts on disk, as ranks started here do
        # (tests/ranks.py rank_env); sbatch passes this environment on to the job
        yield {"dir": state, "partition": "debug",
               "env": {"SLURM_CONF": os.path.join(state, "slurm.conf"), "FTLAUNCH_PLAN_CACHE": "1"}}
    finally:
        subprocess.run([os.path.join(scripts, "stop.sh"), state], capture_output=True, timeout=300)


# ------------------------------------------------------------------ the order files start in
# `make test` spreads files over workers (pytest-xdist, --dist loadfile): a file's tests stay on one
# worker, so its module fixtures (a cluster, a built model) are made once. Files start heaviest
# first (Slurm jobs, then several ranks, then slow ones) so the long files do not start last.
_WEIGHT = {"slurm": 0, "multirank": 1, "slow": 2}


def pytest_collection_modifyitems(config, items):
    weight: dict[str, int] = {}
    for item in items:
        marks = [_WEIGHT[m.name] for m in item.iter_markers() if m.name in _WEIGHT]
        path = str(item.path)
        weight[path] = min([weight.get(path, 3), *marks])
    items.sort(key=lambda item: weight[str(item.path)])
