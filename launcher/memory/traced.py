"""Activations measured from the model itself: a traced forward on the meta device.

The run's architecture (its config.json, with 1 and then 3 blocks) is built on the meta device
and run forward with labels at the run's (b, s), dtype and attention kernel, under
`torch.autograd.graph.saved_tensors_hooks`: every tensor autograd keeps for the backward is
counted once (by storage; parameters excluded). Meta tensors have shapes and dtypes but no data,
so this costs no memory and well under a second, and it follows whatever the installed
transformers does for the family (its norms, attention path, MLP or experts, dropout masks,
softcapping, loss upcast). Two traces give one block and the rest:

    per_block = (saved(3 blocks) - saved(1 block)) / 2   (the mean of blocks 1 and 2: layer
                                                          patterns of period 2 are averaged)
    common    = saved(1 block) - per_block                (embeddings, final norm, logits, loss)

A run that freezes part of the model (last_layers, patterns, LoRA; quantized bases) is traced
with the run's trainable parameters (`trace_frozen`), peft's adapters and bitsandbytes' matmuls
emulated on the meta model as they save: which blocks the graph reaches, and what each keeps,
then follow from the family's own code too. It is traced at the run's own
(b, s): the bytes are not always linear in b (Falcon keeps a batch-1 mask and rotary tables).

torch and transformers are imported here, lazily. A family whose forward cannot run on the
meta device (data-dependent shapes) returns the reason, and the caller uses the formula.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

from launcher.memory.inventory import TRACES as _TRACES
import launcher.memory.facts_cache as facts_cache

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Traced:
    per_block: int     # one block's saved bytes (the mean of blocks 1 and 2)
    common: int        # everything outside the blocks: embeddings, final norm, logits, loss
    attn: str          # the attention kernel the traced model ran
    experts: str       # the experts implementation (MoE families), or ""


@dataclass(frozen=True)
class TracedBlocks:
    """A full-depth trace with the run's trainable parameters, at the run's (b, s)."""
    blocks: tuple[int, ...]  # each block's saved bytes, in order
    active: int              # blocks the graph reaches (their input needs a gradient or they train)
    common: int              # everything outside the blocks
    attn: str
    experts: str


def _with_layers(hf, n: int):
    """A copy of the config with n blocks (its per-layer lists cut or repeated to n)."""
    import copy
    hf = copy.deepcopy(hf)
    tc = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    for key in LAYER_KEYS:
        if getattr(tc, key, None) is not None:
            setattr(tc, key, n)
    for key in ("layer_types", "block_types", "mlp_only_layers"):
        seq = getattr(tc, key, None)
        if isinstance(seq, (list, tuple)) and seq and len(seq) != n:  # cut, or repeat the pattern
            setattr(tc, key, type(seq)(seq[i % len(seq)] for i in range(n)))
    return hf


def _proxy(t, b: int, s: int):
    """A small CPU tensor standing for a meta one in sdpa's kernel choice: batch 1, length 8,
    the other sizes (heads, head dim, broadcast dims), dtype and last-dim stride kept."""
    import torch
    shape = [1 if i == 0 and n == b else 8 if i >= t.dim() - 2 and n == s else n
             for i, n in enumerate(t.shape)]
    p = torch.empty(shape, dtype=t.dtype)
    p = p.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1 and t.stride(-1) != 1 else p
    return p.requires_grad_() if t.requires_grad else p  # the kernel choice can depend on it


def cuda_sdpa_kernel(dtype: str, head_dim: int, v_head_dim: int, masked: bool, gqa: bool,
                     sm: tuple[int, int] = (9, 0)) -> str:
    """The kernel torch's sdpa picks on an NVIDIA GPU of compute capability `sm` for training
    (inputs that need a gradient), in its default order flash, memory-efficient, math: "flash",
    "efficient" or "math". Read from torch's select_sdp_backend (aten/src/ATen/native/transformers/
    cuda/sdp_utils.cpp, torch 2.13): flash refuses any attn_mask, needs fp16/bf16 on sm80+ and
    equal head dims <= 256 (it takes enable_gqa); memory-efficient takes a mask and enable_gqa, fp16
    and fp32 (bf16 from sm80), head dims divisible by the GEMM alignment (8 for 16-bit, 4 for fp32
    on sm80+); anything else runs the math kernel, which keeps the attention scores. (cuDNN
    attention, first on some sm90/sm100 builds, keeps what the memory-efficient kernel keeps.)"""
    half = dtype in ("bf16", "fp16")
    if (not masked and half and sm >= (8, 0) and head_dim == v_head_dim <= 256
            and head_dim % 8 == 0):
        return "flash"
    align = 8 if half else (4 if sm >= (8, 0) else 1)
    dtype_ok = dtype in ("fp16", "fp32") or (dtype == "bf16" and sm >= (8, 0))
    if dtype_ok and sm >= (5, 0) and head_dim % align == 0 and v_head_dim % align == 0:
        return "efficient"
    return "math"


def _fused_sdpa(device: str, b: int, s: int, sm: tuple[int, int] = (9, 0)):
    """A TorchFunctionMode that runs sdpa with the kernel the ranks would run. On the meta device
    torch always takes sdpa's math path (which keeps the attention matrix); the ranks' own
    choice decides instead: on GPUs `cuda_sdpa_kernel` (torch's CUDA rules, for a card of compute
    capability `sm`), on CPU ranks torch's own `torch._fused_sdp_choice`, asked with small CPU
    stand-ins of the same heads, dtype and mask. A fused kernel keeps q, k, v, the output
    (b, s, heads, d in memory), the fp32 log-sum-exp and the mask if any; torch's sdpa turns a
    boolean mask into an additive one in the query's dtype at every call
    (`convert_boolean_attn_mask`, before the kernel is chosen, on CPU and GPU alike), so each block
    keeps its own (b, 1, s, s) copy in lp (measured on CPU: tests/test_memory_activations.py).
    On GPUs dropout does not force the math path (on CPU it does)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask):
            out = q.new_empty(q.shape[:-3] + (q.shape[-2], q.shape[-3], v.shape[-1])).transpose(-2, -3)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            if mask is not None and mask.dtype == torch.bool:  # torch's per-call conversion
                mask = mask.new_empty(mask.shape, dtype=q.dtype)
            ctx.save_for_backward(*(t for t in (q, k, v, out, lse, mask) if t is not None))
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: the trace stops after the forward
            raise NotImplementedError("traced forward only")

    sdpa = torch.nn.functional.scaled_dot_product_attention
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not sdpa:
                return func(*args, **kwargs)
            q, k, v = args[:3]
            kw = {**dict(zip(names, args[3:])), **kwargs}
            mask = kw.get("attn_mask")
            if device != "cpu":
                name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(q.dtype, "fp32")
                kernel = cuda_sdpa_kernel(name, q.shape[-1], v.shape[-1], mask is not None,
                                          bool(kw.get("enable_gqa")), sm)
                choice = 0 if kernel == "math" else 1
            else:
                with torch.device("cpu"):
                    choice = torch._fused_sdp_choice(
                        *(_proxy(x, b, s) for x in (q, k, v)),
                        _proxy(mask, b, s) if mask is not None else None,
                        float(kw.get("dropout_p") or 0.0), bool(kw.get("is_causal")),
                        scale=kw.get("scale"), enable_gqa=bool(kw.get("enable_gqa")))
            if choice == 0:  # the math path: what the meta device runs anyway
                return func(*args, **kwargs)
            return Fused.apply(q, k, v, mask)

    return Mode()


