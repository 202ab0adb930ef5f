"""The sbatch script: golden files, bash -n + shellcheck, hostile values, the script run under fake
Slurm tools (node ranks, environment, stop protocol), `ftlaunch slurm` end to end with a fake sbatch.

Regenerate the golden files after an intended change: FTLAUNCH_REGEN_GOLDEN=1 pytest tests/test_slurm_render.py
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
import helpers
from helpers import (FAKE_PYTHON, FAKE_SCONTROL, FAKE_SRUN, read_env, read_nul,
                     sbatch_options, write_exe)

from launcher.cluster import layout, slurm
from launcher.config import runfile
from launcher.config.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
CI = os.environ.get("CI", "").lower() == "true"

HOSTILE = ["two words", "it's", 'say "hi"', "$(touch /tmp/ftl-pwned)", "`id`", "${HOME}", "a;b",
           "a && b", "*", "?[ab]", "~", "x#y", "-n", "--x", "é ü 中文 🚀", "100%", "back\\slash",
           "tab\there", "'\"'\"'", "!x"]
MULTILINE = ["line1\nline2", "cr\rhere"]
SBATCH_FIELDS = ["partition", "account", "qos", "constraint", "reservation"]

# The run files here: run "demo", 4 steps, its directory under tmp_path/runs.
write_runfile = functools.partial(helpers.write_runfile, run_name="demo", steps=4)


def make_cfg(fake_model, cluster=None, *, output_dir="/scratch/runs/demo", train=None, name="demo"):
    """A RunConfig from a run file with these cluster settings (model: the fake one)."""
    data_path = os.path.join(os.path.dirname(fake_model), "train.jsonl")
    tree = {"name": name, "model": {"path": fake_model},
            "data": {"path": data_path, "max_seq_len": 64},
            "train": {"max_steps": 4, **(train or {})}, "cluster": cluster or {},
            "output": {"dir": output_dir}}
    cfg, problems = runfile.parse(yaml.safe_dump(tree, allow_unicode=True))
    if problems:
        raise ConfigError(problems)
    return cfg


def render(cfg, workdir="/home/user/project", source="/home/user/project/run.yaml"):
    return slurm.render(slurm.build(cfg, workdir=workdir, source=source))


FULL = {"nodes": 4, "gpus_per_node": 8, "cpus_per_task": 96, "mem": "0", "time": "2-00:00:00",
        "partition": "gpu", "account": "proj-123", "qos": "high", "constraint": "a100&ib",
        "reservation": "big run", "exclusive": True,
        "sbatch_extra": ["--comment=fine-tune llama", "--mail-type=END,FAIL", "--hint=nomultithread"],
        "setup": ["module load cuda/12.4 nccl", "source /home/user/project/.venv/bin/activate"],
        "env": {"NCCL_DEBUG": "WARN", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "HF_HOME": "/scratch/hf cache"},
        "python": "/home/user/project/.venv/bin/python", "grace_s": 300, "requeue": True,
        "max_restarts": 5}
GOLDEN_CASES = {
    "1node_1gpu.sbatch": ({}, {}),
    "4nodes_8gpus_full.sbatch": (FULL, {}),
    "2nodes_4gpus_deepspeed_norequeue.sbatch": (
        {"nodes": 2, "gpus_per_node": 4, "launcher": "deepspeed", "requeue": False,
         "partition": "gpu"}, {}),
    "2nodes_cpu_ranks.sbatch": ({"nodes": 2, "gpus_per_node": 1}, {"device": "cpu"}),
}


def shellcheck(path):
    """shellcheck's findings (SC1091, sourcing files it cannot see, aside), or skip/fail."""
    if shutil.which("shellcheck") is None:
        if CI:
            pytest.fail("shellcheck is not installed (.ci/run installs it); CI never skips this")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", "-e", "SC1091", path], capture_output=True, text=True,
                         timeout=120)
    return out.returncode, out.stdout


def check_script(tmp_path, text, name="job.sbatch"):
    path = tmp_path / name
    path.write_text(text)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stderr
    rc, findings = shellcheck(str(path))
    assert rc == 0, findings
    return path


