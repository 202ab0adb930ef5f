"""Memory sizes as people write them: `80GiB`, `80 GB`, `40G`, `81920MiB`, `1.5T`.

One parser for `--gpu-memory` and the run file's `cluster.gpu_memory`. The units are binary
whether or not the `i` is written (GB = GiB = 2**30 bytes, as GPU memory is sold and reported);
a bare number is GiB, never bytes. Pure: no torch.
"""
from __future__ import annotations

import re
from fractions import Fraction

from launcher.errors import ConfigError, Problem

UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
BARE_UNIT = "G"   # a number without a unit: GiB
BARE_MAX = 2**20  # a bare number this large (1 PiB in GiB) was surely meant as bytes
_SIZE = re.compile(r"\s*([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([KMGT])(i?B)?|(B))?\s*", re.I)
FIX = "write a size such as 80GiB, 80GB, 40G, 81920MiB or 1.5T (binary units; a bare number is GiB)"


def parse_size(text: str | int | float, key: str = "--gpu-memory") -> int:
    """Bytes of a memory size: '80GiB', '80 GB', '40G', '81920MiB', '1.5T', '80' (GiB), '512B'.

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
    scale = 1 if byte else UNITS[(unit or BARE_UNIT).upper()]
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
