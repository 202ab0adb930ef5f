"""GPU cards the plan and validate know by name: memory, compute capability, peak FLOP/s.

Torch-free, for the login node: `cluster.gpu_type` names the target card (validated against
`CARDS` with "did you mean"), the plan takes the GPU memory from it when `--gpu-memory` is not
given, and validate refuses what the card cannot run (bf16 or flash attention below sm80).
`from_device_name` maps a name as `nvidia-smi --query-gpu=name` or `torch.cuda.get_device_name`
report it to the row, and `same_card` compares a node's card with `cluster.gpu_type` (for
preflight, which records each node's name, compute capability and driver).

Units: GB = 10**9 bytes, GiB = 2**30 bytes. `memory` is the card's total as the driver reports it
(`nvidia-smi --query-gpu=memory.total`, MiB = 2**20 bytes; for AMD `rocm-smi`), which is what
`torch.cuda.get_device_properties(i).total_memory` returns up to the driver's reserve: a card sold
as "80GB" reports 81,559 MiB (H100) or 81,920 MiB (A100), about 79.6-80 GiB, of which the
CUDA context takes its part before any tensor (the plan's "CUDA context" term). Peak FLOP/s are
the vendors' dense (no sparsity) tensor-core figures for bf16 and fp16 with fp32 accumulation
(None where the card has no such unit), TF32 tensor-core (dense) and plain fp32; the time
estimate (launcher/memory/clock.py) divides a step's FLOPs by the one of the training dtype.
Sources: NVIDIA's data sheets (A100, H100, H200, L40S,
L4, A10, V100, T4, RTX A6000), AMD's (MI250X, MI300X); memory totals as the driver reports them
(recorded from such cards, not measured here: docs/gpu-results.md lists the check).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional

MIB = 2**20


@dataclass(frozen=True)
class Card:
    name: str                       # the run file's spelling (cluster.gpu_type)
    memory: int                     # bytes the driver reports (nvidia-smi memory.total)
    sm: Optional[tuple[int, int]]   # CUDA compute capability; None for AMD (ROCm) cards
    bf16_flops: Optional[float]     # peak dense bf16 tensor FLOP/s; None: no bf16 tensor cores
    fp16_flops: float               # peak dense fp16 tensor FLOP/s (fp32 accumulate)
    matches: tuple[str, ...]        # lower-case patterns of the names nvidia-smi / torch report
    source: str
    fp32_flops: Optional[float] = None  # peak fp32 FLOP/s (CUDA cores; AMD: matrix fp32)
    tf32_flops: Optional[float] = None  # peak dense TF32 tensor FLOP/s; None: no TF32 unit

    def peak_flops(self, dtype: str, tf32: bool = False) -> tuple[Optional[float], str]:
        """(peak dense FLOP/s of the training dtype's matrix products, which unit): bf16 and fp16
        on the tensor cores, fp32 on TF32 tensor cores with train.tf32, else plain fp32."""
        if dtype == "bf16":
            return self.bf16_flops, "bf16 tensor"
        if dtype == "fp16":
            return self.fp16_flops, "fp16 tensor"
        if tf32 and self.tf32_flops:
            return self.tf32_flops, "tf32 tensor"
        return self.fp32_flops, "fp32"

    @property
    def bf16(self) -> bool:
        """bf16 runs natively (sm80+ tensor cores, or AMD CDNA2+); below sm80 it is emulated."""
        return self.sm is None or self.sm >= (8, 0)

    @property
    def flash_attention_2(self) -> bool:
        """The flash_attn package's kernels (FlashAttention-2) run on this card: sm80 or newer
        (Ampere, Ada, Hopper); ROCm builds exist for MI200/MI300."""
        return self.sm is None or self.sm >= (8, 0)

    @property
    def arch(self) -> str:
        return f"sm{self.sm[0]}{self.sm[1]}" if self.sm else "ROCm"


def _c(name: str, mib: int, sm: Optional[tuple[int, int]], bf16: Optional[float], fp16: float,
       matches: tuple[str, ...], source: str, fp32: float, tf32: Optional[float]) -> Card:
    return Card(name, mib * MIB, sm, None if bf16 is None else bf16 * 1e12, fp16 * 1e12, matches,
                source, fp32 * 1e12, None if tf32 is None else tf32 * 1e12)


# name, memory.total (MiB), compute capability, dense bf16 / fp16 TFLOP/s, names reported, source,
# fp32 and dense tf32 TFLOP/s (the same data sheets)
CARDS: dict[str, Card] = {c.name: c for c in (
    _c("A100-40GB", 40_960, (8, 0), 312, 312, ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"),
       "NVIDIA A100 data sheet (312 TFLOPS bf16/fp16 dense; tf32 156, fp32 19.5)", 19.5, 156),
    _c("A100-80GB", 81_920, (8, 0), 312, 312, ("a100-sxm4-80gb", "a100 80gb", "a100-pcie-80gb",
                                               "a100 80gb pcie"),
       "NVIDIA A100 data sheet (312 TFLOPS bf16/fp16 dense; tf32 156, fp32 19.5)", 19.5, 156),
    _c("H100-SXM", 81_559, (9, 0), 989.4, 989.4, ("h100 80gb hbm3", "h100-sxm", "h100 sxm"),
       "NVIDIA H100 data sheet, SXM5 (989 TFLOPS bf16/fp16 dense; tf32 495, fp32 67)", 66.9, 494.7),
    _c("H100-PCIe", 81_559, (9, 0), 756.5, 756.5, ("h100 pcie", "h100-pcie"),
       "NVIDIA H100 data sheet, PCIe (756 TFLOPS bf16/fp16 dense; tf32 378, fp32 51)", 51.2, 378),
    _c("H100-NVL", 95_830, (9, 0), 835.5, 835.5, ("h100 nvl",),
       "NVIDIA H100 data sheet, NVL (835 TFLOPS bf16/fp16 dense, per GPU; tf32 418, fp32 60)",
       60, 417.5),
    _c("H200", 143_771, (9, 0), 989.4, 989.4, ("h200",),
       "NVIDIA H200 data sheet, SXM (989 TFLOPS bf16/fp16 dense; tf32 495, fp32 67)", 66.9, 494.7),
    _c("L40S", 46_068, (8, 9), 362.05, 362.05, ("l40s",),
       "NVIDIA L40S data sheet (362 TFLOPS bf16/fp16 dense; tf32 183, fp32 91.6)", 91.6, 183),
    _c("A10G", 23_028, (8, 6), 125, 125, ("a10g",),
       "NVIDIA A10 data sheet (125 TFLOPS bf16/fp16 dense; tf32 62.5, fp32 31.2); the A10G (AWS "
       "G5) is an A10 variant whose own figure is not published: an upper bound", 31.2, 62.5),
    _c("L4", 23_034, (8, 9), 121, 121, ("nvidia l4", "l4"),
       "NVIDIA L4 data sheet (121 TFLOPS bf16/fp16 dense; tf32 60, fp32 30.3)", 30.3, 60),
    _c("A6000", 49_140, (8, 6), 154.8, 154.8, ("rtx a6000", "a6000"),
       "NVIDIA RTX A6000 data sheet (154.8 TFLOPS bf16/fp16 tensor, dense; tf32 77.4, fp32 38.7)",
       38.7, 77.4),
    _c("V100-16GB", 16_384, (7, 0), None, 125, ("v100-sxm2-16gb", "v100-pcie-16gb", "v100 16gb"),
       "NVIDIA V100 data sheet (125 TFLOPS fp16 tensor, SXM2; no bf16 tensor cores; fp32 15.7)",
       15.7, None),
    _c("V100-32GB", 32_768, (7, 0), None, 125, ("v100-sxm2-32gb", "v100-pcie-32gb", "v100s",
                                                "v100 32gb"),
       "NVIDIA V100 data sheet (125 TFLOPS fp16 tensor, SXM2; no bf16 tensor cores; fp32 15.7)",
       15.7, None),
    _c("T4", 15_360, (7, 5), None, 65, ("tesla t4", "t4"),
       "NVIDIA T4 data sheet (65 TFLOPS fp16 tensor; no bf16 tensor cores; fp32 8.1)", 8.1, None),
    _c("MI250X", 65_536, None, 383, 383, ("mi250x", "mi250"),
       "AMD Instinct MI250X data sheet (383 TFLOPS bf16/fp16 dense, both GCDs; matrix fp32 95.7; "
       "64 GiB per GCD, as a rank sees it)", 95.7, None),
    _c("MI300X", 196_608, None, 1307.4, 1307.4, ("mi300x",),
       "AMD Instinct MI300X data sheet (1307 TFLOPS bf16/fp16 dense; tf32 654, fp32 163.4)",
       163.4, 653.7),
)}


def _key(text: str) -> str:
    return re.sub(r"[\s_]+", "-", text.strip()).lower()


def lookup(name: str) -> Optional[Card]:
    """The card a run file names (cluster.gpu_type), ignoring case, `_` and spaces; None if
    unknown."""
    k = _key(name)
    return next((c for c in CARDS.values() if _key(c.name) == k), None)


def suggestion(name: str) -> str:
    """'did you mean X? ' for a misspelt card name, else the list of known names."""
    names = list(CARDS)
    close = difflib.get_close_matches(_key(name), [_key(n) for n in names], n=1, cutoff=0.5)
    if close:
        return f"did you mean {next(n for n in names if _key(n) == close[0])}? "
    return f"one of: {', '.join(names)}"


def parse_gpu_type(text: str, key: str = "cluster.gpu_type") -> Card:
    """The row of `CARDS` for a run file's cluster.gpu_type, or a ConfigError naming the key, the
    value and the known names (with "did you mean" for a near miss)."""
    from launcher.config.errors import ConfigError, Problem
    card = lookup(str(text))
    if card is None:
        raise ConfigError([Problem(key, f"unknown GPU type {text!r}",
                                   f"{suggestion(str(text)).rstrip()} (launcher/config/gpus.py CARDS); or "
                                   "leave it unset and give --gpu-memory / cluster.gpu_memory")],
                          "run file")
    return card


def from_device_name(reported: str) -> Optional[Card]:
    """The row for a GPU name as nvidia-smi or torch.cuda.get_device_name report it
    ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-40GB', 'Tesla V100-SXM2-32GB',
    'AMD Instinct MI300X'); None for a card not in the table. The longest matching pattern wins
    (so 'L40S' is not read as 'L4')."""
    low = re.sub(r"\s+", " ", reported.strip().lower())
    best: tuple[int, Optional[Card]] = (0, None)
    for card in CARDS.values():
        for pat in card.matches:
            if re.search(rf"(^|[\s-]){re.escape(pat)}($|[\s-])", low) and len(pat) > best[0]:
                best = (len(pat), card)
    return best[1]


def same_card(reported: str, gpu_type: str) -> Optional[bool]:
    """Is the card a node reports (nvidia-smi / torch name) the one cluster.gpu_type names?
    None where the reported name is not in the table (nothing to compare)."""
    card, want = from_device_name(reported), lookup(gpu_type)
    return None if card is None else want is not None and card.name == want.name
