"""The package's layers hold: every import in incubation/ (read with ast, inside functions too)
goes down or sideways in the layer table of docs/DESIGN.md, no module imports itself back in a
circle, and the size rules (functions under 60 lines, modules at most 600) hold."""
import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "incubation")


def _modules() -> dict:
    """module name (incubation.x.y) -> file, for every .py file of the package."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: str) -> set:
    """The incubation modules `module` imports (a name imported from a package counts as its
    submodule when there is one, else as the package)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    # the root package only re-exports (importing any submodule runs it): not a layer of its own
    return {name for name in found if name.split(".")[0] == "incubation" and name not in (module, "incubation")}


def _layer_table() -> list:
    """[(layer, [path prefixes])] from the table of docs/DESIGN.md, bottom first."""
    text = open(os.path.join(ROOT, "docs", "DESIGN.md")).read()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] not in ("layer", "") and not set(cells[0]) <= {"-"}:
            paths = [p.rstrip("/") for p in re.findall(r"`(incubation/[^`]*)`", cells[1])]
            rows.append((cells[0], paths))
    return rows


def _layer_of(module: str, table: list) -> int:
    path = os.path.relpath(MODULES[module], ROOT)
    best = None
    for index, (_, prefixes) in enumerate(table):
        for prefix in prefixes:
            if path == prefix or path.startswith(prefix + "/") or path == prefix + ".py":
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{path} is in no layer of docs/DESIGN.md's table")
    return best[0]


def test_every_import_goes_down_the_layer_table():
    table = _layer_table()
    assert len(table) >= 8
    wrong = []
    for module, path in MODULES.items():
        mine = _layer_of(module, table)
        for imported in _imports(module, path):
            theirs = _layer_of(imported, table)
            if theirs > mine:
                wrong.append(f"{module} ({table[mine][0]}) imports {imported} ({table[theirs][0]})")
    assert not wrong, "\n".join(wrong)


def _cycle() -> list:
    """One import circle among the package's modules, or []."""
    graph = {m: _imports(m, p) & set(MODULES) for m, p in MODULES.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_import_circle():
    assert _cycle() == []


def test_the_circle_check_sees_a_circle(monkeypatch):
    real = _imports
    monkeypatch.setattr(sys.modules[__name__], "_imports",
                        lambda m, p: real(m, p) | ({"incubation.pipeline"} if m == "incubation.errors" else set()))
    circle = _cycle()
    assert circle[0] == circle[-1] and {"incubation.errors", "incubation.pipeline"} <= set(circle)


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("module", sorted(MODULES))
def test_sizes(module):
    path = MODULES[module]
    source = open(path).read()
    assert source.count("\n") <= 600, f"{path}: {source.count(chr(10))} lines"
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(ast.parse(source))
            if f.end_lineno - f.lineno + 1 >= 60]
    assert not long, f"{path}: " + ", ".join(long)
