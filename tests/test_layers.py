"""The package's import rules, read from the source (docs/design.md#layers): layers one way down
(cli -> apps -> runtime -> backends / decoding / converters -> errors), apps never touch an engine, decoding
imports no engine, no import cycle, no module importing another's private names. Lazy imports inside
functions count: they are dependencies all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "epicode_edge"

# Lower numbers are lower layers; a module may import its own group or lower layers only.
LAYERS = {
    "errors": 0, "version": 0, "userdirs": 0, "hashing": 0, "defaults": 0,
    "backends": 1, "decoding": 1, "converters": 1, "chat_template": 1, "engine_options": 1,
    "runtime": 2,
    "apps": 3,
    "cli": 4, "__init__": 4, "__main__": 4,
}
ENGINES = ("llama_cpp", "mlx", "mlx_lm")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        out[".".join(rel.parts)] = f
    return out


def _group(mod: str) -> str:
    return mod.split(".")[0]


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    """The absolute dotted name (within the package) an ImportFrom refers to; '' for the package face."""
    if node.level == 0:
        name = node.module or ""
        return name[len("epicode_edge."):] if name.startswith("epicode_edge.") else \
            ("" if name == "epicode_edge" else "<external>")
    parts = mod.split(".")
    is_pkg = (PKG / Path(*parts) / "__init__.py").exists() if parts != ["__init__"] else True
    base = parts if is_pkg else parts[:-1]
    if parts[-1] == "__init__":
        base = parts[:-1]
    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *(node.module.split(".") if node.module else [])])


def _imports(mod: str, path: Path):
    """(target module within the package or '' for the face, imported names, line) and external top names."""
    tree = ast.parse(path.read_text())
    internal, external = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "epicode_edge" or a.name.startswith("epicode_edge."):
                    internal.append((a.name[len("epicode_edge."):] if "." in a.name else "", [], node.lineno))
                else:
                    external.append((a.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            if target == "<external>":
                external.append(((node.module or "").split(".")[0], node.lineno))
                continue
            names = [a.name for a in node.names]
            # `from . import x` / `from ..backends import cpu_kernels`: a submodule, not a name
            subs = [n for n in names if (PKG / Path(*target.split("."), n)).with_suffix(".py").exists()
                    or (PKG / Path(*[p for p in target.split(".") if p], n) / "__init__.py").exists()]
            for n in subs:
                internal.append((f"{target}.{n}" if target else n, [], node.lineno))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                internal.append((target, rest, node.lineno))
    return internal, external


def _layer(mod: str) -> int:
    return LAYERS["__init__"] if mod in ("", "__init__") else LAYERS[_group(mod)]


MODULES = _modules()


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if _group(m) not in LAYERS]


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_go_one_way_down(mod):
    internal, external = _imports(mod, MODULES[mod])
    bad = []
    for target, names, line in internal:
        t = target.rsplit(".__init__", 1)[0]
        same_group = t and _group(t) == _group(mod)
        if not same_group and _layer(t) >= _layer(mod):
            bad.append(f"line {line}: {mod} imports {t or 'the package face'} (not a lower layer)")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and t != mod:
            bad.append(f"line {line}: {mod} imports private {', '.join(private)} from {t}")
    if _group(mod) in ("apps", "decoding"):
        bad += [f"line {line}: {mod} imports the engine {name}" for name, line in external if name in ENGINES]
        bad += [f"line {line}: {mod} imports {t}" for t, _, line in internal
                if _group(mod) == "apps" and t.startswith("backends")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for target, _, _ in _imports(m, path)[0]:
            t = target or "__init__"
            t = t if t in MODULES else f"{t}.__init__"
            if t in MODULES and t != m:
                graph[m].add(t)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
