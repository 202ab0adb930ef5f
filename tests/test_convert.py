"""`ftlaunch convert`: Axolotl and LLaMA-Factory configs, written here in their documented forms.

Each converted file must pass validate except for paths that do not exist here and, until the
chat-data keys are merged, exactly the unknown-key problems of data.messages_field /
chat_template / train_on / mix (CHAT_KEYS below); the report must list what was dropped.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from launcher import cli
from launcher.convert import command as convert
from launcher.config import runfile
from test_ds_file import ZERO3

CHAT_KEYS = {"data.messages_field", "data.chat_template", "data.train_on", "data.mix"}


def axolotl(tiny) -> dict[str, str]:
    m, d = tiny["model"], tiny["text"]
    return {
        "lora": f"""\
            base_model: {m}
            model_type: LlamaForCausalLM
            tokenizer_type: AutoTokenizer
            load_in_8bit: false
            datasets:
              - path: {d}
                type: completion
            val_set_size: 0.05
            output_dir: ./outputs/lora-out
            sequence_len: 128
            sample_packing: true
            adapter: lora
            lora_r: 32
            lora_alpha: 16
            lora_dropout: 0.05
            lora_target_modules: [q_proj, v_proj]
            wandb_project: my-proj
            gradient_accumulation_steps: 4
            micro_batch_size: 2
            num_epochs: 4
            optimizer: adamw_bnb_8bit
            lr_scheduler: cosine
            learning_rate: 0.0002
            bf16: auto
            tf32: false
            gradient_checkpointing: true
            logging_steps: 1
            flash_attention: true
            warmup_ratio: 0.1
            evals_per_epoch: 4
            saves_per_epoch: 1
            weight_decay: 0.0
            special_tokens:
              pad_token: "<|end_of_text|>"
            """,
        "qlora": f"""\
            base_model: {m}
            load_in_4bit: true
            adapter: qlora
            lora_r: 16
            lora_alpha: 32
            lora_target_linear: true
            datasets:
              - path: {d}
                type: completion
            sequence_len: 128
            micro_batch_size: 1
            gradient_accumulation_steps: 8
            num_epochs: 1
            learning_rate: 0.0001
            optimizer: paged_adamw_8bit
            bf16: true
            """,
        "full_zero3": f"""\
            base_model: {m}
            datasets:
              - path: {d}
                type: completion
            sequence_len: 128
            micro_batch_size: 1
            gradient_accumulation_steps: 2
            num_epochs: 2
            learning_rate: 0.00001
            lr_scheduler: cosine
            warmup_steps: 10
            bf16: true
            deepspeed: ds_z3.json
            save_total_limit: 3
            """,
        "freeze": f"""\
            base_model: {m}
            unfrozen_parameters:
              - ^lm_head.weight$
              - model.layers.1.*
            datasets:
              - path: {d}
                type: completion
            sequence_len: 128
            micro_batch_size: 2
            num_epochs: 1
            learning_rate: 0.00002
            bf16: true
            """,
        "chat_datasets": f"""\
            base_model: {m}
            chat_template: chatml
            datasets:
              - path: chat_a.jsonl
                type: chat_template
                field_messages: messages
                message_property_mappings: {{role: role, content: content}}
              - path: chat_b.jsonl
                type: chat_template
                field_messages: conversations
            train_on_inputs: false
            adapter: lora
            lora_target_linear: true
            sequence_len: 128
            micro_batch_size: 2
            num_epochs: 3
            learning_rate: 0.0002
            bf16: true
            tokens: ["<|tool|>"]
            """,
    }


def llamafactory(tiny, tmp_path) -> dict[str, str]:
    m = tiny["model"]
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({
        "my_text": {"file_name": "text.jsonl", "columns": {"prompt": "text", "response": "text"}},
        "alpaca_en": {"file_name": "alpaca_en.json"},
        "chat_sg": {"file_name": "chat_sg.json", "formatting": "sharegpt",
                    "columns": {"messages": "conversations"}}}))
    (tmp_path / "data" / "text.jsonl").write_text(open(tiny["text"]).read())
    common = f"model_name_or_path: {m}\ntrust_remote_code: true\nstage: sft\ndo_train: true\n"
    return {
        "lora": common + textwrap.dedent("""\
            finetuning_type: lora
            lora_rank: 8
            lora_target: all
            dataset: my_text
            template: llama3
            cutoff_len: 128
            max_samples: 1000
            overwrite_cache: true
            preprocessing_num_workers: 16
            dataloader_num_workers: 4
            output_dir: saves/llama3-8b/lora/sft
            logging_steps: 10
            save_steps: 500
            plot_loss: true
            report_to: none
            per_device_train_batch_size: 1
            gradient_accumulation_steps: 8
            learning_rate: 1.0e-4
            num_train_epochs: 3.0
            lr_scheduler_type: cosine
            warmup_ratio: 0.1
            bf16: true
            ddp_timeout: 180000000
            """),
        "qlora": common + textwrap.dedent("""\
            quantization_bit: 4
            quantization_method: bnb
            double_quantization: false
            finetuning_type: lora
            lora_target: q_proj,v_proj
            dataset: my_text
            cutoff_len: 128
            per_device_train_batch_size: 1
            gradient_accumulation_steps: 8
            learning_rate: 1.0e-4
            num_train_epochs: 1.0
            bf16: true
            """),
        "full_zero3": common + textwrap.dedent("""\
            finetuning_type: full
            deepspeed: ds_z3.json
            dataset: my_text
            cutoff_len: 128
            per_device_train_batch_size: 1
            gradient_accumulation_steps: 2
            learning_rate: 1.0e-5
            num_train_epochs: 3.0
            lr_scheduler_type: cosine
            warmup_ratio: 0.1
            bf16: true
            save_strategy: epoch
            """),
        "freeze": common + textwrap.dedent("""\
            finetuning_type: freeze
            freeze_trainable_layers: 1
            freeze_trainable_modules: all
            dataset: my_text
            cutoff_len: 128
            per_device_train_batch_size: 2
            learning_rate: 1.0e-5
            num_train_epochs: 1.0
            bf16: true
            """),
        "chat_datasets": common + textwrap.dedent("""\
            finetuning_type: lora
            lora_target: all
            dataset: alpaca_en,chat_sg
            mix_strategy: interleave_under
            interleave_probs: 0.25,0.75
            template: qwen
            neat_packing: true
            cutoff_len: 128
            train_on_prompt: false
            new_special_tokens: "<|tool|>,<|obs|>"
            per_device_train_batch_size: 1
            num_train_epochs: 2.0
            learning_rate: 1.0e-4
            bf16: true
            val_size: 0.1
            eval_strategy: epoch
            """),
    }


def convert_file(tmp_path, text: str, peer: str, name: str) -> tuple[str, str]:
    src = tmp_path / f"{name}.yaml"
    src.write_text(textwrap.dedent(text))
    (tmp_path / "ds_z3.json").write_text(json.dumps({**ZERO3, "bf16": {"enabled": "auto"}}))
    out = tmp_path / f"{name}.run.yaml"
    return str(src), str(out)


CASES = [(p, n) for p in ("axolotl", "llamafactory")
         for n in ("lora", "qlora", "full_zero3", "freeze", "chat_datasets")]


@pytest.mark.parametrize("peer, name", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_converted_files_pass_validate_but_for_missing_paths(tiny, tmp_path, capsys, monkeypatch,
                                                            peer, name):
    import importlib.machinery
    import importlib.util
    real = importlib.util.find_spec  # the peers' flash attention needs flash_attn where validate runs
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: (
        importlib.machinery.ModuleSpec(n, None) if n == "flash_attn" else real(n, *a)))
    texts = axolotl(tiny) if peer == "axolotl" else llamafactory(tiny, tmp_path)
    src, out = convert_file(tmp_path, texts[name], peer, name)
    assert cli.main(["convert", src, "-o", out]) == 0  # the peer detected from the keys
    report = capsys.readouterr().out
    run = yaml.safe_load(open(out))
    cfg, problems = runfile.parse(open(out).read(), ["cluster.gpus_per_node=2"], source=out,
                                  base_dir=str(tmp_path))
    paths = [p for p in problems if p.key in ("data.path", "data.eval_path", "model.path")
             or p.key.startswith("data.mix[") and p.key.endswith(".path")]
    paths = [p for p in paths if "no such file" in p.message]
    others = [p for p in problems if p not in paths]
    assert others == [], problems
    assert f"wrote {out} from {peer}" in report and "dropped (" in report
    if name == "chat_datasets":  # chat data and dataset lists land on the data keys by name
        assert CHAT_KEYS & _keys(run) and "-> data.mix:" in report
        assert all(p.key.startswith("data.mix[") for p in paths)  # the peers' dataset files
    else:
        assert cfg is not None and not paths, problems

def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out.add(key)
        if isinstance(v, dict):
            out |= _keys(v, key)
    return out


def test_axolotl_lora_report_says_what_was_carried_approximated_and_dropped(tiny, tmp_path, capsys):
    src, out = convert_file(tmp_path, axolotl(tiny)["lora"], "axolotl", "lora")
    assert cli.main(["convert", src, "--from", "axolotl", "-o", out]) == 0
    report = capsys.readouterr().out
    run = yaml.safe_load(open(out))
    assert run["train"]["epochs"] == 4 and run["train"]["warmup_ratio"] == 0.1
    assert run["freeze"] == {"policy": "lora", "lora": {"r": 32, "alpha": 16, "dropout": 0.05,
                                                         "target_modules": ["q_proj", "v_proj"]}}
    assert run["model"]["pad_token"] == "<|end_of_text|>" and run["model"]["dtype"] == "bf16"
    assert run["data"]["packing"] is True and run["data"]["text_field"] == "text"
    assert "  num_epochs -> train.epochs = 4" in report
    assert "  evals_per_epoch -> train.eval_every: 'epoch' (4 per epoch -> once an epoch)" in report
    assert ("  wandb_project -> output.report_to: ['wandb'] (project 'my-proj': set WANDB_PROJECT "
            "in the job's environment)") in report
    assert "  model_type: AutoModelForCausalLM is used" in report


def test_llamafactory_mixture_keeps_the_interleave_probabilities(tiny, tmp_path, capsys):
    src, out = convert_file(tmp_path, llamafactory(tiny, tmp_path)["chat_datasets"], "llamafactory", "c")
    assert cli.main(["convert", src, "--from", "llamafactory", "-o", out]) == 0
    run = yaml.safe_load(open(out))
    mix = run["data"]["mix"]
    assert [m["weight"] for m in mix] == [0.25, 0.75]
    assert mix[1]["messages_field"] == "conversations" and mix[0]["prompt_field"] == "instruction"
    assert run["data"]["chat_template"] == "chatml" and run["data"]["train_on"] == "assistant"
    assert run["model"]["special_tokens"] == ["<|tool|>", "<|obs|>"]
    assert set(run["freeze"]["also_train"]) == {"embeddings", "lm_head"}
    assert run["train"]["eval_every"] == "epoch"


def test_zero3_file_sets_the_stage_and_offloads(tiny, tmp_path, capsys):
    src, out = convert_file(tmp_path, axolotl(tiny)["full_zero3"], "axolotl", "z3")
    assert cli.main(["convert", src, "-o", out]) == 0
    ds = yaml.safe_load(open(out))["deepspeed"]
    assert ds == {"config_file": "ds_z3.json", "zero_stage": 3, "offload_optimizer": "cpu",
                  "offload_param": "cpu"}


def test_an_unknown_config_is_refused(tmp_path, capsys):
    src = tmp_path / "x.yaml"
    src.write_text("foo: 1\n")
    assert cli.main(["convert", str(src), "-o", str(tmp_path / "o.yaml")]) == 2
    assert "cannot tell whose config" in capsys.readouterr().err
    assert convert.detect({"base_model": "x"}) == "axolotl"
