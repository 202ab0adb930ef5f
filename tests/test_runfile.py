"""The run-file loader: schema types, ranges, unknown keys, overrides, YAML pitfalls, locations."""
from __future__ import annotations

import dataclasses
import re
import textwrap

import pytest

from launcher.config import runfile, yaml_reader
from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError, Problem, did_you_mean

BASE = """\
name: t
model:
  path: model
data:
  path: train.jsonl
  max_seq_len: 64
train:
  max_steps: 10
"""


def with_sections(extra: str) -> str:
    """BASE with its top-level sections replaced by those written in extra."""
    extra = textwrap.dedent(extra)
    given = set(re.findall(r"^([A-Za-z_][\w-]*):", extra, re.M))
    kept = [block for block in re.split(r"(?m)^(?=\S)", BASE)
            if block and block.split(":")[0] not in given]
    return "".join(kept) + extra


@pytest.fixture
def run(tmp_path, fake_model):
    """run(extra_yaml, *overrides) -> (config or None, problems) for BASE with extra's sections."""
    def _run(extra: str = "", *overrides: str, text: str | None = None):
        body = text if text is not None else with_sections(extra)
        path = tmp_path / "run.yaml"
        path.write_text(body)
        cfg, problems = runfile.parse(body, overrides, source="run.yaml", base_dir=str(tmp_path))
        return cfg, problems
    return _run


def by_key(problems: list[Problem]) -> dict[str, Problem]:
    return {p.key: p for p in problems}


def line_of(text: str, needle: str) -> int:
    return next(i + 1 for i, line in enumerate(text.splitlines()) if needle in line)


# ------------------------------------------------------------------ valid files
def test_minimal_file_loads_with_defaults_and_absolute_paths(run, tmp_path):
    cfg, problems = run()
    assert problems == []
    assert isinstance(cfg, RunConfig)
    assert cfg.model.path == str(tmp_path / "model")
    assert cfg.data.path == str(tmp_path / "train.jsonl")
    assert cfg.train.lr == 2.0e-5 and cfg.deepspeed.zero_stage == 2 and cfg.cluster.time == "24:00:00"


