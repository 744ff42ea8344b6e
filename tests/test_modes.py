"""Mode flags of the quantized layers (qdet/quantization/modes.py): each context manager
sets its flag inside, restores the outer value on exit (also on an exception), nests, and
is thread-local; the backend is one process-wide choice."""

from __future__ import annotations

import threading

import pytest
import torch

from qdet.quantization import UniformQuantizer, modes


def test_code_capture_nests_restores_and_collects_the_codes():
    q = UniformQuantizer(4, "activation", signed=False)
    x = torch.linspace(0, 3, 64).view(1, 4, 4, 4)
    q.init_from(x)
    assert modes.code_sink() is None
    with modes.capturing_codes() as outer:
        with modes.capturing_codes() as inner:
            out = q(x)
            assert modes.code_sink() is inner
        assert modes.code_sink() is outer and outer == {}
        # The codes of the output, k = round((x_q - l) / (u - l) * n), computed here.
        (codes,) = inner.values()
        lower, upper = float(q.lower), float(q.upper)
        expected = torch.round((out - lower) / (upper - lower) * 15).to(codes.dtype)
        assert torch.equal(codes.view_as(out), expected)
    assert modes.code_sink() is None


def test_substitution_and_integer_export_restore_after_an_error():
    def substitute(quantizer, x, out, requantize):
        return out

    with pytest.raises(RuntimeError), modes.substituting_outputs(substitute):
        assert modes.output_substitute() is substitute
        raise RuntimeError
    assert modes.output_substitute() is None
    with modes.integer_export():
        with modes.integer_export():
            assert modes.exporting()
        assert modes.exporting()
    assert not modes.exporting()


def test_recording_yields_a_fresh_record_and_restores_the_outer_one():
    with modes.recording() as outer:
        outer.convs.append("a")
        with modes.recording() as inner:
            assert modes.integer_record() is inner and inner.convs == []
        assert modes.integer_record() is outer and outer.convs == ["a"]
    assert modes.integer_record() is None


def test_weight_reuse_scopes_stack():
    assert modes.weight_reuse_cache() is None
    modes.open_weight_reuse()
    first = modes.weight_reuse_cache()
    first["layer"] = 1
    modes.open_weight_reuse()
    assert modes.weight_reuse_cache() == {}
    modes.close_weight_reuse()
    assert modes.weight_reuse_cache() is first
    modes.close_weight_reuse()
    assert modes.weight_reuse_cache() is None


def test_flags_are_per_thread():
    seen = {}

    def other():
        seen["exporting"], seen["sink"] = modes.exporting(), modes.code_sink()

    with modes.integer_export(), modes.capturing_codes():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen == {"exporting": False, "sink": None}


def test_backend_choice():
    before = modes.get_backend()
    try:
        modes.set_backend("eager")
        assert modes.get_backend() == "eager"
        with pytest.raises(ValueError, match="unknown quantizer backend 'fast'"):
            modes.set_backend("fast")
        assert modes.get_backend() == "eager"
    finally:
        modes.set_backend(before)
