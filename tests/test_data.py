"""launcher/data/ (reading, tokenize, batching): reading every format, masking, truncation,
packing, eval splits, the distributed sampler, collate, and a clear ConfigError for every kind of
bad data."""
from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys

import pytest

from launcher import data
from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from launcher.config.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["the cat sees the river.", "a dog finds a song near the sea.", "my friend builds a car."]


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def cfg(path, model="/nonexistent-model", seed=1234, **kw) -> RunConfig:
    return RunConfig(name="t", model=ModelConfig(path=model), data=DataConfig(path=str(path), **kw),
                     train=TrainConfig(max_steps=1, seed=seed))


def load(tok, path, **kw) -> data.Splits:
    seen: list[str] = []
    splits = data.load(cfg(path, **kw), tok, warn=seen.append)
    assert seen == splits.warnings
    return splits


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def rows_of(jsonl_path) -> list[dict]:
    with open(jsonl_path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- formats
def _write(kind: str, tmp_path, texts: list[str]) -> str:
    recs = [{"text": t, "n": i} for i, t in enumerate(texts)]
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", recs)
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(recs), encoding="utf-8")
        return str(tmp_path / "d.json")
    if kind == "jsonl.gz":
        with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in recs))
        return str(tmp_path / "d.jsonl.gz")
    if kind == "csv":
        import pandas as pd
        pd.DataFrame(recs).to_csv(tmp_path / "d.csv", index=False)
        return str(tmp_path / "d.csv")
    if kind == "parquet":
        import pandas as pd
        pd.DataFrame(recs).to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "text":
        (tmp_path / "d.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        return str(tmp_path / "d.txt")
    if kind == "saved":
        import datasets
        datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    if kind == "saved-dict":
        import datasets
        ds = datasets.Dataset.from_list(recs)
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "sd"))
        return str(tmp_path / "sd")
    if kind == "symlink":  # unicode, spaces and glob characters in a symlinked name
        real = write_jsonl(tmp_path / "real.jsonl", recs)
        link = tmp_path / "dätä [1] *.jsonl"
        os.symlink(real, link)
        return str(link)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "jsonl.gz", "csv", "parquet", "text", "saved",
                                  "saved-dict", "symlink"])
def test_every_format_loads_the_same_examples(tok, tmp_path, kind):
    texts = TEXTS + ["ünïcødé: naïve café — 東京 🐈"]
    splits = load(tok, _write(kind, tmp_path, texts), max_seq_len=64)
    assert splits.eval is None
    assert len(splits.train) == len(texts)
    eos = tok.eos_token_id
    for ex, text in zip(splits.train, texts):
        assert ex["input_ids"] == encode(tok, text) + [eos]
        assert ex["labels"] == ex["input_ids"]
        assert tok.decode(ex["input_ids"][:-1]) == text
    assert splits.warnings == []


def test_format_field_overrides_the_extension(tok, tmp_path):
    p = tmp_path / "records.data"
    write_jsonl(p, [{"text": t} for t in TEXTS])
    assert len(load(tok, p, format="jsonl").train) == 3
    with pytest.raises(ConfigError, match=r"cannot tell the format of .*records\.data.*'\.data'"):
        load(tok, p)


def test_text_file_drops_blank_lines_with_a_count(tok, tmp_path):
    p = tmp_path / "lines.txt"
    p.write_text("first line\n\n   \nsecond line\n\n", encoding="utf-8")
    splits = load(tok, p, max_seq_len=32)
    assert [tok.decode(e["input_ids"][:-1]) for e in splits.train] == ["first line", "second line"]
    assert len(splits.warnings) == 1
    assert "dropped 3 of 5 rows" in splits.warnings[0] and "first: row 2" in splits.warnings[0]


def test_empty_and_null_rows_are_dropped_not_fatal(tok, tmp_path):
    p = write_jsonl(tmp_path / "holes.jsonl", [{"text": "a b"}, {"text": None}, {"text": ""},
                                               {"other": 1}, {"text": "c d"}])
    splits = load(tok, p, max_seq_len=32)
    assert len(splits.train) == 2
    assert "dropped 3 of 5 rows" in splits.warnings[0]


