"""Training data: read with `datasets`, tokenise, mask, truncate or pack, split; sample; collate.

    splits = data.load(cfg, tokenizer, max_positions=4096)   # every rank calls it, same result
    sampler = data.Sampler(len(splits.train), rank=r, world_size=w, micro_batch_size=4, seed=s)
    for idx in sampler:
        batch = data.collate([splits.train[i] for i in idx], pad_id)

Reading. `data.path` is a jsonl/json/csv/parquet/text file (format from the extension unless
`data.format` says; `.gz`/`.bz2`/`.xz`/`.zst` compressed files too) or a folder written by
`datasets.save_to_disk` (its `train` split, or its only split). A json file is a list of
records; a text file is one example per line (its lines are the text, whatever text_field says). Files are read through a link with a plain name in
a private temporary folder, so symlinks, unicode, spaces and glob characters (`[`, `*`) in paths
all work, and the `datasets` cache lives there too (never in the user's home); it is removed
after reading.

Rows. Rows whose text (or response) is missing or blank, and rows whose prompt is missing, are
dropped with a warning giving the count; blank lines of a text file are such rows. Numbers in a
text column are read as their text; lists or objects are an error.

Tokens. Each example is `start + text + [eos]`: `start` is what the tokenizer itself puts at the
start of a sequence (BOS for Llama-style tokenizers, nothing for GPT-2 style), EOS is appended
when `data.add_eos`. Prompt/response records are tokenised separately, prompt then response
(both without special tokens), and concatenated: `start + prompt + response + [eos]`; the labels
are -100 on `start + prompt`, so the loss boundary is exact at the token where the response
begins, and the model is trained on the same token sequence it will see when the prompt is
tokenised alone at inference and the response generated after it. Labels are not shifted (Hugging
Face causal LMs shift them inside the model).

Length. Without packing each example is cut to `max_seq_len` (its start kept); a prompt/response
example left with no response token is dropped (counted in a warning). With packing the examples
(each with its EOS) are concatenated in file order and cut into rows of exactly `max_seq_len`
tokens, labels keeping the prompt masking; training drops the last partial row, evaluation keeps
it. Documents in a packed row attend to each other (plain concatenation, as most packers do).

Eval. `data.eval_path` (same format rules) or `data.eval_fraction` of the records, held out by a
permutation seeded with `train.seed` (identical on every rank; the rest stays in file order).

Errors. Every problem is a `ConfigError` (source "data") with the key (data.path,
data.text_field, ...), what is wrong and how to fix it - raised on every rank before training.

Tokenised data is held compactly (two int32 arrays and offsets, 8 bytes a token), not as Python
lists; `Tokens[i]` builds the lists of one example on demand.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from launcher.errors import ConfigError, Problem, did_you_mean
from launcher.log import get_logger

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from launcher.config import RunConfig

IGNORE = -100  # label of a position without loss (the value Hugging Face losses ignore)

_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_BUILDER = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
_TOKENIZE_CHUNK = 2048


# ------------------------------------------------------------------------------ results
class Tokens(Sequence):
    """Tokenised examples: `self[i]` is {"input_ids": [...], "labels": [...]} (labels -100 where
    no loss). Stored as flat int32 arrays `ids`, `labels` and int64 `offsets` (n + 1 entries)."""

    def __init__(self, ids: "np.ndarray", labels: "np.ndarray", offsets: "np.ndarray"):
        self.ids, self.labels, self.offsets = ids, labels, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:  # type: ignore[override]
        n = len(self)
        if isinstance(i, slice):
            raise TypeError("Tokens takes an integer index")
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} out of range (0..{n - 1})")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class Splits:
    """What `load` returns: train and eval (None without eval data) examples, plus what happened."""

    train: Tokens
    eval: Tokens | None
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ helpers
_print_warning = get_logger(__name__).warning  # stderr, rank 0 only (launcher/log.py)


def _fail(key: str, message: str, fix: str = "") -> ConfigError:
    return ConfigError([Problem(key, message, fix)], "data")


def tokenizer_pad_id(tokenizer, *, warn: Callable[[str], None] = _print_warning) -> int:
    """The id to pad with: the pad token, else EOS (with a warning), else a ConfigError.
    Padded positions are masked by `collate` (attention 0, label -100), so padding with EOS
    never teaches the model anything."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        warn(f"the tokenizer has no pad token; padding with its EOS token (id {eos}); padded "
             "positions are masked out of attention and loss")
        return int(eos)
    raise _fail("model.tokenizer", "the tokenizer has neither a pad token nor an EOS token, so "
                "batches cannot be padded",
                "add one and save the tokenizer: tok.add_special_tokens({'pad_token': '<pad>'}); "
                "tok.save_pretrained(DIR), then set model.tokenizer: DIR (resize the model's "
                "embeddings if the vocabulary grew)")


