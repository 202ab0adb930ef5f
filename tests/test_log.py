"""One way to tell the user something on stderr (launcher/common/log.py), rank 0 by default, with the
text users have always seen; and one answer to "am I rank 0"."""
from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest

from launcher import data
from launcher.cluster import dist_env
from launcher.common import log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_text_users_see(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    logger = log.get_logger("launcher.somewhere")
    logger.warning("the data is odd")
    logger.info("resumed from here")
    logger.error("it broke")
    assert capsys.readouterr().err == ("ftlaunch: warning: the data is odd\n"
                                       "ftlaunch: resumed from here\n"
                                       "ftlaunch: error: it broke\n")


def test_only_rank_0_speaks_unless_asked(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log.get_logger("launcher.somewhere").warning("every rank would say this")
    log.get_logger("launcher.somewhere", all_ranks=True).warning("rank 1 says this about itself")
    assert capsys.readouterr().err == "ftlaunch: warning: rank 1 says this about itself\n"


@pytest.mark.parametrize("environ", [
    {}, {"RANK": "0", "WORLD_SIZE": "2"}, {"RANK": "1", "WORLD_SIZE": "2"},
    {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
])
def test_is_rank0_agrees_with_the_rank_environment(monkeypatch, environ):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert log.is_rank0() is dist_env.from_environ().is_main


def test_the_data_warnings_go_through_the_logger(capsys, monkeypatch):
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=2)
    monkeypatch.setenv("RANK", "0")
    assert data.tokenizer_pad_id(tok) == 2
    assert capsys.readouterr().err.startswith("ftlaunch: warning: the tokenizer has no pad token")
    monkeypatch.setenv("RANK", "1")
    assert data.tokenizer_pad_id(tok) == 2
    assert capsys.readouterr().err == ""


def test_no_module_prints_its_own_warnings():
    """Warnings are written by launcher/common/log.py alone (no second format, no second rank check)."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "launcher")):
        for name in sorted(files):
            if not name.endswith(".py") or name == "log.py":
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                text = fh.read()
            if re.search(r"ftlaunch: warning|def _?warn\(|def _?is_rank0|def _writer", text):
                offenders.append(name)
    assert offenders == []
