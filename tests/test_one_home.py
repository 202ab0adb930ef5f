"""Rules defined once: each has one definition, and a test that fails when a second one appears
(or when a user of the rule stops using the one definition)."""
from __future__ import annotations

import ast
import os

import pytest

from launcher import cli
from launcher.config import runfile, yaml_reader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "launcher")
BASE = ("name: t\nmodel: {path: /m}\ndata: {path: /d}\ntrain: {max_steps: 1}\n"
        "cluster: {setup: ['a', 'b']}\n")


def trees() -> dict[str, ast.Module]:
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path, encoding="utf-8") as fh:
                    out[os.path.relpath(path, PKG)] = ast.parse(fh.read())
    return out


def regex_literals(tree: ast.Module) -> list[str]:
    return [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ast.unparse(n.func) == "re.compile" and n.args
            and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)]


# ------------------------------------------------------------------ override keys
def setup_of(*overrides: str):
    cfg, problems = runfile.parse(BASE, overrides)
    return cfg.cluster.setup, [p for p in problems if p.key not in ("model.path", "data.path")]


def test_the_cli_recognises_overrides_with_the_readers_grammar():
    assert cli.OVERRIDE is yaml_reader.OVERRIDE_WORD
    owners = sorted(m for m, t in trees().items()
                    if any("[0-9]+" in r and "=" in r and "A-Za-z_" in r for r in regex_literals(t)))
    assert owners == [os.path.join("config", "yaml_reader.py")]


@pytest.mark.parametrize("word, setup", [
    ("cluster.setup[0]=echo hi", ["echo hi", "b"]),
    ("cluster.setup[1]=module load x", ["a", "module load x"]),
    ("cluster.setup[2]=c", ["a", "b", "c"]),          # one past the end appends
    ("cluster.setup=['x']", ["x"]),
])
def test_every_override_form_the_cli_accepts_is_applied_by_the_reader(word, setup):
    assert cli.OVERRIDE.match(word)
    args = cli.parse(["validate", "run.yaml", word])
    assert args.overrides == [word]
    got, problems = setup_of(*args.overrides)
    assert problems == [] and got == setup


def test_an_index_past_the_end_names_the_list_and_its_length():
    _, problems = setup_of("cluster.setup[5]=x")
    assert [(p.key, p.message) for p in problems] == [
        ("cluster.setup[5]", "no item 5 to set: cluster.setup has 2 item(s)")]
    assert "append at [2]" in problems[0].fix


def test_an_index_into_a_missing_item_says_to_set_the_item_whole():
    cfg, problems = runfile.parse(BASE, ["data.mix[0].path=/x"])
    mine = [p for p in problems if p.key == "data.mix[0].path"]
    assert [p.message for p in mine] == ["no item 0 to set: data.mix has 0 item(s)"]
    assert mine[0].fix == "set the whole item: data.mix[0]={...}"


def test_a_bad_index_is_reported_as_one():
    _, problems = setup_of("cluster.setup[x]=c")
    assert [(p.key, p.message) for p in problems] == [
        ("<override>", "bad list index in override 'cluster.setup[x]'")]


def test_an_override_of_a_list_item_is_located_at_that_item():
    _, problems = runfile.parse(BASE, ["cluster.setup[0]=echo\0"])
    located = [p for p in problems if p.key.startswith("cluster.setup")]
    assert located and all(p.where == "override 'cluster.setup[0]=echo\0'" for p in located)


@pytest.mark.parametrize("key, steps", [
    ("a.b", ["a", "b"]), ("a.b[0]", ["a", "b", 0]), ("a[1][2].c", ["a", 1, 2, "c"]),
    ("a..b", None), ("a[x]", None), ("[0]", None), ("a.b[0]x", None),
])
def test_key_steps(key, steps):
    assert yaml_reader.key_steps(key) == steps


# ------------------------------------------------------------------ data file formats
FORMAT_SPELLINGS = {".jsonl", ".ndjson", ".pq", ".parquet", ".gz", ".bz2", ".xz", ".zst", ".csv"}


def test_file_extensions_are_spelled_in_one_module():
    """The format a file name says, and its compression, are read by config/data_files.py alone."""
    owners = sorted({m for m, t in trees().items() for n in ast.walk(t)
                     if isinstance(n, ast.Constant) and n.value in FORMAT_SPELLINGS})
    assert owners == [os.path.join("config", "data_files.py")]


@pytest.mark.parametrize("name, fmt", [
    ("a.jsonl", "jsonl"), ("a.ndjson.gz", "jsonl"), ("A.JSON", "json"), ("a.csv.bz2", "csv"),
    ("a.parquet", "parquet"), ("a.pq", "parquet"), ("a.txt.xz", "text"), ("a.zst", None),
    ("a.gz", None), ("a.tsv", None)])
def test_the_checks_and_the_ranks_reader_agree_on_the_format(tmp_path, name, fmt):
    from launcher.checks import input_checks
    from launcher.config import data_files
    from launcher.config.errors import ConfigError
    from launcher.data import reading
    path = tmp_path / name
    path.write_bytes(b"")
    assert data_files.format_of(str(path)) == fmt
    assert input_checks.file_format(str(path), None) == fmt
    if fmt is None:
        with pytest.raises(ConfigError, match=r"cannot tell the format of .* from its extension"):
            reading.source_format(str(path), "data.path", None)
    else:
        assert reading.source_format(str(path), "data.path", None) == fmt


