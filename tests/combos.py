"""Combination matrices for the suite: a pairwise covering set over feature switches, and the
run file each row of it makes (used by tests/test_matrix.py and tests/test_first_day.py).

`pairwise(levels)` is a deterministic greedy covering array (the AETG idea): each new row is the
candidate, among a fixed number built column by column, that covers the most value pairs not yet
covered, until every pair of values of every two switches appears in some row.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import typing
from typing import Any

from launcher.config import schema as config, runfile


def schema_choices(key: str) -> list[Any]:
    """The values a Literal-typed run-file key allows, read from the schema (launcher/config/schema.py)."""
    cls: Any = config.RunConfig
    *parents, last = key.split(".")
    for p in parents:
        cls = runfile.type_hints(cls)[p]
    tp = runfile.type_hints(cls)[last]
    for arg in (typing.get_args(tp) or (tp,)):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
        if typing.get_origin(arg) is list:  # list[Literal[...]]
            (inner,) = typing.get_args(arg)
            if typing.get_origin(inner) is typing.Literal:
                return list(typing.get_args(inner))
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    raise KeyError(f"{key} is not a Literal field")


def schema_keys() -> set[str]:
    return {k for k, *_ in runfile.fields_reference()}


def pairwise(levels: dict[str, list[Any]], seed: int = 0, candidates: int = 30,
             allowed: Any = lambda a, va, b, vb: True) -> list[dict]:
    """Rows (switch -> value) in which every allowed pair of values of every two switches
    appears; no row holds a pair that `allowed(switch_a, value_a, switch_b, value_b)` refuses."""
    names = list(levels)
    rng = random.Random(seed)
    ok = {(a, i, b, j) for a, b in itertools.combinations(range(len(names)), 2)
          for i in range(len(levels[names[a]])) for j in range(len(levels[names[b]]))
          if allowed(names[a], levels[names[a]][i], names[b], levels[names[b]][j])
          and allowed(names[b], levels[names[b]][j], names[a], levels[names[a]][i])}
    todo = set(ok)
    rows: list[list[int]] = []

    def fits(row: list[int | None], c: int, v: int) -> bool:
        return all((min(c, k), v if c < k else row[k], max(c, k), row[k] if c < k else v) in ok
                   for k in range(len(row)) if k != c and row[k] is not None)

    def gain(row: list[int | None]) -> int:
        return sum((a, row[a], b, row[b]) in todo for a, b in itertools.combinations(range(len(row)), 2)
                   if row[a] is not None and row[b] is not None)

    while todo:
        best, best_gain = None, -1
        for _ in range(candidates):
            row: list[int | None] = [None] * len(names)
            a, i, b, j = rng.choice(sorted(todo))  # start from an uncovered pair
            row[a], row[b] = i, j
            for c in rng.sample(range(len(names)), len(names)):
                if row[c] is None:
                    opts = [v for v in range(len(levels[names[c]])) if fits(row, c, v)]
                    rng.shuffle(opts)
                    row[c] = max(opts, key=lambda v: gain(row[:c] + [v] + row[c + 1:]))
            g = gain(row)
            if g > best_gain:
                best, best_gain = row, g
        assert best is not None
        rows.append(best)  # type: ignore[arg-type]
        todo -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(range(len(names)), 2)}
    return [{n: levels[n][v] for n, v in zip(names, r)} for r in rows]


# pairs the launcher refuses on purpose (each with its key and fix): test_matrix.py checks the
# refusal once per pair; the covering set leaves them out so that its rows run every command
REFUSED = [("quant", "8bit", "freeze", "full"), ("quant", "4bit", "freeze", "full"),
           ("quant", "8bit", "freeze", "last_layers"), ("quant", "4bit", "freeze", "last_layers"),
           ("offload", "cpu", "zero", 0), ("quant", "8bit", "zero", 3),
           ("time", "auto", "gpu_type", None),   # no peak FLOP/s and nothing measured
           ("longseq", "tiled", "zero", 3), ("min_nodes", True, "zero", 0),
           ("min_nodes", True, "longseq", "sp")]   # a sequence-parallel layout is not resharded
# preference pairs (train.objective) are padded per micro batch and read from one source, and
# take their log-probs from whole logits (no sequence-parallel or tiled loss)
PREFERENCE = ("dpo", "simpo")
REFUSED += [("objective", o, "packing", True) for o in PREFERENCE] + \
    [("objective", o, "sources", "mix") for o in PREFERENCE] + \
    [("objective", o, "longseq", v) for o in PREFERENCE for v in ("sp", "tiled")]


def allowed(a: str, va: Any, b: str, vb: Any) -> bool:
    return (a, va, b, vb) not in REFUSED


def covered_pairs(rows: list[dict], levels: dict[str, list[Any]]) -> set:
    seen = set()
    for r in rows:
        for a, b in itertools.combinations(list(levels), 2):
            seen.add((a, json.dumps(r[a], sort_keys=True), b, json.dumps(r[b], sort_keys=True)))
    return seen


# ------------------------------------------------------------------ data and run files
CHATS = [("what is 2 plus 3?", "5."), ("name a colour.", "red."), ("say hello.", "hello."),
         ("what is the capital of japan?", "tokyo."), ("count to three.", "one two three.")]
TOOLS = [{"name": "add", "parameters": {"a": "number", "b": "number"}}]  # short: 256 positions
TEMPLATE = ("{% if tools %}<|system|>{{ tools | tojson }}</s>\n{% endif %}"
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_data(d: str, n: int = 40) -> dict[str, str]:
    """Small files in every layout the matrix uses, under d: paths by layout name."""
    os.makedirs(d, exist_ok=True)
    rows: dict[str, list[dict]] = {"text": [], "prompt_response": [], "messages": [],
                                   "sharegpt": [], "tools": []}
    for k in range(n):
        q, a = CHATS[k % len(CHATS)]
        rows["text"].append({"text": f"{q} {a} number {k}."})
        rows["prompt_response"].append({"prompt": q, "response": f" {a}"})
        rows["messages"].append({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]})
        rows["sharegpt"].append({"conversations": [{"from": "human", "value": q},
                                                   {"from": "gpt", "value": a}]})
        rows["tools"].append({"tools": json.dumps(TOOLS), "conversations": [
            {"from": "human", "value": f"add {k} and 2"},
            {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": k, "b": 2}})},
            {"from": "observation", "value": str(k + 2)},
            {"from": "gpt", "value": f"{k + 2}."}]})
    for k in range(n):  # preference pairs in the layouts people have them
        q, a = CHATS[k % len(CHATS)]
        rows.setdefault("pairs_text", []).append({"prompt": q, "chosen": f" {a}", "rejected": " no."})
        rows.setdefault("pairs_trl", []).append({
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "no."}]})
        rows.setdefault("pairs_sharegpt", []).append({
            "conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": a},
            "rejected": {"from": "gpt", "value": "no."}})
        rows.setdefault("pairs_axolotl", []).append({
            "messages": [{"role": "user", "content": q}],
            "chosen": {"role": "assistant", "content": a},
            "rejected": {"role": "assistant", "content": "no."}})
    out = {}
    for name, rs in rows.items():
        out[name] = os.path.join(d, f"{name}.jsonl")
        with open(out[name], "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rs)
    out["template"] = os.path.join(d, "template.jinja")
    with open(out["template"], "w", encoding="utf-8") as fh:
        fh.write(TEMPLATE)
    return out


LAYOUT_FIELDS = {"text": {}, "prompt_response": {"prompt_field": "prompt", "response_field": "response"},
                 "messages": {"messages_field": "messages"},
                 "sharegpt": {"messages_field": "conversations"},
                 "tools": {"messages_field": "conversations", "tools_field": "tools"}}


# the preference file a layout's row reads when its objective is not sft
PAIR_LAYOUTS = {"text": ("pairs_text", {"prompt_field": "prompt"}),
                "prompt_response": ("pairs_text", {"prompt_field": "prompt"}),
                "messages": ("pairs_trl", {}),
                "sharegpt": ("pairs_sharegpt", {"messages_field": "conversations"}),
                "tools": ("pairs_axolotl", {"messages_field": "messages"})}


def source(layout: str, files: dict[str, str], template: Any,
           objective: str = "sft") -> dict[str, Any]:
    if objective != "sft":
        name, fields = PAIR_LAYOUTS[layout]
        src = {"path": files[name], **fields}
        if name != "pairs_text":
            src["chat_template"] = files["template"] if template == "file" else template
        return src
    src: dict[str, Any] = {"path": files[layout], **LAYOUT_FIELDS[layout]}
    if "messages_field" in src:
        src["chat_template"] = files["template"] if template == "file" else template
    return src


def run_tree(row: dict, model: str, files: dict[str, str], out_dir: str) -> dict[str, Any]:
    """The run file of one matrix row (switch -> value), as a YAML tree."""
    data: dict[str, Any] = {"max_seq_len": 256 if row["layout"] == "tools" else 64,  # schemas
                            "packing": row["packing"],
                            "cache_dir": os.path.join(out_dir, "cache")}
    objective = row.get("objective", "sft")
    first = source(row["layout"], files, row["template"], objective)
    if row["sources"] == "mix":
        other = "messages" if row["layout"] != "messages" else "prompt_response"
        data["mix"] = [{**first, "weight": 2.0},
                       {**source(other, files, row["template"] or "chatml"), "weight": 1.0}]
    else:
        data.update(first)
    train: dict[str, Any] = {"micro_batch_size": 2, "lr": 1.0e-3}
    if objective != "sft":
        train["objective"] = objective
    if row["steps"] == "max_steps":
        train["max_steps"] = 4
    else:
        train["epochs"] = 1
        if row["steps"] == "epochs_every":
            train.update(eval_every="epoch", checkpoint_every="epoch")
            data["eval_fraction"] = 0.1
    if row["watchdog"]:
        train["watchdog"] = {"max_loss": 50.0, "patience": 2}
    if row.get("longseq") == "sp":
        train["sequence_parallel"] = 2
    elif row.get("longseq") == "tiled":
        train.update(tiled_loss=True, tiled_mlp=True, activation_offload=True)
    model_sec: dict[str, Any] = {"path": model, "dtype": "fp32" if row["zero"] == 0 else "bf16"}
    if row["tokens"]:
        model_sec["special_tokens"] = ["<|tool|>"]
        model_sec["add_tokens"] = ["tokyo"]
    freeze: dict[str, Any] = {"policy": row["freeze"]}
    if row["freeze"] == "patterns":  # quantized linear weights cannot train: the norms can
        freeze["train"] = [r"layers\.1\.mlp" if row["quant"] == "none" else r"layers\.1\..*norm"]
    if row["freeze"] == "lora" and row["tokens"]:
        freeze["also_train"] = ["embeddings", "lm_head"]
    ds: dict[str, Any] = {"zero_stage": row["zero"], "offload_optimizer": row["offload"]}
    tree: dict[str, Any] = {"name": "m", "model": model_sec, "freeze": freeze, "data": data,
                            "train": train, "deepspeed": ds,
                            "cluster": {"nodes": 1, "gpus_per_node": 2, "gpu_memory": "80GiB",
                                        "mem": "64G", "time": "01:00:00"},
                            "output": {"dir": os.path.join(out_dir, "run"),
                                       "report_to": list(row["report_to"])}}
    if row.get("private"):
        tree["output"]["private"] = True
    if row.get("gpu_type"):
        tree["cluster"]["gpu_type"] = row["gpu_type"]
        del tree["cluster"]["gpu_memory"]  # the card's memory, from the table
    if row.get("from_shell"):
        tree["cluster"]["env_from_shell"] = [FROM_SHELL]
    if row.get("time"):
        tree["cluster"]["time"] = row["time"]
    if row.get("after"):
        tree["cluster"]["after"] = list(row["after"])
    if row.get("container"):
        tree["cluster"]["container"] = CONTAINER_IMAGES[row["container"]]
        tree["cluster"]["container_runtime"] = row["container"]
    if row.get("min_nodes"):  # may continue on 1 of 2 nodes (resumes through a universal checkpoint)
        tree["cluster"].update(nodes=2, min_nodes=1)
    if row["quant"] != "none":
        tree["quantization"] = {"mode": row["quant"]}
        if row["quant"] == "4bit" and row["zero"] == 3:  # what validate asks for
            tree["quantization"]["storage_dtype"] = model_sec["dtype"]
    if row["ds_file"]:
        path = os.path.join(out_dir, "ds.json")
        body: dict[str, Any] = {"train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                "zero_optimization": {"stage": row["zero"], "overlap_comm": True,
                                                      "reduce_bucket_size": "auto"}}
        if row["offload"] != "none":
            body["zero_optimization"]["offload_optimizer"] = {"device": row["offload"]}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(body, fh)
        ds["config_file"] = path
    return tree


def levels() -> dict[str, list[Any]]:
    """The feature switches of the matrix; the values of schema fields come from the schema."""
    return {
        "steps": ["max_steps", "epochs", "epochs_every"],
        "sources": ["single", "mix"],
        "layout": list(LAYOUT_FIELDS),
        "packing": [False, True],
        "template": [None, "chatml", "file"],
        "tokens": [False, True],
        "freeze": schema_choices("freeze.policy"),
        "quant": schema_choices("quantization.mode"),
        "zero": schema_choices("deepspeed.zero_stage"),
        "offload": [v for v in schema_choices("deepspeed.offload_optimizer") if v != "nvme"],
        "ds_file": [False, True],
        "report_to": [[]] + [[t] for t in schema_choices("output.report_to")],
        "watchdog": [False, True],
        "private": [False, True],                                # output.private
        "gpu_type": [None, "A100-80GB", "H100-SXM"],             # cluster.gpu_type
        "from_shell": [False, True],                             # cluster.env_from_shell
        "objective": ["sft", *PREFERENCE],                       # train.objective
        "time": [None, "auto"],                                  # cluster.time (None: 01:00:00)
        "longseq": ["none", "sp", "tiled"],  # train.sequence_parallel 2 / tiled loss, MLP, offload
        "after": [[], ["4242"]],                                 # cluster.after
        "container": [None] + schema_choices("cluster.container_runtime"),  # cluster.container
        "sweep": [False, True],                                  # ftlaunch slurm --sweep
        "min_nodes": [False, True],                              # cluster.min_nodes
    }


# the keys the switches set: a renamed or removed key fails the matrix test, not silently
SWITCH_KEYS = ("train.max_steps", "train.epochs", "train.eval_every", "train.checkpoint_every",
               "data.mix", "data.path", "data.messages_field", "data.prompt_field", "data.packing",
               "data.chat_template", "model.special_tokens", "model.add_tokens", "freeze.policy",
               "quantization.mode", "deepspeed.zero_stage", "deepspeed.offload_optimizer",
               "deepspeed.config_file", "output.report_to", "train.watchdog.max_loss",
               "output.private", "cluster.gpu_type", "cluster.env_from_shell", "train.objective",
               "cluster.time", "train.sequence_parallel", "train.tiled_loss", "train.tiled_mlp",
               "train.activation_offload", "cluster.after", "cluster.container",
               "cluster.container_runtime", "cluster.min_nodes")
FROM_SHELL = "WANDB_API_KEY"  # the variable the from_shell rows take from the submitting shell
CONTAINER_IMAGES = {"apptainer": "/images/train run.sif", "singularity": "docker://pytorch/pytorch:2.4",
                    "pyxis": "nvcr.io#nvidia/pytorch:24.01-py3"}
# what the sweep rows add to `ftlaunch slurm`, and the run directories it makes (beside run/)
SWEEP = ["--sweep", "train.lr=1e-3,2e-3"]
SWEEP_DIRS = ["run_lr-1e-3", "run_lr-2e-3"]



def chat_model(d: str) -> str:
    """A tiny model whose tokenizer has ChatML's markers as special tokens and its own chat
    template (the `chat_template: null` case), under d (built once)."""
    import tiny_recipe
    from transformers import AutoTokenizer
    out = os.path.join(d, "chat-model")
    if os.path.isdir(out):
        return out
    corpus = tiny_recipe.sentences(200) + [f"{q} {a}" for q, a in CHATS] * 20
    tok_dir = tiny_recipe.build_tokenizer(os.path.join(d, "chat-tokenizer"), corpus, 320,
                                          extra_special=("<|im_start|>", "<|im_end|>"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tiny_recipe.build_model(out, len(tok))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------ peers' configs (convert)
def peer_levels() -> dict[str, list[Any]]:
    """The switches of the converted-config matrix: what users bring from Axolotl and
    LLaMA-Factory on the first day."""
    return {"peer": ["axolotl", "llamafactory"], "datasets": [1, 2], "steps": ["epochs", "max_steps"],
            "tuning": ["full", "lora", "qlora", "freeze"], "tokens": [False, True],
            "deepspeed": [None, 2, 3], "report_to": [None, "tensorboard", "wandb"],
            "empty_keys": [False, True]}


def peer_allowed(a: str, va: Any, b: str, vb: Any) -> bool:
    # LLaMA-Factory's `freeze` tuning has no Axolotl name (Axolotl: unfrozen_parameters)
    return not ((a, b) == ("peer", "tuning") and (va, vb) == ("axolotl", "freeze"))


def write_peer(row: dict, folder: str, model_rel: str) -> str:
    """A peer config written as that project's docs show it, with paths relative to its own
    folder (data in folder/data, a DeepSpeed JSON beside it); returns the config's path."""
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    files = write_data(os.path.join(folder, "data"), n=24)
    cfg: dict[str, Any] = {}
    if row["deepspeed"] is not None:
        with open(os.path.join(folder, "ds.json"), "w", encoding="utf-8") as fh:
            json.dump({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                       "zero_optimization": {"stage": row["deepspeed"]}, "bf16": {"enabled": "auto"}}, fh)
    ax = row["peer"] == "axolotl"
    names = ["messages", "prompt_response"][:row["datasets"]]
    if ax:
        cfg["base_model"] = model_rel
        cfg["datasets"] = [{"path": os.path.relpath(files[n], folder), "type": "chat_template",
                            "field_messages": "messages"} if n == "messages" else
                           {"path": os.path.relpath(files["sharegpt"], folder), "type": "chat_template",
                            "field_messages": "conversations"} for n in names]
        cfg.update(chat_template="chatml", sequence_len=64, sample_packing=False, micro_batch_size=2,
                   gradient_accumulation_steps=1, learning_rate=1e-3, bf16="auto",
                   output_dir="./outputs/out")
        cfg["num_epochs" if row["steps"] == "epochs" else "max_steps"] = 1 if row["steps"] == "epochs" else 4
        if row["tuning"] in ("lora", "qlora"):
            cfg.update(adapter=row["tuning"], lora_r=8, lora_alpha=16, lora_dropout=0.05,
                       lora_target_linear=True)
            if row["tuning"] == "qlora":
                cfg["load_in_4bit"] = True
        if row["tokens"]:
            cfg["tokens"] = ["<|tool|>"]
            cfg["special_tokens"] = {"pad_token": "<pad>"}
        if row["deepspeed"] is not None:
            cfg["deepspeed"] = "ds.json"
        if row["report_to"] == "wandb":
            cfg["wandb_project"] = "first-day"
        elif row["report_to"] == "tensorboard":
            cfg["use_tensorboard"] = True
        if row["empty_keys"]:  # as Axolotl's own example files have them
            cfg.update(unfrozen_parameters=None, wandb_entity=None, eval_steps=None,
                       lora_model_dir=None, special_tokens=cfg.get("special_tokens"), tokens=cfg.get("tokens"))
    else:
        info = {"chat": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt",
                         "columns": {"messages": "conversations"}},
                "qa": {"file_name": "prompt_response.jsonl",
                       "columns": {"prompt": "prompt", "response": "response"}}}
        with open(os.path.join(folder, "data", "dataset_info.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        cfg.update(model_name_or_path=model_rel, stage="sft", do_train=True,
                   finetuning_type={"qlora": "lora"}.get(row["tuning"], row["tuning"]),
                   dataset=",".join(["chat", "qa"][:row["datasets"]]), dataset_dir="data",
                   template="qwen", cutoff_len=64, per_device_train_batch_size=2,
                   gradient_accumulation_steps=1, learning_rate=1e-3, bf16=True,
                   output_dir="saves/out")
        cfg["num_train_epochs" if row["steps"] == "epochs" else "max_steps"] = 1.0 if row["steps"] == "epochs" else 4
        if row["tuning"] in ("lora", "qlora"):
            cfg.update(lora_rank=8, lora_target="all")
        if row["tuning"] == "qlora":
            cfg["quantization_bit"] = 4
        if row["tuning"] == "freeze":
            cfg["freeze_trainable_layers"] = 1
        if row["tokens"]:
            cfg["new_special_tokens"] = "<|tool|>"
        if row["deepspeed"] is not None:
            cfg["deepspeed"] = "ds.json"
        if row["report_to"]:
            cfg["report_to"] = row["report_to"]
        if row["empty_keys"]:
            cfg.update(eval_dataset=None, resume_from_checkpoint=None, lora_target=cfg.get("lora_target"))
    path = os.path.join(folder, f"{row['peer']}.yaml")
    import yaml
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path


# ------------------------------------------------------------------ the run subset
def run_levels() -> dict[str, list[Any]]:
    """The smaller set that goes through the ranks: run, export, load, status."""
    return {"freeze": ["full", "lora"], "zero": [1, 3], "tokens": [False, True],
            "data": ["messages", "tools+mix"], "steps": ["max_steps", "epochs"]}


def run_row(row: dict) -> dict:
    """A matrix row (every switch of `levels`) from a run-subset row: the rest at their simplest."""
    layout, _, mix = row["data"].partition("+")
    return {"steps": row["steps"], "sources": mix or "single", "layout": layout, "packing": False,
            "template": "chatml", "tokens": row["tokens"], "freeze": row["freeze"], "quant": "none",
            "zero": row["zero"], "offload": "none", "ds_file": False, "report_to": [],
            "watchdog": False}
