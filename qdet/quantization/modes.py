"""Mode flags of the quantized layers, in one place (timm's ``layers/config.py`` is the model).

Every switch that changes what a quantizer or a quantized layer computes without being one
of its arguments lives here, with the context manager that sets it and the getter the
layers read:

- the fake-quant backend (``QDET_QUANT_BACKEND``: ``auto`` | ``compile`` | ``eager``), read
  by :mod:`qdet.quantization.functional`;
- code capture: inside :func:`capturing_codes` every quantizer also hands its output's
  integer codes to a sink, so layers save codes, not floats, for backward
  (:mod:`qdet.quantization.saved`);
- output substitution: inside :func:`substituting_outputs` a target-trained quantizer's
  output is replaced (the export check feeds each layer the runtime's own codes,
  :mod:`qdet.export.integer_check`);
- weight reuse: within a module made by
  :func:`qdet.quantization.saved.reuse_quantized_weights_within`, a layer quantizes its
  weight once per call of that module (:func:`weight_reuse_cache`);
- integer export: inside :func:`integer_export` target-trained layers write their integer
  form for the ONNX exporter (:mod:`qdet.quantization.integer_ops`), and inside
  :func:`recording` that form is listed as it is written.

Flags are thread-local (a data-loader thread never sees the trainer's), except the backend,
a process-wide choice.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_local = threading.local()


@contextlib.contextmanager
def _flag(name: str, value):
    """Inside, the thread's flag ``name`` is ``value`` (yielded); the outer value after."""
    outer = getattr(_local, name, None)
    setattr(_local, name, value)
    try:
        yield value
    finally:
        setattr(_local, name, outer)


# -- fake-quant backend ---------------------------------------------------------------------
BACKENDS = ("auto", "compile", "eager")
_backend = os.environ.get("QDET_QUANT_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Choose how the fake-quant bodies run: ``auto`` | ``compile`` | ``eager``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown quantizer backend {name!r}: use 'auto', 'compile' or 'eager'")
    _backend = name


def get_backend() -> str:
    return _backend


# -- code capture ---------------------------------------------------------------------------
def capturing_codes() -> contextlib.AbstractContextManager[dict]:
    """Inside, every quantizer call also produces its output's integer codes in the same
    fused pass, collected as ``{(data_ptr, numel) of the output: uint8 codes}`` (see
    :mod:`qdet.quantization.saved`). Quantizers without a fused code path
    (the quantized ReLU) add nothing."""
    return _flag("sink", {})


def code_sink() -> dict | None:
    """The sink of the innermost :func:`capturing_codes`, None outside one."""
    return getattr(_local, "sink", None)


# -- output substitution --------------------------------------------------------------------
def substituting_outputs(substitute: Callable) -> contextlib.AbstractContextManager:
    """Inside, the output of every quantizer built for a deployment target (and of every
    grid-preserving op on one, :func:`qdet.modeling.deployable.same_grid`) is replaced by
    ``substitute(quantizer, x, out, requantize)``: the export check feeds each layer the
    runtime's own codes of its inputs (:mod:`qdet.export.integer_check`)."""
    return _flag("substitute", substitute)


def output_substitute() -> Callable | None:
    return getattr(_local, "substitute", None)


# -- weight reuse within a module -----------------------------------------------------------
def open_weight_reuse() -> None:
    """Start a reuse scope (a module's forward pre-hook): a fresh cache on the stack."""
    _local.reuse_stack = [*getattr(_local, "reuse_stack", []), {}]


def close_weight_reuse() -> None:
    """End the innermost reuse scope (the module's forward hook, always called)."""
    _local.reuse_stack = _local.reuse_stack[:-1]


def weight_reuse_cache() -> dict | None:
    """The innermost reuse scope's cache (layer -> its quantized weight), None outside."""
    stack = getattr(_local, "reuse_stack", None)
    return stack[-1] if stack else None


# -- integer export -------------------------------------------------------------------------
def integer_export() -> contextlib.AbstractContextManager:
    """Inside, target-trained layers write their integer form (folded int8 weights, int32
    bias) for the ONNX exporter instead of the float ops they train with."""
    return _flag("exporting", True)


def exporting() -> bool:
    return bool(getattr(_local, "exporting", False))


@dataclass
class IntegerRecord:
    """What an integer export wrote, in graph order: every QuantizeLinear (``activations``:
    a quantizer's output, or a requantisation after a grid-preserving op), every integer
    conv, every integer Linear and every integer attention matmul."""

    activations: list[dict] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)
    linears: list[str] = field(default_factory=list)
    matmuls: list[str] = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)  # id(module) -> its path


def recording() -> contextlib.AbstractContextManager[IntegerRecord]:
    """Inside, the integer ops list what they write in the yielded :class:`IntegerRecord`."""
    return _flag("record", IntegerRecord())


def integer_record() -> IntegerRecord | None:
    return getattr(_local, "record", None)
