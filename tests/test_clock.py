"""The time estimate (launcher/memory/clock.py, launcher/cluster/step_time.py): the plan's time section,
cluster.time auto in the job script and its cap at the partition's MaxTime, validate's refusal,
status's estimated / elapsed / projected end, a dry run's arithmetic (median after the warm-up,
the fixed terms), and (slow) a real dry run's record used by the estimate. How close the estimate
comes to a real run is a benchmark, not a test: bench/clock_accuracy.py (docs/time.md)."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest
from ranks import rank_env

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


# ------------------------------------------------------------------ a dry run's arithmetic
def test_the_step_time_is_the_median_after_the_warm_up_steps():
    times = [5.0, 2.0, 1.0, 1.2, 0.9, 1.1, 9.0]        # 2 warm-up steps, then a slow outlier
    got = step_time.summarize(times, warmup=2)
    assert got.step_s == 1.1 and got.measured == 5 and got.warmup == 2
    assert got.warmup_extra_s == pytest.approx(5.0 + 2.0 - 2 * 1.1)
    assert (got.low_s, got.high_s) == (0.9, 9.0)
    # no fixed warm-up: the first two steps are still found slower than the later ones
    assert step_time.summarize(times, warmup=0) == got
    fast_start = step_time.summarize([0.5, 0.5, 1.0, 1.0, 1.0], warmup=2)
    assert fast_start.warmup_extra_s == 0.0                     # never below zero
    assert step_time.summarize([3.0, 1.0], warmup=2) is None    # nothing after the warm-up


def test_a_warm_up_longer_than_the_fixed_steps_is_found_and_left_out():
    """Per-step times of a real CPU dry run (ms): slow for 8 steps, then settled. The median
    of all 16 after the first 2 would be 1.25x the settled step; the warm-up is found instead."""
    times = [t / 1000 for t in (62, 43, 42, 42, 42, 42, 45, 38, 29, 28, 28, 28, 29, 29, 28, 27,
                                29, 27)]
    got = step_time.summarize(times, warmup=2)
    assert got.warmup == 8 and got.measured == 10 and got.step_s == pytest.approx(0.028)
    assert got.warmup_extra_s == pytest.approx(sum(times[:8]) - 8 * 0.028)
    steady = [0.03, 0.05] + [0.03, 0.031, 0.029, 0.04] * 4      # noise, no slow start
    assert step_time.summarize(steady, warmup=2).warmup == 2
    slow = [1.0] * 18                                           # never faster: nothing to find
    assert step_time.summarize(slow, warmup=2).warmup == 2


def _dry_metrics(path, step_times, eval_at=None, save_s=None):
    """A dry run's metrics.jsonl: one train line a step (elapsed_s the running sum), then the
    final eval line and the timed save's line where given."""
    elapsed, rows = 0.0, []
    for i, t in enumerate(step_times, 1):
        elapsed += t
        rows.append({"step": i, "loss": 2.0, "step_time_s": t, "elapsed_s": elapsed})
    if eval_at is not None:
        elapsed += eval_at
        rows.append({"step": len(step_times), "eval_loss": 2.0, "elapsed_s": elapsed})
    if save_s is not None:
        elapsed += save_s
        rows.append({"step": len(step_times), "checkpoint_s": save_s, "elapsed_s": elapsed})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return elapsed


