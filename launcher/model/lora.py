"""LoRA adapters through peft: which layers get them, applying them before `deepspeed.initialize`,
and exporting the adapter or a merged 16-bit model.

`target_modules` and `adapter_param_count` need no peft and work on a meta-device model (the memory
planner counts r x (in + out) per target from them). `apply_lora` wraps a loaded model (quantized or
not): adapters on the targets, the groups in `freeze.also_train` trainable too (embeddings, lm_head
and norms as peft `modules_to_save`, so they are saved with the adapter; biases as peft's
`bias: all`), quantized weights always frozen. torch and peft are imported inside the functions.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterable

from launcher.config.schema import LoraConfig, RunConfig
from launcher.model.device import torch_dtype
from launcher.config.errors import ConfigError, Problem
from launcher.common.log import is_rank0

ALL_LINEAR = "all-linear"
KEY = "freeze.lora.target_modules"


def _is_linear(module_or_type: Any) -> bool:
    """nn.Linear and subclasses (bitsandbytes' Linear8bitLt / Linear4bit), and GPT-2's Conv1D."""
    import torch
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    return issubclass(cls, torch.nn.Linear) or cls.__name__ == "Conv1D"


def _matches(target: str, name: str) -> bool:
    """peft's rule for a list entry (the name or a `.`-suffix of it), widened to regexes: a full
    match of the name, or a match of its trailing dotted components."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None or \
            re.search(rf"(?:^|\.)(?:{target})$", name) is not None
    except re.error:
        return False


def target_modules(module_names_and_types: Iterable[tuple[str, Any]], targets: list[str],
                   head: str | None = "lm_head") -> list[str]:
    """Full names of the linear modules that get adapters, in model order.

    module_names_and_types: (name, module or module class) pairs, e.g. `model.named_modules()`
    (a meta-device model works). targets: entries of freeze.lora.target_modules; "all-linear" is
    every linear layer except the output head `head` (peft's rule). Raises ConfigError naming a
    target that matches no module, or only non-linear ones.
    """
    items = [(n, m) for n, m in module_names_and_types if n]
    linear = [n for n, m in items if _is_linear(m)]
    chosen: set[str] = set()
    problems = []
    for i, t in enumerate(targets):
        if t == ALL_LINEAR:
            hit = [n for n in linear if n != head]
        else:
            hit = [n for n in linear if _matches(t, n)]
        if not hit:
            other = [n for n, _ in items if t != ALL_LINEAR and _matches(t, n)]
            why = (f"matches only non-linear modules ({', '.join(other[:3])})" if other
                   else "matches no module of the model")
            sample = sorted({n.rsplit(".", 1)[-1] for n in linear if n != head})
            problems.append(Problem(f"{KEY}[{i}]", f"{t!r} {why}",
                                    f"use {ALL_LINEAR} or names of linear layers, e.g. "
                                    f"{', '.join(sample[:8])}"))
        chosen.update(hit)
    if problems:
        raise ConfigError(problems)
    return [n for n in linear if n in chosen]


def output_head_name(model: Any) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def in_out(module: Any) -> tuple[int, int]:
    """(in, out) features of a linear module: nn.Linear (bitsandbytes' too), or Conv1D."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    rows, cols = module.weight.shape  # Conv1D: (in, out)
    return int(rows), int(cols)


def adapter_param_count(model: Any, lora_cfg: LoraConfig) -> int:
    """Parameters the LoRA adapters add: r x (in + out) per target (works on a meta model, no peft)."""
    modules = dict(model.named_modules())
    names = target_modules(modules.items(), list(lora_cfg.target_modules), head=output_head_name(model))
    return sum(lora_cfg.r * sum(in_out(modules[n])) for n in names)


def _also_train_modules(model: Any, cfg: RunConfig, quantized: set[str]) -> list[str]:
    """Module names for peft's modules_to_save from freeze.also_train (biases handled apart)."""
    also = cfg.freeze.also_train
    named = dict(model.named_modules())
    out: list[str] = []
    if "embeddings" in also:
        emb = model.get_input_embeddings()
        out += [n for n, m in named.items() if m is emb]
    if "lm_head" in also:
        head = output_head_name(model)
        if head is None:
            raise ConfigError([Problem("freeze.also_train", "the model has no output head (lm_head)",
                                       "remove lm_head from also_train")])
        if any(q.startswith(head + ".") for q in quantized):
            raise ConfigError([Problem("freeze.also_train", f"{head} is quantized and cannot train",
                                       f"add {head} to quantization.skip_modules")])
        out.append(head)
    if "norms" in also:
        out += [n for n, m in named.items() if n and "norm" in type(m).__name__.lower()
                and any(True for _ in m.parameters(recurse=False))]
    return out


def apply_lora(model: Any, cfg: RunConfig):
    """The peft model with adapters on the targets and the also_train groups trainable.

    Call after `quantize.prepare` and before building the optimizer / `deepspeed.initialize`.
    Quantized weights are frozen whatever the settings.
    """
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from launcher.model.quantize import is_quantized_param, quantized_names

    lc = cfg.freeze.lora
    quantized = quantized_names(model)
    targets = target_modules(model.named_modules(), list(lc.target_modules),
                             head=output_head_name(model))
    save = _also_train_modules(model, cfg, quantized)
    peft_cfg = PeftLoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
        modules_to_save=save or None, bias="all" if "biases" in cfg.freeze.also_train else "none",
        task_type="CAUSAL_LM")
    import warnings
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated property name,
        # a FutureWarning on every LoRA run that the user can do nothing about
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        peft_model = get_peft_model(model, peft_cfg)
    for _, p in peft_model.named_parameters():
        if is_quantized_param(p):
            p.requires_grad_(False)
    return peft_model


