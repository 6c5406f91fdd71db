"""The test suite's own layout: shared code lives in tests/support/, the independent references in
tests/references/, and no test module imports another (a test module is not a library)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGES = ("support", "references")


def _imported(path: Path) -> set[str]:
    """Top-level names of the absolute imports of a file, in-function imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another():
    modules = {p.stem for p in TESTS.rglob("test_*.py")}
    imports = {str(p.relative_to(TESTS)): sorted(_imported(p) & modules) for p in TESTS.rglob("*.py")}
    offenders = {path: names for path, names in imports.items() if names}
    assert not offenders, f"test modules imported as libraries (move the shared code to tests/support/): {offenders}"


def test_only_tests_and_conftest_beside_the_packages():
    loose = [p.name for p in TESTS.glob("*.py") if p.name != "conftest.py" and not p.name.startswith("test_")]
    assert not loose, f"shared code belongs in tests/{PACKAGES[0]}/ or tests/{PACKAGES[1]}/: {loose}"
    assert all((TESTS / package / "__init__.py").is_file() for package in PACKAGES)


def test_references_import_neither_transformers_nor_hetgraph():
    """The references are independent: torch, safetensors and the standard library only."""
    for path in (TESTS / "references").glob("*.py"):
        assert not _imported(path) & {"transformers", "hetgraph", "support"}, path.name
