"""Generated reference tables: the run-file fields (README.md) and the DeepSpeed keys the
launcher fills (ds_configs/README.md), both from the code, so they cannot drift.

    python -m launcher.reference           # rewrite the tables between their markers
    python -m launcher.reference --check   # exit 1 if a file is out of date
"""
from __future__ import annotations

import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "python -m launcher.reference"
README = os.path.join(ROOT, "README.md")
DS_README = os.path.join(ROOT, "ds_configs", "README.md")
MARKERS = {README: ("<!-- reference:start -->", "<!-- reference:end -->"),
           DS_README: ("<!-- filled:start -->", "<!-- filled:end -->")}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_text(value: Any) -> str:
    if value == "(required)":
        return "**required**"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, dict)):
        import json
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def fields_table() -> str:
    """Markdown table of every run-file field: key, type, default, what it does."""
    from launcher.config.runfile import fields_reference
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, doc in fields_reference():
        rows.append(f"| `{key}` | {_cell(type_name)} | {_cell(default_text(default))} | {_cell(doc)} |")
    return "\n".join(rows)


def filled_table() -> str:
    """Markdown tables of the DeepSpeed keys the launcher fills, and its own defaults."""
    from launcher.dsconfig.build import FILLED, LAUNCHER_DEFAULTS
    rows = ["| DeepSpeed key | decided by (run file) |", "|---|---|"]
    rows += [f"| `{k}` | `{_cell(v)}` |" for k, v in FILLED.items()]
    rows += ["", "Written by the launcher, changeable through `deepspeed.overrides`:", "",
             "| DeepSpeed key | value |", "|---|---|"]
    rows += [f"| `{k}` | {_cell(default_text(v) if not isinstance(v, str) else v)} |"
             for k, v in LAUNCHER_DEFAULTS.items()]
    return "\n".join(rows)


def _generated(path: str) -> str:
    return fields_table() if path == README else filled_table()


def render(path: str, text: str) -> str:
    """text with the generated table between the markers of path."""
    start, end = MARKERS[path]
    if start not in text or end not in text:
        raise ValueError(f"{path} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{_generated(path)}\n{end}{tail}"


def stale() -> list[str]:
    """The files whose generated tables differ from the code."""
    out = []
    for path in MARKERS:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if render(path, text) != text:
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        bad = stale()
        for path in bad:
            print(f"{os.path.relpath(path, ROOT)} is out of date: run `{COMMAND}`", file=sys.stderr)
        return 1 if bad else 0
    if argv:
        print(f"usage: {COMMAND} [--check]", file=sys.stderr)
        return 2
    from launcher.common.files import write_atomic
    for path in MARKERS:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        new = render(path, text)
        if new != text:
            write_atomic(path, new)
            print(f"updated {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