def test_numbers_in_a_csv_text_column_are_text(tok, tmp_path):
    p = tmp_path / "n.csv"
    p.write_text("text\n12\n3.5\n", encoding="utf-8")
    got = [tok.decode(e["input_ids"][:-1]) for e in load(tok, p, max_seq_len=16).train]
    assert got == ["12", "3.5"]


def test_add_eos_false(tok, tmp_path):
    path = _write("jsonl", tmp_path, TEXTS)
    splits = load(tok, path, add_eos=False)
    assert splits.train[0]["input_ids"] == encode(tok, TEXTS[0]) and splits.warnings == []
    packed = load(tok, path, add_eos=False, packing=True, max_seq_len=32)
    docs = sorted(tuple(encode(tok, x)) for x in TEXTS)
    got = []
    for e in packed.train:
        at = 0
        for n in e["doc_lengths"]:
            got.append(tuple(e["input_ids"][at:at + n]))
            at += n
    assert sorted(got) == docs


# ----------------------------------------------------------------------------- prompt / response
def test_prompt_response_masks_exactly_the_prompt(tok, tiny):
    splits = load(tok, tiny["qa"], prompt_field="prompt", response_field="response", max_seq_len=64)
    rows = rows_of(tiny["qa"])
    assert len(splits.train) == len(rows)
    for ex, row in zip(splits.train, rows):
        p, r = encode(tok, row["prompt"]), encode(tok, row["response"])
        assert ex["input_ids"] == p + r + [tok.eos_token_id]
        assert ex["labels"] == [-100] * len(p) + r + [tok.eos_token_id]
        assert tok.decode([t for t in ex["labels"] if t != -100]) == row["response"] + "</s>"


def test_tokenizer_start_tokens_are_kept_and_masked(tok, tiny):
    from tokenizers.processors import TemplateProcessing
    bos_tok = copy.deepcopy(tok)
    bos_tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    assert bos_tok("a b")["input_ids"][0] == tok.bos_token_id
    ex = load(bos_tok, tiny["qa"], prompt_field="prompt", response_field="response").train[0]
    row = rows_of(tiny["qa"])[0]
    p, r = encode(tok, row["prompt"]), encode(tok, row["response"])
    assert ex["input_ids"] == [tok.bos_token_id] + p + r + [tok.eos_token_id]
    assert ex["labels"] == [-100] * (1 + len(p)) + r + [tok.eos_token_id]


def test_truncation_cuts_to_max_seq_len_and_keeps_the_start(tok, tiny):
    full = load(tok, tiny["text"], max_seq_len=64).train
    cut = load(tok, tiny["text"], max_seq_len=8)
    assert len(cut.train) == len(full)
    longer = 0
    for i in range(len(full)):
        a, b = full[i], cut.train[i]
        assert b["input_ids"] == a["input_ids"][:8] and b["labels"] == a["labels"][:8]
        longer += len(a["input_ids"]) > 8
    assert longer > 0
    assert any(f"{longer} of {len(full)}" in w and "cut" in w for w in cut.warnings)


def test_example_whose_prompt_fills_max_seq_len_is_dropped(tok, tmp_path):
    long_prompt = "the cat sees the river " * 8
    p = write_jsonl(tmp_path / "qa.jsonl", [{"q": long_prompt, "a": " yes."},
                                            {"q": "what?", "a": " no."}])
    splits = load(tok, p, prompt_field="q", response_field="a", max_seq_len=8)
    assert len(splits.train) == 1
    assert tok.decode([t for t in splits.train[0]["labels"] if t != -100]) == " no.</s>"
    assert any("dropped 1 train examples whose prompt fills" in w for w in splits.warnings)
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"q": long_prompt, "a": " yes."}])
    with pytest.raises(ConfigError, match=r"data\.max_seq_len: every train example's prompt"):
        load(tok, only_long, prompt_field="q", response_field="a", max_seq_len=8)


# ----------------------------------------------------------------------------- packing
def _docs_of(rows) -> list[tuple[tuple, tuple]]:
    """(input_ids, labels) of every document of packed rows."""
    out = []
    for e in rows:
        at = 0
        for n in e["doc_lengths"]:
            out.append((tuple(e["input_ids"][at:at + n]), tuple(e["labels"][at:at + n])))
            at += n
        assert at == len(e["input_ids"])
    return out


