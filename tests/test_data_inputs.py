"""Every input checked by `validate` on the login node (launcher/checks/input_checks.py): data files,
first rows, columns and types, model weights against config.json, tokenizer, chat template,
bad rows; each refused with its key and fix, in a process where torch, transformers, datasets
(and the rest of the heavy packages) cannot be imported."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
from test_light_imports import BLOCKER, HEAVY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]


def safetensors(path, tensors: dict[str, list[int]]) -> None:
    header, at = {}, 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + n]}
        at += n
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(at))


def model(tmp_path, name="model", *, weights=True, tokenizer=True, template=False, vocab=8):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab,
                                               "hidden_size": 4, "num_hidden_layers": 2,
                                               "max_position_embeddings": 64}))
    if weights:
        safetensors(d / "model.safetensors", {"model.embed_tokens.weight": [8, 4],
                                              "model.layers.0.mlp.weight": [4, 4],
                                              "model.layers.1.mlp.weight": [4, 4]})
    if tokenizer:
        (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}},
                                                      "added_tokens": [{"id": 7}]}))
        cfg = {"chat_template": "{{ messages }}"} if template else {}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def cases(tmp_path) -> dict[str, tuple[str, list[str]]]:
    """name -> (run file text, overrides)."""
    good = model(tmp_path)
    text = jsonl(tmp_path / "text.jsonl", [{"text": "a b"}] * 3)
    chat = jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}] * 3)
    share = jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "x"},
                                                                {"from": "gpt", "value": "y"}]}])
    bad_json = jsonl(tmp_path / "bad.jsonl", [{"text": "a"}] * 5 + ['{"text": oops'] + [{"text": "b"}])
    roles = jsonl(tmp_path / "roles.jsonl", [{"messages": CONV}, {"messages": [
        {"role": "wizard", "content": "x"}]}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    qa = jsonl(tmp_path / "qa.jsonl", [{"q": ["list"], "a": "x"}])
    only_config = model(tmp_path, "only_config", weights=False, tokenizer=False)
    no_tok = model(tmp_path, "no_tok", tokenizer=False)
    empty_tok = model(tmp_path, "empty_tok", tokenizer=False)
    (tmp_path / "empty_tok" / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    big_tok = model(tmp_path, "big_tok", vocab=4)
    sharded = model(tmp_path, "sharded", weights=False)
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}))
    safetensors(tmp_path / "sharded" / "model-00001-of-00002.safetensors", {"a": [2]})
    wrong = model(tmp_path, "wrong", weights=False)
    safetensors(tmp_path / "wrong" / "model.safetensors", {"model.embed_tokens.weight": [9, 4],
                                                          "model.layers.0.mlp.weight": [4, 4]})
    templ = model(tmp_path, "templ", template=True)
    sys_chat = jsonl(tmp_path / "sys.jsonl", [{"messages": [{"role": "system", "content": "be brief"}]
                                               + CONV}] * 3)
    no_system = tmp_path / "gemma.jinja"  # as Gemma's template: no system role
    no_system.write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    tools = jsonl(tmp_path / "tools.jsonl", [{"tools": '[{"name": "add"}]', "conversations": [
        {"from": "human", "value": "x"}, {"from": "function_call", "value": "{}"},
        {"from": "observation", "value": "2"}, {"from": "gpt", "value": "y"}]}])
    alpaca = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "add", "input": "2 3", "output": "5"}])

    def run(m, data):
        return (f"name: t\nmodel: {{path: {m}}}\ndata: {{{data}, max_seq_len: 16}}\n"
                "train: {max_steps: 1, device: cpu}\n")
    return {
        "good": (run(good, f"path: {text}"), []),
        "good_chat": (run(good, f"path: {chat}, messages_field: messages, chat_template: chatml")
                      .replace("model: {", "model: {special_tokens: ['<|im_start|>', '<|im_end|>'], "), []),
        "chatml_no_markers": (run(good, f"path: {chat}, messages_field: messages, "
                                        "chat_template: chatml"), []),
        "system_refused": (run(good, f"path: {sys_chat}, messages_field: messages, "
                                     f"chat_template: {no_system}"), []),
        "tools_ignored": (run(templ, f"path: {tools}, messages_field: conversations, "
                                    "tools_field: tools"), []),
        "alpaca_input_missing": (run(good, f"path: {alpaca}, prompt_field: instruction, "
                                           "response_field: output, input_field: inputs"), []),
        "good_sharegpt": (run(templ, f"path: {share}, messages_field: conversations"), []),
        "good_bad_rows_allowed": (run(good, f"path: {bad_json}, max_bad_rows: 1"), []),
        "chat_under_text": (run(good, f"path: {chat}"), []),
        "chat_as_text_field": (run(good, f"path: {chat}, text_field: messages"), []),
        "only_config": (run(only_config, f"path: {text}"), []),
        "no_tokenizer": (run(no_tok, f"path: {text}"), []),
        "empty_tokenizer": (run(empty_tok, f"path: {text}"), []),
        "tokenizer_too_big": (run(big_tok, f"path: {text}"), []),
        "missing_shard": (run(sharded, f"path: {text}"), []),
        "wrong_shapes": (run(wrong, f"path: {text}"), []),
        "no_template": (run(good, f"path: {chat}, messages_field: messages"), []),
        "template_file_missing": (run(good, f"path: {chat}, messages_field: messages, "
                                            f"chat_template: {tmp_path}/nope.jinja"), []),
        "empty_file": (run(good, f"path: {empty}"), []),
        "bad_json": (run(good, f"path: {bad_json}"), []),
        "unknown_role": (run(good, f"path: {roles}, messages_field: messages, chat_template: chatml"), []),
        "prompt_not_text": (run(good, f"path: {qa}, prompt_field: q, response_field: a"), []),
        "mix_missing_column": (run(good, f"mix: [{{path: {text}, weight: 1}}, {{path: {chat}, "
                                         "weight: 3}]"), []),
    }


SCRIPT = """
import json, sys
from launcher.config import runfile
out = {}
for name, (text, over) in json.loads(sys.argv[1]).items():
    _, problems = runfile.parse(text, over, source="run.yaml", base_dir=sys.argv[2], inputs=True)
    out[name] = [[p.key, p.message, p.fix] for p in problems]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"problems": out, "heavy": heavy}))
