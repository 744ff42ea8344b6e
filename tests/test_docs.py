"""Docs that cannot rot: README.md and docs/*.md are checked against the repository.

- every relative link and image resolves, anchors included (GitHub's heading slugs);
- every config / tool path in a fenced code block exists, and every ``--flag`` a fenced
  command passes to a tool is one that tool's parser declares (read statically with ``ast``);
- docs/config_reference.md lists every key ``add_qdet_config`` declares, with its default;
- every number of a results table marked ``<!-- source: docs/....json -->`` is the figure
  in that JSON, rounded the way the table prints it;
- every error message docs/troubleshooting.md quotes is one qdet's code still raises;
- docs/model_zoo.md names every config; README starts with ``make demo`` / ``make test``.

Each checker is a plain function returning a list of problems; the ``*_catches_*`` tests
feed it a broken input and require a problem, so no check passes vacuously.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shlex
import statistics
from pathlib import Path

import pytest

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


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in split_fences(text)[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


@functools.cache
def file_anchors(path: Path) -> frozenset[str]:
    return frozenset(anchors(path.read_text()))


LINK = re.compile(r"(!?)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def link_problems(path: Path, text: str) -> list[str]:
    """Relative links and images of ``text`` (the file ``path``) that do not resolve."""
    problems = []
    for image, target in LINK.findall(prose_text(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif image and not dest.is_file():
            problems.append(f"{where}: an image that is not a file")
        elif anchor and dest.suffix == ".md" and anchor not in file_anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def test_links_and_images_resolve():
    problems, count = [], 0
    for f in doc_files():
        text = f.read_text()
        count += len(LINK.findall(prose_text(text)))
        problems += link_problems(f, text)
    assert not problems, "\n".join(problems)
    assert count > 100  # the pages link to each other: a parser that finds none is broken


def test_link_check_catches_broken_links(tmp_path):
    page = DOCS / "layout.md"
    bad = "[a](no_such_page.md) ![b](deploy) [c](methods.md#no-such-heading) [d](#nowhere)"
    assert len(link_problems(page, bad)) == 4
    good = "[a](methods.md#integer-export) ![b](demo.png) `[not a link](nowhere.md)`"
    assert link_problems(page, good) == []


def test_slug_is_githubs():
    assert slug("Training (`tools/train_net.py`)") == "training-toolstrain_netpy"
    assert slug("ImageNet weights for R18 / R34") == "imagenet-weights-for-r18--r34"
    assert slug("The clip's gradient at l and u (`QUANT.BOUND_GRADIENT`)") == (
        "the-clips-gradient-at-l-and-u-quantbound_gradient"
    )


def test_the_pages_exist_and_readme_links_them():
    readme = README.read_text()
    for name in PAGES:
        assert (DOCS / f"{name}.md").is_file(), name
        assert f"](docs/{name}.md" in readme, f"README does not link docs/{name}.md"


# --- Paths and commands in fenced blocks ----------------------------------------------------

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


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


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


# --- docs/config_reference.md against add_qdet_config ---------------------------------------


def _flat(node, prefix=""):
    from detectron2.config import CfgNode

    out = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@functools.cache
def qdet_defaults() -> dict:
    from detectron2.config import get_cfg

    from qdet.config import add_qdet_config

    base = _flat(get_cfg())
    return {k: v for k, v in _flat(add_qdet_config(get_cfg())).items() if k not in base}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_.]*)`\s*\|\s*`([^`]*)`\s*\|", re.M)


def reference_problems(page: str, defaults: dict) -> list[str]:
    rows = dict(ROW.findall(page))
    problems = [f"{k}: not in docs/config_reference.md" for k in defaults if k not in rows]
    for key, text in rows.items():
        if key not in defaults:
            problems.append(f"{key}: listed but not declared by add_qdet_config")
            continue
        try:
            stated = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            problems.append(f"{key}: default {text!r} is not a Python literal")
            continue
        if _plain(stated) != _plain(defaults[key]):
            problems.append(f"{key}: page says {text}, config has {defaults[key]!r}")
    return problems


def test_config_reference_lists_every_key_with_its_default():
    defaults = qdet_defaults()
    assert len(defaults) > 100
    page = (DOCS / "config_reference.md").read_text()
    problems = reference_problems(page, defaults)
    assert not problems, "\n".join(problems)


def test_config_reference_check_catches_drift():
    defaults = {"QUANT.W_BITS": 4, "QUANT.TARGETS": [], "ZEROSHOT.BETAS": (0.5, 0.999)}
    page = "| `QUANT.W_BITS` | `8` | x |\n| `ZEROSHOT.BETAS` | `(0.5, 0.999)` | y |\n"
    page += "| `QUANT.NO_SUCH_KEY` | `1` | z |\n"
    assert sorted(reference_problems(page, defaults)) == [
        "QUANT.NO_SUCH_KEY: listed but not declared by add_qdet_config",
        "QUANT.TARGETS: not in docs/config_reference.md",
        "QUANT.W_BITS: page says 8, config has 4",
    ]


# --- Results tables against the JSON they came from -----------------------------------------

MARKER = re.compile(r"^<!--\s*source:\s*(.+?)\s*-->\s*$")


def marked_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """([source JSON paths], table rows as cell lists, header first) of every marked table."""
    lines, out = text.split("\n"), []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m:
            continue
        rows = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        out.append((m.group(1).split(), rows))
    return out


def _load(paths: list[str]) -> dict:
    merged: dict = {}
    for p in paths:
        for key, value in json.loads((ROOT / p).read_text()).items():
            merged.setdefault(key, value)
    return merged


def _values(runs: dict, metric: str) -> list[float]:
    return [runs[s][metric] for s in sorted(runs, key=int)]


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _paired(runs: dict, reference: dict, metric: str, higher: str) -> str:
    seeds = sorted(set(runs) & set(reference), key=int)
    d = [runs[s][metric] - reference[s][metric] for s in seeds]
    wins = sum(v > 0 for v in d)
    return f"{statistics.mean(d):+.1f} ± {statistics.stdev(d):.1f} ({wins}/{len(d)}{higher})"


SPREAD = re.compile(r"-?\d+\.\d ± \d+\.\d")
PAIRED = re.compile(r"[+-]\d+\.\d ± \d+\.\d \(\d+/\d+(.*)\)")
SEEDS = re.compile(r"-?\d+\.\d(, -?\d+\.\d)+")
REFERENCE = re.compile(r"\((?:reference|FAQD rows' reference)\)|ref")

# Row label -> run name (method) per source, and each method's paired reference.
ACCURACY = {
    "FP": "fp",
    "baseline QAT": "baseline",
    "QFD": "qfd",
    "float feature KD": "feature_kd",
    "baseline, inclusive bound gradient": "inclusive",
    "EWGS": "ewgs",
    "fa": "fa",
    "ffa": "ffa",
    "rfd": "rfd",
    "logit_kd": "logit_kd",
    "AKT (RFD + logit KD, label-free)": "akt",
}
CLASSIFICATION = {
    "FP ResNet-20 (32/32)": "fp",
    "baseline QAT": "baseline",
    "QFD (pooled feature, 1 bit)": "qfd",
    "baseline QAT, quantized ReLU": "baseline_qrelu",
    "FAQD (FA + logit KL + 0.3 CE)": "faqd",
    "FAQD label-free": "faqd_label_free",
    "FAQD with FFA (k = 15)": "ffa",
    "zero-shot, logit KD only": "zs_logit_kd",
    "zero-shot AKT (logit KD + RFD)": "akt",
    "zero-shot AKT, spatial RFD only": "akt_spatial",
    "zero-shot AKT, channel RFD only": "akt_channel",
}
CLASSIFICATION_REFERENCES = {
    "faqd": "baseline_qrelu",
    "faqd_label_free": "baseline_qrelu",
    "ffa": "baseline_qrelu",
    "akt": "zs_logit_kd",
    "akt_spatial": "zs_logit_kd",
    "akt_channel": "zs_logit_kd",
}
# AKT's RFD at the weights of issue 29 (projects/Classification/study.py's rows).
AKT_RFD = {"FP ResNet-20 (32/32)": "fp", "zero-shot, logit KD only": "zs_logit_kd"}
for _label, _method in CLASSIFICATION.items():
    if _method.startswith("akt"):
        AKT_RFD[f"{_label}; RFD as AKT's code (1000 x sum)"] = f"{_method}_official"
        AKT_RFD[f"{_label}; RFD at 1/5 of the loss"] = f"{_method}_fifth"
AKT_RFD_REFERENCES = {m: "zs_logit_kd" for m in AKT_RFD.values() if m.startswith("akt")}
REFERENCES = {
    "docs/classification/top1.json": CLASSIFICATION_REFERENCES,
    "docs/classification/akt_rfd_weight_4bit.json": AKT_RFD_REFERENCES,
    "docs/classification/akt_one_attention_4bit.json": AKT_RFD_REFERENCES,
}
DATAFREE = {
    "FP teacher": "fp",
    "baseline QAT (real images, labels)": "baseline",
    "QFD (real images, labels)": "qfd",
    "data-free (generated images only; logit KD + RFD)": "datafree",
    "data-free (L_BNS + task term)": "datafree",
    "data-free without L_BNS": "datafree_no_bns",
    "data-free without the task term": "datafree_no_task",
    "data-free, generator never trained (control)": "datafree_untrained",
}
FREEZE = {
    "FP teacher": "fp",
    "quantizers of res2 train (`False`, the study's recipe)": "baseline",
    "quantizers of res2 frozen (`True`, the new default)": "freeze_quantizers",
}
SEED_REFERENCES = {
    "paired vs baseline": "baseline",
    "paired vs data-free": "datafree",
    "paired vs quantizers training": "baseline",
}
# deployment.json: label -> (run name, {W/A column: width}), metrics "PyTorch / onnxruntime"
DEPLOYMENT = {
    "onnxruntime `quantize_static` MinMax (its own AP)": ("ptq_onnxruntime_minmax", ("ort AP",)),
    "onnxruntime `quantize_static` Percentile (its own AP)": (
        "ptq_onnxruntime_percentile",
        ("ort AP",),
    ),
    "qdet, target, calibration only (`CALIB_RANGE mse`)": ("ptq_qdet_{wa}", ("AP", "ort AP")),
    "qdet, target, calibration only, `CALIB_RANGE ewgs`": ("ptq_qdet_w8a8_ewgs", ("AP", "ort AP")),
    "baseline QAT, simulated": ("baseline_sim_{wa}", ("AP",)),
    "baseline QAT, `TARGET onnxruntime`": ("baseline_ort_{wa}", ("AP", "ort AP")),
    "QFD, simulated": ("qfd_sim_{wa}", ("AP",)),
    "QFD, `TARGET onnxruntime`": ("qfd_ort_{wa}", ("AP", "ort AP")),
}
LABELS = {
    "docs/study/accuracy.json": ACCURACY,
    "docs/classification/top1.json": CLASSIFICATION,
    "docs/classification/akt_rfd_weight_4bit.json": AKT_RFD,
    "docs/classification/akt_one_attention_4bit.json": AKT_RFD,
    "docs/datafree/ablations_4bit.json": DATAFREE,
    "docs/study/freeze_quantizers/accuracy.json": FREEZE,
}
TRAIN_VARIANTS = {
    "FP": "fp",
    "4-bit QAT (default config)": "qat",
    "4-bit QAT, `QUANT.FREEZE_WITH_WEIGHTS False`": "qat_frozen_layers_quantizers_train",
    "4-bit QFD (QAT + teacher forward + loss)": "qfd",
    "Brevitas 0.13.4, the same 68 convs W4/A4": "brevitas",
}
TRAIN_COLUMNS = {
    "step s": ("step s", "{:.3f}"),
    "step / FP": ("step / fp", "{:.2f}"),
    "saved MiB": ("saved MiB", "{:.0f}"),
    "saved / FP": ("saved / fp", "{:.2f}"),
    "page faults / step": ("page faults / step", "{:d}"),
}
EXPORT_MODELS = {
    "FP32": "FP32",
    "quantize_static MinMax": "quantize_static MinMax",
    "quantize_static Percentile": "quantize_static Percentile",
    "qdet W8A8": "qdet W8A8 (calibration only)",
    "qdet W4A8": "qdet W4A8 (calibration only)",
    "qdet W4A4": "qdet W4A4 (calibration only)",
}


def _metric(data: dict) -> str:
    first = next(iter(next(iter(data.values())).values()))
    return "AP" if "AP" in first else "top1"


def check_study_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    """Method x bit-width tables (accuracy, classification): mean ± std, per-seed values
    and paired differences to each method's reference at the same width."""
    data, labels = _load(sources), LABELS[sources[0]]
    metric, problems, checked = _metric(data), [], 0
    bits = []
    for head in rows[0][1:]:
        m = re.search(r"(\d+)/\1", head)
        bits.append(m.group(1) if m else bits[-1] if head == "paired" else None)
    for row in rows[1:]:
        method = labels.get(row[0])
        if method is None:
            problems.append(f"row {row[0]!r}: no run of {sources} is known by that label")
            continue
        reference = REFERENCES.get(sources[0], {}).get(method, "baseline")
        for b, cell in zip(bits, row[1:]):
            if not cell or REFERENCE.fullmatch(cell):
                continue
            run = data.get("fp" if method == "fp" else f"{method}_{b}bit")
            base = data.get(f"{reference}_{b}bit")
            if run is None:
                problems.append(f"{row[0]} at {b} bits: {cell!r}, but no such run")
                continue
            if SPREAD.fullmatch(cell):
                want = _spread(_values(run, metric))
            elif SEEDS.fullmatch(cell):
                want = ", ".join(f"{v:.1f}" for v in _values(run, metric))
            elif PAIRED.fullmatch(cell) and base is not None:
                want = _paired(run, base, metric, PAIRED.fullmatch(cell).group(1))
            else:
                want = "a figure of a form this test knows"
            checked += 1
            if cell != want:
                problems.append(f"{row[0]} at {b} bits: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_seed_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    """Tables with one row per method and columns per seed (data-free, frozen quantizers)."""
    data, labels = _load(sources), LABELS[sources[0]]
    metric, problems, checked = _metric(data), [], 0
    m = re.search(r"W/A (\d+)/\1", rows[0][0])
    b = m.group(1) if m else "4"
    for row in rows[1:]:
        method = labels.get(row[0])
        if method is None:
            problems.append(f"row {row[0]!r}: no run of {sources} is known by that label")
            continue
        run = data.get("fp" if method == "fp" else f"{method}_{b}bit")
        if run is None:
            problems.append(f"row {row[0]!r}: no run of it at {b} bits in {sources}")
            continue
        values = _values(run, metric)
        for head, cell in zip(rows[0][1:], row[1:]):
            if not cell or REFERENCE.fullmatch(cell):
                continue
            seed = re.fullmatch(r"seed (\d+)", head)
            if seed:
                want = f"{run[seed.group(1)][metric]:.1f}"
            elif head.startswith("seeds"):
                want = ", ".join(f"{v:.1f}" for v in values)
            elif head == "mean ± std":
                want = _spread(values)
            elif head in SEED_REFERENCES and PAIRED.fullmatch(cell):
                base = data[f"{SEED_REFERENCES[head]}_{b}bit"]
                want = _paired(run, base, metric, PAIRED.fullmatch(cell).group(1))
            else:
                want = "a figure of a form this test knows"
            checked += 1
            if cell != want:
                problems.append(f"{row[0]}, {head}: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_deployment_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    """AP per row and W/A, "PyTorch / onnxruntime" for the target rows."""
    data, problems, checked = _load(sources), [], 0
    widths = ["w{}a{}".format(*re.search(r"(\d+)/(\d+)", h).groups()) for h in rows[0][1:]]
    for row in rows[1:]:
        if row[0] not in DEPLOYMENT:
            problems.append(f"row {row[0]!r}: no run of {sources} is known by that label")
            continue
        template, metrics = DEPLOYMENT[row[0]]
        for wa, cell in zip(widths, row[1:]):
            if not cell:
                continue
            run = data.get(template.format(wa=wa))
            want = "no such run"
            if run is not None:
                want = " / ".join(_spread(_values(run, m)) for m in metrics)
            checked += 1
            if cell != want:
                problems.append(f"{row[0]} at {wa}: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_train_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    """tools/benchmark_train.py's table: each variant's figures."""
    data, problems, checked = _load(sources), [], 0
    by_variant = {r["variant"]: r for r in data["rows"]}
    for row in rows[1:]:
        record = by_variant.get(TRAIN_VARIANTS.get(row[0], ""))
        if record is None:
            problems.append(f"row {row[0]!r}: no variant of {sources} is known by that label")
            continue
        for head, cell in zip(rows[0][1:], row[1:]):
            field, fmt = TRAIN_COLUMNS[head]
            checked += 1
            if cell.strip("*") != fmt.format(record[field]):
                problems.append(f"{row[0]}, {head}: table {cell!r}, JSON {record[field]!r}")
    return problems, checked


def check_demo_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    """tools/demo.py's table as it prints it (tabulate, one decimal): each model's row."""
    data, problems, checked = _load(sources), [], 0
    by_model = {r["model"]: r for r in data["rows"]}
    for row in rows[1:]:
        record = by_model.get(row[0])
        if record is None:
            problems.append(f"row {row[0]!r}: no model of {sources} is known by that label")
            continue
        for head, cell in zip(rows[0][1:], row[1:]):
            value = record.get(head, f"no column {head!r}")
            want = f"{value:.1f}" if isinstance(value, float) else str(value)
            checked += 1
            if cell != want:
                problems.append(f"{row[0]}, {head}: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_export_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    """tools/benchmark_export.py's latency table: ms (ratio), op counts, MiB."""
    data, problems, checked = _load(sources), [], 0
    for row in rows[1:]:
        model = EXPORT_MODELS.get(row[0])
        if model is None:
            problems.append(f"row {row[0]!r}: no model of {sources} is known by that label")
            continue
        # the ratio in brackets: MinMax against FP32, every other integer model against MinMax
        ref = "FP32" if model == "quantize_static MinMax" else "quantize_static MinMax"
        for head, cell in zip(rows[0][1:], row[1:]):
            size = re.fullmatch(r"(\d+x\d+), (\d+) threads?", head)
            if size:
                timings = data["timings"][f"{size.group(1)}@{size.group(2)}"]
                ms = timings[model]["median_ms"]
                want = f"{ms:.1f}"
                if model != "FP32":
                    ratio = ms / timings[ref]["median_ms"]
                    label = " FP32" if ref == "FP32" else " MinMax"
                    shown = re.search(r"\(\d\.\d\dx( \w+)?\)", cell)
                    want += f" ({ratio:.2f}x{label if shown and shown.group(1) else ''})"
            elif head == "integer ops / float convs":
                ops = data["ops"][model]
                want = f"{ops['integer']} / {ops['float_convs']}"
            elif head == "MiB":
                want = f"{data['mib'][model]:.1f}"
            else:
                want = f"a column this test knows, not {head!r}"
            checked += 1
            if cell != want:
                problems.append(f"{row[0]}, {head}: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    name = os.path.basename(sources[0])
    if name == "benchmark_train.json":
        return check_train_table(sources, rows)
    if name == "benchmark_export.json":
        return check_export_table(sources, rows)
    if name == "deployment.json":
        return check_deployment_table(sources, rows)
    if name == "demo.json":
        return check_demo_table(sources, rows)
    if any(h.startswith("seed") for h in rows[0]):
        return check_seed_table(sources, rows)
    return check_study_table(sources, rows)


def test_results_tables_are_the_json_figures():
    problems, checked, tables = [], 0, 0
    for f in [README, *(DOCS / f"{p}.md" for p in PAGES)]:
        for sources, rows in marked_tables(f.read_text()):
            tables += 1
            where = f"{f.relative_to(ROOT)} ({sources[0]})"
            if len(rows) < 2:
                problems.append(f"{where}: the marker is not above a table")
                continue
            found, n = check_table(sources, rows)
            problems += [f"{where}: {p}" for p in found]
            checked += n
    assert not problems, "\n".join(problems)
    assert tables >= 10 and checked > 300


def test_readme_marks_its_results_tables():
    sources = [s[0] for s, _ in marked_tables(README.read_text())]
    assert sources == [
        "docs/demo/demo.json",
        "docs/study/accuracy.json",
        "docs/benchmarks/benchmark_train.json",
        "docs/export/benchmark_export.json",
    ]


def test_readme_quotes_the_deployment_figures():
    """The figures README's "Quantize your own Detectron2 model" quotes in its prose."""
    deploy = _load(["docs/deploy/deployment.json"])
    export = _load(["docs/export/benchmark_export.json"])["timings"]["160x192@1"]
    run, check = deploy["qfd_ort_w4a4"], deploy["qfd_ort_w4a4"]["1"]["check"]
    quoted = [
        f"{_spread(_values(run, 'AP'))} box AP in PyTorch, {_spread(_values(run, 'ort AP'))}",
        f"(FP: {_spread(_values(deploy['fp'], 'AP'))})",
        f"runs in {export['qdet W4A4 (calibration only)']['median_ms']:.1f} ms against "
        f"FP32's {export['FP32']['median_ms']:.1f} ms",
        f"{check['kernels']['QLinearConv']} QLinearConv, {check['kernels']['QLinearAdd']} "
        f"QLinearAdd, {check['float_convs']} float convs; {check['boundary_flips']} of "
        f"{check['codes'] / 1e6:.1f} million codes at a tie",
    ]
    text = " ".join(README.read_text().split())  # line breaks anywhere
    assert [q for q in quoted if q not in text] == []


def _first_table(page: str, source: str) -> tuple[list[str], list[list[str]]]:
    text = (DOCS / page).read_text()
    return next((s, rows) for s, rows in marked_tables(text) if s[0] == source)


def test_table_check_catches_a_changed_figure():
    cases = [
        ("studies.md", "docs/study/accuracy.json", "54.8 ± 1.7", "54.9 ± 1.7"),
        ("studies.md", "docs/classification/top1.json", "+1.1 ± 0.2 (3/3)", "+1.1 ± 0.2 (2/3)"),
        ("studies.md", "docs/datafree/ablations_4bit.json", "48.0", "48.1"),
        ("deployment.md", "docs/deploy/deployment.json", "73.0 ± 0.9 / 73.0 ± 1.1", "73.0 ± 0.9"),
        ("benchmarks.md", "docs/benchmarks/benchmark_train.json", "1.464", "1.446"),
        ("benchmarks.md", "docs/export/benchmark_export.json", "8.9 (1.02x)", "8.9 (1.03x)"),
        ("benchmarks.md", "docs/study/freeze_quantizers/accuracy.json", "55.3 ± 0.9", "55.3"),
    ]
    for page, source, old, new in cases:
        sources, rows = _first_table(page, source)
        assert check_table(sources, rows)[0] == [], source
        changed = [[new if c == old else c for c in row] for row in rows]
        assert changed != rows, f"{old!r} is not a cell of {page}'s {source} table"
        assert check_table(sources, changed)[0], f"{source}: a changed figure passed"


# --- docs/troubleshooting.md against the code's messages ------------------------------------

HOLE = "\x00"  # where a message's f-string fills in a value


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
    return None


@functools.cache
def code_strings() -> tuple[str, ...]:
    """Every string literal (f-strings with holes) of qdet's package, tools and projects."""
    out = []
    for top in ("qdet", "tools", "projects"):
        for path in sorted((ROOT / top).rglob("*.py")):
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


# --- Completeness ---------------------------------------------------------------------------


def test_model_zoo_names_every_config():
    page = (DOCS / "model_zoo.md").read_text()
    configs = [
        p.relative_to(ROOT).as_posix()
        for pattern in ("configs/**/*.yaml", "configs/**/*.py", "projects/*/configs/**/*.yaml")
        for p in sorted(ROOT.glob(pattern))
    ]
    assert len(configs) > 90
    missing = [c for c in configs if f"`{c}`" not in page]
    assert not missing, "configs docs/model_zoo.md does not name:\n" + "\n".join(missing)


def test_readme_starts_with_make_demo_and_make_test():
    text = README.read_text()
    lang, body = split_fences(text)[1][0]
    words = [line.split("#")[0].strip() for line in body]
    assert lang == "bash" and "make demo" in words and "make test" in words
    assert text.index("make demo") < 400  # the first screen
    assert len(text.split("\n")) <= 160, "README is meant to stay one short page"


@pytest.mark.parametrize("name", PAGES)
def test_page_headings_are_unique(name):
    """Anchors of a page are linked from elsewhere: a repeated heading would shift them."""
    text = (DOCS / f"{name}.md").read_text()
    heads = [
        slug(m.group(1))
        for line in split_fences(text)[0]
        if (m := re.match(r"^#{1,6}\s+(.*)$", line))
    ]
    assert len(heads) == len(set(heads)), sorted(h for h in heads if heads.count(h) > 1)