def test_load_reads_the_file_and_resolves_against_its_folder(tmp_path, fake_model, monkeypatch):
    (tmp_path / "run.yaml").write_text(BASE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = runfile.load(str(tmp_path / "run.yaml"))
    assert cfg.model.path == str(tmp_path / "model")


def test_relative_paths_from_overrides_resolve_against_the_working_directory(tmp_path, fake_model,
                                                                             monkeypatch):
    (tmp_path / "run.yaml").write_text(BASE)
    cwd = tmp_path / "cwd"
    (cwd / "data").mkdir(parents=True)
    (cwd / "data" / "other.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(cwd)
    cfg = runfile.load(str(tmp_path / "run.yaml"), ["data.path=data/other.jsonl",
                                                    "output.dir=out"])
    assert cfg.data.path == str(cwd / "data" / "other.jsonl")   # override: the working directory
    assert cfg.model.path == str(tmp_path / "model")            # file: the file's folder
    assert cfg.output.dir == str(cwd / "out")
    assert cfg.run_dir == str(cwd / "out")


def test_default_run_dir_is_runs_name_in_the_working_directory(tmp_path, fake_model, monkeypatch):
    (tmp_path / "run.yaml").write_text(BASE)
    monkeypatch.chdir(tmp_path / "model")
    assert runfile.load(str(tmp_path / "run.yaml")).run_dir == str(tmp_path / "model" / "runs" / "t")


def test_home_in_paths_is_expanded(run, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, problems = run("", "model.path=~/model")
    assert problems == [] and cfg.model.path == str(tmp_path / "model")


def test_dump_then_parse_gives_the_same_config(run):
    cfg, _ = run("""\
        cluster: {nodes: 2, gpus_per_node: 4, time: "2-00:00:00", env: {A: "1"}}
        freeze: {policy: lora, lora: {r: 4, target_modules: [q_proj, v_proj]}}
        deepspeed: {zero_stage: 3, overrides: {zero_optimization: {reduce_bucket_size: 1000}}}
        """)
    assert cfg is not None
    again, problems = runfile.parse(runfile.dump(cfg))
    assert problems == [] and again == cfg


def test_empty_optional_section_means_its_defaults(run):
    cfg, problems = run("quantization:\nfreeze:\n")
    assert problems == []
    assert cfg.quantization.mode == "none" and cfg.freeze.policy == "full"


# ------------------------------------------------------------------ unknown keys
def test_unknown_key_is_rejected_with_did_you_mean_and_its_line(run):
    text = BASE.replace("  max_steps: 10", "  max_steps: 10\n  lrr: 1.0e-4")
    _, problems = run(text=text)
    p = by_key(problems)["train.lrr"]
    assert p.message == "unknown key"
    assert p.fix == "did you mean 'lr'?"
    assert p.where == f"run.yaml:{line_of(text, 'lrr')}"


def test_unknown_key_without_a_close_match_lists_the_section_keys(run):
    _, problems = run("quantization: {zzz: 1}\n")
    p = by_key(problems)["quantization.zzz"]
    assert "quantization takes: mode, int8_threshold" in p.fix


def test_misspelt_section_is_reported_with_the_missing_one(run):
    text = BASE.replace("train:", "trian:")
    _, problems = run(text=text)
    keys = by_key(problems)
    assert keys["trian"].fix == "did you mean 'train'?"
    assert keys["train"].message == "required key is missing"


def test_did_you_mean_ignores_case():
    assert did_you_mean("BF16", ["bf16", "fp16"]) == "did you mean 'bf16'?"
    assert did_you_mean("xyz", ["bf16"]) == ""


# ------------------------------------------------------------------ types and ranges
@pytest.mark.parametrize("extra, key, message", [
    ("train: {max_steps: ten}", "train.max_steps", "expected an integer, got 'ten'"),
    ("train: {max_steps: 10, lr: fast}", "train.lr", "expected a number, got 'fast'"),
    ("train: {max_steps: 10, lr: 0}", "train.lr", "must be > 0, got 0"),
    ("train: {max_steps: 10, lr: .nan}", "train.lr", "expected a finite number"),
    ("train: {max_steps: 10, weight_decay: .inf}", "train.weight_decay", "expected a finite number"),
    ("train: {max_steps: 0}", "train.max_steps", "must be >= 1, got 0"),
    ("train: {max_steps: 1.5}", "train.max_steps", "expected an integer, got 1.5"),
    ("train: {max_steps: true}", "train.max_steps", "expected an integer, got True"),
    ("model: {path: model, gradient_checkpointing: maybe}", "model.gradient_checkpointing",
     "expected true or false, got 'maybe'"),
    ("model: {path: model, dtype: bfloat16}", "model.dtype", "'bfloat16' is not one of 'bf16'"),
    ("deepspeed: {zero_stage: 4}", "deepspeed.zero_stage", "4 is not one of 0, 1, 2, 3"),
    ("deepspeed: {zero_stage: true}", "deepspeed.zero_stage", "True is not one of 0, 1, 2, 3"),
    ("freeze: {policy: last_layers, also_train: lm_head}", "freeze.also_train",
     "expected a list of one of 'embeddings'"),
    ("freeze: {policy: lora, lora: {dropout: 1}}", "freeze.lora.dropout", "must be < 1, got 1"),
    ("cluster: {time: tomorrow}", "cluster.time", "'tomorrow' does not match the expected form"),
    ("cluster: {env: {A: [1]}}", "cluster.env.A", "expected a string, got a list"),
    ("cluster: {env: {A: null}}", "cluster.env.A", "expected a string, got null"),
    ("cluster: 3", "cluster", "expected a mapping (section), got 3"),
    ("name: 'bad name!'", "name", "does not match the expected form"),
    ("data: {path: '', max_seq_len: 64}", "data.path", "empty path"),
])
def test_wrong_types_and_ranges_are_rejected(run, extra, key, message):
    _, problems = run(extra)
    assert key in by_key(problems), problems
    assert message in by_key(problems)[key].message


def test_list_items_are_reported_by_index(run):
    _, problems = run("freeze: {policy: last_layers, also_train: [lm_head, heads, norms]}\n")
    p = by_key(problems)["freeze.also_train[1]"]
    assert "'heads' is not one of" in p.message and p.fix == "did you mean 'lm_head'?"


def test_whole_numbers_written_as_floats_are_integers(run):
    cfg, problems = run("train: {max_steps: 1e3, micro_batch_size: 2.0}\ndeepspeed: {zero_stage: 3.0}\n")
    assert problems == []
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.deepspeed.zero_stage == 3 and isinstance(cfg.deepspeed.zero_stage, int)
    assert cfg.train.micro_batch_size == 2


def test_every_problem_is_reported_at_once_with_its_line(run):
    text = textwrap.dedent("""\
        name: t
        model:
          path: model
          dtype: bf17
        data:
          path: train.jsonl
          max_seq_len: 4
        train:
          max_steps: 10
          lr: -1
          warmup: 3
        deepspeed:
          zero_stage: 7
        cluster:
          nodes: 0
        """)
    _, problems = run(text=text)
    got = {p.key: p.where for p in problems}
    assert got == {
        "model.dtype": f"run.yaml:{line_of(text, 'bf17')}",
        "data.max_seq_len": f"run.yaml:{line_of(text, 'max_seq_len')}",
        "train.lr": f"run.yaml:{line_of(text, 'lr: -1')}",
        "train.warmup": f"run.yaml:{line_of(text, 'warmup')}",
        "deepspeed.zero_stage": f"run.yaml:{line_of(text, 'zero_stage')}",
        "cluster.nodes": f"run.yaml:{line_of(text, 'nodes')}",
    }
    with pytest.raises(ConfigError, match=r"run.yaml: 6 problems") as exc:
        raise ConfigError(problems, "run.yaml")
    assert "model.dtype (run.yaml:4): 'bf17' is not one of" in str(exc.value)


def test_every_missing_required_key_is_reported(run):
    _, problems = run(text="name: t\nmodel: {dtype: fp32}\ndata: {max_seq_len: 4}\n")
    assert {p.key for p in problems} == {"model.path", "data.max_seq_len", "train"}  # data.path: or data.mix


def test_empty_file_reports_the_required_keys(run):
    _, problems = run(text="")
    assert {p.key for p in problems} == {"name", "model", "data", "train"}
    assert all(p.where == "run.yaml" for p in problems)


# ------------------------------------------------------------------ overrides
def test_override_values_are_typed_by_the_schema(run):
    cfg, problems = run("", "train.lr=1e-4", "deepspeed.zero_stage=3", "freeze.policy=last_layers",
                        "freeze.also_train=[lm_head, norms]", "model.gradient_checkpointing=true")
    assert problems == []
    assert cfg.train.lr == 1e-4 and cfg.deepspeed.zero_stage == 3
    assert cfg.freeze.also_train == ["lm_head", "norms"] and cfg.model.gradient_checkpointing is True


def test_override_splits_on_the_first_equals_only(run):
    cfg, problems = run("", "cluster.env.NCCL_OPTS=a=b=c", "cluster.setup=[export X=1]")
    assert problems == []
    assert cfg.cluster.env == {"NCCL_OPTS": "a=b=c"}
    assert cfg.cluster.setup == ["export X=1"]


def test_override_wins_over_the_file_and_creates_sections(run):
    cfg, problems = run("train: {max_steps: 10, lr: 1.0e-3}\n", "train.lr=5e-4", "quantization.mode=4bit",
                        "freeze.policy=lora")
    assert problems == [] and cfg.train.lr == 5e-4 and cfg.quantization.mode == "4bit"


@pytest.mark.parametrize("override, key, message", [
    ("train.lr", "<override>", "an override must be key.sub=value"),
    ("=3", "<override>", "empty key in override"),
    ("train..lr=3", "<override>", "empty key in override 'train..lr'"),
    ("train.lrr=3", "train.lrr", "unknown key"),
    ("train.lr=abc", "train.lr", "expected a number, got 'abc'"),
    ("model=foo", "model", "expected a mapping (section), got 'foo'"),
])
def test_bad_overrides_are_reported_with_the_override(run, override, key, message):
    _, problems = run("", override)
    p = by_key(problems)[key]
    assert message in p.message
    assert p.where == f"override '{override}'"


def test_a_long_override_is_shortened_in_the_location(run):
    value = "[" + ", ".join(["lm_head"] * 20) + ", heads]"
    _, problems = run("freeze: {policy: last_layers}\n", f"freeze.also_train={value}")
    assert by_key(problems)["freeze.also_train[20]"].where == "override 'freeze.also_train=...'"


def test_override_of_an_unknown_key_suggests_the_right_one(run):
    _, problems = run("", "deepspeed.zero_stgae=3")
    assert by_key(problems)["deepspeed.zero_stgae"].fix == "did you mean 'zero_stage'?"


# ------------------------------------------------------------------ YAML pitfalls
def test_time_stays_the_string_it_was_written_as(run):
    cfg, problems = run("cluster: {time: 24:00:00}\n")
    assert problems == [] and cfg.cluster.time == "24:00:00"   # YAML 1.1 would read 86400
    cfg, problems = run("", "cluster.time=1:30:00")
    assert problems == [] and cfg.cluster.time == "1:30:00"


@pytest.mark.parametrize("written, value", [("2e-5", 2e-5), ("1.0e-4", 1e-4), ("3E-4", 3e-4),
                                            ("'2e-5'", 2e-5), ("5.0e-1", 0.5)])
def test_exponent_floats_are_floats(run, written, value):
    cfg, problems = run(f"train: {{max_steps: 10, lr: {written}}}\n")
    assert problems == [] and cfg.train.lr == value


def test_exponent_floats_inside_deepspeed_overrides_are_numbers(run):
    cfg, problems = run("deepspeed: {overrides: {zero_optimization: {reduce_bucket_size: 5e8}}}\n")
    assert problems == []
    assert cfg.deepspeed.overrides["zero_optimization"]["reduce_bucket_size"] == 5e8


def test_off_means_none_in_offload_fields(run):
    cfg, problems = run("deepspeed: {offload_optimizer: off, offload_param: no}\n")
    assert problems == [] and cfg.deepspeed.offload_optimizer == "none"
    assert cfg.deepspeed.offload_param == "none"


def test_yes_and_on_stay_strings_where_strings_are_expected(run):
    cfg, problems = run("cluster: {partition: on, env: {FLAG: yes}}\n")
    assert problems == [] and cfg.cluster.partition == "on" and cfg.cluster.env == {"FLAG": "yes"}


def test_duplicate_keys_are_reported_at_the_second_one(run):
    text = BASE + "train:\n  max_steps: 20\n"
    _, problems = run(text=text)
    p = by_key(problems)["train"]
    assert p.message == "key given twice (YAML would keep only the last)"
    assert p.where == f"run.yaml:{len(text.splitlines()) - 1}"


def test_nested_duplicate_keys_are_reported(run):
    _, problems = run("cluster:\n  nodes: 1\n  nodes: 2\n")
    assert by_key(problems)["cluster.nodes"].message.startswith("key given twice")


def test_merge_keys_work_and_an_explicit_key_may_override_a_merged_one(run):
    text = BASE.replace("train:\n  max_steps: 10\n",
                        "defaults: &base {max_steps: 10, lr: 1.0e-4}\n"
                        "train:\n  <<: *base\n  lr: 3.0e-4\n")
    cfg, problems = run(text=text)
    assert [p.key for p in problems] == ["defaults"]   # an unknown top-level key, nothing else
    assert cfg.train.max_steps == 10 and cfg.train.lr == 3.0e-4


def test_malformed_yaml_is_reported_with_its_line(run):
    text = BASE + "cluster:\n  nodes: [1, 2\n"
    cfg, problems = run(text=text)
    assert cfg is None and len(problems) == 1
    p = problems[0]
    assert p.key == "<file>" and p.message.startswith("not valid YAML")
    assert p.where.startswith("run.yaml:")
    assert int(p.where.split(":")[1]) >= len(BASE.splitlines()) + 1


def test_bad_indentation_is_reported_with_its_line(run):
    cfg, problems = run(text="name: t\nmodel:\n  path: m\n   dtype: bf16\n")
    assert cfg is None and problems[0].where == "run.yaml:4"


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "a list"), ("just text\n", "'just text'"),
                                       ("42\n", "42")])
