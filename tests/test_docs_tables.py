"""Docs that cannot rot, results tables: every number of a table in README.md or a
docs/*.md page marked ``<!-- source: docs/....json -->`` is the figure in that JSON,
rounded the way the table prints it.

How a source's tables read it is data, not code: ``docs/x/y.table.json`` next to
``docs/x/y.json`` names the checker (``"table"``: ``runs`` for method x bit-width and
per-seed tables, ``deployment``, ``train``, ``demo``, ``export``) and the row labels,
references and columns. A new study adds its JSON, its ``.table.json`` and the marker line.

``check_table`` returns a list of problems; ``test_table_check_catches_a_changed_figure``
changes one cell of each kind of table and requires a problem, so no check passes
vacuously.
"""

from __future__ import annotations

import json
import re
import statistics

from docs_markdown import DOCS, PAGES, README, ROOT

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
    if len(values) == 1:  # one seed (the tiny Swin's deployment study): the value alone
        return f"{values[0]:.1f}"
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

TABLE_SPEC = ".table.json"  # next to a source JSON: how its tables read it


def table_spec(source: str) -> dict | None:
    """``docs/x/y.table.json`` for the source ``docs/x/y.json``: which checker reads its
    tables (``"table"``) and their row labels, references and columns (the data a new
    study adds; each file's ``about`` says what its keys mean). None where there is none."""
    path = ROOT / (source.removesuffix(".json") + TABLE_SPEC)
    return json.loads(path.read_text()) if path.is_file() else None


def _metric(data: dict) -> str:
    first = next(iter(next(iter(data.values())).values()))
    return "AP" if "AP" in first else "top1"


def check_study_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
    """Method x bit-width tables (accuracy, classification): mean ± std, per-seed values
    and paired differences to each method's reference at the same width."""
    data, labels = _load(sources), spec["rows"]
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
        reference = spec.get("references", {}).get(method, "baseline")
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


