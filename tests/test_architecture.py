"""The package's shape (docs/architecture.md): no import cycles, every module importable on
its own, and no module-level state that requests change."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastapi_ratelimit"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every package module ``name`` imports: at the top, in functions and under
    ``TYPE_CHECKING`` alike (a type-only import still ties the two modules together)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target in MODULES:
                found.add(target)
            found.update(
                f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES
            )
    # A module's own package runs first anyway; only the package's __init__ re-exports.
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph``, if there is any (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (found := visit(child)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert graph["fastapi_ratelimit.middleware"]  # the graph sees imports at all
    assert _cycle(graph) is None


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    # All at once (one interpreter each): a module that only imports after another has
    # been imported fails here.
    names = sorted(MODULES)
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    }
    failed = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        if process.returncode != 0:
            failed[name] = stderr.strip().splitlines()[-1:]
    assert failed == {}


#: Module-level containers and objects allowed, each with why it is no shared request state.
ALLOWED_MODULE_OBJECTS = {
    # Constant tables, filled at import and only read afterwards.
    ("headers.py", "HEADER_NAMES"),
    ("respond.py", "_REPLACED"),
    ("rate.py", "_UNITS"),
    ("policy.py", "_CODES"),
    ("metrics.py", "METRICS"),
    ("metrics.py", "_GAUGE_MODES"),
    ("tiers.py", "DEFAULT_TIERS"),
    ("dashboard/__init__.py", "_SECURITY_HEADERS"),
    ("dashboard/__init__.py", "_FILES"),
    # Immutable values.
    ("identity.py", "_IPV4_MAPPED"),
    ("routing.py", "_UNMATCHED"),
    # Log lines are a process-wide sink (loguru's logger is one): their rate limit is too.
    ("logs.py", "_PROCESS"),
}


def _module_objects() -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            mutable = isinstance(
                value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
            ) or (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and (value.func.id[0].isupper() or value.func.id in ("dict", "list", "set"))
                and value.func.id not in ("TypeVar", "frozenset")
            )
            for target in targets:
                if mutable and isinstance(target, ast.Name) and target.id != "__all__":
                    found.add((path.relative_to(PACKAGE).as_posix(), target.id))
    return found


def test_no_module_level_state_beyond_the_known_constants() -> None:
    # Caches belong to the limiter or middleware that uses them: two apps in one process
    # must not share (or evict) each other's entries.
    assert _module_objects() == ALLOWED_MODULE_OBJECTS
