"""`ftlaunch status` against the real Slurm test cluster (fixture `slurm_cluster`): a run
directory whose job.sbatch is queued (held) and then running shows the job's state."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import wait_until

from launcher import cli
from launcher.dsconfig import build as ds_config
from launcher.cluster import rundir
from launcher.config.runfile import load

pytestmark = [pytest.mark.slurm]


def test_status_shows_a_queued_then_running_job(slurm_cluster, fake_model, tmp_path, monkeypatch,
                                                capsys):
    for k, v in slurm_cluster["env"].items():
        monkeypatch.setenv(k, v)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(textwrap.dedent(f"""\
        name: status-slurm
        model: {{path: {fake_model}}}
        data: {{path: {tmp_path}/train.jsonl, max_seq_len: 64}}
        train: {{max_steps: 4}}
        output: {{dir: {tmp_path}/run}}
        """))
    cfg = load(str(run_file))
    run_dir = rundir.prepare(cfg, ds_config.build(cfg))
    script = os.path.join(run_dir, "job.sbatch")
    with open(script, "w") as fh:  # a stand-in job for the run: its state is what matters here
        fh.write(f"#!/bin/bash\n#SBATCH --job-name=status-slurm\n#SBATCH --output={run_dir}/logs/"
                 f"job-%j.out\n#SBATCH --partition={slurm_cluster['partition']}\nsleep 120\n")
    sub = subprocess.run(["sbatch", "--parsable", "--hold", script], capture_output=True,
                         text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    env = dict(os.environ)
    try:
        assert cli.main(["status", run_dir, "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["state"] == "queued" and st["slurm"]["job_id"] == job
        assert st["slurm"]["state"] == "PENDING" and st["slurm"]["reason"] == "JobHeldUser"
        subprocess.run(["scontrol", "release", job], check=True, timeout=60)
        wait_until(job, env, lambda i: i.get("JobState") == "RUNNING", 60, run_dir, "start")
        assert cli.main(["status", run_dir]) == 0
        text = capsys.readouterr().out
        assert "state      running" in text and f"slurm      job {job} RUNNING" in text
    finally:
        subprocess.run(["scancel", job], timeout=60)
