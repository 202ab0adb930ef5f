"""The run file's typed schema: the only home of defaults, each documented on its field.

Every field is declared with `opt(default, doc, ...)`. The doc string is the reference
(README's run-file table is generated from it); `ge`/`gt`/`le`/`lt` are range checks and
`path=True` marks a filesystem path, resolved to an absolute path at load time (relative to
the run file's folder for values written in the file, to the working directory for
command-line overrides). Loading lives in `launcher/config/runfile.py`; cross-field rules in
`launcher/checks/validate.py`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from launcher.config.gpus import parse_gpu_type
from launcher.config.sizes import parse_size

REQUIRED: Any = dataclasses.MISSING

Dtype = Literal["bf16", "fp16", "fp32"]
Offload = Literal["none", "cpu", "nvme"]

# The run file's dtype names (model.dtype, quantization.compute_dtype / storage_dtype): the torch
# dtype each stands for and its bytes per element. The only copy: the plan (bytes), the ranks
# and quantized loading (`launcher.model.device.torch_dtype`) all read these.
TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "uint8": 1}

# Forms of cluster values that reach the job script: an environment variable name (cluster.env
# keys) and an sbatch long option with its value (cluster.sbatch_extra items: group 1 the option,
# group 2 the value or None). slurm_checks refuses other forms; shell and slurm render these.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SBATCH_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*")
SBATCH_EXTRA = re.compile(rf"({SBATCH_OPTION.pattern})(?:=(.*))?", re.S)


def opt(default: Any, doc: str, *, ge=None, gt=None, le=None, lt=None, path: bool = False,
        pattern: str | None = None, parse: Callable[[str, str], Any] | None = None) -> Any:
    """A schema field: its default (REQUIRED for none), its documentation and its checks.

    parse: for a string field, the function (value, key) that reads it where it is used; the
    loader calls it too, so a value it refuses (ConfigError) is refused at load time."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "path": path, "pattern": pattern,
            "parse": parse}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    path: str = opt(REQUIRED, "Local Hugging Face model folder (config.json + weights), loaded with "
                    "`from_pretrained`.", path=True)
    tokenizer: Optional[str] = opt(None, "Tokenizer folder; null: the model folder.", path=True)
    dtype: Dtype = opt("bf16", "Training precision: bf16, fp16 (GPU only) or fp32. Weights load in it.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: "
                                       "activation memory of about one layer instead of all.")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = opt(
        None, "Attention kernel passed to `from_pretrained`; null: the library's default.")
    trust_remote_code: bool = opt(False, "Allow model code shipped in the model folder.")
    pad_token: Optional[str] = opt(None, "Pad token (added as a special token if the tokenizer "
                                   "lacks it); null: the tokenizer's, else its EOS.")
    special_tokens: list[str] = opt([], "Tokens added as special tokens (never split, e.g. "
                                    "<|im_start|>); new ones get new embedding rows that train.")
    add_tokens: list[str] = opt([], "Ordinary tokens added to the vocabulary; new ones get new "
                                "embedding rows that train (whatever the freeze policy).")


@dataclass(frozen=True)
class QuantizationConfig:
    mode: Literal["none", "8bit", "4bit"] = opt("none", "Load the frozen base quantized with "
                                                "bitsandbytes: none, 8bit (LLM.int8) or 4bit (QLoRA).")
    int8_threshold: float = opt(6.0, "8bit: outlier threshold (`llm_int8_threshold`).", ge=0)
    skip_modules: list[str] = opt(["lm_head"], "Modules kept unquantized (and so trainable).")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4bit: quantization data type.")
    double_quant: bool = opt(True, "4bit: quantize the quantization constants too.")
    compute_dtype: Optional[Dtype] = opt(None, "4bit: dtype of the matmuls; null: model.dtype.")
    storage_dtype: Literal["uint8", "bf16", "fp16", "fp32"] = opt(
        "uint8", "4bit: storage dtype of packed weights; ZeRO-3 needs model.dtype here.")


@dataclass(frozen=True)
class LoraConfig:
    r: int = opt(8, "LoRA rank.", ge=1)
    alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / r).", gt=0)
    dropout: float = opt(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] = opt(["all-linear"], "Module names (or regex suffixes) that get "
                                    "adapters; [all-linear]: every linear layer but the output head.")


