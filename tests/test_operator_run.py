"""One run directory through an operator's day, on 2 real CPU ranks (ZeRO-2, fp32, umask 022):

  1. train 4 steps with report_to [tensorboard, wandb]             -> finished; final/ exported
     `ftlaunch export` of its step-4 checkpoint gives final/'s logits (the engine's at step 4)
  2. `ftlaunch run` again                                           -> "is finished", nothing changed
  3. `ftlaunch run --max-steps 400`, Ctrl-C after a few steps       -> exit 75, one stop line, no
     traceback, a complete checkpoint; the schedule continues without a zero-lr step
  4. resume with a failure injected on rank 1                       -> `status` says failed
and `ftlaunch status` is read after each; metrics.jsonl, TensorBoard's events (read back with
tensorboard's EventAccumulator) and W&B's offline run files all hold each step once.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from launcher.rank import checkpoint, lr_schedule
from launcher import cli
from launcher.config.runfile import load
from test_train_engine import ROOT, rank_env

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


def env(**extra) -> dict:
    return {**rank_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def umask022() -> None:
    os.umask(0o022)


def launcher(*argv: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=umask022)


def torchrun(run_file: str, **extra) -> subprocess.CompletedProcess:
    p = launcher("torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "launcher", "train", run_file, **extra)
    out, err = p.communicate(timeout=400)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def status(run_dir: str, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["status", run_dir, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def train_lines(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


def snapshot(folder: str) -> dict:
    return {os.path.join(d, n): (os.path.getsize(os.path.join(d, n)),
                                 os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(folder) for n in names}


def wandb_history(run_dir: str) -> list[dict]:
    """History rows of every offline W&B run file (the LevelDB-style log W&B writes: a 7-byte
    header, then 32 KiB blocks of records, each checksum(4) length(2) type(1) data)."""
    from wandb.proto import wandb_internal_pb2 as pb
    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb"))):
        data = open(path, "rb").read()
        pos, cur, records = 7, b"", []
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 and length == 0:
                break
            cur += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # full or last fragment
                records.append(cur)
                cur = b""
        for raw in records:
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows


def test_an_operators_day(tiny, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(textwrap.dedent(f"""\
        name: operator
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true, eval_fraction: 0.05}}
        train: {{max_steps: 4, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 2, device: cpu}}
        freeze: {{policy: last_layers, trainable_layers: 1, also_train: [lm_head]}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{nodes: 1, gpus_per_node: 2}}
        output: {{dir: {run_dir}, report_to: [tensorboard, wandb]}}
        """))
    # 1. a finished run; its ranks leave without the interpreter's teardown, where torch's gloo
    # threads can abort a rank after its work is done (simulated: an exit handler that aborts)
    p = torchrun(str(run_file), FTLAUNCH_FAULT="step@2:abort-at-exit")
    assert p.returncode == 0, p.stderr[-3000:]
    st = status(run_dir, capsys)
    assert (st["state"], st["step"], st["max_steps"]) == ("finished", 4, 4)
    assert st["eval_loss"] is not None and st["checkpoint_step"] == 4 and st["last_failure"] is None
    old_mask = os.umask(0o022)
    try:  # `ftlaunch export` of the ZeRO-2 checkpoint: final/ is the engine's model at step 4
        out = str(tmp_path / "exported")
        assert cli.main(["export", f"{run_dir}/checkpoints/step-00000004", "-o", out,
                         "--dtype", "fp32"]) == 0
    finally:
        os.umask(old_mask)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        want = AutoModelForCausalLM.from_pretrained(f"{run_dir}/final").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert AutoTokenizer.from_pretrained(out).pad_token_id == 0
    assert os.path.exists(os.path.join(out, "generation_config.json"))

    # 2. running a finished run again changes nothing
    before = snapshot(run_dir)
    p = launcher("launcher", "run", str(run_file))
    o, e = p.communicate(timeout=300)
    assert p.returncode == 0, e
    assert f"{run_dir} is finished: step 4 of 4 done" in o and "nothing changed" in o
    assert snapshot(run_dir) == before

    # 3. continue to 400 steps, Ctrl-C after a few
    p = launcher("launcher", "run", str(run_file), "--max-steps", "400")
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None:
        if len(train_lines(run_dir)) >= 6:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    o, e = p.communicate(timeout=300)
    assert p.returncode == 75, o[-2000:] + e[-3000:]
    assert "Traceback" not in o + e and "FAILED" not in o + e, e[-3000:]
    assert f"train.max_steps 400 (--max-steps wins over 4 in {run_file})" in o
    stop_lines = [line for line in (o + e).splitlines() if "resume with:" in line]
    assert len(stop_lines) == 1 and stop_lines[0].startswith("stopped at step "), stop_lines
    n = int(stop_lines[0].split()[3])
    ckpt = f"{run_dir}/checkpoints/step-{n:08d}"
    assert f"checkpoint {ckpt}; resume with: ftlaunch run {run_dir}/resolved.yaml --resume" \
        in stop_lines[0]
    assert checkpoint.problem(ckpt, hashes=True) is None
    warnings = [line for line in (o + e).splitlines() if "warning:" in line]
    assert len(warnings) == len(set(warnings)), warnings  # each warning once
    st = status(run_dir, capsys)
    assert (st["state"], st["step"], st["max_steps"], st["checkpoint"]) == ("stopped", n, 400, ckpt)
    assert st["exit"]["code"] == 75 and st["time_left_s"] is None  # nothing runs: no time left

    # 4. a resume that fails on rank 1 two steps later
    p = torchrun(f"{run_dir}/resolved.yaml", FTLAUNCH_FAULT=f"step@{n + 2}:raise",
                 FTLAUNCH_FAULT_RANK="1")
    assert p.returncode != 0
    st = status(run_dir, capsys)
    assert st["state"] == "failed" and st["checkpoint"] == ckpt
    assert "rank 1: RuntimeError: injected fault step@" in st["last_failure"]["message"]

    # every step once, none at lr 0, the new schedule continued from step 5
    rows = train_lines(run_dir)
    assert [r["step"] for r in rows] == list(range(1, n + 2))
    assert all(r["lr"] > 0 for r in rows)
    t4, t400 = load(str(run_file)).train, load(f"{run_dir}/resolved.yaml").train
    assert t400.max_steps == 400
    assert [r["lr"] for r in rows] == pytest.approx(
        [lr_schedule.lr_at(k, t4) for k in range(1, 5)]
        + [lr_schedule.lr_at(k, t400) for k in range(5, n + 2)])
    assert all(r["step_time_s"] > 0 and r["memory_bytes"] > 0 for r in rows)

    # TensorBoard, read back with its own reader; W&B from its offline run files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/step_time_s", "train/memory_bytes", "eval/loss"} <= tags
    tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb] == [r["step"] for r in rows]
    assert [v for _, v in tb] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([r["lr"] for r in rows])
    wb = sorted((h["_step"], h["train/loss"]) for h in wandb_history(run_dir) if "train/loss" in h)
    assert [s for s, _ in wb] == [r["step"] for r in rows]
    assert [v for _, v in wb] == pytest.approx([r["loss"] for r in rows])
    assert any("eval/loss" in h for h in wandb_history(run_dir))

    # files follow the umask (022): 0644, the exported weights included; DeepSpeed's scripts
    # copied into checkpoints (zero_to_fp32.py) keep their executable bit (W&B's files are its own)
    modes = {path: os.stat(path).st_mode & 0o777 for folder in (run_dir, out)
             for path in snapshot(folder) if f"{os.sep}wandb{os.sep}" not in path}
    scripts = {p for p in modes if os.path.basename(p).startswith("zero_to_")}
    assert {m for p, m in modes.items() if p not in scripts} == {0o644}, \
        {p: oct(m) for p, m in modes.items() if m != 0o644 and p not in scripts}
    assert all(modes[p] & 0o066 == 0o044 for p in scripts)
    assert any(p.endswith("model.safetensors") for p in modes)
