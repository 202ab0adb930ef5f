"""Freeze policies: a pure selection over parameter names, applied to a model, with a report.

Why the order matters: DeepSpeed allocates gradients, fp32 master weights and optimizer state
at `deepspeed.initialize` for every parameter whose `requires_grad` is True *at that moment*.
So the rank half runs

    model = from_pretrained(...)           # (quantized or not)
    model, report = freeze.apply(model, cfg)   # requires_grad set here (LoRA adapters added here)
    engine = deepspeed.initialize(model=model, model_parameters=trainable, ...)

Freezing after `initialize` is too late: the state is already allocated for everything, and
AdamW's decoupled weight decay keeps moving the "frozen" weights through their fp32 masters.

`select` is a pure function of parameter names (unit-tested on name lists, no model needed);
`apply` calls it on a real model, sets `requires_grad` and returns a `FreezeReport`.
torch is never imported here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Iterable, Mapping, Sequence

from launcher.config.schema import FreezeConfig, RunConfig
from launcher.config.errors import ConfigError, Problem

GROUPS = ("embeddings", "layers", "norms", "lm_head", "other")

_NUM = re.compile(r"^\d+$")
_HEAD_MODULES = {"lm_head", "embed_out"}
_EMBED = re.compile(r"embed|^wte$|^wpe$|^word_embeddings$|^position_embeddings$|^tok_embeddings$")
_NORM = re.compile(r"norm|^ln(_?\w*)?$")
_PEFT_PREFIX = "base_model.model."


def _module_of(name: str) -> str:
    """The attribute name of the module holding a parameter ('q_proj' in '...q_proj.weight')."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def find_layers(names: Sequence[str]) -> list[str]:
    """Prefixes of the transformer blocks ('model.layers.0.', ...) in index order.

    The blocks are the outermost numbered container (the first all-digit component of a name)
    with the most distinct indices: model.layers.N, transformer.h.N, gpt_neox.layers.N,
    model.decoder.layers.N, peft's base_model.model.model.layers.N, ... Nested numbered
    containers (MoE experts inside a block) are never taken for the blocks. [] if none.
    """
    found: dict[str, set[int]] = {}
    order: list[str] = []
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if _NUM.match(part):
                container = ".".join(parts[:i])
                if container not in found:
                    found[container] = set()
                    order.append(container)
                found[container].add(int(part))
                break
    if not found:
        return []
    best = max(order, key=lambda c: len(found[c]))  # ties: the first seen (model order)
    prefix = f"{best}." if best else ""
    return [f"{prefix}{i}." for i in sorted(found[best])]


def is_bias(name: str) -> bool:
    """True for bias parameters ('...bias', peft's LoRA bias too)."""
    return name.rsplit(".", 1)[-1].endswith("bias")


def group_of(name: str, layers: Sequence[str]) -> str:
    """The report group of a parameter: embeddings, layers, norms, lm_head or other.

    Norms inside blocks count as norms (also_train: [norms] trains every norm); everything else
    under a block prefix is layers.
    """
    module = _module_of(name)
    plain = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    if module in _HEAD_MODULES or plain in ("output.weight", "output.bias") or \
            ".lm_head." in name or name.startswith("lm_head."):
        return "lm_head"
    if _NORM.search(module.lower()):
        return "norms"
    if any(name.startswith(p) for p in layers):
        return "layers"
    if _EMBED.search(module.lower()) or any(_EMBED.search(p) for p in name.split(".")[:-1]):
        return "embeddings"
    return "other"


def _also_train_hit(name: str, groups: Iterable[str], layers: Sequence[str]) -> str | None:
    g = group_of(name, layers)
    for want in groups:
        if want == "biases" and is_bias(name):
            return want
        if want == g:
            return want
    return None


