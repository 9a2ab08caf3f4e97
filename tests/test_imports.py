"""The package's import graph, read with `ast`: no cycles, and the library floor never imports the command floor."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bdh_lightning"
COMMAND_FLOOR = {"cli", "commands", "main", "__main__"}


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (functions included)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    names = [node.module] if node.module else [alias.name for alias in node.names]
                elif node.module and node.module.startswith("bdh_lightning."):
                    names = [node.module.split(".")[1]]
                else:
                    names = []
                found |= {n.split(".")[0] for n in names if n and n.split(".")[0] in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bdh_lightning.")}
        graph[path.stem] = found - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = package_imports()
    assert len(graph) > 10 and "layer" in graph["model"] | graph["kernels"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_commands():
    for module, imported in package_imports().items():
        if module not in COMMAND_FLOOR and module != "__init__":
            assert not imported & COMMAND_FLOOR, f"{module} imports {imported & COMMAND_FLOOR}"