def test_a_file_that_is_not_a_mapping_is_rejected(run, text, got):
    cfg, problems = run(text=text)
    assert cfg is None
    assert problems == [Problem("<file>", f"the run file must be a mapping, got {got}",
                                "start with `name: my-run` and the sections", "run.yaml")]


def test_unsafe_and_unreadable_tags_are_reported_at_their_key(run):
    _, problems = run("cluster: {partition: !!python/object:os.system x}\n")
    p = by_key(problems)["cluster.partition"]
    assert p.message.startswith("cannot read this value") and p.where.startswith("run.yaml:")


def test_recursive_aliases_are_refused(run):
    _, problems = run(text=BASE + "extra: &a [*a]\n")
    assert problems[0].message == "an alias refers to a value containing itself"


def test_alias_bombs_are_refused(run):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    _, problems = run(text="\n".join(lines) + "\n")
    assert problems[0].message.startswith(f"more than {yaml_reader.MAX_NODES} values")


def test_non_string_keys_are_rejected(run):
    _, problems = run("cluster: {env: {1: x}}\n")
    assert by_key(problems)["cluster.env.1"].message == "keys must be strings, got 1"


# ------------------------------------------------------------------ cross rules on what was read
def test_a_bad_field_does_not_feed_its_default_to_cross_field_rules(run):
    # micro_batch_size falls back to 1 after its own problem; with 1 the batch rule would
    # complain about numbers the user never wrote.
    _, problems = run("train: {max_steps: 10, micro_batch_size: four, grad_accum: 4, "
                      "global_batch_size: 64}\ncluster: {gpus_per_node: 4}\n")
    assert [p.key for p in problems] == ["train.micro_batch_size"]


