"""What a run's start does once and hands on: tokenizing with the node's CPUs (data.preprocessing_workers
null), the node's cache built that way equal to one process's tokens, and the plan's model facts
kept on disk (launcher/memory/facts_cache.py) so a second plan builds no meta-device model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from launcher import data
from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from launcher.data import tokenize

CONV = [{"role": "user", "content": "the cat sees the river number {i}?"},
        {"role": "assistant", "content": "yes, the cat sees river {i}."}]


def cfg(path=None, **kw) -> RunConfig:
    return RunConfig(name="t", model=ModelConfig(path="/nonexistent-model"),
                     data=DataConfig(path=None if path is None else str(path), **kw),
                     train=TrainConfig(max_steps=1, seed=7))


@pytest.fixture(scope="module")
def chat_tok(tiny):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def test_default_workers_are_the_tasks_cpus_for_the_builder_and_shared_otherwise(monkeypatch):
    monkeypatch.setattr(tokenize, "node_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert tokenize.default_workers(cfg(), for_node=True) == 8      # the others wait
    assert tokenize.default_workers(cfg(), for_node=False) == 2     # 4 ranks share 8 CPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert tokenize.default_workers(cfg(), for_node=False) == 1
    assert tokenize.default_workers(cfg(preprocessing_workers=3), for_node=True) == 3


def test_the_node_cache_built_by_every_cpu_equals_one_processs_tokens(chat_tok, tmp_path,
                                                                     monkeypatch):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{k: v.format(i=i) for k, v in m.items()}
                                                     for m in CONV]}) + "\n" for i in range(200)))
    common = dict(messages_field="messages", chat_template="chatml", max_seq_len=64)
    one = data.load(cfg(path, preprocessing_workers=1, cache=False, **common), chat_tok,
                    warn=lambda m: None)
    asked: list[int] = []
    in_workers = tokenize.in_workers

    def recorded(fn, job, rows, workers):
        asked.append(workers)
        return in_workers(fn, job, rows, workers)

    monkeypatch.setattr(tokenize, "in_workers", recorded)
    monkeypatch.setattr(tokenize, "node_cpus", lambda: 3)
    built = data.cached_load(cfg(path, cache_dir=str(tmp_path / "c"), **common), chat_tok,
                             warn=lambda m: None)
    assert built.stats["cache"] == "built" and asked == [3]  # 3 processes, 67 conversations each
    reused = data.cached_load(cfg(path, cache_dir=str(tmp_path / "c"), preprocessing_workers=2,
                                  **common), chat_tok, warn=lambda m: None)
    assert reused.stats["cache"] == "reused"  # the worker count is not part of the key
    for got in (built, reused):
        for a in ("ids", "labels", "offsets"):
            assert np.array_equal(getattr(got.train, a), getattr(one.train, a)), a
    assert one.train.num_tokens > 200 * 10


def test_few_rows_are_tokenized_in_this_process(monkeypatch):
    from launcher.common import forked

    def no_fork(*a, **k):
        raise AssertionError("forked processes for 100 rows")
    monkeypatch.setattr(forked, "fork_map", no_fork)
    rows = list(range(100))
    got = tokenize.in_workers(lambda job, r: (list(r), [job], []), "j", rows, 8)
    assert got == (rows, ["j"], [])  # 100 // 64 = 1 process: this one


def test_a_second_plan_reads_the_model_facts_from_disk(tiny, tmp_path, monkeypatch):
    from launcher import memory
    from launcher.config import runfile
    from launcher.memory import facts_cache, inventory
    monkeypatch.setenv(facts_cache.ENV, "1")
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {tiny['model']}}}\n"
                   f"data: {{path: {tiny['text']}, max_seq_len: 64}}\ntrain: {{max_steps: 3}}\n")
    cfg_ = runfile.load(str(run))
    memory.clear_meta_cache()
    first = memory.plan(cfg_)
    kept = {p.name.split("-")[0] for p in (tmp_path / "cache" / "plan-facts").iterdir()}
    assert kept == {"inventory", "trace"}, kept
    memory.clear_meta_cache()

    def not_built(*a, **k):
        raise AssertionError("the meta-device model was built again")
    monkeypatch.setattr(inventory, "meta_model", not_built)
    second = memory.plan(cfg_)
    assert second.total_per_gpu == first.total_per_gpu and second.terms == first.terms
    # off: every plan derives its facts (the test suite runs so)
    monkeypatch.setenv(facts_cache.ENV, "0")
    memory.clear_meta_cache()
    with pytest.raises(AssertionError, match="the meta-device model was built again"):
        memory.plan(cfg_)
    memory.clear_meta_cache()


def test_a_model_folder_with_code_of_its_own_is_not_kept(tmp_path):
    from launcher.memory import facts_cache
    (tmp_path / "config.json").write_text("{}")
    assert facts_cache.plain_folder(str(tmp_path))
    (tmp_path / "modeling_custom.py").write_text("")
    assert not facts_cache.plain_folder(str(tmp_path))
    assert not facts_cache.plain_folder(str(tmp_path / "missing"))



def test_a_second_data_check_of_unchanged_files_loads_no_tokenizer(tiny, tmp_path, monkeypatch):
    """`ftlaunch run`'s data check finds the tokenized cache of unchanged data and tokenizer files
    without loading the tokenizer; a changed data file or tokenizer file, or another token
    setting, loads it again."""
    import os
    import shutil

    from launcher.config import runfile
    from launcher.rank import inputs
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    text = tmp_path / "text.jsonl"
    shutil.copy(tiny["text"], text)
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {model}}}\n"
                   f"data: {{path: {text}, max_seq_len: 32, packing: true, "
                   f"cache_dir: {tmp_path / 'cache'}}}\ntrain: {{max_steps: 3}}\n")
    cfg_ = runfile.load(str(run))
    assert inputs.known_data(cfg_) is None
    first = inputs.check_data(cfg_)
    loads = []
    real = inputs.load_tokenizer
    monkeypatch.setattr(inputs, "load_tokenizer", lambda c: loads.append(c) or real(c))
    again = inputs.check_data(cfg_)
    assert loads == [] and again.stats["cache"] == "known"
    assert len(again.train) == len(first.train)
    assert np.array_equal(np.asarray(again.train.ids), np.asarray(first.train.ids))
    dumped = tmp_path / "resolved.yaml"   # as the ranks read it: 0 comes back as 0.0
    dumped.write_text(runfile.dump(cfg_))
    assert inputs.known_data(runfile.load(str(dumped))) is not None
    other = runfile.load(str(run), ["model.pad_token=<pad>"])
    assert inputs.known_data(other) is None
    tok_file = next(p for p in model.iterdir() if p.name.startswith("tokenizer"))
    os.utime(tok_file, ns=(tok_file.stat().st_atime_ns, tok_file.stat().st_mtime_ns + 10**9))
    assert inputs.known_data(cfg_) is None
    inputs.check_data(cfg_)
    assert len(loads) == 1 and inputs.known_data(cfg_) is not None
    with open(text, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "one more line about the cat."}) + "\n")
    assert inputs.known_data(cfg_) is None


def test_the_kept_facts_have_the_same_keys_in_every_process(tiny, tmp_path):
    """A second `ftlaunch plan` in a new process (another string hash seed) finds every fact the
    first kept: none is keyed by something that changes between processes."""
    import os
    import subprocess
    import sys
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {tiny['model']}}}\n"
                   f"data: {{path: {tiny['text']}, max_seq_len: 64}}\ntrain: {{max_steps: 3}}\n"
                   "freeze: {policy: last_layers, trainable_layers: 1, also_train: [lm_head]}\n")
    kept = tmp_path / "cache" / "plan-facts"
    listings = []
    for seed in ("1", "2"):
        env = dict(os.environ, FTLAUNCH_CACHE=str(tmp_path / "cache"), FTLAUNCH_PLAN_CACHE="1",
                   PYTHONHASHSEED=seed)
        p = subprocess.run([sys.executable, "-m", "launcher", "plan", str(run)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode in (0, 2), p.stderr[-2000:]
        listings.append(sorted(x.name for x in kept.iterdir()))
    assert any(n.startswith("trace-") for n in listings[0]), listings[0]
    assert listings[1] == listings[0]


ENGINE = """
import json, sys
from launcher.rank.train import skip_cpu_shm_op, skip_muon_import
if sys.argv[2] == "skip":
    skip_muon_import()
