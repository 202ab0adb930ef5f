"""Secrets never written in clear (launcher/config/secret_env.py) and private run directories
(output.private, launcher/cluster/rundir.py keep_private): refused in cluster.env by validate and slurm with
the fix, passed by name with cluster.env_from_shell (`sbatch --export`), checked when submitting,
never in a file; the opt-out warns; W&B's config has no secret value; private runs are 0700/0600.

The same on the test Slurm cluster, with a whole run: tests/test_slurm_cluster.py
(test_a_secret_reaches_the_job_and_no_file).
"""
from __future__ import annotations

import functools
import os
import stat
import subprocess
import sys
import types

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
import helpers
from helpers import sbatch_options, write_exe

from launcher import cli
from launcher.config import schema as config, runfile, secret_env
from launcher.cluster import layout, local_run, rundir, slurm
from launcher.rank import metrics
from launcher.config.errors import ConfigError

SECRET = "s3cr3t-value-9f2c41"          # planted; must appear in no file and no message
TOKEN = "hf_" + "A1b2C3d4" * 5            # the form of a Hugging Face token

# The run files here: run "demo", 4 steps, its directory under tmp_path/runs.
write_runfile = functools.partial(helpers.write_runfile, run_name="demo", steps=4)




def args(run_file, *flags, overrides=()):
    return slurm.SlurmCall(run_file=run_file, overrides=tuple(overrides), **{f: True for f in flags})


def every_file(*folders):
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for n in names:
                yield os.path.join(dirpath, n)


def files_holding(secret, *folders):
    out = []
    for path in every_file(*folders):
        with open(path, "rb") as fh:
            if secret.encode() in fh.read():
                out.append(path)
    return out


# ------------------------------------------------------------------ which names look secret
@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                                  "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "OPENAI_API_KEY",
                                  "MY_PASSWORD", "db_passwd", "GCP_CREDENTIALS", "ApiKey",
                                  "AWS_ACCESS_KEY_ID", "MYSQL_PWD", "COMET_API_KEY"])
def test_secret_names(name):
    assert secret_env.looks_secret(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "NCCL_IB_PKEY", "NCCL_DEBUG", "HF_HOME",
                                  "HF_TOKEN_PATH", "SSH_KEY_FILE", "OMP_NUM_THREADS",
                                  "HF_HUB_DISABLE_IMPLICIT_TOKEN"])
def test_names_that_hold_no_secret(name):
    assert not secret_env.looks_secret(name)


@pytest.mark.parametrize("value, secret", [(TOKEN, True), ("sk-" + "x" * 40, True),
                                           ("AKIAABCDEFGHIJKLMNOP", True), ("ghp_" + "a1" * 18, True),
                                           ("INFO", False), ("/scratch/hf cache", False),
                                           ("hf_transfer", False),
                                           ("task-abcdefghijklmnopqrstuvwxyz", False),
                                           (f"Bearer {TOKEN}", True)])
def test_token_values(value, secret):
    assert secret_env.secret_value(value) is secret


@pytest.mark.parametrize("line, names", [
    ("export HF_TOKEN=abc", ["HF_TOKEN"]), ("WANDB_API_KEY='k' python x.py", ["WANDB_API_KEY"]),
    ('export HF_TOKEN="$(cat ~/.hf)"', []), ("export HF_TOKEN=$MY_TOKEN", []),
    ("export HF_HOME=/scratch/hf", []), (f"export FOO={TOKEN}", ["FOO"]),
    ("source .venv/bin/activate", []), ("export TOKENIZERS_PARALLELISM=false", [])])
def test_literal_assignments_in_setup_lines(line, names):
    assert secret_env.literal_assignments(line) == names


# ------------------------------------------------------------------ refused, with the fix
def test_validate_refuses_secrets_in_cluster_env_with_the_fix(tmp_path, fake_model, capsys):
    run_file = write_runfile(tmp_path, fake_model, cluster={"env": {"NCCL_DEBUG": "INFO"}})
    code = cli.main(["validate", run_file, f"cluster.env.WANDB_API_KEY={SECRET}",
                     f"cluster.env.HF_TOKEN={SECRET}", "cluster.env.TOKENIZERS_PARALLELISM=false"])
    err = capsys.readouterr().err
    assert code == layout.EXIT_CONFIG
    assert "2 problems" in err, err
    for name in ("WANDB_API_KEY", "HF_TOKEN"):
        assert f"cluster.env.{name} (override 'cluster.env.{name}=...'): {name} looks like a " \
               "secret" in err, err
        assert f"cluster.env_from_shell: [{name}]" in err
    assert "cluster.allow_secrets_in_env: true" in err
    assert SECRET not in err   # never repeated, not even in the override's place


