"""Memory sizes as people write them: `80GiB`, `80 GB`, `40G`, `81920MiB`, `1.5T`.

One parser for `--gpu-memory` and the run file's `cluster.gpu_memory`. `GiB`, `MiB`, ... and a
bare letter (`80G`, as Slurm writes it) are binary (GiB = 2**30 bytes); `GB`, `MB`, ... are
decimal (GB = 10**9 bytes, as cards are sold: an "80GB" card reports 79.6-80 GiB, and
`80GB` here is 74.5 GiB, on the safe side). For a card's real memory name it in
`cluster.gpu_type` (launcher/config/gpus.py). A bare number is GiB, never bytes. Pure: no torch.
"""
from __future__ import annotations

import re
from fractions import Fraction

from launcher.config.errors import ConfigError, Problem

UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # KB, MB, GB, TB
BARE_UNIT = "G"   # a number without a unit: GiB
BARE_MAX = 2**20  # a bare number this large (1 PiB in GiB) was surely meant as bytes
_SIZE = re.compile(r"\s*([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([KMGT])(i?B)?|(B))?\s*", re.I)
FIX = ("write a size such as 80GiB, 40G, 81920MiB or 1.5T (binary), 80GB (decimal: 10**9 bytes); "
       "a bare number is GiB")


def parse_size(text: str | int | float, key: str = "--gpu-memory") -> int:
    """Bytes of a memory size: '80GiB', '40G', '81920MiB', '1.5T', '80' (GiB), '512B' (binary),
    '80GB', '80 GB' (decimal: 80 x 10**9).

    Raises ConfigError naming `key`, the value and an example fix for anything else, and for
    sizes that are not above zero."""
    source = "command line" if key.startswith("--") else "run file"
    m = _SIZE.fullmatch(str(text)) if not isinstance(text, bool) else None
    if not m:
        raise ConfigError([Problem(key, f"not a memory size: {text!r}", FIX)], source)
    sign, number, unit, _suffix, byte = m.groups()
    if not (unit or byte) and Fraction(number) >= BARE_MAX:
        raise ConfigError([Problem(key, f"a bare number is GiB: {text!r} would be over 1 PiB "
                                   "(bytes are not read without a unit)", FIX)], source)
    decimal = bool(unit) and bool(_suffix) and _suffix.lower() == "b"
    scale = 1 if byte else (DECIMAL if decimal else UNITS)[(unit or BARE_UNIT).upper()]
    size = int(Fraction(number) * scale)
    if sign == "-" or size <= 0:
        raise ConfigError([Problem(key, f"a memory size must be more than 0 bytes, got {text!r}",
                                   FIX)], source)
    return size


SLURM_MEM = re.compile(r"\s*([0-9]+)\s*([KMGT]?)B?\s*", re.I)


def parse_slurm_mem(text: str) -> int | None:
    """Bytes of a Slurm `--mem` value (`cluster.mem`): units K, M, G, T are binary and a bare
    number is MiB, as sbatch reads it; None for 0 (the whole node: its size is not known here)."""
    m = SLURM_MEM.fullmatch(str(text))
    if not m:
        raise ConfigError([Problem("cluster.mem", f"not a Slurm memory size: {text!r}",
                                   "write e.g. 500G, 256000M or 0 (the whole node)")], "run file")
    n = int(m.group(1)) * UNITS[(m.group(2) or "M").upper()]
    return n or None
