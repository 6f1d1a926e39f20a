"""The test suite's own layout: test modules share helpers through plain modules only.

Importing one test module from another makes pytest collect (or half-collect) its tests and
fixtures twice and ties unrelated files together; shared models, fixtures and drivers live
in non-test modules (``tests/durable_helpers.py``, ``tests/weights_helpers.py``, ...).
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
        path.name: sorted(m for m in _imported_modules(path)
                          if m.rpartition(".")[2].startswith("test_"))
        for path in sorted(TESTS.glob("*.py"))
    }
    offenders = {name: mods for name, mods in offenders.items() if mods}
    assert not offenders, f"test modules importing test modules: {offenders}"