def check_seed_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
    """Tables with one row per method and columns per seed (data-free, frozen quantizers)."""
    data, labels = _load(sources), spec["rows"]
    metric, problems, checked = _metric(data), [], 0
    column_references = spec.get("column_references", {})
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
            elif head in column_references and PAIRED.fullmatch(cell):
                base = data[f"{column_references[head]}_{b}bit"]
                want = _paired(run, base, metric, PAIRED.fullmatch(cell).group(1))
            else:
                want = "a figure of a form this test knows"
            checked += 1
            if cell != want:
                problems.append(f"{row[0]}, {head}: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_deployment_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
    """AP per row and W/A, "PyTorch / onnxruntime" for the target rows."""
    data, problems, checked = _load(sources), [], 0
    widths = ["w{}a{}".format(*re.search(r"(\d+)/(\d+)", h).groups()) for h in rows[0][1:]]
    for row in rows[1:]:
        if row[0] not in spec["rows"]:
            problems.append(f"row {row[0]!r}: no run of {sources} is known by that label")
            continue
        label = spec["rows"][row[0]]
        template, metrics = label["run"], label["shows"].split(" / ")
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


def check_train_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
    """tools/benchmark_train.py's table: each variant's figures."""
    data, problems, checked = _load(sources), [], 0
    by_variant = {r["variant"]: r for r in data["rows"]}
    for row in rows[1:]:
        record = by_variant.get(spec["rows"].get(row[0], ""))
        if record is None:
            problems.append(f"row {row[0]!r}: no variant of {sources} is known by that label")
            continue
        for head, cell in zip(rows[0][1:], row[1:]):
            column = spec["columns"][head]
            field, fmt = column["field"], column["format"]
            checked += 1
            if cell.strip("*") != fmt.format(record[field]):
                problems.append(f"{row[0]}, {head}: table {cell!r}, JSON {record[field]!r}")
    return problems, checked


def check_demo_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
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


def check_export_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
    """tools/benchmark_export.py's latency tables: a size's column holds the whole file's
    ms (ratio), a "SIZE, network / whole" column both files' ms; op counts and MiB of the
    whole file."""
    data, problems, checked = _load(sources), [], 0
    for row in rows[1:]:
        model = spec["rows"].get(row[0])
        if model is None:
            problems.append(f"row {row[0]!r}: no model of {sources} is known by that label")
            continue
        # the ratio in brackets: MinMax against FP32, every other integer model against MinMax
        ref = "FP32" if model == "quantize_static MinMax" else "quantize_static MinMax"
        for head, cell in zip(rows[0][1:], row[1:]):
            size = re.fullmatch(r"(\d+x\d+), (\d+) threads?(, network / whole)?", head)
            if size:
                timings = data["timings"][f"{size.group(1)}@{size.group(2)}"]
                ms = timings[model]["whole"]["median_ms"]
                if size.group(3):
                    want = f"{timings[model]['network']['median_ms']:.1f} / {ms:.1f}"
                else:
                    want = f"{ms:.1f}"
                    if model != "FP32":
                        ratio = ms / timings[ref]["whole"]["median_ms"]
                        label = " FP32" if ref == "FP32" else " MinMax"
                        shown = re.search(r"\(\d\.\d\dx( \w+)?\)", cell)
                        want += f" ({ratio:.2f}x{label if shown and shown.group(1) else ''})"
            elif head == "integer ops / float convs":
                ops = data["ops"][model]["whole"]
                want = f"{ops['integer']} / {ops['float_convs']}"
            elif head == "MiB":
                want = f"{data['mib'][model]['whole']:.1f}"
            else:
                want = f"a column this test knows, not {head!r}"
            checked += 1
            if cell != want:
                problems.append(f"{row[0]}, {head}: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_transformer_export_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
    """tools/benchmark_export.py --transformer's tables: a column "ARCH SIZE, N thread(s)"
    holds the backbone file's median ms and its ratio (MinMax to FP32, qdet's to MinMax),
    read from whichever source timed that architecture and size."""
    timings: dict = {}
    for source in sources:
        timings.update(json.loads((ROOT / source).read_text())["timings"])
    problems, checked = [], 0
    for row in rows[1:]:
        model = row[0]
        ref = "FP32" if model == "quantize_static MinMax" else "quantize_static MinMax"
        for head, cell in zip(rows[0][1:], row[1:]):
            m = re.fullmatch(r"(\S+) (\d+x\d+), (\d+) threads?", head)
            if not m or m.group(1) not in spec["archs"]:
                problems.append(f"a column this test knows, not {head!r}")
                continue
            by_model = timings.get(f"{spec['archs'][m.group(1)]} {m.group(2)}@{m.group(3)}", {})
            if model not in by_model:
                want = "—"
            else:
                ms = by_model[model]["median_ms"]
                want = f"{ms:.1f}"
                if model != "FP32" and ref in by_model:
                    want += f" ({ms / by_model[ref]['median_ms']:.2f}x)"
            checked += 1
            if cell != want:
                problems.append(f"{model}, {head}: table {cell!r}, JSON {want!r}")
    return problems, checked


def check_fused_ops_table(
    sources: list[str], rows: list[list[str]], spec: dict
) -> tuple[list[str], int]:
    """tools/benchmark_fused_ops.py's tables: a row (op, tensor, threads) holds forms'
    median ms (``spec["forms"]``: column -> form) and ratios of two forms
    (``spec["ratios"]``: column -> [numerator, denominator])."""
    cases = {(c["op"], c["where"]): c for c in _load(sources)["cases"]}
    problems, checked = [], 0
    for row in rows[1:]:
        case = cases.get((row[0], row[1]))
        if case is None:
            problems.append(f"row {row[:2]!r}: no case of {sources[0]} is that op and tensor")
            continue
        ms = {form: t["ms"][row[2]]["median_ms"] for form, t in case["forms"].items()}
        for head, cell in zip(rows[0][3:], row[3:]):
            if head in spec["forms"]:
                want = f"{ms[spec['forms'][head]]:.2f}"
            elif head in spec["ratios"]:
                top, bottom = spec["ratios"][head]
                want = f"{ms[top] / ms[bottom]:.2f}x"
            else:
                want = f"a column this test knows, not {head!r}"
            checked += 1
            if cell != want:
                problems.append(f"{row[:3]}, {head}: table {cell!r}, JSON {want!r}")
    return problems, checked


CHECKERS = {
    "fused_ops": check_fused_ops_table,
    "transformer_export": check_transformer_export_table,
    "train": check_train_table,
    "export": check_export_table,
    "deployment": check_deployment_table,
    "demo": check_demo_table,
}


def check_table(sources: list[str], rows: list[list[str]]) -> tuple[list[str], int]:
    spec = table_spec(sources[0])
    if spec is None:
        name = sources[0].removesuffix(".json") + TABLE_SPEC
        return [f"no {name} says how to read a table of {sources[0]}"], 0
    if spec["table"] in CHECKERS:
        return CHECKERS[spec["table"]](sources, rows, spec)
    if spec["table"] != "runs":
        return [f"{sources[0]}: no checker reads tables of kind {spec['table']!r}"], 0
    if any(h.startswith("seed") for h in rows[0]):
        return check_seed_table(sources, rows, spec)
    return check_study_table(sources, rows, spec)


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
        "docs/export/benchmark_export_transformers_512.json",
    ]


def test_readme_quotes_the_deployment_figures():
    """The figures README's "Quantize your own Detectron2 model" quotes in its prose."""
    deploy = _load(["docs/deploy/deployment.json"])
    export = _load(["docs/export/benchmark_export.json"])["timings"]["160x192@1"]
    run, check = deploy["qfd_ort_w4a4"], deploy["qfd_ort_w4a4"]["1"]["check"]
    quoted = [
        f"{_spread(_values(run, 'AP'))} box AP in PyTorch, {_spread(_values(run, 'ort AP'))}",
        f"(FP: {_spread(_values(deploy['fp'], 'AP'))})",
        f"detects in {export['qdet W4A4 (calibration only)']['whole']['median_ms']:.1f} ms "
        f"against FP32's {export['FP32']['whole']['median_ms']:.1f} ms",
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
        ("benchmarks.md", "docs/export/benchmark_export.json", "9.9 (1.01x)", "9.9 (1.02x)"),
        ("benchmarks.md", "docs/study/freeze_quantizers/accuracy.json", "55.3 ± 0.9", "55.3"),
        ("benchmarks.md", "docs/export/benchmark_fused_ops.json", "4.79x", "4.97x"),
    ]
    for page, source, old, new in cases:
        sources, rows = _first_table(page, source)
        assert check_table(sources, rows)[0] == [], source
        changed = [[new if c == old else c for c in row] for row in rows]
        assert changed != rows, f"{old!r} is not a cell of {page}'s {source} table"
        assert check_table(sources, changed)[0], f"{source}: a changed figure passed"