def test_packing_keeps_whole_examples_in_rows_and_keeps_masks(tok, tiny):
    kw = dict(prompt_field="prompt", response_field="response")
    plain = load(tok, tiny["qa"], max_seq_len=48, **kw).train
    packed = load(tok, tiny["qa"], max_seq_len=48, packing=True, **kw)
    rows = [packed.train[i] for i in range(len(packed.train))]
    assert all(len(r["input_ids"]) <= 48 for r in rows)
    # every example exactly once, whole; its first label -100 (never learnt from the one before)
    want = sorted((tuple(e["input_ids"]), (-100,) + tuple(e["labels"][1:])) for e in plain)
    assert sorted(_docs_of(rows)) == want
    total = sum(len(e["input_ids"]) for e in plain)
    assert len(rows) == -(-total // 48) or packed.stats["packing_fill"] > 0.9
    assert packed.stats["packing_fill"] == round(total / (len(rows) * 48), 4)


def test_packing_cuts_long_examples_first(tok, tiny, tmp_path):
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"text": t} for t in TEXTS])
    splits = load(tok, tiny["text"], eval_path=ev, max_seq_len=8, packing=True)
    assert all(len(splits.eval[i]["input_ids"]) <= 8 for i in range(len(splits.eval)))
    assert sorted(d[0] for d in _docs_of(splits.eval)) == \
        sorted(tuple((encode(tok, t) + [tok.eos_token_id])[:8]) for t in TEXTS)
    assert any("were cut" in w for w in splits.warnings)


# ----------------------------------------------------------------------------- eval split
def test_eval_fraction_is_a_deterministic_disjoint_split(tok, tiny):
    full = load(tok, tiny["text"], max_seq_len=64).train
    every = sorted(tuple(full[i]["input_ids"]) for i in range(len(full)))
    a = load(tok, tiny["text"], max_seq_len=64, eval_fraction=0.1, seed=7)
    b = load(tok, tiny["text"], max_seq_len=64, eval_fraction=0.1, seed=7)
    c = load(tok, tiny["text"], max_seq_len=64, eval_fraction=0.1, seed=8)
    assert (len(a.train), len(a.eval)) == (360, 40)
    both = [tuple(x["input_ids"]) for x in a.train] + [tuple(x["input_ids"]) for x in a.eval]
    assert sorted(both) == every
    assert list(a.eval) == list(b.eval) and list(a.train) == list(b.train)
    assert list(a.eval) != list(c.eval)


def test_eval_path_loads_separately(tok, tiny, tmp_path):
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"text": t} for t in TEXTS])
    splits = load(tok, tiny["text"], eval_path=ev)
    assert len(splits.train) == 400 and len(splits.eval) == 3
    assert splits.eval[1]["input_ids"] == encode(tok, TEXTS[1]) + [tok.eos_token_id]
    assert splits.stats["eval_examples"] == 3


def test_eval_split_errors(tok, tmp_path):
    p = write_jsonl(tmp_path / "two.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(ConfigError, match=r"data\.eval_fraction: holding out 0\.9 of 2 examples "
                       r"leaves none for training"):
        load(tok, p, eval_fraction=0.9)
    empty_eval = write_jsonl(tmp_path / "ev.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(ConfigError, match=r"data\.eval_path: every one of the 2 rows of .*ev\.jsonl "
                       r"has an empty or missing 'text'"):
        load(tok, p, eval_path=empty_eval)


# ----------------------------------------------------------------------------- bad data
def test_missing_file_suggests_a_close_name(tok, tiny):
    wrong = tiny["text"].replace("text.jsonl", "txet.jsonl")
    with pytest.raises(ConfigError, match=r"data\.path: no such file or folder: .*txet\.jsonl "
                       r"\(did you mean 'text\.jsonl'\?\)") as e:
        load(tok, wrong)
    assert e.value.keys == ["data.path"] and "fix: check the path" in str(e.value)


def test_missing_folder_and_broken_symlink(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"the folder .*nope does not exist either"):
        load(tok, tmp_path / "nope" / "d.jsonl")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "link.jsonl")
    with pytest.raises(ConfigError, match=r"link\.jsonl is a broken symlink \(to .*gone\.jsonl\)"):
        load(tok, tmp_path / "link.jsonl")


