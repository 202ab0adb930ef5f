"""LLaMA-Factory's keys -> run-file keys, for `ftlaunch convert --from llamafactory` (the shared
handlers and Axolotl's table: launcher/convert/peers.py). Written from LLaMA-Factory's examples
and argument dataclasses."""
from __future__ import annotations

import json
import os
from typing import Any

from launcher.convert.peers import (CHATML_TEMPLATES, Handler, _attention, _ax_val, _betas,
                                    _deepspeed, _dtype, _every, _has_column, _modules_to_save,
                                    _optimizer, _report_to, _scheduler, to)


PREF_LOSS = {"sigmoid": "dpo", "ipo": "ipo", "simpo": "simpo", "orpo": "orpo"}


def _lf_stage(out, key, value, tree, base_dir):
    if value == "sft":
        out.drop(key, "sft: supervised fine-tuning is what ftlaunch does (nothing to set)")
    elif value == "pt":
        out.drop(key, "pt: plain text data is read from data.text_field (nothing to set)")
    elif value == "dpo":
        loss = tree.get("pref_loss", "sigmoid")
        if loss in PREF_LOSS:
            out.carry(f"{key} + pref_loss", "train.objective", PREF_LOSS[loss])
        else:
            out.drop(f"{key} + pref_loss", f"pref_loss {loss!r} is not offered (sigmoid, ipo, "
                     "simpo and orpo are): the converted file trains supervised")
    else:
        out.drop(key, f"stage {value!r} (reward / PPO / KTO training) is not offered: the "
                 "converted file trains supervised")


def _lf_pref_beta(out, key, value, tree, base_dir):
    """pref_beta: DPO/IPO/SimPO's beta; ORPO's weight of the odds-ratio term."""
    if tree.get("pref_loss") == "orpo":
        out.approx(key, "train.orpo_lambda", float(value), "LLaMA-Factory's ORPO adds beta x the "
                   "odds-ratio loss to each answer's mean NLL; here to the chosen tokens' NLL "
                   "(TRL's form)")
    else:
        out.carry(key, "train.beta", float(value))


def _lf_pref_loss(out, key, value, tree, base_dir):
    if tree.get("stage") != "dpo":
        out.drop(key, "only used by stage: dpo")  # else carried with stage (train.objective)


def _lf_pref_ftx(out, key, value, tree, base_dir):
    out.drop(key, "no SFT loss is added to the preference loss" if value else
             "0: no SFT term (nothing to set)")


def _lf_finetuning(out, key, value, tree, base_dir):
    policy = {"lora": "lora", "full": "full", "freeze": "last_layers"}.get(value)
    if policy:
        out.carry(key, "freeze.policy", policy)
    else:
        out.drop(key, f"{value!r} is not offered")


def _lf_lora_target(out, key, value, tree, base_dir):
    names = [v.strip() for v in str(value).split(",")] if not isinstance(value, list) else value
    out.carry(key, "freeze.lora.target_modules", ["all-linear"] if names == ["all"] else names)


def _lf_freeze_layers(out, key, value, tree, base_dir):
    out.carry(key, "freeze.trainable_layers", int(value))


def _lf_freeze_modules(out, key, value, tree, base_dir):
    if str(value) == "all":
        out.drop(key, "all: last_layers trains whole blocks (the default)")
    else:
        out.drop(key, f"{value!r}: last_layers trains whole blocks; use freeze.policy patterns "
                 "for parts of blocks")


def _lf_quant_bit(out, key, value, tree, base_dir):
    mode = {4: "4bit", 8: "8bit"}.get(int(value))
    (out.carry(key, "quantization.mode", mode) if mode
     else out.drop(key, f"{value}-bit: only 8 and 4 bits (bitsandbytes)"))


