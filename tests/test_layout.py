"""The package's shape: no import cycles, the login half never imports the rank half, small
modules and functions, and a module map that is current (fast tier; reads source files only)."""
from __future__ import annotations

import ast
import os

import pytest

from launcher import module_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = {"torch", "deepspeed", "transformers", "datasets", "bitsandbytes", "peft", "safetensors",
         "accelerate", "tokenizers", "tensorboard", "wandb"}
# Login-half modules allowed to import heavy libraries inside a function, and why.
LAZY_HEAVY = module_map.LAZY_HEAVY


def modules() -> dict[str, str]:
    return module_map.modules(os.path.join(ROOT, "launcher"))


def imports(path: str, name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file, with relative
    imports resolved and `from pkg import mod` resolved to the submodule where it is one."""
    known = modules()
    tree = ast.parse(open(path, encoding="utf-8").read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for n in tree.body:  # imports under a module-level if/try are still module level
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        level = id(node) in top_level
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno, level))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    g: dict[str, set[str]] = {}
    for name, path in mods.items():
        g[name] = set()
        for mod, _, _ in imports(path, name):
            while mod and mod not in mods:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and mod != "launcher":
                g[name].add(mod)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_launcher_function_level_imports_included():
    assert cycles(graph()) == []


def test_cycle_detector_finds_a_cycle_closed_inside_a_function():
    """A control: the detector sees a cycle that a function-level import closes."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = "import os\nfrom launcher import x\n\ndef f():\n    from launcher.y import z\n"
    tree_imports = [(m, lvl) for m, _, lvl in _imports_of_text(src, "launcher.q")]
    assert ("launcher.y", False) in tree_imports and ("os", True) in tree_imports


def _imports_of_text(src: str, name: str, tmp=None):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(src)
    try:
        return imports(fh.name, name)
    finally:
        os.unlink(fh.name)


def login_half() -> list[str]:
    return sorted(m for m in modules() if not module_map.is_rank_half(m) and m != "launcher")


def test_login_half_never_imports_the_rank_half():
    """Module-level and function-level: no login-half module imports a rank-half module or a
    heavy library, except the lazy imports listed (with their reason) in module_map.LAZY_HEAVY."""
    mods, bad = modules(), []
    for name in login_half():
        for mod, line, _ in imports(mods[name], name):
            top = mod.split(".")[0]
            target = mod
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if module_map.is_rank_half(target) and (name, target) not in LAZY_HEAVY:
                bad.append(f"{name}:{line} imports rank-half {target}")
            elif top in HEAVY and (name, top) not in LAZY_HEAVY:
                bad.append(f"{name}:{line} imports {mod}")
    assert bad == []


def test_every_module_lives_in_a_room_of_one_half():
    """A module is in one of the rooms (folders) of module_map or is a listed top-level module:
    a new flat module, or a folder not assigned to a half, fails here."""
    stray = sorted(m for m in modules() if module_map.package_of(m) is None
                   and m not in module_map.TOP_MODULES)
    assert stray == []
    assert not set(module_map.LOGIN_PACKAGES) & set(module_map.RANK_PACKAGES)
    folders = {f"launcher.{d}" for d in os.listdir(os.path.join(ROOT, "launcher"))
               if os.path.isdir(os.path.join(ROOT, "launcher", d)) and not d.startswith(("_", "."))}
    assert folders == set(module_map.LOGIN_PACKAGES) | set(module_map.RANK_PACKAGES)


def test_rooms_import_only_earlier_rooms_except_the_listed_crossings():
    """Dependency order over the folders: a room imports itself and the rooms before it in
    module_map.ROOMS; a later room only inside a function, listed with its reason."""
    mods, bad, used = modules(), [], set()
    order = {room: i for i, room in enumerate(module_map.ROOMS)}
    for name in sorted(mods):
        room = module_map.package_of(name)
        if room is None:
            continue
        for mod, line, top_level in imports(mods[name], name):
            target = mod
            while target and target not in mods:
                target = target.rpartition(".")[0]
            other = module_map.package_of(target) if target else None
            if other is None or order[other] <= order[room]:
                continue
            if (name, target) in module_map.ROOM_CROSSINGS and not top_level:
                used.add((name, target))
            else:
                bad.append(f"{name}:{line} imports {target} ({other} comes after {room})")
    assert bad == []
    assert used == set(module_map.ROOM_CROSSINGS), "a listed crossing is gone: remove it"


def test_the_halves_are_a_rule_over_folders():
    assert module_map.is_rank_half("launcher.rank.train")
    assert module_map.is_rank_half("launcher.data.reading")
    assert not module_map.is_rank_half("launcher.model.freeze")
    assert not module_map.is_rank_half("launcher.cli")
    assert not module_map.is_rank_half("launcher.ranking")  # a prefix is not a folder


def test_every_lazy_heavy_import_is_inside_a_function():
    mods = modules()
    for name, lib in LAZY_HEAVY:
        found = [(m, lvl) for m, _, lvl in imports(mods[name], name)
                 if m.split(".")[0] == lib or m == lib or m.startswith(lib + ".")]
        assert found, f"{name} no longer imports {lib}: remove it from LAZY_HEAVY"
        assert not any(lvl for _, lvl in found), f"{name} imports {lib} at module level"


def test_functions_under_80_lines_without_a_reason_and_a_report_of_long_modules(capsys):
    """Split by topic, not by line count: a long module is reported (a table, printed with -s),
    not failed; a function over 80 lines needs "long because" in its docstring."""
    long_funcs, sizes = [], []
    for name, path in modules().items():
        text = open(path, encoding="utf-8").read()
        sizes.append((text.count("\n"), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > 80 and "long because" not in doc.lower():
                    long_funcs.append(f"{name}.{node.name}: {n} lines")
    assert long_funcs == []
    report = module_size_report(sizes)
    with capsys.disabled():
        print("\n" + report)
    assert report.startswith("modules over 400 lines")


def module_size_report(sizes: list[tuple[int, str]], over: int = 400) -> str:
    """The long modules as a table, longest first (a reading aid, not a rule)."""
    rows = sorted((s for s in sizes if s[0] > over), reverse=True)
    lines = [f"modules over {over} lines (split by topic, not by count): {len(rows)}"]
    lines += [f"  {n:5d}  {name}" for n, name in rows]
    return "\n".join(lines)


def test_the_size_report_lists_long_modules_longest_first():
    text = module_size_report([(450, "a"), (10, "b"), (620, "c")])
    assert text.splitlines() == ["modules over 400 lines (split by topic, not by count): 2",
                                 "    620  c", "    450  a"]


def test_every_module_has_a_docstring_and_the_module_map_is_current():
    mods = modules()
    missing = [m for m, p in mods.items() if not module_map.summary(p)]
    assert missing == []
    with open(os.path.join(ROOT, "docs", "modules.md"), encoding="utf-8") as fh:
        current = fh.read()
    assert current == module_map.render(os.path.join(ROOT, "launcher")), (
        "docs/modules.md is stale: run `python -m launcher.module_map --write`")


@pytest.mark.parametrize("half", ["login", "rank"])
def test_the_halves_are_named_in_the_map(half):
    text = module_map.render(os.path.join(ROOT, "launcher"))
    assert f"## The {half} half" in text


def test_tests_use_public_names_only():
    """No test imports or reads a launcher name that starts with an underscore."""
    here = os.path.join(ROOT, "tests")
    bad = []
    for f in sorted(os.listdir(here)):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(here, f), encoding="utf-8").read())
        mods = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("launcher"):
                bad += [f"{f}:{n.lineno} {a.name}" for a in n.names if a.name.startswith("_")]
                mods |= {a.asname or a.name for a in n.names}
            elif isinstance(n, ast.Import):
                mods |= {a.asname or a.name.split(".")[0] for a in n.names
                         if a.name.startswith("launcher")}
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
                base = n.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in mods:
                    bad.append(f"{f}:{n.lineno} {ast.unparse(n)}")
    assert bad == []