def test_missing_column_lists_columns_and_suggests(tok, tiny):
    with pytest.raises(ConfigError, match=r"data\.text_field: .*text\.jsonl has no column 'txt' "
                       r"\(did you mean 'text'\?\); its columns: text") as e:
        load(tok, tiny["text"], text_field="txt")
    assert e.value.keys == ["data.text_field"]
    with pytest.raises(ConfigError, match=r"has no column 'text'; its columns: prompt, response\n"
                       r".*set prompt_field: prompt and response_field: response"):
        load(tok, tiny["qa"])
    with pytest.raises(ConfigError, match=r"data\.response_field: .* has no column 'answer'"):
        load(tok, tiny["qa"], prompt_field="prompt", response_field="answer")


def test_empty_file(tok, tmp_path):
    for name in ("e.jsonl", "e.csv", "e.txt"):
        (tmp_path / name).write_text("")
        with pytest.raises(ConfigError, match=rf"data\.path: .*{name.replace('.', '[.]')} is empty"):
            load(tok, tmp_path / name)
    (tmp_path / "header.csv").write_text("text\n")
    with pytest.raises(ConfigError, match=r"header\.csv holds no rows"):
        load(tok, tmp_path / "header.csv")


def test_all_rows_empty(tok, tmp_path):
    p = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  "}, {"text": None}])
    with pytest.raises(ConfigError, match=r"every one of the 3 rows of .*blank\.jsonl has an empty "
                       r"or missing 'text'"):
        load(tok, p)
    t = tmp_path / "blank.txt"
    t.write_text("\n\n  \n")
    with pytest.raises(ConfigError, match=r"every one of the 3 rows .* \(blank lines\)"):
        load(tok, t)


def test_max_seq_len_beyond_the_model(tok, tiny):
    from launcher.model.info import max_positions, model_config
    limit = max_positions(model_config(tiny["model"]))
    assert limit == 256
    with pytest.raises(ConfigError, match=r"data\.max_seq_len: 512 exceeds the model's 256 "
                       r"positions\n.*fix: use data.max_seq_len <= 256"):
        data.load(cfg(tiny["text"], max_seq_len=512), tok, max_positions=limit)
    assert len(data.load(cfg(tiny["text"], max_seq_len=256), tok, max_positions=limit).train) == 400


def test_corrupt_json_line_is_named(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data\.path: cannot read .*bad\.jsonl as jsonl: line 3 "
                       r"is not valid JSON .*oops"):
        load(tok, p)
    j = tmp_path / "bad.json"
    j.write_text('[{"text": "a"}, {"text": ', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cannot read .*bad\.json as json: not valid JSON"):
        load(tok, j)


def test_json_files_that_crash_the_reader_get_a_clear_error(tok, tmp_path):
    """datasets' JSON reader kills the process (SIGSEGV) on a file whose first value is null:
    the first value is checked before it is called."""
    cases = {"n.jsonl": (b"\n\nnull\n{\"text\": \"a\"}\n", r"line 3 is a JSON null, not an object"),
             "n.json": (b"null", r"the top level is a JSON null, not a list of records"),
             "s.jsonl": (b'"just text"\n', r"line 1 is a JSON string, not an object"),
             "l.jsonl": (b"[1, 2]\n", r"line 1 is a JSON list, not an object"),
             "n.jsonl.gz": (gzip.compress(b"null\n"), r"line 1 is a JSON null"),
             "bad.jsonl.gz": (b"not gzip at all", r"cannot decompress: Not a gzipped file"),
             "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), r"not UTF-8 text"),
             "latin1.txt": ("caf\xe9\n".encode("latin-1"), r"not UTF-8 text")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=rf"data\.path: cannot read .*{name.replace('.', '[.]')} "
                           rf"as \w+: {message}"):
            load(tok, tmp_path / name)
    (tmp_path / "nullrow.jsonl").write_text('{"text": "a b"}\nnull\n')
    splits = load(tok, tmp_path / "nullrow.jsonl")
    assert len(splits.train) == 1 and "dropped 1 of 2 rows" in splits.warnings[0]


def test_other_unreadable_inputs(tok, tmp_path):
    pq = tmp_path / "fake.parquet"
    pq.write_text("this is not parquet")
    with pytest.raises(ConfigError, match=r"cannot read .*fake\.parquet as parquet: \w+"):
        load(tok, pq)
    (tmp_path / "notsaved").mkdir()
    (tmp_path / "notsaved" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot read .*notsaved as saved"):
        load(tok, tmp_path / "notsaved")
    with pytest.raises(ConfigError, match=r"data\.format: .*notsaved is a folder, but format "
                       r"'jsonl' reads one file"):
        load(tok, tmp_path / "notsaved", format="jsonl")
    obj = write_jsonl(tmp_path / "obj.jsonl", [{"text": {"nested": 1}}])
    with pytest.raises(ConfigError, match=r"column 'text' of .*obj\.jsonl holds dict values \(row 1\)"):
        load(tok, obj)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "a"}]}))
    with pytest.raises(ConfigError, match=r"no column 'text'; its columns: data\n.*top-level list"):
        load(tok, wrapped)
    txt = tmp_path / "qa.txt"
    txt.write_text("a\n")
    with pytest.raises(ConfigError, match=r"data\.prompt_field: a text file has one example per line"):
        load(tok, txt, prompt_field="q", response_field="a")