def test_the_step_estimate_reads_compressed_and_parquet_files(tmp_path):
    """The login node's row count (ds_config's step arithmetic) reads .gz and parquet like the
    ranks do, not as raw bytes."""
    import gzip
    import json

    from launcher.config import epochs
    rows = [{"text": f"row {i}"} for i in range(7)]
    plain = tmp_path / "d.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(plain.read_text())
    assert epochs.row_count(str(plain), None)[0] == 7
    assert epochs.row_count(str(gz), None) == epochs.row_count(str(plain), None)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "d.parquet")
    assert epochs.row_count(str(tmp_path / "d.parquet"), None)[0] == 7


# ------------------------------------------------------------------ cache root, atomic writes
def test_the_cache_root_and_its_variable_are_spelled_once():
    spelled = {"FTLAUNCH_CACHE", "XDG_CACHE_HOME", ".cache", "~/.cache"}
    owners = sorted({m for m, t in trees().items() for n in ast.walk(t)
                     if isinstance(n, ast.Constant) and n.value in spelled})
    assert owners == [os.path.join("common", "files.py")]


def test_every_cache_lives_under_the_one_root(monkeypatch, tmp_path):
    from launcher.checks import loaded_names
    from launcher.common import files
    from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
    from launcher.data import cache
    from launcher.memory import probe
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    cfg = RunConfig(name="t", model=ModelConfig(path="/m"), data=DataConfig(path="/d"),
                    train=TrainConfig(max_steps=1))
    assert files.cache_root() == str(tmp_path)
    assert cache.cache_root(cfg) == str(tmp_path / "data")
    assert probe.cache_file() == str(tmp_path / "runtime-probe.json")
    assert loaded_names.cache_file() == str(tmp_path / "conversion-rules.json")
    monkeypatch.delenv(files.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_root() == str(tmp_path / "xdg" / "ftlaunch")


def test_files_are_replaced_through_write_atomic_only():
    """A file is written to a temporary name and renamed by common/files.py's write_atomic alone;
    data/cache.py renames a whole folder it published (another operation)."""
    callers = sorted({m for m, t in trees().items() for n in ast.walk(t)
                      if isinstance(n, ast.Call) and ast.unparse(n.func) in ("os.replace",
                                                                             "tempfile.mkstemp")})
    assert callers == [os.path.join("common", "files.py"), os.path.join("data", "cache.py")]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    from launcher.common.files import write_atomic
    target = tmp_path / "f.json"
    write_atomic(str(target), "old")
    with pytest.raises(TypeError, match=r"write\(\) argument must be str"):
        write_atomic(str(target), b"new")  # type: ignore[arg-type]
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.json"]


# ------------------------------------------------------------------ run directory, device, version
def test_the_default_run_directory_is_decided_by_the_schema_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = runfile.parse("name: demo\nmodel: {path: /m}\ndata: {path: /d}\ntrain: {max_steps: 1}\n")
    assert cfg.output.dir == cfg.run_dir == str(tmp_path / "runs" / "demo")
    joins = sorted({m for m, t in trees().items() for n in ast.walk(t) if isinstance(n, ast.Call)
                    and ast.unparse(n.func) == "os.path.join"
                    and any(isinstance(a, ast.Constant) and a.value == "runs" for a in n.args)})
    assert joins == [os.path.join("config", "schema.py")]


def test_auto_means_cuda_for_a_job_in_one_place():
    """The login node's reading of train.device (auto -> cuda on the job's nodes) is
    model/device.py's job_device; no other module spells "cpu" if ... else "cuda"."""
    from launcher.model import device
    from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig

    def cfg(dev):
        return RunConfig(name="t", model=ModelConfig(path="/m"), data=DataConfig(path="/d"),
                         train=TrainConfig(max_steps=1, device=dev))
    assert [device.job_device(cfg(d)) for d in ("auto", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]
    spelled = sorted({m for m, t in trees().items() for n in ast.walk(t) if isinstance(n, ast.IfExp)
                      and {getattr(n.body, "value", None), getattr(n.orelse, "value", None)}
                      == {"cpu", "cuda"}})
    assert spelled == [os.path.join("model", "device.py")]
    compared = sorted({m for m, t in trees().items() for n in ast.walk(t)
                       if isinstance(n, ast.Compare)
                       and ast.unparse(n).endswith(("train.device != 'cpu'", "t.device != 'cpu'"))})
    assert compared == []


def test_the_version_is_written_in_one_file():
    import importlib.metadata
    import tomllib

    import launcher
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "launcher.__version__"}
    assert importlib.metadata.version("ftlaunch") == launcher.__version__


def test_a_job_made_by_hand_takes_the_run_files_cluster_defaults():
    import dataclasses

    from launcher.cluster import slurm
    from launcher.config.schema import ClusterConfig
    cluster = ClusterConfig()
    shared = [f for f in dataclasses.fields(slurm.Job) if hasattr(cluster, f.name)
              and f.default is not dataclasses.MISSING
              and isinstance(getattr(cluster, f.name), (str, int, bool))]
    assert {f.name for f in shared} >= {"launcher", "python", "requeue", "max_restarts", "preflight"}
    assert all(f.default == getattr(cluster, f.name) for f in shared)
    job_class = next(n for n in ast.walk(trees()[os.path.join("cluster", "slurm.py")])
                     if isinstance(n, ast.ClassDef) and n.name == "Job")
    literal = [n.target.id for n in job_class.body if isinstance(n, ast.AnnAssign)
               and n.target.id in {f.name for f in shared} and isinstance(n.value, ast.Constant)]
    assert literal == []
