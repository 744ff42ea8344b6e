"""How calibration sets a uniform quantizer's range, QUANT.CALIB_RANGE
(qdet/quantization/calib_range.py): minmax, mse against a brute-force search, bad names."""

import pytest
import torch

from qdet.quantization import UniformQuantizer


def test_calibration_range_rules():
    """QUANT.CALIB_RANGE: minmax takes the observed extremes; mse picks the range with the
    least quantization error among its candidates, checked against a brute-force search
    written here, and clips less at 8 bits than at 4."""
    from qdet.quantization.functional import MODE_UNSIGNED, fake_quant_reference

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(20000, generator=g)) ** 1.5  # long-tailed, post-ReLU-like
    tops = {}
    for bits in (4, 8):
        mm = UniformQuantizer(bits, "activation", calib_range="minmax")
        mm.init_from(x)
        assert float(mm.upper) == float(x.max()) and float(mm.lower) == 0.0
        q = UniformQuantizer(bits, "activation", calib_range="mse")
        q.init_from(x)
        n = 2**bits - 1

        def err(top, n=n):
            u = torch.tensor(top)
            return float(
                (fake_quant_reference(x, torch.tensor(0.0), u, u, n, MODE_UNSIGNED) - x)
                .square()
                .mean()
            )

        chosen = float(q.upper)
        ewgs = UniformQuantizer(bits, "activation")
        ewgs.init_from(x)
        others = [float(x.max()) * c / 200 for c in range(4, 201)] + [float(ewgs.upper)]
        assert err(chosen) <= min(err(t) for t in others) * 1.05
        tops[bits] = chosen
    assert tops[8] > 1.5 * tops[4]
    w = torch.randn(6, 40, generator=g) * torch.linspace(0.1, 2, 6)[:, None]
    wq = UniformQuantizer(8, "weight", per_channel=True, num_channels=6, calib_range="minmax")
    wq.init_from(w)
    torch.testing.assert_close(wq.upper, w.abs().amax(1))
    with pytest.raises(ValueError, match="calib_range='p99'"):
        UniformQuantizer(4, "activation", calib_range="p99")
