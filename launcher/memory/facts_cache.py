"""The plan's model facts kept on disk, so a second `ftlaunch plan` (or `ftlaunch run`) of the
same model imports neither torch nor transformers.

What a plan learns from the meta-device model (the inventory: every parameter's group, size and
trainability), its meta-device forward (the traced activations) and its FLOPs per sequence
depend only on the model's config.json, the run's model/freeze/quantization settings, the
trace's shape, the installed torch and transformers, and the code that derives them. Building them costs the import
of torch, transformers and the model's modeling file (seconds, most of a 7B plan); reading them
back costs a file read.

    value = facts_cache.get("inventory", key_parts, compute)   # compute() only on a miss

The key hashes `key_parts` with the torch and transformers versions (read from the installed
metadata, not imported) and the source of the modules that compute the facts. Each entry is a
pickle under the cache root's plan-facts/ (launcher/common/files.py `cache_root`), written
atomically (`files.write_atomic_bytes`). FTLAUNCH_PLAN_CACHE=0 turns it off (the tests do, so that each
computes its own facts); an unreadable or unwritable entry only costs a recompute.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Callable

from launcher.common import files

ENV = "FTLAUNCH_PLAN_CACHE"
_SOURCES = ("memory/inventory.py", "memory/traced.py", "memory/flops.py", "model/freeze.py",
            "model/lora.py", "model/decay.py", "memory/facts_cache.py")
_STAMP: list[str] = []


def root() -> str:
    return os.path.join(files.cache_root(), "plan-facts")


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _stamp() -> str:
    """The versions of torch and transformers and the source of the code the facts come from."""
    if not _STAMP:
        from importlib.metadata import PackageNotFoundError, version
        h = hashlib.sha256()
        for pkg in ("torch", "transformers", "peft"):
            try:
                h.update(f"{pkg}={version(pkg)};".encode())
            except PackageNotFoundError:
                h.update(f"{pkg}=none;".encode())
        pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for rel in _SOURCES:
            with open(os.path.join(pkg_dir, rel), "rb") as fh:
                h.update(fh.read())
        _STAMP.append(h.hexdigest())
    return _STAMP[0]


def plain_folder(path: str) -> bool:
    """A model folder without code of its own (trust_remote_code's modeling files are outside
    the key, so such a folder's facts are not kept)."""
    try:
        return not any(n.endswith(".py") for n in os.listdir(path))
    except OSError:
        return False


def or_reason(compute: Callable[[], Any]) -> Any:
    """compute(), or where it raises the one-line reason (kept like a result: the same inputs
    fail the same way)."""
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001 - any failure becomes its reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def key(kind: str, parts: tuple) -> str:
    return hashlib.sha256(repr((kind, _stamp(), parts)).encode()).hexdigest()[:32]


def get(kind: str, parts: tuple, compute: Callable[[], Any], *, folder: str) -> Any:
    """The fact of `kind` for `parts` (of the model in `folder`) from the disk, else `compute()`
    (kept for next time unless the folder holds code: `plain_folder`). An exception of
    compute() is not kept: it is raised again by the next call."""
    if not enabled() or not plain_folder(folder):
        return compute()
    path = os.path.join(root(), f"{kind}-{key(kind, parts)}.pickle")
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError):
        pass
    value = compute()
    try:
        os.makedirs(root(), exist_ok=True)
        files.write_atomic_bytes(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass
    return value
