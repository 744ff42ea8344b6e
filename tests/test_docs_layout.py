"""Docs that cannot rot, the layout: docs/layout.md's "Packages and tools" map names every
package and module under qdet/ (but ``__init__.py`` files that only re-export: the
package's line says its idea) and every script under tools/, each with its idea, and names
nothing that does not exist; the layers it states are pyproject.toml's import-linter
contract.

``layout_problems`` returns a list of problems; ``test_layout_check_catches_*`` feed it a
broken map and require each problem, so the check cannot pass vacuously.
"""

from __future__ import annotations

import re

import pytest
from docs_markdown import DOCS, ROOT, split_fences
from qdet_modules import package_modules, packages, tool_scripts

SECTION = "## Packages and tools"
ENTRY = re.compile(r"^( {0,6})([\w.]+/|[\w.]+\.py)(?:\s+(.*))?$")


def _section_blocks() -> list[list[str]]:
    text = (DOCS / "layout.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [body for _, body in split_fences(section)[1]]


def layout_entries(block: list[str]) -> dict[str, str]:
    """{path: its idea} of the map's tree: two spaces of indent per folder level, a
    continuation line (indented past the names) adds to the entry above it."""
    entries: dict[str, str] = {}
    folders: list[str] = []
    last = None
    for line in block:
        m = ENTRY.match(line)
        if m is None:
            if last is not None and line.strip():
                entries[last] = f"{entries[last]} {line.strip()}".strip()
            continue
        level = len(m.group(1)) // 2
        folders = folders[:level]
        path = "".join(folders) + m.group(2)
        entries[path] = (m.group(3) or "").strip()
        if path.endswith("/"):
            folders.append(m.group(2))
        last = path
    return entries


def layout_problems(entries: dict[str, str], expected: list[str]) -> list[str]:
    problems = [f"{p}: not in docs/layout.md's map" for p in expected if p not in entries]
    for path, idea in entries.items():
        if not path.startswith(("qdet/", "tools/")):
            continue
        if path not in expected:
            problems.append(f"{path}: named in docs/layout.md's map, but no such module")
        elif not idea:
            problems.append(f"{path}: named without its idea")
    return problems


def expected_paths() -> list[str]:
    modules = [m for m in package_modules() if not m.endswith("/__init__.py")]
    return ["qdet/", *packages(), *modules, "tools/", *tool_scripts()]


def test_layout_names_every_module_and_tool():
    entries = layout_entries(_section_blocks()[0])
    expected = expected_paths()
    assert len(expected) > 80 and len(entries) > 80  # a parser that finds nothing is broken
    problems = layout_problems(entries, expected)
    assert not problems, "\n".join(problems)


def test_layout_check_catches_missing_stale_and_bare_entries():
    block = [
        "qdet/                   the package",
        "  config.py             the keys",
        "  quantization/         quantizers",
        "    ranges.py           plots (renamed since)",
        "    folding.py",
        "tools/                  scripts",
        "  predict.py            detections drawn;",
        "                        --compare, --onnx",
        "configs/                not checked",
    ]
    entries = layout_entries(block)
    assert entries["tools/predict.py"] == "detections drawn; --compare, --onnx"
    expected = ["qdet/", "qdet/config.py", "qdet/quantization/", "qdet/quantization/folding.py"]
    expected += ["qdet/quantization/layers.py", "tools/", "tools/predict.py"]
    assert layout_problems(entries, expected) == [
        "qdet/quantization/layers.py: not in docs/layout.md's map",
        "qdet/quantization/ranges.py: named in docs/layout.md's map, but no such module",
        "qdet/quantization/folding.py: named without its idea",
    ]


def _layers(lines: list[str]) -> list[frozenset[str]]:
    """Each layer as the set of its packages, ``qdet.`` prefixes dropped."""
    return [
        frozenset(p.strip().removeprefix("qdet.") for p in line.split("|"))
        for line in lines
        if line.strip()
    ]


def test_layout_states_the_import_linter_layers():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "layers"]
    assert contract["containers"] == ["qdet"]
    stated = _layers(_section_blocks()[1])
    assert stated == _layers(contract["layers"])
    # every package and top-level module has its layer
    tops = [p for p in package_modules() if p.count("/") == 1 and not p.endswith("__init__.py")]
    names = [p.removeprefix("qdet/").removesuffix(".py").rstrip("/") for p in packages() + tops]
    assert sorted(names) == sorted(p for layer in stated for p in layer)