def select(names: Sequence[str], freeze: FreezeConfig, *,
           quantized: AbstractSet[str] = frozenset(),
           tied: Mapping[str, str] | None = None) -> frozenset[str]:
    """The names of the parameters that train under `freeze` (pure; no model needed).

    names: parameter names as `model.named_parameters()` lists them. tied: alias name ->
    canonical name for tensors registered twice (tied input/output embeddings); an alias may
    appear in names too, the result holds canonical names only, so a tied tensor counts once
    and trains if any of its names is selected (and stays frozen if a freeze pattern hits any).
    quantized: names stored quantized; selecting one raises ConfigError (they cannot train).

    full: everything. last_layers: the last N blocks (negative N: the first N) + also_train.
    patterns: start all frozen, then `train` regexes (re.search), then `also_train` groups,
    then `freeze` regexes (freeze wins). lora: only also_train (adapters come from lora.py).
    A pattern matching nothing, too many layers, or nothing trainable (except lora) raise
    ConfigError naming the key. Long because it is one pass in the order above, each policy's
    step a few lines that read against this docstring.
    """
    tied = dict(tied or {})
    canon = lambda n: tied.get(n, n)  # noqa: E731
    all_names = list(dict.fromkeys(list(names) + list(tied)))
    layers = find_layers(all_names)
    why: dict[str, str] = {}  # selected name -> the key that selected it
    problems: list[Problem] = []

    def take(name: str, key: str) -> None:
        why.setdefault(name, key)

    if freeze.policy == "full":
        for n in all_names:
            take(n, "freeze.policy")
    elif freeze.policy == "last_layers":
        k = freeze.trainable_layers
        if not layers:
            problems.append(Problem("freeze.policy", "no numbered transformer blocks found in the "
                                    "parameter names (e.g. model.layers.0.)",
                                    "use policy patterns with regexes of what trains"))
        elif k == 0 or abs(k) > len(layers):
            problems.append(Problem("freeze.trainable_layers", f"{k} blocks asked, the model has "
                                    f"{len(layers)} ({layers[0]} .. {layers[-1]})",
                                    f"use 1..{len(layers)} (or -1..-{len(layers)} for the first N)"))
        else:
            chosen = layers[-k:] if k > 0 else layers[:-k]
            for n in all_names:
                if any(n.startswith(p) for p in chosen):
                    take(n, "freeze.trainable_layers")
    elif freeze.policy == "patterns":
        for i, pat in enumerate(freeze.train):
            hits = [n for n in all_names if re.search(pat, n)]
            if not hits:
                problems.append(_no_match(f"freeze.train[{i}]", pat, all_names))
            for n in hits:
                take(n, f"freeze.train[{i}]")
    for g in freeze.also_train:
        hits = [n for n in all_names if _also_train_hit(n, [g], layers)]
        if not hits:
            problems.append(Problem("freeze.also_train", f"group {g!r} matches no parameter of "
                                    "this model", f"remove {g!r} from also_train"))
        for n in hits:
            take(n, "freeze.also_train")
    frozen_by_pattern: set[str] = set()
    if freeze.policy == "patterns":
        for i, pat in enumerate(freeze.freeze):
            hits = [n for n in all_names if re.search(pat, n)]
            if not hits:
                problems.append(_no_match(f"freeze.freeze[{i}]", pat, all_names))
            frozen_by_pattern.update(canon(n) for n in hits)
    if problems:
        raise ConfigError(problems, "freeze policy")

    chosen_canon: dict[str, str] = {}
    for n, key in why.items():
        c = canon(n)
        if c not in frozen_by_pattern:
            chosen_canon.setdefault(c, key)
    bad = sorted(n for n in chosen_canon if n in quantized)
    if bad:
        keys = sorted({chosen_canon[n] for n in bad})
        raise ConfigError([Problem(keys[0], f"selects {len(bad)} quantized parameters (e.g. "
                                   f"{', '.join(bad[:3])}); quantized weights cannot train",
                                   "train only unquantized modules (also_train: [norms, lm_head]; "
                                   "add a module to quantization.skip_modules to keep it 16-bit), "
                                   "exclude them with freeze.freeze patterns, or use policy lora")],
                          "freeze policy")
    if not chosen_canon and freeze.policy != "lora":
        raise ConfigError([Problem("freeze", f"policy {freeze.policy} leaves nothing trainable",
                                   "train at least one block or group")], "freeze policy")
    return frozenset(chosen_canon)


