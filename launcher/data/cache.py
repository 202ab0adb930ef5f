"""Tokenized data kept on disk: built once per node, reused by the other ranks, resumes and
later jobs.

    splits = cached_load(cfg, tokenizer, max_positions=4096)   # every rank; one builds

The key is a hash of everything the result depends on: each data file's path, size and
modification time (every file of a saved folder), the tokenizer (its whole serialised form and
special tokens), the chat template text, the data settings, the seed (eval split, mixture draw),
the model's positions and `VERSION` of this code. Under `data.cache_dir` (null: data/ under the cache root,
$FTLAUNCH_CACHE else ~/.cache/ftlaunch) each key is a folder of .npy arrays (memory-mapped: the ranks of a
node share one copy in the page cache) and a meta.json.

`ftlaunch run`'s data check asks first without a tokenizer (`known`): beside each folder an
index entry keyed by the same inputs read from files alone (the tokenizer's folder files, path,
size and modification time, with the model section's token settings and the installed
transformers version, in place of the loaded tokenizer) names the folder it led to, so a check of
data and a tokenizer unchanged since reads the folder's meta.json instead of importing
transformers and loading the tokenizer (most of its time). A trust_remote_code tokenizer is
never looked up that way.

Once per node: the first rank to take the key's file lock (fcntl) builds and publishes the folder
atomically (a rename), tokenizing with every CPU of the task (data.preprocessing_workers null:
`tokenize.default_workers`); the others wait on the lock, then map the result. Ranks on other nodes do
the same on their own disk, or find the folder already there on a shared one. `data.cache:
false` makes every rank tokenize for itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING, Callable

from launcher.common import files as common_files
from launcher.data.reading import print_warning
from launcher.data.tokenize import Tokens

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.schema import RunConfig
    from launcher.data.splits import Splits

VERSION = 2  # 2: data.input_field, data.tools_field, prompt/response through a template
_NO_KEY = ("cache", "cache_dir", "preprocessing_workers")  # same tokens whatever they are


def cache_root(cfg: "RunConfig") -> str:
    """data.cache_dir, else data/ under the cache root (launcher/common/files.py)."""
    return cfg.data.cache_dir or os.path.join(common_files.cache_root(), "data")


def _files(path: str | None) -> list:
    if not path:
        return []
    if os.path.isdir(path):
        out = []
        for base, _, names in sorted(os.walk(path)):
            out += _files_stat([os.path.join(base, n) for n in sorted(names)])
        return out
    return _files_stat([path])


def _files_stat(paths: list[str]) -> list:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([os.path.realpath(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([p, None, None])
    return out


def _plain(v):
    """A config value written one way in the keys: a run file's `0` and the same value read back
    from resolved.yaml as `0.0` give the same key."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _settings(cfg: "RunConfig") -> dict:
    """The data settings in the keys (`_plain`), those that change no token left out."""
    from launcher.config.schema import to_dict
    return _plain({k: v for k, v in to_dict(cfg.data).items() if k not in _NO_KEY})