# ------------------------------------------------------------------ golden files
@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name, fake_model, tmp_path):
    cluster, train = GOLDEN_CASES[name]
    text = render(make_cfg(fake_model, cluster, train=train))
    check_script(tmp_path, text)
    path = os.path.join(GOLDEN, name)
    if os.environ.get("FTLAUNCH_REGEN_GOLDEN") == "1":
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    regen = f"regenerate if the change is intended: FTLAUNCH_REGEN_GOLDEN=1 pytest {__file__}"
    assert os.path.exists(path), f"no golden file {path}; {regen}"
    with open(path, encoding="utf-8") as fh:
        expected = fh.read()
    assert text == expected, f"{name} differs from the rendered script; {regen}"


def test_golden_full_has_every_option_as_sbatch_reads_it(fake_model):
    opts = sbatch_options(render(make_cfg(fake_model, FULL)))
    assert opts == [
        "--job-name=demo", "--chdir=/home/user/project", "--nodes=4", "--ntasks-per-node=1",
        "--gpus-per-node=8", "--cpus-per-task=96", "--mem=0", "--time=2-00:00:00", "--partition=gpu",
        "--account=proj-123", "--qos=high", "--constraint=a100&ib", "--reservation=big run",
        "--exclusive", "--output=/scratch/runs/demo/logs/job-%j.out",
        "--error=/scratch/runs/demo/logs/job-%j.err", "--open-mode=append", "--signal=B:USR1@300",
        "--requeue", "--comment=fine-tune llama", "--mail-type=END,FAIL", "--hint=nomultithread"]


def test_no_variables_in_sbatch_lines_and_node_rank_only_inside_the_task(fake_model):
    text = render(make_cfg(fake_model, FULL))
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            assert "$" not in line, line
    # SLURM_NODEID appears only inside the single-quoted per-task script, which srun runs.
    task = re.search(r"^NODE_TASK='([^']*)'$", text, re.M)
    assert task and '--node_rank="$SLURM_NODEID"' in task.group(1)
    outside = text.replace(task.group(0), "")
    assert [line for line in outside.splitlines()
            if "SLURM_NODEID" in line and not line.lstrip().startswith("#")] == []
    assert '  bash -c "$NODE_TASK" "$STOP_MARK" "${#CONTAINER[@]}" "${CONTAINER[@]}" '\
        '"${NODE_LAUNCH[@]}" &' in text.splitlines()