def _with_adapters(m, adapters: set[str], r: int, dropout: float) -> None:
    """LoRA adapters on the meta model, saving what peft's `lora.Linear` saves: its forward is
    base(x) + lora_B(lora_A(dropout(x))) x scaling, the adapters in the base weight's dtype."""
    import torch

    from launcher.model.lora import in_out

    class Adapted(torch.nn.Module):
        def __init__(self, base) -> None:
            super().__init__()
            inner = getattr(base, "quantized_layer", base)
            i, o = in_out(inner)
            w = next(inner.parameters())
            self.base_layer = base
            self.lora_A = torch.nn.Linear(i, r, bias=False, device="meta", dtype=w.dtype)
            self.lora_B = torch.nn.Linear(r, o, bias=False, device="meta", dtype=w.dtype)
            self.drop = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

        def forward(self, x, *args, **kwargs):
            return self.base_layer(x, *args, **kwargs) + self.lora_B(self.lora_A(self.drop(x))) * 2.0

    for t in sorted(adapters):
        parent, _, leaf = t.rpartition(".")
        holder = m.get_submodule(parent) if parent else m
        setattr(holder, leaf, Adapted(getattr(holder, leaf)))


def _with_quantized(m, modules: set[str], mode: str) -> None:
    """bitsandbytes' layers on the meta model, keeping what their matmuls keep for the backward:
    8-bit (MatMul8bitLt on GPUs, MatMul8bitFp on CPUs) the input whenever a gradient flows,
    4-bit (MatMul4Bit) nothing but the quantized weight. Their weights never train."""
    import torch

    class Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, layer):
            if mode == "8bit":
                ctx.save_for_backward(x)
            return layer(x)

        @staticmethod
        def backward(ctx, grad):  # never run: the trace stops after the forward
            raise NotImplementedError("traced forward only")

    class Quantized(torch.nn.Module):
        def __init__(self, layer) -> None:
            super().__init__()
            self.quantized_layer = layer

        def forward(self, x, *args, **kwargs):
            return Matmul.apply(x, self.quantized_layer)

    for t in sorted(modules):
        parent, _, leaf = t.rpartition(".")
        holder = m.get_submodule(parent) if parent else m
        setattr(holder, leaf, Quantized(getattr(holder, leaf)))


