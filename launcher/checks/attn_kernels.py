"""The attention kernel transformers will use for a model, and whether a requested one exists.

transformers' default is sdpa, falling back to eager for a model class that does not declare
`_supports_sdpa = True` (Gemma-2: softcapping); a kernel requested explicitly that the class
does not support is an error at `from_pretrained`, on every rank. The class attributes are read
from the installed transformers' modeling file as text (`models/<type>/modeling_<type>.py`), so
`validate` can refuse such a kernel on the login node without importing transformers.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re

from launcher.config.errors import Problem

KERNELS = ("eager", "sdpa", "flash_attention_2")
_FLAGS = {"sdpa": r"_supports_sdpa\s*=\s*True", "flash_attention_2": r"_supports_flash_attn(_2)?\s*=\s*True"}


def _modeling_file(model_type: str) -> str | None:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = model_type.replace("-", "_")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", name, f"modeling_{name}.py")
    return path if os.path.isfile(path) else None


def supported(model_type: str) -> tuple[str, ...] | None:
    """Kernels the installed transformers supports for model_type (eager always); None when the
    family is not shipped with transformers (custom code: not judged here)."""
    path = _modeling_file(model_type)
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return ("eager",) + tuple(k for k, pat in _FLAGS.items() if re.search(pat, text))


def resolved(model_type: str, requested: str | None) -> str:
    """The kernel the ranks will run: the requested one, else sdpa where supported, else eager."""
    if requested:
        return requested
    kinds = supported(model_type)
    return "sdpa" if kinds is None or "sdpa" in kinds else "eager"


def _model_type(model_path: str) -> str | None:
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def problem(model_path: str, requested: str | None) -> Problem | None:
    """A Problem for model.attn_implementation when the model does not support it, naming the
    kernels it does; None when it is supported, not set, or cannot be judged here."""
    mt = _model_type(model_path) if requested else None
    kinds = supported(mt) if mt else None
    if kinds is None or requested in kinds:
        return None
    return Problem("model.attn_implementation", f"{mt} models do not support {requested} in the "
                   f"installed transformers (from_pretrained would fail on every rank)",
                   f"use one of {', '.join(kinds)}, or leave it unset (transformers picks "
                   f"{resolved(mt, None)} for {mt})")
