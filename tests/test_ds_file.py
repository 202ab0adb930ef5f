"""deepspeed.config_file: DeepSpeed JSON files as HF Trainer users have them ("auto" everywhere).

The files below follow the HF Trainer's DeepSpeed documentation (its ZeRO-2 and ZeRO-3
examples). The result must hold no "auto", follow the Trainer's rules value by value, and be
accepted by DeepSpeed's own parser.
"""
from __future__ import annotations

import json
import os

import pytest

from launcher.dsconfig import build as ds_config, user_file as ds_file
from launcher.config import runfile
from launcher.config.errors import ConfigError
from test_ds_config import deepspeed_parse

ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                               "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto",
                                                        "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True,
                          "reduce_bucket_size": "auto", "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
ZERO3 = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                               "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                  "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
        "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
HIDDEN = 4096


def setup_run(tmp_path, ds: dict, run: str) -> str:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": HIDDEN, "max_position_embeddings": 4096}))
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "ds.json").write_text(json.dumps(ds, indent=2))
    path = tmp_path / "run.yaml"
    path.write_text("name: t\nmodel: {path: model}\ndata: {path: train.jsonl, max_seq_len: 512}\n"
                    "deepspeed: {config_file: ds.json, %s}\n%s" % run)
    return str(path)


def test_zero2_file_resolves_as_the_hf_trainer_does(tmp_path):
    path = setup_run(tmp_path, ZERO2, ("zero_stage: 2, offload_optimizer: cpu",
                     "train: {max_steps: 500, micro_batch_size: 4, grad_accum: 8, lr: 1.0e-4, "
                     "warmup_steps: 50, grad_clip: 0.5, weight_decay: 0.01}\n"
                     "cluster: {nodes: 2, gpus_per_node: 4}\n"))
    built = ds_config.build(runfile.load(path))
    assert list(ds_config.find_auto(built)) == []
    assert (built["train_micro_batch_size_per_gpu"], built["gradient_accumulation_steps"],
            built["train_batch_size"], built["gradient_clipping"]) == (4, 8, 256, 0.5)
    assert built["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                            "weight_decay": 0.01}
    assert built["scheduler"]["params"]["total_num_steps"] == 500
    assert built["scheduler"]["params"]["warmup_num_steps"] == 50
    assert built["bf16"] == {"enabled": True} and built["fp16"]["enabled"] is False
    z = built["zero_optimization"]
    assert z["reduce_bucket_size"] == HIDDEN * HIDDEN  # the Trainer's hidden x hidden
    assert z["allgather_bucket_size"] == 200_000_000 and z["overlap_comm"] is True
    assert built["steps_per_print"] == 2000 and built["wall_clock_breakdown"] is False
    parsed = deepspeed_parse(built, 8)
    assert parsed.train_batch_size == 256 and parsed.zero_optimization_stage == 2


def test_zero3_offload_file_resolves_hidden_size_buckets(tmp_path):
    path = setup_run(tmp_path, ZERO3, ("zero_stage: 3, offload_optimizer: cpu, offload_param: cpu",
                     "train: {epochs: 3, micro_batch_size: 1, global_batch_size: 16, "
                     "scheduler: constant, warmup_ratio: 0.03}\n"
                     "cluster: {nodes: 1, gpus_per_node: 8}\n"))
    cfg = runfile.load(path)
    built = ds_config.build(cfg)
    assert list(ds_config.find_auto(built)) == []
    z = built["zero_optimization"]
    assert z["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
    assert z["stage3_param_persistence_threshold"] == 10 * HIDDEN
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z["sub_group_size"] == 1_000_000_000
    assert built["scheduler"]["type"] == "WarmupLR"
    assert built["scheduler"]["params"]["warmup_max_lr"] == cfg.train.lr
    assert built["train_batch_size"] == 16 and built["gradient_accumulation_steps"] == 2
    parsed = deepspeed_parse(built, 8)
    assert parsed.zero_optimization_stage == 3 and parsed.train_batch_size == 16


@pytest.mark.parametrize("change, run, needle", [
    ({"train_micro_batch_size_per_gpu": 8}, "", "train_micro_batch_size_per_gpu is 8, but the run "
     "file gives 4 (train.micro_batch_size)"),
    ({"gradient_clipping": 0.3}, "", "gradient_clipping is 0.3, but the run file gives 1.0"),
    ({"bf16": {"enabled": False}}, "", "bf16.enabled is false, but the run file gives true (model.dtype)"),
    ({"zero_optimization": {"stage": 3}}, "", "zero_optimization.stage is 3, deepspeed.zero_stage is 2"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "", "optimizer type 'Lamb'; the launcher trains"),
    ({"scheduler": {"type": "WarmupLR"}}, "", "scheduler WarmupLR is train.scheduler constant, the run "
     "file says cosine"),
    ({"steps_per_prnt": 10}, "", "steps_per_prnt: not a DeepSpeed config key"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "", "not a zero_optimization key"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, "",
     "\"auto\" here is not resolved by the HF Trainer's rules"),
])
def test_contradictions_and_unknown_keys_are_refused(tmp_path, change, run, needle):
    ds = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
          "bf16": {"enabled": "auto"}}
    ds.update(change)
    path = setup_run(tmp_path, ds, ("zero_stage: 2", "train: {max_steps: 10, micro_batch_size: 4}\n"))
    with pytest.raises(ConfigError, match="deepspeed.config_file") as exc:
        runfile.load(path)
    assert any(needle in p.message and p.fix for p in exc.value.problems), exc.value.render()


def test_a_missing_or_broken_file_is_named(tmp_path):
    path = setup_run(tmp_path, {}, ("zero_stage: 2", "train: {max_steps: 10}\n"))
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot read .*ds.json as JSON"):
        runfile.load(path)
    (tmp_path / "ds.json").unlink()
    with pytest.raises(ConfigError, match=r"deepspeed.config_file.*no such file"):
        runfile.load(path)


# ------------------------------------------------------------------ files taken as written
FILES = os.path.join(os.path.dirname(__file__), "configs", "ds")
# each file in tests/configs/ds with the run-file settings it is written for
FILE_RUNS = {
    "hf_zero2.json": ("zero_stage: 2, offload_optimizer: cpu", "scheduler: constant"),
    "hf_zero3.json": ("zero_stage: 3, offload_optimizer: cpu, offload_param: cpu",
                      "scheduler: constant"),
    "axolotl_zero1.json": ("zero_stage: 1", ""),
    "axolotl_zero2.json": ("zero_stage: 2, offload_optimizer: cpu", ""),
    "axolotl_zero3_bf16.json": ("zero_stage: 3", ""),
    "llamafactory_ds_z3_config.json": ("zero_stage: 3", ""),
    "llamafactory_ds_z2_offload_config.json": ("zero_stage: 2, offload_optimizer: cpu", ""),
    "llamafactory_ds_z3_offload_config.json": (
        "zero_stage: 3, offload_optimizer: cpu, offload_param: cpu", ""),
    "tuned_fp16_zero3.json": ("zero_stage: 3, offload_optimizer: cpu",
                              "scheduler: cosine, min_lr_ratio: 0.1"),
}


def _leaves(tree, prefix=""):
    """dotted key -> value for every leaf of a JSON tree."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_leaves(v, key))
        else:
            out[key] = v
    return out


def _run_for(tmp_path, name):
    ds, train = FILE_RUNS[name]
    dtype = "fp16" if "fp16" in name else "bf16"
    train = "train: {max_steps: 300, micro_batch_size: 2, grad_accum: 4, lr: 3.0e-5, " \
            "warmup_steps: 10, weight_decay: 0.1%s}\ncluster: {nodes: 1, gpus_per_node: 8}\n" % (
                ", " + train if train else "")
    path = setup_run(tmp_path, json.load(open(os.path.join(FILES, name))), (ds, train))
    text = open(path).read().replace("model: {path: model}", "model: {path: model, dtype: %s}" % dtype)
    open(path, "w").write(text)
    return runfile.load(path)


def test_every_fixture_file_has_a_run():
    assert sorted(FILE_RUNS) == sorted(f for f in os.listdir(FILES) if f.endswith(".json"))


@pytest.mark.parametrize("name", sorted(FILE_RUNS))
def test_peers_and_hf_files_round_trip_with_every_written_value_kept(tmp_path, name):
    """Every value the file gives (not "auto") is in the built config unchanged; "auto" values
    are resolved; DeepSpeed's own parser accepts the result."""
    written = _leaves(ds_config.normalise(json.load(open(os.path.join(FILES, name)))))
    cfg = _run_for(tmp_path, name)
    built = ds_config.build(cfg)
    got = _leaves(built)
    assert list(ds_config.find_auto(built)) == []
    for key, value in written.items():
        if isinstance(value, str) and value == "auto":
            assert key in got, key
            continue
        assert key in got and ds_file.same_value(got[key], value), (key, value, got.get(key))
    parsed = deepspeed_parse(built, 8)
    assert parsed.train_batch_size == 2 * 4 * 8


def test_a_tuned_file_keeps_its_loss_scaling_offload_and_scheduler(tmp_path):
    """The values the launcher's defaults used to overwrite stay the user's."""
    cfg = _run_for(tmp_path, "tuned_fp16_zero3.json")
    built = ds_config.build(cfg)
    fp16, z = built["fp16"], built["zero_optimization"]
    assert (fp16["initial_scale_power"], fp16["loss_scale_window"], fp16["hysteresis"]) == (12, 500, 1)
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert z["stage3_gather_16bit_weights_on_model_save"] is False
    assert z["reduce_bucket_size"] == 200_000_000
    assert built["scheduler"]["params"]["cos_min_ratio"] == 0.1
    assert built["scheduler"]["params"]["warmup_type"] == "linear"
    assert built["optimizer"]["params"]["torch_adam"] is True
    assert built["optimizer"]["params"]["weight_decay"] == 0.1
    # nothing the file lacks is added but the run file's keys
    assert "stage3_max_live_parameters" not in z and "sub_group_size" not in z


def test_a_file_without_optimizer_and_scheduler_gets_the_launchers_and_says_so(tmp_path):
    cfg = _run_for(tmp_path, "axolotl_zero1.json")
    built = ds_config.build(cfg)
    assert built["optimizer"]["type"] == "AdamW" and built["scheduler"]["type"] == "WarmupCosineLR"
    assert built["fp16"]["initial_scale_power"] == 32 and built["fp16"]["auto_cast"] is False
    said = ds_file.notes(cfg, built)
    assert any("no optimizer block" in n for n in said) and any("no scheduler block" in n for n in said)


def test_the_ranks_linear_warmup_is_said_where_the_file_asks_otherwise(tmp_path):
    cfg = _run_for(tmp_path, "hf_zero3.json")  # WarmupLR without warmup_type: DeepSpeed's log
    built = ds_config.build(cfg)
    assert "warmup_type" not in built["scheduler"]["params"]
    said = ds_file.notes(cfg, built)
    assert any("warmup_type is log" in n and "linearly" in n for n in said), said


def test_a_file_contradicting_the_run_file_is_reported_key_by_key(tmp_path):
    ds = json.load(open(os.path.join(FILES, "tuned_fp16_zero3.json")))
    ds.update({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
               "gradient_clipping": 0.5})
    ds["optimizer"]["params"].update({"lr": 1e-4, "weight_decay": 0.0})
    ds["scheduler"]["params"]["cos_min_ratio"] = 0.2
    path = setup_run(tmp_path, ds, ("zero_stage: 3, offload_optimizer: cpu", "train: {max_steps: "
                     "300, micro_batch_size: 2, grad_accum: 4, lr: 3.0e-5, weight_decay: 0.1, "
                     "min_lr_ratio: 0.1}\nmodel: {path: model, dtype: fp16}\n"))
    text = open(path).read().replace("model: {path: model}\n", "", 1)
    open(path, "w").write(text)
    with pytest.raises(ConfigError, match="deepspeed.config_file") as exc:
        runfile.load(path)
    messages = [p.message for p in exc.value.problems]
    for needle in ("train_micro_batch_size_per_gpu is 4, but the run file gives 2",
                   "gradient_accumulation_steps is 2, but the run file gives 4",
                   "gradient_clipping is 0.5, but the run file gives 1.0",
                   "optimizer.params.lr is 0.0001, but the run file gives 3e-05",
                   "optimizer.params.weight_decay is 0.0, but the run file gives 0.1",
                   "scheduler.params.cos_min_ratio is 0.2, but the run file gives 0.1"):
        assert sum(needle in m for m in messages) == 1, (needle, messages)
