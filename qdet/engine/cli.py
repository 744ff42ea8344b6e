"""Command-line tools answer the errors a user can fix in one line, and keep tracebacks for
the rest (and for developers: ``--debug`` or ``QDET_DEBUG=1``)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from detectron2.engine import launch

_OWN_CODE = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), d)
    + os.sep
    for d in ("qdet", "tools", "projects")
)
# Raised by qdet's own checks for bad input: unknown keys, bits, losses, taps, missing files.
USER_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    FloatingPointError,
    RuntimeError,
)


def raised_by_qdet(error: BaseException) -> bool:
    """Whether ``error`` was raised in qdet's package or tools (not inside a dependency)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE)


def _worker_error(error: BaseException) -> str | None:
    """The one-line message of an error qdet raised inside a DataLoader worker process, or
    None. torch re-raises it in the main process as "Caught <type> in DataLoader worker
    process N. Original Traceback ...", its last frame the worker's."""
    text = str(error)
    if not text.startswith("Caught ") or "DataLoader worker" not in text:
        return None
    files = re.findall(r'File "([^"]+)"', text)
    if not files or not files[-1].startswith(_OWN_CODE):
        return None
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def debug_requested(debug: bool = False) -> bool:
    return debug or os.environ.get("QDET_DEBUG", "") not in ("", "0")


def run_cli(fn: Callable, *args, debug: bool = False, **kwargs):
    """``fn(*args, **kwargs)``; a bad-input error raised by qdet becomes one line on stderr
    and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        from_worker = _worker_error(e)
        if debug_requested(debug) or not (raised_by_qdet(e) or from_worker):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        message = from_worker or message
        prog = os.path.basename(sys.argv[0]) or "qdet"
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)


def launch_main(main: Callable, args) -> None:
    """A ``train_net.py``'s entry: ``main(args)`` on ``args.num_gpus`` processes per machine
    through Detectron2's launcher, its bad-input errors as one line (:func:`run_cli`)."""
    run_cli(
        launch,
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        debug=getattr(args, "debug", False),
    )
