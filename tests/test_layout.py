"""The package layout stays documented: docs/architecture.md lists every module as it is, and
every subpackage says in its ``__init__`` docstring what it holds and what it may import.

The import arrows themselves are checked by ``lint-imports`` in ``make lint``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from scripts.module_map import OUT, render

ROOT = Path(__file__).resolve().parent.parent


def test_the_module_map_is_up_to_date() -> None:
    assert OUT.read_text() == render(), "run: python -m scripts.module_map"


def test_every_subpackage_says_what_it_holds_and_may_import() -> None:
    packages = [p for p in (ROOT / "llmis").iterdir() if (p / "__init__.py").is_file()]
    assert {p.name for p in packages} >= {"api", "engine", "models", "serving", "ops"}
    for package in packages:
        if package.name in ("templates",):
            continue
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc, f"{package.name}/__init__.py has no docstring"
        assert "import" in doc, f"{package.name}/__init__.py does not say what it may import"