def _zero3_linear():
    """A TorchFunctionMode running every F.linear as DeepSpeed's ZeRO-3 linear does
    (`zero3_linear_wrap`, memory_efficient_linear: F.linear replaced for the whole process): it
    saves its input whenever a gradient flows, frozen weight or not."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, bias):
            ctx.save_for_backward(x, w, bias)
            return torch.nn.functional.linear(x, w, bias)

        @staticmethod
        def backward(ctx, grad):  # never run: the trace stops after the forward
            raise NotImplementedError("traced forward only")

    linear = torch.nn.functional.linear

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not linear:
                return func(*args, **kwargs)
            x, w, *rest = args
            return Linear.apply(x, w, kwargs.get("bias", rest[0] if rest else None))

    return Mode()


def _blocks_of(m, layers: int):
    """The model's list of decoder blocks: the largest ModuleList of `layers` modules."""
    import torch
    lists = [x for x in m.modules() if isinstance(x, torch.nn.ModuleList) and len(x) == layers]
    return max(lists, key=lambda x: sum(p.numel() for p in x.parameters()), default=None)


def _saved(hf, b: int, s: int, dtype, attn: str, trust: bool, padded: bool,
           device: str, trainable: frozenset[str] | None = None,
           checkpointing: bool = False, lora: tuple[int, float] | None = None,
           quantized: frozenset[str] = frozenset(), quant_mode: str = "none",
           zero3_linear: bool = False, packed: bool = False,
           sm: tuple[int, int] = (9, 0)) -> tuple[int, str, str]:
    """Bytes autograd keeps in a meta forward (each storage once, no parameters or buffers).
    packed: the rows are packed as launcher/data/batching.py collates them for sdpa and eager: a
    (b, 1, s, s) mask (boolean for sdpa, additive in the dtype for eager) and position ids.
    With `trainable`, only those parameters require a gradient (`T.lora_A` / `T.lora_B`: LoRA
    adapters of rank and dropout `lora` on module T) and the result is (per block bytes,
    active blocks, bytes outside the blocks) in place of the total."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation=attn,
                                             trust_remote_code=trust)
    m.train()
    if checkpointing:  # as the ranks run it: what stays outside the checkpointed blocks
        m.config.use_cache = False
        kwargs = {"use_reentrant": False, "preserve_rng_state": False, "determinism_check": "none"}
        enable = getattr(m, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    seen: dict[int, int] = {}
    owner: dict[int, int] = {}  # storage -> the block that saved it first (-1: outside)
    keep: list = []  # the saved tensors stay alive, so no storage id is reused while tracing
    where = [-1]
    reached: set[int] = set()
    if trainable is not None:
        if quantized:
            _with_quantized(m, set(quantized), quant_mode)
        adapters = {n.rpartition(".")[0] for n in trainable if n.endswith((".lora_A", ".lora_B"))}
        if adapters and lora:
            _with_adapters(m, adapters, *lora)
        for name, p in m.named_parameters():
            plain = name.replace(".base_layer.", ".").replace(".quantized_layer.", ".")
            p.requires_grad_(plain in trainable or plain.rpartition(".")[0] in trainable)
        blocks = _blocks_of(m, _layers(hf))
        if blocks is None:
            raise ValueError("no list of decoder blocks found")
        for i, blk in enumerate(blocks):
            blk.register_forward_pre_hook(_enter(i, where, reached), with_kwargs=True)
            blk.register_forward_hook(lambda *a: where.__setitem__(0, -1))
    params = {p.untyped_storage()._cdata for p in m.parameters()}  # the adapters' included
    params |= {t.untyped_storage()._cdata for t in m.buffers()}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = st.nbytes()
            owner.setdefault(st._cdata, where[0])
            keep.append(t)
        return t

    x = torch.zeros(b, s, dtype=torch.long, device="meta")
    kw = {"attention_mask": torch.ones(b, s, dtype=torch.long, device="meta")} if padded else {}
    if packed and attn in ("sdpa", "eager"):
        four = (b, 1, s, s)
        kw = {"attention_mask": torch.ones(four, dtype=torch.bool, device="meta") if attn == "sdpa"
              else torch.zeros(four, dtype=dtype, device="meta"),
              "position_ids": torch.zeros(b, s, dtype=torch.long, device="meta")}
    fused = _fused_sdpa(device, b, s, sm) if m.config._attn_implementation == "sdpa" else contextlib.nullcontext()
    z3 = _zero3_linear() if zero3_linear else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), z3, fused, _one_sequence_each():
        out = m(input_ids=x, labels=x, **kw)
    del out
    used = (str(m.config._attn_implementation),
            str(getattr(m.config, "_experts_implementation", "") or ""))
    if trainable is None:
        return (sum(seen.values()), *used)
    per = [0] * _layers(hf)
    for k, n in seen.items():
        if owner[k] >= 0:
            per[owner[k]] += n
    common = sum(n for k, n in seen.items() if owner[k] < 0)
    return ((tuple(per), len(reached), common), *used)


@contextlib.contextmanager
def _one_sequence_each():
    """transformers looks for packed sequences in the position ids when there is no cache (so
    under checkpointing), with a data-dependent test a meta tensor cannot answer; the trace's
    rows are one sequence each (the ranks give the packing mask themselves)."""
    from transformers import masking_utils
    find = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


def _layers(hf) -> int:
    tc = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return next(int(getattr(tc, k)) for k in LAYER_KEYS if getattr(tc, k, None) is not None)


def _enter(i: int, where: list, reached: set):
    """A block's forward pre-hook: saves from now on are block i's; the block is reached by the
    graph if its input needs a gradient or one of its parameters trains."""
    def hook(module, args, kwargs):
        where[0] = i
        x = args[0] if args else kwargs.get("hidden_states")
        if (getattr(x, "requires_grad", False)
                or any(p.requires_grad for p in module.parameters())):
            reached.add(i)
    return hook


def trace(path: str, b: int, s: int, dtype: str, attn: str, trust_remote_code: bool = False,
          padded: bool = False, device: str = "cuda", packed: bool = False,
          sm: tuple[int, int] = (9, 0)) -> "Traced | str":
    """Traced per-block and common saved bytes, or a one-line reason it could not be traced.
    Cached by config.json's content, b, s, dtype, attention kernel, padding or packing, the
    ranks' device (cuda or cpu: sdpa's kernel choice differs) and the GPU's compute capability."""
    return _cached(path, (b, s, dtype, attn, trust_remote_code, padded, device, packed, sm),
                   lambda: _trace(path, b, s, dtype, attn, trust_remote_code, padded, device,
                                  packed, sm))


