"""Load a run file: YAML + `key.sub=value` overrides -> a typed RunConfig, or every problem at once.

Values are checked against the schema in `launcher/config/schema.py`: unknown keys (with "did you
mean"), duplicate keys, wrong types, out-of-range numbers and bad formats are all collected,
each with its dotted key and its file line (or the override that set it). Cross-field rules
(`launcher/checks/validate.py`) then run on what could be read, so one call reports everything; a rule
that reads a field which itself has a problem is left out (its verdict would rest on a
default the user did not write).

The YAML text and the overrides are read by `launcher/config/yaml_reader.py` (a tree of values that
remember their line); here they meet the schema: `24:00:00` stays the string it was written as
when the field is a string (YAML 1.1 reads a base-60 integer), `off`/`no` in an offload-style
field mean "none".
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml

from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError, Problem, did_you_mean
from launcher.config.yaml_reader import (UNREADABLE, BadValue, Context, Reported, Scalar, apply_override,
                                  plain, read_yaml)

# ---------------------------------------------------------------- schema conversion
@functools.lru_cache(maxsize=None)
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved type annotations of a schema dataclass (cached)."""
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        return " or ".join(_type_name(a) for a in args) + (" or null" if nullable else "")
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _to_bool(v: Any, node: Scalar) -> bool:
    if not isinstance(v, bool):
        raise BadValue(f"expected true or false, got {v!r}", "write true or false")
    return v


def _to_int(v: Any, node: Scalar) -> int:
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)  # 1e3, 2.0
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadValue(f"expected an integer, got {v!r}", "write a whole number")
    return v


def _to_float(v: Any, node: Scalar) -> float:
    if isinstance(v, str):
        try:
            v = float(v)  # a quoted number
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadValue(f"expected a number, got {v!r}", "write a number such as 2.0e-5")
    if not math.isfinite(v):
        raise BadValue(f"expected a finite number, got {v!r}", "write a finite number")
    return float(v)


def _to_str(v: Any, node: Scalar) -> str:
    if isinstance(v, str):
        return v
    if node.raw is not None and v is not None:
        return node.raw  # e.g. time: 24:00:00 (YAML 1.1 would read a base-60 integer)
    raise BadValue(f"expected a string, got {v!r}", "quote the value")


# A scalar field's type -> its conversion from the YAML value (and its node, for the raw text).
_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _convert(node: Any, tp: Any, key: str, ctx: Context) -> Any:
    """Node -> value of type tp; raises BadValue for a problem at this key."""
    if isinstance(node, Scalar) and node.value is UNREADABLE:
        raise Reported()
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(node, Scalar) and node.value is None:
            node = {}  # an empty section (`model:` with nothing under it): its defaults
        if not isinstance(node, dict):
            raise BadValue(f"expected {_type_name(tp)}, got {_describe(node)}", "write it as key: value lines")
        return _section(tp, node, key, ctx)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(node, Scalar) and node.value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise BadValue(f"expected {_type_name(tp)}, got null", f"use {_type_name(tp)}")
        for arg in args[:-1]:  # the first type that takes the value (int before "epoch")
            try:
                return _convert(node, arg, key, ctx)
            except BadValue:
                pass
        try:
            return _convert(node, args[-1], key, ctx)
        except BadValue:
            if len(args) == 1:
                raise
            raise BadValue(f"expected {_type_name(tp)}, got {_describe(node)}",
                       f"use {_type_name(tp)}") from None
    if origin is list:
        return _convert_list(node, tp, key, ctx)
    if origin is dict:
        return _convert_dict(node, tp, key, ctx)
    if not isinstance(node, Scalar):
        raise BadValue(f"expected {_type_name(tp)}, got {_describe(node)}", "give a single value")
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
        raise BadValue(f"{v!r} is not {_type_name(tp)}", hint or f"use {_type_name(tp)}")
    if tp in _SCALARS:
        return _SCALARS[tp](v, node)
    if tp is Any:
        return plain(node)
    raise BadValue(f"unsupported type {tp}")  # pragma: no cover - schema bug


def _convert_list(node: Any, tp: Any, key: str, ctx: Context) -> list:
    """A list field: each item converted, every bad item reported."""
    if not isinstance(node, list):
        raise BadValue(f"expected {_type_name(tp)}, got {_describe(node)}", "write it as [a, b] or - lines")
    (item_tp,) = typing.get_args(tp)
    out, bad = [], False
    for i, item in enumerate(node):
        try:
            out.append(_convert(item, item_tp, f"{key}[{i}]", ctx))
        except BadValue as exc:
            ctx.add(f"{key}[{i}]", exc.message, exc.fix, _where(item))
            bad = True
        except Reported:
            bad = True
    if bad:
        raise Reported()
    return out


