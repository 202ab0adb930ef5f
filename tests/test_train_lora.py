"""LoRA through the rank entry point under ZeRO-3 on 2 CPU ranks: adapters train, the adapter and
the merged export are written from gathered shards (no rank waits on another) and agree."""
from __future__ import annotations

import os
import textwrap

import pytest

from test_train_engine import torchrun


@pytest.mark.multirank
@pytest.mark.slow
def test_lora_zero3_exports_adapter_and_merged(tiny, tmp_path):
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
    p = torchrun(["-m", "launcher", "train", str(run_file)], timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "freeze policy lora:" in p.stdout

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
