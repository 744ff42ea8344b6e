"""Docs that cannot rot, completeness: docs/model_zoo.md names every config; README starts
with ``make demo`` / ``make test`` on its first screen and stays one short page.
"""

from __future__ import annotations

from docs_markdown import DOCS, README, ROOT, split_fences


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
