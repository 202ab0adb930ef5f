"""Preference rows without any library: one row of a preference file -> its prompt and its
chosen and rejected answers (`row_pair`), for the login-node checks (validate reads the first
rows) and the ranks (launcher/data/pairs.py reads them all), so both refuse a row in the same
words. The layouts are listed in launcher/data/pairs.py."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.schema import DataConfig


class Pair:
    """One usable row: the prompt (text, a message list, or None), the two answers (text or
    message lists), and whether it is rendered with the chat template."""

    def __init__(self, prompt: Any, chosen: Any, rejected: Any, chat: bool):
        self.prompt, self.chosen, self.rejected, self.chat = prompt, chosen, rejected, chat


def _messages(value: Any, answer: bool = True) -> list[dict] | None:
    """A message list (one message counts as a list of one) normalised, or None for text.
    answer=False: a prompt (no assistant message needed)."""
    from launcher.checks.messages import normalise
    if isinstance(value, dict):
        return normalise([value], answer)
    if isinstance(value, (list, tuple)):
        return normalise(list(value), answer)
    return None


def _as_user(v: Any) -> list[dict]:
    return v if isinstance(v, list) else ([{"role": "user", "content": v}] if v else [])


def _as_answer(v: Any) -> list[dict]:
    return v if isinstance(v, list) else [{"role": "assistant", "content": v}]


def row_pair(d: "DataConfig", row: dict[str, Any]) -> Pair:
    """The pair of one row (BadRow when it is not one)."""
    from launcher.checks.messages import BadRow

    prompt: Any = None
    if d.messages_field is not None:
        prompt = _messages(row.get(d.messages_field), answer=False)
    elif d.prompt_field is not None:
        v = row.get(d.prompt_field)
        prompt = _messages(v, answer=False) if isinstance(v, (list, dict)) else v
        if isinstance(prompt, str) and d.input_field and (row.get(d.input_field) or "").strip():
            prompt = f"{prompt}\n{row[d.input_field]}"
    sides = []
    for k in (d.chosen_field, d.rejected_field):
        v = row.get(k)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise BadRow(f"'{k}' is missing or blank")
        try:
            sides.append(_messages(v) if isinstance(v, (list, dict)) else str(v))
        except BadRow as exc:
            raise BadRow(f"'{k}' {exc}") from None
    chosen, rejected = sides
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        n = 0  # TRL's implicit prompt: the messages both conversations share
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    chat = bool(d.chat_template) or any(isinstance(x, list) for x in (prompt, chosen, rejected))
    if chat:
        prompt, chosen, rejected = _as_user(prompt), _as_answer(chosen), _as_answer(rejected)
        for name, ans in (("chosen", chosen), ("rejected", rejected)):
            if not ans or ans[-1]["role"] != "assistant":
                raise BadRow(f"the {name} conversation does not end with an assistant message")
    return Pair(prompt, chosen, rejected, chat)
