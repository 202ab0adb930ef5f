"""The run directory's state files (launcher/cluster/run_state.py): STOP and exit_status.json, written,
read and interpreted in one module."""
from __future__ import annotations

import os
import re
import shlex
import signal
import time

import pytest

from launcher.cluster import layout, run_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stop_file_round_trip(tmp_path):
    run_dir = str(tmp_path)
    assert run_state.stop_path(run_dir) == os.path.join(run_dir, layout.STOP_REQUEST)
    assert not run_state.stop_requested(run_dir)
    run_state.request_stop(run_dir)
    run_state.request_stop(run_dir)  # asking twice is one request
    assert run_state.stop_requested(run_dir)
    run_state.clear_stop(run_dir)
    assert not run_state.stop_requested(run_dir)
    run_state.clear_stop(run_dir)  # nothing to clear is fine


def test_stop_votes_count_the_file_on_rank_0_only(tmp_path):
    stop = run_state.StopRequest()
    assert stop.votes(str(tmp_path), main=True) == [0.0, 0.0]
    run_state.request_stop(str(tmp_path))
    assert stop.votes(str(tmp_path), main=True) == [0.0, 1.0]
    assert stop.votes(str(tmp_path), main=False) == [0.0, 0.0]


def test_a_signal_sets_the_flag_and_the_first_names_it(capsys):
    stop = run_state.StopRequest()
    old = {s: signal.getsignal(getattr(signal, s)) for s in stop.SIGNALS}
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for name, handler in old.items():
            signal.signal(getattr(signal, name), handler)
    assert stop.requested and stop.signal == "SIGUSR1"
    assert "ftlaunch: SIGUSR1 received: stopping at the next step boundary" in capsys.readouterr().err


def test_resume_command_quotes_the_run_dir(tmp_path):
    run_dir = str(tmp_path / "a run; rm -rf x")
    words = shlex.split(run_state.resume_command(run_dir))
    assert words == ["ftlaunch", "run", os.path.join(run_dir, layout.RESOLVED), "--resume"]


def test_exit_status_is_read_only_when_written_by_this_launch(tmp_path):
    run_dir = str(tmp_path)
    since = time.time() - 1
    assert run_state.read_exit_status(run_dir, since) is None  # none yet
    run_state.write_exit_status(run_dir, 0, layout.EXIT_STOPPED, 7, "ck7", "stopped on request")
    rec = run_state.read_exit_status(run_dir, since)
    assert (rec["code"], rec["step"], rec["checkpoint"], rec["rank"]) == (75, 7, "ck7", 0)
    assert run_state.read_exit_status(run_dir, time.time() + 3600) is None  # an earlier launch's
    (tmp_path / layout.EXIT_STATUS).write_text("[75]")
    assert run_state.read_exit_status(run_dir, since) is None  # not a record


def test_an_unwritable_status_is_skipped(tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir")
    run_state.write_exit_status(missing, 0, 1, -1, None, "boom")  # does not raise
    assert not os.path.exists(missing)


def test_only_run_state_names_the_state_files():
    """Every other module goes through run_state: none builds the STOP or exit_status.json path."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "launcher")):
        for name in sorted(files):
            if not name.endswith(".py") or name in ("run_state.py", "layout.py"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                text = fh.read()
            if re.search(r"STOP_REQUEST|EXIT_STATUS|exit_status\.json\"|[\"']STOP[\"']", text):
                offenders.append(name)
    assert offenders == []


@pytest.mark.parametrize("code, failure", [(0, False), (75, False), (2, True), (1, True), (None, True)])
def test_what_counts_as_a_failure(code, failure):
    assert run_state.is_failure(code) is failure
