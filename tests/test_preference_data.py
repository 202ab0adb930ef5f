"""Preference data as people have it, checked on the login node and read by the ranks' data
path; the validate rules of train.objective; `ftlaunch data` on pairs; `convert` of the peers'
DPO settings."""
from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from launcher import cli
from launcher.config import runfile
from launcher.data.chat import IGNORE


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TEXT = [{"prompt": f"the cat sees {i}", "chosen": " in the park.", "rejected": " at home."}
        for i in range(6)]
TRL_CONV = [{"chosen": [{"role": "user", "content": f"q {i}"},
                        {"role": "assistant", "content": "in the park"}],
             "rejected": [{"role": "user", "content": f"q {i}"},
                          {"role": "assistant", "content": "at home"}]} for i in range(6)]
TRL_PROMPT = [{"prompt": [{"role": "user", "content": f"q {i}"}],
               "chosen": [{"role": "assistant", "content": "in the park"}],
               "rejected": [{"role": "assistant", "content": "at home"}]} for i in range(6)]
LF_SHAREGPT = [{"conversations": [{"from": "human", "value": f"q {i}"}],
                "chosen": {"from": "gpt", "value": "in the park"},
                "rejected": {"from": "gpt", "value": "at home"}} for i in range(6)]
AXOLOTL = [{"messages": [{"role": "user", "content": f"q {i}"}],
            "chosen": {"role": "assistant", "content": "in the park"},
            "rejected": {"role": "assistant", "content": "at home"}} for i in range(6)]
CHATML_TOKENS = '["<|im_start|>", "<|im_end|>"]'


def run_file(write_run, tiny, data: str, extra: str = "", objective: str = "dpo") -> str:
    return write_run(f"""\
        name: pairs
        model: {{path: {tiny['model']}, dtype: fp32, special_tokens: {CHATML_TOKENS}}}
        data: {{path: {data}, max_seq_len: 48 {extra}}}
        train: {{max_steps: 2, device: cpu, objective: {objective}}}
        cluster: {{gpus_per_node: 2}}
        """)


def load_pairs(path: str, overrides=()):
    from launcher.rank import inputs
    cfg = runfile.load(path, list(overrides))
    tok = inputs.load_tokenizer(cfg)
    return inputs.load_data(cfg, tok), tok


