"""bitsandbytes loading of the frozen base (8-bit LLM.int8, 4-bit NF4/FP4) and what it needs to train.

The rank half calls, in this order:

    check_installed(cfg)                                # clear install hint, before anything loads
    model = AutoModelForCausalLM.from_pretrained(path, dtype=..., **load_kwargs(cfg, device))
    prepare(model, cfg)                                 # before the freeze policy / LoRA
    quantized_names(model)                              # never trainable; the freeze report lists them
    optimizer = build_8bit_optimizer(cfg, params)       # only for train.optimizer adamw_8bit / paged_

torch, transformers and bitsandbytes are imported inside the functions: the login-node commands
import this module's rules (validate) without them.

Why `prepare` does less than peft's `prepare_model_for_kbit_training`: that function (1) freezes
every parameter, (2) casts every non-quantized 16-bit parameter (norms, embeddings, lm_head) to fp32
and (3) enables gradient checkpointing with input gradients. Under DeepSpeed, (1) is the freeze
policy's job (it must run before `deepspeed.initialize` and decides what trains), and (2) is undone:
with bf16 enabled, `deepspeed.initialize` casts every floating-point parameter back to bf16
(`_cast_module_mixed_precision`) and keeps its own fp32 master copy of each trainable parameter,
which is what the fp32 upcast gives a plain AMP loop. Upcasting would only cost memory (fp32
embeddings and lm_head on every rank) for nothing. So `prepare` keeps (3): with gradient
checkpointing on, the embedding output is made to require grad, so a reentrant checkpoint around a
block whose inputs come from frozen embeddings still propagates gradients into the adapters
(transformers 5 defaults to non-reentrant checkpoints, where the hook is harmless). It also checks
that no quantized tensor is stored in a floating dtype other than the training dtype, because
DeepSpeed's cast would rewrite the packed 4-bit bytes (a bf16 run with `storage_dtype: fp32`).

4-bit on CPU: on CPUs with AVX512-bf16, bitsandbytes repacks a Linear4bit's weight for its CPU
kernel at the first eval-mode forward without grad, rounding the block scales (absmax) to bf16;
a state_dict undoes the layout only approximately. The frozen base would then change on the first
evaluation (logits moved by about 4e-3 on the tiny test model). `prepare` switches that path off
(`support_avx512bf16_for_cpu = False`) so the base stays bit-identical through evaluation and
checkpoints; CPU evaluation is a little slower, GPUs are unaffected.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Iterable

from launcher.config.schema import RunConfig
from launcher.model.device import torch_dtype
from launcher.config.errors import ConfigError, Problem

QUANTIZED_PARAM_CLASSES = ("Int8Params", "Params4bit")


def needs_bitsandbytes(cfg: RunConfig) -> bool:
    """True when the run loads a quantized base or uses a bitsandbytes optimizer."""
    return cfg.quantization.mode != "none" or cfg.train.optimizer != "adamw"


def missing_bitsandbytes(cfg: RunConfig) -> list[Problem]:
    """The problems of a run that needs bitsandbytes where it is not installed (no import:
    the login-node rule in validate asks this too)."""
    if not needs_bitsandbytes(cfg) or importlib.util.find_spec("bitsandbytes") is not None:
        return []
    out = []
    if cfg.quantization.mode != "none":
        out.append(Problem("quantization.mode", "bitsandbytes is not installed",
                           "pip install bitsandbytes (or quantization.mode: none)"))
    if cfg.train.optimizer != "adamw":
        out.append(Problem("train.optimizer", f"{cfg.train.optimizer} is bitsandbytes' optimizer "
                           "and bitsandbytes is not installed",
                           "pip install bitsandbytes (or optimizer: adamw)"))
    return out


def check_installed(cfg: RunConfig) -> None:
    """ConfigError with an install hint if bitsandbytes is missing or fails to import."""
    missing = missing_bitsandbytes(cfg)
    if missing:
        raise ConfigError(missing)
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken install (missing native library) fails here, not mid-load
        key = "quantization.mode" if cfg.quantization.mode != "none" else "train.optimizer"
        raise ConfigError([Problem(key, f"bitsandbytes is installed but fails to import: {exc}",
                                   "pip install --force-reinstall bitsandbytes")]) from exc


def bnb_config(cfg: RunConfig):
    """The transformers `BitsAndBytesConfig` for cfg.quantization, or None for mode none."""
    q = cfg.quantization
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.int8_threshold,
                                  llm_int8_skip_modules=list(q.skip_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype or cfg.model.dtype),
        bnb_4bit_quant_storage=torch_dtype(q.storage_dtype),
        llm_int8_skip_modules=list(q.skip_modules),  # transformers reads it for 4-bit too
    )


def load_kwargs(cfg: RunConfig, device: Any) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs: {} for mode none, else the quantization config and a
    device_map that puts this rank's whole copy on `device` (its local rank's GPU, or "cpu")."""
    if cfg.quantization.mode == "none":
        return {}
    return {"quantization_config": bnb_config(cfg), "device_map": {"": device}}


