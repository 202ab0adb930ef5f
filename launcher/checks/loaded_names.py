"""Parameter names as the model will have them after loading, from the names on disk, torch-free.

    names = loaded_names.rename(model_cfg, disk_names)   # None: the rules cannot be read here

transformers 5 renames some checkpoints' keys while loading (transformers/conversion_mapping.py):
Mixtral's `block_sparse_moe.experts.N.w1/w3.weight` on disk become one `mlp.experts.gate_up_proj`
parameter, `w2` becomes `mlp.experts.down_proj`. Freeze patterns, LoRA targets and also_train
groups match the loaded model's names, so `validate` must check them against those.

How: the rules are read from the installed transformers' own source as text (`ast`), never
imported (that module imports torch): the `mapping` dict of `_build_checkpoint_conversion_mapping`,
the later `mapping[K] = / += ...` statements, the aliases of `_MODEL_TO_CONVERSION_PATTERN`, and
the "legacy" renamings every model gets. Lookup as transformers does it: the architecture's class
name first, then `model_type`. Each WeightRenaming applies in order, then the first matching
WeightConverter (its targets replace the matched key part), with the regexes built as
`WeightTransform` builds them. This was chosen over a meta-device model because validate runs on
the login node without torch, and the rules are what loading applies, so the names come out right
for the Mixtral example. A rule this reader cannot evaluate (a transform other than
WeightRenaming/WeightConverter, arguments that are not literals), composite configs (sub-models
are scoped by module path) and remote code give None: the caller then skips the name check
rather than judge by names that may be renamed (the ranks check again on the loaded model).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
from typing import Optional, Sequence

from launcher.common.files import cache_root, write_atomic

_UNKNOWN = "unknown"  # a mapping entry this reader cannot evaluate
_KINDS = ("WeightRenaming", "WeightConverter")


def _mapping_source() -> Optional[str]:
    """The installed transformers/conversion_mapping.py (found without importing transformers)."""
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "conversion_mapping.py")
    return path if os.path.isfile(path) else None


def _transform(node: ast.expr):
    """(kind, sources, targets) of a literal WeightRenaming / WeightConverter call, else _UNKNOWN."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _KINDS):
        return _UNKNOWN
    names = ["source_patterns", "target_patterns"]
    args = dict(zip(names, node.args))
    args.update({k.arg: k.value for k in node.keywords if k.arg in names})
    try:
        src, tgt = (ast.literal_eval(args[n]) for n in names)
    except (KeyError, ValueError, SyntaxError):
        return _UNKNOWN
    as_list = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
    return node.func.id, as_list(src), as_list(tgt)


def _entries(node: ast.expr, table: dict) -> list:
    """A list of transforms from `[...]`, `mapping[K]` / `mapping[K].copy()`, or [_UNKNOWN]."""
    if isinstance(node, ast.List):
        return [_transform(e) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "copy":
        node = node.func.value
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return list(table.get(node.slice.value, [_UNKNOWN]))
    return [_UNKNOWN]


def _key(target: ast.expr) -> Optional[str]:
    if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) \
            and isinstance(target.value, ast.Name) and target.value.id == "mapping":
        return target.slice.value
    return None


def cache_file() -> str:
    """Where the parsed rules are kept between commands (parsing the source costs ~50 ms of a
    ~200 ms `validate`): conversion-rules.json under the cache root (launcher/common/files.py)."""
    return os.path.join(cache_root(), "conversion-rules.json")


@functools.lru_cache(maxsize=4)
def _rules(path: str, mtime: float) -> dict[str, list]:
    """Model type or class name -> its transforms: from the cache file when it was made from this
    very source file (path, mtime, size), else parsed and cached (an unwritable cache only costs
    the next command the parse)."""
    key = [path, mtime, os.path.getsize(path), 1]
    try:
        with open(cache_file(), encoding="utf-8") as fh:
            cached = json.load(fh)
        if cached.get("key") == key:
            return cached["table"]
    except (OSError, ValueError, AttributeError):
        pass
    table = _parse_rules(path)
    try:
        os.makedirs(os.path.dirname(cache_file()), exist_ok=True)
        write_atomic(cache_file(), json.dumps({"key": key, "table": table}))
    except OSError:
        pass
    return table


