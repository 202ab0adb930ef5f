"""The memory planner's model: parameters of a meta-device model, after quantization and freezing.

`inventory(cfg)` builds the model from its folder's `config.json` on the meta device (no weight
is read; torch and transformers are imported here, lazily, for that alone), then decides for
every parameter what the rank half will do with it, with the same rules:

- quantized or not: transformers' own bitsandbytes rule (every `nn.Linear` / `Conv1D` whose name
  passes `should_convert_module` against `get_modules_to_not_convert(model, skip_modules,
  model._keep_in_fp32_modules)`, exactly what `from_pretrained(quantization_config=...)` calls);
- trainable or not: `launcher.model.freeze.select` (the function the ranks apply), LoRA adapters from
  `launcher.model.lora.target_modules` (r x in + out x r per target, in the training dtype, as
  DeepSpeed casts every floating parameter to it);
- storage bytes, from bitsandbytes' storage layout (bitsandbytes 0.50, read from its source and
  checked against loaded models in tests/test_memory_quant.py):
  8-bit (`Int8Params`): int8 weight (1 B/element) + one fp32 scale per output row (`SCB`);
  4-bit (`Params4bit`, blocksize 64): packed 2 elements/byte + one absmax per 64 elements:
  fp32 without double quantization; with it, uint8 absmax + fp32 absmax per 256 blocks + its
  256-entry fp32 code + an fp32 offset; plus each weight's own 16-entry fp32 code.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

from launcher.config.schema import DTYPE_BYTES, RunConfig
from launcher.config.errors import ConfigError, Problem
import launcher.memory.facts_cache as facts_cache

BNB4_BLOCK = 64          # Params4bit default blocksize (bitsandbytes.nn.modules.Params4bit)
BNB4_NESTED_BLOCK = 256  # quantize_blockwise blocksize for the double-quantized absmax
BNB4_CODE_BYTES = 16 * 4
BNB4_NESTED_CODE_BYTES = 256 * 4


@dataclass(frozen=True)
class Shape:
    """The numbers from config.json that activations depend on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated_mlp: bool      # SiLU-gated MLP (Llama family) vs two-matrix MLP
    known: bool          # a family whose activations were enumerated tensor by tensor


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    group: str           # freeze.group_of: embeddings, layers, norms, lm_head, other; or adapters
    trainable: bool
    quant: str           # "none", "8bit", "4bit"
    nbytes: int          # storage bytes in the training dtype or quantized (+ constants)
    module_numel: int = 0  # elements of the module owning it (ZeRO-3 gathers per module)
    decay: bool = True     # in the weight-decay group (launcher/model/decay.py: not biases or norms)


@dataclass(frozen=True)
class Inventory:
    shape: Shape
    params: tuple[Param, ...]
    buffer_bytes: int
    lp_bytes: int                  # bytes per element of the training dtype
    policy: str
    largest_module_numel: int = 0  # biggest module's own parameter elements (ZeRO-3 gather)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def _sum(self, attr: str, pred) -> int:
        return sum(getattr(p, attr) for p in self.params if pred(p))

    @property
    def total(self) -> int:
        return self._sum("numel", lambda p: True)

    @property
    def trainable(self) -> int:
        return self._sum("numel", lambda p: p.trainable)

    @property
    def frozen(self) -> int:
        return self._sum("numel", lambda p: not p.trainable and p.quant == "none")

    @property
    def quantized(self) -> int:
        return self._sum("numel", lambda p: p.quant != "none")

    @property
    def weight_bytes(self) -> int:
        return self._sum("nbytes", lambda p: True) + self.buffer_bytes

    def groups(self) -> list[dict[str, Any]]:
        """Counts and bytes by group: trainable / frozen / quantized."""
        order = ["embeddings", "layers", "norms", "lm_head", "other", "adapters", "copies"]
        rows: dict[str, dict[str, int]] = {}
        for p in self.params:
            r = rows.setdefault(p.group, {k: 0 for k in (
                "trainable", "trainable_bytes", "frozen", "frozen_bytes", "quantized",
                "quantized_bytes")})
            kind = "trainable" if p.trainable else "quantized" if p.quant != "none" else "frozen"
            r[kind] += p.numel
            r[kind + "_bytes"] += p.nbytes
        return [{"group": g, **rows[g]} for g in order if g in rows]