""" % (set(HEAVY),)

EXPECT = {  # name -> (key, in the message, in the fix)
    "chat_under_text": ("data.text_field", "has no column 'text'", "messages_field: messages"),
    "chat_as_text_field": ("data.path", "column 'messages' holds list values",
                           "data.max_bad_rows"),
    "only_config": ("model.path", "holds no weights", "complete save_pretrained folder"),
    "no_tokenizer": ("model.path", "holds no tokenizer", "model.tokenizer"),
    "empty_tokenizer": ("model.path", "empty vocabulary", "save the tokenizer again"),
    "tokenizer_too_big": ("model.path", "ids up to 7, the model's vocab_size is 4",
                          "the model's own tokenizer"),
    "missing_shard": ("model.path", "model-00002-of-00002.safetensors", "every shard"),
    "wrong_shapes": ("model.path", "has shape [9, 4], but config.json says vocab_size 8",
                     "copy the folder again"),
    "no_template": ("data.chat_template", "has none", "data.chat_template: chatml"),
    "template_file_missing": ("data.chat_template", "no such chat template file", "Jinja file"),
    "chatml_no_markers": ("data.chat_template", "chatml marks turns with <|im_start|> and "
                          "<|im_end|>, which the tokenizer", "model.special_tokens"),
    "system_refused": ("data.chat_template", "the chat template refuses 3 of the first 3 rows",
                       "takes no system message"),
    "tools_ignored": ("data.tools_field", "never reads `tools`", "chatml"),
    "alpaca_input_missing": ("data.input_field", "has no column 'inputs'", "set data.input_field"),
    "empty_file": ("data.path", "is empty (0 bytes)", "a file with examples"),
    "bad_json": ("data.path", "row 6: not valid JSON", "data.max_bad_rows"),
    "unknown_role": ("data.path", "row 2: 'messages' message 1 has role 'wizard'",
                     "data.max_bad_rows"),
    "prompt_not_text": ("data.path", "column 'q' holds list values", "fix those rows"),
    "mix_missing_column": ("data.mix[1].text_field", "has no column 'text'",
                           "messages_field: messages"),
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "block").mkdir()
    (tmp / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp / "block"), ROOT]))
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases(tmp)), str(tmp)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def test_the_checks_import_nothing_heavy(checked):
    assert checked["heavy"] == []


@pytest.mark.parametrize("name", ["good", "good_chat", "good_sharegpt", "good_bad_rows_allowed"])
def test_good_inputs_pass(checked, name):
    assert checked["problems"][name] == []


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_each_bad_input_is_refused_with_key_and_fix(checked, name):
    key, message, fix = EXPECT[name]
    found = [p for p in checked["problems"][name] if p[0] == key]
    assert found, checked["problems"][name]
    assert any(message in p[1] and fix in p[2] for p in found), found


def test_plan_and_ds_config_do_not_read_the_inputs(tmp_path):
    """Without inputs=True (plan, ds-config) a config.json alone is enough."""
    from launcher.config import runfile
    text, over = cases(tmp_path)["only_config"]
    assert runfile.parse(text, over, base_dir=str(tmp_path))[1] == []
