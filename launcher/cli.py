"""`ftlaunch` subcommands: parse arguments, call the module that does the work, print.

The login-node commands (validate, ds-config, slurm) never import torch and friends; plan
imports them lazily for a meta-device model only; run and train are the rank half.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence, TypeVar

from launcher.cluster import layout
from launcher.config.errors import ConfigError
from launcher.config.yaml_reader import OVERRIDE_WORD


T = TypeVar("T")
OVERRIDE_HELP = """overrides:
  key.sub=value anywhere on the command line, before or after the options, applied in order
  on top of {what} (split on the first '='; later wins), e.g.
    ftlaunch {cmd} {example}"""
# A command-line word that is an override: a dotted key, '=', anything (never an option); the
# grammar is the reader's, so every form recognised here is applied there.
OVERRIDE = OVERRIDE_WORD


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_file", metavar="RUN.yaml", help="the run file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides applied on top of the file (split on the first '=')")


def _command(sub, name: str, help: str, *, run_file: bool = True, example: str = "") -> argparse.ArgumentParser:
    what = "the run file" if run_file else "the run's resolved.yaml"
    example = example or "RUN.yaml --dry-run train.lr=1e-4 train.max_steps=10"
    p = sub.add_parser(name, help=help, description=help,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=OVERRIDE_HELP.format(what=what, cmd=name, example=example))
    if run_file:
        _add_run(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ftlaunch", description="Fine-tune a Hugging Face causal LM "
                                 "with DeepSpeed from one YAML run file.",
                                 epilog="`ftlaunch COMMAND --help` shows a command's options and "
                                 "the key=value override syntax.")
    from launcher import __version__
    ap.add_argument("--version", action="version", version=f"ftlaunch {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _commands(sub)
    return ap


def _commands(sub) -> None:
    _commands_before(sub)
    _commands_on_and_after(sub)


def _commands_before(sub) -> None:
    """What a user runs before the queue: checks, DeepSpeed JSON, plan, data, the job, a local run."""
    p = _command(sub, "validate", "check a run file: every problem at once, or OK",
                 example="RUN.yaml train.lr=1e-4 deepspeed.zero_stage=3")

    p = _command(sub, "ds-config", "print or write the complete DeepSpeed JSON",
                 example="RUN.yaml -o ds.json train.lr=1e-4")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--world-size", type=_positive_int,
                   help="ranks (default: cluster nodes x gpus_per_node)")

    p = _command(sub, "plan", "memory plan per GPU and node: does it fit, what to change",
                 example="RUN.yaml --gpu-memory 40GiB train.micro_batch_size=2")
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB (GB = 10**9 bytes; default: "
                   "cluster.gpu_memory, else cluster.gpu_type's)")
    p.add_argument("--node-memory", help="CPU memory of one node, e.g. 512GiB (default: cluster.mem)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--explain", action="store_true", help="show the formula behind every term")
    p.add_argument("--max-seq-len", action="store_true", help="also the longest sequence that fits "
                   "per GPU as configured and with each long-sequence switch on (docs/long-sequences.md)")
    p.add_argument("--probe", action="store_true",
                   help="train.device cpu: measure the ranks' kernel memory on this machine "
                        "(a few seconds, cached) instead of planning its range")

    p = _command(sub, "data", "what the model will learn: tokens, trained part, lengths, "
                 "sources; --show N marks it in N examples", example="RUN.yaml --show 3")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N examples, marked")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "slurm", "write the run directory and sbatch script; optionally submit",
                 example="RUN.yaml --submit cluster.nodes=4")
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    p.add_argument("--test-only", action="store_true",
                   help="ask the scheduler whether and where it would run (sbatch --test-only)")
    p.add_argument("--force", action="store_true", help="submit even if the plan does not fit")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="a run directory and a job for each value (repeat for every combination; "
                        "every point is checked before any is written or submitted)")
    _add_existing(p)

    p = _command(sub, "run", "run here: all local GPUs, or CPU ranks where there are none")
    p.add_argument("--nproc", type=int, help="ranks to start (default: local GPUs, or 2 CPU ranks)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the plan and freeze report, run a few steps, save nothing")
    p.add_argument("--force", action="store_true", help="run even if the memory plan does not fit")
    _add_existing(p)


def _commands_on_and_after(sub) -> None:
    """What the job runs on the nodes, and what a user runs during and after a run."""
    p = _command(sub, "train", "the per-rank entry point (started by torchrun/deepspeed/srun)",
                 example="RUN.yaml train.log_every=10")

    p = _command(sub, "export", "a Hugging Face folder (config, generation config, tokenizer, "
                 "sharded safetensors) or LoRA adapter from a complete checkpoint, any ZeRO stage",
                 run_file=False, example="runs/demo -o out/ --dtype bf16 model.path=/new/base")
    p.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR",
                   help="a checkpoint folder (RUN_DIR/checkpoints/step-N) or a run directory "
                        "(its newest complete checkpoint)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write (new or empty)")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA runs: write the base with the adapter merged instead of the adapter")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="weights' dtype (default: the run's model.dtype)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides of the run's resolved.yaml, e.g. model.path=... if the base moved")

    p = _command(sub, "status", "where a run stands: step of max, losses, tokens/s, time left, "
                 "last checkpoint, last failure, Slurm job state", run_file=False,
                 example="runs/demo --json")
    p.add_argument("run_dir", nargs="+", metavar="RUN_DIR", help="the run directory (or several)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "runs", "the runs under a folder: state, step, Slurm job", run_file=False,
                 example="runs/ --json")
    p.add_argument("dir", nargs="?", metavar="DIR", help="where to look (default: runs/, else .)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "stop", "ask a run's ranks to checkpoint and stop (a Slurm job then ends "
                 "COMPLETED; submit it again to continue)", run_file=False, example="runs/demo")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")

    p = _command(sub, "preflight", "check the nodes before training (the job script runs it, one "
                 "task per node)", run_file=False, example="RUN_DIR/resolved.yaml")
    p.add_argument("run_file", metavar="RUN_DIR/resolved.yaml", help="the run directory's resolved.yaml")
    p.add_argument("--bad-nodes", metavar="FILE", help="node 0 writes a line per failed node here")

    p = _command(sub, "convert", "a run file from an Axolotl or LLaMA-Factory config, with a "
                 "report of every setting carried, approximated or dropped", run_file=False,
                 example="axolotl.yml -o run.yaml")
    p.add_argument("config", metavar="CONFIG", help="the peer's YAML config")
    p.add_argument("--from", dest="peer", choices=("axolotl", "llamafactory"),
                   help="whose config it is (default: detected from its keys)")
    p.add_argument("-o", "--output", required=True, metavar="RUN.yaml", help="the run file to write")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_existing(p: argparse.ArgumentParser) -> None:
    """--resume / --overwrite; the policy they make is launcher.cluster.rundir.on_existing."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue an existing run directory even if the config changed")
    g.add_argument("--overwrite", action="store_true",
                   help="move an existing run directory aside and start fresh")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv; key=value words anywhere after the command are overrides (in their order)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    sub = subparser(ap, args.command)
    late = [w for w in extra if OVERRIDE.match(w)]
    rest = [w for w in extra if not OVERRIDE.match(w)]
    if rest:
        sub.error(f"unrecognized arguments: {' '.join(rest)} (overrides are key.sub=value)")
    args.overrides = list(getattr(args, "overrides", None) or []) + late
    return args