def _cached(path: str, key: tuple, compute):
    """The trace of the model at `path` for `key` (with config.json's content), computed once
    (at most 64 kept); a failure of the meta forward is returned as its one-line reason."""
    try:
        with open(os.path.join(path, "config.json"), "rb") as fh:
            full = (fh.read(), *key)
    except OSError as exc:
        return f"no config.json ({exc})"
    if full not in _TRACES:
        if len(_TRACES) >= 64:
            _TRACES.clear()
        _TRACES[full] = facts_cache.get("trace", full, lambda: facts_cache.or_reason(compute),
                                        folder=path)  # a failed meta forward: the caller falls back
    return _TRACES[full]


def _trace(path: str, b: int, s: int, dtype: str, attn: str, trust: bool, padded: bool,
           device: str, packed: bool = False, sm: tuple[int, int] = (9, 0)) -> "Traced | str":
    import torch
    from transformers import AutoConfig

    from launcher.config.schema import TORCH_DTYPE
    hf = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    tdt = getattr(torch, TORCH_DTYPE[dtype])
    one, used, experts = _saved(_with_layers(hf, 1), b, s, tdt, attn, trust, padded, device,
                                packed=packed, sm=sm)
    three, _, _ = _saved(_with_layers(hf, 3), b, s, tdt, attn, trust, padded, device,
                         packed=packed, sm=sm)
    per_block = (three - one) // 2
    if per_block <= 0:
        return "the traced blocks saved nothing"
    return Traced(per_block, one - per_block, used, experts)


