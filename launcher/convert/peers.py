"""The key tables of `ftlaunch convert`: Axolotl keys -> run-file keys, the handlers both peers
share, and the defaults that differ (LLaMA-Factory's table: launcher/convert/llamafactory.py).

A handler is `fn(out, key, value, tree, base_dir)`: it carries, approximates or drops the key
(launcher/convert/command.py `Out`). Keys not in a table are dropped ("no ftlaunch equivalent", or the
reason in IGNORED). Written from the peers' documented config formats (Axolotl's config
reference, LLaMA-Factory's examples and argument dataclasses).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

Handler = Callable[..., None]

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
              "constant_with_warmup": "constant", "cosine_with_min_lr": "cosine"}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
              "adamw": "adamw", "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit"}
CHATML_TEMPLATES = {"chatml", "qwen", "qwen2", "qwen3", "qwen2_5"}
IGNORED = {
    "wandb_entity": "set WANDB_ENTITY in the job's environment",
    "wandb_name": "the run is named by `name`", "wandb_watch": "gradients are not logged",
    "wandb_log_model": "models are not uploaded; final/ holds the export",
    "hub_model_id": "pushing to the Hub is not part of a run", "push_to_hub": "pushing to the Hub is not part of a run",
    "strict": "Axolotl's own loader option", "dataset_prepared_path": "ftlaunch tokenizes on the ranks",
    "do_train": "ftlaunch always trains", "overwrite_output_dir": "use ftlaunch run --overwrite",
    "overwrite_cache": "ftlaunch tokenizes on the ranks", "plot_loss": "metrics.jsonl holds the losses",
    "logging_dir": "metrics.jsonl in the run directory", "ddp_timeout": "train.dist_timeout_s (set it yourself)",
    "resume_from_checkpoint": "train.resume: auto continues from the run directory",
    "auto_resume_from_checkpoints": "train.resume: auto continues from the run directory",
    "xformers_attention": "no xformers kernel; model.attn_implementation",
    "base_model_config": "the model folder's config.json is used", "model_type": "AutoModelForCausalLM is used",
    "tokenizer_type": "AutoTokenizer is used", "is_llama_derived_model": "not needed",
    "enable_liger_kernel": "no Liger kernels", "use_liger_kernel": "no Liger kernels",
    "plugins": "no Axolotl plugins", "early_stopping_patience": "no early stopping; see train.watchdog",
    "bf16_full_eval": "eval runs in model.dtype", "debug": "Axolotl's own debugging",
}


# ------------------------------------------------------------------ shared handlers
def to(run_key: str, conv: Callable[[Any], Any] = lambda v: v) -> Handler:
    def h(out, key, value, tree, base_dir):
        out.carry(key, run_key, conv(value))
    return h


TRACKERS = ("tensorboard", "wandb")


def _report_to(out, key, value, tree, base_dir):
    """report_to (HF Trainer: a name, a list, "all" or "none"), wandb_project, use_tensorboard
    -> output.report_to."""
    have = list(out.get("output.report_to") or [])
    if key == "wandb_project":
        names, how = ["wandb"], f"project {value!r}: set WANDB_PROJECT in the job's environment"
    elif key == "use_tensorboard":
        names, how = (["tensorboard"] if value else []), "RUN_DIR/tensorboard"
    else:
        given = [value] if isinstance(value, str) else list(value or [])
        names = list(TRACKERS) if "all" in given else [n for n in given if n in TRACKERS]
        rest = [n for n in given if n not in TRACKERS and n not in ("all", "none")]
        how = f"no {rest}: only {list(TRACKERS)}" if rest else "the same trackers"
    if not names:
        out.drop(key, f"{value!r}: no tracker")
        return
    out.approx(key, "output.report_to", sorted(set(have) | set(names), key=TRACKERS.index), how)


def _dtype(out, key, value, tree, base_dir):
    if value in (True, "auto", "true") and key in ("bf16", "pure_bf16"):
        out.carry(key, "model.dtype", "bf16")
    elif value in (True, "true") and key == "fp16":
        out.carry(key, "model.dtype", "fp16")
    elif value in (True, "true") and key == "fp32":
        out.carry(key, "model.dtype", "fp32")
    else:
        out.drop(key, f"{value!r}: another precision key decides model.dtype")


def _scheduler(out, key, value, tree, base_dir):
    if value in SCHEDULERS:
        (out.carry if SCHEDULERS[value] == value else
         lambda k, r, v: out.approx(k, r, v, f"{value} as {v}"))(key, "train.scheduler", SCHEDULERS[value])
    else:
        out.approx(key, "train.scheduler", "cosine", f"{value!r} has no DeepSpeed scheduler; cosine")


def _optimizer(out, key, value, tree, base_dir):
    if value in OPTIMIZERS:
        out.carry(key, "train.optimizer", OPTIMIZERS[value])
    else:
        out.approx(key, "train.optimizer", "adamw", f"{value!r} is not offered; AdamW")


def _betas(index: int) -> Handler:
    def h(out, key, value, tree, base_dir):
        betas = out.get("train.betas") or [0.9, 0.999]
        betas[index] = float(value)
        out.set("train.betas", betas)
        out.report.carried.append((key, f"train.betas[{index}]", float(value)))
    return h


def _deepspeed(out, key, value, tree, base_dir):
    """The JSON file becomes deepspeed.config_file; its stage and offloads fill the run file so
    they do not contradict it."""
    if isinstance(value, dict):
        out.drop(key, "an inline DeepSpeed dict: save it as a JSON file and set deepspeed.config_file")
        return
    out.carry(key, "deepspeed.config_file", value)
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    try:
        with open(path, encoding="utf-8") as fh:
            ds = json.load(fh)
    except (OSError, ValueError):
        return
    sched = ds.get("scheduler") if isinstance(ds.get("scheduler"), dict) else {}
    kind = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}.get(
        str(sched.get("type")))
    if kind:  # the HF Trainer uses the file's scheduler over the peer's own setting
        out.ds_scheduler = kind
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    if zero.get("stage") in (0, 1, 2, 3):
        out.set("deepspeed.zero_stage", zero["stage"])
    for part in ("offload_optimizer", "offload_param"):
        dev = (zero.get(part) or {}).get("device") if isinstance(zero.get(part), dict) else None
        if dev in ("cpu", "nvme"):
            out.set(f"deepspeed.{part}", dev)
            if dev == "nvme" and zero[part].get("nvme_path"):
                out.set("deepspeed.nvme_path", zero[part]["nvme_path"])


def _every(run_key: str) -> Handler:
    def h(out, key, value, tree, base_dir):
        if key.endswith("_strategy"):
            if value == "epoch":
                out.carry(key, run_key, "epoch")
            elif value == "no":
                out.carry(key, run_key, 0)
            else:
                out.drop(key, f"{value!r}: the step count ({run_key}) comes from the *_steps key")
        elif key.endswith("per_epoch"):
            how = "once an epoch" if value == 1 else f"{value} per epoch -> once an epoch"
            (out.carry if value == 1 else lambda k, r, v: out.approx(k, r, v, how))(key, run_key, "epoch")
        else:
            out.carry(key, run_key, int(value))
    return h


def _attention(out, key, value, tree, base_dir):
    table = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "fa2": "flash_attention_2",
             "sdpa": "sdpa", "eager": "eager", "disabled": "eager"}
    name = table.get(key) if value is True else table.get(str(value))
    if name:
        out.carry(key, "model.attn_implementation", name)
    elif value in (False, "auto"):
        out.drop(key, f"{value!r}: the library's default attention")
    else:
        out.drop(key, f"{value!r} has no attention kernel in ftlaunch")


# ------------------------------------------------------------------ Axolotl
def _ax_adapter(out, key, value, tree, base_dir):
    if value in ("lora", "qlora"):
        out.carry(key, "freeze.policy", "lora")
        if value == "qlora" and not tree.get("load_in_4bit"):
            out.set("quantization.mode", "4bit")
    else:
        out.drop(key, f"adapter {value!r} is not offered (LoRA only)")


def _ax_quant(out, key, value, tree, base_dir):
    if value:
        out.carry(key, "quantization.mode", "8bit" if "8bit" in key else "4bit")
    else:
        out.drop(key, "false: no quantization (the default)")


def _ax_targets(out, key, value, tree, base_dir):
    if key == "lora_target_linear":
        if value:
            out.carry(key, "freeze.lora.target_modules", ["all-linear"])
        else:
            out.drop(key, "false: lora_target_modules decides")
    elif not tree.get("lora_target_linear"):
        out.carry(key, "freeze.lora.target_modules", list(value))
    else:
        out.drop(key, "lora_target_linear: true already targets every linear layer")


def _also_train(names: list[str]) -> tuple[list[str], list[str]]:
    """(also_train groups, names without a group) for module names such as embed_tokens, lm_head."""
    groups, rest = [], []
    for n in names:
        g = ("embeddings" if "embed" in n or n in ("wte", "wpe") else "lm_head" if n in ("lm_head", "embed_out")
             else "norms" if "norm" in n else None)
        (groups.append(g) if g else rest.append(n))
    return sorted(set(groups)), rest


def _modules_to_save(out, key, value, tree, base_dir):
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    groups, rest = _also_train(names)
    if groups:
        out.approx(key, "freeze.also_train", groups, "whole modules trained and saved with the "
                   "adapter, by group" + (f"; no group for {rest}" if rest else ""))
    else:
        out.drop(key, f"{names}: no also_train group (embeddings, lm_head, norms, biases) covers them")


def _ax_unfrozen(out, key, value, tree, base_dir):
    out.carry(key, "freeze.train", [str(v) for v in value])
    out.set("freeze.policy", "patterns")


def _ax_special_tokens(out, key, value, tree, base_dir):
    for name, tok in (value or {}).items():
        if name == "pad_token":
            out.carry(f"{key}.pad_token", "model.pad_token", tok)
        else:
            out.drop(f"{key}.{name}", f"changing the tokenizer's {name} is not offered (pad only)")


def _source(out, ds: dict, where: str, base_dir: str = ".", pairs: bool = False) -> dict:
    """One Axolotl dataset entry -> run-file data keys (path and fields); pairs: rl is set."""
    src: dict[str, Any] = {"path": ds.get("path")}
    kind = ds.get("type")
    if pairs:  # rl: preference pairs
        return _pref_source(out, ds, where, src)
    if kind == "chat_template" or ds.get("field_messages") or ds.get("conversation"):
        src["messages_field"] = ds.get("field_messages", "messages")
        for k in ("message_property_mappings", "roles", "message_field_role", "message_field_content"):
            if k in ds:
                out.drop(f"{where}.{k}", "roles and fields are read as {role, content} or ShareGPT "
                         "{from, value} without mappings")
    elif kind == "completion":
        src["text_field"] = ds.get("field", "text")
    elif kind == "alpaca":
        src["prompt_field"], src["response_field"] = "instruction", "output"
        if _has_column(ds.get("path"), base_dir, "input"):
            src["input_field"] = "input"
        out.report.approximated.append((f"{where}.type", "data.prompt_field/input_field/response_field",
                                        "alpaca: prompt = instruction + \"\\n\" + input (where "
                                        "not empty), response = output; the alpaca preamble text "
                                        "is not added (set data.chat_template to render a template)"))
    elif kind is not None:
        out.drop(f"{where}.type", f"prompt strategy {kind!r} has no ftlaunch equivalent; the "
                 "path is kept, the fields need setting by hand")
    for k in ds:
        if k not in ("path", "type", "field_messages", "field", "message_property_mappings", "roles",
                     "message_field_role", "message_field_content", "chat_template", "conversation"):
            out.drop(f"{where}.{k}", "no per-dataset equivalent")
    if ds.get("chat_template"):
        src["chat_template"] = _template(ds["chat_template"])
    return src


# Axolotl's preference prompt strategies (type) -> run-file data keys
PREF_TYPES = {"chatml.intel": {"prompt_field": "question", "chat_template": "chatml"},
              "chatml.argilla": {"prompt_field": "instruction", "chosen_field": "chosen_response",
                                 "rejected_field": "rejected_response", "chat_template": "chatml"},
              "chatml.prompt_pairs": {"prompt_field": "prompt", "chat_template": "chatml"}}
RL_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")


def _pref_source(out, ds: dict, where: str, src: dict) -> dict:
    """One Axolotl preference dataset (rl: ...): the chat-template layout (field_messages,
    field_chosen, field_rejected), or a named strategy of PREF_TYPES."""
    kind = str(ds.get("type") or "")
    if kind.startswith("chat_template"):
        src["messages_field"] = ds.get("field_messages", "messages")
        src["chosen_field"] = ds.get("field_chosen", "chosen")
        src["rejected_field"] = ds.get("field_rejected", "rejected")
    elif kind in PREF_TYPES:
        src.update(PREF_TYPES[kind])
        out.report.approximated.append((f"{where}.type", "data.prompt_field/chosen_field/"
                                        "rejected_field", f"{kind}: its columns, rendered with "
                                        "ChatML as a user and an assistant turn"))
    else:
        out.drop(f"{where}.type", f"preference strategy {kind!r} has no ftlaunch equivalent; "
                 "the path is kept, set data.prompt_field / chosen_field / rejected_field")
    for k in ds:
        if k not in ("path", "type", "field_messages", "field_chosen", "field_rejected",
                     "chat_template", "split"):
            out.drop(f"{where}.{k}", "no per-dataset equivalent")
    if ds.get("chat_template"):
        src["chat_template"] = _template(ds["chat_template"])
    return src


def _ax_rl(out, key, value, tree, base_dir):
    """rl: dpo | ipo | simpo | orpo -> train.objective (kto, grpo: not offered)."""
    if value in RL_OBJECTIVES:
        out.carry(key, "train.objective", value)
    else:
        out.drop(key, f"rl {value!r} is not offered (dpo, ipo, simpo and orpo are)")


def _ax_rl_beta(out, key, value, tree, base_dir):
    """rl_beta (TRL's beta): DPO/IPO/SimPO's beta; for ORPO its lambda."""
    if tree.get("rl") == "orpo":
        out.carry(key, "train.orpo_lambda", float(value))
    else:
        out.carry(key, "train.beta", float(value))


def _ax_precompute(out, key, value, tree, base_dir):
    if value:
        out.carry(key, "train.reference", "precomputed")
    else:
        out.drop(key, "false: the reference runs beside the policy (train.reference model)")


def _has_column(path: Any, base_dir: str, column: str) -> bool:
    """Whether the data file at path (relative to the peer's config) has that column in its
    first rows; False where it cannot be read here (a hub dataset)."""
    from launcher.checks import input_checks
    if not isinstance(path, str):
        return False
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    fmt = input_checks.file_format(full, None)
    if not os.path.isfile(full) or fmt not in ("jsonl", "json", "csv"):
        return False
    try:
        rows, _ = input_checks.first_rows(full, fmt)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return any(column in r for _, r in rows)


def _template(name: str) -> Any:
    return None if name in ("tokenizer_default", "default") else "chatml" if name in CHATML_TEMPLATES else name


def _ax_datasets(out, key, value, tree, base_dir):
    pairs = tree.get("rl") in RL_OBJECTIVES
    sources = [_source(out, ds, f"{key}[{i}]", base_dir, pairs) for i, ds in enumerate(value or [])]
    if len(sources) == 1:
        for k, v in sources[0].items():
            out.carry(f"{key}[0].{'path' if k == 'path' else k}", f"data.{k}", v)
    elif sources:
        mix = [{**s, "weight": 1.0} for s in sources]
        out.approx(key, "data.mix", mix, "Axolotl concatenates the datasets; here each is drawn "
                   "with weight 1 (set the weights to the sizes for the same shares)")


def _ax_train_on_inputs(out, key, value, tree, base_dir):
    out.carry(key, "data.train_on", "all" if value else "assistant")


def _ax_chat_template(out, key, value, tree, base_dir):
    t = _template(value)
    (out.carry if t in (None, "chatml") and value in ("chatml", "tokenizer_default") else
     lambda k, r, v: out.approx(k, r, v, f"template {value!r} by name; chatml and the tokenizer's "
                                "own are built in, others need a Jinja file"))(key, "data.chat_template", t)


def _ax_val(out, key, value, tree, base_dir):
    if isinstance(value, (int, float)) and 0 < value < 1:
        out.carry(key, "data.eval_fraction", float(value))
    else:
        out.drop(key, f"{value!r}: only a fraction below 1 is offered")


AXOLOTL: dict[str, Handler] = {
    "base_model": to("model.path"), "tokenizer_config": to("model.tokenizer"),
    "trust_remote_code": to("model.trust_remote_code"), "bf16": _dtype, "fp16": _dtype,
    "fp32": _dtype, "tf32": to("train.tf32"), "gradient_checkpointing": to("model.gradient_checkpointing"),
    "flash_attention": _attention, "sdp_attention": _attention, "load_in_8bit": _ax_quant,
    "load_in_4bit": _ax_quant, "adapter": _ax_adapter, "lora_r": to("freeze.lora.r"),
    "lora_alpha": to("freeze.lora.alpha"), "lora_dropout": to("freeze.lora.dropout"),
    "lora_target_modules": _ax_targets, "lora_target_linear": _ax_targets,
    "lora_modules_to_save": _modules_to_save, "unfrozen_parameters": _ax_unfrozen,
    "datasets": _ax_datasets, "chat_template": _ax_chat_template, "train_on_inputs": _ax_train_on_inputs,
    "val_set_size": _ax_val, "sequence_len": to("data.max_seq_len"), "sample_packing": to("data.packing"),
    "micro_batch_size": to("train.micro_batch_size"),
    "gradient_accumulation_steps": to("train.grad_accum"), "num_epochs": to("train.epochs"),
    "max_steps": to("train.max_steps"), "learning_rate": to("train.lr", float),
    "lr_scheduler": _scheduler, "cosine_min_lr_ratio": to("train.min_lr_ratio"),
    "warmup_steps": to("train.warmup_steps"), "warmup_ratio": to("train.warmup_ratio"),
    "optimizer": _optimizer, "weight_decay": to("train.weight_decay"),
    "max_grad_norm": to("train.grad_clip"), "adam_beta1": _betas(0), "adam_beta2": _betas(1),
    "adam_epsilon": to("train.eps", float), "seed": to("train.seed"), "logging_steps": to("train.log_every"),
    "eval_steps": _every("train.eval_every"), "evals_per_epoch": _every("train.eval_every"),
    "save_steps": _every("train.checkpoint_every"), "saves_per_epoch": _every("train.checkpoint_every"),
    "save_total_limit": to("train.keep_checkpoints"), "deepspeed": _deepspeed,
    "output_dir": to("output.dir"), "special_tokens": _ax_special_tokens, "tokens": to("model.add_tokens"),
    "dataset_processes": to("data.preprocessing_workers"),
    "dataloader_num_workers": to("data.num_workers"), "report_to": _report_to,
    "wandb_project": _report_to, "use_tensorboard": _report_to,
    "rl": _ax_rl, "rl_beta": _ax_rl_beta, "orpo_alpha": to("train.orpo_lambda", float),
    "dpo_label_smoothing": to("train.label_smoothing", float),
    "simpo_gamma": to("train.simpo_gamma", float),
    "precompute_ref_log_probs": _ax_precompute,
}


def finish(out, peer: str, tree: dict, base_dir: str) -> None:
    """Defaults that differ between the peer and ftlaunch, and keys that need each other."""
    if (out.get("train.objective") in ("dpo", "ipo") and out.get("freeze.policy") == "lora"
            and out.get("train.reference") is None):
        out.approx("(reference under LoRA)", "train.reference", "adapters_off", f"{peer}'s "
                   "reference for a LoRA run without ref_model: the base with the adapters off")
    kind = getattr(out, "ds_scheduler", None)
    if kind and out.get("train.scheduler", "cosine") != kind:
        out.approx("deepspeed (scheduler)", "train.scheduler", kind, "the DeepSpeed file's "
                   f"scheduler wins over {out.get('train.scheduler', 'the default')}, as in the HF Trainer")
    if out.get("data.path") is None and not out.get("data.mix"):  # data.mix: one or the other
        out.set("data.path", "data.jsonl")
        out.report.approximated.append(("(no dataset)", "data.path", "data.jsonl: the config names "
                                        "no dataset; point data.path at your data"))
    if out.get("model.path") is None:
        out.set("model.path", "model")
        out.report.approximated.append(("(no model)", "model.path", "model: point it at the model folder"))
    if out.get("train.max_steps") is None and out.get("train.epochs") is None:
        epochs = 3.0 if peer == "llamafactory" else 1.0
        out.report.approximated.append(("(no epochs)", "train.epochs", f"{epochs:g}: {peer}'s default"))
        out.set("train.epochs", epochs)
    if out.get("model.dtype") is None:
        out.set("model.dtype", "fp32")
        out.report.approximated.append(("(no bf16/fp16)", "model.dtype", f"fp32: {peer} trains in "
                                        "fp32 without a precision key"))
    if peer == "llamafactory" and out.get("model.gradient_checkpointing") is None:
        out.set("model.gradient_checkpointing", True)  # LLaMA-Factory's default
    if (out.get("quantization.mode") == "4bit" and out.get("deepspeed.zero_stage") == 3
            and out.get("model.dtype") in ("bf16", "fp16", "fp32")):
        out.approx("(4-bit with ZeRO-3)", "quantization.storage_dtype", out.get("model.dtype"),
                   "4-bit weights stored in the model's dtype, so ZeRO-3 can partition them "
                   "(as the peers set bnb_4bit_quant_storage)")
    if out.get("quantization.mode") not in (None, "none") and out.get("quantization.skip_modules") is None:
        also = out.get("freeze.also_train") or []
        if "lm_head" not in also:
            out.set("quantization.skip_modules", ["lm_head"])
    if (out.get("model.special_tokens") or out.get("model.add_tokens")) and \
            out.get("freeze.policy") == "lora":
        also = sorted(set(out.get("freeze.also_train") or []) | {"embeddings", "lm_head"})
        out.approx("(new tokens)", "freeze.also_train", also, "new tokens under LoRA train the "
                   "embeddings and the head, saved with the adapter")
