"""Chat data (messages and ShareGPT rows, templates, assistant-only masks), bad rows, mixtures
by weight, and neat packing (a packed row's loss equals its documents' losses)."""
from __future__ import annotations

import json

import pytest

from launcher import data
from launcher.config.schema import DataConfig, MixSource, ModelConfig, RunConfig, TrainConfig
from launcher.data import chat
from launcher.config.errors import ConfigError

CONVS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 plus 3?"},
     {"role": "assistant", "content": "5."}, {"role": "user", "content": "and 1 plus 1?"},
     {"role": "assistant", "content": "2."}],
    [{"role": "user", "content": "the cat sees the river?"},
     {"role": "assistant", "content": "yes, the cat sees the river."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a dog finds a song."},
     {"role": "tool", "content": "{\"ok\": true}"}, {"role": "assistant", "content": "ok."}],
]
NO_MARKERS = chat.CHATML.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
# a Zephyr-like template with generation markers, saved as the tokenizer's own
ZEPHYR = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
          "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
          "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tok(tiny, tmp_path_factory):
    """The tiny tokenizer with ChatML's two special tokens and a marked template of its own."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ZEPHYR
    folder = str(tmp_path_factory.mktemp("chat_tok"))
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def cfg(path=None, **kw) -> RunConfig:
    return RunConfig(name="t", model=ModelConfig(path="/nonexistent-model"),
                     data=DataConfig(path=None if path is None else str(path), **kw),
                     train=TrainConfig(max_steps=1, seed=7))


def load(tok, path=None, **kw) -> data.Splits:
    return data.load(cfg(path, **kw), tok, warn=lambda m: None)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def expected_mask(tok, conv, template) -> tuple[list[int], list[int]]:
    """transformers' own answer: apply_chat_template's assistant mask (generation markers)."""
    out = tok.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return ids, [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("template", ["tokenizer", "chatml", "jinja-file"])
def test_masks_are_exactly_the_assistant_tokens(chat_tok, tmp_path, template):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    if template == "jinja-file":  # chatml without markers: rendered turn by turn
        (tmp_path / "t.jinja").write_text(NO_MARKERS)
        value, oracle = str(tmp_path / "t.jinja"), chat.CHATML
    else:
        value = None if template == "tokenizer" else "chatml"
        oracle = ZEPHYR if template == "tokenizer" else chat.CHATML
    splits = load(chat_tok, path, messages_field="messages", chat_template=value, max_seq_len=256)
    end = "</s>" if template == "tokenizer" else "<|im_end|>"
    for ex, conv in zip(splits.train, CONVS):
        assert (ex["input_ids"], ex["labels"]) == expected_mask(chat_tok, conv, oracle)
        # the trained runs decode to each assistant turn and its end token, nothing else
        runs, cur = [], []
        for t in ex["labels"] + [-100]:
            if t == -100 and cur:
                runs.append(chat_tok.decode(cur))
                cur = []
            elif t != -100:
                cur.append(t)
        assert runs == [m["content"] + end for m in conv if m["role"] == "assistant"]


def test_sharegpt_rows_give_the_same_tokens_as_messages(chat_tok, tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    share = [[{"from": names[m["role"]], "value": m["content"]} for m in c] for c in CONVS]
    a = load(chat_tok, write_jsonl(tmp_path / "m.jsonl", [{"messages": c} for c in CONVS]),
             messages_field="messages", chat_template="chatml").train
    b = load(chat_tok, write_jsonl(tmp_path / "s.jsonl", [{"conversations": c} for c in share]),
             messages_field="conversations", chat_template="chatml").train
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]


def test_train_on_all_and_missing_template(chat_tok, tiny, tmp_path):
    from transformers import AutoTokenizer
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    ex = load(chat_tok, path, messages_field="messages", chat_template="chatml",
              train_on="all").train[1]
    assert ex["labels"] == ex["input_ids"]
    plain = AutoTokenizer.from_pretrained(tiny["tokenizer"])  # no chat template
    with pytest.raises(ConfigError, match=r"(?s)data.chat_template: the tokenizer has no chat "
                       r"template.*set data.chat_template: chatml"):
        load(plain, path, messages_field="messages")
    with pytest.raises(ConfigError, match=r"(?s)holds list values \(row 1\).*set "
                       r"data.messages_field: messages"):
        load(chat_tok, path, text_field="messages")


def test_bad_rows_are_named_and_limited(chat_tok, tmp_path):
    rows = [json.dumps({"messages": CONVS[i % 3]}) for i in range(20)]
    rows[13] = '{"messages": [ broken'
    rows[17] = json.dumps({"messages": [{"role": "wizard", "content": "x"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(rows) + "\n")
    kw = dict(messages_field="messages", chat_template="chatml")
    with pytest.raises(ConfigError, match=r"(?s)data.path: .*line 14 is not valid JSON.*"
                       r"data.max_bad_rows"):
        load(chat_tok, path, **kw)
    with pytest.raises(ConfigError, match=r"(?s)2 of 20 rows .*row 14: not valid JSON.*row 18: "
                       r"'messages' message 1 has role 'wizard'.*max_bad_rows"):
        load(chat_tok, path, max_bad_rows=1, **kw)
    seen: list[str] = []
    splits = data.load(cfg(path, max_bad_rows=0.1, **kw), chat_tok, warn=seen.append)
    assert len(splits.train) == 18
    assert [w for w in seen if "skipped" in w] == [w for w in seen if "skipped 2 of 20 rows" in w
                                                   and "row 14: not valid JSON" in w and "row 18" in w]
    assert len([w for w in seen if "skipped" in w]) == 1


# ----------------------------------------------------------------------------- mixtures
def test_mix_draws_by_weight_and_resumes_identically(tok_plain, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"the cat {i}."} for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"a dog {i}."} for i in range(1700)])
    c = cfg(mix=[MixSource(path=a, weight=0.25), MixSource(path=b, weight=0.75)], max_seq_len=16)
    splits = data.load(c, tok_plain, warn=lambda m: None)
    mix = splits.mixture
    assert [s["examples"] for s in splits.stats["sources"]] == [300, 1700]
    drawn = [i for idx in _take(data.Sampler(len(splits.train), rank=0, world_size=1,
                                             micro_batch_size=4, seed=7, mixture=mix), 500)
             for i in idx]
    assert len(drawn) == 2000
    share_a = mix.shares(drawn)[0]
    assert abs(share_a - 0.25) < 0.03, share_a
    assert abs(splits.stats["sources"][0]["share"] - 0.25) < 0.03
    # a resume after 123 micro batches continues with the identical sequence
    s1 = data.Sampler(len(splits.train), rank=0, world_size=1, micro_batch_size=4, seed=7,
                      mixture=mix)
    it = iter(s1)
    for _ in range(123):
        next(it)
    s2 = data.Sampler(len(splits.train), rank=0, world_size=1, micro_batch_size=4, seed=7,
                      mixture=mix)
    s2.load_state_dict(s1.state_dict())
    assert _take(s2, 700) == _take(s1, 700)
    assert [i for idx in _take(s1, 0) for i in idx] == []
    # the examples themselves come from the right files
    texts = {tok_plain.decode(splits.train[i]["input_ids"][:-1]) for i in drawn[:50]}
    assert all(t.startswith(("the cat", "a dog")) for t in texts)


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_plain(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


# ----------------------------------------------------------------------------- neat packing
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_packed_rows_loss_equals_its_documents_losses(tok_plain, tiny, attn):
    """fp32, tolerance 1e-5 relative: the packed forward sees each document alone."""
    import torch
    from transformers import AutoModelForCausalLM
    splits = load(tok_plain, tiny["qa"], prompt_field="prompt", response_field="response",
                  max_seq_len=64, packing=True)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    rows = [splits.train[i] for i in range(2)]
    assert all(len(r["doc_lengths"]) >= 3 for r in rows)
    batch = data.collate(rows, 0, attn, torch.float32)
    assert batch["attention_mask"].dim() == 4
    with torch.no_grad():
        packed = model(**batch).loss.item()
        total, count = 0.0, 0
        for r in rows:
            at = 0
            for n in r["doc_lengths"]:
                doc = {"input_ids": r["input_ids"][at:at + n], "labels": r["labels"][at:at + n]}
                at += n
                k = sum(t != -100 for t in doc["labels"][1:])
                total += model(**data.collate([doc], 0)).loss.item() * k
                count += k
    assert packed == pytest.approx(total / count, rel=1e-5)
    # without the per-document attention the loss differs: the test can fail
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert abs(plain - packed) > 1e-3


def test_flash_attention_gets_one_flat_row_with_position_ids():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "doc_lengths": [2, 2]},
            {"input_ids": [9, 10, 11], "labels": [-100, 10, 11], "doc_lengths": [3]}]
    b = data.collate(rows, 0, "flash_attention_2")
    assert {k: v.tolist() if hasattr(v, "tolist") else v for k, v in b.items()} == {
        "input_ids": [[5, 6, 7, 8, 9, 10, 11]], "position_ids": [[0, 1, 0, 1, 0, 1, 2]],
        "labels": [[-100, 6, -100, 8, -100, 10, 11]],
        "cu_seq_lens_q": [0, 2, 4, 7], "cu_seq_lens_k": [0, 2, 4, 7],
        "max_length_q": 3, "max_length_k": 3}
    sd = data.collate(rows, 0, "sdpa")
    assert sd["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 2, 0]]
    assert sd["attention_mask"][0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0],
                                                         [0, 0, 1, 0], [0, 0, 1, 1]]


# ----------------------------------------------------------------------------- the cache
def test_tokenized_once_and_reused_until_the_data_changes(tok_plain, tmp_path):
    import threading
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"the cat {i}."} for i in range(50)])
    c = cfg(path, max_seq_len=16, packing=True, cache_dir=str(tmp_path / "cache"))
    results: list = []
    ranks = [threading.Thread(target=lambda: results.append(
        data.cached_load(c, tok_plain, warn=lambda m: None))) for _ in range(2)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join()
    assert sorted(s.stats["cache"] for s in results) == ["built", "reused"]
    plain = data.load(c, tok_plain, warn=lambda m: None)
    for s in results:
        assert [s.train[i] for i in range(len(s.train))] == \
            [plain.train[i] for i in range(len(plain.train))]
    assert data.cached_load(c, tok_plain).stats["cache"] == "reused"
    write_jsonl(tmp_path / "t.jsonl", [{"text": f"a dog {i}."} for i in range(51)])
    again = data.cached_load(c, tok_plain, warn=lambda m: None)
    assert again.stats["cache"] == "built" and len(again.train) != 0


# ----------------------------------------------------------------------------- ftlaunch data
def test_ftlaunch_data_reports_and_marks_the_trained_part(chat_tok, tiny, tmp_path, capsys):
    from launcher import cli
    import tiny_recipe
    model = tiny_recipe.build_model(str(tmp_path / "model"), len(chat_tok), layers=1, hidden=32)
    chat_tok.save_pretrained(model)
    a = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS] * 10)
    b = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat sees the river."}] * 30)
    run = tmp_path / "run.yaml"
    run.write_text(f"name: d\nmodel: {{path: {model}}}\ndata:\n"
                   f"  max_seq_len: 128\n  cache_dir: {tmp_path}/c\n  mix:\n"
                   f"    - {{path: {a}, weight: 1, messages_field: messages, chat_template: chatml}}\n"
                   f"    - {{path: {b}, weight: 3}}\n"
                   "train: {max_steps: 1, device: cpu}\n")
    assert cli.main(["data", str(run), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "examples: 60 training sequences" in out and "trained on:" in out
    assert f"source {a}: 30 examples, weight 1, drawn" in out and "lengths:" in out
    assert "--- example 0" in out and "[[5.<|im_end|>]]" in out
    assert "[[<|im_start|>" not in out  # the prompt side is not marked
    assert cli.main(["data", str(run), "--json", "--show", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["examples"] == 60 and 0 < info["trained_tokens"] < info["tokens"]
    assert sum(x["count"] for x in info["lengths"]) == 60
    assert abs(info["sources"][0]["share"] - 0.25) < 0.1
    assert info["shown"][0].count("[[") == 2
