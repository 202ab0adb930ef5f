"""The start-up hand-off from the login node to the ranks: the run file parsed once per process,
`ftlaunch run`'s local changes made on the typed config, resolved.yaml the one file the ranks
are given, and ds_config.json written by one function (launcher/cluster/rundir.py `prepare`)."""
from __future__ import annotations

import ast
import json
import os

import pytest

from launcher.cluster import layout, local_run, step_time
from launcher.config import runfile
from launcher.config.errors import ConfigError
from test_local_run import args, run_text

LAUNCHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launcher")
WRITES = {"write_atomic", "write_atomic_bytes", "write_text", "write_bytes", "dump"}


def _names_ds_config(node: ast.AST, tainted: set[str]) -> bool:
    return any((isinstance(n, ast.Attribute) and n.attr == "DS_CONFIG")
               or (isinstance(n, ast.Name) and n.id in tainted | {"DS_CONFIG"})
               or (isinstance(n, ast.Constant) and n.value == layout.DS_CONFIG)
               for n in ast.walk(node))


def _is_write(call: ast.Call) -> bool:
    """A write helper, or open() in a writing mode."""
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    if name in WRITES:
        return True
    return name in ("open", "fdopen") and any(
        isinstance(a, ast.Constant) and isinstance(a.value, str) and bool(set(a.value) & set("wax"))
        for a in list(call.args[1:]) + [k.value for k in call.keywords if k.arg == "mode"])


def _writes_ds_config(fn: ast.AST) -> bool:
    """Whether a function writes a file whose path names ds_config.json (directly or through a
    variable assigned from such a path)."""
    tainted: set[str] = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Assign) and _names_ds_config(n.value, tainted):
            tainted |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    return any(isinstance(n, ast.Call) and _is_write(n)
               and any(_names_ds_config(a, tainted) for a in n.args[:1] + [
                   k.value for k in n.keywords if k.arg in ("path", "file")])
               or isinstance(n, ast.Call) and getattr(n.func, "attr", "") in ("write_text",
                                                                              "write_bytes")
               and _names_ds_config(n.func.value, tainted)
               for n in ast.walk(fn))


def ds_config_writers() -> list[str]:
    """module:function of every function that names ds_config.json and writes a file."""
    out = []
    for folder, _, names in os.walk(LAUNCHER):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        _writes_ds_config(fn):
                    out.append(f"{os.path.relpath(path, LAUNCHER)}:{fn.name}")
    return sorted(out)


def test_one_function_writes_ds_config_json():
    """A second writer (a rank rewriting it, a command writing its own) fails here."""
    assert ds_config_writers() == ["cluster/rundir.py:prepare"]


def test_the_writer_scan_sees_a_second_writer(tmp_path, monkeypatch):
    """The scan above finds a rank-side rewrite like the one this replaced, and a write through
    a variable; reads and mere mentions are not writes."""
    fake = tmp_path / "launcher" / "rank"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text(
        "def main(cfg, ds):\n"
        "    rundir.write_atomic(os.path.join(cfg.run_dir, layout.DS_CONFIG), json.dumps(ds))\n"
        "def other(run_dir, ds):\n"
        "    path = os.path.join(run_dir, 'ds_config.json')\n"
        "    with open(path, 'w') as fh:\n"
        "        json.dump(ds, fh)\n"
        "def status(run_dir):\n"
        "    print(layout.DS_CONFIG)\n"
        "    write_atomic(os.path.join(run_dir, layout.PLAN), 'x')\n"
        "    with open(os.path.join(run_dir, layout.DS_CONFIG), encoding='utf-8') as fh:\n"
        "        return fh.read()\n")
    monkeypatch.setitem(globals(), "LAUNCHER", str(tmp_path / "launcher"))
    assert ds_config_writers() == ["rank/x.py:main", "rank/x.py:other"]


@pytest.fixture
def launched(monkeypatch):
    """local_run.launch recorded, no ranks started; exit 0."""
    seen: dict = {}

    def fake(cmd, env, run_dir):
        seen.update(cmd=list(cmd), run_dir=run_dir)
        return layout.EXIT_OK
    monkeypatch.setattr(local_run, "launch", fake)
    return seen


def test_run_parses_the_run_file_once_and_writes_the_exact_epoch_steps(tiny, tmp_path, write_run,
                                                                      launched, monkeypatch):
    """`ftlaunch run` of an epoch run: one parse of the run file in this process, the local
    ranks set on the typed config, and ds_config.json with the steps counted from the rows the
    data check read (what the ranks count), the only hand-off to the ranks resolved.yaml."""
    from launcher.config import epochs
    path = write_run(run_text(tiny, tmp_path, train="{epochs: 2, micro_batch_size: 4, "
                                                    "global_batch_size: 16, warmup_ratio: 0.25, "
                                                    "device: cpu}"))
    parsed = []
    real = runfile.parse
    monkeypatch.setattr(runfile, "parse", lambda *a, **k: parsed.append(a[1]) or real(*a, **k))
    checked = []
    real_check = local_run.check_data
    monkeypatch.setattr(local_run, "check_data", lambda cfg: checked.append(cfg) or real_check(cfg))
    assert local_run.main(args(path, nproc=2, overrides=["train.lr=0.002"])) == 0
    assert parsed == [("train.lr=0.002",)]
    run_dir = tmp_path / "run"
    resolved = runfile.load(str(run_dir / layout.RESOLVED))
    assert (resolved.cluster.nodes, resolved.cluster.gpus_per_node, resolved.train.device,
            resolved.train.grad_accum, resolved.train.lr) == (1, 2, "cpu", None, 0.002)
    assert checked[0] == resolved   # the data check read the config the ranks read
    assert launched["cmd"][-1] == str(run_dir / layout.RESOLVED)
    from launcher.rank import inputs
    rows = len(inputs.load_data(resolved, inputs.load_tokenizer(resolved)).train)
    want = epochs.resolve(resolved, rows, 2).train
    ds = json.loads((run_dir / layout.DS_CONFIG).read_text())
    assert ds["scheduler"]["params"]["total_num_steps"] == want.max_steps
    assert ds["scheduler"]["params"]["warmup_num_steps"] == want.warmup_steps


def test_local_changes_are_checked_again(tiny, tmp_path, write_run, launched):
    """A rule broken by the local ranks (global batch over 3 ranks) is refused by name."""
    path = write_run(run_text(tiny, tmp_path, train="{max_steps: 2, micro_batch_size: 2, "
                                                    "global_batch_size: 16, device: cpu}"))
    with pytest.raises(ConfigError, match=r"16 is not a multiple of micro_batch_size x ranks "
                                          r"= 2 x 3"):
        local_run.main(args(path, nproc=3))
    assert "cmd" not in launched


def test_dry_run_config_is_the_typed_change(tiny, tmp_path, write_run):
    cfg = runfile.load(write_run(run_text(tiny, tmp_path, train="{epochs: 1, warmup_ratio: 0.5, "
                                                               "checkpoint_every: epoch, "
                                                               "device: cpu}")))
    dry = local_run.dry_run_config(local_run.local_config(cfg, "cpu", 2), str(tmp_path / "dry"))
    t = dry.train
    assert (t.max_steps, t.epochs, t.warmup_steps, t.warmup_ratio, t.checkpoint_every,
            t.eval_every, t.resume, t.log_every) == (step_time.DRY_WARMUP + step_time.DRY_MEASURED, None, 0, 0.0, 0, 0,
                                                     "never", 1)
    assert dry.run_dir == str(tmp_path / "dry") and dry.world_size == 2
    assert runfile.recheck(dry, "run.yaml") is dry
