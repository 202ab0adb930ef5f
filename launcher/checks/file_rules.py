"""Validate's rules about the files the run will read: the model folder (config.json, weights,
attention kernel, positions, layers), the tokenizer, the data files and fields, the chat
template, new tokens, and the parameter names that freeze patterns and LoRA targets must match
(read from the safetensors headers, torch-free). Registered with launcher/checks/rules.py.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

from launcher.model import freeze, info as model_info
from launcher.checks import input_checks, loaded_names
from launcher.config.schema import RunConfig
from launcher.config.errors import Problem
from launcher.checks.rules import input_rule, rule

@rule
def _model_folder(cfg: RunConfig) -> Iterator[Problem]:
    m = cfg.model
    if not os.path.isdir(m.path):
        parent = os.path.dirname(m.path.rstrip("/"))
        hub = "/".join(m.path.rstrip("/").split("/")[-2:])
        hint = ""
        # a Hub id ORG/NAME resolved against the run file's folder: that folder exists, ORG not
        if (not os.path.isdir(parent) and os.path.isdir(os.path.dirname(parent))
                and re.fullmatch(r"[\w.-]+/[\w.-]+", hub)):
            hint = (f"; if {hub} is a Hugging Face Hub id: ftlaunch reads local folders (compute "
                    f"nodes are often offline), so download it first (huggingface-cli download "
                    f"{hub} --local-dir models/{hub.split('/')[1]}) and set model.path to that folder")
        yield Problem("model.path", f"no such folder: {m.path}", "point it at a save_pretrained "
                      "folder (with config.json)" + hint)
    elif model_info.model_config(m.path) is None:
        yield Problem("model.path", f"{m.path} has no readable config.json",
                      "point it at a Hugging Face model folder")


@rule
def _attn_kernel(cfg: RunConfig) -> Iterator[Problem]:
    from launcher.checks.attn_kernels import problem
    yield from filter(None, [problem(cfg.model.path, cfg.model.attn_implementation)])


@rule
def _seq_len(cfg: RunConfig) -> Iterator[Problem]:
    limit = model_info.folder_max_positions(cfg.model.path)
    if limit is not None and cfg.data.max_seq_len > limit:
        yield Problem("data.max_seq_len", f"{cfg.data.max_seq_len} exceeds the model's "
                      f"{limit} positions", f"use data.max_seq_len <= {limit}")


@rule
def _layer_count(cfg: RunConfig) -> Iterator[Problem]:
    f = cfg.freeze
    if f.policy != "last_layers":
        return
    mc = model_info.model_config(cfg.model.path)
    layers = model_info.num_layers(mc) if mc else None
    if layers is not None and abs(f.trainable_layers) > layers:
        yield Problem("freeze.trainable_layers", f"{f.trainable_layers} blocks asked for, the model "
                      f"has {layers}", f"use at most {layers} (or freeze.policy: full to train all)")


@rule
def _tokenizer(cfg: RunConfig) -> Iterator[Problem]:
    tok = cfg.model.tokenizer
    if tok and not os.path.isdir(tok):
        yield Problem("model.tokenizer", f"no such folder: {tok}", "give the tokenizer folder "
                      "or null to use model.path")


@rule
def _data_files(cfg: RunConfig) -> Iterator[Problem]:
    d = cfg.data
    if (d.path is None) == (not d.mix):
        yield Problem("data.path", "give data.path (one source) or data.mix (several), not "
                      + ("both" if d.path else "neither"), "set exactly one of them")
    paths = [("data.path", d.path), ("data.eval_path", d.eval_path)]
    paths += [(f"data.mix[{i}].path", m.path) for i, m in enumerate(d.mix)]
    for key, path in paths:
        if path and not os.path.exists(path):
            yield Problem(key, f"no such file or folder: {path}", "check the path")


# ------------------------------------------------------------------ the inputs themselves
def _inputs_of(cfg: RunConfig, *keys: str) -> RunConfig:
    """The plain config behind a rule's view, after reading `keys` through it (so a rule about
    an unreliable key is skipped)."""
    for k in keys:
        obj = cfg
        for part in k.split("."):
            obj = getattr(obj, part)
    return getattr(cfg, "_obj", cfg)


_DATA_KEYS = ("data.path", "data.mix", "data.eval_path", "data.format", "data.text_field",
              "data.prompt_field", "data.response_field", "data.messages_field",
              "data.max_bad_rows")


@input_rule
def _data_inputs(cfg: RunConfig) -> Iterator[Problem]:
    real = _inputs_of(cfg, *_DATA_KEYS)
    if real.train.objective != "sft":
        return  # preference pairs: launcher/checks/preference_rules.py
    for key, d in input_checks.sources(real):
        if os.path.exists(d.path):
            yield from input_checks.data_problems(key, d.path, d)


@input_rule
def _model_weights(cfg: RunConfig) -> Iterator[Problem]:
    yield from input_checks.model_problems(_inputs_of(cfg, "model.path"))


@input_rule
def _tokenizer_files(cfg: RunConfig) -> Iterator[Problem]:
    yield from input_checks.tokenizer_problems(_inputs_of(cfg, "model.path", "model.tokenizer"))


@input_rule
def _chat_template(cfg: RunConfig) -> Iterator[Problem]:
    yield from input_checks.template_problems(
        _inputs_of(cfg, *_DATA_KEYS, "data.chat_template", "model.path", "model.tokenizer"))


@rule
def _data_fields(cfg: RunConfig) -> Iterator[Problem]:
    d = cfg.data
    if (d.prompt_field is None) != (d.response_field is None) and cfg.train.objective == "sft":
        yield Problem("data.response_field" if d.response_field is None else "data.prompt_field",
                      "prompt_field and response_field go together", "set both, or neither for plain text")


@rule
def _eval_sources(cfg: RunConfig) -> Iterator[Problem]:
    d = cfg.data
    if d.eval_path and d.eval_fraction:
        yield Problem("data.eval_fraction", "both eval_path and eval_fraction are set",
                      "use one source of eval data")


@rule
def _tokens(cfg: RunConfig) -> Iterator[Problem]:
    m = cfg.model
    for key, values in (("model.special_tokens", m.special_tokens), ("model.add_tokens", m.add_tokens)):
        for i, tok in enumerate(values):
            if not tok.strip():
                yield Problem(f"{key}[{i}]", "an empty or blank token", "remove it")
            elif values.index(tok) != i:
                yield Problem(f"{key}[{i}]", f"{tok!r} is listed twice", "remove the repeat")
    f = cfg.freeze
    missing = [g for g in ("embeddings", "lm_head") if g not in f.also_train]
    if (m.special_tokens or m.add_tokens) and f.policy == "lora" and missing:
        yield Problem("freeze.also_train", "new tokens need their embedding rows trained, and LoRA "
                      "freezes the embeddings and the output head",
                      f"add {', '.join(missing)} to freeze.also_train (saved with the adapter)")
    if m.pad_token is not None and not m.pad_token.strip():
        yield Problem("model.pad_token", "an empty pad token", "give a token, or null for the "
                      "tokenizer's own (else EOS)")


@rule
def _names_in_weights(cfg: RunConfig) -> Iterator[Problem]:
    """Freeze patterns, also_train groups and LoRA targets against the parameter names the model
    will have once loaded: the safetensors header names (no torch) renamed by the installed
    transformers' load-time rules (launcher/checks/loaded_names.py); silent when the folder has no
    readable weights or those rules cannot be read for this model (the ranks check again)."""
    f, path = cfg.freeze, cfg.model.path
    if f.policy == "full" or not os.path.isdir(path):
        return
    try:
        names = list(model_info.weight_tensors(path))
    except model_info.WeightsError:
        return
    if not names:
        return
    mc = model_info.model_config(path) or {}
    names = loaded_names.rename(mc, names, remote_code=cfg.model.trust_remote_code)
    if names is None:
        return
    if mc.get("tie_word_embeddings") and not any(n.startswith("lm_head.") for n in names):
        names.append("lm_head.weight")  # a tied head is saved once, under the embedding's name
    yield from freeze.name_problems(names, f)
