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

torch and transformers are imported here, lazily. A family whose forward cannot run on the
meta device (data-dependent shapes) returns the reason, and the caller uses the formula.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from launcher.memory.inventory import TRACES as _TRACES

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Traced:
    per_block: int     # one block's saved bytes (the mean of blocks 1 and 2)
    common: int        # everything outside the blocks: embeddings, final norm, logits, loss
    attn: str          # the attention kernel the traced model ran
    experts: str       # the experts implementation (MoE families), or ""


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
    return p.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1 and t.stride(-1) != 1 else p


def _fused_sdpa(device: str, b: int, s: int):
    """A TorchFunctionMode that runs sdpa with the kernel the ranks would run. On the meta device
    torch always takes sdpa's math path (which keeps the attention matrix); torch's own choice
    (`torch._fused_sdp_choice`, asked with small CPU stand-ins of the same heads, dtype and
    mask) decides instead. A fused kernel (flash / memory-efficient on GPUs, flash on CPU) keeps
    q, k, v, the output (b, s, heads, d in memory), the fp32 log-sum-exp and the mask if any.
    On GPUs dropout does not force the math path (on CPU it does)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask):
            out = q.new_empty(q.shape[:-3] + (q.shape[-2], q.shape[-3], v.shape[-1])).transpose(-2, -3)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
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
            with torch.device("cpu"):
                choice = torch._fused_sdp_choice(
                    *(_proxy(x, b, s) for x in (q, k, v)),
                    _proxy(mask, b, s) if mask is not None else None,
                    float(kw.get("dropout_p") or 0.0) if device == "cpu" else 0.0,
                    bool(kw.get("is_causal")), scale=kw.get("scale"),
                    enable_gqa=bool(kw.get("enable_gqa")))
            if choice == 0:  # the math path: what the meta device runs anyway
                return func(*args, **kwargs)
            return Fused.apply(q, k, v, mask)

    return Mode()


def _saved(hf, b: int, s: int, dtype, attn: str, trust: bool, padded: bool,
           device: str) -> tuple[int, str, str]:
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation=attn,
                                             trust_remote_code=trust)
    m.train()
    params = {p.untyped_storage()._cdata for p in m.parameters()}
    params |= {t.untyped_storage()._cdata for t in m.buffers()}
    seen: dict[int, int] = {}
    keep: list = []  # the saved tensors stay alive, so no storage id is reused while tracing

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = st.nbytes()
            keep.append(t)
        return t

    x = torch.zeros(b, s, dtype=torch.long, device="meta")
    kw = {"attention_mask": torch.ones(b, s, dtype=torch.long, device="meta")} if padded else {}
    import contextlib
    fused = _fused_sdpa(device, b, s) if m.config._attn_implementation == "sdpa" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused:
        out = m(input_ids=x, labels=x, **kw)
    del out
    return (sum(seen.values()), str(m.config._attn_implementation),
            str(getattr(m.config, "_experts_implementation", "") or ""))


def trace(path: str, b: int, s: int, dtype: str, attn: str, trust_remote_code: bool = False,
          padded: bool = False, device: str = "cuda") -> "Traced | str":
    """Traced per-block and common saved bytes, or a one-line reason it could not be traced.
    Cached by config.json's content, b, s, dtype, attention kernel, padding and the
    ranks' device (cuda or cpu: sdpa's kernel choice differs with dropout)."""
    try:
        with open(os.path.join(path, "config.json"), "rb") as fh:
            content = fh.read()
    except OSError as exc:
        return f"no config.json ({exc})"
    key = (content, b, s, dtype, attn, trust_remote_code, padded, device)
    if key not in _TRACES:
        if len(_TRACES) >= 64:
            _TRACES.clear()
        _TRACES[key] = _trace(path, b, s, dtype, attn, trust_remote_code, padded, device)
    return _TRACES[key]


def _trace(path: str, b: int, s: int, dtype: str, attn: str, trust: bool, padded: bool,
           device: str) -> "Traced | str":
    try:
        import torch
        from transformers import AutoConfig

        from launcher.config import TORCH_DTYPE
        hf = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        tdt = getattr(torch, TORCH_DTYPE[dtype])
        one, used, experts = _saved(_with_layers(hf, 1), b, s, tdt, attn, trust, padded, device)
        three, _, _ = _saved(_with_layers(hf, 3), b, s, tdt, attn, trust, padded, device)
    except Exception as exc:  # any failure of a meta forward: the caller falls back
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    per_block = (three - one) // 2
    if per_block <= 0:
        return "the traced blocks saved nothing"
    return Traced(per_block, one - per_block, used, experts)

