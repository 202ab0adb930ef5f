"""The module map (docs/modules.md): every module of the package, its half, and its docstring.

    python -m launcher.module_map --write      # regenerate docs/modules.md (a test checks it)

The login half answers on a login node without torch; the rank half runs on the ranks. Which
modules are the rank half, and which login-half modules may import a heavy library inside a
function (and why), is stated here once: tests/test_structure.py enforces it on every import.
"""
from __future__ import annotations

import ast
import os
import sys

RANK_HALF = {
    "launcher.train", "launcher.loop_steps", "launcher.preflight", "launcher.export",
    "launcher.lr_schedule", "launcher.node_checks", "launcher.timeouts",
    "launcher.engine_stats", "launcher.inputs", "launcher.tokens",
    "launcher.data",
}
RANK_PACKAGES = ("launcher.data.",)   # every module of these packages is rank half too
# (login-half module, heavy library or rank-half module): imported inside a function only, and why.
_META = "the memory plan's meta-device model (config.json only, no weights read)"
LAZY_HEAVY_REASONS = {
    ("launcher.cli", "launcher.train"): "`ftlaunch train`: the ranks' entry point, run by torchrun",
    ("launcher.cli", "launcher.preflight"): "`ftlaunch preflight`: run by the job on every node",
    ("launcher.cli", "launcher.data"): "`ftlaunch data`: tokenizes the data as the ranks will",
    ("launcher.cli", "launcher.data.report"): "`ftlaunch data`: tokenizes the data as the ranks will",
    ("launcher.memory.inventory", "torch"): _META,
    ("launcher.memory.inventory", "transformers"): _META,
    ("launcher.cli", "launcher.export"): "`ftlaunch export`: DeepSpeed's consolidation of a checkpoint",
    ("launcher.checkpoint", "torch"): "saving and loading through the engine, and the ranks' "
                                      "collectives (ranks only); listing and verifying "
                                      "checkpoints (status, run) is torch-free",
    ("launcher.collectives", "torch"): "the ranks' collectives (one door for all of them); "
                                       "checkpoint listing imports the module torch-free",
    ("launcher.decay", "torch"): "the LayerNorm type rule on a real model (ranks); the plan "
                                 "uses the name rule alone, torch-free",
    ("launcher.metrics", "torch"): "the ranks' memory figure per step and TensorBoard writer "
                                   "(torch.utils.tensorboard); validate only asks whether "
                                   "tensorboard is installed",
    ("launcher.metrics", "wandb"): "the ranks' W&B run; validate only asks whether it is installed",
    ("launcher.memory.traced", "torch"): "the plan's activations, traced on meta-device blocks",
    ("launcher.memory.traced", "transformers"): "the plan's activations: the model's own blocks",
    ("launcher.memory.planner", "torch"): "a local GPU's memory when no size is given",
    ("launcher.memory.probe", "torch"): "the CPU kernels probe, run in a child process",
    ("launcher.memory.probe", "transformers"): "the probe builds one block of the model",
    ("launcher.device", "torch"): "`ftlaunch run` counts this machine's GPUs (its ranks start "
                                  "here); the ranks map dtype names",
    ("launcher.lora", "torch"): "LoRA applied to a model: on the ranks, and by the memory plan "
                                "on its meta-device model",
    ("launcher.lora", "peft"): "LoRA applied to a model (ranks; the plan's meta model)",
    ("launcher.lora", "deepspeed"): "ZeRO-3 parameters gathered for the LoRA export (ranks)",
    ("launcher.lora", "transformers"): "the merged LoRA export (ranks)",
    ("launcher.quantize", "bitsandbytes"): "the 8-bit optimizer and the installed check (ranks); "
                                           "validate uses only its torch-free checks",
    ("launcher.quantize", "transformers"): "BitsAndBytesConfig for from_pretrained (ranks)",
}
LAZY_HEAVY = set(LAZY_HEAVY_REASONS)
ROOT = os.path.dirname(os.path.abspath(__file__))


def is_rank_half(name: str) -> bool:
    return name in RANK_HALF or name.startswith(RANK_PACKAGES)


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
             "tests/test_structure.py fails when it is stale, on any import cycle, and on any "
             "import of the rank half (or of torch, deepspeed, transformers, datasets, "
             "bitsandbytes, peft) from the login half.", ""]
    halves = (("login", "answers on a login node without torch: run files, checks, DeepSpeed "
               "JSON, the memory plan, Slurm scripts, launching", lambda m: not is_rank_half(m)),
              ("rank", "runs on the compute nodes, on every rank under torchrun / srun (and the "
               "per-node preflight): model, DeepSpeed, data, training, checkpoints", lambda m: is_rank_half(m)))
    for half, what, keep in halves:
        lines += [f"## The {half} half", "", what + ".", "", "| module | what it does |", "|---|---|"]
        for name in sorted(mods):
            if name != "launcher" and keep(name):
                text = summary(mods[name]).replace("|", "\\|")
                lines.append(f"| `{name}` | {text} |")
        lines.append("")
    lines += ["## What the login half imports inside a function, and why", "",
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
