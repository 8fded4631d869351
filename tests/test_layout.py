"""The package's shape: the library never imports the experiments or the command line, its module-level
imports form no cycle, and no module outgrows one reader's sitting."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scoreaction"
OUTER = ("scoreaction.cli", "scoreaction.experiments")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scoreaction"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("scoreaction"))
    return found


def test_the_library_never_imports_the_experiments_or_the_cli():
    bad = []
    for name, path in modules().items():
        if name.startswith(OUTER) or name == "scoreaction.__main__":
            continue
        bad += [f"{name} imports {target}" for target in imports(path, module_level_only=False)
                if target.startswith(OUTER)]
    assert not bad, bad


def test_module_level_imports_have_no_cycle():
    mods = modules()
    graph = {name: {t for t in imports(path, module_level_only=True) if t in mods and t != name}
             for name, path in mods.items()}
    # a package's __init__ importing its own submodules is how a package is assembled, not a cycle
    graph = {name: {t for t in targets if not (t.startswith(name + ".") and mods[name].name == "__init__.py")}
             for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_is_over_the_size_limit():
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, big
