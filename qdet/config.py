"""qdet's config keys. ``add_qdet_config(cfg)`` declares every key with its default."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

from qdet.quantization.quantizers import QUANTIZERS, check_bits


def add_qdet_config(cfg: CN) -> CN:
    """Add the ``QUANT.*`` keys to a Detectron2 config (in place; also returned)."""
    cfg.QUANT = CN()
    # Quantize the model at all. False trains the plain FP model through the same tools.
    cfg.QUANT.ENABLED = False
    # Weight and input-activation bit widths: 1..8, or 32 for "not quantized".
    cfg.QUANT.W_BITS = 4
    cfg.QUANT.A_BITS = 4
    # Quantizer: "uniform" (QFD's, EWGS init, STE), "ewgs" (+ gradient scaling), "lsq".
    cfg.QUANT.METHOD = "uniform"
    # Per-output-channel weight quantizers instead of one per tensor.
    cfg.QUANT.PER_CHANNEL = False
    # Regexes searched in module names. Empty INCLUDE = every Conv2d/Linear; empty EXCLUDE
    # = qdet.quantization.DEFAULT_EXCLUDE (stem conv and final predictors stay FP).
    cfg.QUANT.INCLUDE = []
    cfg.QUANT.EXCLUDE = []
    # Sign of activation quantizers: "auto" (signed if calibration sees negatives),
    # "signed" or "unsigned".
    cfg.QUANT.ACT_SIGNED = "auto"
    # Training batches used to initialise the quantizers before the first step.
    cfg.QUANT.CALIB_BATCHES = 4
    # Quantizer parameters (l, u, s/alpha) get their own optimizer group
    # (qdet.engine.build_qat_optimizer): EWGS's official code trains them with Adam at
    # lr 1e-5 and no weight decay, beside SGD for the weights. OPTIMIZER: "adam" | "sgd".
    # BASE_LR is absolute; the LR schedule (warmup, steps) scales it like SOLVER.BASE_LR.
    cfg.QUANT.OPTIMIZER = "adam"
    cfg.QUANT.BASE_LR = 1e-5
    cfg.QUANT.WEIGHT_DECAY = 0.0
    # RetinaNet's head convs are shared by the five FPN levels, whose ranges differ: give
    # each level its own input quantizers (cycled like Detectron2's CycleBatchNormList).
    cfg.QUANT.HEAD_PER_LEVEL_ACT = False
    # A signed activation quantizer on one backbone output (e.g. "p3"): the teacher stage
    # of QFD trains the FP teacher with its feature quantized there. "" = none.
    cfg.QUANT.FEATURE_TAP = ""
    cfg.QUANT.FEATURE_BITS = 8

    cfg.DISTILL = CN()
    # Distil from a frozen teacher while training the (quantized) student.
    cfg.DISTILL.ENABLED = False
    # The teacher's config file and its FP weights (a Detectron2 checkpoint).
    cfg.DISTILL.TEACHER_CONFIG = ""
    cfg.DISTILL.TEACHER_WEIGHTS = ""
    # Backbone output distilled: p3..p7 of an FPN, res2..res5 of its ResNet.
    cfg.DISTILL.TAP = "p3"
    # Loss name in qdet.distill.DISTILL_LOSS_REGISTRY: "qfd" (MSE to the teacher's
    # quantized feature, QFD Eq. 7) or "feature_kd" (MSE to its float feature).
    cfg.DISTILL.LOSS = "qfd"
    # Weight lambda of the distillation term. QFD's detection recipe: about 1/5 of the
    # total loss; the log shows the ratio (distill_ratio).
    cfg.DISTILL.WEIGHT = 1.0
    # Bits of the teacher's feature quantizer (QFD: 8 for detection).
    cfg.DISTILL.TEACHER_FEATURE_BITS = 8
    # Teacher stage: fine-tune the teacher with its feature quantizer for this many
    # iterations (0 = SOLVER.MAX_ITER // 10) at SOLVER.BASE_LR, then freeze it.
    cfg.DISTILL.TEACHER_STAGE_ITERS = 0
    # The feature-quantized teacher the student stage loads. "" = the teacher stage's
    # output, OUTPUT_DIR/teacher_stage/model_final.pth.
    cfg.DISTILL.QUANTIZED_TEACHER_WEIGHTS = ""
    return cfg


def quantize_kwargs(cfg: CN) -> dict:
    """``quantize_model`` keyword arguments from ``cfg.QUANT``, checked."""
    q = cfg.QUANT
    if q.METHOD not in QUANTIZERS:
        raise ValueError(f"QUANT.METHOD={q.METHOD!r} is unknown: choose from {list(QUANTIZERS)}")
    signed = {"auto": None, "signed": True, "unsigned": False}
    if q.ACT_SIGNED not in signed:
        raise ValueError(f"QUANT.ACT_SIGNED={q.ACT_SIGNED!r}: use one of {list(signed)}")
    return {
        "w_bits": check_bits(q.W_BITS),
        "a_bits": check_bits(q.A_BITS),
        "method": q.METHOD,
        "per_channel": q.PER_CHANNEL,
        "include": list(q.INCLUDE) or None,
        "exclude": list(q.EXCLUDE) or None,
        "act_signed": signed[q.ACT_SIGNED],
    }
