"""The final export: the trained model as a Hugging Face folder (`output.save_final`).

    export.save_final(engine, cfg, tokenizer, os.path.join(run_dir, layout.FINAL))  # collective

`final/` = `save_pretrained` + tokenizer; under ZeRO-3 the weights are gathered with
`stage3_gather_16bit_weights_on_model_save`. LoRA runs write the adapter (with modules_to_save)
and, with `output.merge_lora`, `final/merged/` (under ZeRO-3 the merged model is built with
transformers' zero.Init hook switched off, else rank 0 would wait for the others forever).
Everything is written to `final.tmp` and renamed, so `final/` is never half written.

`ftlaunch export CHECKPOINT_OR_RUN_DIR -o OUT [--merge-lora] [--dtype bf16|fp16|fp32]` does the same
after the fact, from any complete checkpoint (a stopped or preempted run's too) at any ZeRO
stage, in one process without GPUs: DeepSpeed's own consolidation
(`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`; ZeRO-0 checkpoints hold
the whole module) gives the fp32 weights, which are loaded into the model built from the run's
model.path config and written with `save_pretrained` (sharded safetensors), with the base's
generation config and the run's tokenizer. LoRA runs give the adapter folder (adapter weights
and also_train modules from the checkpoint, base from model.path), or with --merge-lora the
merged model. An incomplete checkpoint (no MANIFEST.json, a file missing or of the wrong size)
is refused with the reason. Every file written follows the user's umask (`fix_modes`;
safetensors itself writes 0600).
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Optional
from dataclasses import dataclass

from launcher.rank import collectives
from launcher.rank.collectives import rank_world


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


def _write_lora(engine: Any, cfg: Any, tokenizer: Any, tmp: str, rank: int) -> None:
    """The adapter (and merged/ with output.merge_lora), written by rank 0. Every rank takes part,
    since under ZeRO-3 the parameters are gathered (a collective): for the adapter only the
    trainable ones, for the merged model one module at a time (launcher/model/lora.py), never the
    whole base at once on every GPU (a 70B base would not fit)."""
    from launcher.model import lora
    with _hf_zero3_off():
        lora.export_adapter(engine.module, tmp)
        if rank == 0:
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


def chat_settings(cfg: Any, tokenizer: Any) -> tuple[Optional[str], Optional[int]]:
    """(the chat template the run trained with, the id of its end-of-turn token) for a run whose
    data is chat (or prompt/response through a template); (None, None) otherwise. The end of a
    turn is what the template puts after an assistant message's content inside the trained part
    (ChatML: `<|im_end|>`), where that is one token of the tokenizer."""
    from launcher.data import chat
    from launcher.checks.input_checks import source_settings
    d = next((s for s, _ in source_settings(cfg.data)
              if s.messages_field is not None or (s.prompt_field and s.chat_template)), None)
    if d is None:
        return None, None
    template = chat.template_text(d, tokenizer)
    marker = "\x00END\x00"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text, spans = chat.Renderer(template, tokenizer, "assistant").spans(conv)
    except Exception:  # noqa: BLE001 - the template is saved all the same
        return template, None
    at = text.find(marker) + len(marker)
    end = next((b for a, b in spans if a <= at <= b), None)
    tail = text[at:end].strip() if end is not None else ""
    if not tail:
        return template, None
    ids = tokenizer.convert_tokens_to_ids([tail])
    unk = getattr(tokenizer, "unk_token_id", None)
    return template, (ids[0] if ids and ids[0] is not None and ids[0] != unk else None)


def save_chat(cfg: Any, tokenizer: Any, folder: str) -> None:
    """A chat run's export carries its template (tokenizer_config / chat_template.jinja) and
    stops at the end of a turn: generation_config.json's eos_token_id lists the end-of-turn token
    before the tokenizer's EOS (as the peers' exports do)."""
    import json
    template, eot = chat_settings(cfg, tokenizer)
    if template is None:
        return
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "generation_config.json")
    if eot is None or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        gen = json.load(fh)
    old = gen.get("eos_token_id")
    old = old if isinstance(old, list) else [] if old is None else [old]
    gen["eos_token_id"] = [eot] + [i for i in old if i != eot]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(gen, fh, indent=2)


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
    rank, _ = rank_world()
    tmp = f"{out_dir}.tmp"
    stage3 = engine.zero_optimization_partition_weights()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if cfg.freeze.policy == "lora":
        _write_lora(engine, cfg, tokenizer, tmp, rank)
    else:
        _write_full(engine, tokenizer, tmp, rank, stage3)
    collectives.barrier()
    if rank != 0:
        return None
    save_chat(cfg, tokenizer, tmp)
    if cfg.freeze.policy == "lora" and cfg.output.merge_lora:
        save_chat(cfg, tokenizer, os.path.join(tmp, "merged"))
    fix_modes(tmp)
    _publish(tmp, out_dir)
    return out_dir


def fix_modes(folder: str) -> None:
    """Give every file under folder the mode the user's umask makes (safetensors writes 0600)."""
    from launcher.common.files import umask_state
    for dirpath, _, names in os.walk(folder):
        for n in names:
            os.chmod(os.path.join(dirpath, n), 0o666 & ~umask_state()[1])