# ------------------------------------------------------------------ hostile values
@pytest.mark.parametrize("field", SBATCH_FIELDS)
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_sbatch_values_reach_sbatch_exactly(field, value, fake_model):
    opts = sbatch_options(render(make_cfg(fake_model, {field: value})))
    option = "--" + field
    assert [o for o in opts if o.startswith(option + "=")] == [f"{option}={value}"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_sbatch_extra_values_reach_sbatch_exactly(value, fake_model):
    opts = sbatch_options(render(make_cfg(fake_model, {"sbatch_extra": [f"--comment={value}"]})))
    assert opts[-1] == f"--comment={value}"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_workdir_and_source(value, fake_model, tmp_path):
    text = render(make_cfg(fake_model), workdir=f"/home/{value}", source=f"/home/{value}/run.yaml")
    assert f"--chdir=/home/{value}" in sbatch_options(text)
    check_script(tmp_path, text)


@pytest.mark.parametrize("field", SBATCH_FIELDS + ["mem", "time", "python"])
@pytest.mark.parametrize("value", MULTILINE)
def test_line_breaks_are_refused_at_load_naming_the_key(field, value, fake_model):
    with pytest.raises(ConfigError, match=rf"cluster\.{field}"):
        make_cfg(fake_model, {field: value})


@pytest.mark.parametrize("value", MULTILINE + ["nul\0"])
def test_unsafe_values_in_a_job_built_in_code_are_refused_at_render(value, fake_model):
    job = slurm.build(make_cfg(fake_model), workdir="/w", source="/w/run.yaml")
    bad = dataclasses.replace(job, sbatch=job.sbatch + (
        slurm.SbatchOption("--partition", value, "cluster.partition"),))
    with pytest.raises(ConfigError, match=r"cluster\.partition"):
        slurm.render(bad)
    with pytest.raises(ConfigError, match=r"working directory"):
        slurm.render(dataclasses.replace(job, sbatch=(slurm.SbatchOption("--chdir", value,
                                                                         "working directory"),)))


@pytest.mark.parametrize("extra,message", [
    ("-N 2", "not an sbatch long option"), ("--nodes=3", r"--nodes is set by the launcher"),
    ("--signal=USR2@10", "--signal is set by the launcher"), ("--comment=a\nb", "line break"),
    ("comment=x", "not an sbatch long option")])
def test_bad_sbatch_extra_is_refused(extra, message, fake_model):
    with pytest.raises(ConfigError, match=rf"cluster\.sbatch_extra\[0\][\s\S]*{message}"):
        make_cfg(fake_model, {"sbatch_extra": [extra]})


def test_other_cluster_refusals(fake_model):
    with pytest.raises(ConfigError, match=r"cluster\.env\.MASTER_PORT[\s\S]*set by the launcher"):
        make_cfg(fake_model, {"env": {"MASTER_PORT": "1"}})
    with pytest.raises(ConfigError, match=r"cluster\.env\.1X[\s\S]*not a valid environment"):
        make_cfg(fake_model, {"env": {"1X": "1"}})
    with pytest.raises(ConfigError, match=r"cluster\.setup\[1\][\s\S]*not complete shell"):
        make_cfg(fake_model, {"setup": ["true", "echo 'unclosed"]})
    with pytest.raises(ConfigError, match=r"cluster\.grace_s[\s\S]*not shorter than the time limit"):
        make_cfg(fake_model, {"time": "1:30", "grace_s": 120})
    with pytest.raises(ConfigError, match=r"output\.dir[\s\S]*backslash"):
        make_cfg(fake_model, output_dir="/scratch/a\\b")
    with pytest.raises(ConfigError, match=r"output\.dir[\s\S]*line break"):
        make_cfg(fake_model, output_dir="/scratch/a\nb")
    with pytest.raises(ConfigError, match=r"name"):
        make_cfg(fake_model, name="demo; rm -rf ~")


# ------------------------------------------------------------------ strict template
def test_template_is_strict():
    with pytest.raises(slurm.TemplateError, match=r"no value for \['b'\]"):
        slurm.fill("{{a}} {{b}}", {"a": "1"})
    with pytest.raises(slurm.TemplateError, match=r"no placeholder for \['c'\]"):
        slurm.fill("{{a}}", {"a": "1", "c": "2"})
    with pytest.raises(slurm.TemplateError, match="malformed placeholders"):
        slurm.fill("{{a}} {{ b }} {{C}}", {"a": "1"})
    assert slurm.fill("x={{a}} ${y}", {"a": "1"}) == "x=1 ${y}"


def test_shipped_template_with_a_misspelt_placeholder_fails(fake_model):
    with open(slurm.TEMPLATE) as fh:
        template = fh.read()
    job = slurm.build(make_cfg(fake_model), workdir="/w", source="")
    with pytest.raises(slurm.TemplateError, match=r"no value for \['run_dirr'\].*no placeholder "
                       r"for \['run_dir'\]"):
        slurm.render(job, template.replace("{{run_dir}}", "{{run_dirr}}"))


# ------------------------------------------------------------------ the script under fake Slurm tools
HOSTILE_DIR = "run 'q' \"d\" $(touch x) `id` ; && * é 100%j -x"


def fake_cluster(tmp_path, nnodes):
    """A PATH with fake srun/scontrol and a fake python in a hostile folder; env for the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "srun"), FAKE_SRUN)
    write_exe(str(bin_dir / "scontrol"), FAKE_SCONTROL)
    py_dir = tmp_path / "py $(x) 'q'"
    py_dir.mkdir()
    python = write_exe(str(py_dir / "python"), FAKE_PYTHON)
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(fake_dir),
           "FAKE_NNODES": str(nnodes), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": f"node[1-{nnodes}]",
           "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    return python, str(fake_dir), env


def rendered_run(tmp_path, fake_model, cluster, nnodes=2):
    python, fake_dir, env = fake_cluster(tmp_path, nnodes)
    run_dir = tmp_path / HOSTILE_DIR
    (run_dir / "logs").mkdir(parents=True)
    cfg = make_cfg(fake_model, {"nodes": nnodes, "gpus_per_node": 2, "python": python, **cluster},
                   output_dir=str(run_dir))
    job = slurm.build(cfg, workdir=str(tmp_path), source=str(tmp_path / "run.yaml"))
    script = check_script(tmp_path, slurm.render(job))
    return job, str(script), fake_dir, env


ENV_CORPUS = {f"FTL_V{i}": v for i, v in enumerate(HOSTILE + MULTILINE)}


def test_script_runs_every_node_with_its_own_rank_exact_env_and_paths(tmp_path, fake_model):
    job, script, fake, env = rendered_run(tmp_path, fake_model, {"env": ENV_CORPUS})
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (tmp_path / "x").exists() and not os.path.exists("/tmp/ftl-pwned")
    resolved = os.path.join(job.run_dir, layout.RESOLVED)
    for node in (0, 1):
        argv = read_nul(os.path.join(fake, f"argv.{node}"))
        assert argv == ["-m", "torch.distributed.run", f"--node_rank={node}", "--nnodes=2",
                        "--nproc-per-node=2", "--rdzv-backend=static", "--rdzv-id=4242",
                        "--rdzv-endpoint=127.0.0.1:19242", "--max-restarts=0", "--module",
                        "launcher", "train", resolved]
        env_seen = read_env(os.path.join(fake, f"env.{node}"))
        for k, v in ENV_CORPUS.items():
            assert env_seen[k] == v, k
        assert env_seen["MASTER_ADDR"] == "127.0.0.1" and env_seen["MASTER_PORT"] == "19242"
    srun_args = read_nul(os.path.join(fake, "srun.args"))
    logs = os.path.join(job.run_dir, "logs").replace("%", "%%")
    assert srun_args[:6] == ["--export=ALL", "--kill-on-bad-exit=1", "--nodes=2",  # no container
                             "--ntasks-per-node=1", f"--output={logs}/job-%j-node%n.log",
                             "--open-mode=append"]
    assert "ranks finished" in out.stdout


def test_deepspeed_launcher_gets_a_hostfile_and_its_node_rank(tmp_path, fake_model):
    job, script, fake, env = rendered_run(tmp_path, fake_model, {"launcher": "deepspeed"})
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    hostfile = os.path.join(job.run_dir, "logs", "hostfile-4242")
    with open(hostfile) as fh:
        assert fh.read() == "node1 slots=2\nnode2 slots=2\n"
    for node in (0, 1):
        argv = read_nul(os.path.join(fake, f"argv.{node}"))
        assert argv == ["-m", "deepspeed.launcher.runner", f"--node_rank={node}",
                        f"--hostfile={hostfile}", "--no_ssh", "--num_nodes=2", "--num_gpus=2",
                        "--master_addr=127.0.0.1", "--master_port=19242", "--no_local_rank",
                        "--module", "launcher", "train", os.path.join(job.run_dir, layout.RESOLVED)]


def start_and_signal(script, env, fake, sig, cwd):
    """Run the script, send sig to the batch shell once the ranks run, return (rc, output)."""
    proc = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd)
    end = time.monotonic() + 60
    while not os.path.exists(os.path.join(fake, "running")):
        assert time.monotonic() < end and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.mark.parametrize("restart,requeue,progress,expect_requeue", [
    ("0", True, False, True), ("2", True, True, True), ("3", True, True, False),
    ("0", False, True, False), ("2", True, False, False)])
def test_usr1_stops_the_ranks_then_requeues_within_max_restarts(
        tmp_path, fake_model, restart, requeue, progress, expect_requeue):
    """A restart (restart > 0) that ends with the checkpoint it began with made no progress:
    not requeued again."""
    job, script, fake, env = rendered_run(tmp_path, fake_model,
                                          {"requeue": requeue, "max_restarts": 3})
    env = {**env, "FAKE_STEPS": "2000", "SLURM_RESTART_COUNT": restart}
    if progress:
        env["FAKE_CHECKPOINTS"] = "1"
    stop_file = os.path.join(job.run_dir, layout.STOP_REQUEST)
    with open(stop_file, "w"):
        pass   # left from an earlier start: must not stop this one
    rc, out = start_and_signal(script, env, fake, signal.SIGUSR1, tmp_path)
    assert not os.path.exists(stop_file), out   # rank 0 removed it once honoured
    assert os.path.exists(os.path.join(job.run_dir, "logs", "stop-4242.asked")), out
    for node in (0, 1):
        assert os.path.exists(os.path.join(fake, f"stopped.{node}")), out
        assert os.path.exists(os.path.join(job.run_dir, "logs", f"stop-4242.node{node}")), out
    assert "ranks stopped on request on 2 of 2 nodes" in out
    requeued = os.path.join(fake, "requeued")
    if expect_requeue:
        assert rc == 0, out
        with open(requeued) as fh:
            assert fh.read() == "4242\n"
        assert f"requeueing: restart {int(restart) + 1} of 3" in out
    else:
        assert rc == layout.EXIT_STOPPED, out
        assert not os.path.exists(requeued)
        assert "not requeued" in out
        if not progress:
            assert "restart 2 made no progress (newest checkpoint still none)" in out


def test_term_stops_the_ranks_without_requeue(tmp_path, fake_model):
    job, script, fake, env = rendered_run(tmp_path, fake_model, {})
    env = {**env, "FAKE_STEPS": "2000"}
    rc, out = start_and_signal(script, env, fake, signal.SIGTERM, tmp_path)
    assert rc == layout.EXIT_STOPPED, out
    assert os.path.exists(os.path.join(fake, "stopped.0")) and os.path.exists(os.path.join(fake, "stopped.1"))
    assert not os.path.exists(os.path.join(fake, "requeued"))


def test_a_signal_as_the_ranks_finish_does_not_requeue(tmp_path, fake_model):
    """USR1 arriving while srun ends with 0 (training done) interrupts `wait`; the script waits
    again, sees srun's own 0, and ends without requeueing: there is nothing to resume."""
    job, script, fake, env = rendered_run(tmp_path, fake_model, {})
    env = {**env, "FAKE_STEPS": "1", "FAKE_SIGNAL_PARENT": "USR1"}
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert "USR1 received" in out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ranks finished" in out.stdout
    assert not os.path.exists(os.path.join(fake, "requeued"))


def test_a_failing_node_fails_the_job_without_requeue(tmp_path, fake_model):
    job, script, fake, env = rendered_run(tmp_path, fake_model, {})
    env = {**env, "FAKE_STEPS": "5", "FAKE_CRASH_NODE": "1", "FAKE_CRASH_STEP": "2"}
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "ranks failed (srun exit 3)" in out.stderr
    assert not os.path.exists(os.path.join(fake, "requeued"))


def test_script_refuses_to_run_outside_slurm(tmp_path, fake_model):
    text = render(make_cfg(fake_model))
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "submit it with sbatch" in out.stderr


# ------------------------------------------------------------------ ftlaunch slurm


def args(run_file, *flags, overrides=()):
    return slurm.SlurmCall(run_file=run_file, overrides=tuple(overrides), **{f: True for f in flags})


FAKE_SBATCH = r"""#!/bin/bash
printf '%s\n' "$@" >> "$FAKE_DIR/sbatch.calls"
case "$1" in
  --test-only) echo "sbatch: Job 77 to start at 2030-01-01T00:00:00 using 2 processors on nodes node[1-2] in partition debug" >&2 ;;
  --parsable) if [ -n "${FAKE_SBATCH_FAIL:-}" ]; then
                echo "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified" >&2; exit 1
              fi
              echo "4243" ;;
esac
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "sbatch-bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "sbatch"), FAKE_SBATCH)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return tmp_path / "sbatch.calls"


def test_ftlaunch_slurm_writes_the_run_dir_and_prints_the_command(tmp_path, fake_model, capsys,
                                                                  monkeypatch):
    run_file = write_runfile(tmp_path, fake_model, cluster={"nodes": 2})
    monkeypatch.chdir(tmp_path)
    assert slurm.main(args(run_file)) == 0
    run_dir = tmp_path / "runs" / "demo"
    script = run_dir / layout.JOB_SCRIPT
    for name in (layout.RESOLVED, layout.DS_CONFIG, layout.JOB_SCRIPT):
        assert (run_dir / name).is_file()
    assert os.access(script, os.X_OK)
    assert f"submit with: sbatch {script}" in capsys.readouterr().out
    assert script.read_text() == slurm.render(slurm.build(
        runfile.load(run_file), workdir=str(tmp_path), source=run_file))


def test_ftlaunch_slurm_submit_and_test_only(tmp_path, fake_model, capsys, fake_sbatch, monkeypatch):
    helpers.stub_plan(monkeypatch, True, "PLAN: fits\n")
    run_file = write_runfile(tmp_path, fake_model, cluster=None)
    assert slurm.main(args(run_file, "test_only", "submit")) == 0
    out = capsys.readouterr().out
    assert "Job 77 to start" in out and out.strip().endswith("4243")
    script = str(tmp_path / "runs" / "demo" / layout.JOB_SCRIPT)
    assert fake_sbatch.read_text().split("\n") == ["--test-only", script, "--parsable", script, ""]
    assert (tmp_path / "runs" / "demo" / layout.PLAN).read_text() == "PLAN: fits\n"


def test_sbatch_errors_are_shown_verbatim_and_the_run_dir_kept(tmp_path, fake_model, capsys,
                                                                fake_sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    helpers.stub_plan(monkeypatch, True, "fits\n")
    run_file = write_runfile(tmp_path, fake_model, cluster=None)
    assert slurm.main(args(run_file, "submit")) == 1
    err = capsys.readouterr().err
    assert ("sbatch: error: Batch job submission failed: Invalid account or account/partition "
            "combination specified") in err
    assert "the run directory is kept" in err
    assert (tmp_path / "runs" / "demo" / layout.JOB_SCRIPT).is_file()


def test_a_plan_that_does_not_fit_is_refused_unless_forced(tmp_path, fake_model, capsys, fake_sbatch,
                                                           monkeypatch):
    helpers.stub_plan(monkeypatch, False, "per GPU 95 GiB of 80 GiB: does NOT fit\n")
    run_file = write_runfile(tmp_path, fake_model, cluster=None)
    with pytest.raises(ConfigError, match=r"does not fit[\s\S]*95 GiB of 80 GiB[\s\S]*--force"):
        slurm.main(args(run_file, "submit"))
    assert not fake_sbatch.exists()
    assert slurm.main(args(run_file, "submit", "force")) == 0
    assert capsys.readouterr().out.strip().endswith("4243")


def test_login_node_path_imports_no_heavy_library(tmp_path, fake_model):
    run_file = write_runfile(tmp_path, fake_model, cluster=None)
    code = f"""
import sys
from launcher.cli import main
rc = main(['slurm', {run_file!r}])
from launcher.module_map import HEAVY
heavy = sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)
assert rc == 0 and not heavy, (rc, heavy[:10])
print('OK')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_slurm_readme_lists_exactly_the_template_placeholders():
    with open(slurm.TEMPLATE) as fh:
        used = set(re.findall(r"\{\{([a-z_]+)\}\}", fh.read()))
    with open(os.path.join(os.path.dirname(slurm.TEMPLATE), "README.md")) as fh:
        documented = set(re.findall(r"^\| `\{\{([a-z_]+)\}\}` \|", fh.read(), re.M))
    assert documented == used