def test_saved_folder_without_a_train_split(tok, tmp_path):
    import datasets
    ds = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"first": ds, "second": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ConfigError, match=r"two holds the splits first, second and no 'train'"):
        load(tok, tmp_path / "two")


def test_loading_leaves_no_cache_behind(tok, tiny, tmp_path, monkeypatch):
    import datasets
    import tempfile
    home_cache = tmp_path / "hf-cache"
    home_cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(home_cache))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert len(load(tok, tiny["text"]).train) == 400
    with pytest.raises(ConfigError, match=r"no column 'nope'"):
        load(tok, tiny["text"], text_field="nope")
    assert list(home_cache.iterdir()) == [] and list(scratch.iterdir()) == []


def test_warnings_print_on_rank_zero_only(tok, tmp_path, monkeypatch, capsys):
    p = write_jsonl(tmp_path / "h.jsonl", [{"text": "a b"}, {"text": ""}])
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        splits = data.load(cfg(p), tok)
        assert len(splits.warnings) == 1
        assert ("ftlaunch: warning: data.path: dropped 1 of 2 rows" in capsys.readouterr().err) \
            is printed


def test_tokenizer_without_pad_or_eos(tok, tiny):
    assert data.tokenizer_pad_id(tok) == tok.pad_token_id == 0
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    said: list[str] = []
    assert data.tokenizer_pad_id(no_pad, warn=said.append) == tok.eos_token_id
    assert len(said) == 1 and "no pad token; padding with its EOS token" in said[0]
    neither = copy.deepcopy(no_pad)
    neither.eos_token = None
    with pytest.raises(ConfigError, match=r"model\.tokenizer: the tokenizer has neither a pad token "
                       r"nor an EOS token.*\n.*fix: add one"):
        data.tokenizer_pad_id(neither)
    with pytest.raises(ConfigError, match=r"data\.add_eos: the tokenizer has no EOS token"):
        load(neither, tiny["text"])
    assert len(load(neither, tiny["text"], add_eos=False).train) == 400


