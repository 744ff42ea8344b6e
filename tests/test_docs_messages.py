"""Docs that cannot rot, error messages: every message docs/troubleshooting.md quotes (the
code spans of its tables' first column) is one a string literal of qdet's package, tools
or projects can still print.

``message_problems`` returns the messages no string can print;
``test_message_check_catches_a_reworded_message`` feeds it reworded messages and requires
them back, so the check cannot pass vacuously.
"""

from __future__ import annotations

import ast
import functools
import re

from docs_markdown import CODE_SPAN, DOCS, ROOT, _parse

HOLE = "\x00"  # where a message's f-string fills in a value


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
    return None


@functools.cache
def code_strings() -> tuple[str, ...]:
    """Every string literal (f-strings with holes) of qdet's package, tools, projects and
    the torch-free runner."""
    out = []
    for top in ("qdet", "tools", "projects", "qdet_runner.py"):
        for path in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else [ROOT / top]:
            for node in ast.walk(_parse(path)):
                text = _text(node)
                if text and len(text) > 8:
                    out.append(text)
    return tuple(out)


def quoted_messages(page: str) -> list[str]:
    """The code spans of the first column of the page's tables."""
    out = []
    for line in page.split("\n"):
        if not line.startswith("| `"):
            continue
        first = re.match(r"\|((?:[^|`]|(`+)(?:.+?)\2)*)\|", line).group(1)
        out += [m.group(2).strip() for m in CODE_SPAN.finditer(first)]
    return out


def message_problems(messages: list[str], strings: tuple[str, ...]) -> list[str]:
    """Messages no string of the code can print: their text between the ``…`` must appear,
    in order, in one string literal (``…`` may stand for a value or for more text)."""
    problems = []
    for message in messages:
        parts = message.split("…")
        longest = max(parts, key=len)
        pattern = re.compile(".*?".join(map(re.escape, parts)), re.S)
        if not any(pattern.search(s) for s in strings if longest in s):
            problems.append(message)
    return problems


def test_troubleshooting_quotes_real_messages():
    messages = quoted_messages((DOCS / "troubleshooting.md").read_text())
    assert len(messages) > 120
    problems = message_problems(messages, code_strings())
    assert not problems, "messages qdet no longer raises:\n" + "\n".join(problems)


def test_message_check_catches_a_reworded_message():
    strings = code_strings()
    assert message_problems(["QUANT.ACT_SIGNED=…: use one of …"], strings) == []
    reworded = ["QUANT.ACT_SIGNED=…: choose one of …", "no such message at all"]
    assert message_problems(reworded, strings) == reworded