def test_the_dry_run_record_holds_start_up_warm_up_evaluation_and_save(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    cfg = load(_run_file(tmp_path), [])
    metrics = tmp_path / "metrics.jsonl"
    times = [4.0, 3.0] + [1.0, 1.5, 0.5] * 5 + [1.0]    # 2 warm-up + 16 measured: median 1.0
    loop = _dry_metrics(metrics, times, eval_at=2.5, save_s=0.75)
    assert step_time.loop_timings(str(metrics)) == {"loop_s": loop, "eval_s": 2.5,
                                                    "checkpoint_s": 0.75}
    rec = step_time.record_dry_run(str(metrics), cfg, 8, "cuda", ranks_s=loop + 30.0)
    # micro batch 4 x 8 ranks, global 64: 2 accumulation steps
    assert rec["step_time_s"] == 1.0 and rec["micro_batch_s"] == 0.5 and rec["accum"] == 2
    assert rec["steps"] == 16 and rec["warmup_steps"] == 2 and rec["warmup_extra_s"] == 5.0
    assert rec["startup_s"] == pytest.approx(30.0)
    assert (rec["eval_s"], rec["checkpoint_s"], rec["low_s"], rec["high_s"]) == (2.5, 0.75, 0.5, 1.5)
    assert step_time.dry_record(cfg) == rec                   # kept for these settings
    assert step_time.dry_record(load(_run_file(tmp_path), ["train.micro_batch_size=2"])) is None
    # without the launcher's wall time, no start-up; without eval / save lines, none of them
    _dry_metrics(metrics, times)
    rec = step_time.record_dry_run(str(metrics), cfg, 8, "cuda")
    assert rec["startup_s"] is None and rec["eval_s"] is None and rec["checkpoint_s"] is None


def test_evaluations_and_checkpoints_are_counted_at_their_intervals():
    from launcher.memory import clock
    assert clock.times_due(50, 200, None) == 3        # 50, 100, 150; 200 is the final one
    assert clock.times_due(7, 200, None) == 28        # 7 ... 196
    assert clock.times_due(0, 200, None) == 0
    assert clock.times_due("epoch", 200, 3) == 2      # the third epoch ends at the last step
    assert clock.times_due("epoch", 200, 2.5) == 2


def test_the_run_terms_add_the_fixed_costs_apart_from_the_steps():
    from launcher.memory import clock
    rec = {"startup_s": 30.0, "warmup_steps": 2, "warmup_extra_s": 5.0, "eval_s": 2.5,
           "checkpoint_s": 0.75}
    terms = clock.run_terms(rec, evals=2, saves=4, save_assumed=(9.0, "assumed"))
    assert [round(x, 6) for _, x in terms] == [30.0, 5.0, 5.0, 3.0]
    assert terms[2][0] == "2 evaluations x 2.5 s (dry run)"
    assert terms[3][0] == "4 checkpoint saves x 0.75 s (dry run)"
    # a save the dry run did not time: the assumed one; no eval time: said, and 0
    del rec["checkpoint_s"], rec["eval_s"]
    terms = dict(clock.run_terms(rec, evals=1, saves=3, save_assumed=(9.0, "18 GB at 1 GB/s")))
    assert terms["3 checkpoint saves x 9 s (18 GB at 1 GB/s)"] == 27.0
    assert terms["1 evaluation (not timed: the dry run had no eval data)"] == 0.0
    assert clock.run_terms({}, evals=0, saves=0, save_assumed=None) == []


def test_the_estimate_after_a_dry_run_states_each_term_and_their_total(tmp_path, monkeypatch,
                                                                        capsys):
    from launcher.memory import clock
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    path = _run_file(tmp_path, time_value="24:00:00", train="max_steps: 200")
    overrides = ["train.checkpoint_every=50", "data.eval_fraction=0.1", "train.eval_every=100",
                 "output.save_final=false"]
    cfg = load(path, overrides)
    metrics = tmp_path / "metrics.jsonl"
    loop = _dry_metrics(metrics, [4.0, 3.0] + [1.0] * 16, eval_at=2.5, save_s=0.75)
    step_time.record_dry_run(str(metrics), cfg, 8, "cuda", ranks_s=loop + 30.0)
    est = clock.estimate(cfg)
    assert est.step_s == 1.0 and est.train_s == 200.0
    assert [round(x, 6) for _, x in est.fixed] == [30.0, 5.0, 5.0, 3.0]   # 2 evals, 4 saves
    assert est.total_s == pytest.approx(200 + 30 + 5 + 2 * 2.5 + 4 * 0.75)
    assert "median of 16 steps after 2 warm-up (1-1 s)" in est.step_how
    assert cli.main(["plan", path, *overrides]) in (0, 1)
    section = capsys.readouterr().out.split("time:")[1]
    assert ("wall time          4m03s = training 3m20s (200 steps x 1 s) + start-up and shut-down "
            "(dry run: the ranks' wall time less their loop) 30.0s + warm-up (dry run: the first 2 "
            "steps beyond the median) 5.0s + 2 evaluations x 2.5 s (dry run) 5.0s + 4 checkpoint "
            "saves x 0.75 s (dry run) 3.0s;") in section
    assert est.to_dict()["total_s"] == pytest.approx(243.0)


# ------------------------------------------------------------------ measured on CPU ranks
def _ftlaunch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=ROOT, env=rank_env(),
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
    # the fixed costs, timed by the dry run: start-up, warm-up, the one (final) checkpoint save
    what = [w for w, _ in est.fixed]
    assert what[0].startswith("start-up and shut-down (dry run") and what[1].startswith("warm-up")
    assert what[2].startswith("1 checkpoint save x ") and what[2].endswith(" s (dry run)"), what
    assert est.total_s == pytest.approx(est.train_s + sum(x for _, x in est.fixed))
    assert est.fixed[0][1] > 0
