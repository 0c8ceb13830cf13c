"""The package's import graph has no circle, counting imports inside functions too (a circle that only works
because one side imports late is still two modules that cannot be understood apart)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The source folders and the names they install under (triton_kernels/ and eval/ live inside llmopt).
PACKAGES = {"llmopt": ROOT / "llmopt", "llmopt.eval": ROOT / "eval", "llmopt.triton_kernels": ROOT / "triton_kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if any((folder / Path(*parts[:i])).is_symlink() for i in range(1, len(parts) + 1)):
                continue  # llmopt/eval and llmopt/triton_kernels are links to the folders above
            name = ".".join((prefix, *parts[:-1], *(() if parts[-1] == "__init__" else parts[-1:])))
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        # a module importing its own parent package is how Python loads it anyway: not an edge of a circle
        graph[name] = {t for t in map(owner, targets) if t and t != name and not name.startswith(t + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                found.append(sorted([node, *component]))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 100 and "llmopt.eval.suite" in graph and "llmopt.triton_kernels" in graph
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
