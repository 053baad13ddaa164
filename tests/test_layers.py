"""The package's shape: three floors (core, patchers, harness), imports only pointing down, no circles.

Every ``import`` of a vlprune module in the source, at module level or inside a function, and every
``importlib.import_module("vlprune....")`` with a literal name, is an edge: a lazy import still makes one
module need the other. (Patchers are found through entry points, data in pyproject.toml, not an import.)
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"vlprune": ROOT / "vlprune", "vlprune.patches": ROOT / "patches", "vlprune.eval": ROOT / "eval"}
FLOOR = {"vlprune": 1, "vlprune.patches": 2, "vlprune.eval": 3}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "vlprune" and parts[0] in ("patches", "eval"):
                continue
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The vlprune modules ``name`` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]  # importlib.import_module("vlprune....") is an import too
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def floor(name: str) -> int:
    return max(f for p, f in FLOOR.items() if name == p or name.startswith(p + "."))


def test_imports_only_point_down():
    upward = [(a, b) for a, deps in graph().items() for b in deps if floor(b) > floor(a)]
    assert not upward, f"imports pointing up a floor (core 1 < patchers 2 < harness 3): {upward}"


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk closes (a back edge), as the path around it."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circles():
    # a package's __init__ importing its own submodules is how a package is assembled, not a circle
    edges = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in graph().items()}
    found = circles(edges)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_graph_sees_lazy_imports():
    """The checks above can fail: a function-level import is an edge too."""
    deps = graph()
    assert "vlprune.registry" in deps["vlprune.api"]
    assert "vlprune.eval.scenes_task" not in deps["vlprune.embedded.scenes"]
    assert len(deps) > 50
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
