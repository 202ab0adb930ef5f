"""data.num_workers (DataLoader workers) and data.preprocessing_workers (tokenizing processes):
same tokens, same batches, same losses, same resumable sampler state as without them."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest

from launcher.config import runfile
from launcher.data import Sampler, loader
from launcher.data.batching import counted_collate
from ranks import ROOT, rank_env


def run_file(tiny: dict, out, data: str, train: str = "max_steps: 2") -> str:
    path = out / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: workers
        model: {{path: {tiny['model']}, dtype: fp32}}
        data: {{path: {tiny['qa']}, prompt_field: prompt, response_field: response,
                max_seq_len: 32, {data}}}
        train: {{lr: 3.0e-3, device: cpu, micro_batch_size: 4, grad_accum: 2, log_every: 1,
                 {train}}}
        freeze: {{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{nodes: 1, gpus_per_node: 1}}
        output: {{dir: {out}/run, save_final: false}}
        """))
    return str(path)


def test_preprocessing_workers_give_the_tokens_of_one_process(tiny, tmp_path):
    from launcher.rank import inputs
    loaded = []
    for workers in (1, 2):
        (tmp_path / str(workers)).mkdir()
        cfg = runfile.load(run_file(tiny, tmp_path / str(workers), "eval_fraction: 0.1"),
                           [f"data.preprocessing_workers={workers}"])
        assert cfg.data.preprocessing_workers == workers
        loaded.append(inputs.load_data(cfg, inputs.load_tokenizer(cfg)))
    one, two = loaded
    assert len(one.train) == len(two.train) > 100
    for split in ("train", "eval"):
        a, b = getattr(one, split), getattr(two, split)
        assert a.ids.tolist() == b.ids.tolist() and a.labels.tolist() == b.labels.tolist()
        assert a.offsets.tolist() == b.offsets.tolist()
    assert one.train.num_loss_tokens < one.train.num_tokens  # the prompts are masked in both


def test_worker_batches_equal_in_process_batches_and_the_sampler_counts_what_was_taken(tiny,
                                                                                       tmp_path):
    from launcher.rank import inputs
    cfg = runfile.load(run_file(tiny, tmp_path, "packing: false"))
    train = inputs.load_data(cfg, inputs.load_tokenizer(cfg)).train
    samplers = [Sampler(len(train), rank=1, world_size=2, micro_batch_size=3, seed=5)
                for _ in range(2)]
    for s in samplers:
        s.load_state_dict({"epoch": 1, "position": 2})  # resumed mid-epoch
    per_epoch = samplers[0].batches_per_epoch
    got = []
    for s, workers in zip(samplers, (0, 2)):
        make = functools.partial(counted_collate, pad_id=0)  # what data.model_collate gives
        it = loader.train_batches(s, train, make, workers)
        got.append([next(it) for _ in range(per_epoch + 3)])  # across an epoch end
        assert s.state_dict() == {"epoch": 2, "position": 5}  # taken, not prefetched
        it.close()
    for a, b in zip(*got):
        assert a.keys() == b.keys()
        assert all(a[k].tolist() == b[k].tolist() for k in a) and int(a["num_tokens"]) > 0


def losses(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in rows]


@pytest.mark.multirank
def test_a_run_with_two_dataloader_workers_has_the_losses_of_one_without(tiny, tmp_path):
    got = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        path = run_file(tiny, out, f"eval_fraction: 0.05, num_workers: {workers}",
                        "max_steps: 3, eval_every: 2")
        env = rank_env()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        p = subprocess.run([sys.executable, "-m", "launcher", "train", path], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        got.append(losses(str(out / "run")))
    assert [s for s, _ in got[0]] == [1, 2, 2, 3, 3]  # train, eval at 2, final eval
    assert got[0] == got[1]


def test_the_direct_rust_call_gives_the_ids_of_the_tokenizers_own_call(tiny):
    """encode_texts calls the Rust tokenizer directly (half the time of many short segments):
    the same ids as the transformers wrapper, special-token strings and all; and the wrapper
    itself where the Rust tokenizer carries a setting the direct call would not apply."""
    from transformers import AutoTokenizer

    from launcher.data import tokenize
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    texts = ["the cat sees a song", "", "  two  spaces\n\nand a line", tok.eos_token + " after eos",
             "ünïcödé ✓ text", "x" * 300]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert tokenize.rust_tokenizer(tok) is tok._tokenizer
    assert tokenize.encode_texts(tok, texts) == want
    assert [tok.eos_token_id] == tokenize.encode_texts(tok, [tok.eos_token])[0][:1]
    tok._tokenizer.enable_truncation(4)  # a setting only the wrapper turns off per call
    assert tokenize.rust_tokenizer(tok) is None
    assert tokenize.encode_texts(tok, texts) == want
    tok._tokenizer.no_truncation()
    tok.split_special_tokens = True       # the wrapper splits special-token strings
    assert tokenize.rust_tokenizer(tok) is None
    assert tokenize.encode_texts(tok, [tok.eos_token]) == \
        tok([tok.eos_token], add_special_tokens=False)["input_ids"]
    tok.split_special_tokens = False
    tok._tokenizer.encode_special_tokens = False
    assert tokenize.rust_tokenizer(tok) is tok._tokenizer
    own = type("Infilling", (type(tok),), {"_encode_plus": lambda self, *a, **k: None})
    tok.__class__ = own                   # a class with its own encoding (CodeLlama's)
    assert tokenize.rust_tokenizer(tok) is None