def is_quantized_param(p: Any) -> bool:
    return type(p).__name__ in QUANTIZED_PARAM_CLASSES


def quantized_names(model: Any) -> set[str]:
    """Names of the parameters stored quantized (bitsandbytes Int8Params / Params4bit)."""
    return {n for n, p in model.named_parameters() if is_quantized_param(p)}


def prepare(model: Any, cfg: RunConfig) -> None:
    """Make a quantized base ready for the freeze policy / LoRA (see the module docstring)."""
    if cfg.quantization.mode == "none":
        return
    names = quantized_names(model)
    if not names:
        raise ConfigError([Problem("quantization.skip_modules", "quantization is on but no "
                                   "parameter was quantized (every linear layer was skipped)",
                                   "keep only modules that must stay 16-bit, e.g. [lm_head]")])
    train_dtype = torch_dtype(cfg.model.dtype)
    bad = sorted(n for n, p in model.named_parameters()
                 if n in names and p.is_floating_point() and p.dtype != train_dtype)
    if bad and cfg.model.dtype in ("bf16", "fp16"):
        raise ConfigError([Problem("quantization.storage_dtype", f"{len(bad)} quantized tensors "
                                   f"(e.g. {bad[0]}) are stored as {cfg.quantization.storage_dtype}; "
                                   f"deepspeed.initialize casts floating parameters to "
                                   f"{cfg.model.dtype} and would corrupt the packed weights",
                                   f"use storage_dtype: uint8 or {cfg.model.dtype}")])
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False  # see the module docstring (4-bit on CPU)
    if cfg.model.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def quantized_bytes(model: Any) -> int:
    """Bytes held by the quantized weights, with their per-block constants (for reports)."""
    total = 0
    for _n, p in model.named_parameters():
        if not is_quantized_param(p):
            continue
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:  # 4-bit: absmax (double-quantized: its own absmax + code)
            for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
                if t is not None:
                    total += t.numel() * t.element_size()
        scb = getattr(p, "SCB", None)
        if scb is not None:  # 8-bit: one fp32 scale per row
            total += scb.numel() * scb.element_size()
    return total


def build_8bit_optimizer(cfg: RunConfig, params: Iterable[Any]):
    """bitsandbytes' AdamW8bit (or PagedAdamW8bit) over params, from cfg.train; passed to
    `deepspeed.initialize(optimizer=...)` (the DeepSpeed config has no optimizer section then).

    State: 1 byte per element for each of the two moments, plus one fp32 absmax per 256-element
    block per moment; tensors under `min_8bit_size` (4096) elements keep fp32 state. Under ZeRO-1/2
    the optimizer sees DeepSpeed's flat fp32 partitions, so all of it is 8-bit.
    """
    t = cfg.train
    if t.optimizer == "adamw":
        raise ValueError("build_8bit_optimizer is for adamw_8bit / paged_adamw_8bit")
    check_installed(cfg)
    import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(list(params), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)

