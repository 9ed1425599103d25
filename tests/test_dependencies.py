"""Dependencies run one way: the student may import the teacher package, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path) if n.split(".")[0] == "student")
        for path in (ROOT / "teacher_server").rglob("*.py")
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"teacher_server imports the student package: {offenders}"


def test_the_scan_sees_lazy_imports(tmp_path):
    # The check above must not be blind to an import inside a function body.
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from student.engine import train\n    import student.data\n")
    assert imported_modules(module) == {"student.engine", "student.data"}