def test_without_sbatch_the_script_is_kept_and_the_message_says_where(tmp_path, fake_model, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    run_file = write_runfile(tmp_path, fake_model, cluster=None)
    assert slurm.main(args(run_file, "test_only")) == 1
    err = capsys.readouterr().err
    script = tmp_path / "runs" / "demo" / layout.JOB_SCRIPT
    assert f"sbatch not found: run this on a Slurm login node (the script is ready: {script})" in err
    assert script.is_file()


@pytest.mark.parametrize("field", ["mem", "time"])
@pytest.mark.parametrize("value", ["1G; rm -rf ~", "$(id)", "`id`", "10 G", "-1", "é"])
def test_hostile_mem_and_time_are_refused_by_their_form(field, value, fake_model):
    with pytest.raises(ConfigError, match=rf"cluster\.{field}[\s\S]*does not match the expected form"):
        make_cfg(fake_model, {field: value})


@pytest.mark.parametrize("name", ["a b", "$(id)", "x;y", "-lead", "é", "a/b"])
def test_hostile_names_are_refused(name, fake_model):
    with pytest.raises(ConfigError, match=r"name[\s\S]*does not match the expected form"):
        make_cfg(fake_model, name=name)


# ------------------------------------------------------------------ port, CPUs, preflight, node failure
def test_the_rendezvous_port_has_one_definition(fake_model):
    """The script's MASTER_PORT line, run by bash, gives dist_env.slurm_port for every job id."""
    from launcher.cluster import dist_env
    text = render(make_cfg(fake_model))
    lines = [line.split("#")[0] for line in text.splitlines() if line.startswith("MASTER_PORT=")]
    assert len(lines) == 1, lines
    for job_id in ("1", "9999", "10000", "14999", "15000", "4242", "123456789"):
        out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; {lines[0]}; echo $MASTER_PORT"],
                             capture_output=True, text=True, timeout=30)
        assert int(out.stdout) == dist_env.slurm_port(job_id), (job_id, out.stdout, out.stderr)
        env = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job_id,
               "SLURM_NNODES": "1", "SLURM_NTASKS": "1"}
        assert dist_env.from_environ(env).master_port == int(out.stdout)


