"""The pages the docs checkers read (README.md, docs/*.md, the project READMEs) and the
Markdown they share: fenced blocks, code spans, GitHub's heading anchors.

Each ``tests/test_docs_*.py`` is one checker over these pages; see tests/README.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = (
    "getting_started",
    "methods",
    "model_zoo",
    "deployment",
    "benchmarks",
    "studies",
    "config_reference",
    "troubleshooting",
    "layout",
)


def doc_files() -> list[Path]:
    """README, the top-level pages, the generated tables under docs/ and the project READMEs."""
    files = [README, *sorted(DOCS.rglob("*.md")), *sorted(ROOT.glob("projects/*/README.md"))]
    return [f for f in files if f.is_file()]


# --- Markdown ------------------------------------------------------------------------------

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the lines outside fenced blocks, blank inside them; [(language, block lines)])."""
    prose, blocks, fence, indent, lang, body = [], [], None, 0, "", []
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence, indent, lang, body = m.group(2), len(m.group(1)), m.group(3).lower(), []
                prose.append("")
            else:
                prose.append(line)
        elif line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((lang, body))
            fence = None
            prose.append("")
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            prose.append("")
    return prose, blocks


CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def prose_text(text: str) -> str:
    """The text outside code blocks, code spans and HTML comments."""
    prose = "\n".join(split_fences(text)[0])
    prose = re.sub(r"<!--.*?-->", "", prose, flags=re.S)
    return CODE_SPAN.sub("CODE", prose)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, formatting and punctuation (but - and
    _) dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.replace("`", "").replace("*", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))
