"""Cross-field rules: everything checkable on the login node before a job is queued.

`check(cfg)` returns every problem (it never stops at the first); each names the key, says why
and how to fix it. A rule is a generator registered with `@rule`; it receives a read-only view
of the config that records which fields it reads (plain attribute access only), so that a rule
reading a field with its own problem can be skipped. Keep rules small: one concern each, so
one bad field silences as little as possible. Rules needing parameter names (pattern matches,
LoRA targets) are checked against the names in the safetensors headers as transformers renames
them at load (`_names_in_weights`), and again on the ranks against the loaded model.

The registry and `check` live in launcher/checks/rules.py; the rules about the files the run will read
(model folder, data, tokenizer, chat template, names in the weights) in launcher/checks/file_rules.py.
The rules ask other modules for facts and keep only the judgement here: the batch arithmetic
(`launcher/config/batch.py`), what a model folder says (`launcher/model/info.py`), the DeepSpeed
override tables (`launcher/dsconfig/build.py`), the cluster section (`launcher/checks/slurm_checks.py`), secrets
(`launcher/config/secret_env.py`).
"""
from __future__ import annotations

import importlib.util
import re
from typing import Iterator

from launcher.config import batch, gpus, secret_env
from launcher.dsconfig import build as ds_config, user_file as ds_file
from launcher.checks import slurm_checks
from launcher.config.schema import RunConfig
from launcher.config.errors import Problem
from launcher.checks.rules import INPUT_RULES, RULES, check, input_rule, rule  # noqa: F401  (the API)
from launcher.model.quantize import missing_bitsandbytes

# ------------------------------------------------------------------ batch and schedule
@rule
def _batch(cfg: RunConfig) -> Iterator[Problem]:
    p = batch.batch_problem(cfg)
    if p is not None:
        yield p