def _format_of(path: str, key: str, fmt: str | None) -> str:
    if os.path.isdir(path):
        if fmt not in (None, "saved"):
            raise _fail("data.format", f"{path} is a folder, but format '{fmt}' reads one file",
                        "point the path at the file, or use format: saved (or null) for a folder "
                        "written by datasets' save_to_disk")
        return "saved"
    if fmt == "saved":
        raise _fail("data.format", f"format 'saved' needs a folder written by save_to_disk, but "
                    f"{path} is a file", "set format to the file's format, or null to infer it "
                    "from the extension")
    if fmt is not None:
        return fmt
    name = os.path.basename(path).lower()
    for comp in _COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise _fail("data.format", f"cannot tell the format of {path} from its extension "
                    f"'{ext or '(none)'}'", "set data.format: jsonl, json, csv, parquet or text "
                    f"(known extensions: {', '.join(sorted(_EXTENSIONS))})")
    return _EXTENSIONS[ext]


def _check_path(path: str, key: str) -> None:
    if os.path.exists(path):
        if not os.access(path, os.R_OK):
            raise _fail(key, f"{path} is not readable (permission denied)",
                        "fix its permissions (chmod a+r) or copy it somewhere readable")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise _fail(key, f"{path} is empty (0 bytes)", "point it at a file with examples")
        return
    if os.path.islink(path):
        raise _fail(key, f"{path} is a broken symlink (to {os.readlink(path)})",
                    "fix the link or point the path at the real file")
    parent = os.path.dirname(path) or "."
    hint = ""
    if os.path.isdir(parent):
        near = did_you_mean(os.path.basename(path), os.listdir(parent))
        hint = f" ({near})" if near else ""
    else:
        hint = f" (the folder {parent} does not exist either)"
    raise _fail(key, f"no such file or folder: {path}{hint}", "check the path")


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _open_text(path: str):
    """Open a possibly compressed data file as UTF-8 text (a BOM is skipped); None for zstd."""
    import bz2
    import gzip
    import lzma

    low = path.lower()
    if low.endswith(".zst"):
        return None
    opener = (gzip.open if low.endswith(".gz") else bz2.open if low.endswith(".bz2")
              else lzma.open if low.endswith(".xz") else open)
    return opener(path, "rt", encoding="utf-8-sig")


def _json_kind(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _first_bad_json(path: str, fmt: str, *, first_only: bool = False) -> str | None:
    """What is wrong with a json/jsonl file: its first bad line (jsonl) or its top level (json);
    None when nothing is found. first_only: look only at the first value (cheap; run before
    datasets, whose JSON reader crashes the process on a file starting with `null`)."""
    import lzma

    try:
        fh = _open_text(path)
        if fh is None:
            return None
        with fh:
            if fmt == "json":
                if first_only:
                    head = fh.read(4096).lstrip()
                    if not head or head[0] in "[{":
                        return None
                try:
                    data = json.loads(head + fh.read()) if first_only else json.load(fh)
                except ValueError as exc:
                    return f"not valid JSON: {exc}"
                if not isinstance(data, list):
                    return (f"the top level is a JSON {_json_kind(data)}, not a list of records")
                return None
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    return f"line {n} is not valid JSON ({exc}): {line.strip()[:80]!r}"
                if not isinstance(row, dict):
                    return f"line {n} is a JSON {_json_kind(row)}, not an object with fields"
                if first_only:
                    return None
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc})"
    except (OSError, EOFError, lzma.LZMAError) as exc:
        return f"cannot decompress: {exc}"
    return None


