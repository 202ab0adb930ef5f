"""Quantized storage and 8-bit optimizer state: the plan's bytes against bitsandbytes' own tensors."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

RUN = """\
name: q
model: {{path: {model}, dtype: bf16}}
data: {{path: {data}, max_seq_len: 64}}
train: {{max_steps: 1, device: cpu}}
quantization: {quant}
freeze: {{policy: patterns, also_train: [norms, lm_head]}}
"""


def _storage(model) -> dict[str, int]:
    """Bytes per parameter name: the stored tensor and its bitsandbytes constants."""
    out = {}
    for n, p in model.named_parameters():
        ts = [p.data, getattr(p, "SCB", None)]
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            ts += [qs.absmax, qs.code, qs.offset]
            if qs.state2 is not None:
                ts += [qs.state2.absmax, qs.state2.code]
        out[n] = sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["{mode: 8bit}", "{mode: 4bit, double_quant: true}",
                                   "{mode: 4bit, double_quant: false, quant_type: fp4}"])
def test_quantized_bytes_equal_loaded_model(tiny, tmp_path, quant):
    from transformers import AutoModelForCausalLM

    from launcher import memory
    from launcher.model import quantize
    from launcher.config.runfile import load
    run = tmp_path / "run.yaml"
    run.write_text(RUN.format(model=tiny["model"], data=tiny["text"], quant=quant))
    cfg = load(str(run))
    inv = memory.plan(cfg, world_size=1, advise=False).inv
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.bfloat16,
                                                 **quantize.load_kwargs(cfg, "cpu"))
    real = _storage(model)
    planned = {p.name: p.nbytes for p in inv.params}
    assert set(planned) == set(real)
    qnames = quantize.quantized_names(model)
    assert {p.name for p in inv.params if p.quant != "none"} == qnames and qnames
    assert {n: planned[n] for n in qnames} == {n: real[n] for n in qnames}
    assert sum(planned.values()) == sum(real.values())


@pytest.mark.slow
def test_adam8bit_state_bytes_equal_bitsandbytes():
    import bitsandbytes as bnb

    from launcher.memory.terms import adam8_state_bytes
    shapes = [(64,), (64, 64), (100, 300), (4097,), (1000, 1000)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    seen, real = set(), 0
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k not in ("qmap1", "qmap2") and v.dim() > 0:
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    real += v.numel() * v.element_size()
    numels = [p.numel() for p in params]
    assert adam8_state_bytes(numels) == real
    # about 2.03 bytes per element for large tensors, against 8 for AdamW
    assert adam8_state_bytes([10**6]) / 10**6 == pytest.approx(2.03125, abs=1e-4)
