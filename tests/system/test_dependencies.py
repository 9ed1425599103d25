"""Dependencies run one way: the student may import the teacher package, never the reverse; no
import cycles; each room of the student imports only what it may."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from testkit import REPO


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a Python file imports (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_teacher_package_never_imports_the_student_package():
    offenders = {
        str(path.relative_to(REPO)): sorted(n for n in imported_modules(path) if n.split(".")[0] == "student")
        for path in (REPO / "teacher_server").rglob("*.py")
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"teacher_server imports the student package: {offenders}"


def test_the_scan_sees_lazy_imports(tmp_path):
    # The check above must not be blind to an import inside a function body.
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from student.engine import train\n    import student.data\n")
    assert imported_modules(module) == {"student.engine", "student.data"}


# -- the import graph of the project's own modules ------------------------------------------------

PACKAGES = ("student", "teacher_server")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project (a package is its ``__init__.py``)."""
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if "_proto" in parts:  # generated stubs
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (relative and lazy imports included).

    ``from a.b import c`` counts as importing ``a.b``, and ``a.b.c`` too when that is a module.
    """
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_the_projects_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# Rooms of the student and what each may not import (prefixes of module names).
FORBIDDEN = {
    # Metrics on predictions: numpy, the shared class names, box conversions; no model, loss or run code.
    "student.evaluation": (
        "student.model",
        "student.losses",
        "student.engine",
        "student.config",
        "student.builders",
        "student.training",
        "student.inference",
        "student.teacher",
        "student.commands",
    ),
    # The loss folder asks a teacher only through an interface it defines (MarginTeacher).
    "student.losses": ("student.teacher", "student.engine", "student.builders", "student.training", "student.commands"),
    # The teacher adapter is built by the builders, never the other way round.
    "student.teacher": (
        "student.engine",
        "student.builders",
        "student.training",
        "student.inference",
        "student.commands",
    ),
    "student.model": ("student.losses", "student.teacher", "student.engine", "student.config", "student.commands"),
}


ARCHITECTURE = REPO / "docs" / "architecture.md"


def documented_forbidden_edges() -> dict[str, tuple[str, ...]]:
    """The table of docs/architecture.md's "Forbidden edges": room -> the modules it may not import."""
    section = ARCHITECTURE.read_text().split("## Forbidden edges", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)` \| (`.*`) \|$", section, flags=re.MULTILINE)
    return {room: tuple(re.findall(r"`([\w.]+)`", cell)) for room, cell in rows}


def test_the_architecture_doc_lists_the_edges_this_test_forbids() -> None:
    assert documented_forbidden_edges() == {"teacher_server": ("student",), **FORBIDDEN}


def test_every_path_the_architecture_doc_names_exists() -> None:
    spans = re.findall(r"`([^`\s]+)`", ARCHITECTURE.read_text())
    paths = [span for span in spans if "/" in span and not span.startswith(("http", "redis:"))]
    assert len(paths) > 20  # the doc names real files; the scan finds them
    missing = [path for path in paths if not any(REPO.glob(path))]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_each_room_imports_only_what_it_may() -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for room, forbidden in FORBIDDEN.items()
        if module == room or module.startswith(room + ".")
        for target in targets
        if target.startswith(forbidden)
    )
    assert not offenders, offenders


def test_only_the_dispatcher_imports_the_commands() -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if not module.startswith(("student.commands", "student.__main__"))
        for target in targets
        if target.startswith("student.commands")
    )
    assert not offenders, offenders


def test_the_evaluation_package_imports_without_torch() -> None:
    code = "import sys, student.evaluation, student.evaluation.report; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
