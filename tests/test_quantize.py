"""Quantized loading with real bitsandbytes on CPU, its pre-launch rules and the 8-bit optimizer."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from launcher import cli
from launcher.model import quantize
from launcher.config.errors import ConfigError
from launcher.config.runfile import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_text(model: str, data: str, *, dtype: str = "bf16", quant: str = "{mode: none}",
             freeze: str = "{policy: lora}", train: str = "", zero: int = 2) -> str:
    return textwrap.dedent(f"""\
        name: q
        model: {{path: {model}, dtype: {dtype}}}
        data: {{path: {data}, max_seq_len: 32}}
        train: {{max_steps: 4, device: cpu{train}}}
        quantization: {quant}
        freeze: {freeze}
        deepspeed: {{zero_stage: {zero}}}
        """)


def config(tiny, **kw):
    cfg, problems = parse(run_text(tiny["model"], tiny["text"], **kw))
    assert not problems, problems
    return cfg


# ------------------------------------------------------------------ BitsAndBytesConfig
def test_bnb_config_from_the_run_file(tiny):
    import torch
    assert quantize.bnb_config(config(tiny)) is None
    assert quantize.load_kwargs(config(tiny), "cpu") == {}

    c8 = config(tiny, quant="{mode: 8bit, int8_threshold: 4.5, skip_modules: [lm_head, 'model.layers.0.mlp']}")
    b = quantize.bnb_config(c8)
    assert b.load_in_8bit and not b.load_in_4bit
    assert b.llm_int8_threshold == 4.5
    assert b.llm_int8_skip_modules == ["lm_head", "model.layers.0.mlp"]

    c4 = config(tiny, quant="{mode: 4bit, quant_type: fp4, double_quant: false}")
    b = quantize.bnb_config(c4)
    assert b.load_in_4bit and b.bnb_4bit_quant_type == "fp4" and not b.bnb_4bit_use_double_quant
    assert b.bnb_4bit_compute_dtype == torch.bfloat16  # null compute dtype: model.dtype
    assert b.bnb_4bit_quant_storage == torch.uint8
    kw = quantize.load_kwargs(c4, "cuda:3")
    assert kw["device_map"] == {"": "cuda:3"} and kw["quantization_config"].load_in_4bit

    c4b = config(tiny, dtype="fp32", quant="{mode: 4bit, compute_dtype: bf16, storage_dtype: fp32}")
    b = quantize.bnb_config(c4b)
    assert b.bnb_4bit_compute_dtype == torch.bfloat16 and b.bnb_4bit_quant_storage == torch.float32


def _load(cfg):
    import torch
    from transformers import AutoModelForCausalLM
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.model.dtype]
    return AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype,
                                                **quantize.load_kwargs(cfg, "cpu"))


@pytest.mark.parametrize("mode,cls", [("8bit", "Int8Params"), ("4bit", "Params4bit")])
def test_load_quantizes_the_block_linears_only(tiny, mode, cls):
    cfg = config(tiny, quant=f"{{mode: {mode}}}")
    model = _load(cfg)
    names = quantize.quantized_names(model)
    linears = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == linears  # lm_head (skip_modules), embeddings and norms stay 16-bit
    params = dict(model.named_parameters())
    assert {type(params[n]).__name__ for n in names} == {cls}
    quantize.prepare(model, cfg)
    assert not any(params[n].requires_grad for n in names)
    import torch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():  # an evaluation pass leaves every stored tensor bit-identical
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert params["lm_head.weight"].dtype.is_floating_point
    assert 0 < quantize.quantized_bytes(model) < sum(p.numel() for n, p in params.items() if n in names) * 2


def test_prepare_refuses_what_deepspeed_would_corrupt_and_empty_quantization(tiny):
    ok = config(tiny, quant="{mode: 4bit}")
    bad = dataclasses.replace(ok, quantization=dataclasses.replace(ok.quantization,
                                                                   storage_dtype="fp32"))
    model = _load(bad)  # packed 4-bit bytes stored as fp32 in a bf16 run (validate refuses it)
    with pytest.raises(ConfigError, match="quantization.storage_dtype.*casts floating parameters "
                       "to bf16 and would corrupt the packed weights"):
        quantize.prepare(model, bad)

    none_left = config(tiny, quant="{mode: 8bit, skip_modules: [model, lm_head]}",
                       freeze="{policy: patterns, also_train: [norms]}")
    with pytest.raises(ConfigError, match="no parameter was quantized"):
        quantize.prepare(_load(none_left), none_left)


def test_gradient_checkpointing_gets_input_grads(tiny):
    import torch
    cfg = config(tiny, quant="{mode: 4bit}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=True))
    model = _load(cfg)
    quantize.prepare(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    out = model.get_input_embeddings()(torch.tensor([[3, 4, 5]]))
    assert out.requires_grad  # the hook peft's prepare_model_for_kbit_training also installs


def test_check_installed_gives_an_install_hint(monkeypatch, tiny):
    quantized = config(tiny, quant="{mode: 8bit}")
    optimizer = config(tiny, train=", optimizer: adamw_8bit", freeze="{policy: full}")
    quantize.check_installed(quantized)  # installed here: no error
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"quantization.mode: bitsandbytes is not installed"
                       r"(.|\n)*pip install bitsandbytes"):
        quantize.check_installed(quantized)
    with pytest.raises(ConfigError, match=r"train.optimizer: adamw_8bit is bitsandbytes' optimizer "
                       r"and bitsandbytes is not installed"):
        quantize.check_installed(optimizer)


# ------------------------------------------------------------------ 8-bit optimizer state
def _state_bytes(opt) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if hasattr(v, "numel") and id(v) not in seen and v.dim() > 0:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total


def test_adamw_8bit_state_bytes_per_element(tiny):
    """The figure the memory plan uses: 1 byte per moment + one fp32 absmax per 256-element block
    per moment; tensors under 4096 elements keep fp32 state (8 bytes per element)."""
    import torch
    cfg = config(tiny, train=", optimizer: adamw_8bit", freeze="{policy: full}")
    n = 1_000_000
    big = torch.nn.Parameter(torch.randn(n))
    small = torch.nn.Parameter(torch.randn(4095))
    opt = quantize.build_8bit_optimizer(cfg, [big, small])
    assert type(opt).__name__ == "AdamW8bit"
    big.grad, small.grad = torch.randn(n), torch.randn(4095)
    before = big.detach().clone()
    opt.step()
    assert not torch.equal(before, big.detach())
    blocks = -(-n // 256)
    qmaps = 2 * 256 * 4  # the two 256-entry fp32 code books, shared by every tensor
    assert _state_bytes(opt) == 2 * n + 2 * 4 * blocks + qmaps + 2 * 4 * 4095
    torch.testing.assert_close((2 * n + 2 * 4 * blocks) / n, 2.03125, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="adamw_8bit"):
        quantize.build_8bit_optimizer(config(tiny, freeze="{policy: full}"), [big])


# ------------------------------------------------------------------ pre-launch refusals
REFUSED = [
    ("{mode: 8bit}", "{policy: lora}", 3, "",
     "quantization.mode", "8-bit loading with ZeRO-3 saves no memory"),
    ("{mode: 4bit}", "{policy: lora}", 3, "",
     "quantization.storage_dtype", "ZeRO-3 partitions floating-point tensors"),
    ("{mode: 4bit, storage_dtype: fp32}", "{policy: lora}", 2, "",
     "quantization.storage_dtype", "4-bit weights stored as fp32 with model.dtype bf16"),
    ("{mode: 8bit}", "{policy: full}", 2, "",
     "freeze.policy", "quantized \\(8bit\\) weights cannot be trained"),
    ("{mode: 4bit, compute_dtype: fp16}", "{policy: lora}", 2, "",
     "quantization.compute_dtype", "fp16 compute is not supported on CPU"),
    ("{mode: 8bit, skip_modules: []}", "{policy: patterns, also_train: [norms, lm_head]}", 2, "",
     "freeze.also_train", "lm_head is trained but not in quantization.skip_modules"),
    ("{mode: 8bit, skip_modules: ['lm_head(']}", "{policy: lora}", 2, "",
     "quantization.skip_modules\\[0\\]", "not a valid regex"),
    ("{mode: 4bit}", "{policy: last_layers, also_train: [norms]}", 2, "",
     "freeze.policy", "last_layers trains whole blocks"),
    ("{mode: none}", "{policy: full}", 2, ", optimizer: paged_adamw_8bit",
     "train.optimizer", "paged optimizers page GPU memory"),
]


def test_refused_combinations_fail_in_validate_before_anything_loads(tiny, tmp_path):
    """`ftlaunch validate` on each refused run file, in one fresh process: exit 2 and the message,
    and afterwards none of torch, transformers, bitsandbytes, peft, deepspeed, datasets imported.
    Then a missing bitsandbytes (find_spec says so): both install hints."""
    files = []
    for i, (quant, freeze, zero, train, _, _) in enumerate(REFUSED):
        path = tmp_path / f"refused{i}.yaml"
        path.write_text(run_text(tiny["model"], tiny["text"], quant=quant, freeze=freeze,
                                 zero=zero, train=train))
        files.append(str(path))
    ok = tmp_path / "ok.yaml"
    ok.write_text(run_text(tiny["model"], tiny["text"], quant="{mode: 4bit}",
                           freeze="{policy: patterns, also_train: [norms, lm_head]}",
                           train=", optimizer: adamw_8bit"))
    missing = tmp_path / "missing.yaml"
    missing.write_text(run_text(tiny["model"], tiny["text"], quant="{mode: 8bit}",
                                train=", optimizer: adamw_8bit"))
    script = textwrap.dedent("""
        import contextlib, importlib.util, io, json, sys
        HEAVY = ("torch", "transformers", "bitsandbytes", "peft", "deepspeed", "datasets")
        from launcher import cli
        def run(path):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(["validate", path])
            return [code, err.getvalue()]
        out = [run(p) for p in sys.argv[2:]]
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
        out.append(run(sys.argv[1]))
        out.append(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
        print(json.dumps(out))
        """)
    proc = subprocess.run([sys.executable, "-c", script, str(missing), *files, str(ok)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *results, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == []
    import re
    for (code, err), (*_, key, message) in zip(results, REFUSED):
        assert code == 2 and re.search(rf"{key} \([^)]*refused[^)]*\): {message}", err), (key, err)
    code, err = results[len(REFUSED)]
    assert code == 0, err  # 4-bit + norms/lm_head + 8-bit AdamW on CPU is a valid run
    code, err = results[-1]
    assert code == 2
    assert re.search(r"quantization.mode \([^)]*\): bitsandbytes is not installed", err), err
    assert re.search(r"train.optimizer \([^)]*\): adamw_8bit is bitsandbytes' optimizer", err), err
    assert err.count("fix: pip install bitsandbytes") == 2


def test_validate_names_the_key_in_process(tiny, write_run, capsys):
    path = write_run(run_text(tiny["model"], tiny["text"], quant="{mode: 8bit}", zero=3))
    assert cli.main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "quantization.mode" in err and "fix: use deepspeed.zero_stage: 2 with 8bit" in err


@pytest.mark.slow
def test_gpu_check_quant_runs_its_code_path_on_cpu(tmp_path):
    """bench/gpu_check_quant.py --cpu-dry: the GPU section's code path with a tiny model on CPU,
    so a GPU session is not spent on a typo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    out_file = tmp_path / "quant.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check_quant.py"),
                           "--cpu-dry", "--out", str(out_file)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    section = json.loads(out_file.read_text())["quantization"]
    assert section["model"]["params"] == 131392
    runs = section["runs"]
    assert [(r["mode"], r["optimizer"]) for r in runs] == [
        ("8bit", "adamw"), ("4bit", "adamw"), ("4bit", "adamw_8bit")]
    for r in runs:
        assert "error" not in r and r["quantized_tensors"] == 14 and r["tokens_per_s"] > 0
        assert r["trainable_params"] == 16 * 2 * 1088 and len(r["losses"]) == 4  # r=16 LoRA
        assert r["optimizer_state_bytes"] > 0
    # 4-bit holds about half the bytes of 8-bit; AdamW8bit about a quarter of AdamW's state
    assert runs[1]["quantized_bytes"] < 0.6 * runs[0]["quantized_bytes"]
    assert runs[2]["optimizer_state_bytes"] < 0.3 * runs[1]["optimizer_state_bytes"]
