"""Write docs/architecture.md: every llmis module by package, with its docstring's first sentence.

Run ``python -m scripts.module_map`` after adding, moving or renaming a module;
``tests/test_layout.py`` fails while the file is out of date.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "architecture.md"
HEADER = """# llmis modules

The package map and the path of one request are in the README's "Architecture" section.
Here is every module, by package, with the first sentence of its docstring. The arrows between
packages are checked by `make lint` (`lint-imports`, contracts in `pyproject.toml`).
Regenerate this file with `python -m scripts.module_map`.
"""


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = doc.strip().split("\n\n")[0].replace("\n", " ")
    text = re.sub(r":(?:mod|class|func|meth|attr|data):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").split(". ")[0].rstrip(".")


def render() -> str:
    modules = sorted(p for p in (ROOT / "llmis").rglob("*.py") if p.name != "__main__.py")
    groups: dict[str, list[Path]] = {"top level": []}
    for path in modules:
        rel = path.relative_to(ROOT)
        key = "top level" if len(rel.parts) == 2 else f"{rel.parts[1]}/"
        groups.setdefault(key, []).append(rel)
    lines = [HEADER]
    for key, paths in groups.items():
        lines += [f"## {key}", "", "| module | holds |", "|---|---|"]
        lines += [f"| `{p}` | {first_sentence(ROOT / p)} |" for p in paths]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