def frozen_layout(trainable: frozenset[str], layers: int, quantized: frozenset[str] = frozenset()
                  ) -> tuple[list[int], dict[str, str], int]:
    """Which blocks to trace for a partly frozen run, and how its names (trainable parameters
    and quantized modules) map onto them.

    Blocks before the first one the graph reaches (no parameter in or before them trains) save
    nothing and are left out, but for the one just before it. After it, blocks that train the
    same parameters and quantize the same modules (the usual case: last_layers, LoRA, a pattern
    per block kind) are traced as 3 and extrapolated; other runs are traced block for block.
    Returns (original indices traced, name map, first)."""
    from launcher.model.freeze import find_layers, group_of
    found = find_layers(sorted(trainable | {q + ".weight" for q in quantized}))
    container = found[0].rsplit(".", 2)[0] if found else None
    prefixes = [f"{container}.{i}." if container is not None else f"<none>.{i}."
                for i in range(layers)]
    every = trainable | quantized

    def inside(n: str) -> bool:
        return any(n.startswith(pre) for pre in prefixes)

    sig = [frozenset(("q:" if n in quantized else "") + n[len(pre):] for n in every
                     if n.startswith(pre)) for pre in prefixes]
    before = any(not inside(n) and group_of(n, prefixes) in ("embeddings", "other")
                 for n in trainable)
    first = 0 if before else next((i for i in range(layers)
                                   if any(n.startswith(prefixes[i]) for n in trainable)), layers)
    start = max(0, first - 1)  # the frozen block before: checkpointing keeps what it hands on
    rest = sig[first + 1:]
    if first >= layers:
        idx: list[int] = []
    elif layers - first > 4 and all(x == rest[0] for x in rest):
        idx = list(range(start, first + 3))
    else:
        idx = list(range(start, layers))
    names = {n: n for n in every if not inside(n)}
    for j, orig in enumerate(idx):
        pre, new = prefixes[orig], f"{container}.{j}."
        names.update({n: new + n[len(pre):] for n in every if n.startswith(pre)})
    return idx, names, first


