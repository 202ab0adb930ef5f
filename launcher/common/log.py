"""Messages to the user on stderr: one `logging` setup for every module.

    from launcher.common.log import get_logger
    log = get_logger(__name__)
    log.warning("the tokenizer has no pad token")   # stderr: "ftlaunch: warning: the tokenizer ..."

Warnings and errors read `ftlaunch: <level>: <message>`, information `ftlaunch: <message>`,
flushed as they are written. By default only rank 0 speaks (every rank would repeat the same
line); `get_logger(name, all_ranks=True)` is for what one rank has to say about itself.
`is_rank0()` is the one answer to "am I the process that speaks and writes for the job".
A warning is shown once per job: one the launching process showed already (`ftlaunch run`
checks the data before the ranks read it again) is dropped; it passes `shown_warnings()` to the
ranks in FTLAUNCH_SHOWN_WARNINGS (a JSON list).
"""
from __future__ import annotations

import json
import logging
import os
import sys

ROOT = "ftlaunch"
SHOWN_ENV = "FTLAUNCH_SHOWN_WARNINGS"


def _inherited() -> set[str]:
    try:
        shown = json.loads(os.environ.get(SHOWN_ENV, "[]"))
    except ValueError:
        return set()
    return {m for m in shown if isinstance(m, str)} if isinstance(shown, list) else set()


_INHERITED: set[str] = _inherited()   # shown by the process that started this one
_SHOWN: set[str] = set()


def shown_warnings() -> list[str]:
    """The warnings this process has shown (and those it inherited), for the processes it starts."""
    return sorted(_SHOWN | _INHERITED)


def is_rank0() -> bool:
    """True in the process that speaks for the job: global rank 0 of the process group once one
    is initialised, before that RANK from the environment (a plain process, without RANK, is 0)."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for the question
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{ROOT}: {record.levelname.lower()}: {text}"
        return f"{ROOT}: {text}"


class _Once(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        _SHOWN.add(text)
        return text not in _INHERITED


class _Rank0(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_rank0()


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        handler.addFilter(_Once())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # the text is ours; an application's root handler adds nothing
    return root


def get_logger(name: str, *, all_ranks: bool = False) -> logging.Logger:
    """The logger for module `name` (rank 0 only unless all_ranks)."""
    _root()
    short = name[len("launcher."):] if name.startswith("launcher.") else name
    logger = logging.getLogger(f"{ROOT}.{short}" + (".all_ranks" if all_ranks else ""))
    if not all_ranks and not any(isinstance(f, _Rank0) for f in logger.filters):
        logger.addFilter(_Rank0())
    return logger
