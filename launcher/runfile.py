"""Load a run file: YAML + `key.sub=value` overrides -> a typed RunConfig, or every problem at once.

Values are checked against the schema in `launcher/config.py`: unknown keys (with "did you
mean"), duplicate keys, wrong types, out-of-range numbers and bad formats are all collected,
each with its dotted key and its file line (or the override that set it). Cross-field rules
(`launcher/validate.py`) then run on what could be read, so one call reports everything; a rule
that reads a field which itself has a problem is left out (its verdict would rest on a
default the user did not write).

YAML pitfalls handled here: `1e-5` is a float (YAML 1.1 reads it as a string), `24:00:00` stays
the string it was written as when the field is a string (YAML 1.1 reads a base-60 integer),
`off`/`no` in an offload-style field mean "none", merge keys (`<<: *base`) work, and a key given
twice is reported instead of silently keeping the last.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml

from launcher.config import RunConfig
from launcher.errors import ConfigError, Problem, did_you_mean

MAX_NODES = 100_000  # alias expansion beyond this is refused (a "billion laughs" file)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 2e-5 / 5E8 / 1.0e5 as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
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


_UNREADABLE = object()  # a scalar whose construction failed (already reported)


@dataclass
class _Ctx:
    problems: list[Problem]
    source: str = "run file"
    lines: dict[str, str] = field(default_factory=dict)  # dotted key -> where it was written
    suspect: set[str] = field(default_factory=set)        # keys whose value is not what was meant

    def add(self, key: str, message: str, fix: str = "", where: str = "") -> None:
        self.problems.append(Problem(key, message, fix, where))


class _Bad(Exception):
    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.message, self.fix = message, fix


class _Reported(Exception):
    """The problem(s) were already recorded; fall back to the default."""


# ---------------------------------------------------------------- YAML -> tree of Scalars
def _read_yaml(text: str, source: str, base_dir: str, ctx: _Ctx) -> Any:
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses control characters here already
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

    explicit: dict[int, int] = {}  # mapping node -> keys written in it (not merged in)

    def count(n: yaml.Node) -> None:
        if id(n) in explicit or not isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            return
        if isinstance(n, yaml.MappingNode):
            explicit[id(n)] = sum(1 for k, _ in n.value if k.tag != "tag:yaml.org,2002:merge")
            children = [c for pair in n.value for c in pair]
        else:
            explicit[id(n)] = 0
            children = list(n.value)
        for c in children:
            count(c)

    count(node)
    visits = [0]
    active: set[int] = set()

    def walk(n: yaml.Node, key: str) -> Any:
        where = f"{source}:{n.start_mark.line + 1}"
        visits[0] += 1
        if visits[0] > MAX_NODES:
            raise _Bad(f"more than {MAX_NODES} values after expanding aliases",
                       "write the run file without deeply nested aliases")
        if id(n) in active:
            raise _Bad("an alias refers to a value containing itself", "remove the recursive alias")
        if isinstance(n, yaml.MappingNode):
            active.add(id(n))
            try:
                loader.flatten_mapping(n)  # merge keys: `<<: *base`
            except yaml.YAMLError as exc:
                raise _Bad(f"bad merge key: {getattr(exc, 'problem', None) or exc}",
                           "merge only mappings (<<: *name)") from None
            merged = len(n.value) - explicit.get(id(n), len(n.value))
            out: dict[str, Any] = {}
            seen: set[str] = set()
            for i, (k_node, v_node) in enumerate(n.value):
                k_where = f"{source}:{k_node.start_mark.line + 1}"
                try:
                    k = loader.construct_object(k_node, deep=True)
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
                out[k] = walk(v_node, sub)
            active.discard(id(n))
            return out
        if isinstance(n, yaml.SequenceNode):
            active.add(id(n))
            items = []
            for i, v in enumerate(n.value):
                ctx.lines.setdefault(f"{key}[{i}]", f"{source}:{v.start_mark.line + 1}")
                items.append(walk(v, f"{key}[{i}]"))
            active.discard(id(n))
            return items
        try:
            value = loader.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            ctx.add(key or "<file>", f"cannot read this value: {getattr(exc, 'problem', None) or exc}",
                    "write a plain YAML value", where)
            value = _UNREADABLE
        raw = n.value if (isinstance(n, yaml.ScalarNode) and n.style is None) else None
        return Scalar(value, raw, where, base_dir)

    try:
        return walk(node, "")
    except _Bad as exc:
        ctx.add("<file>", exc.message, exc.fix, source)
        return None


def _plain(tree: Any) -> Any:
    if isinstance(tree, Scalar):
        if tree.value is _UNREADABLE:
            raise _Reported()
        return tree.value
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    return tree


# ---------------------------------------------------------------- overrides
def _apply_override(tree: dict, text: str, ctx: _Ctx) -> None:
    shown = text if len(text) <= 60 else text[:text.find("=") + 1] + "..." if "=" in text[:60] else text[:57] + "..."
    where = f"override '{shown}'"
    if "=" not in text:
        ctx.add("<override>", "an override must be key.sub=value", "add '=value'", where)
        return
    key, _, raw = text.partition("=")  # split on the first '=' only
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        ctx.add("<override>", f"empty key in override {key!r}" if key else "empty key in override",
                "write key.sub=value", where)
        return
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): the text itself
    node: Any = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    cwd = os.getcwd()
    node[parts[-1]] = _wrap(value, raw.strip(), where, cwd)
    _mark(ctx.lines, key, node[parts[-1]], where)


def _wrap(value: Any, raw: str | None, where: str, base_dir: str) -> Any:
    """An override value as a tree; nested items have no raw text of their own."""
    if isinstance(value, dict):
        return {str(k): _wrap(v, None, where, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_wrap(v, None, where, base_dir) for v in value]
    return Scalar(value, raw, where, base_dir)


def _mark(lines: dict[str, str], key: str, tree: Any, where: str) -> None:
    for k in [k for k in lines if k == key or k.startswith((key + ".", key + "["))]:
        del lines[k]  # the file's lines for a replaced value no longer apply
    lines[key] = where
    if isinstance(tree, dict):
        for k, v in tree.items():
            _mark(lines, f"{key}.{k}", v, where)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _mark(lines, f"{key}[{i}]", v, where)


# ---------------------------------------------------------------- schema conversion
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(node: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    """Node -> value of type tp; raises _Bad for a problem at this key."""
    if isinstance(node, Scalar) and node.value is _UNREADABLE:
        raise _Reported()
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(node, Scalar) and node.value is None:
            node = {}  # an empty section (`model:` with nothing under it): its defaults
        if not isinstance(node, dict):
            raise _Bad(f"expected {_type_name(tp)}, got {_describe(node)}", "write it as key: value lines")
        return _section(tp, node, key, ctx)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(node, Scalar) and node.value is None:
            return None
        return _convert(node, args[0], key, ctx)
    if origin is list:
        if not isinstance(node, list):
            raise _Bad(f"expected {_type_name(tp)}, got {_describe(node)}", "write it as [a, b] or - lines")
        (item_tp,) = typing.get_args(tp)
        out, bad = [], False
        for i, item in enumerate(node):
            try:
                out.append(_convert(item, item_tp, f"{key}[{i}]", ctx))
            except _Bad as exc:
                ctx.add(f"{key}[{i}]", exc.message, exc.fix, _where(item))
                bad = True
            except _Reported:
                bad = True
        if bad:
            raise _Reported()
        return out
    if origin is dict:
        if not isinstance(node, dict):
            raise _Bad(f"expected a mapping, got {_describe(node)}", "write it as key: value lines")
        val_tp = typing.get_args(tp)[1]
        if val_tp is Any:
            return _plain(node)
        out, bad = {}, False
        for k, v in node.items():
            if not isinstance(v, Scalar) or v.value is None or v.value is _UNREADABLE:
                if not (isinstance(v, Scalar) and v.value is _UNREADABLE):
                    ctx.add(f"{key}.{k}", f"expected a string, got {_describe(v)}",
                            "give a single value", _where(v))
                bad = True
                continue
            out[k] = v.raw if v.raw is not None else _text(v.value)
        if bad:
            raise _Reported()
        return out
    if not isinstance(node, Scalar):
        raise _Bad(f"expected {_type_name(tp)}, got {_describe(node)}", "give a single value")
    v = node.value
    if origin is Literal:
        choices = typing.get_args(tp)
        if v is False and "none" in choices:
            v = "none"  # YAML 1.1 reads off/no/false as False; in these fields they mean none
        for c in choices:
            same_kind = isinstance(v, bool) == isinstance(c, bool) and isinstance(v, str) == isinstance(c, str)
            if same_kind and v == c:
                return c  # the schema's own value (2, not 2.0)
        hint = did_you_mean(str(v), [str(c) for c in choices]) if isinstance(v, str) else ""
        raise _Bad(f"{v!r} is not {_type_name(tp)}", hint or f"use {_type_name(tp)}")
    if tp is bool:
        if not isinstance(v, bool):
            raise _Bad(f"expected true or false, got {v!r}", "write true or false")
        return v
    if tp is int:
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)  # 1e3, 2.0
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"expected an integer, got {v!r}", "write a whole number")
        return v
    if tp is float:
        if isinstance(v, str):
            try:
                v = float(v)  # a quoted number
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(f"expected a number, got {v!r}", "write a number such as 2.0e-5")
        if not math.isfinite(v):
            raise _Bad(f"expected a finite number, got {v!r}", "write a finite number")
        return float(v)
    if tp is str:
        if isinstance(v, str):
            return v
        if node.raw is not None and v is not None:
            return node.raw  # e.g. time: 24:00:00 (YAML 1.1 would read a base-60 integer)
        raise _Bad(f"expected a string, got {v!r}", "quote the value")
    if tp is Any:
        return _plain(node)
    raise _Bad(f"unsupported type {tp}")  # pragma: no cover - schema bug


def _text(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _describe(node: Any) -> str:
    if isinstance(node, dict):
        return "a mapping"
    if isinstance(node, list):
        return "a list"
    if isinstance(node, Scalar):
        return "null" if node.value is None else repr(node.value)
    return repr(node)


def _where(node: Any) -> str:
    if isinstance(node, Scalar):
        return node.where
    if isinstance(node, dict):
        for v in node.values():
            return _where(v)
    if isinstance(node, list) and node:
        return _where(node[0])
    return ""


def _check_field(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str) and meta.get("parse"):
        try:
            meta["parse"](value, key)
        except ConfigError as exc:
            raise _Bad(exc.problems[0].message, exc.problems[0].fix) from None
    if isinstance(value, (int, float)):
        for name, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                               ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(name)
            if bound is not None and not ok(value, bound):
                raise _Bad(f"must be {word} {bound}, got {value}", f"use a value {word} {bound}")
    if isinstance(value, str) and meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise _Bad(f"{value!r} does not match the expected form /{meta['pattern']}/",
                   "see the run-file reference in README.md for examples")
    if isinstance(value, str) and meta.get("path") and not value.strip():
        raise _Bad("empty path", "give a file or folder, or null where allowed")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _section(cls: type, node: dict, prefix: str, ctx: _Ctx) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in node.items():
        if k not in fields:
            key = f"{prefix}.{k}" if prefix else k
            hint = did_you_mean(k, fields)
            if hint:
                meant = hint.split("'")[1]
                ctx.suspect.add(f"{prefix}.{meant}" if prefix else meant)
            ctx.add(key, "unknown key", hint or
                    f"remove it; {prefix or 'the top level'} takes: {', '.join(fields)}",
                    ctx.lines.get(key, _where(v)))
    kwargs: dict[str, Any] = {}
    failed = False  # a required field could not be read: no object for this section
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in node:
            if _required(f):
                ctx.add(key, "required key is missing", f"add {key}: ...",
                        ctx.lines.get(prefix, ctx.source))
                failed = True
            continue
        sub = node[name]
        try:
            value = _convert(sub, hints[name], key, ctx)
            _check_field(value, f.metadata, key)
            if f.metadata.get("path") and isinstance(value, str) and isinstance(sub, Scalar):
                value = os.path.normpath(os.path.join(sub.base_dir, os.path.expanduser(value)))
            kwargs[name] = value
        except _Bad as exc:
            ctx.add(key, exc.message, exc.fix, _where(sub))
            failed = failed or _required(f)
        except _Reported:
            failed = failed or _required(f)
    if failed:
        raise _Reported()
    return cls(**kwargs)


# ---------------------------------------------------------------- public API
def locate(problems: list[Problem], where: Mapping[str, str]) -> list[Problem]:
    """Give problems without a location the line of their key (or its nearest parent)."""
    out = []
    for p in problems:
        if not p.where:
            key = p.key
            while key and key not in where:
                key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
            if key:
                p = dataclasses.replace(p, where=where[key])
        out.append(p)
    return out


def parse(text: str, overrides: Sequence[str] = (), *, source: str = "run file",
          base_dir: str | None = None, inputs: bool = False) -> tuple[RunConfig | None, list[Problem]]:
    """Parse run-file text plus overrides into (config or None, problems), cross-field rules
    (launcher/validate.py) included for every rule whose inputs could all be read; `inputs`:
    the input rules too (data files, weights, tokenizer, chat template)."""
    ctx = _Ctx([], source)
    cfg = _parse(text, overrides, source, base_dir, ctx)
    problems = ctx.problems
    if cfg is not None:
        from launcher.validate import check as cross_check
        unreliable = {p.key for p in problems if p.key != "<file>"} | ctx.suspect
        problems = problems + cross_check(cfg, unreliable, inputs=inputs)
    return cfg, locate(problems, ctx.lines)


def _parse(text: str, overrides: Sequence[str], source: str, base_dir: str | None,
           ctx: _Ctx) -> RunConfig | None:
    tree = _read_yaml(text, source, base_dir or os.getcwd(), ctx)
    if tree is None:
        return None
    if not isinstance(tree, dict):
        ctx.add("<file>", f"the run file must be a mapping, got {_describe(tree)}",
                "start with `name: my-run` and the sections", source)
        return None
    for text_ in overrides:
        _apply_override(tree, text_, ctx)
    try:
        cfg = _section(RunConfig, tree, "", ctx)
    except _Reported:
        return None
    if cfg.output.dir is None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(
            cfg.output, dir=os.path.abspath(os.path.join("runs", cfg.name))))
    return cfg


def load(path: str, overrides: Sequence[str] = (), *, inputs: bool = False) -> RunConfig:
    """Read a run file, apply overrides, run every rule (`inputs`: the input rules too). Raises
    ConfigError with all problems."""
    source = os.path.relpath(path) if not os.path.isabs(path) or path.startswith(os.getcwd()) else path
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError([Problem("<file>", f"no such run file: {path}",
                                   "check the path (ls it)")], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("<file>", f"cannot read the run file: {exc}",
                                   "give a readable UTF-8 YAML file")], source) from None
    cfg, problems = parse(text, overrides, source=source,
                          base_dir=os.path.dirname(os.path.abspath(path)), inputs=inputs)
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg


def dump(cfg: RunConfig) -> str:
    """The resolved run file (every default filled in, absolute paths) as YAML."""
    from launcher.config import to_dict
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def fields_reference() -> Iterable[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, for the README reference."""
    def walk(cls: type, prefix: str):
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, key)
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            yield key, _type_name(tp), default, f.metadata["doc"]
    yield from walk(RunConfig, "")