@dataclass(frozen=True)
class FreezeConfig:
    policy: Literal["full", "last_layers", "patterns", "lora"] = opt(
        "full", "What trains: full (everything), last_layers, patterns, or lora adapters. "
        "Applied before `deepspeed.initialize`, so optimizer state exists only for what trains.")
    trainable_layers: int = opt(1, "last_layers: train the last N transformer blocks "
                                "(negative: the first N).")
    train: list[str] = opt([], "patterns: regexes (re.search on parameter names) of what trains.")
    freeze: list[str] = opt([], "patterns: regexes of what stays frozen; applied after `train` "
                            "and `also_train`, so freeze wins.")
    also_train: list[Literal["embeddings", "lm_head", "norms", "biases"]] = opt(
        [], "Groups trained in addition to the policy's choice (last_layers, patterns, lora).")
    lora: LoraConfig = opt(LoraConfig(), "lora: adapter settings.")


@dataclass(frozen=True)
class MixSource:
    path: str = opt(REQUIRED, "This source's data file or saved folder.", path=True)
    weight: float = opt(1.0, "Share of the training draws (weights are normalised).", gt=0)
    format: Optional[Literal["jsonl", "json", "csv", "parquet", "text", "saved"]] = opt(
        None, "As data.format; null: from the extension.")
    text_field: Optional[str] = opt(None, "As data.text_field; null: data's.")
    prompt_field: Optional[str] = opt(None, "As data.prompt_field; null: data's.")
    response_field: Optional[str] = opt(None, "As data.response_field; null: data's.")
    messages_field: Optional[str] = opt(None, "As data.messages_field; null: data's.")
    input_field: Optional[str] = opt(None, "As data.input_field; null: data's.")
    tools_field: Optional[str] = opt(None, "As data.tools_field; null: data's.")
    chat_template: Optional[str] = opt(None, "As data.chat_template; null: data's.", path=True)
    train_on: Optional[Literal["assistant", "all"]] = opt(None, "As data.train_on; null: data's.")


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = opt(None, "Training data: a jsonl/json/csv/parquet/text file, or a folder "
                              "saved with `datasets.save_to_disk` (or several: data.mix).", path=True)
    format: Optional[Literal["jsonl", "json", "csv", "parquet", "text", "saved"]] = opt(
        None, "Data format; null: from the file extension (a folder: saved).")
    text_field: str = opt("text", "Column with plain text (used when prompt_field is null).")
    prompt_field: Optional[str] = opt(None, "Column with the prompt; with response_field, loss "
                                      "is computed on the response only.")
    response_field: Optional[str] = opt(None, "Column with the response.")
    messages_field: Optional[str] = opt(None, "Chat data: column with a list of messages "
                                        "({role, content}; or ShareGPT {from, value}), rendered "
                                        "with the chat template.")
    input_field: Optional[str] = opt(None, "Prompt/response data (alpaca): a column added to the "
                                     "prompt after a newline where not empty (LLaMA-Factory's "
                                     "rule: instruction + \"\\n\" + input).")
    tools_field: Optional[str] = opt(None, "Chat data: a column with the function schemas (a "
                                     "list, or its JSON text) passed to the chat template as "
                                     "`tools` (tool-calling data).")
    chat_template: Optional[str] = opt(None, "Chat data: null: the tokenizer's own; chatml (built "
                                       "in); or a Jinja file. Prompt/response data: when set, "
                                       "each row is rendered as a user and an assistant turn.",
                                       path=True)
    train_on: Literal["assistant", "all"] = opt("assistant", "Chat and prompt/response data: loss "
                                                "on the assistant turns (the response) only, or "
                                                "on every token.")
    mix: list[MixSource] = opt([], "Several sources sampled by weight: [{path, weight, ...any "
                               "per-source data key}] (instead of data.path).")
    max_seq_len: int = opt(2048, "Tokens per sequence (truncation or packing length).", ge=8)
    packing: bool = opt(False, "Pack whole examples into rows of up to max_seq_len tokens; "
                        "each attends only to itself (own position ids and attention).")
    add_eos: bool = opt(True, "Append the tokenizer's EOS token to every example (not chat: "
                        "the template ends the turns).")
    eval_path: Optional[str] = opt(None, "Separate evaluation data, same format.", path=True)
    eval_fraction: float = opt(0.0, "Hold out this fraction of the training data for evaluation.",
                               ge=0, lt=1)
    shuffle: bool = opt(True, "Shuffle training examples each epoch (seeded).")
    max_samples: Optional[int] = opt(None, "Use only the first N usable rows of each source (before "
                                     "the eval split); null: all.", ge=1)
    num_workers: int = opt(0, "Worker processes that collate micro batches ahead of the step "
                           "(torch DataLoader workers); 0: in the training process.", ge=0, le=64)
    preprocessing_workers: Optional[int] = opt(None, "Processes that tokenize the data; null: "
                                               "every CPU the task was given for the rank that "
                                               "builds the node's cache (the others wait), else "
                                               "those CPUs shared by the node's ranks.",
                                               ge=1, le=256)
    max_bad_rows: float = opt(0, "Rows that cannot be read (bad JSON, malformed messages) "
                              "skipped before the run stops: a count, or a fraction < 1 of the "
                              "rows.", ge=0)
    cache: bool = opt(True, "Tokenize once per node and keep the result (keyed by the data, "
                      "tokenizer, template and settings) for resumes and later jobs.")
    cache_dir: Optional[str] = opt(None, "Where the tokenized data is kept; null: "
                                   "data/ under $FTLAUNCH_CACHE (default ~/.cache/ftlaunch).", path=True)
    chosen_field: str = opt("chosen", "Preference data (train.objective other than sft): the "
                            "preferred answer: text, one message, or a message list (TRL's "
                            "layout; the messages both lists share are the prompt).")
    rejected_field: str = opt("rejected", "Preference data: the dispreferred answer, in the "
                              "same form as chosen_field.")


