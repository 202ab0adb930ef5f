"""What `ftlaunch convert` builds: the run-file tree and the report of every peer setting,
carried, approximated (and how) or dropped (and why). Shared by launcher/convert/command.py and the
peers' tables in launcher/convert/peers.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    carried: list[tuple[str, str, Any]] = field(default_factory=list)   # peer key, run key, value
    approximated: list[tuple[str, str, str]] = field(default_factory=list)  # peer key, run key, how
    dropped: list[tuple[str, str]] = field(default_factory=list)        # peer key, why

    def render(self) -> str:
        lines = [f"carried ({len(self.carried)}):"]
        lines += [f"  {p} -> {r} = {v!r}" for p, r, v in self.carried]
        lines += [f"approximated ({len(self.approximated)}):"]
        lines += [f"  {p} -> {r}: {how}" for p, r, how in self.approximated]
        lines += [f"dropped ({len(self.dropped)}):"]
        lines += [f"  {p}: {why}" for p, why in self.dropped]
        return "\n".join(lines) + "\n"


class Out:
    """The run-file tree being built, and the report of how each peer key got there."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.report = Report()

    def set(self, run_key: str, value: Any) -> None:
        node = self.tree
        *parents, last = run_key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    def get(self, run_key: str, default: Any = None) -> Any:
        node: Any = self.tree
        for p in run_key.split("."):
            if not isinstance(node, dict) or p not in node:
                return default
            node = node[p]
        return node

    def carry(self, peer_key: str, run_key: str, value: Any) -> None:
        self.set(run_key, value)
        self.report.carried.append((peer_key, run_key, value))

    def approx(self, peer_key: str, run_key: str, value: Any, how: str) -> None:
        self.set(run_key, value)
        self.report.approximated.append((peer_key, run_key, f"{value!r} ({how})"))

    def drop(self, peer_key: str, why: str) -> None:
        self.report.dropped.append((peer_key, why))
