"""The package layering issue 21 relies on: ``nodes/`` (inside ComfyUI) never imports ``training/`` (the
headless trainer and its diffusers/accelerate stack), and ``tdm_core/`` (shared by both) imports neither host."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "nodes": {"training", "diffusers", "accelerate", "peft"},
    "tdm_core": {"training", "nodes", "comfy", "comfy_api", "comfy_extras", "folder_paths", "diffusers", "transformers", "accelerate", "peft"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names a module imports, relative imports resolved against the repository root."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add((node.module or "").split(".")[0])
            elif node.level >= 2:  # from ..x import y: a sibling package of the repository root
                names.add(node.module.split(".")[0] if node.module else "")
                names.update(alias.name for alias in node.names if not node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_layer(package):
    offending = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in offending.items() if v}, offending


# --- import circles (issue 23, item 6) ------------------------------------------------------------
# The project's import picture: one node per module of these packages, one edge per import of another
# of them. Imports inside functions count too: a deferred import hides a circle from Python's import
# machinery but not from the reader, and the two modules still cannot be understood (or moved) apart.
# importlib.import_module with a computed name (training.models' plug-in families) is not an edge.
GRAPH_PACKAGES = ("tdm_core", "nodes", "training", "benchmarks")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere in its body, relative imports resolved:
    ``from training.families import flux`` is ``training.families.flux``, ``from .models import X`` in
    ``training/loop.py`` is ``training.models``, an import of a name inside a module is that module."""
    def owner(name: str) -> str | None:  # the longest known module a dotted name lies in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(owner(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(owner(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else owner(base) for alias in node.names)
    return found - {None, this}


def import_graph(root: Path = ROOT, packages=GRAPH_PACKAGES) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}
    return {name: imported_modules(path, set(paths), root) for name, path in paths.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm), sorted."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(circles)


def describe(circle: list[str], graph: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(circle)))}" for m in circle)


def test_import_circles_are_found(tmp_path):
    """The finder itself, on a tree with a function-level circle, a relative one and a clean module."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pkg.a import thing\n")
    (package / "c.py").write_text("from pkg.sub.b import f\nimport pkg.a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.c"] == {"pkg.sub.b", "pkg.a"}
    assert import_circles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_project_has_no_import_circles():
    graph = import_graph()
    circles = import_circles(graph)
    assert not circles, "import circles:\n" + "\n".join(describe(c, graph) for c in circles)