# ------------------------------------------------------------------ ftlaunch export
def find_checkpoint(source: str) -> tuple[str, str]:
    """(run_dir, checkpoint folder) of a checkpoint folder or a run directory (its newest
    complete checkpoint). ConfigError naming the reason where there is none to export."""
    from launcher.rank import checkpoint
    from launcher.cluster import layout
    from launcher.config.errors import ConfigError, Problem
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise ConfigError([Problem("CHECKPOINT_OR_RUN_DIR", f"{source} is not a folder",
                                   "give RUN_DIR or RUN_DIR/checkpoints/step-N")])
    if checkpoint.step_of(source) is not None:
        why = checkpoint.problem(source)
        if why:
            raise ConfigError([Problem("CHECKPOINT_OR_RUN_DIR", f"{source} is incomplete: {why}",
                                       "export an earlier complete checkpoint, or the run "
                                       "directory (its newest complete one)")])
        return os.path.dirname(os.path.dirname(source)), source
    ckpts = checkpoint.listing(checkpoint.root(source))
    path = checkpoint.latest_complete(checkpoint.root(source), warn=lambda m: None)
    if path is None:
        why = "; ".join(f"{os.path.basename(p)}: {checkpoint.problem(p)}" for _, p in ckpts)
        raise ConfigError([Problem("CHECKPOINT_OR_RUN_DIR", f"{source} has no complete checkpoint"
                                   + (f" ({why})" if why else f" (no {layout.CHECKPOINTS}/step-N)"),
                                   "train until a checkpoint is written (train.checkpoint_every), "
                                   "or use final/ of a finished run")])
    return source, path


def consolidated(ckpt: str) -> dict:
    """The checkpoint's full fp32 state dict (module parameter names), by DeepSpeed's utilities."""
    import contextlib
    import glob
    import io

    import torch
    from deepspeed.utils import zero_to_fp32

    from launcher.rank import checkpoint
    ds_dir = os.path.join(ckpt, checkpoint.DS_TAG)
    if glob.glob(os.path.join(ds_dir, "*_optim_states.pt")):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress notes
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                    ckpt, tag=checkpoint.DS_TAG)
            return {k: v.float() for k, v in state.items()}
        except ValueError as exc:
            if "not a zero checkpoint" not in str(exc):
                raise
    # ZeRO-0 (and bf16 without ZeRO): the model states hold the whole module
    files = zero_to_fp32.get_model_state_files(ds_dir)
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def _export_full(cfg: Any, state: dict, out: str, dtype: Any) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    rows = _checkpoint_vocab(model, state)
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        config.vocab_size = rows  # the run added tokens: embedding and head grew to this
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    for k in list(state):  # in place: the fp32 tensor goes as its copy comes (4 B/param at most,
        state[k] = state.pop(k).to(dtype)  # not the fp32 dict and a 16-bit one side by side)
        if dtype == torch.float16 and not torch.isfinite(state[k]).all():
            from launcher.config.errors import ConfigError, Problem
            raise ConfigError([Problem("--dtype", f"{k} holds values beyond fp16's range "
                                       "(65504)", "export with --dtype bf16 or fp32")])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {n for n in missing if getattr(config, "tie_word_embeddings", False)
            and n.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the checkpoint does not fit {cfg.model.path}: missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    model.config.dtype = dtype
    model.save_pretrained(out, max_shard_size="5GB")


def _checkpoint_vocab(model: Any, state: dict) -> Optional[int]:
    """Rows of the input embedding in the checkpoint (more than model.path's where the run
    added tokens: launcher/model/tokens.py), or None where the checkpoint has no such tensor."""
    emb = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if p is emb and name in state:
            return int(state[name].shape[0])
    return None


def _export_lora(cfg: Any, state: dict, out: str, dtype: Any, merge: bool, tokenizer: Any) -> None:
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from launcher.model import freeze, lora, tokens
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                trust_remote_code=cfg.model.trust_remote_code)
    tokens.resize(base, tokenizer)  # added tokens: the rows the adapter's embeddings have
    model, _ = freeze.apply(base, cfg, quantized=set())
    trained = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k}
    own = dict(model.named_parameters())
    lost = [k for k, p in own.items() if p.requires_grad and k not in trained]
    if lost or not trained:
        raise RuntimeError(f"the checkpoint has no weights for the adapter parameters {lost[:5]}")
    model.load_state_dict(trained, strict=False)
    if merge:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
            dtype, cfg.model.dtype)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=name))
        lora.export_merged(model, cfg, out, tokenizer)
    else:
        model.to(dtype)
        lora.export_adapter(model, out)


