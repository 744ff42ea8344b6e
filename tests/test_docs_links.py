"""Docs that cannot rot, links: every relative link and image of README.md, docs/*.md and
the project READMEs resolves, anchors included (GitHub's heading slugs); the pages exist,
README links them, and no page repeats a heading.

``link_problems`` returns a list of problems; ``test_link_check_catches_broken_links``
feeds it broken links and requires a problem for each, so the check cannot pass vacuously.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from docs_markdown import DOCS, PAGES, README, ROOT, doc_files, prose_text, slug, split_fences


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