@dataclass(frozen=True)
class WatchdogConfig:
    nan: bool = opt(True, "Stop when the loss is NaN or infinite (before that step is applied).")
    max_loss: Optional[float] = opt(None, "Stop when the loss stays above this for `patience` "
                                    "steps in a row; null: no threshold.", gt=0)
    patience: int = opt(3, "max_loss: consecutive steps above it that stop the run.", ge=1)


Every = Union[int, Literal["epoch"]]


@dataclass(frozen=True)
class TrainConfig:
    max_steps: Optional[int] = opt(None, "Optimizer steps to train; the data repeats (reshuffled) "
                                   "as often as needed. Give this or epochs.", ge=1)
    epochs: Optional[float] = opt(None, "Passes over the training data instead of max_steps: the "
                                  "steps are counted from the tokenized (packed) data and the "
                                  "global batch when the ranks start, and printed.", gt=0, le=10000)
    micro_batch_size: int = opt(1, "Sequences per rank per forward pass.", ge=1)
    grad_accum: Optional[int] = opt(None, "Micro batches per optimizer step; null: derived from "
                                    "global_batch_size, else 1.", ge=1)
    global_batch_size: Optional[int] = opt(None, "Sequences per optimizer step over all ranks; must "
                                           "equal micro_batch_size x grad_accum x world size.", ge=1)
    lr: float = opt(2.0e-5, "Peak learning rate.", gt=0, le=1)
    min_lr_ratio: float = opt(0.0, "cosine: final learning rate as a fraction of lr.", ge=0, le=1)
    scheduler: Literal["constant", "linear", "cosine"] = opt(
        "cosine", "After warmup: constant, linear decay to 0, or cosine decay to min_lr_ratio "
        "(DeepSpeed's WarmupLR, WarmupDecayLR, WarmupCosineLR).")
    warmup_steps: int = opt(0, "Linear warmup steps: step k <= warmup_steps runs at lr x k / "
                            "warmup_steps, the next at lr; no step runs at lr 0 "
                            "(launcher/rank/lr_schedule.py).", ge=0)
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of the total steps (ceil(ratio x steps), "
                              "as the HF Trainer); exclusive with warmup_steps.", ge=0, lt=1)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = opt(
        "adamw", "adamw (DeepSpeed's), or bitsandbytes' 8-bit AdamW (paged: GPU only).")
    weight_decay: float = opt(0.0, "Decoupled weight decay; not on biases and norm weights "
                              "(the HF Trainer's groups).", ge=0)
    betas: list[float] = opt([0.9, 0.999], "Adam betas [beta1, beta2].")
    eps: float = opt(1.0e-8, "Adam epsilon.", gt=0)
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this; 0: off.", ge=0)
    seed: int = opt(1234, "Seed for weights of new modules, data order and dropout.", ge=0)
    device: Literal["auto", "cuda", "cpu"] = opt("auto", "auto: GPUs where present, else CPU ranks.")
    log_every: int = opt(1, "Steps between metric lines.", ge=1)
    eval_every: Every = opt(0, "Steps between evaluations, or epoch (at the end of every pass "
                            "over the data); 0: only at the end (if there is eval data).", ge=0)
    checkpoint_every: Every = opt(0, "Steps between checkpoints, or epoch; 0: only at the end.",
                                  ge=0)
    keep_checkpoints: int = opt(2, "Complete checkpoints kept; older ones are deleted.", ge=1)
    resume: Literal["auto", "never"] = opt("auto", "auto: continue from the newest complete "
                                           "checkpoint in the run directory.")
    dist_timeout_s: int = opt(600, "Collective timeout: a dead rank ends the job within this.",
                              ge=10, le=86400)
    save_timeout_s: int = opt(3600, "Collective timeout while checkpoints, the final export and a "
                              "resume's hashing run, where rank 0 works alone (model states, "
                              "manifest, pruning, the merged LoRA model) and the other ranks "
                              "wait for it.", ge=10, le=86400)
    tf32: bool = opt(False, "GPUs: fp32 matmuls and convolutions in TF32 (Ampere and newer); "
                     "ignored on CPU ranks.")
    watchdog: WatchdogConfig = opt(WatchdogConfig(), "Loss watchdog: stops the run at a step "
                                   "boundary with a checkpoint and exit code 76 (never requeued).")
    objective: Literal["sft", "dpo", "ipo", "simpo", "orpo"] = opt(
        "sft", "sft: next-token loss; preference pairs (data.chosen_field / rejected_field): "
        "dpo, ipo (both against train.reference), simpo, orpo (reference-free) "
        "(docs/preference.md).")
    beta: float = opt(0.1, "dpo/ipo/simpo: the preference strength (DPO's beta, IPO's tau, "
                      "SimPO's beta; TRL's and LLaMA-Factory's pref_beta); orpo: unused.", gt=0)
    label_smoothing: float = opt(0.0, "dpo: the assumed share of flipped labels (conservative "
                                 "DPO); simpo: the same smoothing of its sigmoid loss.", ge=0, lt=0.5)
    simpo_gamma: float = opt(0.5, "simpo: the target reward margin gamma of the paper "
                             "(TRL's simpo_gamma), subtracted from beta x the difference of "
                             "the answers' mean log-probs.", ge=0)
    orpo_lambda: float = opt(0.1, "orpo: weight of the odds-ratio term beside the chosen "
                             "answer's next-token loss (TRL's and Axolotl's beta / orpo_alpha).",
                             ge=0)
    reference: Literal["model", "adapters_off", "precomputed"] = opt(
        "model", "dpo/ipo: the frozen reference: model (a second copy of the initial model, "
        "partitioned like the policy under ZeRO-3, no optimizer state), adapters_off (freeze."
        "policy lora: the base with the adapters switched off, no copy), or precomputed "
        "(log-probs of the initial model in one pass before training, kept with the tokenized "
        "data).")
    sequence_parallel: int = opt(1, "Ranks that share one sequence (Ulysses sequence parallelism, "
                                 "docs/long-sequences.md): each holds 1/N of every sequence's "
                                 "tokens and attention runs on 1/N of the heads after an "
                                 "all-to-all. The data-parallel size becomes world size / N "
                                 "(batch arithmetic, sampler, evaluation). 1: off.", ge=1, le=64)
    tiled_loss: bool = opt(False, "Compute the logits and the loss in chunks of tokens (never the "
                           "whole [tokens x vocab] logits at once); the same loss and gradients.")
    tiled_mlp: bool = opt(False, "Run each layer's MLP over chunks of the sequence (DeepSpeed's "
                          "TiledMLP, recomputed in the backward): its intermediates shrink to "
                          "one chunk's.")
    activation_offload: bool = opt(False, "Keep the activations saved for the backward (with "
                                   "gradient checkpointing: each layer's input) in pinned host "
                                   "memory instead of GPU memory (torch's save_on_cpu).")


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = opt(2, "ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, "
                                          "3 + parameters partitioned across ranks.")
    offload_optimizer: Offload = opt("none", "Keep optimizer state (and the step) on cpu or nvme.")
    offload_param: Offload = opt("none", "ZeRO-3 only: keep parameters on cpu or nvme.")
    nvme_path: Optional[str] = opt(None, "Local NVMe folder for nvme offload.", path=True)
    preset: Optional[str] = opt(None, "Preset in ds_configs/ (file name without .json); null: "
                                "chosen from zero_stage and offload.")
    config_file: Optional[str] = opt(None, "Your DeepSpeed JSON instead of a preset, taken as "
                                     "written: \"auto\" resolved as the HF Trainer does and the "
                                     "run file's keys set; values that contradict the run file and "
                                     "unknown keys refused.", path=True)
    overrides: dict[str, Any] = opt({}, "DeepSpeed JSON merged last, e.g. {zero_optimization: "
                                    "{reduce_bucket_size: 5.0e+8}}; checked against the keys "
                                    "the launcher fills.")


