"""tools/quiet_console.py: third-party warnings leave a tool's console, qdet's stay, and
tests see every warning."""

import logging
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import quiet_console  # noqa: E402

CUDA_HOME_NOTE = logging.getLogger("torch.utils.cpp_extension")


@pytest.fixture(autouse=True)
def _restore_the_logger():
    level = CUDA_HOME_NOTE.level
    yield
    CUDA_HOME_NOTE.setLevel(level)


def _shown(module: str, category=FutureWarning) -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_console.quiet_third_party_warnings()
        warnings.warn_explicit("deprecated", category, "x.py", 1, module=module)
    return len(seen) == 1


def test_third_party_filtered_qdet_and_scripts_kept():
    assert not _shown("torch.jit._script") and not _shown("fvcore.common.config", UserWarning)
    assert not _shown("detectron2.structures.boxes", DeprecationWarning)
    assert _shown("qdet.distill.distiller") and _shown("qdet") and _shown("__main__")
    assert not _shown("qdetx")  # a name that merely starts with "qdet" is third-party
    assert _shown("torch.jit._script", RuntimeWarning)  # other categories always shown


def test_only_a_tool_run_is_quieted():
    assert quiet_console.runs_a_tool(os.path.join(ROOT, "tools", "demo.py"))
    assert quiet_console.runs_a_tool(os.path.join(ROOT, "projects", "Classification", "study.py"))
    assert not quiet_console.runs_a_tool(sys.argv[0])  # pytest
    assert not quiet_console.runs_a_tool(os.path.join(ROOT, "tools"))
    assert not quiet_console.runs_a_tool("/tmp/my_script.py")
    # Importing it here (pytest) installed nothing: no filter with its pattern.
    patterns = [getattr(f[3], "pattern", f[3]) for f in warnings.filters]
    assert quiet_console.THIRD_PARTY not in patterns


def test_torchs_cuda_home_note_leaves_a_tools_console():
    CUDA_HOME_NOTE.setLevel(logging.NOTSET)
    assert CUDA_HOME_NOTE.isEnabledFor(logging.WARNING)
    quiet_console.quiet_third_party_warnings()
    assert not CUDA_HOME_NOTE.isEnabledFor(logging.WARNING)
    assert CUDA_HOME_NOTE.isEnabledFor(logging.ERROR)
