"""Docs that cannot rot, commands: every config / tool path in a fenced code block of
README.md, docs/*.md and the project READMEs exists, and every ``--flag`` a command passes
to a tool (fenced, or quoted in running text) is one that tool's parser declares (read
statically with ``ast``: its own ``add_argument`` calls, those of the qdet helpers it calls,
and Detectron2's ``default_argument_parser``).

``flag_problems`` returns a list of problems; ``test_flag_check_catches_bogus_flags`` feeds
it bogus flags and a missing tool and requires each problem, so the check cannot pass
vacuously.
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
from pathlib import Path

from docs_markdown import CODE_SPAN, ROOT, _parse, doc_files, split_fences

REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|tools|projects)/[\w./-]*?\.(?:yaml|py))(?![\w/])")


def fenced_blocks() -> list[tuple[Path, str, list[str]]]:
    return [(f, lang, body) for f in doc_files() for lang, body in split_fences(f.read_text())[1]]


def test_paths_in_code_blocks_exist():
    missing, count = [], 0
    for f, _, body in fenced_blocks():
        for p in REPO_PATH.findall("\n".join(body)):
            count += 1
            if not (ROOT / p).exists():
                missing.append(f"{f.relative_to(ROOT)}: {p}")
    assert not missing, "\n".join(missing)
    assert count > 40


SHELL = {"bash", "sh", "shell", "console", "text", ""}


def commands(lang: str, body: list[str]) -> list[str]:
    """The shell commands of a block, continuation lines joined. Blocks without a language
    (command output) contribute only their ``$ `` lines."""
    if lang not in SHELL:
        return []
    out, current = [], None
    for line in body:
        if current is None:
            if lang in ("", "console", "text"):
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            current = ""
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = None
    if current:
        out.append(current)
    return out


TOOL = re.compile(r"^(?:tools|projects/[\w.-]+)/\w+\.py$")


def tool_calls(command: str) -> list[tuple[str, list[str]]]:
    """(tool path, the --flags passed to it) of each tool a command line runs."""
    words = shlex.split(command, comments=True)
    calls, tool = [], None
    for word in words:
        if word in ("&&", "||", "|", ";") or word.endswith(";"):
            tool = None
            continue
        if tool is None:
            if TOOL.match(word):
                tool = word
                calls.append((word, []))
            continue
        if word.startswith("--") and word != "--":
            calls[-1][1].append(word.split("=", 1)[0])
    return calls


def _options_in(node: ast.AST) -> set[str]:
    """Option strings of every ``*.add_argument(...)`` call under ``node``; a
    BooleanOptionalAction adds its ``--no-`` form."""
    out = set()
    for call in ast.walk(node):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
            continue
        if call.func.attr != "add_argument":
            continue
        names = [
            a.value
            for a in call.args
            if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value[:1] == "-"
        ]
        out.update(names)
        boolean = any(
            k.arg == "action" and ast.unparse(k.value).endswith("BooleanOptionalAction")
            for k in call.keywords
        )
        if boolean:
            out.update("--no-" + n[2:] for n in names if n.startswith("--"))
    return out


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _function_def(module: str, name: str, depth: int = 3) -> ast.FunctionDef | None:
    """``name``'s definition in qdet ``module``, following a package's re-exports."""
    source = _module_file(module)
    if source is None or depth == 0:
        return None
    tree = _parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("qdet")
            and any((a.asname or a.name) == name for a in node.names)
        ):
            return _function_def(node.module, name, depth - 1)
    return None


@functools.cache
def detectron2_options() -> frozenset[str]:
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    return frozenset(o for action in parser._actions for o in action.option_strings)


@functools.cache
def tool_options(tool: str) -> frozenset[str]:
    """What ``tool``'s parser accepts: its own add_argument calls, those of qdet helpers it
    calls (e.g. ``add_study_arguments``), and Detectron2's ``default_argument_parser``."""
    tree = _parse(ROOT / tool)
    options = _options_in(tree)
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qdet"):
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    called = {n.func.id for n in calls if isinstance(n.func, ast.Name)}
    for name in called & set(imported):
        fn = _function_def(imported[name], name)
        if fn is not None:
            options |= _options_in(fn)
    if "default_argument_parser" in called:
        options |= detectron2_options()
    return frozenset(options | {"--help", "-h"})


def flag_problems(where: str, command: str) -> list[str]:
    problems = []
    for tool, flags in tool_calls(command):
        if not (ROOT / tool).is_file():
            problems.append(f"{where}: {tool} does not exist")
            continue
        accepted = tool_options(tool)
        problems += [f"{where}: {tool} has no option {f}" for f in flags if f not in accepted]
    return problems


def test_fenced_commands_pass_only_real_flags():
    problems, checked = [], 0
    for f, lang, body in fenced_blocks():
        for command in commands(lang, body):
            checked += sum(1 for _ in tool_calls(command))
            problems += flag_problems(str(f.relative_to(ROOT)), command)
    assert not problems, "\n".join(problems)
    assert checked > 40


INLINE_COMMAND = re.compile(r"(?:^|\s)(?:tools|projects/[\w.-]+)/\w+\.py\s+--")


def test_inline_commands_pass_only_real_flags():
    """Commands quoted in running text (`tools/x.py --flag ...`, possibly across a line
    break) are held to the same rule as the fenced ones."""
    problems, checked = [], 0
    for f in doc_files():
        prose = "\n".join(split_fences(f.read_text())[0])
        for m in CODE_SPAN.finditer(prose):
            span = m.group(2).replace("\n", " ")
            if INLINE_COMMAND.search(span):
                checked += 1
                problems += flag_problems(str(f.relative_to(ROOT)), span)
    assert not problems, "\n".join(problems)
    assert checked > 20


def test_flag_check_catches_bogus_flags():
    body = [
        "tools/train_net.py --config-file configs/digits/retinanet_r18_fp.yaml \\",
        "    --num-gpus 2 --bogus-flag 1  # --also-bogus is a comment",
        ".venv/bin/python tools/accuracy_study.py --seeds 1 --jobs 2 --report-only --nope",
        "tools/export_onnx.py --no-verify --verify --eval --output x.onnx --config-file c.yaml",
        "tools/no_such_tool.py --x",
    ]
    found = [p for c in commands("bash", body) for p in flag_problems("t", c)]
    assert found == [
        "t: tools/train_net.py has no option --bogus-flag",
        "t: tools/accuracy_study.py has no option --nope",
        "t: tools/no_such_tool.py does not exist",
    ]
    # `$ ` lines of an output block are commands, the output is not
    assert commands("", ["$ tools/predict.py --x", "predict.py: error: --y"]) == [
        "tools/predict.py --x"
    ]
