"""Sweeps: several runs from one run file, `ftlaunch slurm RUN.yaml --sweep KEY=V1,V2 ...`.

Each `--sweep` names one run-file key and its values (split on the commas outside brackets and
quotes, so `--sweep 'freeze.train=[a,b],[c]'` gives two lists); several `--sweep`s make every
combination, in the order given. Each point is the run file with the ordinary overrides, then
its own values, and gets a run directory and a job of its own: output.dir is the base run
directory with the point's values appended (`runs/demo_lr-1e-5_grad_accum-4`, the same words
every time, so that submitting the sweep again finds and resumes the same directories), and the
job name likewise where it fits Slurm's 64 characters. `ftlaunch slurm` checks every point
(run file, inputs, plan, a live job on its directory) before it writes or submits any: one bad
point refuses the sweep, naming it. An sbatch array would run its tasks in one run directory,
which is why `--array` is refused with a pointer here.
"""
from __future__ import annotations

import itertools
import re

from launcher.config.errors import ConfigError, Problem

# Keys a point may not set: they are what tells the points apart.
OWN = ("name", "output.dir")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def split_values(text: str) -> list[str]:
    """`1e-5,3e-5` -> ['1e-5', '3e-5']; commas inside [], {} or quotes stay (YAML values)."""
    out, depth, quote, word = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(word))
            word = []
            continue
        word.append(ch)
    out.append("".join(word))
    return [w.strip() for w in out]


def axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    """(key, values) per --sweep; ConfigError with every malformed one."""
    found: list[tuple[str, list[str]]] = []
    problems = []
    for spec in specs:
        key, eq, rest = spec.partition("=")
        key = key.strip()
        values = split_values(rest) if eq else []
        if not eq or not key:
            problems.append(Problem("--sweep", f"{spec!r} is not KEY=V1,V2,...",
                                    "write e.g. --sweep train.lr=1e-5,3e-5"))
        elif key in OWN:
            problems.append(Problem("--sweep", f"{key} tells the points apart and is set for each "
                                    "(the base value with the point's values appended)",
                                    "sweep other keys; set the base in the run file"))
        elif any(k == key for k, _ in found):
            problems.append(Problem("--sweep", f"{key} is swept twice",
                                    f"give all its values in one --sweep {key}=V1,V2,..."))
        elif not values or "" in values:
            problems.append(Problem("--sweep", f"{spec!r} has an empty value",
                                    "give each value, separated by commas"))
        elif len(set(values)) != len(values):
            problems.append(Problem("--sweep", f"{spec!r} repeats a value",
                                    "give each value once"))
        else:
            found.append((key, values))
    if problems:
        raise ConfigError(problems, "--sweep")
    return found


def _word(value: str) -> str:
    """A value as it appears in folder and job names: letters, digits, '.', '-', '+' kept."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"


def labels(found: list[tuple[str, list[str]]]) -> dict[str, str]:
    """The word each swept key has in names: its last part (train.lr -> lr), else the whole key
    where two keys end alike."""
    last = [k.split(".")[-1] for k, _ in found]
    return {k: (k if last.count(k.split(".")[-1]) > 1 else k.split(".")[-1]) for k, _ in found}


def expand(run_file: str, overrides: list[str], specs: list[str]) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every point: the label says its values (`train.lr=1e-5
    train.grad_accum=4`); the overrides are the ordinary ones, the point's values, its
    output.dir and its name. ConfigError for a malformed --sweep, or two points whose names
    would be the same."""
    from launcher.config.runfile import load
    found = axes(specs)
    base = load(run_file, overrides)   # its problems are every point's: said once, unlabelled
    names = labels(found)
    points, seen = [], {}
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in found]):
        suffix = "_".join(f"{names[k]}-{_word(v)}" for k, v in combo)
        label = " ".join(f"{k}={v}" for k, v in combo)
        if suffix in seen:
            raise ConfigError([Problem("--sweep", f"points {seen[suffix]} and {label} would share "
                                       f"the run directory {base.run_dir}_{suffix}",
                                       "give values that differ in letters or digits")], "--sweep")
        seen[suffix] = label
        name = f"{base.name}_{suffix}"
        own = [f"output.dir={base.run_dir}_{suffix}"] + ([f"name={name}"] if NAME.fullmatch(name)
                                                         else [])
        points.append((label, list(overrides) + [f"{k}={v}" for k, v in combo] + own))
    return points
