"""On the local Slurm test cluster (fixture `slurm_cluster`): `ftlaunch slurm --submit` refuses a
job whose per-node memory plan exceeds cluster.mem, with the numbers, and submits nothing."""
from __future__ import annotations

import subprocess

import pytest

from launcher import cli

pytestmark = [pytest.mark.slurm]


def test_submit_refuses_a_plan_over_cluster_mem(slurm_cluster, tmp_path, monkeypatch, capsys):
    for k, v in slurm_cluster["env"].items():
        monkeypatch.setenv(k, v)
    from conftest import write_fake_model  # config.json (Llama defaults: 7B), weights' names, tokenizer
    model = write_fake_model(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    run = tmp_path / "run.yaml"
    run.write_text(f"""\
name: node-mem
model: {{path: {model}}}
data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: 512}}
train: {{max_steps: 4, device: cuda}}
freeze: {{policy: lora}}
cluster: {{nodes: 2, gpus_per_node: 2, mem: 1G, gpu_memory: 80GiB,
           partition: {slurm_cluster['partition']}}}
output: {{dir: {tmp_path / 'runs'}}}
""")
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert cli.main(["slurm", str(run), "--submit"]) == 2
    err = capsys.readouterr().err
    assert "the memory plan says the job does not fit" in err
    assert "verdict per node: does NOT fit" in err and "of 1.00 GiB (cluster.mem)" in err
    assert "--force" in err
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split())  # nothing was queued
    assert not (tmp_path / "runs").exists()