_FIX = {"saved": "point it at a folder written by Dataset.save_to_disk",
        "jsonl": "one JSON object per line (fix or remove that line)",
        "json": "a JSON list of records, e.g. [{\"text\": ...}, ...] (or use jsonl)",
        "csv": "a comma-separated file with a header row",
        "parquet": "a parquet file (pandas.DataFrame.to_parquet)",
        "text": "a UTF-8 text file, one example per line"}


def _unreadable(path: str, key: str, fmt: str, exc: BaseException) -> ConfigError:
    """A library failure while reading, as a ConfigError naming the file and the cause."""
    if "corresponds to no data" in str(exc):
        return _fail(key, f"{path} holds no rows", "point it at a file with examples")
    detail = _first_bad_json(path, fmt) if fmt in ("json", "jsonl") else None
    if detail is None:
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            detail = f"not UTF-8 text ({cause})"
        else:
            text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            detail = f"{type(cause).__name__}: {text[:300]}"
    return _fail(key, f"cannot read {path} as {fmt}: {detail}", _FIX[fmt])


def _read_columns(path: str, key: str, fmt: str, columns: list[str]) -> tuple[dict[str, list], list[str]]:
    """Read a file or saved folder with `datasets`: ({column: values} for the wanted columns that
    exist, every column name). Any failure becomes a ConfigError naming the file."""
    import datasets
    import datasets.utils.logging as ds_logging

    datasets.disable_progress_bars()
    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    tmp = tempfile.mkdtemp(prefix="ftlaunch-data-")
    try:
        try:
            if fmt == "saved":
                ds = datasets.load_from_disk(os.path.realpath(path), keep_in_memory=True)
                if isinstance(ds, datasets.DatasetDict):
                    names = list(ds)
                    if "train" in ds:
                        ds = ds["train"]
                    elif len(names) == 1:
                        ds = ds[names[0]]
                    else:
                        raise _fail(key, f"{path} holds the splits {', '.join(names)} and no "
                                    "'train'", "save the training split alone, or name it 'train'")
            else:
                # a plain name in a private folder: glob characters, unicode, hidden names and
                # symlinks in the user's path cannot confuse datasets' file resolution
                suffix = "".join(c for c in os.path.basename(path).lower() if c.isascii()
                                 and (c.isalnum() or c == "."))
                comp = next((c for c in _COMPRESSED if suffix.endswith(c)), "")
                link = os.path.join(tmp, "data." + {"jsonl": "jsonl", "json": "json", "csv": "csv",
                                                    "parquet": "parquet", "text": "txt"}[fmt] + comp)
                os.symlink(os.path.realpath(path), link)
                if fmt in ("json", "jsonl"):
                    bad = _first_bad_json(path, fmt, first_only=True)
                    if bad:
                        raise _fail(key, f"cannot read {path} as {fmt}: {bad}", _FIX[fmt])
                # csv: the text columns as written ("12", not 12.0)
                extra = {"converters": {c: str for c in columns}} if fmt == "csv" else {}
                ds = datasets.load_dataset(_BUILDER[fmt], data_files=link, split="train",
                                           cache_dir=os.path.join(tmp, "cache"), keep_in_memory=True,
                                           **extra)
            names = list(ds.column_names)
            table = ds.with_format("arrow")  # whole columns at once (row iteration is slow)
            return {c: table[c].to_pylist() for c in columns if c in names}, names
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any library failure becomes a named problem
            raise _unreadable(path, key, fmt, exc) from None
    finally:
        ds_logging.set_verbosity(level)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def _as_text(values: list, key: str, column: str, path: str) -> list[str | None]:
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(None if v != v else str(v))  # NaN (pandas' missing) is missing
        else:
            raise _fail(key, f"column '{column}' of {path} holds {type(v).__name__} values "
                        f"(row {i + 1}), not text", "point the field at a column of strings")
    return out


@dataclass
class _Records:
    """Texts of one source after dropping empty rows: prompts is None for plain text."""

    texts: list[str]
    prompts: list[str] | None
    dropped: int
    rows: int


