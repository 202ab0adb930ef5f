"""The trackers a run asks for (`output.report_to`, DeepSpeed monitor sections in
`deepspeed.overrides`) whose package is not installed: looked up, never imported (login half;
the ranks' trackers themselves are launcher/rank/metrics.py).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Iterator

from launcher.config.errors import Problem

# report_to name -> (module to import, pip package)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
# DeepSpeed monitor sections -> (module its monitor imports, pip package)
DS_MONITORS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
               "comet": ("comet_ml", "comet_ml")}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(cfg: Any) -> Iterator[Problem]:
    """A Problem for each logger asked for whose package is missing."""
    for i, name in enumerate(cfg.output.report_to):
        module, pip = PACKAGES[name]
        if not installed(module):
            yield Problem(f"output.report_to[{i}]", f"{name} is not installed on this machine",
                          f"pip install {pip} (in the environment the ranks use), or remove "
                          f"{name} from output.report_to")
    for section, (module, pip) in DS_MONITORS.items():
        block = cfg.deepspeed.overrides.get(section)
        if isinstance(block, dict) and block.get("enabled") and not installed(module):
            yield Problem(f"deepspeed.overrides.{section}", f"DeepSpeed's {section} monitor needs "
                          f"{module}, which is not installed (the ranks would fail at initialize)",
                          f"pip install {pip}, or use output.report_to: [{section}] instead"
                          if section in PACKAGES else f"pip install {pip}, or remove the section")