def _no_match(key: str, pat: str, names: Sequence[str]) -> Problem:
    sample = ", ".join(names[:2] + names[-2:]) if names else "(none)"
    return Problem(key, f"pattern {pat!r} matches no parameter name", f"names look like: {sample}")


# ------------------------------------------------------------------ report
@dataclass
class GroupRow:
    group: str
    trainable_params: int = 0
    trainable_bytes: int = 0
    frozen_params: int = 0
    frozen_bytes: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0


@dataclass
class FreezeReport:
    """Trainable / frozen / quantized parameters and bytes by group (a tensor counted once)."""

    policy: str
    rows: list[GroupRow]
    trainable: frozenset[str] = field(default_factory=frozenset)
    layers: list[str] = field(default_factory=list)

    def _sum(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return self._sum("trainable_params")

    @property
    def frozen_params(self) -> int:
        return self._sum("frozen_params")

    @property
    def quantized_params(self) -> int:
        return self._sum("quantized_params")

    @property
    def total_params(self) -> int:
        return self.trainable_params + self.frozen_params + self.quantized_params

    @property
    def trainable_bytes(self) -> int:
        return self._sum("trainable_bytes")

    def render(self) -> str:
        head = ("group", "trainable", "bytes", "frozen", "bytes", "quantized", "bytes")
        body = [(r.group, f"{r.trainable_params:,}", _b(r.trainable_bytes), f"{r.frozen_params:,}",
                 _b(r.frozen_bytes), f"{r.quantized_params:,}", _b(r.quantized_bytes))
                for r in self.rows]
        tot = GroupRow("total", *(self._sum(a) for a in (
            "trainable_params", "trainable_bytes", "frozen_params", "frozen_bytes",
            "quantized_params", "quantized_bytes")))
        body.append((tot.group, f"{tot.trainable_params:,}", _b(tot.trainable_bytes),
                     f"{tot.frozen_params:,}", _b(tot.frozen_bytes), f"{tot.quantized_params:,}",
                     _b(tot.quantized_bytes)))
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths)))
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        lines = [f"freeze policy {self.policy}: {self.trainable_params:,} of {self.total_params:,} "
                 f"parameters train ({share:.2f}%)", fmt(head), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in body]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "trainable_params": self.trainable_params,
                "frozen_params": self.frozen_params, "quantized_params": self.quantized_params,
                "total_params": self.total_params, "trainable_bytes": self.trainable_bytes,
                "groups": [vars(r).copy() for r in self.rows]}


