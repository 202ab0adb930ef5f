"""The GPU table (launcher/config/gpus.py), cluster.gpu_type, and the refusals that need the card: bf16
below sm80, flash_attention_2 below sm80, with fp32, on CPU ranks and without flash_attn."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest

from launcher.config import gpus, runfile
from launcher.cluster import local_run
from launcher.checks import validate
from launcher.config.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2**20


def run_file(tmp_path, fake_model, extra: str = "", model: str | None = None) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(f"name: g\nmodel: {{path: {model or fake_model}, dtype: bf16}}\n"
                    f"data: {{path: {tmp_path / 'train.jsonl'}, max_seq_len: 256}}\n"
                    f"train: {{max_steps: 10}}\n{extra}")
    return str(path)


# ------------------------------------------------------------------ the table
def test_every_card_has_memory_flops_and_a_source():
    for card in gpus.CARDS.values():
        assert card.memory > 8 * 2**30 and card.fp16_flops > 1e13 and card.source
        assert card.matches and all(m == m.lower() for m in card.matches)
        assert card.bf16 == (card.bf16_flops is not None)  # no bf16 units below sm80


def test_an_80gb_card_reports_less_than_80gib_of_hbm3_or_exactly_the_a100s():
    assert gpus.CARDS["H100-SXM"].memory == 81_559 * MIB < 80 * 2**30
    assert gpus.CARDS["A100-80GB"].memory == 81_920 * MIB
    assert gpus.CARDS["H100-SXM"].sm == (9, 0) and gpus.CARDS["V100-32GB"].sm == (7, 0)


@pytest.mark.parametrize("reported, name", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100 80GB PCIe", "A100-80GB"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"),
    ("NVIDIA RTX A6000", "A6000"), ("Tesla V100-SXM2-16GB", "V100-16GB"),
    ("Tesla V100S-PCIE-32GB", "V100-32GB"), ("Tesla T4", "T4"), ("AMD Instinct MI300X", "MI300X"),
])
def test_names_as_nvidia_smi_reports_them_map_to_their_row(reported, name):
    card = gpus.from_device_name(reported)
    assert card is not None and card.name == name, (reported, card)


def test_an_unknown_card_has_no_row_and_l40s_is_not_read_as_l4():
    assert gpus.from_device_name("NVIDIA GeForce RTX 4090") is None
    assert gpus.from_device_name("NVIDIA L40S").name == "L40S"


def test_lookup_ignores_case_spaces_and_underscores():
    assert gpus.lookup("h100 sxm") is gpus.CARDS["H100-SXM"]
    assert gpus.lookup("a100_80gb") is gpus.CARDS["A100-80GB"]
    assert gpus.lookup("K80") is None


# ------------------------------------------------------------------ cluster.gpu_type
def test_a_misspelt_gpu_type_is_refused_with_did_you_mean(tmp_path, fake_model):
    with pytest.raises(ConfigError, match=r"cluster.gpu_type \([^)]*\): unknown GPU type "
                                          r"'H100-SMX'\n      fix: did you mean H100-SXM\? \(launcher"):
        runfile.load(run_file(tmp_path, fake_model, "cluster: {gpu_type: H100-SMX}\n"))


def test_the_plan_takes_the_gpu_memory_from_gpu_type_unless_given(tmp_path, fake_model):
    from launcher import memory
    model = os.path.join(HERE, "configs", "llama-2-7b")
    cfg = runfile.load(run_file(tmp_path, fake_model, "cluster: {gpu_type: L40S}\n", model))
    p = memory.plan(cfg, advise=False)
    assert p.gpu_memory == 46_068 * MIB and "cluster.gpu_type L40S" in p.gpu_memory_source
    assert memory.plan(cfg, gpu_memory="80GB", advise=False).gpu_memory == 80 * 10**9


def test_without_any_size_the_plan_assumes_an_h100s_real_memory(tmp_path, fake_model):
    from launcher import memory
    cfg = runfile.load(run_file(tmp_path, fake_model, "", os.path.join(HERE, "configs", "llama-2-7b")))
    p = memory.plan(cfg, advise=False)
    assert p.gpu_memory == 81_559 * MIB and p.gpu_memory_source.startswith("default")


# ------------------------------------------------------------------ refusals
def fix_of(cfg, rule, key):
    return [(p.message, p.fix) for p in getattr(validate, rule)(cfg) if p.key == key]


def test_bf16_below_sm80_is_refused_with_the_fp16_fix(tmp_path, fake_model):
    with pytest.raises(ConfigError, match=r"model.dtype \([^)]*\): bf16 on T4 \(sm75, cluster.gpu_type\)"
                                          r"(.|\n)*fix: set model.dtype: fp16") as exc:
        runfile.load(run_file(tmp_path, fake_model, "cluster: {gpu_type: T4}\n"))
    assert "model.dtype" in exc.value.keys
    cfg = runfile.load(run_file(tmp_path, fake_model, "cluster: {gpu_type: T4}\n"), ["model.dtype=fp16"])
    assert cfg.model.dtype == "fp16"  # the fix passes
    ok = runfile.load(run_file(tmp_path, fake_model, "cluster: {gpu_type: A100-40GB}\n"))
    assert ok.cluster.gpu_type == "A100-40GB"


@pytest.fixture
def flash_installed(monkeypatch):
    """find_spec answers for flash_attn as if it were installed (validate never imports it)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        importlib.machinery.ModuleSpec(name, None) if name == "flash_attn" else real(name, *a)))


