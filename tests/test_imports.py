"""The import graph of llmlab: no cycles (found by an ast scan, so imports hidden inside functions count too),
and imports inside functions only where they defer a heavy optional dependency, with a comment saying so."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmlab"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root`."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its file (functions included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` names a.b.c; a name inside it counts as it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycles(root: Path) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    modules = module_names(root)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_llmlab_has_no_import_cycle():
    assert find_cycles(PACKAGE) == []


def test_the_scan_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "planted"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from planted.sub import b\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from planted.sub.b import g  # hidden in a function\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n\ndef g():\n    pass\n")
    (pkg / "c.py").write_text("from planted import a\n")  # imports into the cycle, is not part of it
    assert find_cycles(pkg) == [["planted.a", "planted.sub.b"]]


def _function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source line) of every import inside a function of the file."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    out.append((node.lineno, lines[node.lineno - 1]))
    return out


@pytest.mark.parametrize("name", sorted(module_names(PACKAGE)))
def test_imports_inside_functions_only_defer_a_heavy_optional_dependency(name):
    path = module_names(PACKAGE)[name]
    lines = path.read_text().splitlines()
    for lineno, line in _function_imports(path):
        here = " ".join(lines[max(lineno - 4, 0):lineno])  # the comment may sit on a line just above
        assert "llmlab" not in line.split("#")[0], f"{path}:{lineno}: import llmlab's own modules at the top: {line.strip()}"
        assert "deferred" in here, f"{path}:{lineno}: an import inside a function needs a '# deferred: why' comment: {line.strip()}"


def test_readme_layout_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 1)]
    listed = {line.split()[0] for line in layout.splitlines() if line.startswith("llmlab/")}
    missing = [str(path.relative_to(PACKAGE.parent)) for path in sorted(PACKAGE.rglob("*.py"))
               if str(path.relative_to(PACKAGE.parent)) not in listed]
    assert missing == [], f"README's Layout lacks {missing}"
