"""Docs that cannot rot, config keys: docs/config_reference.md lists every key
``add_qdet_config`` declares (beyond Detectron2's own), with its default as a Python
literal, and no key it does not declare.

``reference_problems`` returns a list of problems; ``test_config_reference_check_catches_drift``
feeds it a drifted page and requires each problem, so the check cannot pass vacuously.
"""

from __future__ import annotations

import ast
import functools
import re

from docs_markdown import DOCS


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
