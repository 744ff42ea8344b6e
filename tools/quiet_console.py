"""Imported first by every tool: when the process runs a tool (not pytest, not a library
user's script), third-party FutureWarning / UserWarning / DeprecationWarning lines are
filtered out of its console, so a newcomer sees progress lines and tables. qdet's own
warnings are kept: they name something to fix.

Detectron2 and fvcore apply ``torch.jit.script`` at import time, which torch 2.14
deprecates with a FutureWarning per process; a study's spawned workers would print them
again, so the setting travels to them through ``QDET_QUIET_WARNINGS``. torch's compiler
logs "No CUDA runtime is found, using CUDA_HOME=..." on a CPU machine with a CUDA
toolkit: a note about the machine, not about the run, also kept out. Set
``QDET_QUIET_WARNINGS=0`` to see every warning.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENV = "QDET_QUIET_WARNINGS"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Warnings attributed to a module that is not qdet's (nor a tool's or project's script).
THIRD_PARTY = r"(?!qdet(\.|$)|__main__$|__mp_main__$)"


def runs_a_tool(argv0: str) -> bool:
    """Whether ``argv0`` is a script under this checkout's ``tools/`` or ``projects/``."""
    path = os.path.abspath(argv0)
    return path.endswith(".py") and any(
        path.startswith(os.path.join(ROOT, d) + os.sep) for d in ("tools", "projects")
    )


def quiet_third_party_warnings() -> None:
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


if os.environ.get(ENV) != "0" and (os.environ.get(ENV) == "1" or runs_a_tool(sys.argv[0])):
    os.environ[ENV] = "1"  # for the workers a study spawns
    quiet_third_party_warnings()
