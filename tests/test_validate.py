"""Cross-field rules: each rule in launcher/checks/validate.py refuses its case with its message."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import textwrap

import pytest

from launcher.config import runfile
from launcher.checks import validate
from launcher.config.errors import ConfigError

BASE = {
    "name": "name: t\n",
    "model": "model: {path: model}\n",
    "data": "data: {path: train.jsonl, max_seq_len: 64}\n",
    "train": "train: {max_steps: 10}\n",
}


def run_text(extra: str) -> str:
    """BASE with its sections replaced by the top-level sections written in extra."""
    extra = textwrap.dedent(extra)
    given_ = set(re.findall(r"^([A-Za-z_]\w*):", extra, re.M))
    return "".join(v for k, v in BASE.items() if k not in given_) + extra


LORA = "freeze: {policy: lora}\n"
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
LLAMA3 = os.path.join(CONFIGS, "llama-3-8b")  # 32 heads, 8 KV heads, 8192 positions

# (rule, extra YAML, overrides, key, message regex)
CASES = [
    ("_batch", "cluster: {nodes: 2, gpus_per_node: 4}\ntrain: {max_steps: 10, micro_batch_size: 4, "
     "global_batch_size: 100}", [], "train.global_batch_size",
     r"global_batch_size 100 is not a multiple of micro_batch_size x nodes x gpus_per_node "
     r"= 4 x 2 x 4 = 32"),
    ("_batch", "cluster: {gpus_per_node: 8}\ntrain: {max_steps: 10, micro_batch_size: 2, grad_accum: 4,"
     " global_batch_size: 48}", [], "train.global_batch_size",
     r"global_batch_size 48 != micro_batch_size x grad_accum x nodes x gpus_per_node "
     r"= 2 x 4 x 1 x 8 = 64"),
    ("_min_lr", "train: {max_steps: 10, scheduler: constant, min_lr_ratio: 0.1}", [],
     "train.min_lr_ratio", r"only the cosine scheduler has a floor \(scheduler is constant\)"),
    ("_save_timeout", "train: {max_steps: 10, dist_timeout_s: 900, save_timeout_s: 600}", [],
     "train.save_timeout_s", r"600 s is shorter than train.dist_timeout_s 900 s"),
    ("_warmup", "train: {max_steps: 10, warmup_steps: 10}", [], "train.warmup_steps",
     r"warmup_steps 10 >= max_steps 10: the learning rate would never reach lr"),
    ("_betas", "train: {max_steps: 10, betas: [0.9]}", [], "train.betas",
     r"expected two numbers in \[0, 1\), got \[0.9\]"),
    ("_betas", "train: {max_steps: 10, betas: [0.9, 1.0]}", [], "train.betas",
     r"expected two numbers in \[0, 1\)"),
    ("_eval_data", "train: {max_steps: 10, eval_every: 5}", [], "train.eval_every",
     r"evaluation requested but there is no eval data"),
    ("_cpu_fp16", "train: {max_steps: 10, device: cpu}", ["model.dtype=fp16"], "model.dtype",
     r"fp16 is not supported on CPU ranks"),
    ("_card_precision", "cluster: {gpu_type: V100-32GB}", ["model.dtype=bf16"], "model.dtype",
     r"bf16 on V100-32GB \(sm70, cluster.gpu_type\): cards below sm80 have no bf16 tensor cores"),
    ("_card_precision", "cluster: {gpu_type: t4}", [], "model.dtype", r"bf16 on T4 \(sm75"),
    ("_flash_attention", "train: {max_steps: 10, device: cpu}", ["model.attn_implementation="
     "flash_attention_2", "model.dtype=bf16"], "model.attn_implementation",
     r"flash_attention_2 runs on GPUs only: CPU ranks \(train.device cpu, or `ftlaunch run` on a "
     r"machine without a GPU\)"),
    ("_flash_attention", "", ["model.attn_implementation=flash_attention_2", "model.dtype=fp32"],
     "model.attn_implementation", r"flash_attention_2 computes in fp16 or bf16 only: with "
     r"model.dtype fp32"),
    ("_flash_attention", "cluster: {gpu_type: V100-32GB}", ["model.attn_implementation="
     "flash_attention_2", "model.dtype=fp16"], "model.attn_implementation",
     r"flash_attention_2 needs compute capability 8.0 or newer .*cluster.gpu_type V100-32GB is sm70"),
    ("_flash_attention", "", ["model.attn_implementation=flash_attention_2"],
     "model.attn_implementation", r"flash_attention_2 needs the flash_attn package, which is not "
     r"installed in the Python running this check"),
    ("_cpu_compute", LORA + "train: {max_steps: 10, device: cpu}\n"
     "quantization: {mode: 4bit, compute_dtype: fp16}", [], "quantization.compute_dtype",
     r"fp16 compute is not supported on CPU ranks"),
    ("_precision_overrides", "", ["deepspeed.overrides.fp16.enabled=true"],
     "deepspeed.overrides.fp16.enabled",
     r"fp16.enabled: true with model.dtype bf16: fp16 and bf16 are exclusive"),
    ("_precision_overrides", "", ["model.dtype=fp16", "deepspeed.overrides.bf16.enabled=true"],
     "deepspeed.overrides.bf16.enabled",
     r"bf16.enabled: true with model.dtype fp16: fp16 and bf16 are exclusive"),
    ("_precision_overrides", "", ["deepspeed.overrides.bfloat16.enabled=false"],
     "deepspeed.overrides.bf16.enabled", r"bf16.enabled: false contradicts model.dtype bf16"),
    ("_precision_overrides", "", ["model.dtype=fp32", "deepspeed.overrides.fp16.enabled=true"],
     "deepspeed.overrides.fp16.enabled", r"fp16.enabled: true contradicts model.dtype fp32"),
    ("_offload_param", "deepspeed: {zero_stage: 2, offload_param: cpu}", [],
     "deepspeed.offload_param", r"parameter offload needs ZeRO-3, zero_stage is 2"),
    ("_offload_optimizer", "deepspeed: {zero_stage: 0, offload_optimizer: cpu}", [],
     "deepspeed.offload_optimizer", r"optimizer offload needs ZeRO stage 1, 2 or 3"),
    ("_offload_optimizer", "deepspeed: {zero_stage: 2, offload_optimizer: nvme, nvme_path: /nvme}", [],
     "deepspeed.offload_optimizer", r"nvme optimizer offload needs ZeRO-3: at stage 2 DeepSpeed "
     r"silently keeps the optimizer state in CPU memory"),
    ("_nvme_path", "deepspeed: {zero_stage: 3, offload_param: nvme}", [], "deepspeed.nvme_path",
     r"nvme offload needs a path on a local NVMe drive"),
    ("_optimizer", "deepspeed: {zero_stage: 2, offload_optimizer: cpu}\n"
     "train: {max_steps: 10, optimizer: adamw_8bit}", [], "train.optimizer",
     r"adamw_8bit cannot be offloaded: optimizer offload runs DeepSpeed's own CPU Adam"),
    ("_paged_on_cpu", "train: {max_steps: 10, device: cpu, optimizer: paged_adamw_8bit}", [],
     "train.optimizer", r"paged optimizers page GPU memory and need a GPU"),
    ("_quant_installed", LORA + "quantization: {mode: 8bit}", [], "quantization.mode",
     r"bitsandbytes is not installed"),
    ("_quant_full", "quantization: {mode: 8bit}", [], "freeze.policy",
     r"quantized \(8bit\) weights cannot be trained, so a full fine-tune of a quantized model "
     r"is impossible"),
    ("_quant_8bit_zero3", LORA + "quantization: {mode: 8bit}\ndeepspeed: {zero_stage: 3}", [],
     "quantization.mode", r"8-bit loading with ZeRO-3 saves no memory \(every rank reads a full "
     r"int8 copy in the forward\) and gives wrong losses on GPUs"),
    ("_quant_4bit_storage", LORA + "quantization: {mode: 4bit}\ndeepspeed: {zero_stage: 3}", [],
     "quantization.storage_dtype", r"ZeRO-3 partitions floating-point tensors of one dtype"),
    ("_quant_skip_modules", "freeze: {policy: lora, also_train: [lm_head]}\n"
     "quantization: {mode: 8bit, skip_modules: []}", [], "freeze.also_train",
     r"lm_head is trained but not in quantization.skip_modules"),
    ("_freeze_nothing", "freeze: {policy: last_layers, trainable_layers: 0}", [],
     "freeze.trainable_layers", r"0 layers leaves nothing trainable"),
    ("_freeze_nothing", "freeze: {policy: patterns}", [], "freeze.train",
     r"policy patterns with no train patterns and no also_train leaves nothing trainable"),
    ("_freeze_lists", "freeze: {policy: full, train: [layers]}", [], "freeze.train",
     r"only used by policy patterns \(policy is full\)"),
    ("_freeze_lists", "freeze: {policy: full, also_train: [norms]}", [], "freeze.also_train",
     r"policy full already trains everything"),
    ("_freeze_regexes", "freeze: {policy: patterns, train: ['layers\\.(']}", [], "freeze.train[0]",
     r"not a valid regex"),
    ("_freeze_regexes", "freeze: {policy: patterns, train: [lm_head], freeze: [embed, '.*']}", [],
     "freeze.freeze[1]", r"'\.\*' matches every parameter name .* nothing would be trainable"),
    ("_merge_lora", "output: {merge_lora: true}", [], "output.merge_lora",
     r"merging needs LoRA adapters"),
    ("_preference_data", "train: {max_steps: 10, objective: dpo}\ndata: {path: train.jsonl, "
     "max_seq_len: 64, packing: true}", [], "data.packing", r"packing would merge"),
    ("_preference_reference", "train: {max_steps: 10, objective: dpo, reference: adapters_off}",
     [], "train.reference", r"adapters_off uses the base under LoRA adapters"),
    ("_min_nodes", "cluster: {nodes: 2, min_nodes: 3}", [], "cluster.min_nodes",
     r"3 is more than cluster.nodes 2"),
    ("_min_nodes", "cluster: {nodes: 3, min_nodes: 1, gpus_per_node: 2}\ntrain: {max_steps: 10, "
     "micro_batch_size: 2, global_batch_size: 36}", [], "cluster.min_nodes",
     r"the global batch of 36 cannot be kept on 2 node\(s\)"),
    ("_min_nodes", "cluster: {nodes: 2, min_nodes: 1}\ndeepspeed: {zero_stage: 0}", [],
     "deepspeed.zero_stage", r"continue on fewer nodes, .*stage 0 has none"),
    ("_model_folder", "model: {path: nowhere}", [], "model.path", r"no such folder: .*nowhere"),
    ("_model_folder", "model: {path: empty_model}", [], "model.path", r"has no readable config.json"),
    ("_attn_kernel", "model: {path: gemma2, attn_implementation: sdpa}", [],
     "model.attn_implementation", r"gemma2 models do not support sdpa in the installed transformers"),
    ("_seq_len", "data: {path: train.jsonl, max_seq_len: 1024}", [], "data.max_seq_len",
     r"1024 exceeds the model's 512 positions"),
    ("_sp_world", "cluster: {gpus_per_node: 6}\ntrain: {max_steps: 10, sequence_parallel: 4}", [],
     "train.sequence_parallel", r"4 does not divide the world size 6"),
    ("_sp_seq_len", "data: {path: train.jsonl, max_seq_len: 65}\ncluster: {gpus_per_node: 2}\n"
     "train: {max_steps: 10, sequence_parallel: 2}", [], "data.max_seq_len",
     r"65 is not divisible by train.sequence_parallel = 2"),
    ("_sp_heads", f"model: {{path: {LLAMA3}}}\ncluster: {{gpus_per_node: 6}}\n"
     "train: {max_steps: 10, sequence_parallel: 6}", [], "train.sequence_parallel",
     r"32 attention heads do not divide by 6"),
    ("_sp_heads", f"model: {{path: {os.path.join(CONFIGS, 'mistral-7b')}}}\n"
     "data: {path: train.jsonl, max_seq_len: 8192}\ncluster: {gpus_per_node: 2}\n"
     "train: {max_steps: 10, sequence_parallel: 2}", [], "train.sequence_parallel",
     r"sliding window of 4096 tokens"),
    ("_sp_kernel", "model: {path: model, trust_remote_code: true}\ncluster: {gpus_per_node: 2}\n"
     "train: {max_steps: 10, sequence_parallel: 2}", [], "train.sequence_parallel",
     r"model code from the model folder"),
    ("_sp_objective", "train: {max_steps: 10, objective: dpo, tiled_loss: true}", [],
     "train.tiled_loss", r"does not combine with train.objective dpo"),
    ("_tiled_mlp_zero3", "train: {max_steps: 10, tiled_mlp: true}\ndeepspeed: {zero_stage: 3}", [],
     "train.tiled_mlp", r"under ZeRO-3 each MLP chunk gathers"),
    ("_offload_device", "train: {max_steps: 10, device: cpu, activation_offload: true}\n"
     "model: {path: model, dtype: fp32}", [], "train.activation_offload",
     r"CPU ranks keep activations in host memory"),
    ("_layer_count", "model: {path: two_layers}\nfreeze: {policy: last_layers, trainable_layers: -3}",
     [], "freeze.trainable_layers", r"-3 blocks asked for, the model has 2"),
    ("_tokenizer", "model: {path: model, tokenizer: no_tok}", [], "model.tokenizer",
     r"no such folder: .*no_tok"),
    ("_data_files", "data: {path: missing.jsonl, max_seq_len: 64}", [], "data.path",
     r"no such file or folder: .*missing.jsonl"),
    ("_data_fields", "data: {path: train.jsonl, max_seq_len: 64, prompt_field: q}", [],
     "data.response_field", r"prompt_field and response_field go together"),
    ("_eval_sources", "data: {path: train.jsonl, max_seq_len: 64, eval_path: train.jsonl, "
     "eval_fraction: 0.1}", [], "data.eval_fraction", r"both eval_path and eval_fraction are set"),
    ("_overrides", "deepspeed: {overrides: {steps_per_prnt: 10}}", [],
     "deepspeed.overrides.steps_per_prnt", r"not a DeepSpeed config key"),
    ("_override_combinations", "deepspeed: {zero_stage: 3, overrides: {zero_optimization: "
     "{compute_grad_norm: false}}}", [], "deepspeed.overrides.zero_optimization.compute_grad_norm",
     r"false is supported only with ZeRO stage 1 or 2 \(zero_stage is 3\)"),
    ("_cluster", "cluster: {partition: \"gpu\\nrm -rf /\"}", [], "cluster.partition",
     r"line break"),
    ("_secret_env", "cluster: {env: {HF_TOKEN: hf_abc}}", [], "cluster.env.HF_TOKEN",
     r"HF_TOKEN looks like a secret: its value would be written in clear"),
    ("_secret_env", "cluster: {env: {MY_VAR: hf_abcdefghijklmnopqrstuvwxyz0123456}}", [],
     "cluster.env.MY_VAR", r"MY_VAR has the form of an access token"),
    ("_secret_setup", "cluster: {setup: ['export WANDB_API_KEY=abc123']}", [], "cluster.setup[0]",
     r"assigns a literal value to WANDB_API_KEY"),
    ("_secret_overrides", "deepspeed: {overrides: {comet: {enabled: false, api_key: abc}}}", [],
     "deepspeed.overrides.comet.api_key", r"looks like a secret: deepspeed.overrides are written"),
    ("_env_from_shell", "cluster: {env_from_shell: [HF_TOKEN, HF_TOKEN]}", [],
     "cluster.env_from_shell[1]", r"HF_TOKEN is listed twice"),
    ("_env_from_shell", "cluster: {env_from_shell: ['two words']}", [],
     "cluster.env_from_shell[0]", r"'two words' is not a valid environment variable name"),
    ("_env_from_shell", "cluster: {env: {NCCL_DEBUG: INFO}, env_from_shell: [NCCL_DEBUG]}", [],
     "cluster.env_from_shell[0]", r"NCCL_DEBUG is also set in cluster.env"),
    ("_env_from_shell", "cluster: {env_from_shell: [MASTER_PORT]}", [],
     "cluster.env_from_shell[0]", r"MASTER_PORT is set by Slurm or the launcher"),
    ("_steps_or_epochs", "train: {lr: 1.0e-4}", [], "train.max_steps",
     r"how long to train is not given"),
    ("_steps_or_epochs", "train: {max_steps: 10, epochs: 2}", [], "train.epochs",
     r"both epochs \(2\) and max_steps \(10\) are set; they are exclusive"),
    ("_warmup_ratio", "train: {epochs: 1, warmup_ratio: 0.1, warmup_steps: 5}", [],
     "train.warmup_ratio", r"both warmup_ratio \(0.1\) and warmup_steps \(5\) are set"),
    ("_tokens", "model: {path: model, special_tokens: ['<a>', ' '], add_tokens: [x, x]}", [],
     "model.special_tokens[1]", r"an empty or blank token"),
    ("_tokens", "model: {path: model, add_tokens: [x, x]}", [], "model.add_tokens[1]",
     r"'x' is listed twice"),
    ("_tokens", LORA + "model: {path: model, add_tokens: [x]}", [], "freeze.also_train",
     r"new tokens need their embedding rows trained, and LoRA freezes the embeddings"),
    ("_names_in_weights", "model: {path: weights}\nfreeze: {policy: patterns, train: "
     "[block_sparse_moe.experts]}", [], "freeze.train[0]",
     r"pattern 'block_sparse_moe.experts' matches no parameter of the model's weights"),
    ("_names_in_weights", "model: {path: weights}\nfreeze: {policy: lora, lora: {target_modules: "
     "[q_prj]}}", [], "freeze.lora.target_modules[0]", r"'q_prj' matches no module"),
    ("_ds_config_file", "deepspeed: {config_file: ds.json}\ntrain: {max_steps: 10, "
     "micro_batch_size: 2}", [], "deepspeed.config_file",
     r"train_micro_batch_size_per_gpu is 8, but the run file gives 2 \(train.micro_batch_size\)"),
    ("_ds_config_file", "deepspeed: {config_file: ds.json, preset: zero2}", [], "deepspeed.preset",
     r"both preset and config_file are set"),
    ("_trackers", "output: {report_to: [tensorboard, wandb]}", [], "output.report_to[1]",
     r"wandb is not installed on this machine"),
    ("_trackers", "deepspeed: {overrides: {tensorboard: {enabled: true, output_path: tb}}}", [],
     "deepspeed.overrides.tensorboard",
     r"DeepSpeed's tensorboard monitor needs tensorboard, which is not installed"),
]


@pytest.fixture
def folder(tmp_path, fake_model, monkeypatch):
    """tmp_path with model/ (512 positions), two_layers/, empty_model/ and train.jsonl."""
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "gemma2").mkdir()
    (tmp_path / "gemma2" / "config.json").write_text(json.dumps(
        {"model_type": "gemma2", "num_hidden_layers": 2, "max_position_embeddings": 512}))
    (tmp_path / "two_layers").mkdir()
    (tmp_path / "two_layers" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "num_hidden_layers": 2, "max_position_embeddings": 128}))
    (tmp_path / "weights").mkdir()  # a MoE model whose experts are fused, as transformers 5 names them
    (tmp_path / "weights" / "config.json").write_text(json.dumps(
        {"model_type": "mixtral", "num_hidden_layers": 1, "hidden_size": 8}))
    from test_model_weights import write_safetensors
    write_safetensors(tmp_path / "weights" / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", [4, 8]), "lm_head.weight": ("BF16", [4, 8]),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", [8, 8]),
        "model.layers.0.mlp.experts.gate_up_proj": ("BF16", [2, 16, 8]),
        "model.layers.0.mlp.gate.weight": ("BF16", [2, 8]),
        "model.layers.0.input_layernorm.weight": ("BF16", [8])})
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    return tmp_path


@pytest.mark.parametrize("rule_name, extra, overrides, key, match", CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_rule_refuses_with_its_message(folder, monkeypatch, rule_name, extra, overrides, key, match):
    hidden = {"_quant_installed": ("bitsandbytes",), "_trackers": ("tensorboard", "wandb"),
              "_flash_attention": ("flash_attn",)}
    if rule_name in hidden:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                            if name in hidden[rule_name] else real(name, *a))
    text = run_text(extra)
    (folder / "run.yaml").write_text(text)
    cfg, problems = runfile.parse(text, overrides, source="run.yaml", base_dir=str(folder))
    assert cfg is not None, problems
    rule = {r.__name__: r for r in validate.RULES}[rule_name]
    found = list(rule(cfg))
    assert [p for p in found if p.key == key and re.search(match, p.message) and p.fix], found
    with pytest.raises(ConfigError, match=match) as exc:
        runfile.load(str(folder / "run.yaml"), overrides)
    assert key in exc.value.keys


def test_every_rule_has_a_case():
    names = {r.__name__ for r in validate.RULES}
    covered = {c[0] for c in CASES}
    assert names - covered == set(), "add a case to CASES in tests/test_validate.py for these rules"
    assert covered - names == set()


def test_a_valid_file_passes_every_rule(folder):
    cfg, problems = runfile.parse(run_text(""), base_dir=str(folder))
    assert problems == [] and validate.check(cfg) == []


@pytest.mark.parametrize("extra", [
    LORA + "quantization: {mode: 4bit, storage_dtype: bf16}\ndeepspeed: {zero_stage: 3}",
    LORA + "quantization: {mode: 8bit}\ndeepspeed: {zero_stage: 2}",
    "deepspeed: {zero_stage: 3, offload_optimizer: nvme, offload_param: nvme, nvme_path: /nvme}",
    "deepspeed: {zero_stage: 1, offload_optimizer: cpu}",
    "train: {max_steps: 10, device: cpu}\nmodel: {path: model, dtype: fp32}",
    "freeze: {policy: patterns, train: ['layers\\.1\\.'], freeze: ['bias$']}",
    "cluster: {nodes: 2, gpus_per_node: 4}\ntrain: {max_steps: 10, micro_batch_size: 4, "
    "global_batch_size: 128}",
    "deepspeed: {overrides: {fp16: {enabled: false}, bf16: {enabled: true}}}",
])
def test_valid_combinations_are_accepted(folder, extra):
    cfg, problems = runfile.parse(run_text(extra), base_dir=str(folder))
    assert problems == []


# ------------------------------------------------------------------ batch arithmetic
def test_batch_fix_names_the_numbers_that_divide(folder):
    text = run_text("cluster: {nodes: 2, gpus_per_node: 4}\n"
                    "train: {max_steps: 10, micro_batch_size: 4, global_batch_size: 100}")
    _, problems = runfile.parse(text, base_dir=str(folder))
    (p,) = problems
    assert p.fix == ("use one of: global_batch_size: 96 (grad_accum 3); "
                     "global_batch_size: 128 (grad_accum 4)")


def test_batch_fix_suggests_micro_batches_that_divide(folder):
    text = run_text("cluster: {gpus_per_node: 4}\n"
                    "train: {max_steps: 10, micro_batch_size: 4, global_batch_size: 72}")
    _, problems = runfile.parse(text, base_dir=str(folder))
    (p,) = problems
    assert "micro_batch_size: 3 (grad_accum 6)" in p.fix and "micro_batch_size: 6 (grad_accum 3)" in p.fix
    assert "global_batch_size: 64 (grad_accum 4)" in p.fix


def test_batch_message_says_when_the_global_batch_cannot_split_over_the_ranks(folder):
    text = run_text("cluster: {gpus_per_node: 8}\ntrain: {max_steps: 10, global_batch_size: 12}")
    _, problems = runfile.parse(text, base_dir=str(folder))
    assert problems[0].message.endswith("(a global batch must be a multiple of the 8 ranks)")


def test_batch_fix_with_grad_accum_given(folder):
    text = run_text("cluster: {gpus_per_node: 8}\ntrain: {max_steps: 10, micro_batch_size: 2, "
                    "grad_accum: 4, global_batch_size: 48}")
    _, problems = runfile.parse(text, base_dir=str(folder))
    assert problems[0].fix == ("use one of: global_batch_size: 64; grad_accum: 3; remove "
                               "global_batch_size (it is then micro x grad_accum x ranks)")


# ------------------------------------------------------------------ check() and unreliable keys
def test_check_skips_rules_that_read_an_unreliable_key(folder):
    text = run_text("deepspeed: {zero_stage: 2, offload_param: nvme}")
    cfg, _ = runfile.parse(text, base_dir=str(folder))
    keys = {p.key for p in validate.check(cfg)}
    assert keys == {"deepspeed.offload_param", "deepspeed.nvme_path"}
    keys = {p.key for p in validate.check(cfg, {"deepspeed.zero_stage"})}
    assert keys == {"deepspeed.nvme_path"}


def test_check_treats_a_section_and_list_items_as_overlapping(folder):
    cfg, _ = runfile.parse(run_text("freeze: {policy: patterns}"), base_dir=str(folder))
    assert "freeze.train" in {p.key for p in validate.check(cfg)}
    assert "freeze.train" not in {p.key for p in validate.check(cfg, {"freeze"})}
    assert "freeze.train" not in {p.key for p in validate.check(cfg, {"freeze.also_train[0]"})}
