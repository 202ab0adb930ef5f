"""What a CPU rank holds beyond the plan's tensors, measured on this machine where it can be.

A CPU rank's memory above its baseline (after imports and a code warm-up) is the plan's tensors
plus two things no formula over the model gives:

- **kernels**: the code and scratch buffers oneDNN generates at the first use of each matrix
  shape. They depend on the processor: where bf16 has hardware support (AVX512-BF16, AMX) bf16
  GEMMs generate many more kernels. Measured on the tiny Llama of the tests (b=2, s=32): 16.6 MB
  bf16 and 4.0 MB fp32 on a Xeon with AMX; about 3 MB bf16 on an EPYC without AVX512-BF16.
- **bookkeeping**: DeepSpeed's and gloo's buffers and Python objects, which do not depend on
  the processor (`BOOKKEEPING`).

`measure(cfg)` measures the kernels here: a subprocess builds the run's model with one block
(every block has the same shapes), runs a forward and backward at the run's micro batch and
sequence length twice, frees every tensor and reports how much resident memory stayed. The
answer is cached per processor, torch version, model config and shape, so a second plan costs
nothing. Where it is not measured (a Slurm job plans for other machines), the plan states the
range `KERNELS_RANGE` and counts its upper end.

    python -m launcher.memory.probe MODEL_DIR DTYPE MICRO SEQ [ATTN]   # prints {"kernels": N}
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from typing import Any

from launcher.common.files import cache_root, write_atomic
from launcher.memory.terms import Term, gib
from launcher.memory.reference import sequences_per_micro_batch

MIB = 2**20
# Where the kernels are not measured: the range seen across processors (lowest: fp32 or bf16
# without hardware bf16; highest: bf16 with AMX), for the tiny and 20M Llamas of the tests.
KERNELS_RANGE = {"fp32": (1 * MIB, 8 * MIB), "bf16": (1 * MIB, 20 * MIB), "fp16": (1 * MIB, 20 * MIB)}
# DeepSpeed's and gloo's own buffers and objects per rank, by ZeRO stage: the rank's peak above
# its baseline minus the plan's tensors, with the kernels warmed before the baseline
# (bench/plan_vs_measured.py --warm-shapes; the same on every processor).
BOOKKEEPING = {0: 11 * MIB // 2, 1: 11 * MIB // 2, 2: 11 * MIB // 2, 3: 15 * MIB // 2}
MMAP_THRESHOLD = 65536   # CPU ranks run with it: a freed tensor leaves RSS at once
def cache_file() -> str:
    """The measured kernels terms, by machine and shape: runtime-probe.json under the cache root."""
    return os.path.join(cache_root(), "runtime-probe.json")


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def warm_code() -> None:
    """Run each kind of kernel once on a few bytes of data, as before a baseline: the first AdamW
    step alone maps ~75 MB of lazily imported code (torch._dynamo and friends), the first bf16
    matmul loads oneDNN. That is code, not the run's data, and the plan does not count it."""
    import torch
    import torch.utils.checkpoint
    for dt in (torch.float32, torch.bfloat16):
        w = torch.nn.Parameter(torch.randn(8, 8, dtype=dt))
        q = torch.randn(1, 2, 4, 4, dtype=dt, requires_grad=True)
        out = (torch.randn(2, 8, dtype=dt) @ w).float()
        att = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        ckpt = torch.utils.checkpoint.checkpoint(torch.nn.functional.silu, out, use_reentrant=False)
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([1, 2])) + att.float().sum() \
            + ckpt.sum()
        loss.backward()
        for foreach in (False, True):
            torch.optim.AdamW([w], foreach=foreach).step()


def one_block_model(model_dir: str, dtype: str, attn: str | None = None,
                    trust_remote_code: bool = False):
    """The model of model_dir with a single block, randomly initialised, in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model.device import torch_dtype
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, 1)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:1]
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.train()
    return model


def kernel_bytes(model_dir: str, dtype: str, micro: int, seq: int, attn: str | None = None,
                 trust_remote_code: bool = False) -> int:
    """In this process: resident bytes that stay after the first forward and backward at the
    run's shapes, once every tensor they made is freed (run with MALLOC_MMAP_THRESHOLD_ set)."""
    import gc

    import torch
    warm_code()
    model = one_block_model(model_dir, dtype, attn, trust_remote_code)
    vocab = int(getattr(model.config, "vocab_size", 256) or 256)
    gc.collect()
    base = _rss()
    for _ in range(2):
        x = torch.randint(0, vocab, (micro, seq))
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        loss.backward()
        del loss, x
        for p in model.parameters():
            p.grad = None
        gc.collect()
    return max(0, _rss() - base)