def subparser(ap: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in ap._actions:  # argparse keeps the subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return layout.EXIT_CONFIG
    except KeyboardInterrupt:
        print("ftlaunch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`ftlaunch ... | head`): no traceback, and none at exit either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def typed_call(cls: type[T], args: argparse.Namespace) -> T:
    """The command's typed call (a dataclass of its module) from the parsed arguments: each field
    taken from the argument of its name, lists as tuples. No module below this one sees argparse."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def cmd_validate(args: argparse.Namespace) -> int:
    from launcher.config.runfile import load
    from launcher.checks.summary import summary
    cfg = load(args.run_file, args.overrides, inputs=True)
    from launcher.config.secret_env import warn_in_clear
    warn_in_clear(cfg)
    print(f"OK {args.run_file}")
    print(summary(cfg))
    return 0


def cmd_ds_config(args: argparse.Namespace) -> int:
    from launcher.dsconfig import build as ds_config
    from launcher.common.files import write_atomic
    from launcher.config.runfile import load
    cfg = load(args.run_file, args.overrides)
    built = ds_config.build(cfg, args.world_size)
    text = ds_config.dumps(built)
    if cfg.deepspeed.config_file:
        from launcher.dsconfig import user_file as ds_file
        for line in ds_file.notes(cfg, built):
            print(f"note: {line}", file=sys.stderr)
    if args.output:
        try:
            write_atomic(args.output, text)
        except OSError as exc:
            print(f"ftlaunch: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return layout.EXIT_CONFIG
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.memory.planner import PlanCall, main as plan_main
    return plan_main(typed_call(PlanCall, args))


def cmd_data(args: argparse.Namespace) -> int:
    from launcher.data.report import DataCall, main as data_main  # rank half, lazily
    return data_main(typed_call(DataCall, args))


def cmd_slurm(args: argparse.Namespace) -> int:
    from launcher.cluster.slurm import SlurmCall, main as slurm_main
    return slurm_main(typed_call(SlurmCall, args))


def cmd_run(args: argparse.Namespace) -> int:
    from launcher.cluster.local_run import RunCall, main as run_main
    return run_main(typed_call(RunCall, args))


def cmd_train(args: argparse.Namespace) -> int:
    from launcher.cluster import rank_guard
    if rank_guard.wanted():  # the work runs in a child; a death by signal is recorded
        return rank_guard.run(args.run_file, args.overrides)
    from launcher.rank.train import TrainCall, main as train_main
    return train_main(typed_call(TrainCall, args))


def cmd_convert(args: argparse.Namespace) -> int:
    from launcher.convert.command import ConvertCall, main as convert_main
    return convert_main(typed_call(ConvertCall, args))


def cmd_preflight(args: argparse.Namespace) -> int:
    from launcher.cluster import run_state
    from launcher.rank.preflight import PreflightCall, main as preflight_main
    run_state.leave(preflight_main(typed_call(PreflightCall, args)))  # a process of its own (srun), like a rank


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.rank.export import ExportCall, main as export_main
    return export_main(typed_call(ExportCall, args))


def cmd_status(args: argparse.Namespace) -> int:
    from launcher.ops.status import StatusCall, main as status_main
    return status_main(typed_call(StatusCall, args))


def cmd_runs(args: argparse.Namespace) -> int:
    from launcher.ops.status import RunsCall, runs_main
    return runs_main(typed_call(RunsCall, args))


def cmd_stop(args: argparse.Namespace) -> int:
    from launcher.ops.stop import StopCall, main as stop_main
    return stop_main(typed_call(StopCall, args))


COMMANDS = {"validate": cmd_validate, "ds-config": cmd_ds_config, "plan": cmd_plan,
            "data": cmd_data, "slurm": cmd_slurm, "run": cmd_run, "train": cmd_train,
            "preflight": cmd_preflight, "convert": cmd_convert, "export": cmd_export,
            "status": cmd_status, "runs": cmd_runs, "stop": cmd_stop}