def _lf_dataset(key_run: str) -> Handler:
    def h(out, key, value, tree, base_dir):
        names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
        sources = [_lf_source(out, n, tree, base_dir, f"{key}: {n}") for n in names]
        if key_run == "data.eval_path":
            out.approx(key, key_run, sources[0]["path"], "the first eval dataset's file"
                       + (f"; {names[1:]} left out" if len(names) > 1 else ""))
        elif len(sources) == 1:
            for k, v in sources[0].items():
                out.carry(key, f"data.{k}", v)
        else:
            probs = tree.get("interleave_probs")
            weights = [float(p) for p in str(probs).split(",")] if probs else [1.0] * len(sources)
            how = ("mix_strategy " + str(tree.get("mix_strategy", "concat")) + " as weighted draws"
                   + ("" if probs else "; concat -> weight 1 each (set weights to the sizes for "
                      "the same shares)"))
            out.approx(key, "data.mix", [{**s, "weight": w} for s, w in zip(sources, weights)], how)
    return h


def _lf_source(out, name: str, tree: dict, base_dir: str, where: str) -> dict:
    """A dataset name resolved through dataset_dir/dataset_info.json (file and columns)."""
    ddir = tree.get("dataset_dir", "data")
    info_path = os.path.join(ddir if os.path.isabs(ddir) else os.path.join(base_dir, ddir),
                             "dataset_info.json")
    try:
        with open(info_path, encoding="utf-8") as fh:
            entry = json.load(fh).get(name)
    except (OSError, ValueError):
        entry = None
    if not isinstance(entry, dict) or "file_name" not in entry:
        out.report.approximated.append((where, "data.path", f"{name!r} not found in {info_path}: "
                                        "the name is kept as the path; point it at the file"))
        return {"path": name}
    src: dict[str, Any] = {"path": os.path.join(ddir, entry["file_name"])}
    cols = entry.get("columns") or {}
    if entry.get("ranking"):  # preference pairs: chosen and rejected columns
        src["chosen_field"] = cols.get("chosen", "chosen")
        src["rejected_field"] = cols.get("rejected", "rejected")
        if entry.get("formatting") == "sharegpt":
            src["messages_field"] = cols.get("messages", "conversations")
        else:
            src["prompt_field"] = cols.get("prompt", "instruction")
            if _has_column(src["path"], base_dir, cols.get("query", "input")):
                src["input_field"] = cols.get("query", "input")
        return src
    if entry.get("formatting") == "sharegpt":
        src["messages_field"] = cols.get("messages", "conversations")
        if cols.get("tools"):
            src["tools_field"] = cols["tools"]
    elif "prompt" in cols or entry.get("formatting", "alpaca") == "alpaca":
        src["prompt_field"], src["response_field"] = cols.get("prompt", "instruction"), cols.get("response", "output")
        if _has_column(src["path"], base_dir, cols.get("query", "input")):
            src["input_field"] = cols.get("query", "input")
        out.report.approximated.append((where, "data.prompt_field/input_field/response_field",
                                        "alpaca columns, prompt = instruction + \"\\n\" + input "
                                        "(LLaMA-Factory's rule); 'system' and 'history' are not used"))
    return src


def _lf_template(out, key, value, tree, base_dir):
    if not _has_chat(tree, base_dir):
        out.drop(key, f"{value!r}: the data is not chat; ftlaunch renders prompt/response and "
                 "text without a chat template")
        return
    t = "chatml" if value in CHATML_TEMPLATES else None
    how = ("the chatml layout" if t else "the tokenizer's own chat template (null)")
    (out.carry if value == "chatml" else lambda k, r, v: out.approx(k, r, v, f"template {value!r} as {how}")
     )(key, "data.chat_template", t)


def _has_chat(tree: dict, base_dir: str) -> bool:
    """Whether a LLaMA-Factory dataset of the config is in the sharegpt (chat) format."""
    from launcher.convert.out import Out
    probe = Out()
    names = tree.get("dataset", "")
    for n in (names.split(",") if isinstance(names, str) else names or []):
        if "messages_field" in _lf_source(probe, n.strip(), tree, base_dir, ""):
            return True
    return False


def _lf_train_on_prompt(out, key, value, tree, base_dir):
    out.carry(key, "data.train_on", "all" if value else "assistant")