def export_checkpoint(source: str, out: str, *, merge_lora: bool = False,
                      dtype: Optional[str] = None, overrides: Any = ()) -> tuple[str, str]:
    """`ftlaunch export`: write a Hugging Face folder (or LoRA adapter / merged model) made from
    the checkpoint at source (a checkpoint folder or a run directory) to out. Returns (out, the
    checkpoint folder used)."""
    from launcher.rank import inputs
    from launcher.cluster import run_state
    from launcher.model.device import torch_dtype
    from launcher.config.errors import ConfigError, Problem
    run_dir, ckpt = find_checkpoint(source)
    cfg = run_state.load_run(run_dir, overrides)
    from launcher.cluster.rundir import keep_private
    keep_private(cfg)   # a private run's export is private too (folders 0700, files 0600)
    if merge_lora and cfg.freeze.policy != "lora":
        raise ConfigError([Problem("--merge-lora", f"the run trained with freeze.policy "
                                   f"{cfg.freeze.policy}, not lora", "drop --merge-lora")])
    if cfg.quantization.mode != "none" and cfg.freeze.policy != "lora":
        raise ConfigError([Problem("quantization.mode", "a quantized base's trained modules cannot "
                                   "be exported from a checkpoint", "use the run's final/")])
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError([Problem("-o", f"{out} exists and is not an empty folder",
                                   "choose a new folder (nothing is overwritten)")])
    tdtype = torch_dtype(dtype or cfg.model.dtype)
    state = consolidated(ckpt)
    tokenizer = inputs.load_tokenizer(cfg)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if cfg.freeze.policy == "lora":
            _export_lora(cfg, state, tmp, tdtype, merge_lora, tokenizer)
        else:
            _export_full(cfg, state, tmp, tdtype)
            _generation_config(cfg.model.path, tmp)
        tokenizer.save_pretrained(tmp)
        save_chat(cfg, tokenizer, tmp)
        fix_modes(tmp)
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, ckpt


def _generation_config(model_path: str, out: str) -> None:
    """The base model's generation_config.json, where it has one (else the one save_pretrained
    derived from the config stays)."""
    src = os.path.join(model_path, "generation_config.json")
    if os.path.exists(src):
        shutil.copyfile(src, os.path.join(out, "generation_config.json"))


@dataclass(frozen=True)
class ExportCall:
    """What `ftlaunch export` was asked: the checkpoint or run directory, the output folder, the
    dtype, LoRA merging, and overrides of the run's resolved.yaml."""
    source: str
    output: str
    dtype: str | None = None
    merge_lora: bool = False
    overrides: tuple[str, ...] = ()


def main(call: ExportCall) -> int:
    out, ckpt = export_checkpoint(call.source, call.output, merge_lora=call.merge_lora,
                                  dtype=call.dtype, overrides=call.overrides)
    print(f"ftlaunch: exported {ckpt} to {out}")
    return 0
