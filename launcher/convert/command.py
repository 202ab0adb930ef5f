"""`ftlaunch convert CONFIG [--from axolotl|llamafactory] -o RUN.yaml`: a run file from a peer's config.

Every key of the peer's YAML ends up in exactly one line of the report: carried (the same
setting under a run-file key), approximated (a run-file setting close to it, and how it
differs) or dropped (why). The tables, one per peer, live in `launcher/convert/peers.py`;
this module reads the file, detects the peer, applies the table and writes the run file.
Chat data and dataset lists map onto data.messages_field / chat_template / train_on / mix.
Relative paths that name something beside the peer's file are rewritten relative to the written
run file's folder (the run file resolves relative paths against its own folder); keys present
with no value (`unfrozen_parameters:`) are dropped as unset. Torch-free (login node).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import yaml
from dataclasses import dataclass

from launcher.convert.out import Out, Report
from launcher.config.errors import ConfigError, Problem

PEERS = ("axolotl", "llamafactory")


def detect(tree: dict) -> Optional[str]:
    """Which peer wrote the config, from keys only one of them uses."""
    if any(k in tree for k in ("model_name_or_path", "finetuning_type", "stage", "cutoff_len")):
        return "llamafactory"
    if any(k in tree for k in ("base_model", "datasets", "sequence_len", "micro_batch_size",
                               "num_epochs")):
        return "axolotl"
    return None


def convert(tree: dict, peer: str, *, name: str, base_dir: str = ".") -> tuple[dict, Report]:
    """(run-file tree, report) for a peer config tree."""
    from launcher.convert import llamafactory as convert_llamafactory, peers as convert_peers
    out = Out()
    out.set("name", name)
    table = convert_peers.AXOLOTL if peer == "axolotl" else convert_llamafactory.LLAMAFACTORY
    for key, value in tree.items():
        handler = table.get(key)
        if value is None or value == "" or value == [] or value == {}:
            out.drop(key, "empty in the peer's file: the default applies")  # `key:` with no value
        elif handler is None:
            out.drop(key, "no ftlaunch equivalent" if key not in convert_peers.IGNORED
                     else convert_peers.IGNORED[key])
        else:
            handler(out, key, value, tree, base_dir)
    convert_peers.finish(out, peer, tree, base_dir)
    return out.tree, out.report


PATH_KEYS = ("model.path", "model.tokenizer", "data.path", "data.eval_path", "data.chat_template",
             "deepspeed.config_file")


def rebase_paths(run: dict, base_dir: str, out_dir: str, report: Report) -> None:
    """Relative paths that name a file or folder beside the peer's config, rewritten relative to
    the written run file's folder (the run file resolves paths against its own folder), so the
    run file validates from where it is. Hub ids and names of nothing on disk stay as given."""
    def fix(node: dict, key: str, where: str) -> None:
        value = node.get(key)
        if not isinstance(value, str) or not value or os.path.isabs(value):
            return
        found = os.path.join(base_dir, value)
        if not os.path.exists(found):
            return
        new = os.path.relpath(found, out_dir)
        if new != value:
            node[key] = new
            report.approximated.append((where, where, f"{value!r} -> {new!r} (relative to the "
                                        "run file's folder, the same file)"))
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        if isinstance(run.get(section), dict):
            fix(run[section], key, dotted)
    for i, src in enumerate((run.get("data") or {}).get("mix") or []):
        for key in ("path", "chat_template"):
            if isinstance(src, dict):
                fix(src, key, f"data.mix[{i}].{key}")


def _order(tree: dict) -> dict:
    sections = ("name", "model", "quantization", "freeze", "data", "train", "deepspeed",
                "cluster", "output")
    return {k: tree[k] for k in sections if k in tree}


@dataclass(frozen=True)
class ConvertCall:
    """What `ftlaunch convert` was asked: the peer's config, the run file to write, the peer."""
    config: str
    output: str | None = None
    peer: str | None = None


def main(call: ConvertCall) -> int:
    from launcher.common.files import write_atomic
    try:
        with open(call.config, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([Problem("<file>", f"cannot read {call.config}: {exc}",
                                   "give an Axolotl or LLaMA-Factory YAML file")], "convert") from None
    if not isinstance(tree, dict):
        raise ConfigError([Problem("<file>", f"{call.config} is not a YAML mapping",
                                   "give an Axolotl or LLaMA-Factory YAML file")], "convert")
    peer = call.peer or detect(tree)
    if peer is None:
        raise ConfigError([Problem("--from", f"cannot tell whose config {call.config} is",
                                   "say --from axolotl or --from llamafactory")], "convert")
    stem = os.path.splitext(os.path.basename(call.config))[0]
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "run"
    base_dir = os.path.dirname(os.path.abspath(call.config))
    run, report = convert(tree, peer, name=name[:64], base_dir=base_dir)
    rebase_paths(run, base_dir, os.path.dirname(os.path.abspath(call.output)), report)
    text = (f"# converted by `ftlaunch convert` from {call.config} ({peer}); the report of every "
            "setting is printed with it\n" + yaml.safe_dump(_order(run), sort_keys=False))
    write_atomic(call.output, text)
    sys.stdout.write(f"wrote {call.output} from {peer} config {call.config}\n" + report.render())
    return 0