@pytest.mark.parametrize("cpus, user_omp, want_omp", [("4", None, "2"), ("1", None, "1"),
                                                      ("4", "3", "3"), (None, None, None)])
def test_cpus_reach_srun_and_set_the_ranks_threads(tmp_path, fake_model, cpus, user_omp, want_omp):
    """SLURM_CPUS_PER_TASK (from --cpus-per-task) becomes SRUN_CPUS_PER_TASK for every step and
    OMP_NUM_THREADS = cpus / ranks per node (2 here), unless OMP_NUM_THREADS is already set."""
    cluster = {"cpus_per_task": int(cpus)} if cpus else {}
    if user_omp:
        cluster["env"] = {"OMP_NUM_THREADS": user_omp}
    job, script, fake, env = rendered_run(tmp_path, fake_model, cluster)
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
        assert f"#SBATCH --cpus-per-task={cpus}" in open(script).read()
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for node in (0, 1):
        seen = read_env(os.path.join(fake, f"env.{node}"))
        assert seen.get("SRUN_CPUS_PER_TASK") == cpus
        assert seen.get("OMP_NUM_THREADS") == want_omp


def test_preflight_runs_on_every_node_before_the_ranks(tmp_path, fake_model):
    job, script, fake, env = rendered_run(tmp_path, fake_model, {})
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    resolved = os.path.join(job.run_dir, layout.RESOLVED)
    bad_file = os.path.join(job.run_dir, "logs", "preflight-4242-0.bad")
    for node in (0, 1):
        assert read_nul(os.path.join(fake, f"preflight.{node}")) == [
            "-m", "launcher", "preflight", resolved, f"--bad-nodes={bad_file}"]
        seen = read_env(os.path.join(fake, f"preflight-env.{node}"))
        with open(os.path.join(job.run_dir, "preflight", "token")) as fh:
            assert seen["FTLAUNCH_PREFLIGHT_TOKEN"] == fh.read().strip()
    calls = open(os.path.join(fake, "srun.calls")).read().splitlines()
    assert "preflight" in calls[0] and "torch.distributed.run" in calls[1], calls


