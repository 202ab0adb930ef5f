"""A user's first day, end to end, in the order they did it, on the tiny model: their own chat
data in both layouts (messages and ShareGPT) mixed, counted in epochs, ChatML with its markers
added as new tokens; validate (refused first: the tokenizer lacks the markers; then fixed as the
message says), data --show, plan, run on 2 CPU ranks, Ctrl-C, resume, status, runs, stop (of
the finished run: nothing to stop), export, load the
export and generate with its saved template (it stops at the end-of-turn token); then a peer's
config converted and validated from its own folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import combos
from launcher import cli
from test_train_engine import ROOT, rank_env


def ftlaunch(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", *argv], cwd=ROOT, env=rank_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.multirank
@pytest.mark.slow
def test_first_day(tiny, tmp_path, capsys, monkeypatch, umask_kept):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "first-day-secret-value")  # in the user's shell only
    files = combos.write_data(str(tmp_path / "data"), n=20)
    run = {"name": "first-day",
           "model": {"path": tiny["model"], "dtype": "fp32"},
           "data": {"mix": [{"path": files["messages"], "messages_field": "messages", "weight": 1},
                            {"path": files["sharegpt"], "messages_field": "conversations",
                             "weight": 1}],
                    "chat_template": "chatml", "max_seq_len": 48, "eval_fraction": 0.1,
                    "cache_dir": str(tmp_path / "cache")},
           "train": {"epochs": 12, "micro_batch_size": 4, "lr": 1.0e-2, "warmup_steps": 2,
                     "device": "cpu", "checkpoint_every": 10, "eval_every": 20},
           "freeze": {"policy": "full"},
           "deepspeed": {"zero_stage": 1},
           # a shared cluster: the run is the user's alone, the W&B key comes from the shell
           "cluster": {"env_from_shell": ["WANDB_API_KEY"]},
           "output": {"dir": str(tmp_path / "run"), "private": True}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))

    # 1. validate: chatml's markers are not in the tiny tokenizer; the message says what to add
    code, out, err = call(["validate", str(path)], capsys)
    assert code == 2 and "data.chat_template" in err and "model.special_tokens" in err, err
    run["model"]["special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    code, out, err = call(["validate", str(path)], capsys)
    assert code == 0, err
    assert "mix of 2:" in out and "None" not in out.split("data", 1)[1].splitlines()[0]
    assert "12 epochs = about" in out  # the epoch estimate over both sources

    # 2. data --show: the trained part marked, both sources drawn
    code, out, err = call(["data", str(path), "--show", "1"], capsys)
    assert code == 0, err
    assert "[[" in out and "<|im_end|>]]" in out and out.count("source ") == 2

    # 3. plan
    code, out, err = call(["plan", str(path)], capsys)
    assert code == 0 and "verdict:" in out, err

    # 4. run on 2 CPU ranks, Ctrl-C once: a checkpoint and exit 75
    p = ftlaunch("run", str(path))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-4000:]
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 75, err[-4000:]
    assert "Traceback" not in err
    stopped = [x for x in out.splitlines() if x.startswith("stopped at step")]
    assert len(stopped) == 1 and "--resume" in stopped[0], out[-2000:]

    # 5. resume: the same command continues from the checkpoint to the end
    p = ftlaunch("run", str(path))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    assert "resumed from" in out + err
    assert "2 cpu ranks, global batch 4 micro x 1 accum x 2 ranks = 8 sequences" in out
    assert "eval loss" in err and "at step 40" in err  # evaluations are printed as they come

    # the run directory is private and no file of it holds the key
    assert os.stat(tmp_path / "run").st_mode & 0o777 == 0o700
    for dirpath, _, names in os.walk(tmp_path / "run"):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as fh:
                assert b"first-day-secret-value" not in fh.read(), os.path.join(dirpath, n)

    # 6. status
    code, out, err = call(["status", str(tmp_path / "run"), "--json"], capsys)
    assert code == 0, err
    st = json.loads(out)
    assert st["step"] == st["max_steps"] and st["max_steps"] >= 30, st

    # 6b. runs lists it (from the folder it ran in); stop of a finished run changes nothing
    code, out, err = call(["runs"], capsys)
    assert code == 0 and out.startswith("finished") and out.rstrip().endswith(
        str(tmp_path / "run")) and f"{st['step']}/{st['max_steps']}" in out, out + err
    code, out, err = call(["stop", str(tmp_path / "run")], capsys)
    assert code == 0 and "is finished" in out and "nothing changed" in out, out + err
    assert not (tmp_path / "run" / "STOP").exists()

    # 7. export: the added tokens' rows, the template and the end-of-turn token come along
    export = tmp_path / "export"
    code, out, err = call(["export", str(tmp_path / "run"), "-o", str(export)], capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    tok = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > 384
    gen = GenerationConfig.from_pretrained(str(export))
    assert gen.eos_token_id[0] == eot and tok.eos_token_id in gen.eos_token_id
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    half = tmp_path / "export-fp16"
    code, out, err = call(["export", str(tmp_path / "run"), "-o", str(half), "--dtype", "fp16"],
                          capsys)
    assert code == 0, err
    import torch
    assert AutoModelForCausalLM.from_pretrained(str(half)).config.dtype == torch.float16

    # 8. generate with the saved template: the answer stops at <|im_end|>
    import torch
    q, a = combos.CHATS[3]
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        outp = model.generate(ids, max_new_tokens=24, do_sample=False)
    new = outp[0, ids.shape[1]:].tolist()
    assert eot in new and new.index(eot) == len(new) - 1, tok.decode(new)  # stopped there
    assert len(new) < 24

    # 9. a peer's config, converted beside it and validated from another folder
    peer = tmp_path / "axolotl"
    peer.mkdir()
    row = {"peer": "axolotl", "datasets": 2, "steps": "epochs", "tuning": "lora", "tokens": True,
           "deepspeed": 2, "report_to": "wandb", "empty_keys": True}
    cfg = combos.write_peer(row, str(peer), os.path.relpath(combos.chat_model(str(tmp_path)), peer))
    code, out, err = call(["convert", cfg, "-o", str(peer / "run.yaml")], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "data")
    code, out, err = call(["validate", str(peer / "run.yaml")], capsys)
    assert code == 0, err
