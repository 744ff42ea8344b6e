"""The fake-quantization benchmark's cases (qdet/benchmark/quantizer_speed.py) compare like
with like: on an unsigned activation the same parameters give qdet's op, the plain autograd
composition and torch's fused learnable fake-quant one output, and the targets' verdicts
are the ratios against their limits, worked out here."""

import torch

from qdet.benchmark.quantizer_speed import (
    MEMORY_TARGET,
    TIME_TARGET,
    make_inputs,
    step,
    targets,
)
from qdet.quantization.functional import MODE_UNSIGNED


def test_the_three_implementations_quantize_alike():
    case = dict(name="act unsigned", shape=(2, 3, 9, 11), mode=MODE_UNSIGNED)
    inp = make_inputs(case, 4, "cpu")
    out = {impl: step(impl, inp, 4, case)[1:] for impl in ("ours (eager)", "plain", "fused")}
    y, dx = out["ours (eager)"]
    assert len(torch.unique(y)) > 8  # many of the 16 levels in use, not a constant
    torch.testing.assert_close(y, out["plain"][0])
    torch.testing.assert_close(dx, out["plain"][1])
    torch.testing.assert_close(y, out["fused"][0], rtol=0, atol=1e-5)


def test_targets_judge_the_compiled_rows_against_their_limits():
    rows = [
        {"case": "a", "impl": "ours (compiled)", "time / fused": 1.2, "saved / plain": 0.6},
        {"case": "a", "impl": "plain", "time / fused": 9.0, "saved / plain": 1.0},
        {"case": "b", "impl": "ours (compiled)", "time / fused": None, "saved / plain": 0.25},
    ]
    assert (TIME_TARGET, MEMORY_TARGET) == (1.5, 0.5)  # the limits the rows sit around
    got = {(c["case"], c["target"]): c["ok"] for c in targets(rows, "cpu")}
    assert got == {
        ("a", "time / fused <= 1.5"): True,
        ("a", "saved / plain <= 0.5"): False,
        ("b", "time / fused <= 1.5"): False,  # not measured: not a pass
        ("b", "saved / plain <= 0.5"): True,
    }
