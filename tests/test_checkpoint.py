"""Checkpoint folders without DeepSpeed: manifest, completeness, corruption, pruning, RNG state.
(Saving and loading through real DeepSpeed ranks: tests/test_train_resume.py; fault injection:
tests/test_faults.py.)"""
from __future__ import annotations

import json
import os

from launcher.rank import checkpoint as ck


def fake_checkpoint(root: str, step: int, *, manifest: bool = True, payload: bytes = b"weights") -> str:
    """A step folder shaped like a real one, written the way `save` writes (manifest last)."""
    path = os.path.join(root, ck.step_name(step))
    os.makedirs(os.path.join(path, "ds"))
    with open(os.path.join(path, "ds", "model.pt"), "wb") as fh:
        fh.write(payload * 100)
    with open(os.path.join(path, ck.TRAINER_STATE), "w") as fh:
        json.dump({"step": step}, fh)
    if manifest:
        files = {rel: {"size": os.path.getsize(os.path.join(path, rel)),
                       "sha256": ck.sha256(os.path.join(path, rel))}
                 for rel in ck.content_files(path)}
        with open(os.path.join(path, ck.MANIFEST), "w") as fh:
            json.dump({"format": 1, "step": step, "files": files}, fh)
    return path


def test_step_names_sort_and_parse(tmp_path):
    root = str(tmp_path)
    for s in (100, 20, 3):
        fake_checkpoint(root, s)
    os.makedirs(os.path.join(root, ".tmp-step-00000200"))
    os.makedirs(os.path.join(root, "step-abc"))
    assert [s for s, _ in ck.listing(root)] == [3, 20, 100]
    assert ck.step_of("/x/step-00000020") == 20 and ck.step_of("/x/.tmp-step-00000020") is None


def test_latest_complete_skips_incomplete_with_warning(tmp_path):
    root = str(tmp_path)
    good = fake_checkpoint(root, 10)
    fake_checkpoint(root, 20, manifest=False)
    warnings: list[str] = []
    assert ck.latest_complete(root, warn=warnings.append) == good
    assert len(warnings) == 1 and "step-00000020" in warnings[0] and "no MANIFEST.json" in warnings[0]


def test_truncated_file_is_corrupt(tmp_path):
    root = str(tmp_path)
    good = fake_checkpoint(root, 10)
    bad = fake_checkpoint(root, 20)
    with open(os.path.join(bad, "ds", "model.pt"), "r+b") as fh:
        fh.truncate(5)
    assert ck.problem(bad) == "ds/model.pt has 5 bytes, the manifest says 700"
    assert ck.latest_complete(root, warn=lambda m: None) == good


def test_same_size_corruption_needs_hashes(tmp_path):
    root = str(tmp_path)
    good = fake_checkpoint(root, 10)
    bad = fake_checkpoint(root, 20)
    with open(os.path.join(bad, "ds", "model.pt"), "r+b") as fh:
        fh.write(b"X")  # same size, different bytes
    assert ck.problem(bad) is None  # sizes alone cannot see it
    assert "does not match its sha256" in ck.problem(bad, hashes=True)
    assert ck.latest_complete(root, hashes=True, warn=lambda m: None) == good
    # a rank checks only its share: file i with i % count == index
    shares = [ck.problem(bad, hashes=True, share=(i, 2)) for i in range(2)]
    assert sum(s is not None for s in shares) == 1


def test_missing_file_and_bad_manifest(tmp_path):
    root = str(tmp_path)
    a = fake_checkpoint(root, 1)
    os.remove(os.path.join(a, ck.TRAINER_STATE))
    assert ck.problem(a) == f"missing file {ck.TRAINER_STATE}"
    b = fake_checkpoint(root, 2)
    with open(os.path.join(b, ck.MANIFEST), "w") as fh:
        fh.write("{not json")
    assert ck.problem(b).startswith("unreadable MANIFEST.json")
    assert ck.latest_complete(root, warn=lambda m: None) is None


def test_prune_keeps_newest_complete_and_clears_leftovers(tmp_path):
    root = str(tmp_path)
    for s in (2, 4, 6, 8):
        fake_checkpoint(root, s)
    incomplete = fake_checkpoint(root, 9, manifest=False)
    os.makedirs(os.path.join(root, ".tmp-step-00000010"))
    removed = ck.prune(root, keep=2)
    assert [s for s, _ in ck.complete(root)] == [6, 8]
    assert os.path.isdir(incomplete)  # never deleted: only complete ones beyond keep, and temps
    assert not os.path.exists(os.path.join(root, ".tmp-step-00000010"))
    assert len(removed) == 3
    assert not [n for n in os.listdir(root) if n.startswith(ck.TRASH_PREFIX)]


def test_rng_roundtrip():
    import random

    import numpy as np
    import torch
    state = ck.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ck.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
