"""The final export: the trained model as a Hugging Face folder (`output.save_final`).

    export.save_final(engine, cfg, tokenizer, os.path.join(run_dir, layout.FINAL))  # collective

`final/` = `save_pretrained` + tokenizer; under ZeRO-3 the weights are gathered with
`stage3_gather_16bit_weights_on_model_save`. LoRA runs write the adapter (with modules_to_save)
and, with `output.merge_lora`, `final/merged/` (under ZeRO-3 the merged model is built with
transformers' zero.Init hook switched off, else rank 0 would wait for the others forever).
Everything is written to `final.tmp` and renamed, so `final/` is never half written.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Optional

from launcher.checkpoint import rank_world


class _hf_zero3_off:
    """Hide the run's HfDeepSpeedConfig from transformers for a moment: a model built on one
    rank (the merged LoRA export) must not go through zero.Init, whose broadcasts would wait
    for the other ranks forever."""

    def __enter__(self):
        from transformers.integrations import deepspeed as hf_ds
        self.saved = hf_ds._hf_deepspeed_config_weak_ref
        hf_ds.unset_hf_deepspeed_config()
        return self

    def __exit__(self, *exc):
        from transformers.integrations import deepspeed as hf_ds
        hf_ds._hf_deepspeed_config_weak_ref = self.saved
        return False


def _write_lora(engine: Any, cfg: Any, tokenizer: Any, tmp: str, rank: int, stage3: bool) -> None:
    """The adapter (and merged/ with output.merge_lora), written by rank 0; under ZeRO-3 every
    rank takes part in gathering the parameters."""
    import contextlib

    import deepspeed
    from launcher import lora
    params = list(engine.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage3 else \
        contextlib.nullcontext()
    with ctx, _hf_zero3_off():
        if rank == 0:
            lora.export_adapter(engine.module, tmp)
            tokenizer.save_pretrained(tmp)
            if cfg.output.merge_lora:
                lora.export_merged(engine.module, cfg, os.path.join(tmp, "merged"), tokenizer)


def _write_full(engine: Any, tokenizer: Any, tmp: str, rank: int, stage3: bool) -> None:
    """The whole model, its ZeRO-3 shards gathered by every rank, written by rank 0."""
    state = engine._zero3_consolidated_16bit_state_dict() if stage3 else None
    if rank == 0:
        module = engine.module
        if state is not None:
            module.save_pretrained(tmp, state_dict=state)
        else:
            module.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _publish(tmp: str, out_dir: str) -> None:
    """Rename tmp to out_dir, replacing an older out_dir only once the new one is in place."""
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{time.time_ns()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def save_final(engine: Any, cfg: Any, tokenizer: Any, out_dir: str) -> Optional[str]:
    """Write the trained model as a Hugging Face folder (collective). ZeRO-3 shards are gathered
    (stage3_gather_16bit_weights_on_model_save); LoRA runs write the adapter (and `merged/` with
    output.merge_lora). Written to `out_dir.tmp` and renamed. Returns out_dir on rank 0."""
    import torch.distributed as dist

    rank, _ = rank_world()
    tmp = f"{out_dir}.tmp"
    stage3 = engine.zero_optimization_partition_weights()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if cfg.freeze.policy == "lora":
        _write_lora(engine, cfg, tokenizer, tmp, rank, stage3)
    else:
        _write_full(engine, tokenizer, tmp, rank, stage3)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    _publish(tmp, out_dir)
    return out_dir