def test_no_preflight_when_it_is_off(tmp_path, fake_model):
    job, script, fake, env = rendered_run(tmp_path, fake_model, {"preflight": False})
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not os.path.exists(os.path.join(fake, "preflight.0"))
    assert len(open(os.path.join(fake, "srun.calls")).read().splitlines()) == 1


@pytest.mark.parametrize("restart, excluded, requeued", [("0", None, True), ("1", "node7", True),
                                                         ("3", None, False)])
def test_a_node_refused_by_the_preflight_is_excluded_and_the_job_requeued(
        tmp_path, fake_model, restart, excluded, requeued):
    """Node 0's list of bad nodes: each is added to the job's ExcNodeList after the requeue;
    without restarts left the job stops with EXIT_PREFLIGHT and trains nothing."""
    from launcher.rank.preflight import EXIT_PREFLIGHT
    job, script, fake, env = rendered_run(tmp_path, fake_model, {"max_restarts": 3})
    env = {**env, "FAKE_BAD": "node2 cannot write in the run directory", "SLURM_RESTART_COUNT": restart}
    if excluded:
        env["FAKE_EXCLUDED"] = excluded
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert not os.path.exists(os.path.join(fake, "argv.0"))          # no rank started
    assert "preflight refused node(s):\n  node2 cannot write in the run directory" in out.stderr
    if requeued:
        assert out.returncode == 0, out.stdout + out.stderr
        assert open(os.path.join(fake, "requeued")).read() == "4242\n"
        want = f"{excluded},node2" if excluded else "node2"
        assert open(os.path.join(fake, "updated")).read() == f"jobid=4242 ExcNodeList={want}\n"
        assert f"preflight: excluding node2 and requeueing: restart {int(restart) + 1} of 3" in out.stdout
    else:
        assert out.returncode == EXIT_PREFLIGHT, out.stdout + out.stderr
        assert not os.path.exists(os.path.join(fake, "requeued"))
        assert "not requeued (cluster.requeue 1, restart 3 of at most 3)" in out.stderr


