"""The module map (docs/modules.md): every module of the package, its half, and its docstring.

    python -m launcher.module_map --write      # regenerate docs/modules.md (a test checks it)

The package is a set of rooms (folders), each with one job; each room belongs to one half. The
login half answers on a login node without torch; the rank half runs on the compute nodes. The
halves are a rule over the folders (LOGIN_PACKAGES, RANK_PACKAGES), and which login-half modules
may import a heavy library or a rank-half module inside a function (and why) is stated here
once: tests/test_layout.py enforces both on every import.
"""
from __future__ import annotations

import ast
import os
import sys

# The rooms of the package, each a folder with one job, and the half each belongs to. A module
# lives in one of them (or is one of TOP_MODULES); the halves are a rule over these folders.
LOGIN_PACKAGES = {
    "launcher.common": "shared utilities every room uses (logging, files, forked workers)",
    "launcher.config": "the run file: schema, YAML reader, overrides, sizes, batch and step "
                       "arithmetic, secrets, ConfigError",
    "launcher.model": "the model as the run builds it, torch-free at import: config.json facts, "
                      "device and dtype, freeze policies, LoRA, quantization, decay, tokens",
    "launcher.dsconfig": "the complete DeepSpeed config and DeepSpeed's key tables",
    "launcher.checks": "`validate`: the rule registry and the login-node input checks",
    "launcher.memory": "`plan`: the memory planner",
    "launcher.cluster": "launching: shell text, sbatch, `ftlaunch run`, rendezvous env, rank "
                        "guardian, the run directory and its files",
    "launcher.convert": "`convert`: peers' configs -> run file",
    "launcher.ops": "`status` and `stop`: during and after a run, from its files",
}
RANK_PACKAGES = {
    "launcher.data": "training data: read, tokenize, mask, pack, sample, collate",
    "launcher.rank": "the per-rank entry point, the loop, collectives, checkpoints, metrics, "
                     "the per-node preflight, the export",
}
# Rooms are listed in dependency order: a room imports only itself and the rooms listed before it
# (the top-level modules may import any room). The exceptions, each inside a function, and why:
ROOMS = (*LOGIN_PACKAGES, *RANK_PACKAGES)
ROOM_CROSSINGS = {
    ("launcher.config.runfile", "launcher.checks.validate"):
        "`load` reports the cross-field rules with the file's own problems in one error; the "
        "rules read the typed config, so they run once it is built",
    ("launcher.config.runfile", "launcher.checks.slurm_checks"):
        "a bad cluster value's message names the form Slurm takes (`suggested_form`, one home)",
    ("launcher.checks.summary", "launcher.cluster.slurm"):
        "the summary shows the CPUs each node's task asks for (`task_cpus`, one home: the job)",
    ("launcher.data.report", "launcher.rank.inputs"):
        "`ftlaunch data` reads the tokenizer and the data exactly as a rank does",
    ("launcher.checks.slurm_checks", "launcher.cluster.step_time"):
        "cluster.time auto is refused only where no step time was measured (one home: the "
        "measurements)",
    ("launcher.memory.clock", "launcher.cluster.step_time"):
        "the time estimate takes a measured step time and writes Slurm's --time and its cap "
        "(one home: the measurements and Slurm's time format)",
    ("launcher.memory.clock", "launcher.data.cache"):
        "tokens per epoch counted by the tokenized cache, where the data was tokenized already "
        "(found from the files alone, no tokenizer loaded)",
    ("launcher.checks.validate", "launcher.cluster.reshard"):
        "cluster.min_nodes is refused where a resume on fewer ranks cannot work (one home: "
        "`reshard.unsupported`, also asked at the resume itself)",
}
# Modules at the top of the package: the command line and the two generators of docs.
TOP_MODULES = {"launcher", "launcher.__main__", "launcher.cli", "launcher.module_map",
               "launcher.reference"}
# The heavy libraries: the login half imports none of them at import time (tests/test_layout.py),
# and validate, ds-config and script rendering none at all (tests/test_light_imports.py).
HEAVY = frozenset({"torch", "deepspeed", "transformers", "datasets", "bitsandbytes", "peft",
                   "safetensors", "accelerate", "tokenizers", "tensorboard", "wandb"})
