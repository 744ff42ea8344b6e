"""Runs ``tools/train_net.py`` in a subprocess, as a user would, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train_net(
    *args: str,
    env_extra: dict | None = None,
    check: bool = True,
    script: str = "tools/train_net.py",
) -> subprocess.CompletedProcess:
    """``script *args`` (a train_net.py) from the repo root with the eager quantizer
    backend; with ``check`` a non-zero exit fails with the end of stderr."""
    env = dict(os.environ, QDET_QUANT_BACKEND="eager", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def write_config_with(path, base: str, opts: list[str]) -> str:
    """A YAML at ``path`` inheriting ``base`` with KEY VALUE ``opts`` set: a config file for
    what must be one (a teacher's DISTILL.TEACHER_CONFIG describing a tiny test model)."""
    import yaml

    tree: dict = {"_BASE_": base}
    for key, value in zip(opts[::2], opts[1::2]):
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return str(path)
