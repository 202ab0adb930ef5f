"""LoRA through the rank entry point under ZeRO-3 on 2 CPU ranks: adapters train, the adapter and
the merged export are written from gathered shards (no rank waits on another) and agree; no
gather holds the whole base at once (a 70B base would not fit one GPU), and the checkpoints hold
what trains, not the frozen base. This file is also the rank script (`__main__`): it records
every `GatheredParameters` (elements gathered) and runs `ftlaunch train`."""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from ranks import torchrun


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora-z3")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(textwrap.dedent(f"""\
        name: lora-z3
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['qa']}, prompt_field: prompt, response_field: response, max_seq_len: 32}}
        train: {{max_steps: 6, micro_batch_size: 4, lr: 3.0e-3, device: cpu, dist_timeout_s: 120}}
        freeze: {{policy: lora, also_train: [lm_head], lora: {{r: 4}}}}
        deepspeed: {{zero_stage: 3}}
        cluster: {{nodes: 1, gpus_per_node: 2}}
        output: {{dir: {tmp_path}/run, merge_lora: true}}
        """))
    p = torchrun([__file__, str(run_file), str(tmp_path / "gathers")], timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "freeze policy lora:" in p.stdout
    return tmp_path


@pytest.mark.multirank
@pytest.mark.slow
def test_lora_zero3_exports_adapter_and_merged(tiny, lora_run):
    tmp_path = lora_run
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    final = os.path.join(tmp_path, "run", "final")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), final).eval()
    lora_b = [v for k, v in adapted.state_dict().items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)  # initialised at 0: trained
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(final, "merged")).eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits)
        base = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()(input_ids=ids).logits
    assert not torch.allclose(base, merged(input_ids=ids).logits)


@pytest.mark.multirank
@pytest.mark.slow
def test_no_gather_holds_the_whole_base_and_checkpoints_hold_what_trains(tiny, lora_run):
    import glob

    import torch
    from transformers import AutoModelForCausalLM
    run = sorted(glob.glob(str(lora_run / "gathers-*")))
    assert len(run) == 2, "each rank records its gathers"
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    whole = sum(p.numel() for p in model.parameters())
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    sizes = [n for path in run for n in json.loads(open(path).read() or "[]")]
    assert sizes, "the export gathered nothing"
    assert max(sizes) <= largest_module * 1.1 < whole / 2, (max(sizes), largest_module, whole)
    ckpt_dir = sorted(glob.glob(str(lora_run / "run" / "checkpoints" / "step-*")))[-1]
    states = glob.glob(os.path.join(ckpt_dir, "ds", "*model_states.pt"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k or "modules_to_save" in k for k in module), sorted(module)[:5]
    with open(os.path.join(ckpt_dir, "trainer_state.json")) as fh:
        assert json.load(fh)["frozen_excluded"] is True


def _record_gathers(out_prefix: str) -> None:
    """Record the elements each GatheredParameters gathers on this rank (JSON list, rewritten at
    every gather: the rank leaves by os._exit)."""
    import deepspeed
    real = deepspeed.zero.GatheredParameters
    sizes: list[int] = []
    path = f"{out_prefix}-{os.environ.get('RANK', '0')}"

    class Recording(real):
        def __init__(self, params, *args, **kwargs):
            params = list(params) if not hasattr(params, "ds_id") else [params]
            sizes.append(sum(int(getattr(p, "ds_numel", p.numel())) for p in params
                             if hasattr(p, "ds_id")))
            with open(path, "w") as fh:
                json.dump(sizes, fh)
            super().__init__(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = Recording


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _record_gathers(sys.argv[2])
    os.environ["FTLAUNCH_RANK_GUARD"] = "0"  # train in this process, where the recorder is
    from launcher import cli
    sys.exit(cli.main(["train", sys.argv[1]]))
