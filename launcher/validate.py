"""Cross-field rules: everything checkable on the login node before a job is queued.

`check(cfg)` returns every problem (it never stops at the first); each names the key, says why
and how to fix it. Rules needing parameter names (pattern matches, LoRA targets) run where a
meta-device model exists: `ftlaunch plan` and the ranks.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable, Iterator

from launcher.config import RunConfig
from launcher.errors import Problem

Rule = Callable[[RunConfig], Iterator[Problem]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def check(cfg: RunConfig) -> list[Problem]:
    """All cross-field problems of a config whose fields are individually valid."""
    return [p for r in RULES for p in r(cfg)]


# ------------------------------------------------------------------ batch arithmetic
def batch_sizes(cfg: RunConfig, world_size: int | None = None) -> tuple[int, int, int]:
    """(micro batch, grad accum, global batch) for world_size ranks (default: the cluster's).

    grad_accum is derived from global_batch_size when not given; ValueError if it cannot be.
    """
    t = cfg.train
    world = world_size or cfg.world_size
    per_step = t.micro_batch_size * world
    if t.global_batch_size is None:
        accum = t.grad_accum or 1
    elif t.grad_accum is None:
        if t.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {t.global_batch_size} is not a multiple of "
                             f"micro_batch_size x world size = {t.micro_batch_size} x {world} = {per_step}")
        accum = t.global_batch_size // per_step
    else:
        accum = t.grad_accum
        if t.global_batch_size != per_step * accum:
            raise ValueError(f"global_batch_size {t.global_batch_size} != micro_batch_size x "
                             f"grad_accum x world size = {t.micro_batch_size} x {accum} x {world} "
                             f"= {per_step * accum}")
    return t.micro_batch_size, accum, per_step * accum


def _batch_fix(cfg: RunConfig, world: int) -> str:
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    assert g is not None
    per = m * world
    lo, hi = (g // per) * per, (g // per + 1) * per
    options = [f"global_batch_size {v} (grad_accum {v // per})" for v in (lo, hi) if v > 0]
    micro = [d for d in range(1, m + 1) if g % (d * world) == 0]
    if micro:
        d = micro[-1]
        options.append(f"micro_batch_size {d} with grad_accum {g // (d * world)}")
    return "use " + " or ".join(options) + "; or leave grad_accum unset to derive it"


@rule
def _batch(cfg: RunConfig) -> Iterator[Problem]:
    try:
        batch_sizes(cfg)
    except ValueError as exc:
        yield Problem("train.global_batch_size", str(exc), _batch_fix(cfg, cfg.world_size))


@rule
def _schedule(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.min_lr_ratio and t.scheduler != "cosine":
        yield Problem("train.min_lr_ratio", f"only the cosine scheduler has a floor (scheduler is "
                      f"{t.scheduler})", "set scheduler: cosine or min_lr_ratio: 0")
    if t.warmup_steps >= t.max_steps:
        yield Problem("train.warmup_steps", f"warmup_steps {t.warmup_steps} >= max_steps {t.max_steps}: "
                      "the learning rate would never reach lr", "use fewer warmup steps than max_steps")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        yield Problem("train.betas", f"expected two numbers in [0, 1), got {t.betas}",
                      "use [0.9, 0.999]")
    if t.eval_every and cfg.data.eval_path is None and cfg.data.eval_fraction == 0:
        yield Problem("train.eval_every", "evaluation requested but there is no eval data",
                      "set data.eval_path or data.eval_fraction, or eval_every: 0")


# ------------------------------------------------------------------ precision and device
@rule
def _precision(cfg: RunConfig) -> Iterator[Problem]:
    cpu = cfg.train.device == "cpu"
    if cpu and cfg.model.dtype == "fp16":
        yield Problem("model.dtype", "fp16 is not supported on CPU ranks (DeepSpeed: 'Type fp16 is "
                      "not supported on your device')", "use bf16 or fp32 on CPU")
    if cpu and cfg.quantization.mode == "4bit" and cfg.quantization.compute_dtype == "fp16":
        yield Problem("quantization.compute_dtype", "fp16 compute is not supported on CPU ranks",
                      "use bf16 or fp32 (or null for model.dtype)")
    ov = cfg.deepspeed.overrides
    enabled = [k for k in ("fp16", "bf16") if isinstance(ov.get(k), dict) and ov[k].get("enabled")]
    want = {"fp16": "fp16", "bf16": "bf16"}.get(cfg.model.dtype)
    if len(enabled) == 2:
        yield Problem("deepspeed.overrides", "fp16 and bf16 are both enabled; they are exclusive",
                      "set the precision with model.dtype only")
    elif enabled and enabled[0] != want:
        yield Problem("deepspeed.overrides", f"{enabled[0]}.enabled contradicts model.dtype "
                      f"{cfg.model.dtype}", f"set model.dtype: {enabled[0]} instead of overriding")


# ------------------------------------------------------------------ ZeRO and offload
@rule
def _zero(cfg: RunConfig) -> Iterator[Problem]:
    ds = cfg.deepspeed
    if ds.offload_param != "none" and ds.zero_stage != 3:
        yield Problem("deepspeed.offload_param", f"parameter offload needs ZeRO-3, zero_stage is "
                      f"{ds.zero_stage}", "set deepspeed.zero_stage: 3 or offload_param: none")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        yield Problem("deepspeed.offload_optimizer", "optimizer offload needs ZeRO stage 1, 2 or 3",
                      "set deepspeed.zero_stage: 2 (or higher)")
    if "nvme" in (ds.offload_optimizer, ds.offload_param) and not ds.nvme_path:
        yield Problem("deepspeed.nvme_path", "nvme offload needs a path on a local NVMe drive",
                      "set deepspeed.nvme_path: /local/nvme/offload")
    if ds.offload_optimizer != "none" and cfg.train.optimizer != "adamw":
        yield Problem("train.optimizer", f"{cfg.train.optimizer} cannot be offloaded: optimizer "
                      "offload runs DeepSpeed's own CPU Adam", "use optimizer: adamw, or "
                      "offload_optimizer: none")
    if cfg.train.optimizer == "paged_adamw_8bit" and cfg.train.device == "cpu":
        yield Problem("train.optimizer", "paged optimizers page GPU memory and need a GPU",
                      "use adamw_8bit on CPU")


# ------------------------------------------------------------------ quantization and freezing
@rule
def _quantization(cfg: RunConfig) -> Iterator[Problem]:
    q, stage = cfg.quantization, cfg.deepspeed.zero_stage
    if q.mode == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        yield Problem("quantization.mode", "bitsandbytes is not installed",
                      "pip install bitsandbytes (or quantization.mode: none)")
    if cfg.freeze.policy == "full":
        yield Problem("freeze.policy", f"quantized ({q.mode}) weights cannot be trained, so a full "
                      "fine-tune of a quantized model is impossible",
                      "use freeze.policy: lora, or last_layers / patterns training only "
                      "unquantized modules (norms, lm_head)")
    if q.mode == "8bit" and stage == 3:
        yield Problem("quantization.mode", "8-bit loading with ZeRO-3 saves no memory (every rank "
                      "reads a full int8 copy in the forward) and gives wrong losses on GPUs",
                      "use deepspeed.zero_stage: 2 with 8bit, or 4bit with storage_dtype = model.dtype")
    if q.mode == "4bit" and stage == 3 and q.storage_dtype != cfg.model.dtype:
        yield Problem("quantization.storage_dtype", f"ZeRO-3 partitions floating-point tensors of "
                      f"one dtype; 4-bit weights stored as {q.storage_dtype} cannot be partitioned "
                      f"with {cfg.model.dtype} parameters",
                      f"set quantization.storage_dtype: {cfg.model.dtype}")
    if q.mode == "4bit" and cfg.model.dtype == "fp32" and q.storage_dtype in ("bf16", "fp16"):
        yield Problem("quantization.storage_dtype", "a 16-bit storage dtype with fp32 parameters "
                      "mixes dtypes", "use uint8 or fp32")


@rule
def _freeze(cfg: RunConfig) -> Iterator[Problem]:
    f = cfg.freeze
    if f.policy == "last_layers" and f.trainable_layers == 0:
        yield Problem("freeze.trainable_layers", "0 layers leaves nothing trainable",
                      "use N > 0 for the last N blocks, -N for the first N")
    if f.policy == "patterns" and not f.train and not f.also_train:
        yield Problem("freeze.train", "policy patterns with no train patterns and no also_train "
                      "leaves nothing trainable", "add regexes of what trains, e.g. ['layers\\.3\\.']")
    if f.policy != "patterns":
        for key, val in (("freeze.train", f.train), ("freeze.freeze", f.freeze)):
            if val:
                yield Problem(key, f"only used by policy patterns (policy is {f.policy})",
                              "set freeze.policy: patterns or remove the list")
    if f.policy == "full" and f.also_train:
        yield Problem("freeze.also_train", "policy full already trains everything",
                      "remove also_train or choose last_layers / patterns / lora")
    import re
    for key, pats in (("freeze.train", f.train), ("freeze.freeze", f.freeze),
                      ("freeze.lora.target_modules", f.lora.target_modules)):
        for i, pat in enumerate(pats):
            try:
                re.compile(pat)
            except re.error as exc:
                yield Problem(f"{key}[{i}]", f"not a valid regex {pat!r}: {exc}", "fix the pattern")
    if cfg.output.merge_lora and f.policy != "lora":
        yield Problem("output.merge_lora", "merging needs LoRA adapters", "set freeze.policy: lora")


# ------------------------------------------------------------------ files the run will read
def model_config(path: str) -> dict | None:
    """The model's config.json as a dict, or None if unreadable (no torch needed)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def max_positions(model_cfg: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = model_cfg.get(key) or (model_cfg.get("text_config") or {}).get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


@rule
def _paths(cfg: RunConfig) -> Iterator[Problem]:
    m = cfg.model
    if not os.path.isdir(m.path):
        yield Problem("model.path", f"no such folder: {m.path}", "point it at a save_pretrained "
                      "folder (with config.json)")
    else:
        mc = model_config(m.path)
        if mc is None:
            yield Problem("model.path", f"{m.path} has no readable config.json",
                          "point it at a Hugging Face model folder")
        else:
            limit = max_positions(mc)
            if limit is not None and cfg.data.max_seq_len > limit:
                yield Problem("data.max_seq_len", f"{cfg.data.max_seq_len} exceeds the model's "
                              f"{limit} positions", f"use data.max_seq_len <= {limit}")
    if m.tokenizer and not os.path.isdir(m.tokenizer):
        yield Problem("model.tokenizer", f"no such folder: {m.tokenizer}", "give the tokenizer folder "
                      "or null to use model.path")
    for key, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if path and not os.path.exists(path):
            yield Problem(key, f"no such file or folder: {path}", "check the path")
    d = cfg.data
    if (d.prompt_field is None) != (d.response_field is None):
        yield Problem("data.response_field" if d.response_field is None else "data.prompt_field",
                      "prompt_field and response_field go together", "set both, or neither for plain text")
    if d.eval_path and d.eval_fraction:
        yield Problem("data.eval_fraction", "both eval_path and eval_fraction are set",
                      "use one source of eval data")


# ------------------------------------------------------------------ DeepSpeed overrides, cluster
@rule
def _overrides(cfg: RunConfig) -> Iterator[Problem]:
    from launcher.ds_config import override_problems
    yield from override_problems(cfg)


@rule
def _cluster(cfg: RunConfig) -> Iterator[Problem]:
    from launcher import slurm_checks
    yield from slurm_checks.problems(cfg)