def test_a_token_value_under_any_name_is_refused(tmp_path, fake_model):
    run_file = write_runfile(tmp_path, fake_model, cluster={"env": {"MY_VAR": TOKEN}})
    with pytest.raises(ConfigError, match="MY_VAR has the form of an access token") as exc:
        runfile.load(run_file)
    assert TOKEN not in exc.value.render()


@pytest.mark.parametrize("override, key", [
    (f"deepspeed.overrides={{comet: {{api_key: {SECRET}}}}}", "deepspeed.overrides.comet.api_key"),
    (f"deepspeed.overrides.comet.api_key={SECRET}", "deepspeed.overrides.comet.api_key"),
    (f"cluster.setup=['export HF_TOKEN={SECRET}']", "cluster.setup[0]"),
    (f"cluster.env.X={TOKEN}", "cluster.env.X")])
def test_an_override_holding_a_secret_is_never_repeated(tmp_path, fake_model, override, key):
    with pytest.raises(ConfigError, match="looks like a secret|form of an access token|assigns a "
                                          "literal value") as exc:
        runfile.load(write_runfile(tmp_path, fake_model, cluster=None), [override])
    assert key in exc.value.keys
    assert f"override '{override.partition('=')[0]}=...'" in exc.value.render()
    assert SECRET not in exc.value.render() and TOKEN not in exc.value.render()