FLASH = ["model.attn_implementation=flash_attention_2"]


def test_flash_attention_without_its_package_is_refused_naming_the_jobs_python(tmp_path, fake_model,
                                                                               monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.attn_implementation[^\n:]*: flash_attention_2 needs the "
                       r"flash_attn package(.|\n)*fix: pip install flash-attn in the job's Python"):
        runfile.load(run_file(tmp_path, fake_model), FLASH)


def test_flash_attention_with_its_package_on_an_sm80_card_passes(tmp_path, fake_model, flash_installed):
    cfg = runfile.load(run_file(tmp_path, fake_model, "cluster: {gpu_type: A100-80GB}\n"), FLASH)
    assert cfg.model.attn_implementation == "flash_attention_2"


@pytest.mark.parametrize("extra, over, match, fix", [
    ("", ["model.dtype=fp32"], r"flash_attention_2 computes in fp16 or bf16 only",
     "set model.dtype: bf16"),
    ("cluster: {gpu_type: V100-16GB}\n", ["model.dtype=fp16"],
     r"flash_attention_2 needs compute capability 8.0 or newer .* V100-16GB is sm70", "use sdpa"),
    ("", ["train.device=cpu"], r"flash_attention_2 runs on GPUs only: CPU ranks", "use sdpa"),
])
def test_flash_attention_where_it_cannot_run_is_refused(tmp_path, fake_model, flash_installed,
                                                        extra, over, match, fix):
    with pytest.raises(ConfigError, match=r"model.attn_implementation[^\n:]*: " + match) as exc:
        runfile.load(run_file(tmp_path, fake_model, extra), FLASH + over)
    assert fix in str(exc.value)


def test_ftlaunch_run_without_a_gpu_refuses_flash_attention_before_any_rank(tmp_path, fake_model,
                                                                            flash_installed,
                                                                            monkeypatch):
    """`ftlaunch run` on a machine without GPUs resolves train.device auto to cpu and loads the
    run file again with that override (local_run.main): the refusal comes there."""
    path = run_file(tmp_path, fake_model)
    base = runfile.load(path, FLASH)  # train.device auto: nothing known yet on a login node
    monkeypatch.setattr(local_run, "resolve_device", lambda cfg: "cpu")
    device, nproc = local_run.local_ranks(base, None)
    assert device == "cpu"
    with pytest.raises(ConfigError, match=r"flash_attention_2 runs on GPUs only"):
        runfile.recheck(local_run.local_config(base, device, nproc), path)


def test_cpu_ranks_ignore_the_card(tmp_path, fake_model):
    cfg = runfile.load(run_file(tmp_path, fake_model, "cluster: {gpu_type: T4}\n"),
                       ["train.device=cpu"])
    assert fix_of(cfg, "_card_precision", "model.dtype") == []
    gpu = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="auto"))
    assert [m for m, _ in fix_of(gpu, "_card_precision", "model.dtype")] == [
        "bf16 on T4 (sm75, cluster.gpu_type): cards below sm80 have no bf16 tensor cores; torch "
        "emulates bf16 there, many times slower than fp16"]


def test_a_nodes_reported_card_compares_with_gpu_type():
    assert gpus.same_card("NVIDIA H100 80GB HBM3", "h100-sxm") is True
    assert gpus.same_card("NVIDIA A100-SXM4-40GB", "A100-80GB") is False
    assert gpus.same_card("NVIDIA GeForce RTX 4090", "H100-SXM") is None