def _convert_dict(node: Any, tp: Any, key: str, ctx: Context) -> dict:
    """A mapping field: {str: Any} kept as written, {str: str} values as their text."""
    if not isinstance(node, dict):
        raise BadValue(f"expected a mapping, got {_describe(node)}", "write it as key: value lines")
    val_tp = typing.get_args(tp)[1]
    if val_tp is Any:
        return plain(node)
    out, bad = {}, False
    for k, v in node.items():
        if not isinstance(v, Scalar) or v.value is None or v.value is UNREADABLE:
            if not (isinstance(v, Scalar) and v.value is UNREADABLE):
                ctx.add(f"{key}.{k}", f"expected a string, got {_describe(v)}",
                        "give a single value", _where(v))
            bad = True
            continue
        out[k] = v.raw if v.raw is not None else _text(v.value)
    if bad:
        raise Reported()
    return out


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
            raise BadValue(exc.problems[0].message, exc.problems[0].fix) from None
    if isinstance(value, (int, float)):
        for name, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                               ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(name)
            if bound is not None and not ok(value, bound):
                raise BadValue(f"must be {word} {bound}, got {value}", f"use a value {word} {bound}")
    if isinstance(value, str) and meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        from launcher.checks.slurm_checks import suggested_form
        form = suggested_form(key, value)
        raise BadValue(f"{value!r} does not match the expected form /{meta['pattern']}/",
                       f"write {form!r}" if form else
                       "see the run-file reference in README.md for examples")
    if isinstance(value, str) and meta.get("path") and not value.strip():
        raise BadValue("empty path", "give a file or folder, or null where allowed")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# the peers' names of run-file keys, for the "unknown key" fix (launcher/convert/peers.py maps
# whole files)
PEER_NAMES = {
    "learning_rate": "train.lr", "num_epochs": "train.epochs", "num_train_epochs": "train.epochs",
    "sequence_len": "data.max_seq_len", "cutoff_len": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "base_model": "model.path",
    "model_name_or_path": "model.path", "lr_scheduler": "train.scheduler",
    "lr_scheduler_type": "train.scheduler", "max_grad_norm": "train.grad_clip",
    "output_dir": "output.dir", "sample_packing": "data.packing", "datasets": "data.path or data.mix",
    "dataset": "data.path or data.mix", "save_steps": "train.checkpoint_every",
    "eval_steps": "train.eval_every", "logging_steps": "train.log_every",
    "warmup_ratio": "train.warmup_ratio", "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay", "bf16": "model.dtype: bf16", "fp16": "model.dtype: fp16",
    "lora_r": "freeze.lora.r", "lora_rank": "freeze.lora.r", "lora_alpha": "freeze.lora.alpha",
    "lora_dropout": "freeze.lora.dropout", "lora_target_modules": "freeze.lora.target_modules",
    "load_in_4bit": "quantization.mode: 4bit", "load_in_8bit": "quantization.mode: 8bit",
    "save_total_limit": "train.keep_checkpoints", "val_set_size": "data.eval_fraction",
}


def _section(cls: type, node: dict, prefix: str, ctx: Context) -> Any:
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in node.items():
        if k not in fields:
            shown = k or "''"  # an empty key is still named
            key = f"{prefix}.{shown}" if prefix else shown
            hint = did_you_mean(k, fields)
            if str(k) in PEER_NAMES and PEER_NAMES[str(k)] != key:
                hint = (f"{k} is the Axolotl / LLaMA-Factory / HF Trainer name; here it is "
                        f"{PEER_NAMES[str(k)]} (or convert the whole file: ftlaunch convert)")
            elif hint:
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
        except BadValue as exc:
            ctx.add(key, exc.message, exc.fix, _where(sub))
            failed = failed or _required(f)
        except Reported:
            failed = failed or _required(f)
    if failed:
        raise Reported()
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
    (launcher/checks/validate.py) included for every rule whose inputs could all be read; `inputs`:
    the input rules too (data files, weights, tokenizer, chat template)."""
    ctx = Context([], source)
    cfg = _parse(text, overrides, source, base_dir, ctx)
    problems = ctx.problems
    if cfg is not None:
        from launcher.checks.validate import check as cross_check
        unreliable = {p.key for p in problems if p.key != "<file>"} | ctx.suspect
        problems = problems + cross_check(cfg, unreliable, inputs=inputs)
    return cfg, locate(problems, ctx.lines)


def _parse(text: str, overrides: Sequence[str], source: str, base_dir: str | None,
           ctx: Context) -> RunConfig | None:
    tree = read_yaml(text, source, base_dir or os.getcwd(), ctx)
    if tree is None:
        return None
    if not isinstance(tree, dict):
        ctx.add("<file>", f"the run file must be a mapping, got {_describe(tree)}",
                "start with `name: my-run` and the sections", source)
        return None
    for text_ in overrides:
        apply_override(tree, text_, ctx)
    try:
        cfg = _section(RunConfig, tree, "", ctx)
    except Reported:
        return None
    if cfg.output.dir is None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=cfg.run_dir))
    return cfg


def load(path: str, overrides: Sequence[str] = (), *, inputs: bool = False) -> RunConfig:
    """Read a run file, apply overrides, run every rule (`inputs`: the input rules too). Raises
    ConfigError with all problems."""
    source = _source(path)
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


def recheck(cfg: RunConfig, path: str, *, inputs: bool = False) -> RunConfig:
    """Every rule again on a config changed in code after `load` (dataclasses.replace, as
    `ftlaunch run` sets its local ranks): nothing is parsed again. `inputs`: the input rules
    too. Raises ConfigError with all problems, named after the run file at `path`."""
    from launcher.checks.validate import check as cross_check
    problems = cross_check(cfg, set(), inputs=inputs)
    if problems:
        raise ConfigError(problems, _source(path))
    return cfg


def _source(path: str) -> str:
    return os.path.relpath(path) if not os.path.isabs(path) or path.startswith(os.getcwd()) else path


def dump(cfg: RunConfig) -> str:
    """The resolved run file (every default filled in, absolute paths) as YAML."""
    from launcher.config.schema import to_dict
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def fields_reference() -> Iterable[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, for the README reference."""
    def walk(cls: type, prefix: str):
        hints = type_hints(cls)
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