# ------------------------------------------------------------------ the meta-device model
@functools.lru_cache(maxsize=8)
def _meta_model_cached(path: str, trust_remote_code: bool, _mtime: float):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=trust_remote_code)
    return model


def meta_model(path: str, trust_remote_code: bool = False):
    """The model of `path`/config.json on the meta device (cached; no weight is read)."""
    cfg_file = os.path.join(path, "config.json")
    try:
        mtime = os.path.getmtime(cfg_file)
    except OSError:
        raise ConfigError([Problem("model.path", f"no config.json in {path}",
                                   "point model.path at a Hugging Face model folder")]) from None
    try:
        return _meta_model_cached(os.path.abspath(path), trust_remote_code, mtime)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError([Problem("model.path", f"cannot build a model from {cfg_file}: {exc}",
                                   "check config.json (model_type, sizes), or set "
                                   "model.trust_remote_code: true for custom code")]) from exc


def meta_model_for(cfg: RunConfig):
    """The run's model on the meta device (cached): for other name-based checks."""
    return meta_model(cfg.model.path, cfg.model.trust_remote_code)


def clear_meta_cache() -> None:
    """Forget the cached meta-device models, inventories and traced activations (the next plan
    reads config.json again)."""
    _meta_model_cached.cache_clear()
    _INVENTORIES.clear()
    TRACES.clear()


def _text_config(hf: Any) -> Any:
    get = getattr(hf, "get_text_config", None)
    return get() if get else hf