def _lf_neat(out, key, value, tree, base_dir):
    if value:
        out.approx(key, "data.packing", True, "packing; documents kept apart where the data "
                   "work's neat packing is in")
    else:
        out.drop(key, "false: the default")


def _lf_gc_off(out, key, value, tree, base_dir):
    out.carry(key, "model.gradient_checkpointing", not value)


def _lf_new_special(out, key, value, tree, base_dir):
    out.carry(key, "model.special_tokens",
              [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value))


def _lf_val(out, key, value, tree, base_dir):
    _ax_val(out, key, value, tree, base_dir)


LLAMAFACTORY: dict[str, Handler] = {
    "model_name_or_path": to("model.path"), "trust_remote_code": to("model.trust_remote_code"),
    "stage": _lf_stage, "finetuning_type": _lf_finetuning, "lora_rank": to("freeze.lora.r"),
    "lora_alpha": to("freeze.lora.alpha"), "lora_dropout": to("freeze.lora.dropout"),
    "lora_target": _lf_lora_target, "additional_target": _modules_to_save,
    "freeze_trainable_layers": _lf_freeze_layers, "freeze_trainable_modules": _lf_freeze_modules,
    "freeze_extra_modules": _modules_to_save, "quantization_bit": _lf_quant_bit,
    "quantization_method": lambda out, k, v, *a: out.drop(k, f"{v}: bitsandbytes is the one method")
    if v != "bnb" else out.drop(k, "bnb: the one method (nothing to set)"),
    "double_quantization": to("quantization.double_quant"), "quantization_type": to("quantization.quant_type"),
    "dataset": _lf_dataset("data.path"), "eval_dataset": _lf_dataset("data.eval_path"),
    "template": _lf_template, "train_on_prompt": _lf_train_on_prompt, "cutoff_len": to("data.max_seq_len"),
    "packing": to("data.packing"), "neat_packing": _lf_neat, "max_samples": to("data.max_samples"),
    "preprocessing_num_workers": to("data.preprocessing_workers"),
    "dataloader_num_workers": to("data.num_workers"), "val_size": _lf_val,
    "per_device_train_batch_size": to("train.micro_batch_size"),
    "gradient_accumulation_steps": to("train.grad_accum"), "learning_rate": to("train.lr", float),
    "num_train_epochs": to("train.epochs", float), "max_steps": to("train.max_steps"),
    "lr_scheduler_type": _scheduler, "warmup_ratio": to("train.warmup_ratio"),
    "warmup_steps": to("train.warmup_steps"), "weight_decay": to("train.weight_decay"),
    "max_grad_norm": to("train.grad_clip"), "adam_beta1": _betas(0), "adam_beta2": _betas(1),
    "adam_epsilon": to("train.eps", float), "optim": _optimizer, "bf16": _dtype, "fp16": _dtype,
    "pure_bf16": _dtype, "tf32": to("train.tf32"), "seed": to("train.seed"),
    "logging_steps": to("train.log_every"), "save_steps": _every("train.checkpoint_every"),
    "eval_steps": _every("train.eval_every"), "eval_strategy": _every("train.eval_every"),
    "evaluation_strategy": _every("train.eval_every"), "save_strategy": _every("train.checkpoint_every"),
    "save_total_limit": to("train.keep_checkpoints"), "deepspeed": _deepspeed,
    "output_dir": to("output.dir"), "flash_attn": _attention,
    "disable_gradient_checkpointing": _lf_gc_off, "new_special_tokens": _lf_new_special,
    "add_tokens": _lf_new_special, "add_special_tokens": _lf_new_special,
    "report_to": _report_to, "use_tensorboard": _report_to,
    "pref_beta": _lf_pref_beta, "pref_loss": _lf_pref_loss, "pref_ftx": _lf_pref_ftx,
    "dpo_label_smoothing": to("train.label_smoothing", float),
    "simpo_gamma": to("train.simpo_gamma", float),
    "ref_model": lambda out, k, v, *a: out.drop(k, "another reference model is not offered: "
                                                "train.reference model is the initial model"),
}