# (login-half module, heavy library or rank-half module): imported inside a function only, and why.
_META = "the memory plan's meta-device model (config.json only, no weights read)"
LAZY_HEAVY_REASONS = {
    ("launcher.cli", "launcher.rank.train"): "`ftlaunch train`: the ranks' entry point, run by "
                                             "torchrun",
    ("launcher.cli", "launcher.rank.preflight"): "`ftlaunch preflight`: run by the job on every "
                                                 "node",
    ("launcher.cli", "launcher.rank.export"): "`ftlaunch export`: DeepSpeed's consolidation of a "
                                              "checkpoint",
    ("launcher.cli", "launcher.data.report"): "`ftlaunch data`: tokenizes the data as the ranks "
                                              "will",
    ("launcher.memory.inventory", "torch"): _META,
    ("launcher.memory.inventory", "transformers"): _META,
    ("launcher.memory.traced", "torch"): "the plan's activations, traced on meta-device blocks",
    ("launcher.memory.traced", "transformers"): "the plan's activations: the model's own blocks",
    ("launcher.memory.clock", "launcher.data.cache"): "tokens per epoch from the tokenized cache "
                                                      "(read only where it exists)",
    ("launcher.memory.probe", "torch"): "the CPU kernels probe, run in a child process",
    ("launcher.memory.probe", "transformers"): "the probe builds one block of the model",
    ("launcher.cluster.reshard", "deepspeed"): "DeepSpeed's universal-checkpoint converter, run "
                                                "once by rank 0 at a resume on another world size",
    ("launcher.model.decay", "torch"): "the LayerNorm type rule on a real model (ranks); the "
                                       "plan uses the name rule alone, torch-free",
    ("launcher.model.device", "torch"): "`ftlaunch run` counts this machine's GPUs (its ranks "
                                        "start here), the plan reads a local GPU's memory "
                                        "where a driver is; the ranks map dtype names",
    ("launcher.model.lora", "torch"): "LoRA applied to a model: on the ranks, and by the memory "
                                      "plan on its meta-device model",
    ("launcher.model.lora", "peft"): "LoRA applied to a model (ranks; the plan's meta model)",
    ("launcher.model.lora", "deepspeed"): "ZeRO-3 parameters gathered for the LoRA export (ranks)",
    ("launcher.model.lora", "transformers"): "the merged LoRA export (ranks)",
    ("launcher.model.quantize", "bitsandbytes"): "the 8-bit optimizer and the installed check "
                                                 "(ranks); validate uses only its torch-free checks",
    ("launcher.model.quantize", "transformers"): "BitsAndBytesConfig for from_pretrained (ranks)",
    ("launcher.model.tokens", "torch"): "the new embedding rows trained (ranks)",
    ("launcher.model.tokens", "transformers"): "quiet resize of the embeddings (ranks)",
}
LAZY_HEAVY = set(LAZY_HEAVY_REASONS)
ROOT = os.path.dirname(os.path.abspath(__file__))


def package_of(name: str) -> str | None:
    """The room (package) a module belongs to, or None for a top-level module."""
    for pkg in (*LOGIN_PACKAGES, *RANK_PACKAGES):
        if name == pkg or name.startswith(pkg + "."):
            return pkg
    return None


def is_rank_half(name: str) -> bool:
    return package_of(name) in RANK_PACKAGES


def modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file path, for every .py file under the package folder."""
    out: dict[str, str] = {}
    base = os.path.dirname(root)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), base)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                    os.path.join(folder, f)
    return out


def summary(path: str) -> str:
    """The first paragraph of the module's docstring, on one line."""
    with open(path, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def render(root: str = ROOT) -> str:
    mods = modules(root)
    lines = ["# Module map", "",
             "Generated from the module docstrings by `python -m launcher.module_map --write`; "
             "tests/test_layout.py fails when it is stale, on any import cycle, on a module outside "
             "the rooms below, and on any import of the rank half (or of torch, deepspeed, "
             "transformers, datasets, bitsandbytes, peft) from the login half outside the lazy "
             "imports listed at the end.", "",
             "`launcher/` is a set of rooms, one folder per role. The login half (the top-level "
             "modules and " + ", ".join(f"`{p.split('.')[1]}/`" for p in LOGIN_PACKAGES) +
             ") never imports the rank half (" +
             ", ".join(f"`{p.split('.')[1]}/`" for p in RANK_PACKAGES) +
             ") or a heavy library at import time.", ""]
    rooms = [("top", "the command line and the generators of the docs", None)]
    rooms += [(p, what, p) for p, what in LOGIN_PACKAGES.items()]
    rooms += [(p, what, p) for p, what in RANK_PACKAGES.items()]
    halves = (("login", "answers on a login node without torch: run files, checks, DeepSpeed "
               "JSON, the memory plan, Slurm scripts, launching", False),
              ("rank", "runs on the compute nodes, on every rank under torchrun / srun (and the "
               "per-node preflight): data, training, checkpoints, export", True))
    for half, what, rank in halves:
        lines += [f"## The {half} half", "", what[0].upper() + what[1:] + ".", ""]
        for pkg, room, key in rooms:
            if (key in RANK_PACKAGES) != rank:
                continue
            title = "top level" if key is None else f"`{pkg.split('.')[1]}/`"
            lines += [f"### {title}: {room}", "", "| module | what it does |", "|---|---|"]
            for name in sorted(mods):
                if name != "launcher" and package_of(name) == key:
                    text = summary(mods[name]).replace("|", "\\|")
                    lines.append(f"| `{name}` | {text} |")
            lines.append("")
    lines += ["## Where a room imports a later room (inside a function), and why", "",
              "Rooms import only the rooms listed before them above, except here.", "",
              "| module | imports | why |", "|---|---|---|"]
    for (mod, target), why in sorted(ROOM_CROSSINGS.items()):
        lines.append(f"| `{mod}` | `{target}` | {why} |")
    lines += ["", "## What the login half imports inside a function, and why", "",
              "| module | imports | why |", "|---|---|---|"]
    for (mod, lib), why in sorted(LAZY_HEAVY_REASONS.items()):
        lines.append(f"| `{mod}` | {lib} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--write" in argv:
        path = os.path.join(os.path.dirname(ROOT), "docs", "modules.md")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {path}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
