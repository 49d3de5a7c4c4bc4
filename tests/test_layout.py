"""The import graph: no cycles between modules, and the rooms depend on each other one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("apdispatch", "workers")

# Room -> the rooms it may import. A room is the first one of these prefixes a
# module name starts with (longest first). Everything points down this list.
ALLOWED: dict[str, set[str]] = {
    "apdispatch.common": set(),
    "apdispatch.scenario": {"apdispatch.common"},
    "apdispatch.routing": {"apdispatch.common"},
    "apdispatch.learned": {"apdispatch.common", "apdispatch.routing"},
    "apdispatch.policies": {"apdispatch.common", "apdispatch.routing", "apdispatch.learned"},
    "apdispatch.client": {"apdispatch.common"},
    "apdispatch.ap": {"apdispatch.common", "apdispatch.routing", "apdispatch.learned", "apdispatch.policies"},
    "apdispatch.sim": {
        "apdispatch.common",
        "apdispatch.scenario",
        "apdispatch.routing",
        "apdispatch.learned",
        "apdispatch.policies",
    },
    "apdispatch.tools": {
        "apdispatch.common",
        "apdispatch.scenario",
        "apdispatch.routing",
        "apdispatch.learned",
        "apdispatch.policies",
        "apdispatch.client",
        "apdispatch.ap",
        "apdispatch.sim",
    },
    # The workers (and their model zoo) need only what is shared.
    "workers": {"apdispatch.common"},
    # The package's face (lazy SDK exports) and the command line sit on top.
    "apdispatch.cli": {"*"},
    "apdispatch": {"apdispatch.client", "apdispatch.common"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports, at any depth in the file (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # The longest known module the dotted name starts with.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                add(full if full in modules else module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    for room in sorted(ALLOWED, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"module {module} belongs to no room of tests/test_layout.py")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among module-level imports, or None."""
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_room() -> None:
    for module in _graph():
        _room(module)


def test_rooms_depend_one_way() -> None:
    wrong = []
    for module, targets in _graph().items():
        room = _room(module)
        allowed = ALLOWED[room]
        for target in targets:
            other = _room(target)
            if other != room and "*" not in allowed and other not in allowed:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(wrong))


def test_room_graph_has_no_cycle() -> None:
    rooms = {room: {r for r in allowed if r != "*"} for room, allowed in ALLOWED.items()}
    rooms["apdispatch.cli"] = set(ALLOWED) - {"apdispatch.cli"}
    assert _cycle(rooms) is None


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    # A package importing its own submodules is how packages work, not a cycle.
    for module in graph:
        graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_static_policies_do_not_load_torch() -> None:
    # The AP and the simulator with a static policy never need torch: only
    # building a learned policy may import it.
    code = (
        "import sys\n"
        "from apdispatch.policies import make_policy\n"
        "import apdispatch.ap.server, apdispatch.sim.results\n"
        "make_policy('fastest')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
