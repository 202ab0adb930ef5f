"""Checkpoint folders as files, torch-free: names, listing, manifest and size checks, the newest
complete one. `ftlaunch status`, `ftlaunch run` and the export read them here; saving, loading and
the collective resume check live with the ranks (launcher/rank/checkpoint.py, which re-exports
these names).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from launcher.cluster import layout
from launcher.common.log import get_logger

PREFIX = "step-"
MANIFEST = "MANIFEST.json"


# ------------------------------------------------------------------ names and listing
def root(run_dir: str) -> str:
    return os.path.join(run_dir, layout.CHECKPOINTS)


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: str) -> int | None:
    base = os.path.basename(os.path.normpath(path))
    if not base.startswith(PREFIX) or not base[len(PREFIX):].isdigit():
        return None
    return int(base[len(PREFIX):])


def listing(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of every step-N folder (complete or not), oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        step = step_of(name)
        if step is not None and os.path.isdir(os.path.join(ckpt_root, name)):
            out.append((step, os.path.join(ckpt_root, name)))
    return sorted(out)


def content_files(folder: str) -> list[str]:
    """Relative paths of every file under folder except the manifest, sorted."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
        man = json.load(fh)
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
        raise ValueError("manifest has no file table")
    return man


def problem(path: str, *, hashes: bool = False, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why the checkpoint at path cannot be used (None if it can).

    Checks the manifest, that every listed file exists with its size, and with hashes=True the
    sha256 of the files in `share` = (index, count): files i with i % count == index."""
    try:
        man = read_manifest(path)
    except FileNotFoundError:
        return "no MANIFEST.json (incomplete: the save did not finish)"
    except (OSError, ValueError) as exc:
        return f"unreadable MANIFEST.json ({exc})"
    files = man["files"]
    for rel, meta in files.items():
        full = os.path.join(path, rel)
        try:
            size = os.path.getsize(full)
        except OSError:
            return f"missing file {rel}"
        if size != meta.get("size"):
            return f"{rel} has {size} bytes, the manifest says {meta.get('size')}"
    if hashes:
        index, count = share
        for i, rel in enumerate(sorted(files)):
            if i % count == index and sha256(os.path.join(path, rel)) != files[rel].get("sha256"):
                return f"{rel} does not match its sha256 (corrupt)"
    return None


_warn = get_logger(__name__).warning  # stderr, rank 0 only (launcher/common/log.py)


def latest_complete(ckpt_root: str, *, hashes: bool = False,
                    warn: Callable[[str], None] = _warn) -> str | None:
    """The newest usable checkpoint folder under ckpt_root, or None. Incomplete or corrupt ones
    are skipped with a warning (hashes=True also checks every file's sha256)."""
    for _step, path in reversed(listing(ckpt_root)):
        why = problem(path, hashes=hashes)
        if why is None:
            return path
        warn(f"skipping checkpoint {path}: {why}")
    return None


def complete(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints (manifest and sizes check out), oldest first."""
    return [(s, p) for s, p in listing(ckpt_root) if problem(p) is None]
