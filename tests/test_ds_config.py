"""DeepSpeed configs: every preset, every ZeRO x offload x precision x optimizer combination and
random run files, all parsed by DeepSpeed's own `DeepSpeedConfig`; the key tables kept equal to
DeepSpeed's config models.

World size: `DeepSpeedConfig` checks train_batch_size == micro x accum x world size, and takes
the world size from `deepspeed.comm.get_world_size()` only after `deepspeed.comm.get_rank()`
succeeds; without a process group both raise, it falls back to world size 1 and an `mpu`
argument is never consulted (deepspeed/runtime/config.py, DeepSpeedConfig.__init__). So these
tests set both functions to answer for the world the config was built for (`world(n)` below);
`test_deepspeed_checks_the_batch_against_the_world_size` shows that the check is then real.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import enum
import glob
import itertools
import json
import math
import os
import pathlib
import re
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.dsconfig import build as ds_config
from launcher import reference
from launcher.config import runfile
from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))

deepspeed = pytest.importorskip("deepspeed")  # the test extra installs it; the login node need not


@contextlib.contextmanager
def world(n: int):
    """Make DeepSpeedConfig see a world of n ranks (see the module docstring)."""
    import deepspeed.comm as dist
    saved = dist.get_rank, dist.get_world_size
    dist.get_rank = lambda group=None: 0
    dist.get_world_size = lambda group=None: n
    try:
        yield
    finally:
        dist.get_rank, dist.get_world_size = saved


def deepspeed_parse(d: dict, n: int):
    from deepspeed.runtime.config import DeepSpeedConfig
    with world(n):
        parsed = DeepSpeedConfig(copy.deepcopy(d))
    # under sequence parallelism DeepSpeed's world size is the data-parallel one: n / SP ranks
    assert parsed.world_size == n / d.get("sequence_parallel_size", 1)
    return parsed


BASE = """\
name: t
model: {path: model}
data: {path: train.jsonl, max_seq_len: 64}
train: {max_steps: 20, micro_batch_size: 2, global_batch_size: 64, warmup_steps: 3}
cluster: {nodes: 2, gpus_per_node: 4}
"""


@pytest.fixture
def parse(tmp_path, fake_model):
    def _parse(*overrides: str, text: str = BASE):
        return runfile.parse(text, overrides, source="run.yaml", base_dir=str(tmp_path))
    return _parse


# ------------------------------------------------------------------ presets (globbed)
@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_preset_holds_only_known_tuning_keys(path):
    with open(path, encoding="utf-8") as fh:
        preset = json.load(fh)
    assert isinstance(preset, dict)
    assert list(ds_config.find_auto(preset)) == []
    problems = list(ds_config.key_problems(preset, ""))
    assert problems == [], "presets hold tuning knobs only (no launcher-filled, unknown or badly typed keys)"


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_preset_builds_a_config_deepspeed_accepts(parse, path):
    name = os.path.basename(path)[:-5]
    stage = int(re.match(r"zero(\d)", name).group(1))
    overrides = [f"deepspeed.preset={name}", f"deepspeed.zero_stage={stage}"]
    if "offload" in name:
        overrides.append("deepspeed.offload_optimizer=cpu")
        if stage == 3:
            overrides.append("deepspeed.offload_param=cpu")
    cfg, problems = parse(*overrides)
    assert problems == []
    built = ds_config.build(cfg)
    with open(path, encoding="utf-8") as fh:
        for key, value in ds_config.normalise(json.load(fh)).get("zero_optimization", {}).items():
            assert built["zero_optimization"][key] == value  # the preset's knobs survive
    parsed = deepspeed_parse(built, cfg.world_size)
    assert parsed.zero_optimization_stage == stage


def test_the_preset_is_chosen_from_stage_and_offload(parse):
    for overrides, name in ((["deepspeed.zero_stage=0"], "zero0"), ([], "zero2"),
                            (["deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu"], "zero1"),
                            (["deepspeed.offload_optimizer=cpu"], "zero2_offload"),
                            (["deepspeed.zero_stage=3", "deepspeed.offload_param=cpu"], "zero3_offload")):
        cfg, problems = parse(*overrides)
        assert problems == [] and ds_config.preset_name(cfg) == name
        assert name in ds_config.presets()


def test_an_unknown_preset_is_refused_with_the_list(parse):
    _, problems = parse("deepspeed.preset=zero2_ofload")
    (p,) = problems
    assert p.key == "deepspeed.preset" and p.fix == "did you mean 'zero2_offload'?"


def test_a_preset_with_auto_fails_the_build(parse, tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "zero2.json").write_text('{"zero_optimization": {"reduce_bucket_size": "auto"}}')
    monkeypatch.setattr(ds_config, "PRESET_DIR", str(folder))
    cfg, problems = parse()
    assert problems == []
    with pytest.raises(ValueError, match=r'"auto" left in the DeepSpeed config at: '
                                         r'zero_optimization.reduce_bucket_size'):
        ds_config.build(cfg)


def test_ds_configs_readme_lists_the_filled_keys():
    with open(reference.DS_README, encoding="utf-8") as fh:
        text = fh.read()
    assert reference.render(reference.DS_README, text) == text, \
        f"ds_configs/README.md is out of date: run `{reference.COMMAND}`"
    for key in ds_config.FILLED:
        assert f"| `{key}` |" in text


# ------------------------------------------------------------------ every combination
STAGES = (0, 1, 2, 3)
OFFLOAD = ("none", "cpu", "nvme")
DTYPES = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def expected_refusals(stage, opt_off, param_off, optimizer) -> set[str]:
    """The keys the rules must refuse, written independently of launcher/checks/validate.py."""
    keys = set()
    if param_off != "none" and stage != 3:
        keys.add("deepspeed.offload_param")
    if opt_off != "none" and stage == 0:
        keys.add("deepspeed.offload_optimizer")
    if opt_off == "nvme" and stage in (1, 2):
        keys.add("deepspeed.offload_optimizer")
    if opt_off != "none" and optimizer != "adamw":
        keys.add("train.optimizer")
    return keys


@pytest.mark.parametrize("stage", STAGES)
def test_every_offload_precision_optimizer_combination(parse, tmp_path, stage):
    accepted = 0
    for opt_off, param_off, dtype, optimizer in itertools.product(OFFLOAD, OFFLOAD, DTYPES, OPTIMIZERS):
        cfg, problems = parse(f"deepspeed.zero_stage={stage}", f"deepspeed.offload_optimizer={opt_off}",
                              f"deepspeed.offload_param={param_off}", f"deepspeed.nvme_path={tmp_path}",
                              f"model.dtype={dtype}", f"train.optimizer={optimizer}")
        combo = (stage, opt_off, param_off, dtype, optimizer)
        assert {p.key for p in problems} == expected_refusals(stage, opt_off, param_off, optimizer), combo
        if problems:
            continue
        built = ds_config.build(cfg)
        assert list(ds_config.find_auto(built)) == []
        parsed = deepspeed_parse(built, cfg.world_size)
        z = parsed.zero_config
        assert (z.stage, parsed.train_batch_size, parsed.gradient_accumulation_steps) == (stage, 64, 4)
        assert (z.offload_optimizer.device if z.offload_optimizer else "none") == opt_off, combo
        assert (z.offload_param.device if z.offload_param else "none") == param_off, combo
        if "nvme" in (opt_off, param_off):
            assert str(tmp_path) in json.dumps(built["zero_optimization"])
        assert (parsed.bfloat16_config.enabled, parsed.float16_config.enabled) == \
            (dtype == "bf16", dtype == "fp16")
        assert parsed.optimizer_name == ("adamw" if optimizer == "adamw" else None)
        assert parsed.zero_allow_untested_optimizer == (optimizer != "adamw")
        accepted += 1
    assert accepted == sum(1 for o, p, _, opt in itertools.product(OFFLOAD, OFFLOAD, DTYPES, OPTIMIZERS)
                           if not expected_refusals(stage, o, p, opt)) > 0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cpu_ranks_get_torch_adam_unless_the_optimizer_is_offloaded(parse, dtype):
    cfg, problems = parse("train.device=cpu", f"model.dtype={dtype}")
    assert problems == []
    assert ds_config.build(cfg)["optimizer"]["params"]["torch_adam"] is True
    cfg, problems = parse("train.device=cpu", "deepspeed.offload_optimizer=cpu")
    assert problems == [] and "torch_adam" not in ds_config.build(cfg)["optimizer"]["params"]
    assert "torch_adam" not in ds_config.build(cfg, device="cuda")["optimizer"]["params"]
    assert ds_config.build(parse()[0], device="cpu")["optimizer"]["params"]["torch_adam"] is True


def test_deepspeed_checks_the_batch_against_the_world_size(parse):
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg, problems = parse()
    assert problems == [] and cfg.world_size == 8
    built = ds_config.build(cfg)
    assert deepspeed_parse(built, 8).train_batch_size == 64
    with pytest.raises(AssertionError, match=r"Check batch related parameters.*64 != 2 \* 4 \* 4"):
        deepspeed_parse(built, 4)
    with pytest.raises(AssertionError, match=r"64 != 2 \* 4 \* 1"):
        DeepSpeedConfig(copy.deepcopy(built))  # no process group: DeepSpeed assumes one rank


def test_build_for_another_world_size(parse):
    cfg, _ = parse("train.global_batch_size=null", "train.grad_accum=3")
    built = ds_config.build(cfg, world_size=5)
    assert (built["train_batch_size"], built["gradient_accumulation_steps"]) == (30, 3)
    assert deepspeed_parse(built, 5).train_micro_batch_size_per_gpu == 2
    cfg, _ = parse()
    with pytest.raises(ConfigError, match=r"global_batch_size 64 is not a multiple of "
                                          r"micro_batch_size x world size = 2 x 3 = 6") as exc:
        ds_config.build(cfg, world_size=3)
    assert "global_batch_size: 60 (grad_accum 10)" in exc.value.problems[0].fix


# ------------------------------------------------------------------ optimizer and scheduler
def expected_lr(scheduler: str, step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """DeepSpeed's learning rate at optimizer step `step` (1-based), as docs/config.md states it:
    step 1 runs at the value set when the scheduler is built (0), step k >= 2 at scheduler
    iteration k - 2; warmup lasts W = max(2, warmup_steps) iterations."""
    i = step - 2
    w = max(2, warmup)
    if i < 0:
        return 0.0
    if i < w:
        return peak * i / w
    if scheduler == "constant":
        return peak
    if scheduler == "linear":
        return peak * max(0.0, (total - i) / max(1.0, total - w))
    progress = min(1.0, (i - w + 1) / max(1, total - w))
    return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_scheduler_params_build_deepspeeds_scheduler_with_the_documented_curve(parse, scheduler, warmup):
    import torch
    from deepspeed.runtime import lr_schedules
    floor = 0.1 if scheduler == "cosine" else 0.0
    cfg, problems = parse(f"train.scheduler={scheduler}", "train.lr=1e-3", "train.device=cpu",
                          f"train.min_lr_ratio={floor}", f"train.warmup_steps={warmup}")
    assert problems == []
    built = ds_config.build(cfg)
    params = {k: v for k, v in built["optimizer"]["params"].items() if k != "torch_adam"}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], **params)
    sched = getattr(lr_schedules, built["scheduler"]["type"])(optimizer, **built["scheduler"]["params"])
    for step in range(1, cfg.train.max_steps + 1):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            expected_lr(scheduler, step, 1e-3, warmup, cfg.train.max_steps, floor), abs=1e-12), step
        optimizer.step()
        sched.step()
    peak_step = max(2, warmup) + 2
    if scheduler != "cosine":
        assert expected_lr(scheduler, peak_step, 1e-3, warmup, 20, floor) == pytest.approx(1e-3)
    assert expected_lr(scheduler, 1, 1e-3, warmup, 20, floor) == 0.0


# ------------------------------------------------------------------ overrides
def test_overrides_are_merged_last_normalised_and_typed(parse):
    cfg, problems = parse("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                          "deepspeed.overrides={zero_optimization: {prefetch_bucket_size: 1e6, "
                          "reduce_bucket_size: 5.0e+7, offload_optimizer: {pin_memory: false}}, "
                          "steps_per_print: 10, bfloat16: {check_grad_overflow: false}, "
                          "gradient_allreduce_op: MEAN}")
    assert problems == []
    built = ds_config.build(cfg)
    z = built["zero_optimization"]
    assert z["stage3_prefetch_bucket_size"] == 1000000 and "prefetch_bucket_size" not in z
    assert isinstance(z["reduce_bucket_size"], int) and z["reduce_bucket_size"] == 50_000_000
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert built["steps_per_print"] == 10 and built["gradient_allreduce_op"] == "mean"
    assert built["bf16"] == {"enabled": True, "check_grad_overflow": False} and "bfloat16" not in built
    parsed = deepspeed_parse(built, cfg.world_size)
    assert parsed.zero_config.prefetch_bucket_size == 1000000
    assert parsed.zero_config.offload_optimizer.pin_memory is False
    assert list(built)[:3] == ["train_batch_size", "train_micro_batch_size_per_gpu",
                               "gradient_accumulation_steps"]
    assert list(z)[0] == "stage"


@pytest.mark.parametrize("override, key, message", [
    ("{train_batch_size: 8}", "train_batch_size", "set by the launcher from train.global_batch_size"),
    ("{optimizer: {type: Adam}}", "optimizer", "set by the launcher from train.optimizer"),
    ("{zero_optimization: {stage: 3}}", "zero_optimization.stage", "set by the launcher from "
     "deepspeed.zero_stage"),
    ("{zero_optimization: {offload_param: {device: cpu}}}", "zero_optimization.offload_param.device",
     "set by the launcher from deepspeed.offload_param"),
    ("{zero_optimization: {reduce_bucket_size: auto}}", "zero_optimization.reduce_bucket_size",
     '"auto" is not resolved by DeepSpeed'),
    ("{zero_optimization: {reduce_bucket_size: 0}}", "zero_optimization.reduce_bucket_size",
     "must be > 0, got 0"),
    ("{zero_optimization: {overlap_comm: yes please}}", "zero_optimization.overlap_comm",
     "expected true or false, got 'yes please'"),
    ("{zero_optimization: {sub_group_size: 1.5}}", "zero_optimization.sub_group_size",
     "expected an integer, got 1.5"),
    ("{zero_optimization: {reduce_bucket_sise: 5}}", "zero_optimization.reduce_bucket_sise",
     "not a zero_optimization key"),
    ("{zero_optimization: {cpu_offload: true}}", "zero_optimization.cpu_offload",
     "deprecated in DeepSpeed; use offload_optimizer"),
    ("{zero_optimization: {mics_shard_size: 2}}", "zero_optimization.mics_shard_size",
     "removed from DeepSpeed"),
    ("{zero_optimization: 3}", "zero_optimization", "expected a mapping, got 3"),
    ("{amp: {enabled: true}}", "amp", "removed from DeepSpeed"),
    ("{sequence_parallel_size: 2}", "sequence_parallel_size", "sequence parallelism changes"),
    ("{fp16: true}", "fp16", "expected a mapping, got True"),
    ("{fp16: {loss_scale: -1}}", "fp16.loss_scale", "must be >= 0, got -1"),
    ("{bf16: {enable: true}}", "bf16.enable", "not a bf16 key"),
    ("{gradient_allreduce_op: max}", "gradient_allreduce_op", "'max' is not one of mean, sum"),
    ("{tensorboard: true}", "tensorboard", "expected a mapping, got True"),
    ("{seed: 1}", "seed", "not a DeepSpeed config key"),
    ("{zero_optimization: {prefetch_bucket_size: 1, stage3_prefetch_bucket_size: 2}}",
     "zero_optimization.stage3_prefetch_bucket_size", "the same setting as 'prefetch_bucket_size'"),
])
def test_bad_overrides_are_refused(parse, override, key, message):
    _, problems = parse(f"deepspeed.overrides={override}")
    found = {p.key: p for p in problems}
    assert f"deepspeed.overrides.{key}" in found, problems
    assert message in found[f"deepspeed.overrides.{key}"].message
    assert found[f"deepspeed.overrides.{key}"].where.startswith("override 'deepspeed.overrides=")


@pytest.mark.parametrize("overrides, key, message", [
    (["deepspeed.zero_stage=3", "deepspeed.overrides={zero_optimization: {compute_grad_norm: false}}"],
     "zero_optimization.compute_grad_norm", "only with ZeRO stage 1 or 2"),
    (["train.grad_clip=0.5", "deepspeed.overrides={zero_optimization: {compute_grad_norm: false}}"],
     "zero_optimization.compute_grad_norm", "needs gradient clipping off"),
    (["train.grad_clip=0", "deepspeed.offload_optimizer=cpu",
      "deepspeed.overrides={zero_optimization: {compute_grad_norm: false}}"],
     "zero_optimization.compute_grad_norm", "does not work with optimizer offload"),
    (["deepspeed.overrides={zero_optimization: {offload_param: {buffer_count: 4}}}"],
     "zero_optimization.offload_param", "tunes offload_param, but deepspeed.offload_param is none"),
    (["deepspeed.offload_optimizer=cpu", "deepspeed.overrides={zero_optimization: "
      "{offload_optimizer: {ratio: 0.5}}}"], "zero_optimization.offload_optimizer.ratio",
     "only with ZeRO stage 3"),
    (["deepspeed.zero_stage=0", "deepspeed.overrides={bf16: {bf16_master_weights_and_grads: true}}"],
     "bf16.bf16_master_weights_and_grads", "only with ZeRO stage 1, 2 or 3"),
    (["deepspeed.overrides={bf16: {bf16_optimizer_states: true}}"], "bf16.bf16_optimizer_states",
     "needs bf16.bf16_master_weights_and_grads: true"),
    (["deepspeed.zero_stage=3", "deepspeed.overrides={gradient_allreduce_op: sum}"],
     "gradient_allreduce_op", "'sum' is not supported with ZeRO stage 3"),
])
def test_overrides_deepspeed_refuses_with_this_run_file_are_refused(parse, overrides, key, message):
    _, problems = parse(*overrides)
    assert [p for p in problems if p.key == f"deepspeed.overrides.{key}" and message in p.message], problems


def test_the_same_overrides_pass_where_deepspeed_takes_them(parse):
    cfg, problems = parse("train.grad_clip=0", "deepspeed.overrides={zero_optimization: "
                          "{compute_grad_norm: false}, bf16: {bf16_master_weights_and_grads: true, "
                          "bf16_optimizer_states: true}, gradient_allreduce_op: sum}")
    assert problems == []
    deepspeed_parse(ds_config.build(cfg), cfg.world_size)
    cfg, problems = parse("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                          "deepspeed.overrides={zero_optimization: {offload_optimizer: {ratio: 0.5}}}")
    assert problems == []
    assert deepspeed_parse(ds_config.build(cfg), 8).zero_config.offload_optimizer.ratio == 0.5


def test_launcher_defaults_are_what_the_builder_writes(parse, tmp_path):
    cfg, problems = parse("model.dtype=fp16", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                          "deepspeed.offload_param=cpu")
    assert problems == []
    built = ds_config.build(cfg)
    for dotted, value in ds_config.LAUNCHER_DEFAULTS.items():
        node = built
        for part in dotted.split("."):
            node = node[part]
        assert node == value, dotted


def test_filled_keys_are_all_written(parse):
    cfg, _ = parse("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=nvme", "deepspeed.offload_param=nvme",
                   "deepspeed.nvme_path=/nvme")
    built = ds_config.build(cfg)
    for dotted in ds_config.FILLED:
        node = built
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]


# ------------------------------------------------------------------ tables kept equal to DeepSpeed
def pydantic_spec(model) -> dict[str, str]:
    """The spec strings of launcher/dsconfig/build.py, derived from a DeepSpeed pydantic model."""
    import annotated_types as at
    from pydantic import BaseModel

    def kind(tp):
        null = ""
        if typing.get_origin(tp) is typing.Union:
            tp, null = [a for a in typing.get_args(tp) if a is not type(None)][0], "?"
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return "mapping" + null
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return "choice(" + "|".join(str(m.value) for m in tp) + ")" + null
        if tp is pathlib.Path:
            return "path" + null
        return {bool: "bool", int: "int", float: "float", str: "str"}[tp] + null

    out = {}
    for name, f in model.model_fields.items():
        spec = kind(f.annotation)
        for m in f.metadata:
            for cls, attr, sym in ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"),
                                   (at.Le, "le", "<=")):
                if isinstance(m, cls):
                    spec += f"{sym}{getattr(m, attr)!r}"
        extra = f.json_schema_extra or {}
        if extra.get("deprecated"):
            spec = "deprecated:" + extra.get("new_param", "")
        out[f.alias or name] = spec
        if f.alias:
            out[name] = "alias:" + f.alias
    return out


def test_zero_tables_match_deepspeeds_models():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                       DeepSpeedZeroOffloadParamConfig)
    zero = pydantic_spec(DeepSpeedZeroConfig)
    # offload sections have their own tables
    assert zero.pop("offload_param") == zero.pop("offload_optimizer") == "mapping?"
    ours = dict(ds_config.ZERO_KEYS)
    assert ours.pop("offload_param") == ours.pop("offload_optimizer") == "section"
    assert ours == zero
    assert ds_config.OFFLOAD_PARAM_KEYS == pydantic_spec(DeepSpeedZeroOffloadParamConfig)
    assert ds_config.OFFLOAD_OPTIMIZER_KEYS == pydantic_spec(DeepSpeedZeroOffloadOptimizerConfig)
    assert ds_config.KNOWN_ZERO == set(ds_config.ZERO_KEYS)


def test_precision_tables_match_deepspeeds_models():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    assert ds_config.BF16_KEYS == pydantic_spec(DeepSpeedBF16Config)
    fp16 = pydantic_spec(DeepSpeedFP16Config)
    # stricter on purpose: DeepSpeed's validators refuse these values as well
    stricter = {"loss_scale": "float>=0", "loss_scale_window": "int>0", "min_loss_scale": "int>0"}
    assert {k: stricter.get(k, v) for k, v in fp16.items()} == ds_config.FP16_KEYS


def test_removed_keys_match_deepspeeds_lists():
    from deepspeed.runtime import config as ds_runtime_config
    assert ds_config.REMOVED_TOP == set(ds_runtime_config._REMOVED_TOP_LEVEL_CONFIG_KEYS)
    assert ds_config.REMOVED_ZERO == set(ds_runtime_config._REMOVED_ZERO_CONFIG_KEYS)
    assert not ds_config.REMOVED_TOP & set(ds_config.TOP_KEYS)
    assert not ds_config.REMOVED_ZERO & set(ds_config.ZERO_KEYS)


def top_level_keys_deepspeed_reads() -> set[str]:
    """Every top-level key DeepSpeedConfig looks up, recorded while it parses a config."""
    from deepspeed.runtime.config import DeepSpeedConfig
    seen: set[str] = set()

    class Keys(list):
        def __contains__(self, k):
            seen.add(k)
            return list.__contains__(self, k)

    class Recorder(dict):
        def get(self, k, *a):
            seen.add(k)
            return super().get(k, *a)

        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

        def keys(self):
            return Keys(super().keys())

    with world(1):
        DeepSpeedConfig(Recorder(train_batch_size=1, train_micro_batch_size_per_gpu=1))
    return seen


def test_top_level_table_matches_the_keys_deepspeed_reads():
    seen = top_level_keys_deepspeed_reads()
    ours = set(ds_config.TOP_KEYS) | ds_config.REMOVED_TOP | set(ds_config.UNSUPPORTED_TOP)
    assert ours == seen, f"missing: {sorted(seen - ours)}, not read: {sorted(ours - seen)}"


BLOCKS_READ_KEY_BY_KEY = ("aio", "activation_checkpointing", "flops_profiler", "checkpoint",
                          "checkpoint.parallel_write", "checkpoint.writer", "data_types")


def block_keys_deepspeed_reads() -> dict[str, set[str]]:
    """The keys DeepSpeedConfig (and the activation-checkpointing and flops-profiler configs it
    builds) looks up in each block DeepSpeed reads key by key, recorded while it parses."""
    from deepspeed.profiling.config import DeepSpeedFlopsProfilerConfig
    from deepspeed.runtime.activation_checkpointing.config import DeepSpeedActivationCheckpointingConfig
    from deepspeed.runtime.config import DeepSpeedConfig
    seen: dict[str, set[str]] = {name: set() for name in BLOCKS_READ_KEY_BY_KEY}

    def recorder(name: str, **given):
        class Block(dict):
            def get(self, k, *a):
                seen[name].add(k)
                return super().get(k, *a)

            def __getitem__(self, k):
                seen[name].add(k)
                return super().__getitem__(k)

            def __contains__(self, k):
                seen[name].add(k)
                return super().__contains__(k)
        return Block(**given)

    blocks = {"aio": recorder("aio"), "activation_checkpointing": recorder("activation_checkpointing"),
              "flops_profiler": recorder("flops_profiler"), "data_types": recorder("data_types"),
              "checkpoint": recorder("checkpoint", parallel_write=recorder("checkpoint.parallel_write"),
                                     writer=recorder("checkpoint.writer"))}
    with world(1):
        DeepSpeedConfig({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, **blocks})
    DeepSpeedActivationCheckpointingConfig({"activation_checkpointing": blocks["activation_checkpointing"]})
    DeepSpeedFlopsProfilerConfig({"flops_profiler": blocks["flops_profiler"]})
    return seen


def test_block_tables_match_the_keys_deepspeed_reads():
    seen = block_keys_deepspeed_reads()
    for name in BLOCKS_READ_KEY_BY_KEY:
        assert set(ds_config.SECTIONS[name]) == seen[name], name


@pytest.mark.parametrize("block, typo, right", [
    ("aio", "blok_size", "block_size"), ("aio", "queue_dept", "queue_depth"),
    ("activation_checkpointing", "partition_activation", "partition_activations"),
    ("activation_checkpointing", "cpu_checkpoint", "cpu_checkpointing"),
    ("flops_profiler", "profile_steps", "profile_step"),
    ("flops_profiler", "enable", "enabled"),
    ("checkpoint", "tag_validate", "tag_validation"),
    ("checkpoint", "use_node_local_storag", "use_node_local_storage"),
    ("data_types", "grad_accum_type", "grad_accum_dtype"),
])
def test_misspelt_keys_in_blocks_deepspeed_reads_one_by_one_are_refused(parse, block, typo, right):
    cfg, problems = parse(f"deepspeed.overrides={json.dumps({block: {typo: 1}})}")
    assert [p.key for p in problems] == [f"deepspeed.overrides.{block}.{typo}"]
    assert f"not a {block} key" in problems[0].message and f"did you mean '{right}'" in problems[0].fix


def test_misspelt_block_keys_in_a_users_file_are_refused(tmp_path, fake_model):
    (tmp_path / "ds.json").write_text(json.dumps({"aio": {"blok_size": 1048576},
                                                  "checkpoint": {"writer": {"typ": "fast"}}}))
    text = BASE + "deepspeed: {config_file: ds.json}\n"
    _, problems = runfile.parse(text, [], source="run.yaml", base_dir=str(tmp_path))
    fixes = {p.key: p.fix for p in problems}
    assert "did you mean 'block_size'" in fixes["deepspeed.config_file.aio.blok_size"]
    assert "did you mean 'type'" in fixes["deepspeed.config_file.checkpoint.writer.typ"]


def test_block_values_are_checked_and_good_ones_parse_in_deepspeed(parse):
    good = {"aio": {"block_size": 1048576, "queue_depth": 16, "intra_op_parallelism": 2},
            "activation_checkpointing": {"partition_activations": True, "number_checkpoints": 4},
            "flops_profiler": {"enabled": True, "profile_step": 2, "output_file": None},
            "checkpoint": {"tag_validation": "Fail", "writer": {"type": "fast"}},
            "data_types": {"grad_accum_dtype": "fp32", "keep_in_fp32_modules": "auto"},
            "communication_data_type": "fp32"}
    cfg, problems = parse(f"deepspeed.overrides={json.dumps(good)}")
    assert problems == []
    built = ds_config.build(cfg)
    parsed = deepspeed_parse(built, cfg.world_size)
    assert parsed.aio_config["queue_depth"] == 16 and parsed.grad_accum_dtype == "fp32"
    _, problems = parse('deepspeed.overrides={"aio": {"queue_depth": 0}, '
                        '"checkpoint": {"tag_validation": "strict"}}')
    assert sorted(p.key for p in problems) == ["deepspeed.overrides.aio.queue_depth",
                                               "deepspeed.overrides.checkpoint.tag_validation"]
    # DeepSpeed asserts GPUDirect Storage is CUDA-only when it parses the config
    _, problems = parse('deepspeed.overrides={"aio": {"use_gds": true}}')
    assert [p.key for p in problems] == ["deepspeed.overrides.aio.use_gds"]
    assert "GPUDirect Storage needs CUDA ranks" in problems[0].message
    cfg, problems = parse('deepspeed.overrides={"aio": {"use_gds": true}}', "train.device=cuda")
    assert problems == [] and ds_config.build(cfg)["aio"]["use_gds"] is True


TOP_SAMPLES = {"int>0": 7, "int?>0": 8, "bool": True, "float>0": 2.0, "mapping": {}}


@pytest.mark.parametrize("key", sorted(k for k, v in ds_config.TOP_KEYS.items()
                                       if v not in ("filled", "section") and not v.startswith("alias")))
def test_every_top_level_key_takes_a_value_of_its_spec(parse, key):
    spec = ds_config.TOP_KEYS[key]
    value = TOP_SAMPLES.get(spec) if not spec.startswith("choice") else spec[7:].split("|")[-1].rstrip(")?")
    assert ds_config.check_value(spec, value) is None
    cfg, problems = parse(f"deepspeed.overrides={json.dumps({key: value})}")
    assert problems == []
    built = ds_config.build(cfg)
    assert built[key] == value
    deepspeed_parse(built, cfg.world_size)


# ------------------------------------------------------------------ random run files (hypothesis)
def _schema_keys() -> set[str]:
    keys = {k for k, _, _, _ in runfile.fields_reference()}
    keys |= {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}
    return keys


SCHEMA_KEYS = _schema_keys()
JUNK = st.one_of(st.text(max_size=6), st.integers(-5, 10**6), st.floats(allow_nan=True),
                 st.booleans(), st.none(), st.lists(st.integers(0, 3), max_size=2),
                 st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=1))


def mostly(valid, junk=JUNK, one_in: int = 12):
    """valid, or junk once in `one_in` draws (sampled_from draws its index uniformly; an
    integer draw would favour the bounds)."""
    return st.sampled_from(range(one_in)).flatmap(lambda i: junk if i == one_in - 1 else valid)


def present(p_in_10: int = 2):
    return st.sampled_from(range(10)).map(lambda i: i < p_in_10)


def _valid_for(key: str, tp, meta) -> st.SearchStrategy:
    origin = typing.get_origin(tp)
    if key == "data.path":  # optional in the schema (or data.mix), given here
        return st.sampled_from(["train.jsonl"] * 9 + ["missing.jsonl"])
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = [st.none()] if len(inner) < len(typing.get_args(tp)) else []
        return st.one_of(*nullable, *[_valid_for(key, a, meta) for a in inner])
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if key == "data.mix":
        return st.just([])  # one source (data.path); mixtures: tests/test_data_chat.py
    if origin is list:
        return st.lists(_valid_for(key + "[]", typing.get_args(tp)[0], {}), max_size=3)
    if origin is dict:
        if key == "deepspeed.overrides":
            return DS_OVERRIDES
        return st.dictionaries(st.sampled_from(["HF_HOME", "NCCL_DEBUG", "bad-name", "HF_TOKEN"]),
                               st.text("abc =$'\"", max_size=5), max_size=2)
    if tp is bool:
        return st.booleans()
    ge, gt, le, lt = (meta.get(n) for n in ("ge", "gt", "le", "lt"))
    if tp is int:
        lo = ge if ge is not None else gt + 1 if gt is not None else -2
        hi = le if le is not None else lo + 64
        # one below the bound now and then: a range problem
        return mostly(st.integers(lo, min(hi, lo + 64)), st.just(lo - 1), one_in=10)
    if tp is float:
        lo = ge if ge is not None else gt if gt is not None else 0.0
        hi = le if le is not None else lt if lt is not None else 2.0
        return st.floats(lo, hi, exclude_min=gt is not None, exclude_max=lt is not None)
    if tp is str:
        examples = {"name": ["run-1", "a.b_c"] * 4 + ["bad name"], "cluster.time": ["24:00:00", "30", "2-00:00:00"],
                    "cluster.mem": ["500G", "0"], "cluster.gpu_memory": ["80GiB", "40 GiB"],
                    "model.path": ["model"] * 9 + ["nowhere"], "model.tokenizer": ["model", "nowhere"],
                    "data.path": ["train.jsonl"] * 9 + ["missing.jsonl"], "data.eval_path": ["train.jsonl"],
                    "deepspeed.nvme_path": ["/nvme"], "output.dir": ["out", "runs/x"],
                    "deepspeed.preset": ["zero2", "zero3", "zero9"],
                    "cluster.env_from_shell[]": ["HF_TOKEN", "WANDB_API_KEY", "HF_HOME", "bad name"]}.get(key)
        return st.sampled_from(examples) if examples else st.text("abcxyz_.-()[]*\\\n", max_size=8)
    raise AssertionError(f"no strategy for {key}: {tp}")


FIELD_STRATEGIES: dict[str, st.SearchStrategy] = {}


def section_strategy(cls, prefix: str = "") -> st.SearchStrategy:
    import dataclasses
    hints = runfile.type_hints(cls)
    required, optional = {}, {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if key in ("train.epochs", "deepspeed.config_file"):
            continue  # exclusive with max_steps / a file of its own: tested in test_epochs, test_ds_file
        if dataclasses.is_dataclass(tp):
            value = section_strategy(tp, key)
        elif key == "train.max_steps":  # optional only because train.epochs may replace it
            value = mostly(st.integers(1, 10**6))
            FIELD_STRATEGIES[key] = value
        else:
            value = mostly(_valid_for(key, tp, f.metadata))
            FIELD_STRATEGIES[key] = value
        is_required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        is_required = is_required or key == "train.max_steps"
        # max_seq_len always: its default (2048) is longer than the test model's 512 positions
        (required if is_required or key in ("data.max_seq_len", "data.path") else optional)[f.name] = value
    return st.fixed_dictionaries(
        {k: v for k, v in required.items()},
        optional={k: v for k, v in optional.items()}).flatmap(_thin)


def _thin(d: dict) -> st.SearchStrategy:
    """Keep each optional value with a small probability, so many files are valid."""
    return st.tuples(*[present() for _ in d]).map(
        lambda keep: {k: v for (k, v), kept in zip(d.items(), keep)
                      if kept or k in ("name", "model", "data", "train", "path", "max_steps",
                                       "max_seq_len")})


DS_SPEC_KEYS = [(section, key, table[spec[6:]] if spec.startswith("alias:") else spec)
                for section, table in ds_config.SECTIONS.items() for key, spec in table.items()
                if spec not in ("filled", "section") and not spec.startswith("deprecated")
                and (not spec.startswith("alias:") or table[spec[6:]] != "section")]


def _ds_value(spec: str) -> st.SearchStrategy:
    valid = {"bool": st.booleans(), "int": st.integers(-3, 10**9), "float": st.floats(-1, 3),
             "mapping": st.just({}), "path": st.just("/nvme"), "str": st.text(max_size=3),
             "list": st.just([])}
    m = re.match(r"(bool|int|float|mapping|path|str|list|choice\(([^)]*)\))", spec)
    kind = m.group(1)
    good = st.sampled_from(m.group(2).split("|")) if kind.startswith("choice") else valid[kind]
    if kind == "mapping":  # pass-through blocks: DeepSpeed checks their contents on the ranks
        return mostly(good, st.one_of(st.just("auto"), st.integers(), st.text(max_size=3), st.none()),
                      one_in=4)
    return mostly(good, st.one_of(st.just("auto"), JUNK), one_in=4)


@st.composite
def ds_overrides(draw) -> dict:
    out: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        section, key, spec = draw(st.sampled_from(DS_SPEC_KEYS + [("", "not_a_key", "bool"),
                                                                  ("zero_optimization", "stagee", "int")]))
        node = out
        for part in [p for p in section.split(".") if p]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[key] = draw(_ds_value(spec))
    return out


DS_OVERRIDES = ds_overrides()
RUN_FILES = section_strategy(RunConfig)


def check_outcome(text: str, overrides: list[str], base_dir: str, stats: collections.Counter) -> None:
    """Either problems whose keys exist in the schema, or a config DeepSpeed accepts."""
    cfg, problems = runfile.parse(text, overrides, source="run.yaml", base_dir=base_dir)
    if problems:
        stats["refused"] += 1
        stats.update(f"key {p.key}" for p in problems)
        for p in problems:
            parent = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", p.key)
            assert (p.key in ("<file>", "<override>") or p.key in SCHEMA_KEYS
                    or re.sub(r"\[\d+\]", "", p.key) in SCHEMA_KEYS
                    or p.key.startswith(("deepspeed.overrides.", "cluster.env."))
                    or (p.message == "unknown key" and (parent in SCHEMA_KEYS or parent == p.key))
                    or p.message.startswith("keys must be strings")), p
            assert p.message and p.fix, p
        return
    assert cfg is not None
    built = ds_config.build(cfg)
    assert list(ds_config.find_auto(built)) == []
    json.dumps(built)
    parsed = deepspeed_parse(built, cfg.world_size)
    assert parsed.train_batch_size == cfg.train.global_batch_size or cfg.train.global_batch_size is None
    stats["accepted"] += 1


def test_random_run_files_are_refused_or_accepted_by_deepspeed(tmp_path, fake_model):
    """150 examples of random run files (dicts dumped as YAML)."""
    stats: collections.Counter = collections.Counter()

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(tree=RUN_FILES)
    def check(tree):
        check_outcome(yaml.safe_dump(tree, sort_keys=False), [], str(tmp_path), stats)

    check()
    assert stats["accepted"] >= 10 and stats["refused"] >= 10, stats.most_common(12)


@st.composite
def override_lists(draw) -> list[str]:
    keys = sorted(k for k, _, _, _ in runfile.fields_reference())
    out = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(keys + ["train.lrr", "deepspeed", "=", "noequals"]))
        value = draw(FIELD_STRATEGIES.get(key, JUNK))
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        text = text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text
        out.append(f"{key}={text}" if key not in ("=", "noequals") else key)
    return out


def test_random_override_lists_are_refused_or_accepted_by_deepspeed(tmp_path, fake_model):
    """150 examples of random override lists on a valid run file."""
    stats: collections.Counter = collections.Counter()

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(overrides=override_lists())
    def check(overrides):
        check_outcome(BASE, overrides, str(tmp_path), stats)

    check_outcome(BASE, ["train.sequence_parallel=2"], str(tmp_path), stats)  # found by a draw
    check()
    assert stats["accepted"] >= 10 and stats["refused"] >= 10, stats.most_common(12)


def test_random_deepspeed_overrides_are_refused_or_accepted_by_deepspeed(tmp_path, fake_model):
    """300 examples of random deepspeed.overrides, at random ZeRO stages and offloads."""
    stats: collections.Counter = collections.Counter()

    combos = list(itertools.product(STAGES, OFFLOAD, OFFLOAD))
    valid = [c for c in combos if not expected_refusals(*c, "adamw")]

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ov=DS_OVERRIDES, zero=mostly(st.sampled_from(valid), st.sampled_from(combos), one_in=8),
           dtype=st.sampled_from(DTYPES))
    def check(ov, zero, dtype):
        stage, opt, param = zero
        text = BASE.replace("model: {path: model}", f"model: {{path: model, dtype: {dtype}}}")
        text += yaml.safe_dump({"deepspeed": {"zero_stage": stage, "offload_optimizer": opt,
                                              "offload_param": param, "nvme_path": "/nvme",
                                              "overrides": ov}})
        check_outcome(text, [], str(tmp_path), stats)

    check()
    assert stats["accepted"] >= 30 and stats["refused"] >= 30, stats.most_common(12)