def test_a_restart_beyond_max_restarts_trains_nothing(tmp_path, fake_model):
    job, script, fake, env = rendered_run(tmp_path, fake_model, {"max_restarts": 1})
    out = subprocess.run(["bash", script], env={**env, "SLURM_RESTART_COUNT": "2"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "restart 2 is more than cluster.max_restarts (1)" in out.stderr
    assert not os.path.exists(os.path.join(fake, "srun.calls"))


def test_an_unresponsive_node_after_a_failure_is_excluded_and_requeued(tmp_path, fake_model):
    """The ranks fail and node2 no longer runs a probe task: a node failure, requeued without
    node2. (A failure where every node answers is the ranks' own: no requeue, see above.)"""
    job, script, fake, env = rendered_run(tmp_path, fake_model, {})
    bin_dir = tmp_path / "bin"
    real = bin_dir / "srun-real"
    os.rename(bin_dir / "srun", real)
    write_exe(str(bin_dir / "srun"), f'#!/bin/bash\ncase " $* " in *" --nodelist=node2 "*) exit 1 ;; '
              f'esac\nexec {shlex.quote(str(real))} "$@"\n')
    env = {**env, "FAKE_STEPS": "5", "FAKE_CRASH_NODE": "1", "FAKE_CRASH_STEP": "2"}
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "node failure: excluding node2 and requeueing: restart 1 of 3" in out.stdout
    assert open(os.path.join(fake, "updated")).read() == "jobid=4242 ExcNodeList=node2\n"


def test_a_failure_after_slurm_took_the_job_back_probes_nothing(tmp_path, fake_model):
    """Slurm set a node DOWN and requeued the job itself: the script neither probes nor requeues."""
    job, script, fake, env = rendered_run(tmp_path, fake_model, {})
    env = {**env, "FAKE_STEPS": "5", "FAKE_CRASH_NODE": "1", "FAKE_CRASH_STEP": "2",
           "FAKE_JOB_STATE": "PENDING"}
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "Slurm has taken the job out of RUNNING (PENDING)" in out.stderr
    assert len(open(os.path.join(fake, "srun.calls")).read().splitlines()) == 2   # preflight, ranks
    assert not os.path.exists(os.path.join(fake, "requeued"))