def shape_of(model: Any) -> Shape:
    hf = _text_config(model.config)

    def pick(*names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(hf, n, None)
            if v is not None:
                return v
        return default

    hidden = int(pick("hidden_size", "n_embd", "d_model"))
    heads = int(pick("num_attention_heads", "n_head", "num_heads"))
    head_dim = int(pick("head_dim", default=hidden // heads))
    mlp = next((m for n, m in model.named_modules() if n.endswith(".mlp") or n.endswith("mlp")), None)
    gated = mlp is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")
    known = gated and any(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    return Shape(
        model_type=str(getattr(hf, "model_type", "?")),
        hidden=hidden,
        layers=int(pick("num_hidden_layers", "n_layer", "num_layers")),
        heads=heads,
        kv_heads=int(pick("num_key_value_heads", default=heads)),
        head_dim=head_dim,
        intermediate=int(pick("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden),
        vocab=int(pick("vocab_size")),
        tied=bool(getattr(model.config, "tie_word_embeddings", False)),
        gated_mlp=gated,
        known=known,
    )


# ------------------------------------------------------------------ quantized storage
def bytes_8bit(rows: int, cols: int) -> int:
    """Int8Params: int8 weight + fp32 scale per output row (SCB)."""
    return rows * cols + 4 * rows


def bytes_4bit(numel: int, double_quant: bool) -> int:
    """Params4bit (blocksize 64): packed weight, absmax, and the quantization codes."""
    blocks = -(-numel // BNB4_BLOCK)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + 4 * blocks + BNB4_CODE_BYTES
    nested = -(-blocks // BNB4_NESTED_BLOCK)
    return packed + blocks + 4 * nested + BNB4_CODE_BYTES + BNB4_NESTED_CODE_BYTES + 4


def quantized_modules(model: Any, cfg: RunConfig) -> set[str]:
    """Names of the linear modules that transformers' bitsandbytes path replaces."""
    if cfg.quantization.mode == "none":
        return set()
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module
    skip = HfQuantizer.get_modules_to_not_convert(
        model, list(cfg.quantization.skip_modules), getattr(model, "_keep_in_fp32_modules", None))
    out = set()
    for name, module in model.named_modules():
        if not name or not should_convert_module(name, skip):
            continue
        if type(module) is torch.nn.Linear or type(module).__name__ == "Conv1D":
            out.add(name)
    return out


# ------------------------------------------------------------------ inventory
_INVENTORIES: dict[tuple, "Inventory"] = {}
TRACES: dict[tuple, object] = {}  # traced activations (launcher/memory/traced.py), same lifetime


def inventory(cfg: RunConfig) -> Inventory:
    """`build_inventory(cfg)`, cached by config.json's content and the model, freeze and
    quantization settings (a second plan of the same model, and the advice, reuse it; on disk
    too: launcher/memory/facts_cache.py)."""
    try:
        with open(os.path.join(cfg.model.path, "config.json"), "rb") as fh:
            content = fh.read()
    except OSError:
        return build_inventory(cfg)
    key = (os.path.abspath(cfg.model.path), content, repr(cfg.model), repr(cfg.freeze),
           repr(cfg.quantization))
    if key not in _INVENTORIES:
        if len(_INVENTORIES) >= 64:
            _INVENTORIES.clear()
        # on disk without the folder's path: a copy of the model plans from the same facts
        _INVENTORIES[key] = facts_cache.get("inventory", key[1:], lambda: build_inventory(cfg),
                                            folder=cfg.model.path)
    return _INVENTORIES[key]


def build_inventory(cfg: RunConfig) -> Inventory:
    """Every parameter the run will hold, with its group, trainability and storage bytes.

    Raises ConfigError (naming the key) for freeze patterns or LoRA targets matching nothing,
    too many layers, quantized parameters selected for training.
    """
    from launcher.model import decay, freeze
    model = meta_model(cfg.model.path, cfg.model.trust_remote_code)
    decays = decay.decay_names(model)
    shape = shape_of(model)
    lp = DTYPE_BYTES[cfg.model.dtype]
    q = cfg.quantization
    qmods = quantized_modules(model, cfg)
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    layers = freeze.find_layers(names)
    modules = dict(model.named_modules())
    owner_numel = {mn: sum(p.numel() for p in m.parameters(recurse=False))
                   for mn, m in modules.items()}
    quant_names: dict[str, str] = {}
    for n, _p in named:
        mod, _, leaf = n.rpartition(".")
        if mod in qmods and leaf == "weight":
            quant_names[n] = q.mode
    if q.mode != "none" and not quant_names:
        raise ConfigError([Problem("quantization.skip_modules", "quantization is on but no "
                                   "linear layer would be quantized", "keep only modules that must "
                                   "stay 16-bit in skip_modules, e.g. [lm_head]")])
    trainable = freeze.select(names, cfg.freeze, quantized=frozenset(quant_names),
                              tied=freeze.tied_names(model))
    params: list[Param] = []
    for n, p in named:
        mod = n.rpartition(".")[0]
        numel = p.numel()
        kind = quant_names.get(n, "none")
        if kind == "8bit":
            nbytes = bytes_8bit(p.shape[0], numel // p.shape[0])
        elif kind == "4bit":
            nbytes = bytes_4bit(numel, q.double_quant)
        else:
            nbytes = numel * lp
        params.append(Param(n, numel, freeze.group_of(n, layers), n in trainable, kind, nbytes,
                            owner_numel.get(mod, numel), n in decays))
    notes: list[str] = []
    if cfg.freeze.policy == "lora":
        params = _lora_params(model, cfg, params, lp, notes)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    largest = max(owner_numel.values(), default=0)
    return Inventory(shape, tuple(params), buffer_bytes, lp, cfg.freeze.policy, largest,
                     tuple(notes))


def _lora_params(model: Any, cfg: RunConfig, base: list[Param], lp: int,
                 notes: list[str]) -> list[Param]:
    """Under LoRA: base parameters frozen except biases (peft bias 'all'), adapters added, and a
    trainable copy of every also_train module (peft modules_to_save keeps the original too)."""
    from launcher.model import lora
    lc = cfg.freeze.lora
    modules = dict(model.named_modules())
    targets = lora.target_modules(modules.items(), list(lc.target_modules),
                                  head=lora.output_head_name(model))
    out: list[Param] = []
    also = cfg.freeze.also_train
    copied = set()
    for p in base:
        if p.trainable and p.name.rpartition(".")[2] != "bias":
            copied.add(p.name)
            out.append(Param(p.name, p.numel, p.group, False, p.quant, p.nbytes, p.module_numel))
            out.append(Param(p.name + " (trained copy)", p.numel, "copies", True, "none",
                             p.numel * lp, p.module_numel, p.decay))
        else:
            out.append(p)
    for t in targets:
        i, o = lora.in_out(modules[t])
        out.append(Param(f"{t}.lora_A", lc.r * i, "adapters", True, "none", lc.r * i * lp, lc.r * i))
        out.append(Param(f"{t}.lora_B", o * lc.r, "adapters", True, "none", o * lc.r * lp, o * lc.r))
    if copied:
        notes.append(f"lora with also_train {list(also)}: peft keeps the original and a trained "
                     f"copy (modules_to_save) of {len(copied)} tensors")
    return out
