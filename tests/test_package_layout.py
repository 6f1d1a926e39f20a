"""The package's own shape: small modules and classes, and every module says what it exports.

Limits held since the structure issue: no module over 400 lines, no class over 300; every
module has a docstring and a sorted ``__all__`` (a package's ``__main__`` excepted). The
import layering itself is checked by ``lint-imports`` (contracts in pyproject.toml).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "streamrnn"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_module_is_small_and_declares_its_exports(path: Path):
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_rel(path)} has {lines} lines"
    tree = ast.parse(text)
    assert ast.get_docstring(tree), f"{_rel(path)} has no module docstring"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{_rel(path)}: class {node.name} is {size} lines"
    if path.name == "__main__.py":
        return
    exported = [node.value for node in tree.body
                if isinstance(node, ast.Assign | ast.AnnAssign)
                and any(isinstance(t, ast.Name) and t.id == "__all__"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    assert exported, f"{_rel(path)} has no __all__"
    names = ast.literal_eval(exported[0])
    assert list(names) == sorted(names), f"{_rel(path)}: __all__ is not sorted"
