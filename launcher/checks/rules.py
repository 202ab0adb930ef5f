"""The rule registry behind `validate`: `@rule` / `@input_rule` register a generator of
Problems; `check(cfg)` runs them all and skips a rule that reads a field with its own problem.

A rule receives a read-only view of the config that records which fields it reads (plain
attribute access only), so that a rule reading a field with its own problem can be skipped.
The rules themselves: launcher/checks/validate.py and launcher/checks/file_rules.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

from launcher.config.schema import RunConfig
from launcher.config.errors import Problem

Rule = Callable[[RunConfig], Iterator[Problem]]
RULES: list[Rule] = []
INPUT_RULES: list[Rule] = []  # read the run's files (launcher/checks/input_checks.py): check(inputs=True)


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def input_rule(fn: Rule) -> Rule:
    INPUT_RULES.append(fn)
    return fn


def check(cfg: RunConfig, unreliable: Iterable[str] = (), inputs: bool = False) -> list[Problem]:
    """All cross-field problems of a config whose fields are individually valid.

    `unreliable`: dotted keys whose value is a default standing in for something the user
    wrote wrongly (a field with its own problem). A rule that reads one of them is skipped:
    its verdict would be about a value nobody chose. `inputs`: also read the data files, model
    weights, tokenizer and chat template (validate, slurm and run do; plan and ds-config not).
    """
    bad = set(unreliable)
    out: list[Problem] = []
    for r in RULES + (INPUT_RULES if inputs else []):
        reads: set[str] = set()
        found = list(r(_Reads(cfg, "", reads)))  # type: ignore[arg-type]
        if not any(_overlaps(k, b) for k in reads for b in bad):
            out += found
    return out


def input_problems(cfg: RunConfig) -> list[Problem]:
    """The input rules alone: what the data files, model weights, tokenizer and chat template
    say (for `ftlaunch slurm` rendering a job before the files are all in place)."""
    out: list[Problem] = []
    for r in INPUT_RULES:
        out += list(r(_Reads(cfg, "", set())))  # type: ignore[arg-type]
    return out


def _overlaps(read: str, bad: str) -> bool:
    return (read == bad or read.startswith((bad + ".", bad + "["))
            or bad.startswith((read + ".", read + "[")))


# Properties of the config classes and the fields they are computed from.
_PROPERTY_READS = {"world_size": ("cluster.nodes", "cluster.gpus_per_node"),
                   "run_dir": ("output.dir", "name")}


class _Reads:
    """A read-only view of a config that records the dotted keys a rule reads."""

    def __init__(self, obj: Any, prefix: str, reads: set[str]):
        self._obj, self._prefix, self._reads = obj, prefix, reads

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        key = f"{self._prefix}.{name}" if self._prefix else name
        if name in _PROPERTY_READS and not self._prefix:
            self._reads.update(_PROPERTY_READS[name])
        elif dataclasses.is_dataclass(value):
            return _Reads(value, key, self._reads)
        else:
            self._reads.add(key)
        return value
