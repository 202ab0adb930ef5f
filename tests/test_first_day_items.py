"""The first day's wrong results and messages, one test each: alpaca `input`, tool schemas reaching
the prompt, the epoch estimate of a mixture, the summary of a mix, peers' key names, Slurm forms
of cluster.time / cluster.mem, a Hub id, bad rows counted once, `--version`."""
from __future__ import annotations

import json
import re
import textwrap

import pytest

from launcher import cli, data
from launcher.config import epochs, runfile
from launcher.checks import messages
from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from launcher.config.errors import ConfigError
from test_data_chat import chat_tok  # noqa: F401  (fixture)


def cfg(**kw) -> RunConfig:
    return RunConfig(name="t", model=ModelConfig(path="/nonexistent-model"),
                     data=DataConfig(**kw), train=TrainConfig(max_steps=1, seed=7))


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_alpaca_input_joins_the_prompt_after_a_newline(chat_tok, tmp_path):  # noqa: F811
    rows = [{"instruction": "add the numbers", "input": "2 3", "output": "5"},
            {"instruction": "say hi", "input": "", "output": "hi"}]
    path = jsonl(tmp_path / "a.jsonl", rows)
    splits = data.load(cfg(path=path, prompt_field="instruction", response_field="output",
                           input_field="input", max_seq_len=64, shuffle=False), chat_tok,
                       warn=lambda m: None)
    texts = [chat_tok.decode(splits.train[i]["input_ids"]) for i in range(2)]
    assert "add the numbers\n2 3" in texts[0] and "say hi\n" not in texts[1]
    # with a template: a user turn and an assistant turn, the loss on the assistant's
    splits = data.load(cfg(path=path, prompt_field="instruction", response_field="output",
                           input_field="input", chat_template="chatml", max_seq_len=64,
                           shuffle=False), chat_tok, warn=lambda m: None)
    ex = splits.train[0]
    assert chat_tok.decode(ex["input_ids"]).startswith("<|im_start|>user\nadd the numbers\n2 3<|im_end|>")
    trained = chat_tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert trained == "5<|im_end|>"


def test_tool_schemas_reach_the_prompt(chat_tok, tmp_path):  # noqa: F811
    tools = [{"name": "add", "parameters": {"a": "number"}}]
    path = jsonl(tmp_path / "t.jsonl", [{"tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": "add 2"}, {"from": "function_call", "value": '{"name": "add"}'},
        {"from": "observation", "value": "4"}, {"from": "gpt", "value": "4."}]}])
    splits = data.load(cfg(path=path, messages_field="conversations", tools_field="tools",
                           chat_template="chatml", max_seq_len=256), chat_tok, warn=lambda m: None)
    text = chat_tok.decode(splits.train[0]["input_ids"])
    assert '<tools>\n{"name": "add", "parameters": {"a": "number"}}\n</tools>' in text
    assert text.index("<tools>") < text.index("add 2")
    # the login node renders the same template with jinja2 alone: the same text
    render = messages.jinja_renderer(messages.CHATML)
    conv = messages.normalise(json.loads((tmp_path / "t.jsonl").read_text())["conversations"])
    assert render(conv, tools=tools) == text


def test_epochs_with_a_mix_count_every_source(fake_model, tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 30)
    b = jsonl(tmp_path / "b.jsonl", [{"text": "y"}] * 10)
    run = tmp_path / "run.yaml"
    run.write_text(textwrap.dedent(f"""\
        name: t
        model: {{path: {fake_model}}}
        data: {{mix: [{{path: {a}, weight: 1}}, {{path: {b}, weight: 3}}], max_seq_len: 16}}
        train: {{epochs: 2, micro_batch_size: 2}}
        """))
    c = runfile.load(str(run))
    assert epochs.estimated_sequences(c) == (40, "40 rows")
    assert epochs.planned_steps(c, 2)[0] == 20  # 2 epochs x 40 / (2 ranks x 2)
    from launcher.checks.summary import summary
    line = [x for x in summary(c).splitlines() if x.strip().startswith("data")][0]
    assert f"mix of 2: {a} (25%); {b} (75%)" in line and "None" not in line
    assert re.search(r"checked +the first 100 rows of each data file \(the ranks read every row\)",
                     summary(c))


