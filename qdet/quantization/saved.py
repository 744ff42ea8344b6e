"""What autograd keeps of a quantized layer for backward, and how little of it.

A conv / matmul saves its input and weight. In a quantized layer both are fake-quantized:

- the input is ``l + s k / n`` for integer codes k in 0..n (n = 2^b - 1 <= 255), so it is
  kept as k (1 byte, not 4) and rebuilt in backward in one fused pass with the forward's
  arithmetic and the quantizer's parameters of that forward;
- the weight is not kept at all: backward fake-quantizes the parameter again (it is alive
  anyway, and the FP layer saves it too) with that forward's l, u, scale.

The quantizers themselves save only their FP inputs, which the FP layer saves too: per
layer, QAT keeps about 1.25x what FP keeps instead of 2x (SPEC, "memory blow-up").

A module whose quantized layers run several times per call (RetinaNet's head, once per
FPN level) quantizes each weight once per call: :func:`reuse_quantized_weights_within`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from qdet.quantization.modes import close_weight_reuse, open_weight_reuse, weight_reuse_cache
from qdet.quantization.quantizers import Quantizer


class SavedActivation:
    """A fake-quantized activation ``x_q`` to keep as codes: the ``codes`` its quantizer
    made in its own pass (:func:`qdet.quantization.quantizers.capturing_codes`), or None
    to encode ``x_q`` when autograd saves it."""

    def __init__(self, quantizer: Quantizer, x_q: torch.Tensor, codes: torch.Tensor | None):
        self.x_q, self.codes = x_q, codes
        self.enabled = quantizer.last_used.enabled
        if self.enabled:
            self.encode, self.decode = quantizer.last_used.codec()

    def pack(self, t: torch.Tensor, outer_pack: Callable) -> _Packed:
        codes = self.codes if self.codes is not None else self.encode(self.x_q).to(torch.uint8)
        return _Packed(
            _CodesSource(outer_pack(codes.view(self.x_q.shape)), self.decode), t, self.x_q
        )


class SavedWeight:
    """A fake-quantized weight ``w_q = quantizer(weight)`` to rebuild from ``weight`` in
    backward. Every op that saves ``w_q`` (a layer run once per FPN level) shares one
    rebuild, dropped after its last user unpacked it."""

    def __init__(self, quantizer: Quantizer, w_q: torch.Tensor, weight: torch.Tensor):
        self.x_q, self.enabled = w_q, quantizer.enabled
        self.source = _WeightSource(weight.detach(), quantizer.frozen_map())

    def pack(self, t: torch.Tensor, outer_pack: Callable) -> _Packed:
        self.source.add_user(outer_pack)
        return _Packed(self.source, t, self.x_q)


@contextlib.contextmanager
def saving_compactly(records: list) -> Iterator[None]:
    """Inside, autograd keeps each record's tensor (:class:`SavedActivation`,
    :class:`SavedWeight`) compactly; every other saved tensor as usual."""
    by_key = {_key(r.x_q): r for r in records if r.enabled and _recordable(r.x_q)}
    if not by_key:
        yield
        return
    # Compose with any hooks already active (activation checkpointing, offloading, a
    # benchmark's accounting): autograd applies only the innermost pair.
    outer = _current_saved_tensors_hooks()
    outer_pack, outer_unpack = outer if outer else (_identity, _identity)

    def pack(t: torch.Tensor):
        record = by_key.get(_key(t))
        return outer_pack(t) if record is None else record.pack(t, outer_pack)

    def unpack(packed):
        return packed.unpack(outer_unpack) if isinstance(packed, _Packed) else outer_unpack(packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# -- one weight quantization per call of a module that reuses its layers ----------------
def reuse_quantized_weights_within(module: nn.Module) -> None:
    """While ``module`` runs, each quantized layer in it fake-quantizes its weight once
    and reuses the result (and its backward rebuild) on later calls: RetinaNet's head runs
    every conv once per FPN level. Reuse needs the same grad mode, dtype, and unchanged
    weight and quantizer parameters (their version counters); gradients are unchanged
    (autograd sums the uses into one backward of the weight quantizer)."""

    def open_cache(_module, _inputs):
        open_weight_reuse()

    def close_cache(_module, _inputs, _output):
        close_weight_reuse()

    module.register_forward_pre_hook(open_cache)
    module.register_forward_hook(close_cache, always_call=True)


def quantized_weight(layer: nn.Module, dtype: torch.dtype, saving: bool):
    """``(w_q, record)``: ``layer``'s fake-quantized weight in ``dtype`` and, when
    ``saving``, its :class:`SavedWeight` (else None); reused within
    :func:`reuse_quantized_weights_within`."""
    cache = weight_reuse_cache()
    quantizer = layer.weight_quantizer
    state = _state(layer, dtype, saving) if cache is not None else None
    if cache is not None and layer in cache:
        cached_state, w_q, record = cache[layer]
        if cached_state == state:
            return w_q, record
    w_q = quantizer(layer.weight).to(dtype)
    record = SavedWeight(quantizer, w_q, layer.weight) if saving else None
    if cache is not None:
        # The state checked before the call: if the call changed a parameter (calibration
        # on first use), the next call quantizes again rather than reuse.
        cache[layer] = (state, w_q, record)
    return w_q, record


def _state(layer, dtype, saving) -> tuple:
    versions = (p._version for p in (layer.weight, *layer.weight_quantizer.parameters()))
    return (torch.is_grad_enabled(), dtype, saving, *versions)


# -- what autograd holds ------------------------------------------------------------------
class _CodesSource:
    __slots__ = ("codes", "decode")

    def __init__(self, codes, decode):
        self.codes, self.decode = codes, decode

    def rebuild(self, outer_unpack) -> torch.Tensor:
        return self.decode(outer_unpack(self.codes))


class _WeightSource:
    """The parameter (through the outer pack once) and its rebuild, cached while some
    saved use has not been unpacked yet."""

    __slots__ = ("alias", "version", "fake_quantize", "packed", "users", "values")

    def __init__(self, alias: torch.Tensor, fake_quantize: Callable):
        self.alias, self.version, self.fake_quantize = alias, alias._version, fake_quantize
        self.packed, self.users, self.values = None, 0, None

    def add_user(self, outer_pack) -> None:
        if self.packed is None:
            self.packed = outer_pack(self.alias)
        self.users += 1

    def rebuild(self, outer_unpack) -> torch.Tensor:
        if self.values is None:
            if self.alias._version != self.version:
                raise RuntimeError(
                    "a quantized layer's weight was modified in place between forward and "
                    "backward (e.g. an optimizer step before backward): run backward first"
                )
            self.values = self.fake_quantize(outer_unpack(self.packed))
        values = self.values
        self.users -= 1
        if self.users <= 0:  # (below 0 with retain_graph: then every unpack rebuilds)
            self.values = None
        return values


class _Packed:
    """A saved quantized tensor: its source's rebuild cast to the saved dtype, then the
    view the op saved (F.linear saves the transposed weight). Codes and rebuilding stay in
    the quantized tensor's layout (a per-channel step runs along its dim 0)."""

    __slots__ = ("source", "dtype", "view")

    def __init__(self, source, saved: torch.Tensor, quantized: torch.Tensor):
        self.source, self.dtype = source, saved.dtype
        same = saved.shape == quantized.shape and saved.stride() == quantized.stride()
        self.view = None if same else (tuple(saved.shape), saved.stride())

    def unpack(self, outer_unpack) -> torch.Tensor:
        values = self.source.rebuild(outer_unpack).to(self.dtype)
        return values if self.view is None else values.as_strided(*self.view)


def _recordable(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad and t.is_contiguous()


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, t.numel()


def _identity(t):
    return t


def _current_saved_tensors_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None