@dataclass(frozen=True)
class ClusterConfig:
    nodes: int = opt(1, "Nodes.", ge=1, le=4096)
    min_nodes: Optional[int] = opt(None, "Fewest nodes the job may run on (`--nodes=MIN-MAX`, MAX "
                                   "= nodes): after a node failure and requeue it continues on "
                                   "what Slurm gives, resuming through a universal checkpoint "
                                   "(docs/slurm.md); null: exactly cluster.nodes.", ge=1, le=4096)
    gpus_per_node: int = opt(1, "GPUs (ranks) per node; with train.device cpu, CPU ranks per node "
                             "(no GPUs requested).", ge=1, le=64)
    cpus_per_task: Optional[int] = opt(None, "CPUs for each node's task (`--cpus-per-task`, passed "
                                       "on to srun as `SRUN_CPUS_PER_TASK`); each rank gets "
                                       "`OMP_NUM_THREADS` = cpus_per_task / ranks per node unless "
                                       "cluster.env or the environment sets it. null: "
                                       "gpus_per_node x (1 + data.num_workers), a CPU for each "
                                       "rank and each of its data workers.", ge=1)
    mem: Optional[str] = opt(None, "Memory per node (`--mem`, e.g. 500G, 0 for all).",
                             pattern=r"[0-9]+[KMGT]?")
    time: str = opt("24:00:00", "Time limit (`--time`, e.g. 24:00:00 or 2-00:00:00); auto: "
                    "the plan's time estimate with a margin (load, preflight, checkpoints, "
                    "export), capped at the partition's MaxTime (docs/time.md); "
                    "`partition-default`: no --time, the partition's DefaultTime (else its "
                    "MaxTime) applies, read by --submit from `scontrol show partition`.",
                    pattern=r"auto|partition-default|([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}")
    partition: Optional[str] = opt(None, "Partition (`--partition`).")
    account: Optional[str] = opt(None, "Account (`--account`).")
    qos: Optional[str] = opt(None, "Quality of service (`--qos`).")
    constraint: Optional[str] = opt(None, "Node features (`--constraint`).")
    reservation: Optional[str] = opt(None, "Reservation (`--reservation`).")
    exclusive: bool = opt(False, "Whole nodes (`--exclusive`).")
    sbatch_extra: list[str] = opt([], "More `#SBATCH` options, each `--name=value` or `--flag`.")
    after: list[str] = opt([], "Slurm job ids this job waits for: it starts once they all "
                           "completed successfully (`--dependency=afterok:ID:...`), e.g. "
                           "after=[4242] to chain runs.")
    setup: list[str] = opt([], "Shell lines run in the job's batch shell before launch (module "
                           "load, source .venv/bin/activate); srun carries the environment they "
                           "set to every node. Your own shell, run as written.")
    env: dict[str, str] = opt({}, "Environment variables for every rank (NCCL_*, HF_HOME, ...), "
                              "written in job.sbatch; secret-looking names (*TOKEN*, *KEY*, "
                              "*SECRET*, *PASSWORD*, ...) are refused: use env_from_shell.")
    env_from_shell: list[str] = opt([], "Variables every rank takes from the environment the job "
                                    "is submitted from (`sbatch --export=ALL,NAME,...`), e.g. "
                                    "[WANDB_API_KEY, HF_TOKEN]: names only, values written "
                                    "nowhere; each must be set when submitting.")
    allow_secrets_in_env: bool = opt(False, "Write secret-looking cluster.env values (and setup "
                                     "assignments, deepspeed.overrides keys) in clear instead of "
                                     "refusing them; validate, slurm and run warn.")
    launcher: Literal["torchrun", "deepspeed"] = opt("torchrun", "Per-node process launcher.")
    python: str = opt("python", "Python on the compute nodes (after setup).")
    container: Optional[str] = opt(None, "Container image the preflight and the ranks run in "
                                   "(cluster.python is then the image's): a .sif or docker:// "
                                   "URI for apptainer/singularity, an image for pyxis.")
    container_runtime: Literal["apptainer", "singularity", "pyxis"] = opt(
        "apptainer", "How cluster.container runs: `apptainer exec` / `singularity exec` before "
        "python (--nv on GPUs, the run directory bound), or pyxis's srun --container-image "
        "(the run directory mounted).")
    grace_s: int = opt(120, "Seconds before the time limit at which the job checkpoints and "
                       "requeues (`--signal=B:USR1@grace_s`).", ge=10, le=3600)
    requeue: bool = opt(True, "Requeue after preemption or the time limit, resuming.")
    max_restarts: int = opt(3, "Requeues allowed (SLURM_RESTART_COUNT), for any reason: preemption, "
                            "the time limit, a failed node, a node the preflight refused.",
                            ge=0, le=1000)
    preflight: bool = opt(True, "Before training, check every node (`ftlaunch preflight`, one task "
                          "per node): GPUs and their free memory, a writable run directory shared "
                          "by all nodes, readable model and data, the same versions everywhere, "
                          "a timed all-reduce, the checkpoint write time against grace_s. A "
                          "failing node is excluded and the job requeued (docs/slurm.md).")
    preflight_timeout_s: int = opt(120, "Seconds the preflight waits for every node's report "
                                   "and for the all-reduce.", ge=5, le=3600)
    gpu_memory: Optional[str] = opt(None, "Memory of one GPU for the plan: 80GiB, 40G, 81920MiB, "
                                    "1.5T (binary: G = GiB = 2**30 bytes), 80GB (decimal: GB = "
                                    "10**9 bytes); a bare number is GiB. null: gpu_type's, else "
                                    "the local GPU's, else an H100's.", parse=parse_size)
    gpu_type: Optional[str] = opt(None, "The GPU the job runs on (launcher/config/gpus.py: H100-SXM, "
                                  "A100-80GB, L40S, V100-32GB, ...): its memory for the plan, and "
                                  "validate refuses what it cannot run (bf16 or flash_attention_2 "
                                  "below sm80).", parse=parse_gpu_type)


