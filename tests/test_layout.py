"""The code's layout: no import cycles, and layers that point one way.

    storage ← engine ← jobs ← daemon (assembly only) → api

Read from the source (every `import`, at any depth, type-only ones included), so a
cycle hidden inside a function or behind TYPE_CHECKING counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mwapjobs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The mwapjobs modules `path` imports (a package import counts as its __init__)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mwapjobs")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mwapjobs"):
                continue
            for alias in node.names:  # `from . import probes` imports a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


def test_there_are_no_import_cycles() -> None:
    edges = {m: {t for dep in deps for t in (dep, *parents(dep))} - {m} - set(parents(m))
             for m, deps in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def layer(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else "mwapjobs"


GENERIC = ["storage", "engine", "scheduler", "duetimer", "outcomes", "queues", "policy",
           "triggers", "metrics", "alerts", "operations", "api", "supervisor", "config"]


@pytest.mark.parametrize("low", GENERIC)
def test_generic_layers_never_import_a_job(low: str) -> None:
    offenders = {m: sorted(d for d in deps if layer(d) == "jobs")
                 for m, deps in GRAPH.items() if layer(m) == low}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_storage_is_the_bottom_layer() -> None:
    allowed = {"storage", "logs", "redaction", "config", "timeouts"}
    offenders = {m: sorted(d for d in deps if layer(d) not in allowed)
                 for m, deps in GRAPH.items() if layer(m) == "storage"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_only_the_daemon_and_the_command_line_assemble() -> None:
    users = {m for m, deps in GRAPH.items() if "mwapjobs.daemon" in deps}
    assert users <= {"mwapjobs.cli", "mwapjobs.signals"}


def test_the_daemon_is_a_small_composition_root() -> None:
    lines = (ROOT / "daemon.py").read_text(encoding="utf-8").count("\n")
    assert lines < 200, lines


def test_triggers_load_no_database_driver() -> None:
    """config.py imports triggers to check crontabs: that must not pull in pymongo."""
    tree = ast.parse((ROOT / "triggers.py").read_text(encoding="utf-8"))
    names = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {n for n in names if n.split(".")[0] in ("pymongo", "motor", "bson")}
    assert not {n for n in GRAPH["mwapjobs.triggers"]}