def test_a_misspelt_key_does_not_feed_its_default_to_cross_field_rules(run):
    _, problems = run("deepspeed: {zero_stag: 3, offload_param: cpu}\n")
    assert [p.key for p in problems] == ["deepspeed.zero_stag"]


def test_cross_field_rules_still_run_beside_unrelated_field_problems(run):
    _, problems = run("model: {path: model, dtype: bf17}\ndeepspeed: {offload_param: cpu}\n")
    assert {p.key for p in problems} == {"model.dtype", "deepspeed.offload_param"}


# ------------------------------------------------------------------ files
def test_missing_run_file(tmp_path):
    with pytest.raises(ConfigError, match="no such run file"):
        runfile.load(str(tmp_path / "nope.yaml"))


def test_run_file_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the run file"):
        runfile.load(str(tmp_path))


def test_run_file_that_is_not_utf8(tmp_path):
    (tmp_path / "run.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read the run file"):
        runfile.load(str(tmp_path / "run.yaml"))


def test_load_raises_with_every_problem(tmp_path, fake_model):
    (tmp_path / "run.yaml").write_text(BASE + "cluster: {nodes: 0, gpus_per_node: 0}\n")
    with pytest.raises(ConfigError, match=r"2 problems") as exc:
        runfile.load(str(tmp_path / "run.yaml"))
    assert exc.value.keys == ["cluster.nodes", "cluster.gpus_per_node"]


# ------------------------------------------------------------------ the reference
def test_fields_reference_covers_every_field_with_a_doc():
    rows = list(runfile.fields_reference())
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys))

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            tp = runfile.type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from leaves(tp, key)
            else:
                yield key
    assert keys == list(leaves(RunConfig))
    assert all(doc.strip() for _, _, _, doc in rows)
    assert ("model.path", "a string", "(required)") == rows[keys.index("model.path")][:3]
    assert ("data.path", "a string or null", None) == rows[keys.index("data.path")][:3]
    assert ("train.max_steps", "an integer or null", None) == rows[keys.index("train.max_steps")][:3]