@dataclass(frozen=True)
class OutputConfig:
    dir: Optional[str] = opt(None, "Run directory; null: runs/<name> in the working directory.",
                             path=True)
    save_final: bool = opt(True, "Export the trained model as a Hugging Face folder in final/.")
    merge_lora: bool = opt(False, "lora: also export the base with adapters merged (16-bit).")
    report_to: list[Literal["tensorboard", "wandb"]] = opt(
        [], "Experiment trackers rank 0 logs to every logged step (loss, eval loss, lr, grad "
        "norm, tokens/s, step time, memory): tensorboard (RUN_DIR/tensorboard), wandb (offline "
        "in RUN_DIR/wandb unless WANDB_MODE is set).")
    private: bool = opt(False, "Make the run directory 0700 and every file the run writes "
                        "(logs, checkpoints, exports) 0600; false: the user's umask decides.")


@dataclass(frozen=True)
class RunConfig:
    name: str = opt(REQUIRED, "Run name: letters, digits, . _ - (used for the job and run dir).",
                    pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    model: ModelConfig = opt(REQUIRED, "The pretrained model.")
    data: DataConfig = opt(REQUIRED, "Training data.")
    train: TrainConfig = opt(REQUIRED, "Optimisation and loop settings.")
    quantization: QuantizationConfig = opt(QuantizationConfig(), "Quantized loading of the base.")
    freeze: FreezeConfig = opt(FreezeConfig(), "What trains and what stays frozen.")
    deepspeed: DeepSpeedSection = opt(DeepSpeedSection(), "DeepSpeed ZeRO settings.")
    cluster: ClusterConfig = opt(ClusterConfig(), "Slurm resources and job settings.")
    output: OutputConfig = opt(OutputConfig(), "Where results go.")

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.gpus_per_node

    @property
    def run_dir(self) -> str:
        """The run directory (output.dir is made absolute at load time)."""
        import os
        return self.output.dir or os.path.abspath(os.path.join("runs", self.name))


def to_dict(obj: Any) -> Any:
    """A plain dict/list/scalar tree of a config (for YAML/JSON output)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
