"""The combination matrix: features that work alone must work together.

A pairwise covering set over the feature switches (tests/combos.py `levels`: steps or epochs with
epoch-based eval and saves, one file or a mix, five data layouts, packing, three chat templates,
added tokens, the freeze policies, quantization, the ZeRO stages, offload, a DeepSpeed file,
trackers, the watchdog, the preference objectives on pairs in four layouts, cluster.after, a
container per runtime, a sweep, cluster.min_nodes; the schema's own values), each row's run file through every
login command, in process: validate, ds-config, plan (the tiny model's config), data, slurm
(render; a sweep's rows render a run directory per point).
Never a traceback: exit 0, or exit 2 with a message that names a key and its fix.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

import combos
from launcher import cli

KEYED = re.compile(r"^  [\w<>\-]+(\[\d+\])?(\.[\w\-]+(\[\d+\])?)*( \([^)]*\))?: .+\n      fix: .+",
                   re.M)
COMMANDS = (["validate"], ["ds-config"], ["plan"], ["data", "--show", "1"], ["slurm"])


def test_switches_are_schema_keys_and_the_set_covers_every_pair():
    keys = combos.schema_keys()
    assert not [k for k in combos.SWITCH_KEYS if k not in keys]
    lv = combos.levels()
    rows = combos.pairwise(lv, allowed=combos.allowed)
    want = sum(len(lv[a]) * len(lv[b]) for i, a in enumerate(lv) for b in list(lv)[i + 1:])
    assert len(combos.covered_pairs(rows, lv)) == want - len(combos.REFUSED)
    assert len(rows) < 40  # a covering set, not the product (millions)
    assert combos.pairwise(lv, allowed=combos.allowed) == rows  # deterministic
    for a, va, b, vb in combos.REFUSED:
        assert not [r for r in rows if r[a] == va and r[b] == vb]


ROWS = combos.pairwise(combos.levels(), allowed=combos.allowed)


@pytest.fixture(scope="module")
def matrix_inputs(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    return {"model": combos.chat_model(str(d)),
            "files": combos.write_data(str(d / "data"))}


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("i", range(len(ROWS)), ids=[f"row{i}" for i in range(len(ROWS))])
def test_every_login_command_on_every_row(i, matrix_inputs, tmp_path, capsys, monkeypatch,
                                         umask_kept):
    row = ROWS[i]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(combos.FROM_SHELL, "not-a-real-key")  # set in the submitting shell
    tree = combos.run_tree(row, matrix_inputs["model"], matrix_inputs["files"], str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    results = {}
    for cmd in COMMANDS:
        sweep = combos.SWEEP if cmd[0] == "slurm" and row["sweep"] else []
        code, out, err = call([cmd[0], str(path), *cmd[1:], *sweep], capsys)
        assert "Traceback" not in out + err, (cmd, row, err)
        assert code in (0, 2), (cmd, row, code, err[-3000:])
        if code == 2:
            assert KEYED.search(err), (cmd, row, err[-3000:])
        results[cmd[0]] = (code, err)
    # the covering set leaves out the refused pairs: every command takes every row
    assert all(code == 0 for code, _ in results.values()), (row, results)
    made = sorted(d for d in os.listdir(tmp_path) if d.startswith("run") and d != "run.yaml")
    assert made == (combos.SWEEP_DIRS if row["sweep"] else ["run"]), (row, made)


@pytest.mark.parametrize("a, va, b, vb", combos.REFUSED)
def test_refused_pairs_name_their_key(a, va, b, vb, matrix_inputs, tmp_path, capsys, monkeypatch,
                                      umask_kept):
    """The pairs the covering set leaves out: refused by validate and by every other command,
    with the key and the fix, on the login node."""
    row = dict(ROWS[0], **{a: va, b: vb})
    monkeypatch.chdir(tmp_path)
    tree = combos.run_tree(row, matrix_inputs["model"], matrix_inputs["files"], str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    key = {"quant": "freeze.policy" if b == "freeze" else "quantization.mode",
           "offload": "deepspeed.offload_optimizer", "time": "cluster.time",
           "min_nodes": "train.sequence_parallel" if b == "longseq" else "deepspeed.zero_stage",
           "longseq": "train.tiled_mlp",
           "objective": {"packing": "data.packing", "sources": "data.mix",
                         "longseq": "train.sequence_parallel" if vb == "sp" else "train.tiled_loss"}.get(b)}[a]
    for cmd in COMMANDS:
        code, out, err = call([cmd[0], str(path), *cmd[1:]], capsys)
        assert code == 2 and KEYED.search(err) and f"  {key} (" in err, (cmd, row, err[-2000:])



# ------------------------------------------------------------------ convert's output
PEER_ROWS = combos.pairwise(combos.peer_levels(), allowed=combos.peer_allowed)


@pytest.mark.parametrize("i", range(len(PEER_ROWS)), ids=[f"peer{i}" for i in range(len(PEER_ROWS))])
def test_converted_peer_configs_pass_every_login_command(i, matrix_inputs, tmp_path, capsys,
                                                         monkeypatch):
    """A peer config (paths relative to its folder, keys present with no value as in the peers'
    own examples) converted into another folder: the written run file takes every login command
    from a third working directory."""
    row = PEER_ROWS[i]
    peer_dir, out_dir, elsewhere = tmp_path / "peer", tmp_path / "converted", tmp_path / "cwd"
    for d in (peer_dir, out_dir, elsewhere):
        d.mkdir()
    model_rel = os.path.relpath(matrix_inputs["model"], peer_dir)
    cfg = combos.write_peer(row, str(peer_dir), model_rel)
    out = out_dir / "run.yaml"
    monkeypatch.chdir(elsewhere)
    code, text, err = call(["convert", cfg, "-o", str(out)], capsys)
    assert code == 0 and "Traceback" not in text + err, (row, err)
    tree = yaml.safe_load(out.read_text())
    if row["report_to"]:
        assert tree["output"]["report_to"] == [row["report_to"]], tree
    if row["datasets"] == 2:
        assert len(tree["data"]["mix"]) == 2
    for cmd in COMMANDS:
        code, text, err = call([cmd[0], str(out), *cmd[1:]], capsys)
        assert "Traceback" not in text + err, (cmd, row, err)
        assert code == 0, (cmd, row, out.read_text(), err[-3000:])


# ------------------------------------------------------------------ through the ranks
RUN_ROWS = combos.pairwise(combos.run_levels())


def ftlaunch(*argv: str, cwd: str) -> subprocess.CompletedProcess:
    from test_train_engine import ROOT, rank_env
    return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=cwd,
                          env={**rank_env(), "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(RUN_ROWS)), ids=[f"run{i}" for i in range(len(RUN_ROWS))])
def test_run_export_load_status(i, matrix_inputs, tmp_path, capsys):
    """A smaller covering set through one CPU rank: `run --dry-run` (the first row), a run of 2
    steps, `export` of its checkpoint, the export loaded and generating, `status`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    row = combos.run_row(RUN_ROWS[i])
    tree = combos.run_tree(row, matrix_inputs["model"], matrix_inputs["files"], str(tmp_path))
    tree["model"]["dtype"] = "fp32"
    tree["train"].update(device="cpu", micro_batch_size=2)
    tree["data"]["max_samples"] = 8  # an epoch of 8 rows per source: a few steps
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    if i == 0:
        p = ftlaunch("run", str(path), "--dry-run", "--nproc", "1", cwd=str(tmp_path))
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-4000:]
        assert not (tmp_path / "run").exists()
    extra = ["--max-steps", "2"] if row["steps"] == "max_steps" else []
    p = ftlaunch("run", str(path), "--nproc", "1", *extra, cwd=str(tmp_path))
    assert p.returncode == 0 and "Traceback" not in p.stderr, (row, p.stderr[-4000:])
    out = tmp_path / "hf"
    code, text, err = call(["export", str(tmp_path / "run"), "-o", str(out)], capsys)
    assert code == 0, (row, err)
    tok = AutoTokenizer.from_pretrained(str(out))
    if row["freeze"] == "lora":
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(matrix_inputs["model"])
        base.resize_token_embeddings(len(tok))
        model = PeftModel.from_pretrained(base, str(out)).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert tok.chat_template  # the run's template, saved with the export
    ids = tok.apply_chat_template([{"role": "user", "content": "say hello."}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    code, text, err = call(["status", str(tmp_path / "run"), "--json"], capsys)
    assert code == 0, err
    st = json.loads(text)
    assert st["state"] == "finished" and st["step"] == st["max_steps"], st