@rule
def _min_lr(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.min_lr_ratio and t.scheduler != "cosine":
        yield Problem("train.min_lr_ratio", f"only the cosine scheduler has a floor (scheduler is "
                      f"{t.scheduler})", "set scheduler: cosine or min_lr_ratio: 0")


@rule
def _save_timeout(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.save_timeout_s < t.dist_timeout_s:
        yield Problem("train.save_timeout_s", f"{t.save_timeout_s} s is shorter than "
                      f"train.dist_timeout_s {t.dist_timeout_s} s: the ranks would wait less while "
                      "rank 0 writes a checkpoint or the export than for a training step",
                      f"set train.save_timeout_s to {t.dist_timeout_s} or more")


@rule
def _warmup(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.max_steps is not None and t.warmup_steps >= t.max_steps:
        yield Problem("train.warmup_steps", f"warmup_steps {t.warmup_steps} >= max_steps {t.max_steps}: "
                      "the learning rate would never reach lr", "use fewer warmup steps than max_steps")


@rule
def _steps_or_epochs(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.max_steps is None and t.epochs is None:
        yield Problem("train.max_steps", "how long to train is not given",
                      "set train.max_steps (optimizer steps) or train.epochs (passes over the data)")
    elif t.max_steps is not None and t.epochs is not None:
        yield Problem("train.epochs", f"both epochs ({t.epochs:g}) and max_steps ({t.max_steps}) "
                      "are set; they are exclusive", "keep one of the two")


@rule
def _warmup_ratio(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.warmup_ratio and t.warmup_steps:
        yield Problem("train.warmup_ratio", f"both warmup_ratio ({t.warmup_ratio:g}) and "
                      f"warmup_steps ({t.warmup_steps}) are set", "keep one of the two")


@rule
def _betas(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        yield Problem("train.betas", f"expected two numbers in [0, 1), got {t.betas}",
                      "use [0.9, 0.999]")


@rule
def _eval_data(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.eval_every and cfg.data.eval_path is None and cfg.data.eval_fraction == 0:
        yield Problem("train.eval_every", "evaluation requested but there is no eval data",
                      "set data.eval_path or data.eval_fraction, or eval_every: 0")


# ------------------------------------------------------------------ precision and device
@rule
def _cpu_fp16(cfg: RunConfig) -> Iterator[Problem]:
    if cfg.train.device == "cpu" and cfg.model.dtype == "fp16":
        yield Problem("model.dtype", "fp16 is not supported on CPU ranks (DeepSpeed: 'Type fp16 is "
                      "not supported on your device')", "use bf16 or fp32 on CPU")


@rule
def _cpu_compute(cfg: RunConfig) -> Iterator[Problem]:
    if (cfg.train.device == "cpu" and cfg.quantization.mode == "4bit"
            and cfg.quantization.compute_dtype == "fp16"):
        yield Problem("quantization.compute_dtype", "fp16 compute is not supported on CPU ranks",
                      "use bf16 or fp32 (or null for model.dtype)")


@rule
def _card_precision(cfg: RunConfig) -> Iterator[Problem]:
    card = gpus.lookup(cfg.cluster.gpu_type) if cfg.cluster.gpu_type else None
    if card is None or cfg.train.device == "cpu":
        return
    if cfg.model.dtype == "bf16" and not card.bf16:
        yield Problem("model.dtype", f"bf16 on {card.name} ({card.arch}, cluster.gpu_type): cards "
                      "below sm80 have no bf16 tensor cores; torch emulates bf16 there, many "
                      "times slower than fp16", "set model.dtype: fp16 (DeepSpeed scales the "
                      "loss), or name a card of sm80 or newer in cluster.gpu_type")


@rule
def _flash_attention(cfg: RunConfig) -> Iterator[Problem]:
    """flash_attention_2 fails on every rank (at from_pretrained, or at the first forward) on CPU
    ranks, with fp32 weights, below sm80, and without the flash_attn package: refused here."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    key, fix_sdpa = "model.attn_implementation", "use sdpa (or leave it unset)"
    if cfg.train.device == "cpu":
        yield Problem(key, "flash_attention_2 runs on GPUs only: CPU ranks (train.device cpu, or "
                      "`ftlaunch run` on a machine without a GPU) fail at from_pretrained on every "
                      "rank ('FlashAttention2 is not available on CPU')", fix_sdpa + " on CPU ranks")
        return
    if cfg.model.dtype == "fp32":
        yield Problem(key, "flash_attention_2 computes in fp16 or bf16 only: with model.dtype fp32 "
                      "every rank fails at its first forward", "set model.dtype: bf16 (or fp16), "
                      "or " + fix_sdpa)
    card = gpus.lookup(cfg.cluster.gpu_type) if cfg.cluster.gpu_type else None
    if card is not None and not card.flash_attention_2:
        yield Problem(key, f"flash_attention_2 needs compute capability 8.0 or newer (Ampere, Ada, "
                      f"Hopper); cluster.gpu_type {card.name} is {card.arch}", fix_sdpa)
    if importlib.util.find_spec("flash_attn") is None:
        yield Problem(key, "flash_attention_2 needs the flash_attn package, which is not "
                      "installed in the Python running this check (transformers raises "
                      "ImportError at from_pretrained on every rank without it)",
                      "pip install flash-attn in the job's Python (what cluster.setup and "
                      "cluster.python give the nodes) and here, or " + fix_sdpa)


@rule
def _precision_overrides(cfg: RunConfig) -> Iterator[Problem]:
    dtype = cfg.model.dtype
    ov = ds_config.normalise(cfg.deepspeed.overrides)
    for k in ("fp16", "bf16"):
        block = ov.get(k)
        if not isinstance(block, dict) or not isinstance(block.get("enabled"), bool):
            continue  # absent, or a type problem reported with the overrides
        on = block["enabled"]
        if on == (dtype == k):
            continue  # says what model.dtype says already
        if on and dtype in ("fp16", "bf16"):
            msg = (f"{k}.enabled: true with model.dtype {dtype}: fp16 and bf16 are exclusive "
                   "(DeepSpeed refuses both)")
        else:
            msg = f"{k}.enabled: {str(on).lower()} contradicts model.dtype {dtype}"
        yield Problem(f"deepspeed.overrides.{k}.enabled", msg,
                      f"set model.dtype: {k if on else 'fp32'} and drop {k}.enabled from the "
                      "overrides (the launcher fills fp16/bf16 from model.dtype)")


# ------------------------------------------------------------------ ZeRO and offload
@rule
def _offload_param(cfg: RunConfig) -> Iterator[Problem]:
    ds = cfg.deepspeed
    if ds.offload_param != "none" and ds.zero_stage != 3:
        yield Problem("deepspeed.offload_param", f"parameter offload needs ZeRO-3, zero_stage is "
                      f"{ds.zero_stage}", "set deepspeed.zero_stage: 3 or offload_param: none")


@rule
def _offload_optimizer(cfg: RunConfig) -> Iterator[Problem]:
    ds = cfg.deepspeed
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        yield Problem("deepspeed.offload_optimizer", "optimizer offload needs ZeRO stage 1, 2 or 3",
                      "set deepspeed.zero_stage: 2 (or higher)")
    if ds.offload_optimizer == "nvme" and ds.zero_stage in (1, 2):
        yield Problem("deepspeed.offload_optimizer", f"nvme optimizer offload needs ZeRO-3: at stage "
                      f"{ds.zero_stage} DeepSpeed silently keeps the optimizer state in CPU memory",
                      "set deepspeed.zero_stage: 3, or offload_optimizer: cpu")


@rule
def _nvme_path(cfg: RunConfig) -> Iterator[Problem]:
    ds = cfg.deepspeed
    if "nvme" in (ds.offload_optimizer, ds.offload_param) and not ds.nvme_path:
        yield Problem("deepspeed.nvme_path", "nvme offload needs a path on a local NVMe drive",
                      "set deepspeed.nvme_path: /local/nvme/offload")


@rule
def _optimizer(cfg: RunConfig) -> Iterator[Problem]:
    ds = cfg.deepspeed
    if ds.offload_optimizer != "none" and cfg.train.optimizer != "adamw":
        yield Problem("train.optimizer", f"{cfg.train.optimizer} cannot be offloaded: optimizer "
                      "offload runs DeepSpeed's own CPU Adam", "use optimizer: adamw, or "
                      "offload_optimizer: none")


@rule
def _paged_on_cpu(cfg: RunConfig) -> Iterator[Problem]:
    if cfg.train.optimizer == "paged_adamw_8bit" and cfg.train.device == "cpu":
        yield Problem("train.optimizer", "paged optimizers page GPU memory and need a GPU",
                      "use adamw_8bit on CPU")


# ------------------------------------------------------------------ quantization and freezing
@rule
def _quant_installed(cfg: RunConfig) -> Iterator[Problem]:
    yield from missing_bitsandbytes(cfg)


@rule
def _quant_full(cfg: RunConfig) -> Iterator[Problem]:
    q = cfg.quantization
    if q.mode != "none" and cfg.freeze.policy == "full":
        yield Problem("freeze.policy", f"quantized ({q.mode}) weights cannot be trained, so a full "
                      "fine-tune of a quantized model is impossible",
                      "use freeze.policy: lora, or patterns with also_train: [norms, lm_head] "
                      "(the modules that stay unquantized)")


@rule
def _quant_8bit_zero3(cfg: RunConfig) -> Iterator[Problem]:
    if cfg.quantization.mode == "8bit" and cfg.deepspeed.zero_stage == 3:
        yield Problem("quantization.mode", "8-bit loading with ZeRO-3 saves no memory (every rank "
                      "reads a full int8 copy in the forward) and gives wrong losses on GPUs",
                      "use deepspeed.zero_stage: 2 with 8bit, or 4bit with storage_dtype = model.dtype")


@rule
def _quant_4bit_storage(cfg: RunConfig) -> Iterator[Problem]:
    q, dtype = cfg.quantization, cfg.model.dtype
    if q.mode != "4bit":
        return
    if cfg.deepspeed.zero_stage == 3 and q.storage_dtype != dtype:
        yield Problem("quantization.storage_dtype", f"ZeRO-3 partitions floating-point tensors of "
                      f"one dtype; 4-bit weights stored as {q.storage_dtype} cannot be partitioned "
                      f"with {dtype} parameters", f"set quantization.storage_dtype: {dtype}")
    elif dtype in ("bf16", "fp16") and q.storage_dtype not in ("uint8", dtype):
        yield Problem("quantization.storage_dtype", f"4-bit weights stored as {q.storage_dtype} with "
                      f"model.dtype {dtype}: deepspeed.initialize casts every floating-point parameter "
                      f"to {dtype}, which rewrites the packed 4-bit bytes (the model breaks)",
                      f"use storage_dtype: uint8 (or {dtype}, which ZeRO-3 needs)")
    elif dtype == "fp32" and q.storage_dtype in ("bf16", "fp16"):
        yield Problem("quantization.storage_dtype", "a 16-bit storage dtype with fp32 parameters "
                      "mixes dtypes", "use uint8 or fp32")


def _skips(key: str, name: str) -> bool:
    """transformers' rule for llm_int8_skip_modules (quantizers_utils.should_convert_module)."""
    return re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", name) is not None or name.endswith(key)


@rule
def _quant_skip_modules(cfg: RunConfig) -> Iterator[Problem]:
    q, f = cfg.quantization, cfg.freeze
    if q.mode == "none":
        return
    ok = []
    for i, key in enumerate(q.skip_modules):
        try:
            re.compile(key)
            ok.append(key)
        except re.error as exc:
            yield Problem(f"quantization.skip_modules[{i}]", f"not a valid regex {key!r} "
                          f"(transformers matches the entries as regexes): {exc}",
                          "use a module name such as lm_head or model.layers.0.mlp")
    if "lm_head" in f.also_train and f.policy != "full" and \
            not any(_skips(k, h) for k in ok for h in ("lm_head", "embed_out")):
        yield Problem("freeze.also_train", f"lm_head is trained but not in quantization.skip_modules "
                      f"({q.skip_modules}), so it is loaded quantized and cannot train",
                      "add lm_head to quantization.skip_modules")
    if f.policy == "last_layers" and not any(any(c.isdigit() for c in k) for k in ok):
        yield Problem("freeze.policy", f"last_layers trains whole blocks, whose linear weights are "
                      f"loaded quantized ({q.mode}) and cannot train",
                      "use policy lora, or policy patterns with also_train: [norms, lm_head] "
                      "(the modules that stay 16-bit), or keep those blocks 16-bit with "
                      "quantization.skip_modules (e.g. model.layers.31)")


@rule
def _freeze_nothing(cfg: RunConfig) -> Iterator[Problem]:
    f = cfg.freeze
    if f.policy == "last_layers" and f.trainable_layers == 0:
        yield Problem("freeze.trainable_layers", "0 layers leaves nothing trainable",
                      "use N > 0 for the last N blocks, -N for the first N")
    if f.policy == "patterns" and not f.train and not f.also_train:
        yield Problem("freeze.train", "policy patterns with no train patterns and no also_train "
                      "leaves nothing trainable", "add regexes of what trains, e.g. ['layers\\.3\\.']")


@rule
def _freeze_lists(cfg: RunConfig) -> Iterator[Problem]:
    f = cfg.freeze
    if f.policy != "patterns":
        for key, val in (("freeze.train", f.train), ("freeze.freeze", f.freeze)):
            if val:
                yield Problem(key, f"only used by policy patterns (policy is {f.policy})",
                              "set freeze.policy: patterns or remove the list")
    if f.policy == "full" and f.also_train:
        yield Problem("freeze.also_train", "policy full already trains everything",
                      "remove also_train or choose last_layers / patterns / lora")


@rule
def _freeze_regexes(cfg: RunConfig) -> Iterator[Problem]:
    f = cfg.freeze
    for key, pats in (("freeze.train", f.train), ("freeze.freeze", f.freeze),
                      ("freeze.lora.target_modules", f.lora.target_modules)):
        for i, pat in enumerate(pats):
            try:
                rx = re.compile(pat)
            except re.error as exc:
                yield Problem(f"{key}[{i}]", f"not a valid regex {pat!r}: {exc}", "fix the pattern")
                continue
            if key == "freeze.freeze" and f.policy == "patterns" and rx.search(""):
                yield Problem(f"{key}[{i}]", f"{pat!r} matches every parameter name (it matches the "
                              "empty string), and freeze wins: nothing would be trainable",
                              "anchor the pattern to what should stay frozen, e.g. 'embed_tokens'")


@rule
def _merge_lora(cfg: RunConfig) -> Iterator[Problem]:
    if cfg.output.merge_lora and cfg.freeze.policy != "lora":
        yield Problem("output.merge_lora", "merging needs LoRA adapters", "set freeze.policy: lora")


# ------------------------------------------------------------------ files the run will read
from launcher.checks import file_rules as rule_files  # noqa: E402,F401  (its rules register here, in this order)
from launcher.checks import preference_rules  # noqa: E402,F401  (train.objective's rules)
from launcher.checks import longseq_rules  # noqa: E402,F401  (sequence parallelism, tiling, offload)


# ------------------------------------------------------------------ DeepSpeed overrides, cluster
@rule
def _ds_config_file(cfg: RunConfig) -> Iterator[Problem]:
    ds = cfg.deepspeed
    if not ds.config_file:
        return
    if ds.preset:
        yield Problem("deepspeed.preset", "both preset and config_file are set; the file takes "
                      "the preset's place", "keep one of the two")
    if batch.batch_problem(cfg) is not None:
        return  # reported by the batch rule; "auto" batch values cannot be resolved
    yield from ds_file.resolve(cfg)[1]


@rule
def _overrides(cfg: RunConfig) -> Iterator[Problem]:
    yield from ds_config.override_problems(cfg)


@rule
def _override_combinations(cfg: RunConfig) -> Iterator[Problem]:
    yield from ds_config.override_cross_problems(cfg)


@rule
def _trackers(cfg: RunConfig) -> Iterator[Problem]:
    from launcher.checks.trackers import missing
    yield from missing(cfg)


@rule
def _cluster(cfg: RunConfig) -> Iterator[Problem]:
    yield from slurm_checks.problems(cfg)


@rule
def _secret_env(cfg: RunConfig) -> Iterator[Problem]:
    yield from secret_env.env_problems(cfg)


@rule
def _secret_setup(cfg: RunConfig) -> Iterator[Problem]:
    yield from secret_env.setup_problems(cfg)


@rule
def _secret_overrides(cfg: RunConfig) -> Iterator[Problem]:
    yield from secret_env.override_problems(cfg)


@rule
def _env_from_shell(cfg: RunConfig) -> Iterator[Problem]:
    yield from secret_env.pass_through_problems(cfg)


# ------------------------------------------------------------------ fewer nodes (cluster.min_nodes)
@rule
def _min_nodes(cfg: RunConfig) -> Iterator[Problem]:
    """A job that may continue on fewer nodes resumes through a universal checkpoint
    (launcher/cluster/reshard.py): the combinations that cannot, and a global batch that cannot be kept
    on every node count it may get, are known here."""
    from launcher.cluster import reshard
    c = cfg.cluster
    if c.min_nodes is None:
        return
    if c.min_nodes > c.nodes:
        yield Problem("cluster.min_nodes", f"{c.min_nodes} is more than cluster.nodes {c.nodes}",
                      f"set cluster.min_nodes to at most {c.nodes}, or raise cluster.nodes")
        return
    if c.min_nodes == c.nodes:
        return
    for p in reshard.unsupported(cfg):
        yield Problem(p.key, "cluster.min_nodes lets the job continue on fewer nodes, which "
                      "resumes its checkpoint on fewer ranks: " + p.message,
                      p.fix.replace("resume on the ranks that wrote the checkpoint",
                                    "remove cluster.min_nodes"))
    try:
        micro, _, glob = batch.batch_sizes(cfg)
    except ValueError:
        return  # the batch rule says why
    bad = [n for n in range(c.min_nodes, c.nodes)
           if batch.derived_accum(glob, micro, n * c.gpus_per_node) is None]
    if bad:
        least = max(bad) + 1  # every count from here to nodes keeps it
        yield Problem("cluster.min_nodes", f"the global batch of {glob} cannot be kept on "
                      f"{', '.join(map(str, bad))} node(s): it is not a multiple of "
                      f"micro_batch_size {micro} x their ranks",
                      f"set cluster.min_nodes to {least}, or a train.global_batch_size that "
                      "every node count from min_nodes to nodes divides")
