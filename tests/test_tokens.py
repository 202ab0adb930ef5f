"""model.pad_token / special_tokens / add_tokens: tokenizer, resized embeddings, new rows trained."""
from __future__ import annotations

import textwrap

import pytest

from launcher.model import decay, freeze, tokens
from launcher.rank import inputs
from launcher.config import runfile


def load(tiny, tmp_path, model_extra: str, freeze_line: str):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tok
        model: {{path: {tiny['model']}, dtype: fp32, {model_extra}}}
        data: {{path: {tiny['text']}, max_seq_len: 32}}
        train: {{max_steps: 2, device: cpu, weight_decay: 0.1}}
        freeze: {freeze_line}
        """))
    return runfile.load(str(path))


def test_new_tokens_get_new_trainable_rows_and_the_old_rows_stay(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = load(tiny, tmp_path, "pad_token: '<|pad|>', special_tokens: ['<|im_start|>', "
               "'<|im_end|>'], add_tokens: [robotcat, '</s>']",
               "{policy: last_layers, trainable_layers: 1}")
    tok = inputs.load_tokenizer(cfg)
    base = len(AutoTokenizer.from_pretrained(tiny["model"]))
    assert len(tok) == base + 4  # </s> exists already
    assert tok.pad_token == "<|pad|>" and tok.convert_tokens_to_ids("<|pad|>") >= base
    assert tok.tokenize("a <|im_start|>robotcat") [-2:] == ["<|im_start|>", "robotcat"]
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    new = tokens.resize(model, tok)
    assert new == list(range(base, base + 4))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    model, report = freeze.apply(model, cfg)  # last_layers: embeddings and head frozen
    masked = tokens.train_new_rows(model, new, cfg)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert len(masked) == 2 and emb.requires_grad and head.requires_grad
    before = emb.detach().clone(), head.detach().clone()
    groups = decay.param_groups(model, masked, cfg.train.weight_decay)
    assert groups[1]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1)
    ids = torch.tensor([tok("the cat <|im_start|>robotcat<|im_end|>")["input_ids"]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for w, b in zip((emb, head), before):
        assert torch.equal(w[:base], b[:base])  # every old row exactly as it was
        assert not torch.equal(w[base:], b[base:])  # the new rows trained
    out = tmp_path / "export"
    tok.save_pretrained(out)  # what export.save_final does with the run's tokenizer
    again = AutoTokenizer.from_pretrained(out)
    assert len(again) == len(tok) and again.pad_token == "<|pad|>"
    assert again.convert_tokens_to_ids("robotcat") == tok.convert_tokens_to_ids("robotcat")


def test_a_policy_that_trains_the_embeddings_needs_no_mask(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    cfg = load(tiny, tmp_path, "add_tokens: [zebra]", "{policy: full}")
    tok = inputs.load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    new = tokens.resize(model, tok)
    model, _ = freeze.apply(model, cfg)
    assert len(new) == 1 and tokens.train_new_rows(model, new, cfg) == []


@pytest.mark.parametrize("extra", ["pad_token: ''", "special_tokens: ['']"])
def test_blank_tokens_are_refused(tiny, tmp_path, extra):
    from launcher.config.errors import ConfigError
    with pytest.raises(ConfigError, match=r"(an empty pad token|an empty or blank token)"):
        load(tiny, tmp_path, extra, "{policy: full}")
