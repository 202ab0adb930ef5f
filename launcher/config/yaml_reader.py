"""A run file's YAML text and its `key.sub=value` overrides -> a tree of `Scalar`s that remember
where each value was written (file line or override), every problem collected in a `Context`.

YAML pitfalls handled here: `1e-5` is a float (YAML 1.1 reads it as a string), merge keys
(`<<: *base`) work, a key given twice is reported instead of silently keeping the last, alias
bombs and control characters are refused. `launcher/config/runfile.py` converts the tree to the schema.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from launcher.config.errors import Problem
from launcher.config.secret_env import override_holds_secret

MAX_NODES = 100_000  # alias expansion beyond this is refused (a "billion laughs" file)


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads 2e-5 / 5E8 / 1.0e5 as floats, as YAML 1.2 does."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


@dataclass
class Scalar:
    """A leaf value with the text it was written as (plain YAML scalars only) and its origin."""

    value: Any
    raw: str | None
    where: str
    base_dir: str  # relative paths resolve against this


UNREADABLE = object()  # a scalar whose construction failed (already reported)


@dataclass
class Context:
    problems: list[Problem]
    source: str = "run file"
    lines: dict[str, str] = field(default_factory=dict)  # dotted key -> where it was written
    suspect: set[str] = field(default_factory=set)        # keys whose value is not what was meant

    def add(self, key: str, message: str, fix: str = "", where: str = "") -> None:
        self.problems.append(Problem(key, message, fix, where))


class BadValue(Exception):
    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.message, self.fix = message, fix


class Reported(Exception):
    """The problem(s) were already recorded; fall back to the default."""


# ---------------------------------------------------------------- YAML -> tree of Scalars
def read_yaml(text: str, source: str, base_dir: str, ctx: Context) -> Any:
    """The run file's text as a tree of dicts, lists and Scalars (None after a problem that
    stops the reading; every problem goes to ctx with its line)."""
    loader = None
    try:
        loader = Loader(text)  # its reader refuses control characters here already
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        ctx.add("<file>", f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                "fix the YAML syntax at that line", where)
        return None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return {}
    try:
        return _Tree(loader, source, base_dir, ctx, node).walk(node, "")
    except BadValue as exc:
        ctx.add("<file>", exc.message, exc.fix, source)
        return None


class _Tree:
    """One walk over a composed YAML document: merge keys flattened, duplicate keys reported,
    alias bombs and recursive aliases refused, every key's line recorded in ctx.lines."""

    def __init__(self, loader: Any, source: str, base_dir: str, ctx: Context, root: yaml.Node):
        self.loader, self.source, self.base_dir, self.ctx = loader, source, base_dir, ctx
        self.explicit: dict[int, int] = {}  # mapping node -> keys written in it (not merged in)
        self.visits = 0
        self.active: set[int] = set()
        self.count(root)

    def count(self, n: yaml.Node) -> None:
        if id(n) in self.explicit or not isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            return
        if isinstance(n, yaml.MappingNode):
            self.explicit[id(n)] = sum(1 for k, _ in n.value if k.tag != "tag:yaml.org,2002:merge")
            children = [c for pair in n.value for c in pair]
        else:
            self.explicit[id(n)] = 0
            children = list(n.value)
        for c in children:
            self.count(c)

    def walk(self, n: yaml.Node, key: str) -> Any:
        self.visits += 1
        if self.visits > MAX_NODES:
            raise BadValue(f"more than {MAX_NODES} values after expanding aliases",
                           "write the run file without deeply nested aliases")
        if id(n) in self.active:
            raise BadValue("an alias refers to a value containing itself", "remove the recursive alias")
        if isinstance(n, yaml.MappingNode):
            self.active.add(id(n))
            out = self.mapping(n, key)
            self.active.discard(id(n))
            return out
        if isinstance(n, yaml.SequenceNode):
            self.active.add(id(n))
            items = []
            for i, v in enumerate(n.value):
                self.ctx.lines.setdefault(f"{key}[{i}]", f"{self.source}:{v.start_mark.line + 1}")
                items.append(self.walk(v, f"{key}[{i}]"))
            self.active.discard(id(n))
            return items
        return self.scalar(n, key)

    def mapping(self, n: yaml.MappingNode, key: str) -> dict[str, Any]:
        ctx = self.ctx
        try:
            self.loader.flatten_mapping(n)  # merge keys: `<<: *base`
        except yaml.YAMLError as exc:
            raise BadValue(f"bad merge key: {getattr(exc, 'problem', None) or exc}",
                           "merge only mappings (<<: *name)") from None
        merged = len(n.value) - self.explicit.get(id(n), len(n.value))
        out: dict[str, Any] = {}
        seen: set[str] = set()
        for i, (k_node, v_node) in enumerate(n.value):
            k_where = f"{self.source}:{k_node.start_mark.line + 1}"
            try:
                k = self.loader.construct_object(k_node, deep=True)
            except (yaml.YAMLError, TypeError) as exc:
                ctx.add(key or "<file>", f"unreadable key: {exc}", "write a plain key", k_where)
                continue
            if not isinstance(k, str):
                sub = f"{key}.{k}" if key else str(k)
                ctx.add(sub, f"keys must be strings, got {k!r}", "quote the key", k_where)
                continue
            sub = f"{key}.{k}" if key else k
            if i >= merged:
                if k in seen:
                    ctx.add(sub, "key given twice (YAML would keep only the last)",
                            "remove one of them", k_where)
                seen.add(k)
            ctx.lines[sub] = k_where
            out[k] = self.walk(v_node, sub)
        return out

    def scalar(self, n: yaml.Node, key: str) -> Scalar:
        where = f"{self.source}:{n.start_mark.line + 1}"
        try:
            value = self.loader.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            self.ctx.add(key or "<file>",
                         f"cannot read this value: {getattr(exc, 'problem', None) or exc}",
                         "write a plain YAML value", where)
            value = UNREADABLE
        raw = n.value if (isinstance(n, yaml.ScalarNode) and n.style is None) else None
        return Scalar(value, raw, where, self.base_dir)


