"""Hostile input, generated: run files (YAML mappings with every field given hostile values, raw
text mutations) and CLI override lists. Every input must give either a RunConfig whose DeepSpeed
config builds, whose Slurm script renders and whose memory plan is made, or a ConfigError; never
another exception.

Deterministic for CI (derandomize=True): FUZZ_CASES examples in all (see docs/faults.md).
"""
from __future__ import annotations

import collections
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.dsconfig import build as ds_config
from launcher import memory
from launcher.config import runfile
from launcher.cluster import slurm
from launcher.config.errors import ConfigError

TREE_CASES, TEXT_CASES, OVERRIDE_CASES = 150, 60, 90
FUZZ_CASES = TREE_CASES + TEXT_CASES + OVERRIDE_CASES  # 300
def fast(n: int) -> settings:
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

KEYS = [k for k, *_ in runfile.fields_reference()]
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})
HOSTILE = ["", " ", "two words", "it's", 'say "hi"', "$(touch /tmp/ftl-pwned)", "`id`", "${HOME}",
           "a;b", "a && b", "*", "?[ab]", "~", "x#y", "-n", "--x", "é ü 中文 🚀", "100%",
           "back\\slash", "tab\there", "line1\nline2", "cr\rhere", "nul\x00byte", "\u202eRTL",
           "'\"'\"'", "!x", "../../etc/passwd", "/", "null", "yes", "1e400", "0x10", "-1"]
NUMBERS = [0, -1, -(2 ** 63), 2 ** 63, 10 ** 30, 1e308, -1e-308, float("inf"), float("-inf"),
           float("nan"), 0.5, -0.0, 7]

scalars = st.one_of(st.sampled_from(HOSTILE), st.sampled_from(NUMBERS), st.booleans(), st.none(),
                    st.text(max_size=12), st.integers(), st.floats(allow_nan=True))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid tree for a fake model (config.json only) and a one-row data file, and its folder."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 512}')
    (d / "train.jsonl").write_text('{"text": "hello"}\n')
    tree = {"name": "fuzz", "model": {"path": str(d / "model")},
            "data": {"path": str(d / "train.jsonl"), "max_seq_len": 64},
            "train": {"max_steps": 4}, "output": {"dir": str(d / "runs")}}
    return tree, d


def outcome(text: str, overrides, folder) -> str:
    """'ok' or 'config-error'; any other exception propagates and fails the test."""
    path = folder / "run.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        cfg = runfile.load(str(path), list(overrides))
        ds = ds_config.build(cfg)
        assert isinstance(ds, dict) and ds["train_batch_size"] >= 1
        script = slurm.render(slurm.build(cfg, workdir=str(folder), source=str(path)))
        assert script.startswith("#!") and "#SBATCH" in script
        plan = memory.plan_text(cfg)  # what `ftlaunch plan` prints
        assert "verdict:" in plan
    except ConfigError as exc:
        assert exc.problems and all(p.key and p.message for p in exc.problems)
        exc.render()  # the message itself must not fail
        return "config-error"
    return "ok"


def dump(tree) -> str:
    return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)


def set_key(tree: dict, key: str, value) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


DEFAULTS = [(k, d) for k, _, d, _ in runfile.fields_reference() if d != "(required)"]
SEEN: collections.Counter = collections.Counter()  # outcomes of test_hostile_values_in_any_field


@fast(TREE_CASES)
@given(edits=st.lists(st.one_of(
    st.tuples(st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS),
                        st.text(min_size=1, max_size=10)), values),
    st.sampled_from(DEFAULTS)),  # valid edits too, so both outcomes are reached
    min_size=1, max_size=4))
def test_hostile_values_in_any_field(base, edits):
    tree, folder = base
    tree = yaml.safe_load(dump(tree))  # a fresh copy
    for key, value in edits:
        set_key(tree, key, value)
    SEEN[outcome(dump(tree), [], folder)] += 1


@fast(TEXT_CASES)
@given(cut=st.integers(0, 400), junk=st.sampled_from(
    ["", ":", "- x\n", "  : :\n", "{", "]", "&a [*a]\n", "!!python/object:os.system x\n", "\t",
     "? [a]\n", "\ufeff", "%YAML 9.9\n", "---\n---\n", "*undefined\n", "name: [\n", "\x00", "'"]),
       prefix=st.text(max_size=20))
def test_malformed_yaml_text(base, cut, junk, prefix):
    tree, folder = base
    text = dump(tree)
    cut = min(cut, len(text))
    outcome(prefix + text[:cut] + junk + text[cut:], [], folder)


@fast(OVERRIDE_CASES)
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
              st.one_of(st.sampled_from(HOSTILE), st.text(max_size=15),
                        st.sampled_from(NUMBERS).map(str), st.integers().map(str))),
    st.text(max_size=20)), max_size=5))
def test_hostile_override_lists(base, overrides):
    tree, folder = base
    outcome(dump(tree), overrides, folder)


def test_the_generated_files_reach_both_outcomes(base):
    """Runs after the fuzz above (file order): valid and refused files were both generated."""
    if sum(SEEN.values()) < TREE_CASES:  # run on its own: generate the cases here
        test_hostile_values_in_any_field(base)
    assert SEEN["ok"] >= 10 and SEEN["config-error"] >= 10, dict(SEEN)


def test_the_base_file_is_valid(base):
    """The fuzz starts from a file that loads, builds and renders (so 'ok' is reachable)."""
    tree, folder = base
    assert outcome(dump(tree), [], folder) == "ok"
    assert outcome(dump(tree), ["train.max_steps=-1"], folder) == "config-error"


# ---------------------------------------------------------------- paths
def test_symlinked_model_and_data_paths_load(base, tmp_path):
    tree, folder = base
    os.symlink(folder / "model", tmp_path / "model-link")
    os.symlink(folder / "train.jsonl", tmp_path / "data-link.jsonl")
    tree = dict(tree, model={"path": str(tmp_path / "model-link")},
                data={"path": str(tmp_path / "data-link.jsonl"), "max_seq_len": 64})
    assert outcome(dump(tree), [], tmp_path) == "ok"


@pytest.mark.parametrize("which", ["missing", "dangling"])
def test_missing_and_dangling_model_paths_are_config_errors(base, tmp_path, which):
    tree, folder = base
    target = tmp_path / "model-link"
    if which == "dangling":
        os.symlink(tmp_path / "nowhere", target)
    tree = dict(tree, model={"path": str(target)})
    path = tmp_path / "run.yaml"
    path.write_text(dump(tree))
    with pytest.raises(ConfigError, match=r"model\.path .*no such folder"):
        runfile.load(str(path))


def test_the_docs_state_the_number_of_cases():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "faults.md"),
              encoding="utf-8") as fh:
        text = fh.read()
    assert f"{FUZZ_CASES} generated cases in all ({TREE_CASES} + {TEXT_CASES} + {OVERRIDE_CASES}" \
        in text.replace("\n  ", " ")
