"""The processor a benchmark ran on, for its printed header."""
from __future__ import annotations

import platform


def processor() -> str:
    """The CPU's model name and family/model numbers (a virtual machine's name alone can hide
    which processor it is), and whether it has AVX512-BF16."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    flags = info.get("flags", "").split()
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model "
            f"{info.get('model', '?')}, avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'})")