def plain(tree: Any) -> Any:
    if isinstance(tree, Scalar):
        if tree.value is UNREADABLE:
            raise Reported()
        return tree.value
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [plain(v) for v in tree]
    return tree


# ---------------------------------------------------------------- overrides
def apply_override(tree: dict, text: str, ctx: Context) -> None:
    shown = text if len(text) <= 60 else text[:text.find("=") + 1] + "..." if "=" in text[:60] else text[:57] + "..."
    if override_holds_secret(text):
        shown = text.partition("=")[0] + "=..."  # a secret is never repeated in a message
    where = f"override '{shown}'"
    if "=" not in text:
        ctx.add("<override>", "an override must be key.sub=value", "add '=value'", where)
        return
    key, _, raw = text.partition("=")  # split on the first '=' only
    key = key.strip()
    steps = key_steps(key)
    if not key or steps is None:
        empty = not key or any(not p.partition("[")[0] for p in key.split("."))
        ctx.add("<override>", (f"empty key in override {key!r}" if key else "empty key in override")
                if empty else f"bad list index in override {key!r}",
                "write key.sub=value" if empty else "write key.sub[0]=value", where)
        return
    try:
        value = yaml.load(raw, Loader=Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): the text itself
    node: Any = tree
    for i, step in enumerate(steps[:-1]):
        nxt = _item(node, step, steps[i + 1])
        if nxt is None:
            return _no_item(ctx, key, steps[:i + 1], node, where)
        node = nxt
    last = steps[-1]
    if isinstance(last, int) and not (isinstance(node, list) and last <= len(node)):
        return _no_item(ctx, key, steps, node, where)
    leaf = wrap(value, raw.strip(), where, os.getcwd())
    if isinstance(last, int) and last == len(node):
        node.append(leaf)
    else:
        node[last] = leaf
    mark(ctx.lines, key, leaf, where)


# The grammar of an override's key, defined once: the CLI tells an override word from an
# argument with OVERRIDE_WORD, and apply_override walks the tree by key_steps.
OVERRIDE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+|\[[0-9]+\])*=")
_INDEX = re.compile(r"\[([0-9]+)\]")


def key_steps(key: str) -> list[str | int] | None:
    """`cluster.setup[0]` -> ["cluster", "setup", 0]; None for a key with an empty part."""
    steps: list[str | int] = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        rest = "[" + rest if rest else ""
        if not name or _INDEX.sub("", rest):
            return None
        steps += [name, *(int(i) for i in _INDEX.findall(rest))]
    return steps


def _item(node: Any, step: str | int, next_step: str | int) -> Any:
    """The child of node at step, made (a dict, or a list before an index) where it is absent;
    None where an index does not fit."""
    if isinstance(step, int):
        if not isinstance(node, list) or step >= len(node):
            return None
        if not isinstance(node[step], (dict, list)):
            node[step] = [] if isinstance(next_step, int) else {}
        return node[step]
    nxt = node.get(step)
    if isinstance(next_step, int):
        if nxt is None:
            nxt = node[step] = []
        return nxt if isinstance(nxt, list) else None
    if not isinstance(nxt, dict):
        nxt = node[step] = {}
    return nxt


def _no_item(ctx: Context, key: str, steps: list[str | int], node: Any, where: str) -> None:
    """The problem of an index that does not fit (steps: the key up to that index)."""
    at = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps[:-1]).lstrip(".")
    size = len(node) if isinstance(node, list) else 0
    what = f"has {size} item(s)" if isinstance(node, list) else "is not a list"
    fix = f"index an existing item, append at [{size}], or set the whole list: {at}=[...]" \
        if len(steps) == len(key_steps(key) or ()) else f"set the whole item: {at}[{steps[-1]}]={{...}}"
    ctx.add(key, f"no item {steps[-1]} to set: {at} {what}", fix, where)


def wrap(value: Any, raw: str | None, where: str, base_dir: str) -> Any:
    """An override value as a tree; nested items have no raw text of their own."""
    if isinstance(value, dict):
        return {str(k): wrap(v, None, where, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [wrap(v, None, where, base_dir) for v in value]
    return Scalar(value, raw, where, base_dir)


def mark(lines: dict[str, str], key: str, tree: Any, where: str) -> None:
    for k in [k for k in lines if k == key or k.startswith((key + ".", key + "["))]:
        del lines[k]  # the file's lines for a replaced value no longer apply
    lines[key] = where
    if isinstance(tree, dict):
        for k, v in tree.items():
            mark(lines, f"{key}.{k}", v, where)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            mark(lines, f"{key}[{i}]", v, where)