def _records(cfg: "RunConfig", path: str, key: str, warnings: list[str]) -> _Records:
    d = cfg.data
    _check_path(path, key)
    fmt = _format_of(path, key, d.format)
    if fmt == "text":
        if d.prompt_field is not None:
            raise _fail("data.prompt_field", "a text file has one example per line and no "
                        "prompt/response columns", "use jsonl/json/csv/parquet records with both "
                        "columns, or set prompt_field and response_field to null")
        wanted, field_key = ["text"], "data.text_field"  # a text file's lines are the text
    elif d.prompt_field is not None:
        wanted, field_key = [d.prompt_field, d.response_field or ""], "data.prompt_field"
    else:
        wanted, field_key = [d.text_field], "data.text_field"
    cols, names = _read_columns(path, key, fmt, wanted)
    missing = [c for c in wanted if c not in cols]
    if missing:
        problems = []
        for c in missing:
            k = ("data.response_field" if c == d.response_field and c != d.prompt_field
                 else field_key)
            near = did_you_mean(c, names)
            msg = (f"{path} has no column '{c}'" + (f" ({near})" if near else "")
                   + f"; its columns: {', '.join(names) or '(none)'}")
            fix = f"set {k} to one of its columns"
            if k == "data.text_field" and d.prompt_field is None and {"prompt", "response"} <= set(names):
                fix += ", or set prompt_field: prompt and response_field: response for loss on " \
                       "the response only"
            if fmt == "json" and len(names) == 1:
                fix += " (a json file must be a top-level list of records)"
            problems.append(Problem(k, msg, fix))
        raise ConfigError(problems, "data")
    rows = len(next(iter(cols.values())))
    if rows == 0:
        raise _fail(key, f"{path} holds no rows", "point it at a file with examples")
    if d.prompt_field is not None:
        prompts = _as_text(cols[d.prompt_field], "data.prompt_field", d.prompt_field, path)
        texts = _as_text(cols[d.response_field], "data.response_field", d.response_field, path)
        keep = [i for i in range(rows) if prompts[i] is not None
                and texts[i] is not None and texts[i].strip()]
        what = f"a missing prompt or an empty '{d.response_field}'"
    else:
        column = wanted[0]
        prompts = None
        texts = _as_text(cols[column], field_key, column, path)
        keep = [i for i in range(rows) if texts[i] is not None and texts[i].strip()]
        what = f"an empty or missing '{column}'" + (" (blank lines)" if fmt == "text" else "")
    dropped = rows - len(keep)
    if not keep:
        raise _fail(key, f"every one of the {rows} rows of {path} has {what}",
                    "fill the examples in, or point the path at the right file/column")
    if dropped:
        kept = set(keep)
        first = next(i for i in range(rows) if i not in kept)
        warnings.append(f"{key}: dropped {dropped} of {rows} rows of {path} with {what} "
                        f"(first: row {first + 1})")
    return _Records(texts=[texts[i] for i in keep],
                    prompts=None if prompts is None else [prompts[i] for i in keep],
                    dropped=dropped, rows=rows)


def _subset(rec: _Records, idx: list[int]) -> _Records:
    return _Records(texts=[rec.texts[i] for i in idx],
                    prompts=None if rec.prompts is None else [rec.prompts[i] for i in idx],
                    dropped=0, rows=len(idx))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for a in range(0, len(texts), _TOKENIZE_CHUNK):
        enc = tokenizer(texts[a:a + _TOKENIZE_CHUNK], add_special_tokens=False, verbose=False,
                        return_attention_mask=False, return_token_type_ids=False)
        out.extend(enc["input_ids"])
    return out


def _start_tokens(tokenizer) -> list[int]:
    """What the tokenizer puts before a sequence by itself (BOS for Llama-style), found by
    comparing an encoding with and without special tokens."""
    probe = "a b"
    full = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i]
    return []


