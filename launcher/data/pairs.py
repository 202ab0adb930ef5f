"""Preference pairs (train.objective dpo, ipo, simpo, orpo): a prompt with a chosen and a
rejected answer -> two token sequences per example, trained on the answers only.

Layouts read (each row):
  - text: `prompt` (data.prompt_field, with data.input_field appended as for SFT), `chosen` and
    `rejected` (data.chosen_field / rejected_field) strings; LLaMA-Factory's alpaca ranking
    layout is this one with prompt_field: instruction, input_field: input;
  - TRL's conversations: `chosen` and `rejected` message lists, either after a `prompt` message
    list or holding the whole conversation (the messages both share are the prompt);
  - LLaMA-Factory's sharegpt ranking layout and Axolotl's chat-template layout: the conversation
    so far in data.messages_field (`conversations` / `messages`) and `chosen` / `rejected` one
    message each ({from, value} or {role, content}).
A row with a message list anywhere (or with data.chat_template set) is rendered with the run's
chat template (launcher/data/chat.py), the prompt with the generation prompt, and trained on
the final assistant answer only; plain text is `start + prompt + answer + [eos]`, trained on
`answer + [eos]`.

Length. When the prompt and the longer answer exceed data.max_seq_len the prompt is cut from
its start (its end, next to the answers, is kept; a BOS stays first) and both answers are kept
whole; a pair whose longer answer alone leaves no room for a prompt token is dropped. Both are
counted in a warning.

Storage. The pairs are one `Tokens` of 2n sequences (chosen at 2i, rejected at 2i+1), so the
tokenized cache keeps them like SFT data; `PairView` shows them as n pairs to the sampler and
the collate (`collate_pairs`: the chosen rows, then the rejected rows, of one micro batch).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from launcher.data.chat import IGNORE
from launcher.checks.preference_rows import Pair, row_pair
from launcher.data.reading import (_check_path, _read, check_bad_rows, fail, source_format,
                                   print_warning)

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.schema import DataConfig, RunConfig
    from launcher.data.splits import Splits
    from launcher.data.tokenize import Tokens


# ------------------------------------------------------------------------------ rows
def read_pairs(cfg: "RunConfig", path: str, key: str, warnings: list[str]
               ) -> tuple[list[Pair], list[int], int]:
    """The pairs of a file or saved folder, their row numbers, and the rows read."""
    from launcher.checks.messages import BadRow

    d = cfg.data
    _check_path(path, key)
    fmt = source_format(path, key, d.format)
    if fmt == "text":
        raise fail("data.format", "preference data needs a prompt, a chosen and a rejected "
                   "answer per row, which a text file cannot hold",
                   "use jsonl/json/csv/parquet records (docs/preference.md)")
    wanted = [c for c in (d.messages_field, d.prompt_field, d.input_field, d.chosen_field,
                          d.rejected_field) if c]
    cols, names, bad, lines = _read(d, path, key, fmt, wanted)
    missing = [c for c in (d.chosen_field, d.rejected_field) if c not in cols]
    for c in (d.messages_field, d.prompt_field):
        if c and c not in cols:
            missing.append(c)
    if missing:
        k = {d.chosen_field: "data.chosen_field", d.rejected_field: "data.rejected_field",
             d.messages_field: "data.messages_field", d.prompt_field: "data.prompt_field"}
        raise fail(k[missing[0]], f"{path} has no column '{missing[0]}'; its columns: "
                   f"{', '.join(names) or '(none)'}", "set data.chosen_field, "
                   "data.rejected_field and data.prompt_field (or data.messages_field) to its "
                   "columns (docs/preference.md)")
    n = len(next(iter(cols.values())))
    lines = lines or list(range(1, n + 1))
    pairs, numbers, bad, unread = [], [], list(bad), len(bad)
    for i in range(n):
        try:
            pairs.append(row_pair(d, {c: cols[c][i] for c in cols}))
            numbers.append(lines[i])
        except BadRow as exc:
            bad.append((lines[i], str(exc)))
    rows = n + unread
    if not pairs:
        raise fail(key, f"no row of {path} is a preference pair ({bad[-1][1] if bad else 'empty'})",
                   "give each row a prompt, a chosen and a rejected answer (docs/preference.md)")
    check_bad_rows(d, bad, rows, key, path, warnings)
    return pairs, numbers, rows


# ------------------------------------------------------------------------------ tokens
def _side_tokens(tokenizer, pairs: list[Pair], d: "DataConfig", add_eos: bool
                 ) -> list[tuple[list[int], list[int], list[int], list[int], list[int]]]:
    """Per pair: (prompt ids, chosen ids, chosen labels, rejected ids, rejected labels) before
    any cut; chat pairs rendered with the template."""
    from launcher.data import chat
    from launcher.data.tokenize import _encode, _start_tokens

    out: list = [None] * len(pairs)
    text_idx = [i for i, p in enumerate(pairs) if not p.chat]
    chat_idx = [i for i, p in enumerate(pairs) if p.chat]
    if text_idx:
        start = _start_tokens(tokenizer)
        eos = [int(tokenizer.eos_token_id)] if add_eos and tokenizer.eos_token_id is not None else []
        enc = lambda xs: _encode(tokenizer, xs)  # noqa: E731
        prompts = enc([pairs[i].prompt or "" for i in text_idx])
        cho = enc([pairs[i].chosen for i in text_idx])
        rej = enc([pairs[i].rejected for i in text_idx])
        for j, i in enumerate(text_idx):
            c, r = cho[j] + eos, rej[j] + eos
            out[i] = (start + prompts[j], c, list(c), r, list(r))
    if chat_idx:
        renderer = chat.Renderer(chat.template_text(d, tokenizer), tokenizer, "assistant")
        segs = []
        for i in chat_idx:
            p = pairs[i]
            head = (renderer.render(p.prompt, generation_prompt=True,
                                    tools=None)[0] if p.prompt else "")
            for ans in (p.chosen, p.rejected):
                text, spans = renderer.spans(p.prompt + ans)
                if not text.startswith(head):
                    from launcher.checks.messages import BadRow
                    raise BadRow("the chat template renders the prompt differently inside the "
                                 "conversation, so the answer cannot be found")
                spans = [(max(a, len(head)), b) for a, b in spans if b > len(head)]
                segs.append(chat.segments(text, spans))
        ids, labels = chat.encode_segments(tokenizer, segs, _encode)
        for j, i in enumerate(chat_idx):
            sides = []
            for a, b in ((ids[2 * j], labels[2 * j]), (ids[2 * j + 1], labels[2 * j + 1])):
                k = next((n for n, x in enumerate(b) if x != IGNORE), len(a))
                sides.append((a[:k], a[k:], b[k:]))
            (pc, c, cl), (_, r, rl) = sides
            out[i] = (pc, c, cl, r, rl)
    return out


def cut_pair(prompt: list[int], c: list[int], cl: list[int], r: list[int], rl: list[int],
             max_len: int, head: int) -> tuple[list[int], list[int]] | None:
    """The pair as two (ids, labels) sequences of at most max_len tokens: the prompt cut from
    its start (its first `head` tokens, the BOS, kept) so that both answers stay whole; None
    when the longer answer leaves no room for a prompt token."""
    longest = max(len(c), len(r))
    room = max_len - longest
    if room < min(1, len(prompt)) or not c or not r:
        return None
    if len(prompt) > room:
        keep_head = head if room > head else 0
        prompt = prompt[:keep_head] + prompt[len(prompt) - (room - keep_head):]
    masked = [IGNORE] * len(prompt)
    return prompt + c, masked + cl, prompt + r, masked + rl  # type: ignore[return-value]


def tokenize_pairs(cfg: "RunConfig", tokenizer, pairs: list[Pair], key: str, what: str,
                   warnings: list[str]) -> "Tokens":
    """The pairs as 2n sequences (chosen at 2i, rejected at 2i+1), cut or dropped to fit."""
    import numpy as np

    from launcher.data.tokenize import Tokens, _start_tokens

    d = cfg.data
    head = len(_start_tokens(tokenizer))
    sides = _side_tokens(tokenizer, pairs, d, d.add_eos)
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    truncated = dropped = longest = 0
    for (p, c, cl, r, rl), pair in zip(sides, pairs):
        longest = max(longest, len(p) + max(len(c), len(r)))
        cut = cut_pair(p, c, cl, r, rl, d.max_seq_len, 0 if pair.chat else head)
        if cut is None:
            dropped += 1
            continue
        truncated += len(cut[0]) < len(p) + len(c) or len(cut[2]) < len(p) + len(r)
        ids += [cut[0], cut[2]]
        labels += [cut[1], cut[3]]
    if truncated:
        warnings.append(f"{key}: {truncated} of {len(pairs)} {what} pairs are longer than "
                        f"data.max_seq_len={d.max_seq_len}; their prompts were cut from the "
                        f"start, both answers kept whole (longest: {longest} tokens)")
    if dropped:
        warnings.append(f"{key}: dropped {dropped} of {len(pairs)} {what} pairs whose longer "
                        f"answer leaves no room for the prompt in data.max_seq_len="
                        f"{d.max_seq_len}")
    if not ids:
        raise fail("data.max_seq_len", f"every {what} pair's answer is longer than "
                   f"max_seq_len={d.max_seq_len}", "raise data.max_seq_len")
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    t = Tokens(np.fromiter((v for x in ids for v in x), dtype=np.int32, count=int(lengths.sum())),
               np.fromiter((v for x in labels for v in x), dtype=np.int32,
                           count=int(lengths.sum())), offsets)
    t.stats = {"examples": len(pairs), "pairs": len(ids) // 2, "truncated": truncated,
               "dropped": dropped}
    return t


def load_pairs(cfg: "RunConfig", tokenizer, *, max_positions: int | None = None,
               warn: Callable[[str], None] = print_warning) -> "Splits":
    """`launcher.data.load` for preference data: one source (data.path), its eval split."""
    from launcher.data.splits import Splits
    from launcher.checks.messages import BadRow
    import numpy as np

    d = cfg.data
    if max_positions is not None and d.max_seq_len > max_positions:
        raise fail("data.max_seq_len", f"{d.max_seq_len} exceeds the model's {max_positions} "
                   "positions", f"use data.max_seq_len <= {max_positions}")
    warnings: list[str] = []
    pairs, _, rows = read_pairs(cfg, d.path, "data.path", warnings)
    if d.max_samples is not None:
        pairs = pairs[:d.max_samples]
    ev_pairs = None
    if d.eval_path:
        ev_pairs = read_pairs(cfg, d.eval_path, "data.eval_path", warnings)[0]
    elif d.eval_fraction > 0:
        n_eval = max(1, round(len(pairs) * d.eval_fraction))
        if n_eval >= len(pairs):
            raise fail("data.eval_fraction", f"holding out {d.eval_fraction} of {len(pairs)} "
                       "pairs leaves none for training", "lower data.eval_fraction or add data")
        held = set(int(i) for i in np.random.default_rng([int(cfg.train.seed), 0xE7A1])
                   .permutation(len(pairs))[:n_eval])
        ev_pairs = [p for i, p in enumerate(pairs) if i in held]
        pairs = [p for i, p in enumerate(pairs) if i not in held]
    try:
        train = tokenize_pairs(cfg, tokenizer, pairs, "data.path", "train", warnings)
        ev = (tokenize_pairs(cfg, tokenizer, ev_pairs, "data.eval_path", "eval", warnings)
              if ev_pairs else None)
    except BadRow as exc:
        raise fail("data.chat_template", str(exc), "use a template with {% generation %} "
                   "markers, or data.chat_template: chatml") from None
    for w in warnings:
        warn(w)
    stats = {"train_examples": len(train) // 2, "train_pairs": len(train) // 2,
             "train_tokens": train.num_tokens, "train_loss_tokens": train.num_loss_tokens,
             "eval_examples": len(ev) // 2 if ev is not None else 0,
             "eval_tokens": ev.num_tokens if ev is not None else 0,
             "truncated": train.stats["truncated"], "dropped": train.stats["dropped"],
             "sources": [{"path": d.path, "weight": 1.0, "rows": rows,
                          "examples": len(train) // 2}]}
    return Splits(train=train, eval=ev, warnings=warnings, stats=stats)


# ------------------------------------------------------------------------------ batches
class PairView(Sequence):
    """A `Tokens` of 2n sequences seen as n pairs: `self[i]` is {"index": i, "chosen": {...},
    "rejected": {...}} (each {"input_ids", "labels"})."""

    def __init__(self, tokens: "Tokens"):
        self.tokens = tokens
        self.stats = tokens.stats

    def __len__(self) -> int:
        return len(self.tokens) // 2

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range (0..{len(self) - 1})")
        return {"index": i, "chosen": self.tokens[2 * i], "rejected": self.tokens[2 * i + 1]}

    def length(self, i: int) -> int:
        return max(self.tokens.length(2 * i), self.tokens.length(2 * i + 1))

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    @property
    def num_loss_tokens(self) -> int:
        return self.tokens.num_loss_tokens


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """One micro batch of pairs: input_ids / attention_mask / labels of the B chosen rows then
    the B rejected rows (right-padded to the longest of all 2B), "index" (the pairs' indices,
    for precomputed reference log-probs) and "num_tokens"."""
    import torch

    from launcher.data.batching import collate, num_tokens
    rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    out = collate(rows, pad_id)
    out["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    out["num_tokens"] = torch.tensor(num_tokens(rows))
    return out


def pair_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    import functools
    return functools.partial(collate_pairs, pad_id=pad_id)


def as_pairs(splits: "Splits") -> "Splits":
    """The splits with train and eval seen as pairs (after the cache)."""
    if not isinstance(splits.train, PairView):
        splits.train = PairView(splits.train)
        if splits.eval is not None:
            splits.eval = PairView(splits.eval)
    return splits