def clear_rules_cache() -> None:
    """Forget the rules this process has read (the cache file stays)."""
    _rules.cache_clear()


def _parse_rules(path: str) -> dict[str, list]:
    """Model type or class name -> its transforms, as the source file builds them."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    table: dict[str, list] = {}
    aliases: dict[str, str] = {}
    for top in tree.body:
        if isinstance(top, ast.Assign) and any(getattr(t, "id", "") == "_MODEL_TO_CONVERSION_PATTERN"
                                               for t in top.targets):
            aliases = ast.literal_eval(top.value)
        if isinstance(top, ast.FunctionDef) and top.name == "_build_checkpoint_conversion_mapping":
            for st in top.body:
                if isinstance(st, ast.Assign) and getattr(st.targets[0], "id", "") == "mapping" \
                        and isinstance(st.value, ast.Dict):
                    for k, v in zip(st.value.keys, st.value.values):
                        if isinstance(k, ast.Constant):
                            table[k.value] = _entries(v, table)
                elif isinstance(st, ast.Assign) and _key(st.targets[0]) is not None:
                    table[_key(st.targets[0])] = _entries(st.value, table)
                elif isinstance(st, ast.AugAssign) and _key(st.target) is not None:
                    k = _key(st.target)
                    table[k] = table.get(k, [_UNKNOWN]) + _entries(st.value, table)
    for name, base in aliases.items():
        if name not in table:
            table[name] = list(table.get(base, [_UNKNOWN]))
    return table


def _compiled(sources: list[str], targets: list[str]) -> tuple[re.Pattern, list[str]]:
    """The source regex and targets as transformers' WeightTransform builds them (the forms
    with capturing groups it rewrites for saving do not change what loading matches)."""
    branches = []
    for i, src in sorted(enumerate(sources), key=lambda item: -len(item[1])):
        pat = src.replace("*.", r".*\.")
        if len(sources) == len(targets) and targets[i].startswith("^") and not pat.startswith("^"):
            pat = "^" + pat
        if re.search(r"[a-zA-Z0-9]$", pat):
            pat += r"(?!\w)"
        branches.append(f"(?P<g{i}>{pat})")
    return re.compile("|".join(branches)), [t.removeprefix("^").replace(r"\.", ".") for t in targets]


def _apply(key: str, rx: re.Pattern, targets: list[str], every_target: bool) -> Optional[list[str]]:
    m = rx.search(key)
    if m is None:
        return None
    group = next(n for n, v in m.groupdict().items() if v is not None)
    out = []
    for target in targets if every_target else targets[:1]:
        if r"\1" in target:
            target = target.replace(r"\1", m.group(rx.groupindex[group] + 1))
        out.append(key.replace(m.group(0), target, 1))
    return out


def rename(model_cfg: dict, names: Sequence[str], *, remote_code: bool = False) -> Optional[list[str]]:
    """The loaded parameter names of a checkpoint whose keys on disk are `names` (sorted, no
    duplicates); None when the installed transformers' rules for this model cannot be read."""
    path = _mapping_source()
    if path is None or (remote_code and model_cfg.get("auto_map")):
        return None if path is None else sorted(set(names))
    if any(isinstance(v, dict) and "model_type" in v for v in model_cfg.values()):
        return None  # a composite config: sub-model rules are scoped by module path
    table = _rules(path, os.path.getmtime(path))
    arch = (model_cfg.get("architectures") or [None])[0]
    rules = table.get(arch) if arch in table else table.get(model_cfg.get("model_type") or "", [])
    rules = list(rules or []) + table.get("legacy", [])
    if _UNKNOWN in rules:
        return None
    renamings = [_compiled(s, t) for kind, s, t in rules if kind == "WeightRenaming"]
    converters = [_compiled(s, t) for kind, s, t in rules if kind == "WeightConverter"]
    out: set[str] = set()
    for key in names:
        for rx, targets in renamings:
            key = (_apply(key, rx, targets, False) or [key])[0]
        for rx, targets in converters:
            hit = _apply(key, rx, targets, True)
            if hit is not None:
                out.update(hit)
                break
        else:
            out.add(key)
    return sorted(out)