def _tokenize(cfg: "RunConfig", tokenizer, rec: _Records, key: str, split: str,
              warnings: list[str]) -> Tokens:
    import numpy as np

    d = cfg.data
    start = _start_tokens(tokenizer)
    end: list[int] = []
    if d.add_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise _fail("data.add_eos", "the tokenizer has no EOS token to append",
                        "set data.add_eos: false, or give a tokenizer with an eos_token")
        end = [int(eos)]
    body = _encode(tokenizer, rec.texts)
    heads = _encode(tokenizer, rec.prompts) if rec.prompts is not None else None
    L = d.max_seq_len
    ids_parts: list[list[int]] = []
    lab_parts: list[list[int]] = []
    empty = truncated = no_response = longest = 0
    for i, toks in enumerate(body):
        if not toks:
            empty += 1
            continue
        head = start + (heads[i] if heads is not None else [])
        ids = head + toks + end
        if heads is not None:
            labels = [IGNORE] * len(head) + toks + end
        else:
            labels = list(ids)
        longest = max(longest, len(ids))
        if not d.packing and len(ids) > L:
            truncated += 1
            ids, labels = ids[:L], labels[:L]
            if heads is not None and all(x == IGNORE for x in labels):
                no_response += 1
                continue
        ids_parts.append(ids)
        lab_parts.append(labels)
    what = "train" if split == "train" else "eval"
    if empty:
        warnings.append(f"{key}: dropped {empty} {what} examples whose text gives no tokens")
    if truncated:
        warnings.append(f"{key}: {truncated} of {len(body)} {what} examples are longer than "
                        f"data.max_seq_len={L} and were cut (longest: {longest} tokens)")
    if no_response:
        warnings.append(f"{key}: dropped {no_response} {what} examples whose prompt fills all "
                        f"{L} tokens, leaving no response to learn")
    if not ids_parts:
        if no_response:
            raise _fail("data.max_seq_len", f"every {what} example's prompt is at least "
                        f"max_seq_len={L} tokens, so no response token is left",
                        "raise data.max_seq_len or shorten the prompts")
        raise _fail(key, f"no {what} example gives any token", "check the text column")
    lengths = np.fromiter((len(x) for x in ids_parts), dtype=np.int64, count=len(ids_parts))
    flat_ids = np.fromiter((t for x in ids_parts for t in x), dtype=np.int32, count=int(lengths.sum()))
    flat_lab = np.fromiter((t for x in lab_parts for t in x), dtype=np.int32, count=int(lengths.sum()))
    if d.packing:
        total = len(flat_ids)
        rows = total // L
        if split == "train":
            if rows == 0:
                raise _fail("data.max_seq_len", f"packing needs at least max_seq_len={L} tokens, "
                            f"but the training data has {total}", "lower data.max_seq_len, add "
                            "data, or set data.packing: false")
            if total - rows * L:
                warnings.append(f"{key}: packing into {rows} rows of {L} tokens leaves out the "
                                f"last {total - rows * L} tokens")
            offsets = np.arange(0, rows * L + 1, L, dtype=np.int64)
            flat_ids, flat_lab = flat_ids[: rows * L], flat_lab[: rows * L]
        else:  # evaluation keeps the partial last row
            offsets = np.unique(np.append(np.arange(0, total, L, dtype=np.int64), total))
    else:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
    tokens = Tokens(flat_ids, flat_lab, offsets)
    if tokens.num_loss_tokens == 0:
        raise _fail(key, f"the {what} examples have no token to compute a loss on",
                    "check data.response_field and data.max_seq_len")
    return tokens


def _split_eval(rec: _Records, fraction: float, seed: int) -> tuple[_Records, _Records]:
    import numpy as np

    n = len(rec.texts)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise _fail("data.eval_fraction", f"holding out {fraction} of {n} examples leaves none "
                    "for training", "lower data.eval_fraction or add data")
    perm = np.random.default_rng([int(seed), 0xE7A1]).permutation(n)
    held = set(int(i) for i in perm[:n_eval])
    train = [i for i in range(n) if i not in held]
    return _subset(rec, train), _subset(rec, sorted(held))


