"""`ftlaunch export` from checkpoints on 2 real CPU ranks: ZeRO-3 (fp32, full model) and a LoRA
run (ZeRO-2, bf16; adapter and merged): what it writes loads with from_pretrained (and peft) and
gives the engine's logits at the checkpoint's step. (ZeRO-2 full: tests/test_operator_run.py.)
This file is also the rank script (`__main__`): train, then record the engine's logits."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

from launcher import cli
from launcher.config.errors import ConfigError
from launcher.rank.export import find_checkpoint
from test_train_engine import ROOT, torchrun

CASES = {"zero3": ("fp32", 3, "{policy: last_layers, trainable_layers: 1, also_train: [lm_head]}"),
         "lora": ("bf16", 2, "{policy: lora, also_train: [lm_head], lora: {r: 4}}")}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tiny, tmp_path_factory):
    dtype, stage, freeze = CASES[request.param]
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    run_file = out / "run.yaml"
    run_file.write_text(textwrap.dedent(f"""\
        name: export-{request.param}
        model: {{path: {tiny['model']}, dtype: {dtype}}}
        data: {{path: {tiny['text']}, max_seq_len: 32, packing: true}}
        train: {{max_steps: 3, micro_batch_size: 4, lr: 3.0e-3, device: cpu}}
        freeze: {freeze}
        deepspeed: {{zero_stage: {stage}}}
        cluster: {{nodes: 1, gpus_per_node: 2}}
        output: {{dir: {out}/run, save_final: false}}
        """))
    p = torchrun([__file__, str(run_file), str(out)])
    assert p.returncode == 0, p.stderr[-4000:]
    import torch
    result = torch.load(out / "result.pt", weights_only=False)
    return {**result, "case": request.param, "dtype": dtype, "out": out, "run_dir": str(out / "run")}


@pytest.mark.multirank
@pytest.mark.slow
def test_export_gives_the_engines_logits(trained, tiny):
    import torch
    from transformers import AutoModelForCausalLM
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[trained["dtype"]]
    out = str(trained["out"] / "hf")
    assert cli.main(["export", trained["run_dir"], "-o", out]) == 0  # the newest complete one
    with torch.no_grad():
        if trained["case"] == "lora":
            from peft import PeftModel
            base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=dtype)
            model = PeftModel.from_pretrained(base, out).eval()
            merged_dir = str(trained["out"] / "merged")
            assert cli.main(["export", trained["run_dir"], "-o", merged_dir, "--merge-lora"]) == 0
            merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
            got_merged = merged(input_ids=trained["probe_ids"]).logits
            torch.testing.assert_close(got_merged, trained["engine_logits"], atol=0.05, rtol=0.02)
        else:
            model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
            assert model.config.dtype == dtype
        got = model(input_ids=trained["probe_ids"]).logits
    # fp32: to float tolerance; bf16: to one bf16 step of logits near 1 (peft's separate
    # adapter path rounds in another order than the engine's)
    tol = {"atol": 1e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, trained["engine_logits"], **tol)


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000009"
    ckpt.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"step-00000009 is incomplete: no MANIFEST.json"):
        find_checkpoint(str(ckpt))
    with pytest.raises(ConfigError, match=r"run has no complete checkpoint \(step-00000009: no "
                                          r"MANIFEST.json"):
        find_checkpoint(str(tmp_path / "run"))


# ---------------------------------------------------------------- the rank script
def rank_main(run_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from launcher.cluster import rundir
    from launcher.config import runfile
    from launcher.rank import train
    s = train.setup(runfile.load(run_file))
    if dist.get_rank() == 0:  # resolved.yaml: what export reads the model path from
        rundir.prepare(s.cfg, s.ds_config, on_existing="resume")
    assert train.train_loop(s) == 0
    probe_ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    s.engine.eval()
    with torch.no_grad():
        logits = s.engine(input_ids=probe_ids).logits.detach().cpu()
    if dist.get_rank() == 0:
        torch.save({"probe_ids": probe_ids, "engine_logits": logits}, os.path.join(out, "result.pt"))
    train.shutdown(barrier=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    rank_main(sys.argv[1], sys.argv[2])
