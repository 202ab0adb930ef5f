"""The CLI builds a typed call (a dataclass of the command's module) for each command; no module
below cli.py reads argparse fields, and every field of a call is an argument of its command."""
from __future__ import annotations

import ast
import dataclasses
import os

import pytest

from launcher import cli
from launcher.cluster.local_run import RunCall
from launcher.cluster.slurm import SlurmCall
from launcher.convert.command import ConvertCall
from launcher.data.report import DataCall
from launcher.memory.planner import PlanCall
from launcher.ops.status import RunsCall, StatusCall
from launcher.ops.stop import StopCall
from launcher.rank.export import ExportCall
from launcher.rank.preflight import PreflightCall
from launcher.rank.train import TrainCall

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launcher")
CALLS = {"plan": PlanCall, "data": DataCall, "slurm": SlurmCall, "run": RunCall, "train": TrainCall,
         "convert": ConvertCall, "preflight": PreflightCall, "export": ExportCall,
         "status": StatusCall, "runs": RunsCall, "stop": StopCall}


def dests(command: str) -> set[str]:
    sub = cli.subparser(cli.build_parser(), command)
    return {a.dest for a in sub._actions} | {"overrides"}  # cli.parse sets overrides for all


@pytest.mark.parametrize("command", sorted(CALLS))
def test_every_field_of_a_call_is_an_argument_of_its_command(command):
    assert {f.name for f in dataclasses.fields(CALLS[command])} <= dests(command)


def test_every_command_but_the_two_printed_by_the_cli_has_a_call():
    assert set(cli.COMMANDS) - set(CALLS) == {"validate", "ds-config"}


@pytest.mark.parametrize("argv, call", [
    (["slurm", "r.yaml", "--submit", "train.lr=1"],
     SlurmCall(run_file="r.yaml", overrides=("train.lr=1",), submit=True)),
    (["run", "r.yaml", "--nproc", "2", "--dry-run", "cluster.setup[0]=x"],
     RunCall(run_file="r.yaml", overrides=("cluster.setup[0]=x",), nproc=2, dry_run=True)),
    (["plan", "r.yaml", "--json", "--gpu-memory", "40GiB"],
     PlanCall(run_file="r.yaml", json=True, gpu_memory="40GiB")),
    (["convert", "ax.yaml", "--from", "axolotl", "-o", "out.yaml"],
     ConvertCall(config="ax.yaml", output="out.yaml", peer="axolotl")),
    (["stop", "runs/demo"], StopCall(run_dir="runs/demo")),
    (["status", "runs/a", "runs/b", "--json"], StatusCall(run_dir=("runs/a", "runs/b"), json=True)),
    (["train", "r.yaml", "a.b=1"], TrainCall(run_file="r.yaml", overrides=("a.b=1",))),
])
def test_the_cli_builds_the_call(argv, call):
    args = cli.parse(argv)
    assert cli.typed_call(type(call), args) == call


def test_no_module_below_the_cli_takes_the_parsed_arguments():
    """Each command's `main` below cli.py takes its typed call (or, for the modules run with
    `python -m`, their own argv list), and no function reads `getattr(args, ...)`."""
    bad = []
    for folder, _, files in os.walk(PKG):
        for f in files:
            path = os.path.join(folder, f)
            if not f.endswith(".py") or path == os.path.join(PKG, "cli.py"):
                continue
            tree = ast.parse(open(path, encoding="utf-8").read())
            for n in tree.body:
                if isinstance(n, ast.FunctionDef) and (n.name == "main" or n.name.endswith("_main")):
                    first = n.args.args[0]
                    kind = ast.unparse(first.annotation) if first.annotation else ""
                    if not (kind.endswith("Call") or first.arg == "argv"):
                        bad.append(f"{f}:{n.lineno} {n.name}({first.arg}: {kind or '?'})")
            for n in ast.walk(tree):
                if isinstance(n, ast.Call) and ast.unparse(n.func) == "getattr" and n.args \
                        and ast.unparse(n.args[0]) == "args":
                    bad.append(f"{f}:{n.lineno} getattr(args, ...)")
    assert bad == []