def names_digest(names: frozenset[str]) -> str:
    """A digest of a set of names that is the same in every process (the facts kept on disk are
    keyed by it: Python's hash() of strings changes from one process to the next)."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:24]


def trace_frozen(path: str, b: int, s: int, dtype: str, attn: str, trainable: frozenset[str],
                 trust_remote_code: bool = False, padded: bool = False,
                 device: str = "cuda", checkpointing: bool = False,
                 lora: tuple[int, float] | None = None, quantized: frozenset[str] = frozenset(),
                 quant_mode: str = "none", zero3_linear: bool = False, packed: bool = False,
                 sm: tuple[int, int] = (9, 0)) -> "TracedBlocks | str":
    """A meta forward of b sequences with only `trainable` requiring a gradient, over the blocks
    `frozen_layout` picks (cached like `trace`, by the trainable names too), or a one-line reason it
    failed. checkpointing: the blocks checkpointed as the ranks run them (what the forward keeps).
    lora: (r, dropout) of the adapters named `T.lora_A` / `T.lora_B` in `trainable`.
    quantized: the modules bitsandbytes quantizes (quant_mode 8bit or 4bit). zero3_linear:
    every linear layer runs as DeepSpeed's ZeRO-3 memory-efficient linear. packed / sm: as `trace`."""
    key = ("frozen", b, s, dtype, attn, trust_remote_code, padded, device, checkpointing, lora,
           quant_mode, zero3_linear, packed, sm, names_digest(trainable),
           names_digest(quantized))
    return _cached(path, key, lambda: _trace_frozen(
        path, b, s, dtype, attn, trainable, trust_remote_code, padded, device, checkpointing, lora,
        quantized, quant_mode, zero3_linear, packed, sm))


def _trace_frozen(path: str, b: int, s: int, dtype: str, attn: str, trainable: frozenset[str],
                  trust: bool, padded: bool, device: str, checkpointing: bool,
                  lora: tuple[int, float] | None, quantized: frozenset[str],
                  quant_mode: str, zero3_linear: bool, packed: bool = False,
                  sm: tuple[int, int] = (9, 0)) -> TracedBlocks:
    import torch
    from transformers import AutoConfig

    from launcher.config.schema import TORCH_DTYPE
    hf = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    layers = _layers(hf)
    idx, names, first = frozen_layout(trainable, layers, quantized)
    (per, active, common), used, experts = _saved(
        _with_layers(hf, max(1, len(idx))), b, s, getattr(torch, TORCH_DTYPE[dtype]), attn, trust,
        padded, device, frozenset(names[n] for n in trainable if n in names), checkpointing, lora,
        frozenset(names[q] for q in quantized if q in names), quant_mode, zero3_linear, packed, sm)
    blocks = [0] * layers
    if idx and idx[-1] < layers - 1:  # extrapolated: the blocks after the first two are alike
        lead = first - idx[0]
        blocks[idx[0]:first] = per[:lead]
        later = (per[lead + 1] + per[lead + 2]) // 2
        blocks[first:] = [per[lead]] + [later] * (layers - first - 1)
        active = layers - first if active else 0
    else:
        for j, orig in enumerate(idx):
            blocks[orig] = per[j]
    return TracedBlocks(tuple(blocks), active, common, used, experts)