def answers(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


LAYOUTS = {"text": (TEXT, ", prompt_field: prompt"),
           "trl_implicit_prompt": (TRL_CONV, ", chat_template: chatml"),
           "trl_explicit_prompt": (TRL_PROMPT, ", prompt_field: prompt, chat_template: chatml"),
           "llamafactory_sharegpt": (LF_SHAREGPT, ", messages_field: conversations, "
                                     "chat_template: chatml"),
           "axolotl_chat_template": (AXOLOTL, ", messages_field: messages, chat_template: chatml")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_pairs_trained_on_the_answers_only(tiny, write_run, tmp_path, layout):
    rows, extra = LAYOUTS[layout]
    path = run_file(write_run, tiny, write_rows(tmp_path / "p.jsonl", rows), extra)
    assert cli.main(["validate", path]) == 0
    splits, tok = load_pairs(path)
    assert len(splits.train) == 6
    pair = splits.train[0]
    c, r = pair["chosen"], pair["rejected"]
    want = ("in the park", "at home")
    assert want[0] in answers(tok, c) and want[1] in answers(tok, r)
    assert "q 0" not in answers(tok, c) and "cat" not in answers(tok, c)  # the prompt: no loss
    k = next(i for i, x in enumerate(c["labels"]) if x != IGNORE)
    assert c["input_ids"][:k] == r["input_ids"][:k]  # one prompt, both answers after it
    if layout != "text":
        assert tok.decode(c["input_ids"][:k]).endswith("<|im_start|>assistant\n")


def test_truncation_keeps_the_prompt_end_and_both_answers_or_drops(tiny, write_run, tmp_path):
    long = [{"prompt": " ".join(["the cat sees the red ball"] * 12) + " END",
             "chosen": " in the park.", "rejected": " at home."},
            {"prompt": "short", "chosen": " x" * 60, "rejected": " y"}] + TEXT[:2]
    path = run_file(write_run, tiny, write_rows(tmp_path / "p.jsonl", long), ", prompt_field: prompt")
    warnings = []
    from launcher.rank import inputs
    from launcher.data.pairs import load_pairs as load
    cfg = runfile.load(path)
    tok = inputs.load_tokenizer(cfg)
    splits = load(cfg, tok, warn=warnings.append)
    assert len(splits.train) == 3 * 2  # the pair with a 60-token answer is dropped
    assert any("dropped 1 of 4 train pairs" in w for w in warnings), warnings
    assert any("1 of 4 train pairs are longer" in w for w in warnings), warnings
    c, r = splits.train[0], splits.train[1]
    assert len(c["input_ids"]) == 48
    text = tok.decode(c["input_ids"])
    assert "END in the park." in text and answers(tok, r).startswith(" at home")


def test_cut_pair_keeps_bos_and_the_prompt_end():
    from launcher.data.pairs import cut_pair
    prompt, c, r = [1, 10, 11, 12, 13, 14], [20, 21, 2], [30, 2]
    ci, cl, ri, rl = cut_pair(prompt, c, list(c), r, list(r), max_len=6, head=1)
    assert ci == [1, 13, 14, 20, 21, 2] and ri == [1, 13, 14, 30, 2]  # BOS + the prompt's end
    assert cl == [IGNORE] * 3 + c and rl == [IGNORE] * 3 + r
    assert cut_pair(prompt, [5] * 6, [5] * 6, r, list(r), max_len=6, head=1) is None


def test_data_command_shows_pairs_and_their_trained_spans(tiny, write_run, tmp_path, capsys):
    path = run_file(write_run, tiny, write_rows(tmp_path / "p.jsonl", TEXT), ", prompt_field: prompt")
    assert cli.main(["data", path, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "pairs: 6; mean tokens chosen" in out
    assert "--- pair 0 chosen" in out and "--- pair 0 rejected" in out
    assert "the cat sees 0[[ in the park.</s>]]" in out and "[[ at home.</s>]]" in out


@pytest.mark.parametrize("extra, objective, key, words", [
    (", prompt_field: prompt, packing: true", "dpo", "data.packing", "packing would merge"),
    (", prompt_field: prompt, train_on: all", "orpo", "data.train_on", "scores the answers only"),
    (", prompt_field: prompt, response_field: chosen", "dpo", "data.response_field",
     "reads the answers from data.chosen_field"),
    (", prompt_field: prompt, chosen_field: rejected", "ipo", "data.rejected_field",
     "the same column as data.chosen_field"),
    (", prompt_field: nope", "dpo", "data.prompt_field", "has no column 'nope'"),
])
def test_validate_refuses_what_pairs_cannot_use(tiny, write_run, tmp_path, capsys, extra,
                                                objective, key, words):
    path = run_file(write_run, tiny, write_rows(tmp_path / "p.jsonl", TEXT), extra, objective)
    assert cli.main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert key in err and words in err, err


@pytest.mark.parametrize("overrides, words", [
    (["train.reference=adapters_off"], "adapters_off uses the base under LoRA adapters"),
    (["train.objective=simpo", "train.reference=precomputed"], "simpo uses no reference model"),
])
def test_validate_refuses_a_reference_that_cannot_work(tiny, write_run, tmp_path, capsys,
                                                       overrides, words):
    path = run_file(write_run, tiny, write_rows(tmp_path / "p.jsonl", TEXT), ", prompt_field: prompt")
    assert cli.main(["validate", path, *overrides]) == 2
    err = capsys.readouterr().err
    assert "train.reference" in err and words in err, err


def test_validate_names_rows_that_are_not_pairs(tiny, write_run, tmp_path, capsys):
    rows = TEXT[:2] + [{"prompt": "p", "chosen": "", "rejected": "x"}] * 3
    path = run_file(write_run, tiny, write_rows(tmp_path / "p.jsonl", rows), ", prompt_field: prompt")
    assert cli.main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "3 of the first 5 rows" in err and "'chosen' is missing or blank" in err, err


# ------------------------------------------------------------------ convert
def test_axolotl_dpo_lora_converts_to_a_valid_dpo_run(tiny, tmp_path, capsys):
    data = write_rows(tmp_path / "pairs.jsonl", AXOLOTL)
    src = tmp_path / "ax.yaml"
    src.write_text(textwrap.dedent(f"""\
        base_model: {tiny['model']}
        rl: dpo
        rl_beta: 0.2
        dpo_label_smoothing: 0.1
        adapter: lora
        lora_r: 8
        lora_target_linear: true
        chat_template: chatml
        datasets:
          - path: {data}
            type: chat_template.default
            field_messages: messages
            field_chosen: chosen
            field_rejected: rejected
        sequence_len: 64
        micro_batch_size: 2
        max_steps: 5
        bf16: true
        special_tokens: {{pad_token: "<pad>"}}
        tokens: {CHATML_TOKENS}
        """))
    out = tmp_path / "run.yaml"
    assert cli.main(["convert", str(src), "-o", str(out)]) == 0
    report = capsys.readouterr().out
    run = yaml.safe_load(out.read_text())
    t, d = run["train"], run["data"]
    assert (t["objective"], t["beta"], t["label_smoothing"]) == ("dpo", 0.2, 0.1)
    assert t["reference"] == "adapters_off" and "(reference under LoRA)" in report
    assert (d["messages_field"], d["chosen_field"], d["rejected_field"]) == (
        "messages", "chosen", "rejected")
    cfg, problems = runfile.parse(out.read_text(), [], source=str(out), base_dir=str(tmp_path))
    assert problems == [] and cfg.train.objective == "dpo"


@pytest.mark.parametrize("loss, objective, key", [("sigmoid", "dpo", "beta"),
                                                  ("orpo", "orpo", "orpo_lambda"),
                                                  ("simpo", "simpo", "beta")])
def test_llamafactory_stage_dpo_carries_pref_settings(tiny, tmp_path, capsys, loss, objective, key):
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "pref.jsonl", LF_SHAREGPT)
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"pref": {
        "file_name": "pref.jsonl", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}))
    src = tmp_path / "lf.yaml"
    src.write_text(textwrap.dedent(f"""\
        model_name_or_path: {tiny['model']}
        stage: dpo
        do_train: true
        finetuning_type: full
        pref_beta: 0.3
        pref_loss: {loss}
        simpo_gamma: 0.7
        pref_ftx: 0
        dataset: pref
        template: qwen
        cutoff_len: 64
        per_device_train_batch_size: 1
        max_steps: 3
        """))
    out = tmp_path / "run.yaml"
    assert cli.main(["convert", str(src), "-o", str(out)]) == 0
    run = yaml.safe_load(out.read_text())
    t, d = run["train"], run["data"]
    assert t["objective"] == objective and t[key] == 0.3 and t["simpo_gamma"] == 0.7
    assert (d["messages_field"], d["chosen_field"]) == ("conversations", "chosen")
    cfg, problems = runfile.parse(out.read_text(), [f"model.special_tokens={CHATML_TOKENS}"],
                                  source=str(out), base_dir=str(tmp_path))
    assert problems == [], problems