def test_importing_the_module_loads_no_heavy_library():
    code = ("import sys, launcher.data; heavy = [m for m in ('torch', 'datasets', 'transformers', "
            "'numpy') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- sampler
def _epoch(s: data.Sampler, it) -> list[list[int]]:
    return [next(it) for _ in range(s.batches_per_epoch)]


@pytest.mark.parametrize("n,world,mbs", [(103, 4, 3), (64, 2, 4), (5, 1, 2), (3, 2, 4)])
def test_sampler_ranks_are_disjoint_and_equal(n, world, mbs):
    samplers = [data.Sampler(n, rank=r, world_size=world, micro_batch_size=mbs, seed=3)
                for r in range(world)]
    its = [iter(s) for s in samplers]
    counts = {s.batches_per_epoch for s in samplers}
    assert len(counts) == 1
    per = counts.pop()
    assert per == max(1, n // (world * mbs))
    epoch0 = [_epoch(s, it) for s, it in zip(samplers, its)]
    assert all(len(b) == mbs for rank in epoch0 for b in rank)
    flat = [i for rank in epoch0 for b in rank for i in b]
    assert all(0 <= i < n for i in flat)
    if n >= world * mbs:
        assert len(set(flat)) == len(flat) == per * world * mbs  # disjoint, the tail left out
    else:
        assert set(flat) == set(range(n))  # too few: every example, repeated to fill one batch
    assert {s.epoch for s in samplers} == {0}
    next(its[0])
    assert samplers[0].epoch == 1


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    a = data.Sampler(50, rank=1, world_size=2, micro_batch_size=5, seed=9)
    b = data.Sampler(50, rank=1, world_size=2, micro_batch_size=5, seed=9)
    ia, ib = iter(a), iter(b)
    e0a, e0b = _epoch(a, ia), _epoch(b, ib)
    assert e0a == e0b
    e1 = _epoch(a, ia)
    assert e1 != e0a and a.epoch == 1
    other = data.Sampler(50, rank=1, world_size=2, micro_batch_size=5, seed=10)
    assert _epoch(other, iter(other)) != e0a
    fixed = data.Sampler(10, rank=0, world_size=2, micro_batch_size=2, seed=9, shuffle=False)
    assert _epoch(fixed, iter(fixed)) == [[0, 1], [4, 5]]


def test_sampler_resume_gives_the_identical_remaining_sequence():
    ref = data.Sampler(37, rank=2, world_size=3, micro_batch_size=2, seed=5)
    it = iter(ref)
    expected = [next(it) for _ in range(40)]  # several epochs
    for stop in (0, 1, 6, 13, 24):
        s = data.Sampler(37, rank=2, world_size=3, micro_batch_size=2, seed=5)
        it = iter(s)
        taken = [next(it) for _ in range(stop)]
        state = json.loads(json.dumps(s.state_dict()))  # as a checkpoint would store it
        assert set(state) == {"epoch", "position"}
        fresh = data.Sampler(37, rank=2, world_size=3, micro_batch_size=2, seed=5)
        fresh.load_state_dict(state)
        it2 = iter(fresh)
        assert taken + [next(it2) for _ in range(40 - stop)] == expected
    assert ref.state_dict() == {"epoch": 40 // 6 - (40 % 6 == 0), "position": 40 % 6 or 6}


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"at least one example"):
        data.Sampler(0, rank=0, world_size=1, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"rank 2 is not in 0\.\.1"):
        data.Sampler(5, rank=2, world_size=2, micro_batch_size=1, seed=0)
    s = data.Sampler(5, rank=0, world_size=1, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"needs integer 'epoch' and 'position'"):
        s.load_state_dict({"epoch": 1})


# ----------------------------------------------------------------------------- collate
def test_collate_right_pads_and_masks():
    batch = data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                          {"input_ids": [8], "labels": [8]}], pad_id=2)
    assert {k: v.tolist() for k, v in batch.items()} == {
        "input_ids": [[5, 6, 7], [8, 2, 2]],
        "attention_mask": [[1, 1, 1], [1, 0, 0]],
        "labels": [[-100, 6, 7], [8, -100, -100]],
    }
    assert all(str(v.dtype) == "torch.int64" for v in batch.values())
    with pytest.raises(ValueError, match=r"example 0: 2 input_ids but 1 labels"):
        data.collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)
    with pytest.raises(ValueError, match=r"at least one example"):
        data.collate([], pad_id=0)


def test_loaded_batches_feed_the_model(tok, tiny):
    """The whole path once: load -> sampler -> collate -> the tiny model's loss."""
    import torch
    from transformers import AutoModelForCausalLM
    splits = load(tok, tiny["qa"], prompt_field="prompt", response_field="response", max_seq_len=32)
    s = data.Sampler(len(splits.train), rank=0, world_size=1, micro_batch_size=4, seed=0)
    batch = data.collate([splits.train[i] for i in next(iter(s))], data.tokenizer_pad_id(tok))
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and 4.0 < loss.item() < 8.0  # ~ln(vocab) for random weights
