"""Where a run trains and in which torch dtype: one answer for `ftlaunch run` and the ranks.

torch is imported inside the functions: `ftlaunch run` asks before it starts any rank, the
ranks ask as they start; the login-node commands never call these.
"""
from __future__ import annotations

from typing import Any

from launcher.config import TORCH_DTYPE, RunConfig
from launcher.errors import ConfigError, Problem


def visible_gpus() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(cfg: RunConfig) -> str:
    """"cuda" or "cpu": train.device, with auto -> cuda when a GPU is visible, else cpu.
    train.device cuda where no GPU is visible is a ConfigError."""
    if cfg.train.device == "cpu":
        return "cpu"
    gpus = visible_gpus()
    if cfg.train.device == "cuda" and gpus == 0:
        raise ConfigError([Problem("train.device", "cuda asked but no GPU is visible here",
                                   "use train.device: auto or cpu to run on CPU ranks")])
    return "cuda" if gpus else "cpu"


def torch_dtype(name: str) -> Any:
    """The torch dtype of a run-file dtype name (model.dtype, quantization.*_dtype)."""
    import torch
    return getattr(torch, TORCH_DTYPE[name])
