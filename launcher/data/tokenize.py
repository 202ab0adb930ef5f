"""Tokenising the records: token ids, loss masks, truncation; the pad id.

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
are kept whole here and cut into rows by `launcher.data.batching.pack`.

Tokenised data is held compactly (two int32 arrays and offsets, 8 bytes a token), not as Python
lists; `Tokens[i]` builds the lists of one example on demand.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from launcher.common import forked
from launcher.data.chat import IGNORE
from launcher.data.reading import Records, fail, print_warning

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from launcher.config.schema import DataConfig, RunConfig


_TOKENIZE_CHUNK = 2048
_MIN_TEXTS_PER_WORKER = 64  # fewer texts a process: tokenized in this one


class Tokens(Sequence):
    """Tokenised examples: `self[i]` is {"input_ids": [...], "labels": [...]} (labels -100 where
    no loss). Stored as flat int32 arrays `ids`, `labels` and int64 `offsets` (n + 1 entries)."""

    def __init__(self, ids: "np.ndarray", labels: "np.ndarray", offsets: "np.ndarray",
                 docs: "np.ndarray | None" = None):
        self.ids, self.labels, self.offsets = ids, labels, offsets
        self.docs = docs  # packed rows: the offsets of the documents (a subset of positions)
        self.stats: dict = {}

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
        out = {"input_ids": self.ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}
        if self.docs is not None:
            import numpy as np
            lo, hi = np.searchsorted(self.docs, [a, b])
            out["doc_lengths"] = np.diff(np.append(self.docs[lo:hi], b)).tolist()
        return out

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def tokenizer_pad_id(tokenizer, *, warn: Callable[[str], None] = print_warning) -> int:
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
    raise fail("model.tokenizer", "the tokenizer has neither a pad token nor an EOS token, so "
               "batches cannot be padded",
               "add one and save the tokenizer: tok.add_special_tokens({'pad_token': '<pad>'}); "
               "tok.save_pretrained(DIR), then set model.tokenizer: DIR (resize the model's "
               "embeddings if the vocabulary grew)")


_WRAPPER_CALLS = ("__call__", "_call_one", "_encode_plus")


def rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` a fast tokenizer calls, where calling it directly gives the ids
    the Python wrapper would (no truncation or padding set on it, special tokens split as the
    wrapper would split them); else None. The wrapper builds a Python object per text around the
    same call, half the time of short segments."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if type(backend).__module__.split(".")[0] != "tokenizers":
        return None
    cls = type(tokenizer)
    base = next((c for c in cls.__mro__ if c.__name__ == "TokenizersBackend"), None)
    if base is None or any(getattr(cls, m, None) is not getattr(base, m, None)
                           for m in _WRAPPER_CALLS):
        return None   # a tokenizer class that changes the call (CodeLlama's infilling, ...)
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if (backend.truncation is not None or backend.padding is not None
            or getattr(backend, "encode_special_tokens", split) != split):
        return None
    return backend


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (the Rust tokenizer called directly
    where that gives the same ids: `rust_tokenizer`)."""
    backend = rust_tokenizer(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, verbose=False,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def _encode(tokenizer, texts: list[str], workers: int = 1) -> list[list[int]]:
    """Token ids of each text (no special tokens). workers > 1 (data.preprocessing_workers):
    contiguous slices tokenised by that many forked processes (launcher/common/forked.py) and
    joined in order, so the ids are those of one process."""
    workers = min(workers, len(texts) // _MIN_TEXTS_PER_WORKER)  # a process is worth that many
    if workers > 1:
        size = -(-len(texts) // workers)
        parts = [texts[a:a + size] for a in range(0, len(texts), size)]
        return [ids for part in forked.fork_map(lambda t: _encode(tokenizer, t), parts)
                for ids in part]
    out: list[list[int]] = []
    for a in range(0, len(texts), _TOKENIZE_CHUNK):
        out.extend(encode_texts(tokenizer, texts[a:a + _TOKENIZE_CHUNK]))
    return out


def node_cpus() -> int:
    """The CPUs this process may run on: those Slurm (or taskset, a cgroup) gave the task."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(cfg: "RunConfig", *, for_node: bool) -> int:
    """data.preprocessing_workers, or where null the processes that tokenize: every CPU of the
    task where one rank builds the node's cache while the others wait (`for_node`), else the
    CPUs shared by the node's ranks (LOCAL_WORLD_SIZE, set by torchrun), each tokenizing its own."""
    if cfg.data.preprocessing_workers:
        return cfg.data.preprocessing_workers
    cpus = node_cpus()
    if for_node:
        return cpus
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


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


def _end_tokens(cfg: "RunConfig", tokenizer) -> list[int]:
    if not cfg.data.add_eos:
        return []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise fail("data.add_eos", "the tokenizer has no EOS token to append",
                   "set data.add_eos: false, or give a tokenizer with an eos_token")
    return [int(eos)]


@dataclass
class _Examples:
    """Token ids and labels of the kept examples, and what happened to the others."""

    ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    total: int = 0
    empty: int = 0
    truncated: int = 0
    no_response: int = 0
    longest: int = 0


def _mask_and_cut(body: list[list[int]], heads: list[list[int]] | None, start: list[int],
                  end: list[int], max_len: int, train_all: bool = False) -> _Examples:
    """Each example's ids and labels (-100 on start + prompt unless train_all), cut to max_len."""
    out = _Examples(total=len(body))
    for i, toks in enumerate(body):
        if not toks:
            out.empty += 1
            continue
        head = start + (heads[i] if heads is not None else [])
        ids = head + toks + end
        if heads is not None and not train_all:
            labels = [IGNORE] * len(head) + toks + end
        else:
            labels = list(ids)
        out.longest = max(out.longest, len(ids))
        if len(ids) > max_len:
            out.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
            if heads is not None and all(x == IGNORE for x in labels):
                out.no_response += 1
                continue
        out.ids.append(ids)
        out.labels.append(labels)
    return out


def _report(ex: _Examples, key: str, what: str, max_len: int, warnings: list[str]) -> None:
    """Warnings for the dropped and cut examples; a ConfigError when none is left."""
    if ex.empty:
        warnings.append(f"{key}: dropped {ex.empty} {what} examples whose text gives no tokens")
    if ex.truncated:
        warnings.append(f"{key}: {ex.truncated} of {ex.total} {what} examples are longer than "
                        f"data.max_seq_len={max_len} and were cut (longest: {ex.longest} tokens)")
    if ex.no_response:
        warnings.append(f"{key}: dropped {ex.no_response} {what} examples whose prompt fills all "
                        f"{max_len} tokens, leaving no response to learn")
    if not ex.ids:
        if ex.no_response:
            raise fail("data.max_seq_len", f"every {what} example's prompt is at least "
                       f"max_seq_len={max_len} tokens, so no response token is left",
                       "raise data.max_seq_len or shorten the prompts")
        raise fail(key, f"no {what} example gives any token", "check the text column")


def _flatten(ex: _Examples) -> Tokens:
    import numpy as np

    lengths = np.fromiter((len(x) for x in ex.ids), dtype=np.int64, count=len(ex.ids))
    total = int(lengths.sum())
    flat_ids = np.fromiter((t for x in ex.ids for t in x), dtype=np.int32, count=total)
    flat_lab = np.fromiter((t for x in ex.labels for t in x), dtype=np.int32, count=total)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokens(flat_ids, flat_lab, offsets)


def _render_and_encode(job: tuple, rows: list[tuple[list[dict], int]]) -> tuple[list, list, list]:
    """Token ids, labels and refused rows of some conversations (rows: (conversation, row))."""
    from launcher.data import chat
    renderer, tokenizer = job
    segs, _, bad = chat.render_all([c for c, _ in rows], [n for _, n in rows], renderer)
    ids, labels = chat.encode_segments(tokenizer, segs, _encode)
    return ids, labels, bad


def in_workers(fn, job: tuple, rows: list, workers: int) -> tuple[list, list, list]:
    """fn(job, rows) over contiguous chunks of rows in `workers` forked processes (fewer where
    there are few rows: _MIN_TEXTS_PER_WORKER each), the three lists of each chunk joined in
    order: the same result as fn(job, rows) in this process."""
    workers = min(workers, len(rows) // _MIN_TEXTS_PER_WORKER)
    if workers <= 1:
        return fn(job, rows)
    size = -(-len(rows) // workers)
    chunks = [rows[a:a + size] for a in range(0, len(rows), size)]
    out: tuple[list, list, list] = ([], [], [])
    for part in forked.fork_map(lambda r: fn(job, r), chunks):
        for whole, piece in zip(out, part):
            whole.extend(piece)
    return out


def _chat_examples(d: "DataConfig", tokenizer, rec: Records, key: str,
                   warnings: list[str], workers: int = 1) -> _Examples:
    from launcher.data import chat
    from launcher.data.reading import check_bad_rows

    renderer = chat.Renderer(chat.template_text(d, tokenizer), tokenizer, d.train_on)
    numbers = rec.row_numbers or list(range(1, len(rec) + 1))
    ids, labels, bad = in_workers(_render_and_encode, (renderer, tokenizer),
                                   list(zip(rec.chats, numbers)), workers)
    check_bad_rows(d, (rec.bad or []) + bad, rec.rows, key, d.path or key, warnings)
    out = _Examples(total=len(ids))
    for a, b in zip(ids, labels):
        if not a or all(x == IGNORE for x in b):
            out.empty += 1
            continue
        out.longest = max(out.longest, len(a))
        if len(a) > d.max_seq_len:
            out.truncated += 1
            a, b = a[:d.max_seq_len], b[:d.max_seq_len]
            if all(x == IGNORE for x in b):
                out.no_response += 1
                continue
        out.ids.append(a)
        out.labels.append(b)
    return out


def tokenize_records(cfg: "RunConfig", tokenizer, rec: Records, key: str, split: str,
                     warnings: list[str], d: "DataConfig | None" = None) -> Tokens:
    """One Tokens example per record (`split`: "train" or "eval"), masked, and cut to
    max_seq_len (with packing too: a packed row holds whole examples); warnings for what was
    dropped or cut go to `warnings`. `d`: this source's data settings (default cfg.data)."""
    d = d or cfg.data
    workers = cfg.data.preprocessing_workers or 1
    if rec.chats is not None:
        ex = _chat_examples(d, tokenizer, rec, key, warnings, workers)
    else:
        start = _start_tokens(tokenizer)
        end = _end_tokens(cfg, tokenizer)
        body = _encode(tokenizer, rec.texts, workers)
        heads = _encode(tokenizer, rec.prompts, workers) if rec.prompts is not None else None
        ex = _mask_and_cut(body, heads, start, end, d.max_seq_len, d.train_on == "all")
    _report(ex, key, "train" if split == "train" else "eval", d.max_seq_len, warnings)
    tokens = _flatten(ex)
    tokens.stats = {"examples": ex.total, "truncated": ex.truncated,
                    "dropped": ex.empty + ex.no_response}
    return tokens
