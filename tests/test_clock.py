"""The time estimate (launcher/memory/clock.py, launcher/cluster/step_time.py): the plan's time section,
cluster.time auto in the job script and its cap at the partition's MaxTime, validate's refusal,
status's estimated / elapsed / projected end, and (slow) a dry run's estimate against a
200-step run on CPU."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from launcher import cli
from launcher.cluster import step_time
from launcher.ops import status
from launcher.config.runfile import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "tests", "configs", "llama-2-7b")
SCONTROL = """\
PartitionName=debug
   AllowGroups=ALL Default=YES MaxTime=UNLIMITED State=UP

PartitionName=gpu
   AllowGroups=ALL Default=NO MaxTime={max_time} State=UP
"""


def _run_file(tmp_path, time_value="auto", extra="gpu_type: H100-SXM, ", train="max_steps: 5000"):
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n' * 50)
    path = tmp_path / "run.yaml"
    path.write_text(f"""\
name: clock
model: {{path: {LLAMA}, dtype: bf16}}
data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: 2048, packing: true}}
train: {{{train}, micro_batch_size: 4, global_batch_size: 64, device: cuda}}
deepspeed: {{zero_stage: 2}}
cluster: {{nodes: 1, gpus_per_node: 8, {extra}partition: gpu, time: "{time_value}"}}
output: {{dir: {tmp_path / 'run'}}}
""")
    return str(path)


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A stand-in `scontrol` on PATH answering `show partition` with the given MaxTime of gpu."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def set_max(max_time: str) -> None:
        exe = bin_dir / "scontrol"
        exe.write_text("#!/bin/sh\ncat <<'EOF'\n" + SCONTROL.format(max_time=max_time) + "EOF\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return set_max


def test_time_limit_and_partition_max_time():
    assert step_time.time_limit(61) == "0:02:00"
    assert step_time.time_limit(3600) == "1:00:00"
    assert step_time.time_limit(90_000) == "1-01:00:00"
    text = SCONTROL.format(max_time="2-00:00:00")
    assert step_time.parse_max_time(text, "gpu") == "2-00:00:00"
    assert step_time.parse_max_time(text, None) is None          # the default one: UNLIMITED
    assert step_time.parse_max_time(text, "other") is None


def test_plan_prints_tokens_flops_and_time_from_the_gpu_table(tmp_path, capsys):
    from launcher.memory.flops import count
    path = _run_file(tmp_path, time_value="24:00:00", train="max_steps: 100")
    assert cli.main(["plan", path]) in (0, 1)
    out = capsys.readouterr().out
    cfg = load(path, [])
    per_step = count(cfg, 2048).total * 64
    section = out[out.index("time:"):]
    assert f"FLOPs per step     {per_step:.3g}" in section
    assert "tokens per epoch   " in section and "(characters / 4), not tokenized yet" in section
    assert "H100-SXM: 989.4 TFLOP/s bf16 tensor dense (NVIDIA H100 data sheet" in section
    step = per_step / 8 / (989.4e12 * 0.35)
    assert f"step time          {step:.3g} s (estimated: FLOPs per GPU / (989 TFLOP/s x assumed MFU 35%)" in section
    assert f"{100 * step * 8 / 3600:,.1f} GPU-hours on 8 ranks" in section
    # the job's own logged steps replace the assumption (the first, warm-up line left out)
    os.makedirs(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "w") as fh:
        for i, t in enumerate([9.0, 1.5, 1.7, 1.6], 1):
            fh.write(json.dumps({"step": i, "loss": 1.0, "step_time_s": t}) + "\n")
    assert cli.main(["plan", path]) in (0, 1)
    section = capsys.readouterr().out.split("time:")[1]
    assert "step time          1.6 s (measured: median of 3 logged steps in metrics.jsonl)" in section
    assert "2m40s of training" in section


def test_auto_time_is_rendered_in_the_job_script_and_capped_by_max_time(tmp_path, capsys,
                                                                        monkeypatch, fake_scontrol):
    from launcher.memory import clock
    monkeypatch.chdir(tmp_path)
    fake_scontrol("UNLIMITED")
    path = _run_file(tmp_path)
    cfg = load(path, [])
    est = clock.estimate(cfg)
    want, _ = clock.auto_time(cfg, est, None)
    assert cli.main(["slurm", path]) == 0
    out = capsys.readouterr().out
    script = (tmp_path / "run" / "job.sbatch").read_text()
    assert f"#SBATCH --time={want}\n" in script
    assert f"cluster.time auto: {want} = training " in out and "+ load (start-up" in out
    assert "+ grace_s 120 + Slurm's early signal 60 s 3m00s" in out
    recorded = json.loads((tmp_path / "run" / "estimate.json").read_text())
    assert recorded["time_limit"] == want and recorded["train_s"] == pytest.approx(est.train_s)
    # golden-style: the same script as the one rendered for that time written out
    assert cli.main(["slurm", path, f"cluster.time={want}"]) == 0
    capsys.readouterr()
    assert (tmp_path / "run" / "job.sbatch").read_text() == script
    # the partition allows less: capped, and the run continues through requeue
    fake_scontrol("0:30:00")
    assert cli.main(["slurm", path]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=0:30:00\n" in (tmp_path / "run" / "job.sbatch").read_text()
    assert cli.main(["plan", path]) in (0, 1)   # the plan says the same
    planned = capsys.readouterr().out
    assert "  cluster.time auto: " in planned and "capped at the partition's MaxTime 0:30:00" in planned
    assert re.search(r"capped at the partition's MaxTime 0:30:00: the run continues through the "
                     r"time-limit signal \(checkpoint grace_s 120 s before the limit\), requeue "
                     r"and resume, about \d+ jobs", out), out


def test_validate_refuses_auto_it_cannot_estimate(tmp_path, capsys):
    path = _run_file(tmp_path, extra="")
    assert cli.main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "cluster.time" in err and "auto needs the GPU's peak FLOP/s or a measured step time" in err
    assert "set cluster.gpu_type (e.g. H100-SXM, A100-80GB)" in err
    path = _run_file(tmp_path, train="epochs: 1")
    assert cli.main(["validate", path, "data.path=org/some-hub-dataset"]) == 2
    err = capsys.readouterr().err
    assert "auto cannot estimate the steps: train.epochs over data that is not a local file" in err
    assert cli.main(["validate", path, "train.device=cpu"]) == 2
    assert "auto on CPU ranks needs a measured step time" in capsys.readouterr().err


def test_status_shows_estimated_elapsed_and_projected_end(tmp_path, capsys, monkeypatch,
                                                          fake_scontrol):
    monkeypatch.chdir(tmp_path)
    fake_scontrol("UNLIMITED")
    path = _run_file(tmp_path)
    assert cli.main(["slurm", path]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "run"
    estimated = json.loads((run_dir / "estimate.json").read_text())["train_s"]
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for i in range(1, 11):
            fh.write(json.dumps({"step": i, "loss": 2.0, "step_time_s": 2.0, "tokens_per_s": 1.0,
                                 "elapsed_s": 2.0 * i}) + "\n")
    st = status.collect(str(run_dir))
    assert st["state"] == "running" and st["elapsed_s"] == 20.0
    assert st["estimated_s"] == pytest.approx(estimated)
    end = time.time() + 2.0 * (5000 - 10)
    assert st["projected_end"] in {time.strftime("%Y-%m-%d %H:%M", time.localtime(end + d))
                                   for d in (-60, 0, 60)}
    text = status.render(st)
    assert re.search(r"\ntime       estimated \d+(h\d\dm|m\d\ds) of training, elapsed 20s, "
                     rf"projected end {st['projected_end']}\n", text), text


# ------------------------------------------------------------------ measured on CPU ranks
def _ftlaunch(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.multirank
def test_a_dry_run_sets_the_step_time_the_estimate_uses(tiny, tmp_path):
    """`run --dry-run` measures its steps and keeps the step time beside the data cache (the run
    directory stays absent); the plan's estimate then uses it, with the tokens counted by the
    tokenized cache. How close it comes to the real run is a benchmark, not a test:
    bench/clock_accuracy.py (docs/time.md)."""
    from launcher.memory import clock
    path = tmp_path / "run.yaml"
    path.write_text(f"""\
