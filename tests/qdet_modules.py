"""The modules a map must name (tests/README.md's module -> test map, docs/layout.md's
packages and tools), walked from the tree: every ``qdet/**/*.py`` but the ``__init__.py``
files that only import and re-export, and every ``tools/*.py``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def only_reexports(path: Path) -> bool:
    """Whether a module's body is a docstring, imports and dunder names (``__all__``,
    ``__version__``) only: nothing of its own to test or describe."""
    for i, node in enumerate(ast.parse(path.read_text()).body):
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        dunders = isinstance(node, ast.Assign) and all(
            isinstance(t, ast.Name) and t.id.startswith("__") and t.id.endswith("__")
            for t in node.targets
        )
        if not (
            (i == 0 and docstring) or isinstance(node, (ast.Import, ast.ImportFrom)) or dunders
        ):
            return False
    return True


def package_modules() -> list[str]:
    """Every module under qdet/ as a path from the repository root, e.g.
    ``qdet/quantization/folding.py``, without the ``__init__.py`` files that only import."""
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "qdet").rglob("*.py")
        if not (p.name == "__init__.py" and only_reexports(p))
    )


def packages() -> list[str]:
    """qdet's subpackages as folder paths, e.g. ``qdet/quantization/``."""
    return sorted(
        p.parent.relative_to(ROOT).as_posix() + "/" for p in ROOT.glob("qdet/*/__init__.py")
    )


def tool_scripts() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tools").glob("*.py"))