def _unwrap(model: Any) -> Any:
    """The peft model inside a DeepSpeed engine (or the model itself)."""
    while not hasattr(model, "peft_config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "peft_config"):
        raise TypeError(f"not a peft model: {type(model).__name__}")
    return model


@contextlib.contextmanager
def _gathered(params: Iterable[Any]):
    """These parameters whole inside the block: under ZeRO-3 (partitioned parameters carry
    `ds_id`) they are gathered on every rank, a collective, so every rank must enter with the same
    list; a no-op for parameters that are not partitioned or are gathered already. Callers gather
    a module at a time (or the trainable parameters alone): gathering a 70B base at once would
    hold all of it on every GPU."""
    from_zero = [p for p in params if hasattr(p, "ds_id")]
    if not from_zero:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    todo = [p for p in from_zero if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not todo:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(todo, modifier_rank=None):
        yield


def export_adapter(model: Any, out_dir: str) -> None:
    """Write the adapter (adapter_config.json + adapter_model.safetensors, with modules_to_save);
    `PeftModel.from_pretrained(base, out_dir)` loads it. Call on every rank (ZeRO-3 gathers the
    partitioned adapter); rank 0 writes. Under ZeRO 0-2 calling on rank 0 alone is enough."""
    peft_model = _unwrap(model)
    with _gathered(p for p in peft_model.parameters() if p.requires_grad):  # what it writes
        if is_rank0():
            peft_model.save_pretrained(out_dir)


def _unpack_cpu_4bit(layer: Any) -> None:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight (done by an eval-mode forward
    without grad on CPUs with AVX512-bf16; `dequantize_4bit` misreads the repacked layout).
    bitsandbytes' own `_save_to_state_dict` restores the standard layout, so a state_dict does it."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        layer.state_dict()


def merged_state_dict(model: Any, dtype: Any, keep: bool = True) -> dict[str, Any]:
    """Base weights dequantized, LoRA deltas added, modules_to_save copies taken, in dtype, on the
    host, under the plain (un-peft-ed) parameter names. Under ZeRO-3 every rank calls it (the
    gathers are collective) and the modules are gathered one at a time, so a GPU holds one
    module's full weights at most; ranks with keep=False gather and return {}."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight
    from peft.utils.other import ModulesToSaveWrapper

    peft_model = _unwrap(model)
    base = peft_model.get_base_model()
    adapters = list(peft_model.active_adapters)
    out: dict[str, Any] = {}
    handled: set[str] = set()  # module prefixes whose parameters are written already
    seen: set[int] = set()     # a tied parameter is written once, under its first name
    for name, module in base.named_modules():
        if any(name == h or name.startswith(h + ".") for h in handled):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            with _gathered(module.parameters()), torch.no_grad():
                if keep:
                    _unpack_cpu_4bit(layer)
                    w = dequantize_module_weight(layer).detach().to(torch.float32)
                    for a in adapters:
                        if a in module.lora_A:
                            w = w + module.get_delta_weight(a).to(torch.float32)
                    out[f"{name}.weight"] = w.to(dtype).cpu()
                    if getattr(layer, "bias", None) is not None:
                        out[f"{name}.bias"] = layer.bias.detach().to(dtype).cpu()
            handled.add(name)
            seen.update(id(p) for p in module.parameters())
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[adapters[0]]
            with _gathered(trained.parameters()):
                for pn, p in trained.named_parameters():
                    if keep:
                        out[f"{name}.{pn}"] = p.detach().to(dtype).cpu()
            handled.add(name)
            seen.update(id(p) for p in module.parameters())
        else:
            own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if id(p) not in seen]
            with _gathered(p for _, p in own):
                for pn, p in own:
                    if keep:
                        out[prefix + pn] = p.detach().to(dtype).cpu()
            seen.update(id(p) for _, p in own)
    return out


def export_merged(model: Any, cfg: RunConfig, out_dir: str, tokenizer: Any = None) -> None:
    """A merged Hugging Face folder in model.dtype (16-bit; an fp32 run stays fp32): the base
    dequantized, the adapter deltas added, the also_train copies in place. `from_pretrained`
    loads it without bitsandbytes or peft. Call on every rank (ZeRO-3 gathers); rank 0 writes.
    Under ZeRO 0-2 calling on rank 0 alone is enough."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(cfg.model.dtype)
    base = _unwrap(model).get_base_model()
    state = merged_state_dict(model, dtype, keep=is_rank0())  # every rank: ZeRO-3 gathers
    if not is_rank0():
        return
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {n for n in missing if n.endswith("lm_head.weight")}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise RuntimeError(f"merged export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        fresh.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    fresh.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
