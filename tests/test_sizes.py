"""One parser for memory sizes: `--gpu-memory` and the run file's `cluster.gpu_memory` (no torch)."""
from __future__ import annotations

import pytest

from launcher.config import runfile
from launcher.config.errors import ConfigError
from launcher.config.sizes import parse_size

GIB = 2**30
RUN = """\
name: t
model: {{path: model}}
data: {{path: train.jsonl, max_seq_len: 64}}
train: {{max_steps: 10}}
cluster: {{gpu_memory: {value}}}
"""


@pytest.mark.parametrize("text, size", [
    ("80GiB", 80 * GIB), ("80GB", 80 * 10**9), ("80G", 80 * GIB), ("80 GiB", 80 * GIB),
    (" 40 gb ", 40 * 10**9), ("81920MiB", 80 * GIB), ("81920 MB", 81920 * 10**6), ("1.5T", 1536 * GIB),
    ("1.5 TiB", 1536 * GIB), ("0.5G", GIB // 2), ("512K", 2**19), ("1024B", 1024),
    ("80", 80 * GIB), ("24.5", 24 * GIB + GIB // 2), (80, 80 * GIB),
])
def test_binary_units_gb_is_decimal_and_a_bare_number_is_gib(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, problem", [
    ("0", "must be more than 0 bytes, got '0'"),
    ("0GiB", "must be more than 0 bytes, got '0GiB'"),
    ("-40G", "must be more than 0 bytes, got '-40G'"),
    ("0.0001K", "must be more than 0 bytes"),
    ("lots", "not a memory size: 'lots'"),
    ("", "not a memory size: ''"),
    ("40 GiBs", "not a memory size: '40 GiBs'"),
    ("1e3G", "not a memory size: '1e3G'"),
    ("80 G B", "not a memory size"),
    ("85899345920", "a bare number is GiB: '85899345920' would be over 1 PiB"),
])
def test_bad_sizes_name_the_key_the_value_and_a_fix(text, problem):
    with pytest.raises(ConfigError, match="write a size such as 80GiB") as info:
        parse_size(text, "cluster.gpu_memory")
    (p,) = info.value.problems
    assert p.key == "cluster.gpu_memory"
    assert problem in p.message


def test_the_flag_is_reported_as_the_command_line():
    with pytest.raises(ConfigError, match=r"command line: 1 problem\n  --gpu-memory: not a memory"):
        parse_size("eighty")


@pytest.mark.parametrize("value", ["40G", "40GiB", "42.94967296 GB", "40", "40960MiB"])
def test_run_file_accepts_what_the_flag_accepts(value, tmp_path, fake_model):
    cfg, problems = runfile.parse(RUN.format(value=value), base_dir=str(tmp_path))
    assert problems == []
    assert parse_size(cfg.cluster.gpu_memory, "cluster.gpu_memory") == parse_size("40G") == 40 * GIB


@pytest.mark.parametrize("value, message", [
    ("0", "a memory size must be more than 0 bytes, got '0'"),
    ("-8G", "a memory size must be more than 0 bytes, got '-8G'"),
    ("forty", "not a memory size: 'forty'"),
])
def test_run_file_refuses_what_the_flag_refuses(value, message, tmp_path, fake_model):
    _, problems = runfile.parse(RUN.format(value=value), source="run.yaml", base_dir=str(tmp_path))
    (p,) = problems
    assert p.key == "cluster.gpu_memory" and p.where == "run.yaml:5"
    assert p.message == message
    assert p.fix.startswith("write a size such as 80GiB")


def test_override_is_checked_by_the_same_parser(tmp_path, fake_model):
    _, problems = runfile.parse(RUN.format(value="null"), ["cluster.gpu_memory=80 GB/s"],
                                base_dir=str(tmp_path))
    assert [(p.key, p.message) for p in problems] == [
        ("cluster.gpu_memory", "not a memory size: '80 GB/s'")]