def test_slurm_refuses_and_writes_nothing(tmp_path, fake_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_file = write_runfile(tmp_path, fake_model, cluster={"env": {"HF_TOKEN": SECRET}})
    assert cli.main(["slurm", run_file]) == layout.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "cluster.env.HF_TOKEN" in err and "cluster.env_from_shell: [HF_TOKEN]" in err, err
    assert SECRET not in err
    assert not (tmp_path / "runs").exists()


def test_export_in_sbatch_extra_is_the_launchers(tmp_path, fake_model):
    run_file = write_runfile(tmp_path, fake_model, cluster={"sbatch_extra": ["--export=ALL,HF_TOKEN=x"]})
    with pytest.raises(ConfigError, match="--export is set by the launcher from "
                                          "cluster.env_from_shell") as exc:
        runfile.load(run_file)
    assert "set cluster.env_from_shell" in exc.value.render()


# ------------------------------------------------------------------ the opt-out
def test_the_opt_out_writes_in_clear_and_warns(tmp_path, fake_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_file = write_runfile(tmp_path, fake_model, cluster={"env": {"HF_TOKEN": SECRET},
                                                    "allow_secrets_in_env": True})
    assert cli.main(["validate", run_file]) == 0
    err = capsys.readouterr().err
    assert "warning: cluster.allow_secrets_in_env is true" in err and "IN CLEAR" in err, err
    assert "cluster.env.HF_TOKEN" in err and "output.private: true" in err
    assert slurm.main(args(run_file)) == 0
    assert "IN CLEAR" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "demo"
    assert f"export HF_TOKEN={SECRET}" in (run_dir / layout.JOB_SCRIPT).read_text()


# ------------------------------------------------------------------ env_from_shell
def test_pass_through_rendered_as_export_and_never_written(tmp_path, fake_model, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET + "-w")
    run_file = write_runfile(tmp_path, fake_model, cluster={"env_from_shell": ["HF_TOKEN", "WANDB_API_KEY"]})
    assert slurm.main(args(run_file)) == 0
    out = capsys.readouterr().out
    assert "takes HF_TOKEN, WANDB_API_KEY from the environment sbatch runs in" in out
    run_dir = tmp_path / "runs" / "demo"
    text = (run_dir / layout.JOB_SCRIPT).read_text()
    assert "--export=ALL,HF_TOKEN,WANDB_API_KEY" in sbatch_options(text)
    assert ': "${HF_TOKEN:?cluster.env_from_shell: HF_TOKEN is not set' in text
    resolved = yaml.safe_load((run_dir / layout.RESOLVED).read_text())
    assert resolved["cluster"]["env_from_shell"] == ["HF_TOKEN", "WANDB_API_KEY"]
    assert resolved["cluster"]["env"] == {}
    assert files_holding(SECRET, run_dir) == []


def test_validate_names_the_pass_through_and_what_is_unset(tmp_path, fake_model, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_file = write_runfile(tmp_path, fake_model, cluster={"env_from_shell": ["HF_TOKEN", "WANDB_API_KEY"]})
    assert cli.main(["validate", run_file]) == 0
    out = capsys.readouterr().out
    assert "from this shell: HF_TOKEN, WANDB_API_KEY (not set here: WANDB_API_KEY)" in out, out
    assert SECRET not in out


def test_no_pass_through_no_export_line(tmp_path, fake_model):
    cfg = runfile.load(write_runfile(tmp_path, fake_model, cluster=None))
    text = slurm.render(slurm.build(cfg, workdir="/w"))
    assert not [o for o in sbatch_options(text) if o.startswith("--export")]
    assert "env_from_shell" not in text and "umask" not in text


def test_the_script_stops_when_the_variable_did_not_arrive(tmp_path, fake_model):
    """`sbatch job.sbatch` from a shell without the variable (or with SBATCH_EXPORT=NONE): the
    batch shell stops before anything runs, naming the variable."""
    cfg = runfile.load(write_runfile(tmp_path, fake_model, cluster={"env_from_shell": ["HF_TOKEN"]}))
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(slurm.build(cfg, workdir=str(tmp_path))))
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1"}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "HF_TOKEN: cluster.env_from_shell: HF_TOKEN is not set in the environment of the job" \
        in out.stderr, out.stderr


def test_submit_checks_the_environment_first(tmp_path, fake_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    run_file = write_runfile(tmp_path, fake_model, cluster={"env_from_shell": ["HF_TOKEN", "WANDB_API_KEY"]})
    with pytest.raises(ConfigError, match="HF_TOKEN is not set in this environment") as exc:
        slurm.main(args(run_file, "submit", "force"))
    assert exc.value.keys == ["cluster.env_from_shell[0]", "cluster.env_from_shell[1]"]
    assert "export HF_TOKEN=... in this shell first" in exc.value.render()
    assert not (tmp_path / "runs").exists()


def test_without_submit_a_missing_variable_is_a_warning(tmp_path, fake_model, monkeypatch,
                                                         capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run_file = write_runfile(tmp_path, fake_model, cluster={"env_from_shell": ["HF_TOKEN"]})
    assert slurm.main(args(run_file)) == 0
    err = capsys.readouterr().err
    assert "warning: cluster.env_from_shell[0]: HF_TOKEN is not set in this environment" in err, err
    assert (tmp_path / "runs" / "demo" / layout.JOB_SCRIPT).is_file()


def test_submit_passes_export_on_sbatchs_command_line(tmp_path, fake_model, monkeypatch, capsys):
    """--export on the command line too: SBATCH_EXPORT in the environment cannot override it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "sbatch"), '#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_DIR/sbatch.args"\n'
              'env > "$FAKE_DIR/sbatch.env"\necho 4243\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("SBATCH_EXPORT", "NONE")
    helpers.stub_plan(monkeypatch, True, "PLAN\n")
    monkeypatch.chdir(tmp_path)
    run_file = write_runfile(tmp_path, fake_model, cluster={"env_from_shell": ["HF_TOKEN"]})
    assert slurm.main(args(run_file, "submit")) == 0
    assert capsys.readouterr().out.strip().endswith("4243")
    script = str(tmp_path / "runs" / "demo" / layout.JOB_SCRIPT)
    assert (tmp_path / "sbatch.args").read_text().split("\n") == [
        "--parsable", "--export=ALL,HF_TOKEN", script, ""]
    assert f"HF_TOKEN={SECRET}" in (tmp_path / "sbatch.env").read_text()  # sbatch reads it there
    assert files_holding(SECRET, tmp_path / "runs") == []


def test_local_run_checks_the_environment(tmp_path, fake_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run_file = write_runfile(tmp_path, fake_model, cluster={"env_from_shell": ["HF_TOKEN"]})
    ns = local_run.RunCall(run_file=run_file, overrides=("train.device=cpu",), nproc=1)
    with pytest.raises(ConfigError, match="HF_TOKEN is not set in this environment"):
        local_run.main(ns)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ copies that leave the machine
def test_wandb_config_has_no_secret_value(tmp_path, fake_model, monkeypatch):
    cfg = runfile.load(write_runfile(tmp_path, fake_model, cluster={
        "env": {"HF_TOKEN": SECRET, "NCCL_DEBUG": "INFO"}, "allow_secrets_in_env": True,
        "setup": [f"export WANDB_API_KEY={SECRET}", "module load cuda"], "env_from_shell": ["X_KEY"]}))
    seen = {}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: seen.update(kw) or types.SimpleNamespace()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    metrics.open_wandb(cfg, str(tmp_path / "run"))
    text = yaml.safe_dump(seen["config"])
    assert SECRET not in text
    assert seen["config"]["cluster"]["env"] == {"HF_TOKEN": secret_env.REDACTED, "NCCL_DEBUG": "INFO"}
    assert seen["config"]["cluster"]["setup"] == [secret_env.REDACTED, "module load cuda"]
    assert seen["config"]["cluster"]["env_from_shell"] == ["X_KEY"]
    assert config.to_dict(cfg)["cluster"]["env"]["HF_TOKEN"] == SECRET   # the run's own copy


# ------------------------------------------------------------------ output.private
def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_private_run_directory_and_files(tmp_path, fake_model, monkeypatch, umask_kept):
    rundir.set_umask_state(0o022, 0o022)
    monkeypatch.chdir(tmp_path)
    run_file = write_runfile(tmp_path, fake_model, output={"private": True})
    assert slurm.main(args(run_file)) == 0
    run_dir = tmp_path / "runs" / "demo"
    assert mode(tmp_path / "runs") == 0o755   # the folder above stays as the user's umask makes it
    assert mode(run_dir) == 0o700 and mode(run_dir / layout.LOGS) == 0o700
    assert mode(run_dir / layout.RESOLVED) == 0o600 and mode(run_dir / layout.DS_CONFIG) == 0o600
    assert mode(run_dir / layout.JOB_SCRIPT) == 0o700
    text = (run_dir / layout.JOB_SCRIPT).read_text()
    assert "\numask 077\n" in text
    # what the process writes next (metrics, checkpoints, the export) follows
    (run_dir / "later.txt").write_text("x")
    assert mode(run_dir / "later.txt") == 0o600
    from launcher.rank.export import fix_modes
    (run_dir / "final").mkdir()
    (run_dir / "final" / "w.safetensors").write_text("x")
    os.chmod(run_dir / "final" / "w.safetensors", 0o644)
    fix_modes(str(run_dir / "final"))
    assert mode(run_dir / "final") == 0o700 and mode(run_dir / "final" / "w.safetensors") == 0o600


def test_private_makes_an_existing_run_directory_private(tmp_path, fake_model, monkeypatch,
                                                         umask_kept):
    monkeypatch.chdir(tmp_path)
    run_file = write_runfile(tmp_path, fake_model, cluster=None)
    assert slurm.main(args(run_file)) == 0
    run_dir = tmp_path / "runs" / "demo"
    os.chmod(run_dir, 0o755)
    assert slurm.main(args(run_file, "resume", overrides=["output.private=true"])) == 0
    assert mode(run_dir) == 0o700


def test_not_private_by_default(tmp_path, fake_model, monkeypatch, umask_kept):
    rundir.set_umask_state(0o022, 0o022)
    monkeypatch.chdir(tmp_path)
    assert runfile.load(write_runfile(tmp_path, fake_model, cluster=None)).output.private is False
    assert slurm.main(args(str(tmp_path / "run.yaml"))) == 0
    run_dir = tmp_path / "runs" / "demo"
    assert mode(run_dir) == 0o755 and mode(run_dir / layout.RESOLVED) == 0o644
    assert mode(run_dir / layout.JOB_SCRIPT) == 0o755
