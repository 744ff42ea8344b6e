"""tests/README.md's module -> test map stays complete and true: every module under qdet/
(but ``__init__.py`` files that only re-export) has a row, every row's module exists, every
test file a row names exists, and a file listed as importing a module does import it (the
module or a name defined in it, followed through the packages' re-exports).

``map_problems`` returns a list of problems; ``test_map_check_catches_*`` feed it broken
maps and require each problem, so the check cannot pass vacuously.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from qdet_modules import ROOT, package_modules

TESTS = ROOT / "tests"
HEADING = "## Module -> test map"
ROW = re.compile(r"^\|\s*`(qdet/[\w/]+\.py)`\s*\|([^|]*)\|([^|]*)\|\s*$")


def map_rows(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(module, test files that import it, test files that run it otherwise) per row of the
    table under ``HEADING``."""
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.split("\n"):
        m = ROW.match(line)
        if m:
            imports, runs = (re.findall(r"`([^`]+)`", cell) for cell in m.groups()[1:])
            rows.append((m.group(1), imports, runs))
    return rows


def _module_path(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        definition = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        if isinstance(node, definition) and node.name == name:
            return True
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            targets = []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def defining_module(dotted: str, name: str, depth: int = 5) -> str | None:
    """The module (``qdet.x.y``) that defines ``name`` imported from ``dotted``: a
    submodule of that name, the module itself, or where its re-export comes from."""
    path = _module_path(dotted)
    if path is None or depth == 0:
        return None
    if path.name == "__init__.py" and _module_path(f"{dotted}.{name}") is not None:
        return f"{dotted}.{name}"
    tree = ast.parse(path.read_text())
    if _defines(tree, name):
        return dotted
    for node in tree.body:
        imported = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qdet")
        if imported and any((a.asname or a.name) == name for a in node.names):
            return defining_module(node.module, name, depth - 1)
    return dotted


@functools.cache
def imported_modules(test_file: Path) -> frozenset[str]:
    """The qdet modules a test file imports, as repository paths (``qdet/x/y.py``)."""
    found = set()
    for node in ast.walk(ast.parse(test_file.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qdet"):
            found.add(node.module)
            found.update(defining_module(node.module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qdet"))
    paths = (_module_path(m) for m in found if m)
    return frozenset(p.relative_to(ROOT).as_posix() for p in paths if p is not None)


def map_problems(rows, modules: list[str], tests: Path) -> list[str]:
    problems, seen = [], set()
    for module, imports, runs in rows:
        if module in seen:
            problems.append(f"{module}: two rows")
        seen.add(module)
        if module not in modules:
            problems.append(f"{module}: a row, but no such module (renamed or removed?)")
        if not imports and not runs:
            problems.append(f"{module}: no test file")
        for name in imports + runs:
            if not re.fullmatch(r"test_\w+\.py", name) or not (tests / name).is_file():
                problems.append(f"{module}: tests/{name} is not a test file")
            elif (
                name in imports
                and module in modules
                and module not in imported_modules(tests / name)
            ):
                problems.append(
                    f"{module}: tests/{name} does not import it (move it to the last column "
                    "if it runs the module through a config, a tool or another module)"
                )
    problems += [f"{m}: no row in tests/README.md's map" for m in modules if m not in seen]
    return problems


def test_the_map_names_every_module_and_only_real_tests():
    rows = map_rows((TESTS / "README.md").read_text())
    modules = package_modules()
    assert len(modules) > 60 and len(rows) > 60  # a parser that finds nothing is broken
    problems = map_problems(rows, modules, TESTS)
    assert not problems, "\n".join(problems)


def test_map_check_catches_missing_stale_and_false_rows():
    rows = [
        ("qdet/quantization/folding.py", ["test_folding.py"], []),
        ("qdet/quantization/folding.py", [], ["test_deploy_target.py"]),
        ("qdet/quantization/ranges.py", ["test_range_report.py"], []),
        ("qdet/engine/checkpoint.py", ["test_no_such_file.py", "conftest.py"], []),
        ("qdet/quantization/calibration.py", ["test_checkpoint.py"], []),
        ("qdet/quantization/layers.py", [], []),
    ]
    modules = [
        "qdet/engine/checkpoint.py",
        "qdet/quantization/calibration.py",
        "qdet/quantization/folding.py",
        "qdet/quantization/layers.py",
        "qdet/quantization/surgery.py",
    ]
    assert map_problems(rows, modules, TESTS) == [
        "qdet/quantization/folding.py: two rows",
        "qdet/quantization/ranges.py: a row, but no such module (renamed or removed?)",
        "qdet/engine/checkpoint.py: tests/test_no_such_file.py is not a test file",
        "qdet/engine/checkpoint.py: tests/conftest.py is not a test file",
        "qdet/quantization/calibration.py: tests/test_checkpoint.py does not import it (move it "
        "to the last column if it runs the module through a config, a tool or another module)",
        "qdet/quantization/layers.py: no test file",
        "qdet/quantization/surgery.py: no row in tests/README.md's map",
    ]


def test_imports_are_followed_through_re_exports():
    # test_calibration.py imports calibrate and quantize_model from qdet.quantization
    found = imported_modules(TESTS / "test_calibration.py")
    assert {"qdet/quantization/calibration.py", "qdet/quantization/surgery.py"} <= found
    assert "qdet/quantization/folding.py" not in found
