import os

import pytest

# Tests run the eager quantizer bodies (deterministic, no compile time); the compiled
# backend has its own test that switches to it explicitly.
os.environ.setdefault("QDET_QUANT_BACKEND", "eager")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _load_tool(name: str):
    """``tools/<name>.py`` as a module (the tools are scripts, not a package), with tools/
    on the path as when it runs as a script (its sibling modules, e.g. quiet_console)."""
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.join(root, "tools") not in sys.path:
        sys.path.insert(0, os.path.join(root, "tools"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_tool():
    """``load_tool("predict")``: a tool script as a module, to call its ``main``."""
    return _load_tool


@pytest.fixture(scope="module")
def fp_retinanet():
    """The FP RetinaNet-R18 of tests/retinanet_r18.py, seeded, in eval mode (one per module)."""
    import torch
    from detectron2.modeling import build_model
    from retinanet_r18 import _retinanet_cfg

    torch.manual_seed(0)
    return build_model(_retinanet_cfg()).eval()
