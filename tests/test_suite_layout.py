"""The test suite's own layout: it mirrors the package, and test modules share helpers
through plain modules in one place only.

``tests/<room>/`` holds the tests of ``streamrnn/<room>/`` (the top-level modules' tests sit
in ``tests/``). Importing one test module from another makes pytest collect (or
half-collect) its tests and fixtures twice and ties unrelated files together; shared models,
fixtures and drivers live in ``tests/helpers/`` (``durable_helpers.py``,
``weights_helpers.py``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_test_module_imports_another_test_module():
    offenders = {
        str(path.relative_to(TESTS)): sorted(m for m in _imported_modules(path)
                                             if m.rpartition(".")[2].startswith("test_"))
        for path in sorted(TESTS.rglob("*.py"))
    }
    offenders = {name: mods for name, mods in offenders.items() if mods}
    assert not offenders, f"test modules importing test modules: {offenders}"


def test_tests_mirror_the_package():
    package = TESTS.parent / "streamrnn"
    rooms = {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    test_dirs = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert test_dirs - {"helpers"} <= rooms, f"test folders without a package: {test_dirs}"
    assert rooms <= test_dirs, f"packages without a test folder: {sorted(rooms - test_dirs)}"


def test_helpers_hold_no_tests_and_test_folders_hold_only_tests():
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS)
        if rel.parts[0] == "helpers":
            assert not path.name.startswith("test_"), f"{rel}: a test module among helpers"
        elif len(rel.parts) > 1:
            assert path.name.startswith("test_") or path.name == "__init__.py", (
                f"{rel}: shared code belongs in tests/helpers/")