def load(cfg: "RunConfig", tokenizer, *, max_positions: int | None = None,
         warn: Callable[[str], None] = _print_warning) -> Splits:
    """Read, clean, tokenise, mask and cut (or pack) the training data and the eval data.
    Identical on every rank. Raises ConfigError (source "data") for anything wrong with it;
    warnings (dropped rows, truncation) go to `warn` (stderr on rank 0) and Splits.warnings."""
    d = cfg.data
    if max_positions is not None and d.max_seq_len > max_positions:
        raise _fail("data.max_seq_len", f"{d.max_seq_len} exceeds the model's {max_positions} "
                    "positions", f"use data.max_seq_len <= {max_positions}")
    if (d.prompt_field is None) != (d.response_field is None):
        raise _fail("data.response_field" if d.response_field is None else "data.prompt_field",
                    "prompt_field and response_field go together",
                    "set both, or neither for plain text")
    warnings: list[str] = []
    if d.packing and not d.add_eos:
        warnings.append("data.packing without data.add_eos: packed documents run together with "
                        "no EOS between them")
    rec = _records(cfg, d.path, "data.path", warnings)
    ev_rec = None
    if d.eval_path:
        ev_rec = _records(cfg, d.eval_path, "data.eval_path", warnings)
    elif d.eval_fraction > 0:
        rec, ev_rec = _split_eval(rec, d.eval_fraction, cfg.train.seed)
    train = _tokenize(cfg, tokenizer, rec, "data.path", "train", warnings)
    ev = None
    if ev_rec is not None:
        ev = _tokenize(cfg, tokenizer, ev_rec,
                       "data.eval_path" if d.eval_path else "data.eval_fraction", "eval", warnings)
    for w in warnings:
        warn(w)
    stats = {"train_examples": len(train), "train_tokens": train.num_tokens,
             "train_loss_tokens": train.num_loss_tokens,
             "eval_examples": len(ev) if ev is not None else 0,
             "eval_tokens": ev.num_tokens if ev is not None else 0}
    return Splits(train=train, eval=ev, warnings=warnings, stats=stats)


# ------------------------------------------------------------------------------ sampling
class Sampler:
    """This rank's micro batches, forever: epoch e is a permutation seeded by (seed, e) (or the
    file order with shuffle=False), dealt out so that each micro step the ranks take consecutive
    disjoint slices of it. Every rank gets `batches_per_epoch` = n // (world_size x
    micro_batch_size) micro batches per epoch; the remainder is left out of that epoch (a new
    permutation next epoch leaves out others). With fewer examples than one micro batch on every
    rank, the permutation is repeated to fill exactly one (indices then repeat within an epoch).
    `state_dict()` = {"epoch", "position"}: micro batches this rank consumed in the epoch;
    `load_state_dict` continues exactly there."""

    def __init__(self, n: int, *, rank: int, world_size: int, micro_batch_size: int, seed: int,
                 shuffle: bool = True):
        if n < 1:
            raise ValueError(f"Sampler needs at least one example, got n={n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.batches_per_epoch = max(1, n // (world_size * micro_batch_size))
        self._epoch, self._position = 0, 0
        self._cache: tuple[int, Any] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def _order(self, epoch: int):
        import numpy as np

        if self._cache is None or self._cache[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([int(self.seed), int(epoch)]).permutation(self.n)
            else:
                perm = np.arange(self.n)
            need = self.batches_per_epoch * self.world_size * self.micro_batch_size
            if need > self.n:
                perm = np.resize(perm, need)  # repeats the permutation cyclically
            self._cache = (epoch, perm)
        return self._cache[1]

    def batch(self, epoch: int, position: int) -> list[int]:
        """This rank's micro batch number `position` of `epoch`."""
        order = self._order(epoch)
        m = self.micro_batch_size
        a = (position * self.world_size + self.rank) * m
        return [int(i) for i in order[a:a + m]]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self._position >= self.batches_per_epoch:
                self._epoch, self._position = self._epoch + 1, 0
            out = self.batch(self._epoch, self._position)
            self._position += 1
            yield out

    def __len__(self) -> int:
        """Micro batches per epoch on this rank (the iterator itself never ends)."""
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a sampler state needs integer 'epoch' and 'position', got {state!r}") from None
        if epoch < 0 or position < 0:
            raise ValueError(f"a sampler state cannot be negative: {state!r}")
        if position > self.batches_per_epoch:
            _print_warning(f"the saved data position ({position} micro batches into epoch {epoch}) "
                           f"is past this run's {self.batches_per_epoch} per epoch (data or world "
                           f"size changed?); continuing with epoch {epoch + 1}")
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position


# ------------------------------------------------------------------------------ batching
def collate(examples: list[dict], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad to the longest example: input_ids (pad_id), attention_mask (0 on padding),
    labels (-100 on padding). Padding is known from the lengths, never from the pad id, so a pad
    id equal to EOS is safe."""
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    if width == 0:
        raise ValueError("collate got only empty examples")
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids, lab = e["input_ids"], e["labels"]
        if len(ids) != len(lab):
            raise ValueError(f"example {i}: {len(ids)} input_ids but {len(lab)} labels")
        k = len(ids)
        input_ids[i, :k] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, :k] = torch.as_tensor(lab, dtype=torch.long)
        attention[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