def _machine_key() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "flags")):
                    flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:16]


def cache_key(model_dir: str, dtype: str, micro: int, seq: int, attn: str | None) -> str:
    try:
        with open(os.path.join(model_dir, "config.json"), "rb") as fh:
            conf = hashlib.sha256(fh.read()).hexdigest()[:16]
    except OSError:
        conf = "none"
    from importlib.metadata import PackageNotFoundError, version
    try:
        torch_v = version("torch")
    except PackageNotFoundError:
        torch_v = "none"
    return f"{_machine_key()}/{torch_v}/{conf}/{dtype}/{micro}x{seq}/{attn or 'default'}"


def _read_cache() -> dict[str, int]:
    try:
        with open(cache_file(), encoding="utf-8") as fh:
            data = json.load(fh)
        return {k: int(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}


def _write_cache(key: str, value: int) -> None:
    data = _read_cache()
    data[key] = value
    try:
        os.makedirs(os.path.dirname(cache_file()), exist_ok=True)
        write_atomic(cache_file(), json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # an unwritable cache only costs the next plan another probe


def measure(cfg: Any, timeout: float = 300) -> int | None:
    """The kernels term for cfg's CPU ranks on this machine (cached), or None where the probe
    could not run (the plan then states the range)."""
    m = cfg.model
    args = [m.path, m.dtype, str(sequences_per_micro_batch(cfg)), str(cfg.data.max_seq_len),
            m.attn_implementation or ""]
    key = cache_key(m.path, m.dtype, sequences_per_micro_batch(cfg), cfg.data.max_seq_len,
                    m.attn_implementation)
    cached = _read_cache().get(key)
    if cached is not None:
        return cached
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if m.trust_remote_code:
        args.append("--trust-remote-code")
    try:
        proc = subprocess.run([sys.executable, "-m", "launcher.memory.probe", *args], env=env,
                              capture_output=True, text=True, timeout=timeout)
        value = int(json.loads(proc.stdout.strip().splitlines()[-1])["kernels"])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return None
    _write_cache(key, value)
    return value

def cpu_runtime_terms(cfg: Any, kernels: int | None) -> list[Term]:
    """A CPU rank's DeepSpeed/gloo bookkeeping (a constant) and its oneDNN kernels: measured on
    this machine where given, else the processor-dependent range counted at its upper end."""
    stage = cfg.deepspeed.zero_stage
    book = Term("runtime", "rank runtime (DeepSpeed, gloo)", BOOKKEEPING[stage], "overhead",
                f"constant for ZeRO-{stage} CPU ranks: the peak above the baseline minus the "
                "plan's tensors, with the kernels warmed below the baseline (the same on every "
                "processor)", "bench/plan_vs_measured.py, PVM_WARM_SHAPES=1")
    if kernels is not None:
        return [book, Term("kernels", "oneDNN kernels (measured here)", kernels, "overhead",
                           "measured on this machine: resident bytes left by the first forward "
                           "and backward of one block at the run's micro batch and length",
                           "launcher/memory/probe.py")]
    lo, hi = KERNELS_RANGE[cfg.model.dtype]
    return [book, Term("kernels", f"oneDNN kernels ({gib(lo)}-{gib(hi)}, not measured)", hi,
                       "overhead", f"range for {cfg.model.dtype} across processors (high with "
                       "AVX512-BF16/AMX), counted at its upper end; `ftlaunch plan --probe` and "
                       "`ftlaunch run` measure it on this machine",
                       "launcher/memory/probe.py KERNELS_RANGE", low=lo)]


def main(argv: list[str]) -> int:
    trust = "--trust-remote-code" in argv
    argv = [a for a in argv if a != "--trust-remote-code"]
    model_dir, dtype, micro, seq = argv[0], argv[1], int(argv[2]), int(argv[3])
    attn = argv[4] if len(argv) > 4 and argv[4] else None
    print(json.dumps({"kernels": kernel_bytes(model_dir, dtype, micro, seq, attn, trust)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

