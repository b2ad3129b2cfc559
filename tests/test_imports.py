"""No import cycles inside a package: no module imports a module that (directly or through others) imports
it back. Read from the source with `ast`, so every import counts: top-level ones, those inside functions
and those under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# The packages checked, as one graph (so a cycle through both is found too).
PACKAGES = ("evaluation", "ldm")


def module_names(*packages: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages (a package is its __init__)."""
    names = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that the file imports: `import a.b`, `from a import b` (module b, or a name
    of module a), relative imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from a import name`: the module is `a`
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the modules (of the same packages) that it imports."""
    known = module_names(*packages)
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_cycle_finder_on_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"g"}, "g": {"f"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["f", "g"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_parser_resolves_from_relative_and_type_checking_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py"):
        (pkg / f).write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import Thing\n"
        "from .sub import c\nimport os\n"
    )
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..b import g\n    import pkg.sub\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    graph = import_graph("pkg")
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.b", "pkg.sub"}


def test_no_import_cycles():
    graph = import_graph(*PACKAGES)
    assert {"evaluation.setups", "evaluation.spec", "ldm.models.diffusion.ddpm"} <= set(graph)
    assert "evaluation.spec" in graph["evaluation.results"] and graph["ldm.models.diffusion.ddpm"]
    assert find_cycles(graph) == [], "import cycles (each list: modules that import each other)"


def test_spec_and_results_import_in_either_order():
    for order in (["evaluation.results", "evaluation.setups"], ["evaluation.setups", "evaluation.results"]):
        code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
