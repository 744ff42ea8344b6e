#!/usr/bin/env bash
# Creates .venv (Python 3.11) with torch, Detectron2 and qdet's other dependencies.
# Idempotent: a stamp file records the hash of what was installed; a second run with
# unchanged setup.py and unchanged script returns in well under a second.
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
D2_VERSION="0.7.2"
STAMP="$VENV/.qdet-setup-stamp"

want=$(cat setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
# Found, not imported: importing them takes seconds, and the stamp already says they installed.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c \
    "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('qdet', 'detectron2', 'torch'))))" 2>/dev/null; then
    echo "[setup] $VENV is up to date"
    exit 0
fi

command -v "$PYTHON" >/dev/null || { echo "[setup] $PYTHON not found: set PYTHON=/path/to/python3.11" >&2; exit 1; }

# A Detectron2 that the base interpreter can already import (e.g. built from git) is
# reused: the venv then sees the base site-packages.
venv_flags=""
if "$PYTHON" -c "import detectron2" 2>/dev/null; then
    echo "[setup] using the Detectron2 importable from $PYTHON"
    venv_flags="--system-site-packages"
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv $venv_flags "$VENV"
fi
# No pip cache: torch's CUDA wheels are gigabytes, and a cached second copy has filled a
# small disk before (CI: "No space left on device").
PIP="$VENV/bin/python -m pip --disable-pip-version-check --no-cache-dir -q"

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC (about a minute)"
    $PIP install $TORCH_SPEC
fi

if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
    # Detectron2 is not on PyPI. sal-detectron2 redistributes upstream's Python sources in
    # a wheel tagged cp310; its pure-Python part works on 3.11 (the 3.10 _C extension does
    # not load, and qdet needs nothing from it). See README "Installing Detectron2".
    echo "[setup] installing Detectron2 (sal-detectron2==$D2_VERSION, Python sources)"
    tmp=$(mktemp -d)
    $PIP download --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" "sal-detectron2==$D2_VERSION"
    mv "$tmp"/sal_detectron2-*.whl "$tmp/sal_detectron2-$D2_VERSION-py3-none-any.whl"
    $PIP install --no-deps "$tmp/sal_detectron2-$D2_VERSION-py3-none-any.whl"
    rm -rf "$tmp"
fi

echo "[setup] installing qdet and its dependencies (pip install -e .[dev,export])"
$PIP install -e ".[dev,export]"
"$VENV/bin/python" -c "import qdet, detectron2, torch; print('[setup] ok: torch', torch.__version__, 'detectron2', detectron2.__version__)"
echo "$want" > "$STAMP"