name: measured
model: {{path: {tiny['model']}, dtype: fp32}}
data: {{path: {tiny['text']}, max_seq_len: 128, packing: true, cache_dir: {tmp_path / 'cache'}}}
train: {{max_steps: 200, micro_batch_size: 8, lr: 1.0e-3, device: cpu, log_every: 10}}
deepspeed: {{zero_stage: 1}}
cluster: {{nodes: 1, gpus_per_node: 1}}
output: {{dir: {tmp_path / 'run'}, save_final: false}}
""")
    cfg = load(str(path), [])
    assert not clock.estimate(cfg).step_how.startswith("measured")
    dry = _ftlaunch("run", str(path), "--dry-run", "--nproc", "1")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "ftlaunch: measured " in dry.stdout and not (tmp_path / "run").exists()
    est = clock.estimate(cfg)
    assert est.step_how.startswith("measured: ftlaunch run --dry-run")
    assert "counted by the tokenized cache" in est.tokens_how
    said = float(re.search(r"ftlaunch: measured ([0-9.e+-]+) s a step", dry.stdout).group(1))
    assert abs(est.step_s / said - 1) < 0.01, (est.step_s, said)   # printed to 3 digits
    assert est.steps == 200 and est.train_s == pytest.approx(200 * est.step_s)
