"""Chat conversations -> token ids and labels trained on the assistant turns only.

The template. `data.chat_template` null: the tokenizer's own (refused, with the fix, when it has
none); `chatml`: the built-in ChatML below; else a Jinja file. Templates render with jinja2
through transformers' `render_jinja_template` (the same environment `apply_chat_template` uses:
`raise_exception`, `tojson`, the `{% generation %}` tag, and the tokenizer's special tokens as
variables).

The trained part. Each conversation is rendered once and cut into segments, alternately not
trained and trained:
  - a template with `{% generation %}` markers says itself which characters are the assistant's
    (the built-in chatml has them: the content and its `<|im_end|>`, not the `\\n` after it);
  - a template without markers is rendered turn by turn: assistant turn i is what
    render(messages[:i+1]) adds to render(messages[:i], add_generation_prompt=True), less the
    whitespace the template puts between turns; every partial render must be a prefix of the
    whole (a template that rewrites earlier turns is refused, with the fix).
Segments are tokenised separately (the assistant part begins on a token boundary, exactly where
generation begins after the prompt at inference) and concatenated; labels are -100 on the
untrained segments. `data.train_on: all` trains on every token.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from launcher.checks import messages
from launcher.data.reading import fail

IGNORE = -100  # label of a position without loss (the value Hugging Face losses ignore)

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.schema import DataConfig

CHATML = messages.CHATML  # launcher/checks/messages.py: the login node renders it too
BUILTIN = {"chatml": CHATML}
_MARKERS = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


def template_text(d: "DataConfig", tokenizer, key: str = "data.chat_template") -> str:
    """The Jinja text of the chat template the data section asks for."""
    value = d.chat_template
    if value is None:
        t = getattr(tokenizer, "chat_template", None)
        if isinstance(t, dict):
            t = t.get("default")
        if not t:
            raise fail(key, "the tokenizer has no chat template and data.chat_template is null",
                       "set data.chat_template: chatml, or a path to a Jinja file (or use a "
                       "tokenizer saved with its chat_template)")
        return t
    path = messages.template_file(value)
    if path is None:
        return BUILTIN[value.rsplit("/", 1)[-1]]
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise fail(key, f"cannot read the chat template {path}: {exc.strerror or exc}",
                   f"give a Jinja file, or a built-in name ({', '.join(messages.BUILTIN_TEMPLATES)})"
                   ) from exc
    if not text.strip():
        raise fail(key, f"the chat template {path} is empty", "write the Jinja template in it")
    return text


def has_markers(template: str) -> bool:
    return _MARKERS.search(template) is not None


class Renderer:
    """Renders conversations with one template into (text, trained) segments."""

    def __init__(self, template: str, tokenizer, train_on: str):
        from transformers.utils.chat_template_utils import render_jinja_template

        self._render_fn = render_jinja_template
        self.template, self.train_on = template, train_on
        self.markers = has_markers(template)
        self.variables = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()
                          if isinstance(v, str)}

    def render(self, conv: list[dict], generation_prompt: bool = False, marked: bool = False,
               tools: list | None = None):
        out, spans = self._render_fn([list(conv)], chat_template=self.template,
                                     return_assistant_tokens_mask=marked, tools=tools,
                                     add_generation_prompt=generation_prompt, **self.variables)
        return out[0], (spans[0] if marked else [])

    def spans(self, conv: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans trained on (the row's `tools`, where it
        has them, passed to the template)."""
        tools = getattr(conv, "tools", None)
        if self.train_on == "all":
            text, _ = self.render(conv, tools=tools)
            return text, [(0, len(text))]
        if self.markers:
            text, spans = self.render(conv, marked=True, tools=tools)
            return text, [(a, b) for a, b in spans if b > a]
        text, _ = self.render(conv, tools=tools)
        spans = []
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            head, _ = (self.render(conv[:i], generation_prompt=True, tools=tools) if i
                       else ("", None))
            turn, _ = self.render(conv[:i + 1], tools=tools)
            if not (turn.startswith(head) and text.startswith(turn)):
                raise messages.BadRow(
                    f"message {i + 1}: the inference prompt (the turns before it with the "
                    "generation prompt) is not a prefix of the training text, so the assistant "
                    "part cannot be found and a model trained on it would see another prompt "
                    "than at inference; use a template with {% generation %} markers, or "
                    "data.chat_template: chatml")
            end = len(turn.rstrip())
            if end > len(head):
                spans.append((len(head), end))
        return text, spans


def segments(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """The text cut at the span edges: [(piece, trained)], empty pieces left out."""
    out, at = [], 0
    for a, b in spans:
        a, b = max(a, at), max(b, at)
        if a > at:
            out.append((text[at:a], False))
        if b > a:
            out.append((text[a:b], True))
        at = b
    if at < len(text):
        out.append((text[at:], False))
    return out


def render_all(convs: list[list[dict]], rows: list[int], renderer: Renderer
               ) -> tuple[list[list[tuple[str, bool]]], list[int], list[tuple[int, str]]]:
    """Segments of every conversation the template renders; the kept row numbers; the rows the
    template refused, as (row, why)."""
    out, kept, bad = [], [], []
    for conv, row in zip(convs, rows):
        try:
            text, spans = renderer.spans(conv)
        except messages.BadRow as exc:
            bad.append((row, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception, a Jinja error
            bad.append((row, f"the chat template fails on it: {type(exc).__name__}: "
                             f"{str(exc)[:200]}"))
            continue
        out.append(segments(text, spans))
        kept.append(row)
    return out, kept, bad


def encode_segments(tokenizer, segs: list[list[tuple[str, bool]]], encode) -> tuple[list, list]:
    """Token ids and labels of each conversation from its segments (one batched encode). A
    tokenizer that puts a prefix space before a string's first word (SentencePiece) encodes the
    later segments after a newline, then drops the newline's ids (as transformers does)."""
    nl = encode(tokenizer, ["\n"])[0]
    shift = bool(nl) and encode(tokenizer, ["\na"])[0][len(nl):] != encode(tokenizer, ["a"])[0]
    flat = [("\n" + s if shift and j else s) for conv in segs for j, (s, _) in enumerate(conv)]
    enc = encode(tokenizer, flat) if flat else []
    if shift:
        enc = [e[len(nl):] if j and e[:len(nl)] == nl else e
               for e, j in zip(enc, (j for conv in segs for j in range(len(conv))))]
    ids, labels, k = [], [], 0
    for conv in segs:
        a, b = [], []
        for _, trained in conv:
            toks = enc[k]
            k += 1
            a += toks
            b += toks if trained else [IGNORE] * len(toks)
        ids.append(a)
        labels.append(b)
    return ids, labels


def render_for_show(conv: list[dict], d: "DataConfig", tokenizer) -> list[tuple[str, bool]]:
    """One conversation's segments (for `ftlaunch data --show`)."""
    r = Renderer(template_text(d, tokenizer), tokenizer, d.train_on)
    return segments(*r.spans(conv))