def _b(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _numel(p: Any) -> int:
    """Logical elements: the full count under ZeRO-3 partitioning, unpacked 4-bit counts."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for d in state.shape:
            n *= int(d)
        return n
    return int(p.numel())


def _nbytes(p: Any) -> int:
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel) * p.element_size()
    return int(p.numel()) * p.element_size()


def report(model: Any, policy: str, *, quantized: AbstractSet[str] = frozenset()) -> FreezeReport:
    """A FreezeReport from the model's current requires_grad flags (tied tensors counted once)."""
    names = [n for n, _ in model.named_parameters()]
    layers = find_layers(names)
    rows = {g: GroupRow(g) for g in GROUPS}
    trainable = set()
    for n, p in model.named_parameters():  # deduplicated by torch: a tied tensor appears once
        row = rows[group_of(n, layers)]
        if n in quantized:
            row.quantized_params += _numel(p)
            row.quantized_bytes += _nbytes(p)
        elif p.requires_grad:
            trainable.add(n)
            row.trainable_params += _numel(p)
            row.trainable_bytes += _nbytes(p)
        else:
            row.frozen_params += _numel(p)
            row.frozen_bytes += _nbytes(p)
    return FreezeReport(policy, [rows[g] for g in GROUPS], frozenset(trainable), layers)


def tied_names(model: Any) -> dict[str, str]:
    """alias -> canonical name for tensors registered under several names."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[n] = first[id(p)]
        else:
            first[id(p)] = n
    return out


def apply(model: Any, cfg: RunConfig, *, quantized: AbstractSet[str] | None = None
          ) -> tuple[Any, FreezeReport]:
    """Set requires_grad from cfg.freeze; returns (model, report).

    The returned model is the one to hand to `deepspeed.initialize`: the same object, except for
    policy lora, where it is the peft-wrapped model from `launcher.model.lora.apply_lora` (adapters
    and also_train groups trainable, the base and quantized weights frozen).
    Call before building the optimizer and before `deepspeed.initialize` (module docstring).
    """
    if quantized is None:
        from launcher.model.quantize import quantized_names
        quantized = quantized_names(model)
    f = cfg.freeze
    if f.policy == "lora":
        from launcher.model.lora import apply_lora
        model = apply_lora(model, cfg)
        if quantized:  # names changed under peft's wrapper (base_model.model. ... base_layer.)
            from launcher.model.quantize import quantized_names
            quantized = quantized_names(model)
        return model, report(model, f.policy, quantized=quantized)
    names = [n for n, _ in model.named_parameters()]
    chosen = select(names, f, quantized=quantized, tied=tied_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return model, report(model, f.policy, quantized=quantized)



# ------------------------------------------------------------------ login-node name check
def closest_names(pattern: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The parameter names most like a pattern that matched nothing, block indices written N
    (model.layers.N.mlp.experts.gate_up_proj), for the fix of a problem."""
    import difflib
    generic = sorted({re.sub(r"\.\d+(?=\.)", ".N", x) for x in names})
    plain = re.sub(r"[\\^$()\[\]*+?{}|]", "", pattern).replace(".N", "")
    close = difflib.get_close_matches(plain, generic, n=n, cutoff=0.3)
    if len(close) < n:  # the pattern's words inside long names
        words = [w for w in re.split(r"[^A-Za-z0-9_]+", plain) if len(w) > 2 and not w.isdigit()]
        scored = sorted(generic, key=lambda g: -sum(difflib.SequenceMatcher(
            None, w, part).ratio() for w in words for part in g.split(".")[-3:]))
        close += [g for g in scored if g not in close][: n - len(close)]
    return close


def name_problems(names: Sequence[str], freeze: FreezeConfig) -> list[Problem]:
    """What of freeze.train / freeze.freeze / also_train / lora.target_modules matches none
    of `names` (parameter names, e.g. read from the safetensors headers on the login node),
    each with the closest real names. Invalid regexes are left to the regex rule."""
    from launcher.model.lora import ALL_LINEAR, _matches
    problems: list[Problem] = []
    layers = find_layers(names)
    lists = [("freeze.train", freeze.train), ("freeze.freeze", freeze.freeze)] \
        if freeze.policy == "patterns" else []
    for key, pats in lists:
        for i, pat in enumerate(pats):
            try:
                hit = any(re.search(pat, x) for x in names)
            except re.error:
                continue
            if not hit:
                problems.append(Problem(f"{key}[{i}]", f"pattern {pat!r} matches no parameter of "
                                        "the model's weights", "closest names: " +
                                        ", ".join(closest_names(pat, names))))
    if freeze.policy != "full":
        for g in freeze.also_train:
            if not any(_also_train_hit(x, [g], layers) for x in names):
                problems.append(Problem("freeze.also_train", f"group {g!r} matches no parameter "
                                        "of the model's weights", f"remove {g!r} from also_train"))
    if freeze.policy == "lora":
        modules = sorted({x.rsplit(".", 1)[0] for x in names if x.endswith(".weight")})
        for i, t in enumerate(freeze.lora.target_modules):
            if t != ALL_LINEAR and not any(_matches(t, m) for m in modules):
                problems.append(Problem(f"freeze.lora.target_modules[{i}]", f"{t!r} matches no "
                                        "module of the model's weights", "closest modules: " +
                                        ", ".join(closest_names(t, modules))))
    return problems