@pytest.mark.parametrize("key, value, fix", [
    ("train.learning_rate", "1e-4", "here it is train.lr"),
    ("num_epochs", "3", "here it is train.epochs"),
    ("data.sequence_len", "512", "here it is data.max_seq_len"),
    ("cluster.time", "25h", "write '1-01:00:00'"),
    ("cluster.mem", "80GiB", "write '80G'"),
    ("cluster.mem", "500", "write the unit: 500G"),
])
def test_what_users_write_first_gets_the_run_file_form(key, value, fix, fake_model, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {fake_model}}}\n"
                   f"data: {{path: {tmp_path}/train.jsonl}}\ntrain: {{max_steps: 2}}\n")
    with pytest.raises(ConfigError, match=r"(?s)" + key.replace(".", r"\.") + r".*fix: .*"
                       + fix.replace("(", r"\(").replace(")", r"\)")):
        runfile.load(str(run), [f"{key}={value}"])


def test_a_hub_id_gets_how_to_download_it(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("name: t\nmodel: {path: meta-llama/Llama-3.1-8B}\ndata: {path: x.jsonl}\n"
                   "train: {max_steps: 2}\n")
    with pytest.raises(ConfigError, match=r"huggingface-cli download meta-llama/Llama-3.1-8B "
                                          r"--local-dir models/Llama-3.1-8B"):
        runfile.load(str(run))
    run.write_text("name: t\nmodel: {path: /nowhere/at/all/model}\ndata: {path: x.jsonl}\n"
                   "train: {max_steps: 2}\n")
    with pytest.raises(ConfigError, match=r"no such folder: /nowhere/at/all/model\n.*fix: point "
                                          r"it at a save_pretrained folder \(with config.json\)\n"):
        runfile.load(str(run))  # a lost local folder is not taken for a Hub id


def test_bad_rows_are_counted_once(fake_model, tmp_path):
    """100 read rows, all unusable: 100 of the first 100, and max_bad_rows 0.5 does not pass it."""
    (tmp_path / "train.jsonl").write_text('{"text": ["not", "text"]}\n' * 150)
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {fake_model}}}\n"
                   f"data: {{path: {tmp_path}/train.jsonl, max_bad_rows: 0.5}}\n"
                   "train: {max_steps: 2}\n")
    with pytest.raises(ConfigError, match=r"100 of the first 100 rows .*validate reads the first "
                                          r"100 rows"):
        runfile.load(str(run), inputs=True)


def test_version(capsys):
    with pytest.raises(SystemExit, match="0"):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("ftlaunch 0.")


def test_status_of_a_run_that_failed_while_loading():
    from launcher.ops import status
    ex = {"code": 1, "step": -1, "time": "t", "message": "ImportError: flash_attn"}
    st = {"run": "r", "run_dir": "/r", "state": "failed", "step": 0, "max_steps": 10,
          "loss": None, "lr": None, "eval_loss": None, "eval_step": None, "tokens_per_s": None,
          "step_time_s": None, "time_left_s": None, "checkpoint": None, "checkpoint_step": None,
          "exit": ex, "last_failure": ex, "slurm": None}
    text = status.render(st)
    assert "exit 1 before the first step (while loading) (t): ImportError: flash_attn" in text
    assert "step -1" not in text


def test_cluster_mem_0_is_all_of_the_node_not_unknown(tiny, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {tiny['model']}}}\n"
                   f"data: {{path: {tiny['text']}, max_seq_len: 64}}\ntrain: {{max_steps: 3}}\n"
                   "cluster: {mem: '0', gpu_memory: 80GiB}\n")
    assert cli.main(["plan", str(run)]) == 0
    out = capsys.readouterr().out
    assert "cluster.mem 0 asks for all of the node's memory" in out
    assert "node memory unknown" not in out


def test_slurm_renders_for_a_folder_with_config_json_alone_and_submit_refuses(tmp_path, capsys,
                                                                              monkeypatch):
    """The job is written before the weights are downloaded (plan can plan it too); what the job
    would fail on is said, and --submit refuses it before anything reaches sbatch."""
    import os
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "m").mkdir()
    shutil.copy(os.path.join(root, "tests", "configs", "llama-2-7b", "config.json"), tmp_path / "m")
    jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    run = tmp_path / "run.yaml"
    run.write_text("name: x\nmodel: {path: m}\ndata: {path: d.jsonl, max_seq_len: 64}\n"
                   "train: {max_steps: 10}\ncluster: {nodes: 1, gpus_per_node: 8}\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["slurm", str(run)]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "runs" / "x" / "job.sbatch").exists()
    assert "model.path:" in err and "holds no weights" in err and "before --submit" in err
    assert cli.main(["slurm", str(run), "--submit", "--overwrite"]) == 2
    assert "holds no weights" in capsys.readouterr().err
