"""ConfigError: every problem with a run file at once, each with its key path and a fix."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a run: where it is, what is wrong, and how to fix it."""

    key: str
    message: str
    fix: str = ""
    where: str = ""  # "run.yaml:12", "override 'a.b=c'", or ""

    def render(self) -> str:
        head = f"{self.key}" + (f" ({self.where})" if self.where else "")
        text = f"  {head}: {self.message}"
        if self.fix:
            text += f"\n      fix: {self.fix}"
        return text


class ConfigError(Exception):
    """Raised with every problem found, never just the first."""

    def __init__(self, problems: Sequence[Problem], source: str = "run file"):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        lines = [f"{self.source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [p.render() for p in self.problems]
        return "\n".join(lines)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.problems]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"did you mean 'X'?" for the closest of choices (case ignored), else ''."""
    by_lower: dict[str, str] = {}
    for c in choices:
        by_lower.setdefault(str(c).lower(), str(c))
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean '{by_lower[close[0]]}'?" if close else ""
