"""The package's shape, read with `ast`: no import cycles, the library never imports the commands, optional
extras imported only where used, every name defined once, and no long functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bdh_lightning"
COMMAND_FLOOR = {"cli", "commands", "main", "__main__"}
# Optional dependencies (extras) and the subpackages allowed to import them; elsewhere they would break
# `import bdh_lightning` for a user without the extra.
EXTRAS = {"litdata": ("data",), "matplotlib": ("insight",), "networkx": ("insight",), "scipy": ("insight",)}
LONGEST_FUNCTION = 60  # lines of code, docstring excluded; Triton kernels (@triton.jit) are exempt


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its body (functions included)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            stem = base + (node.module.split(".") if node.module else [])
            # `from . import x` names a submodule x, not the package itself (whose __init__ runs anyway)
            targets = [".".join(stem + [a.name]) for a in node.names] + ([".".join(stem)] if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bdh_lightning."):
            stem = node.module.split(".")[1:]
            targets = [".".join(stem + [a.name]) for a in node.names] + [".".join(stem)]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("bdh_lightning.")]
        for target in targets:
            while target and target not in known:  # an imported name: its module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found - {name, "__init__"}


def package_imports(at_import_time: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports; `at_import_time`: only its top-level imports, not those inside
    functions (what `import module` loads)."""
    trees = modules()
    if at_import_time:
        top = (ast.Import, ast.ImportFrom)
        trees = {name: ast.Module([n for n in tree.body if isinstance(n, top)], []) for name, tree in trees.items()}
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    return {name: imported_modules(name, name in packages, tree, set(trees)) for name, tree in trees.items()}


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


def test_the_walk_resolves_relative_imports_in_subpackages():
    graph = package_imports()
    assert "layer" in graph["kernels.chunked"]  # from ..layer import ...
    assert "kernels.masks" in graph["kernels.chunked"]  # from .masks import ...
    assert "kernels" in graph["model"] and "layer" in graph["model"]


def test_no_import_cycles():
    graph = package_imports()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_commands():
    for module, imported in package_imports().items():
        if module not in COMMAND_FLOOR:
            assert not imported & COMMAND_FLOOR, f"{module} imports {imported & COMMAND_FLOOR}"


# Optional features, imported where they are used: importing the core never loads them.
OPTIONAL = ("insight", "kernels.fused")


def test_the_core_loads_no_optional_feature_at_import_time():
    graph = package_imports(at_import_time=True)
    for module in graph:
        if module.startswith(OPTIONAL):
            continue
        seen, todo = set(), [module]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert not {m for m in seen if m.startswith(OPTIONAL)}, f"importing {module} loads {sorted(seen)}"


def top_level_imports(tree: ast.Module) -> set[str]:
    """Third-party packages imported when the module is imported (not inside a function)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_extras_are_imported_only_by_their_feature():
    graph = package_imports()
    core_reach = set()  # what `import bdh_lightning` and the training path load at import time
    for name, tree in modules().items():
        for extra, owners in EXTRAS.items():
            if extra in top_level_imports(tree):
                assert name.split(".")[0] in owners, f"{name} imports {extra} at import time"
                core_reach.add(name)
    assert not core_reach & graph["__init__"], "import bdh_lightning pulls an extra"


def test_every_name_is_defined_once():
    where: dict[str, list[str]] = {}
    for name, tree in modules().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                where.setdefault(node.name, []).append(name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.isupper():
                        where.setdefault(target.id, []).append(name)
    twice = {k: v for k, v in where.items() if len(v) > 1 and k != "__all__"}
    assert not twice, twice


def code_lines(node: ast.FunctionDef) -> int:
    first = node.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
    start = node.body[1].lineno if has_doc and len(node.body) > 1 else node.lineno
    return node.end_lineno - start + 1


def test_no_long_functions():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                triton = any("jit" in ast.unparse(d) for d in node.decorator_list)
                if not triton and code_lines(node) > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name}: {code_lines(node)} lines")
    assert not long, long