def _tokenizer_id(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted((getattr(tokenizer, "special_tokens_map", {}) or {}).items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def cache_key(cfg: "RunConfig", tokenizer, max_positions: int | None) -> str:
    from launcher.checks.input_checks import source_settings

    d = cfg.data
    settings = _settings(cfg)
    files = [_files(s.path) for s, _ in source_settings(d)] + [_files(d.eval_path)]
    templates = []
    for s, _ in source_settings(d):
        if s.chat_template and os.path.isfile(s.chat_template):
            with open(s.chat_template, encoding="utf-8") as fh:
                templates.append(fh.read())
    blob = json.dumps({"v": VERSION, "data": settings, "pairs": cfg.train.objective != "sft",
                       "files": files, "seed": cfg.train.seed,
                       "positions": max_positions, "tok": _tokenizer_id(tokenizer),
                       "templates": templates}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def files_key(cfg: "RunConfig", max_positions: int | None) -> str | None:
    """`cache_key`'s inputs with the tokenizer as files (see the module docstring), None for a
    trust_remote_code model (its tokenizer's code may live outside the folder)."""
    from launcher.checks.input_checks import source_settings
    from launcher.config.schema import to_dict

    if cfg.model.trust_remote_code:
        return None
    d = cfg.data
    settings = _settings(cfg)
    files = [_files(s.path) for s, _ in source_settings(d)] + [_files(d.eval_path)]
    templates = [_files(s.chat_template) for s, _ in source_settings(d)
                 if s.chat_template and os.path.isfile(s.chat_template)]
    blob = json.dumps({"v": VERSION, "data": settings, "pairs": cfg.train.objective != "sft",
                       "files": files, "seed": cfg.train.seed, "positions": max_positions,
                       "tok_files": _files(cfg.model.tokenizer or cfg.model.path),
                       "model": _plain(to_dict(cfg.model)),
                       "transformers": _transformers_version(),
                       "templates": templates}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _index(cfg: "RunConfig", max_positions: int | None) -> str | None:
    key = files_key(cfg, max_positions)
    return None if key is None else os.path.join(cache_root(cfg), "by-files", key)


def _remember(cfg: "RunConfig", max_positions: int | None, folder: str) -> None:
    """Point the files-only key at the folder it led to (a failed write only costs a later
    check its tokenizer load)."""
    path = _index(cfg, max_positions)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        common_files.write_atomic(path, os.path.basename(folder) + "\n")
    except OSError:
        pass


def known_folder(cfg: "RunConfig", max_positions: int | None) -> str | None:
    """The cache folder of these files and settings, found without a tokenizer (None where the
    index has no entry, its folder is gone, or data.cache is off)."""
    path = _index(cfg, max_positions) if cfg.data.cache else None
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            name = fh.read().strip()
    except OSError:
        return None
    folder = os.path.join(cache_root(cfg), name)
    if not name or os.sep in name or not os.path.exists(os.path.join(folder, "meta.json")):
        return None
    return folder


def known_stats(cfg: "RunConfig", max_positions: int | None) -> dict | None:
    """The stats (train_examples, train_tokens, ...) of `known_folder`'s data: no tokenizer,
    no arrays read."""
    folder = known_folder(cfg, max_positions)
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as fh:
            return json.load(fh).get("stats")
    except (OSError, ValueError):
        return None


def known(cfg: "RunConfig", *, max_positions: int | None = None) -> "Splits | None":
    """The splits the cache holds for these files and settings, found without a tokenizer
    (`known_folder`), None where it holds none."""
    folder = known_folder(cfg, max_positions)
    if folder is None:
        return None
    splits = _read(folder)
    splits.stats = dict(splits.stats, cache="known", cache_dir=folder)
    return splits


_ARRAYS = ("ids", "labels", "offsets", "docs")


def _write(folder: str, splits: "Splits") -> None:
    import numpy as np

    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    parts = {"train": splits.train, "eval": splits.eval}
    for name, t in parts.items():
        if t is None:
            continue
        for a in _ARRAYS:
            if getattr(t, a) is not None:
                np.save(os.path.join(tmp, f"{name}.{a}.npy"), getattr(t, a))
    mix = splits.mixture
    meta = {"warnings": splits.warnings, "stats": splits.stats,
            "token_stats": {k: t.stats for k, t in parts.items() if t is not None},
            "mixture": None if mix is None else {"sizes": mix.sizes,
                                                 "weights": [float(p) for p in mix.probs]}}
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, default=str)
    try:
        os.replace(tmp, folder)
    except OSError:  # another node published the same key first
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: str) -> "Splits":
    import numpy as np

    from launcher.data.splits import Splits
    from launcher.data.mixing import Mixture

    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    parts = {}
    for name in ("train", "eval"):
        if not os.path.exists(os.path.join(folder, f"{name}.ids.npy")):
            parts[name] = None
            continue
        arr = {a: (np.load(os.path.join(folder, f"{name}.{a}.npy"), mmap_mode="r")
                   if os.path.exists(os.path.join(folder, f"{name}.{a}.npy")) else None)
               for a in _ARRAYS}
        parts[name] = Tokens(arr["ids"], arr["labels"], np.asarray(arr["offsets"]),
                             docs=None if arr["docs"] is None else np.asarray(arr["docs"]))
        parts[name].stats = meta["token_stats"].get(name, {})
    mix = meta["mixture"]
    return Splits(train=parts["train"], eval=parts["eval"], warnings=meta["warnings"],
                  stats=meta["stats"], mixture=None if mix is None else Mixture(**mix))


def with_workers(cfg: "RunConfig", *, for_node: bool) -> "RunConfig":
    """cfg with data.preprocessing_workers resolved (tokenize.default_workers): the tokens are
    the same for any number of workers (tests/test_workers.py), so it is not in the key."""
    from dataclasses import replace

    from launcher.data.tokenize import default_workers
    n = default_workers(cfg, for_node=for_node)
    return replace(cfg, data=replace(cfg.data, preprocessing_workers=n))


def cached_load(cfg: "RunConfig", tokenizer, *, max_positions: int | None = None,
                warn: Callable[[str], None] = print_warning) -> "Splits":
    """`launcher.data.load`, through the cache (see the module docstring)."""
    import fcntl

    from launcher.data.loading import load

    if not cfg.data.cache:  # every rank tokenizes: the node's CPUs shared among them
        return load(with_workers(cfg, for_node=False), tokenizer, max_positions=max_positions,
                    warn=warn)
    root = cache_root(cfg)
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, cache_key(cfg, tokenizer, max_positions))
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(os.path.join(folder, "meta.json")):
                splits, how = _read(folder), "reused"
            else:
                # the other ranks of the node wait: this one tokenizes with all of its CPUs
                splits, how = load(with_workers(cfg, for_node=True), tokenizer,
                                   max_positions=max_positions, warn=lambda m: None), "built"
                _write(folder, splits)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _remember(cfg, max_positions, folder)
    for w in splits.warnings:
        warn(w)
    splits.stats = dict(splits.stats, cache=how, cache_dir=folder)
    return splits
