"""Load a run file: YAML + `key.sub=value` overrides -> a typed RunConfig, or every problem at once.

Values are checked against the schema in `launcher/config.py`: unknown keys (with "did you
mean"), duplicate keys, wrong types, out-of-range numbers and bad formats are all collected,
each with its dotted key and its file line (or the override that set it). Cross-field rules
(`launcher/validate.py`) then run on what could be read, so one call reports everything.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml

from launcher.config import RunConfig
from launcher.errors import ConfigError, Problem, did_you_mean


@dataclass
class Scalar:
    """A leaf value with the text it was written as (plain YAML scalars only) and its origin."""

    value: Any
    raw: str | None
    where: str
    base_dir: str  # relative paths resolve against this


class _Bad(Exception):
    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.message, self.fix = message, fix


# ---------------------------------------------------------------- YAML -> tree of Scalars
def _read_yaml(text: str, source: str, base_dir: str, problems: list[Problem]) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problems.append(Problem("<file>", f"not valid YAML: {getattr(exc, 'problem', exc)}",
                                "fix the YAML syntax at that line", where))
        return None
    finally:
        loader.dispose()
    if node is None:
        return {}

    def walk(n: yaml.Node, key: str) -> Any:
        where = f"{source}:{n.start_mark.line + 1}"
        if isinstance(n, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k_node, v_node in n.value:
                k = loader.construct_object(k_node)
                sub = f"{key}.{k}" if key else str(k)
                if not isinstance(k, str):
                    problems.append(Problem(sub, f"keys must be strings, got {k!r}",
                                            "quote the key", where))
                    continue
                if k in out:
                    problems.append(Problem(sub, "key given twice (YAML keeps only the last)",
                                            "remove one of them",
                                            f"{source}:{k_node.start_mark.line + 1}"))
                out[k] = walk(v_node, sub)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(n.value)]
        value = loader.construct_object(n, deep=True)
        raw = n.value if (isinstance(n, yaml.ScalarNode) and n.style is None) else None
        return Scalar(value, raw, where, base_dir)

    try:
        return walk(node, "")
    except yaml.YAMLError as exc:
        problems.append(Problem("<file>", f"not valid YAML: {exc}", "fix the YAML syntax", source))
        return None


def _plain(tree: Any) -> Any:
    if isinstance(tree, Scalar):
        return tree.value
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    return tree


# ---------------------------------------------------------------- overrides
def _apply_override(tree: dict, text: str, problems: list[Problem]) -> None:
    where = f"override '{text}'"
    if "=" not in text:
        problems.append(Problem(text, "an override must be key.sub=value", "add '=value'", where))
        return
    key, _, raw = text.partition("=")  # split on the first '=' only
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        problems.append(Problem(key or "<empty>", "empty key in override", "write key.sub=value", where))
        return
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: Any = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    # structured values (lists, dicts) become trees; scalars keep their raw text
    node[parts[-1]] = _wrap(value, raw, where)


def _wrap(value: Any, raw: str, where: str) -> Any:
    cwd = os.getcwd()
    if isinstance(value, dict):
        return {str(k): _wrap(v, str(v), where) for k, v in value.items()}
    if isinstance(value, list):
        return [_wrap(v, str(v), where) for v in value]
    return Scalar(value, raw, where, cwd)


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


def _convert(node: Any, tp: Any, key: str, problems: list[Problem]) -> Any:
    """Node -> value of type tp; raises _Bad for a problem at this key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(node, dict):
            raise _Bad(f"expected {_type_name(tp)}, got {_describe(node)}", "write it as key: value lines")
        return _section(tp, node, key, problems)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(node, Scalar) and node.value is None:
            return None
        return _convert(node, args[0], key, problems)
    if origin is list:
        if isinstance(node, Scalar) and isinstance(node.value, list):
            node = [Scalar(v, None, node.where, node.base_dir) for v in node.value]
        if not isinstance(node, list):
            raise _Bad(f"expected {_type_name(tp)}, got {_describe(node)}", "write it as [a, b] or - lines")
        (item_tp,) = typing.get_args(tp)
        out, bad = [], False
        for i, item in enumerate(node):
            try:
                out.append(_convert(item, item_tp, f"{key}[{i}]", problems))
            except _Bad as exc:
                problems.append(Problem(f"{key}[{i}]", exc.message, exc.fix, _where(item)))
                bad = True
        if bad:
            raise _Reported()
        return out
    if origin is dict:
        if isinstance(node, Scalar) and node.value == {}:
            return {}
        if not isinstance(node, dict):
            raise _Bad(f"expected a mapping, got {_describe(node)}", "write it as key: value lines")
        val_tp = typing.get_args(tp)[1]
        if val_tp is Any:
            return _plain(node)
        out = {}
        for k, v in node.items():
            if not isinstance(v, Scalar) or isinstance(v.value, (dict, list)) or v.value is None:
                problems.append(Problem(f"{key}.{k}", f"expected a string, got {_describe(v)}",
                                        "give a single value", _where(v)))
                continue
            out[k] = v.raw if v.raw is not None else str(v.value)
        return out
    if not isinstance(node, Scalar):
        raise _Bad(f"expected {_type_name(tp)}, got {_describe(node)}", "give a single value")
    v = node.value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(v, bool) and "none" in choices and v is False:
            v = "none"  # YAML 1.1 reads `none`-like words literally; `off`/`no` mean none
        if v not in choices or isinstance(v, bool) != any(isinstance(c, bool) for c in choices):
            hint = did_you_mean(str(v), [str(c) for c in choices]) if isinstance(v, str) else ""
            raise _Bad(f"{v!r} is not {_type_name(tp)}", hint or f"use {_type_name(tp)}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise _Bad(f"expected true or false, got {v!r}", "write true or false")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise _Bad(f"expected an integer, got {v!r}", "write a whole number")
        return v
    if tp is float:
        if isinstance(v, str):
            try:
                return float(v)  # YAML 1.1 reads 2e-5 as a string; accept it
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(f"expected a number, got {v!r}", "write a number such as 2.0e-5")
        return float(v)
    if tp is str:
        if isinstance(v, str):
            return v
        if node.raw is not None and not isinstance(v, (dict, list)) and v is not None:
            return node.raw  # e.g. time: 24:00:00 (YAML 1.1 would read a base-60 integer)
        raise _Bad(f"expected a string, got {v!r}", "quote the value")
    if tp is Any:
        return _plain(node)
    raise _Bad(f"unsupported type {tp}")  # pragma: no cover - schema bug


class _Reported(Exception):
    """The problem(s) were already recorded; fall back to the default."""


def _describe(node: Any) -> str:
    if isinstance(node, dict):
        return "a mapping"
    if isinstance(node, list):
        return "a list"
    if isinstance(node, Scalar):
        return repr(node.value)
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


def _check_field(value: Any, meta: Mapping[str, Any]) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        for name, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                               ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(name)
            if bound is not None and not ok(value, bound):
                raise _Bad(f"must be {word} {bound}, got {value}", f"use a value {word} {bound}")
    if isinstance(value, str) and meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise _Bad(f"{value!r} does not match the expected form /{meta['pattern']}/",
                   "see the run-file reference in README.md for examples")


def _section(cls: type, node: dict, prefix: str, problems: list[Problem]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in node.items():
        if k not in fields:
            key = f"{prefix}.{k}" if prefix else k
            hint = did_you_mean(k, fields)
            problems.append(Problem(key, "unknown key", hint or
                                    f"remove it; {prefix or 'the top level'} takes: {', '.join(fields)}",
                                    _where(v)))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in node:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(Problem(key, "required key is missing", f"add {key}: ..."))
                raise _Reported()
            continue
        sub = node[name]
        try:
            value = _convert(sub, hints[name], key, problems)
            _check_field(value, f.metadata)
            if f.metadata.get("path") and isinstance(value, str) and isinstance(sub, Scalar):
                value = os.path.normpath(os.path.join(sub.base_dir, os.path.expanduser(value)))
            kwargs[name] = value
        except _Bad as exc:
            problems.append(Problem(key, exc.message, exc.fix, _where(sub)))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Reported()
        except _Reported:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise
    return cls(**kwargs)


# ---------------------------------------------------------------- public API
def _locations(tree: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key -> where it was written, for every key in the tree."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else k
            w = _where(v)
            if w:
                out[key] = w
            out.update(_locations(v, key))
    return out


def locate(problems: list[Problem], where: dict[str, str]) -> list[Problem]:
    """Give problems without a location the line of their key (or its nearest parent)."""
    out = []
    for p in problems:
        if not p.where:
            key = p.key
            while key and key not in where:
                key = key.rpartition(".")[0]
            if key:
                p = dataclasses.replace(p, where=where[key])
        out.append(p)
    return out


def parse(text: str, overrides: Sequence[str] = (), *, source: str = "run file",
          base_dir: str | None = None) -> tuple[RunConfig | None, list[Problem]]:
    """Parse run-file text plus overrides into (config or None, problems), cross-field rules
    (launcher/validate.py) included when every field could be read."""
    cfg, problems, where = _parse(text, overrides, source, base_dir)
    if cfg is not None:
        from launcher.validate import check as cross_check
        bad = {p.key for p in problems}
        problems += [p for p in cross_check(cfg) if p.key not in bad]
    return cfg, locate(problems, where)


def _parse(text: str, overrides: Sequence[str], source: str,
           base_dir: str | None) -> tuple[RunConfig | None, list[Problem], dict[str, str]]:
    problems: list[Problem] = []
    tree = _read_yaml(text, source, base_dir or os.getcwd(), problems)
    if tree is None:
        return None, problems, {}
    if not isinstance(tree, dict):
        problems.append(Problem("<file>", f"the run file must be a mapping, got {_describe(tree)}",
                                "start with `name: my-run` and the sections", source))
        return None, problems, {}
    for text_ in overrides:
        _apply_override(tree, text_, problems)
    try:
        cfg = _section(RunConfig, tree, "", problems)
    except _Reported:
        cfg = None
    if cfg is not None and cfg.output.dir is None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(
            cfg.output, dir=os.path.abspath(os.path.join("runs", cfg.name))))
    return cfg, problems, _locations(tree)


def load(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run file, apply overrides, run every rule. Raises ConfigError with all problems."""
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
                          base_dir=os.path.dirname(os.path.abspath(path)))
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