import deepspeed, torch
skip_cpu_shm_op()
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
      "zero_optimization": {"stage": int(sys.argv[3])}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
ids = torch.arange(32).reshape(2, 16) % 50
losses = []
for _ in range(3):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
print(json.dumps({"losses": losses, "inductor": "torch._inductor.compile_fx" in sys.modules}))
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_the_same_without_importing_its_muon_optimizer(tiny, stage):
    """skip_muon_import (each rank, before deepspeed.initialize): DeepSpeed's Muon modules, whose
    import pulls in torch._inductor's compiler (about 1.4 s of every rank's start), are not imported, and
    ZeRO trains to the same losses as with them."""
    import subprocess
    import sys

    from launcher.cluster.dist_env import free_port
    from ranks import ROOT, rank_env
    env = {**rank_env(), "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    got = {}
    for how in ("skip", "import"):
        p = subprocess.run([sys.executable, "-c", ENGINE, tiny["model"], how, str(stage)],
                           env={**env, "MASTER_PORT": str(free_port())},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        got[how] = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["skip"]["inductor"] is False and got["import"]["inductor"] is True, got
    assert got["skip"]["losses"] == got["import"]["losses"], got
    from launcher.rank.train import MUON_MODULES, skip_muon_import
    saved = {n: sys.modules.pop(n, None) for n in MUON_MODULES}   # this process keeps its own
    try:
        skip_muon_import()
        muon = sys.modules[MUON_MODULES[0]]
        with pytest.raises(RuntimeError, match="does not train with DeepSpeed's Muon optimizer"):
            muon.MuonWithAuxAdam([])
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
