"""The ``QUANT`` settings, checked, as the keywords of :func:`quantize_model`.

Every bad value is refused where the settings are built, with its key and the values it
takes; the keys themselves and their defaults are declared in :mod:`qdet.config`.
"""

from __future__ import annotations

from collections.abc import Mapping

from qdet.quantization.calib_range import CALIB_RANGES
from qdet.quantization.ewgs import ESTIMATORS
from qdet.quantization.quantizers import BOUND_GRADIENTS, check_bits, quantizer_methods
from qdet.quantization.surgery import target_patterns
from qdet.quantization.targets import check_target_bits, get_target


def quantize_kwargs(quant: Mapping) -> dict:
    """:func:`qdet.quantization.quantize_model` keyword arguments from the ``QUANT`` settings
    (a mapping of the upper-case ``QUANT`` keys: a yacs ``cfg.QUANT`` node, or
    :func:`qdet.config.quant_defaults` updated with a caller's keywords), checked: each bad
    value is an error naming its key and the values it takes."""
    q = quant
    methods = quantizer_methods()
    if q["METHOD"] not in methods:
        raise ValueError(f"QUANT.METHOD={q['METHOD']!r} is unknown: choose from {list(methods)}")
    if q["ACT_METHOD"] and q["ACT_METHOD"] not in methods:
        raise ValueError(
            f"QUANT.ACT_METHOD={q['ACT_METHOD']!r} is unknown: choose from {list(methods)} "
            "or '' (= QUANT.METHOD)"
        )
    signed = {"auto": None, "signed": True, "unsigned": False}
    if q["ACT_SIGNED"] not in signed:
        raise ValueError(f"QUANT.ACT_SIGNED={q['ACT_SIGNED']!r}: use one of {list(signed)}")
    if q["BOUND_GRADIENT"] not in BOUND_GRADIENTS:
        raise ValueError(
            f"QUANT.BOUND_GRADIENT={q['BOUND_GRADIENT']!r}: use one of {list(BOUND_GRADIENTS)}"
        )
    if not q["EWGS_DELTA"] >= 0:
        raise ValueError(f"QUANT.EWGS_DELTA={q['EWGS_DELTA']!r} must be >= 0 (0 is the STE)")
    if not (isinstance(q["EWGS_UPDATE_PERIOD"], int) and q["EWGS_UPDATE_PERIOD"] >= 0):
        raise ValueError(
            f"QUANT.EWGS_UPDATE_PERIOD={q['EWGS_UPDATE_PERIOD']!r}: use an integer >= 0 "
            "(iterations between delta refreshes; 0 = once per epoch)"
        )
    if not (isinstance(q["EWGS_HESSIAN_BATCHES"], int) and q["EWGS_HESSIAN_BATCHES"] >= 1):
        raise ValueError(
            f"QUANT.EWGS_HESSIAN_BATCHES={q['EWGS_HESSIAN_BATCHES']!r}: use an integer >= 1 "
            "(training batches per delta refresh)"
        )
    if q["EWGS_HUTCHINSON"] not in ESTIMATORS:
        raise ValueError(
            f"QUANT.EWGS_HUTCHINSON={q['EWGS_HUTCHINSON']!r}: use one of {list(ESTIMATORS)}"
        )
    options = {"bound_gradient": q["BOUND_GRADIENT"]}
    if q["CALIB_RANGE"] not in CALIB_RANGES:
        raise ValueError(f"QUANT.CALIB_RANGE={q['CALIB_RANGE']!r}: use one of {list(CALIB_RANGES)}")
    if q["CALIB_RANGE"] != "ewgs":
        if q["METHOD"] == "lsq":
            raise ValueError("QUANT.CALIB_RANGE: LSQ initialises its step by its own rule")
        options["calib_range"] = q["CALIB_RANGE"]
    if q["METHOD"] == "ewgs":
        options["delta"] = float(q["EWGS_DELTA"])
    for key in ("W_BITS", "A_BITS"):
        try:
            check_bits(q[key])
        except ValueError as e:
            raise ValueError(f"QUANT.{key}: {e}") from None
    target = get_target(q["TARGET"])
    if target is not None:
        check_target_bits(target, q["W_BITS"], q["A_BITS"])
        if q["TARGET_EDGE_BITS"] not in (8, 32):
            raise ValueError(
                f"QUANT.TARGET_EDGE_BITS={q['TARGET_EDGE_BITS']!r}: use 8 (the stem and the "
                "predictors as W8A8 integer ops) or 32 (float)"
            )
        options["target"] = target
    if not (isinstance(q["FREEZE_BN_ITER"], int) and q["FREEZE_BN_ITER"] >= 0):
        raise ValueError(f"QUANT.FREEZE_BN_ITER={q['FREEZE_BN_ITER']!r}: use an integer >= 0")
    if q["FREEZE_BN_ITER"] and target is None:
        raise ValueError(
            "QUANT.FREEZE_BN_ITER freezes the BN a deployment target folds: set QUANT.TARGET "
            "(e.g. onnxruntime), or QUANT.FREEZE_BN_ITER 0"
        )
    return {
        "w_bits": q["W_BITS"],
        "a_bits": q["A_BITS"],
        "method": q["METHOD"],
        "per_channel": q["PER_CHANNEL"],
        "include": target_patterns(q["TARGETS"], q["INCLUDE"]),
        "exclude": list(q["EXCLUDE"]) or None,
        "act_signed": signed[q["ACT_SIGNED"]],
        "quantizer_options": options,
        "act_method": q["ACT_METHOD"] or None,
    }
