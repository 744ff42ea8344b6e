"""qdet's config keys. ``add_qdet_config(cfg)`` declares every key with its default."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from qdet.distill.losses import registered_losses
from qdet.distill.recipes import RECIPES


def add_qdet_config(cfg: CN) -> CN:
    """Add qdet's keys to a Detectron2 config (in place; also returned): ``QUANT.*``,
    ``DISTILL.*``, and the transformer backbones' (:func:`add_transformer_config`)."""
    cfg.QUANT = CN()
    # Quantize the model at all. False trains the plain FP model through the same tools.
    cfg.QUANT.ENABLED = False
    # Weight and input-activation bit widths: 1..8, or 32 for "not quantized".
    cfg.QUANT.W_BITS = 4
    cfg.QUANT.A_BITS = 4
    # Quantizer: "uniform" (QFD's, EWGS init, STE), "ewgs" (+ gradient scaling), "lsq".
    cfg.QUANT.METHOD = "uniform"
    # The activation (input) quantizers' method when it differs from METHOD: "" = METHOD;
    # "qrelu" = FAQD's quantized ReLU with a learnable resolution (FAQD Eq. 4-5), for
    # layers fed by ReLUs (a ResNet's convs).
    cfg.QUANT.ACT_METHOD = ""
    # Per-output-channel weight quantizers instead of one per tensor.
    cfg.QUANT.PER_CHANNEL = False
    # The clip's gradient at exactly l and u: "exclusive" (torch.clamp's in torch 2.14, the
    # default) or "inclusive" (as EWGS's runs). It matters for post-ReLU inputs calibrated
    # with l = min(x) = 0, where about half the elements sit exactly at l: their pull on l
    # (dL/dl) is counted only when inclusive.
    cfg.QUANT.BOUND_GRADIENT = "exclusive"
    # How calibration sets each uniform quantizer's range (qdet.quantization.calib_range):
    # "ewgs" (EWGS's rule: 3 std, percentiles; the papers' rows; made for <= 4 bits),
    # "minmax" (the whole observed range, as onnxruntime's MinMax), "mse" (the clipped
    # range closest to the calibration data in MSE: wide at 8 bits, clipped at 4). At
    # W8A8 on the digits RetinaNet, "ewgs" loses 23 AP before training and "minmax" none
    # (docs/deployment.md). LSQ and qrelu keep their own rules.
    cfg.QUANT.CALIB_RANGE = "ewgs"
    # METHOD ewgs: the gradient-scaling factor delta every quantizer starts from. EWGS's
    # Hessian runs start at 0 (the STE) until the first refresh; its fixed-delta variant
    # uses 1e-3 with EWGS_USE_HESSIAN False.
    cfg.QUANT.EWGS_DELTA = 0.0
    # METHOD ewgs: refresh every quantizer's delta from the Hessian trace during training
    # (EWGS Eq. 9; qdet.engine.EWGSDeltaHook). False keeps EWGS_DELTA fixed.
    cfg.QUANT.EWGS_USE_HESSIAN = True
    # Iterations between refreshes; 0 = once per epoch of the training set
    # (ceil(images / SOLVER.IMS_PER_BATCH)), as EWGS's training loop does.
    cfg.QUANT.EWGS_UPDATE_PERIOD = 0
    # Training batches each refresh averages over (EWGS: 3 on CIFAR, 10 on ImageNet).
    cfg.QUANT.EWGS_HESSIAN_BATCHES = 3
    # Hutchinson estimator of the traces: "per_layer" (EWGS's code: one loop per quantizer,
    # about quantizers x 10 Hessian-vector products a batch) or "joint" (one Rademacher
    # vector over all quantizers, so one product serves all: unbiased too, noisier, about
    # quantizers times cheaper). qdet.quantization.ewgs explains both.
    cfg.QUANT.EWGS_HUTCHINSON = "per_layer"
    # Transformer layer groups to quantize, any of "mha" (attn.qkv, attn.proj) and "mlp"
    # (mlp.fc1, mlp.fc2) of every backbone block (qdet.quantization.QUANT_TARGETS). Empty =
    # INCLUDE / EXCLUDE alone decide. With targets, only those Linear layers are quantized
    # (plus INCLUDE): QFD's ViTDet / Swin rule.
    cfg.QUANT.TARGETS = []
    # Regexes searched in module names. Empty INCLUDE = every Conv2d/Linear; empty EXCLUDE
    # = qdet.quantization.DEFAULT_EXCLUDE (stem conv and final predictors stay FP).
    cfg.QUANT.INCLUDE = []
    cfg.QUANT.EXCLUDE = []
    # Sign of activation quantizers: "auto" (signed if calibration sees negatives; with
    # TARGETS always signed, the inputs being LayerNorm / attention / GELU outputs),
    # "signed" or "unsigned".
    cfg.QUANT.ACT_SIGNED = "auto"
    # Autograd keeps quantized layers' fake-quantized inputs for backward as uint8 codes
    # and their weights not at all (rebuilt from the parameter; qdet.quantization.saved):
    # same gradients, less memory.
    cfg.QUANT.SAVE_CODES = True
    # Quantizers of a layer whose weight is frozen (the stages MODEL.BACKBONE.FREEZE_AT
    # freezes) stay at their calibration too: a frozen layer trains nothing, and backward
    # stops where the FP model's does (R50 at 256x320 on CPU: QAT step 1.11-1.18x FP,
    # 1.21-1.24x with False). 4-bit AP unchanged within noise over 3 seeds (docs/benchmarks.md,
    # "Training speed and memory"). False trains them like the others (the accuracy
    # study's recipe).
    cfg.QUANT.FREEZE_WITH_WEIGHTS = True
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
    # An activation quantizer on one tap's output (e.g. "p3"): the teacher stage of QFD
    # trains the FP teacher with its feature quantized there. "" = none.
    cfg.QUANT.FEATURE_TAP = ""
    cfg.QUANT.FEATURE_BITS = 8
    # Signed (an FPN level, no ReLU before it) or unsigned (a post-ReLU feature such as a
    # classifier's pooled feature, QFD Eq. 8) feature quantizer.
    cfg.QUANT.FEATURE_SIGNED = True
    # The runtime QAT trains for (qdet.quantization.targets; not QUANT.TARGETS, the
    # transformer layer groups). "" = qdet's simulation: the papers' quantizers, norms and
    # residual adds in float (every config before targets, and the papers' rows).
    # "onnxruntime": what its CPU provider runs in integer kernels (QLinearConv,
    # QLinearAdd): BN folded into int8 weights per output channel, int32 bias at
    # s_x s_w[c], activation grids with integer zero points (signed grids' l nudged onto
    # the grid, alpha tied to u - l), every tensor between quantized convs quantized once
    # by its producer (residual outputs, shortcuts, FPN laterals and sums;
    # qdet.modeling.deployable), 1-8 bit weights and activations (below 8 bits a uint8
    # Clip of the codes). 8-bit weights take the narrow int8 grid [-127, 127] (QFD's
    # zero-less 8-bit grid has odd integers up to 255, which fit no int8). "tensorrt":
    # symmetric int8 (zero point 0), W8A8 only; not run here. docs/deployment.md.
    cfg.QUANT.TARGET = ""
    # Under a target: the layers qdet otherwise keeps in float (DEFAULT_EXCLUDE: the stem
    # conv, the class / box predictors) as W8A8 integer ops, their inputs and the
    # predictors' outputs (min / max calibrated) quantized at 8 bits, as onnxruntime's own
    # quantizer does; the file then has no float conv. 32: they stay float (QFD's rule),
    # the head's last conv output quantized at 8 bits for them.
    cfg.QUANT.TARGET_EDGE_BITS = 8
    # Under a target: from this iteration on, the folded convs' BN use their running
    # statistics in training too (and stop updating them), so the last iterations train
    # the very model that deploys (Krishnamoorthi 2018's BN freeze). 0 = never.
    cfg.QUANT.FREEZE_BN_ITER = 0

    add_transformer_config(cfg)
    # Images per inference batch in evaluation (Detectron2's yacs test loader has 1 built
    # in). Batches pad images to a common size, so boxes can move by a rounding; on CPU,
    # 8 runs the digits evaluation about 2.5x faster than 1.
    cfg.TEST.IMS_PER_BATCH = 1

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
    # Bits of the teacher's feature quantizer (QFD: 8 for detection; 1, 4 or 8 in its
    # classification tables).
    cfg.DISTILL.TEACHER_FEATURE_BITS = 8
    # The teacher's feature quantizer is signed (detection: FPN levels) or unsigned
    # (classification: the pooled post-ReLU feature).
    cfg.DISTILL.TEACHER_FEATURE_SIGNED = True
    # Teacher stage: fine-tune the teacher with its feature quantizer for this many
    # iterations (0 = SOLVER.MAX_ITER // 10) at SOLVER.BASE_LR, then freeze it.
    cfg.DISTILL.TEACHER_STAGE_ITERS = 0
    # The feature-quantized teacher the student stage loads. "" = the teacher stage's
    # output, OUTPUT_DIR/teacher_stage/model_final.pth.
    cfg.DISTILL.QUANTIZED_TEACHER_WEIGHTS = ""
    # Several terms at once: loss names, each set up by its node DISTILL.<NAME> below (TAPS,
    # WEIGHT, CONNECTOR where offered, the loss's options), e.g. ["fa", "logit_mse"]
    # (FAQD). Empty: one term, the shorthand LOSS on TAP with WEIGHT (options still from
    # DISTILL.<LOSS>). Taps: qdet.distill.taps (backbone outputs, module paths, "logits",
    # "residual_branches", globs). The log shows loss_distill_<name> per term.
    cfg.DISTILL.TERMS = []
    # No ground-truth losses at all: the student learns from the distillation terms only
    # (FAQD Eq. 11; AKT). docs/methods.md, "Distillation", says what a detector learns then.
    cfg.DISTILL.LABEL_FREE = False
    # Weight of the ground-truth losses while distilling: QFD Eq. 8's 1 - lambda (0.5 for
    # classification), FAQD Eq. 10's gamma (0.3). 1 = the detection losses as they are.
    cfg.DISTILL.GT_WEIGHT = 1.0
    add_distill_terms_config(cfg)
    add_zeroshot_config(cfg)
    # Periodic checkpoints kept on disk (model_final.pth aside): the newest N, older ones
    # deleted as new ones are written; 0 keeps all (Detectron2's behaviour). Studies train
    # hundreds of runs and keep 1: enough to resume, not gigabytes of history.
    cfg.SOLVER.CHECKPOINTS_TO_KEEP = 0
    return cfg


def add_zeroshot_config(cfg: CN) -> None:
    """``ZEROSHOT``: data-free quantization (qdet.datafree; a classifier's in
    projects/Classification). The student trains on a generator's images only, never on
    DATASETS.TRAIN; needs DISTILL.ENABLED and DISTILL.LABEL_FREE."""
    cfg.ZEROSHOT = CN()
    cfg.ZEROSHOT.ENABLED = False
    cfg.ZEROSHOT.LATENT_DIM = 100  # noise z (GDFQ, AdaDFQ, AKT); per 8x8 pixels for detectors
    # (H, W) of the generated images. (0, 0): a detector's test size (INPUT.MIN_SIZE_TEST x
    # MAX_SIZE_TEST, rounded up to the backbone's size divisibility); classifiers: 32 x 32.
    cfg.ZEROSHOT.IMAGE_SIZE = (0, 0)
    # eps of the generator's conv BNs (GDFQ's code passes 0.8 where momentum was meant).
    cfg.ZEROSHOT.BN_EPS = 0.8
    # The generator's Adam (GDFQ / AdaDFQ: lr 1e-3, betas 0.5, 0.999), constant LR here.
    cfg.ZEROSHOT.BASE_LR = 1e-3
    cfg.ZEROSHOT.BETAS = (0.5, 0.999)
    # Generator steps alone before the student's first (AdaDFQ: 4 epochs x 200 steps).
    cfg.ZEROSHOT.WARMUP_ITERS = 800
    # The generator's loss: "gdfq" (the task term + BN statistics) or, for classifiers,
    # "adadfq" (AKT's official code: + AdaDFQ's disagreement margin and agreement terms).
    cfg.ZEROSHOT.LOSS = "gdfq"
    # gdfq's task term: a classifier's CE to the sampled class; a detector's RetinaNet loss
    # with the sampled layout as ground truth (docs/methods.md, "Data-free quantization of
    # a detector").
    cfg.ZEROSHOT.TASK_WEIGHT = 1.0
    cfg.ZEROSHOT.BNS_WEIGHT = 0.1  # gdfq: weight of the BN-statistics loss (GDFQ's 0.1)
    # Each BN channel's mean and variance errors in units of its running variance (every
    # layer counts alike), rather than GDFQ's plain MSE (qdet.datafree.bn_statistics_loss).
    cfg.ZEROSHOT.BNS_NORMALIZE = False
    cfg.ZEROSHOT.ADADFQ = CN()  # AdaDFQ's CIFAR-10 ResNet-20 settings (classifiers)
    cfg.ZEROSHOT.ADADFQ.ALPHA_DS = 0.2  # CE of z_T - z_S (disagreement)
    cfg.ZEROSHOT.ADADFQ.ALPHA_AS = 0.1  # CE of z_T + z_S (agreement)
    cfg.ZEROSHOT.ADADFQ.LAMBDA_LOW = 0.1  # margin's lower boundary
    cfg.ZEROSHOT.ADADFQ.LAMBDA_UP = 0.8  # and upper
    cfg.ZEROSHOT.ADADFQ.BETA = 1.0  # weight of the two CE terms
    cfg.ZEROSHOT.ADADFQ.GAMMA = 1.0  # weight of the BN-statistics loss
    # Detectors: the layouts the generator is asked to draw, per image. Objects (min, max),
    # a box's side sqrt(area) in pixels (log-uniform), its h / w (log-uniform), and the
    # most a box may overlap those placed before it (IoU).
    cfg.ZEROSHOT.OBJECTS_PER_IMAGE = (1, 6)
    cfg.ZEROSHOT.BOX_SIZES = (32.0, 256.0)
    cfg.ZEROSHOT.BOX_ASPECT_RATIOS = (0.5, 2.0)
    cfg.ZEROSHOT.MAX_IOU = 0.3
    cfg.ZEROSHOT.BOX_WEIGHT = 1.0  # detectors: box regression's weight in the task term
    # Detectors: the generated pixels' spread per channel (0-255 scale; ImageNet's). The
    # generator makes unit-variance images, scaled by this / MODEL.PIXEL_STD into the
    # model's input space (Detectron2's caffe-style PIXEL_STD of 1 would leave them flat).
    cfg.ZEROSHOT.PIXEL_STD = (58.395, 57.12, 57.375)
    # Keep the student's BN statistics as the FP model's (AKT's code trains it in eval mode).
    cfg.ZEROSHOT.FREEZE_STUDENT_BN = True
    # Generated images drawn into OUTPUT_DIR/generated_images.png after training (0: none).
    cfg.ZEROSHOT.SHEET_IMAGES = 16


def add_distill_term_config(cfg: CN, loss: str, taps: list[str], weight: float, **options) -> CN:
    """Declare ``DISTILL.<LOSS>``, the node of a registered distillation loss: its default
    ``TAPS`` and ``WEIGHT``, and one key per option of the loss class (its default unless
    given here, e.g. ``CONNECTOR=False`` where the loss offers one). qdet's losses are
    declared by :func:`add_distill_terms_config`; a loss registered in
    ``qdet.distill.DISTILL_LOSS_REGISTRY`` by a user needs this call before its name can be
    used in ``DISTILL.TERMS`` (docs/methods.md, "Distillation")."""
    losses, loss = registered_losses(), loss.lower()
    if loss not in losses:
        raise ValueError(f"distillation loss {loss!r} is not registered: known {sorted(losses)}")
    node = CN()
    node.TAPS = list(taps)
    node.WEIGHT = weight
    given = {k.lower(): v for k, v in options.items()}
    for option, default in {**losses[loss].options(), **given}.items():
        node[option.upper()] = given.get(option, default)
    cfg.DISTILL[loss.upper()] = node
    return node


def add_distill_terms_config(cfg: CN) -> None:
    """``DISTILL.<LOSS>``: each registered loss's taps, weight and options, as its recipe in
    :mod:`qdet.distill.recipes` says (the papers' defaults; what each option means is there
    and in the loss classes of :mod:`qdet.distill.losses`)."""
    for loss, recipe in RECIPES.items():
        options = {k.upper(): v for k, v in recipe.options.items()}
        add_distill_term_config(cfg, loss, list(recipe.taps), recipe.weight, **options)


def add_transformer_config(cfg: CN) -> None:
    """``MODEL.VIT`` / ``MODEL.SWIN`` (qdet's yacs builders of Detectron2's ViT and Swin) and
    ``SOLVER.OPTIMIZER`` / ``SOLVER.LAYER_DECAY`` (ViTDet's AdamW recipe). Defaults: ViT-B
    and Swin-B as in Detectron2's ViTDet project."""
    cfg.MODEL.VIT = CN()
    cfg.MODEL.VIT.IMG_SIZE = 1024  # input size the relative position tables are built for
    cfg.MODEL.VIT.PATCH_SIZE = 16
    cfg.MODEL.VIT.EMBED_DIM = 768
    cfg.MODEL.VIT.DEPTH = 12
    cfg.MODEL.VIT.NUM_HEADS = 12
    cfg.MODEL.VIT.MLP_RATIO = 4.0
    cfg.MODEL.VIT.QKV_BIAS = True
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.VIT.USE_ABS_POS = True
    cfg.MODEL.VIT.USE_REL_POS = True
    cfg.MODEL.VIT.WINDOW_SIZE = 14
    # Blocks with windowed attention; the others attend globally (ViTDet: 2, 5, 8, 11 global).
    cfg.MODEL.VIT.WINDOW_BLOCK_INDEXES = [0, 1, 3, 4, 6, 7, 9, 10]
    cfg.MODEL.VIT.RESIDUAL_BLOCK_INDEXES = []
    cfg.MODEL.VIT.PRETRAIN_IMG_SIZE = 224  # MAE pretraining size (absolute positions)
    cfg.MODEL.VIT.PRETRAIN_USE_CLS_TOKEN = True
    # SimpleFeaturePyramid: scales of the last feature (stride 16) -> p2..p5, then a
    # max-pooled p6; its norm ("LN" as in ViTDet) and square padding (0 = none).
    cfg.MODEL.VIT.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    cfg.MODEL.VIT.SFP_NORM = "LN"
    cfg.MODEL.VIT.SQUARE_PAD = 1024

    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 128
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 18, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [4, 8, 16, 32]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.4
    cfg.MODEL.SWIN.APE = False  # absolute position embedding
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_INDICES = [0, 1, 2, 3]  # stages output as p0..p3 (strides 4..32)
    cfg.MODEL.SWIN.FROZEN_STAGES = -1
    cfg.MODEL.SWIN.SQUARE_PAD = 1024  # the FPN pads inputs to this square (0 = none)

    # "SGD" (Detectron2's default) or "ADAMW" (ViTDet: AdamW, betas 0.9/0.999). Quantizer
    # parameters keep their QUANT.OPTIMIZER group either way.
    cfg.SOLVER.OPTIMIZER = "SGD"
    # ViT layer-wise LR decay (ViTDet: 0.7 for ViT-B); 1.0 = off. ViT backbones only.
    cfg.SOLVER.LAYER_DECAY = 1.0


def quant_defaults() -> dict:
    """The ``QUANT`` keys and their defaults as a plain dict (upper-case keys): what
    :func:`qdet.quantize_model`'s keywords and a LazyConfig's ``quant`` node start from."""
    return dict(add_qdet_config(get_cfg()).QUANT)


def _all_keys(cfg: CN, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys += _all_keys(v, f"{prefix}{k}.") if isinstance(v, CN) else [prefix + k]
    return keys


def load_config(
    config_file: str, opts: list[str], add_config: Callable[[CN], object] | None = None
) -> CN:
    """Detectron2 + qdet config (+ ``add_config``'s keys, e.g. a project's) from a YAML file
    and KEY VALUE overrides, with clear errors."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
    cfg = add_qdet_config(get_cfg())
    if add_config is not None:
        add_config(cfg)
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise ValueError(
            f"{flags[0]!r} comes after the KEY VALUE overrides, which take the rest of the "
            f"command line: put {flags[0]} before them (--config-file FILE {flags[0]} ... "
            "KEY VALUE ...)"
        )
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, AssertionError) as e:
        _raise_config_error(cfg, e)
    except ValueError as e:
        raise ValueError(f"--config-file {config_file!r}: {_type_mismatch_message(str(e))}") from e
    except yaml.YAMLError as e:
        raise ValueError(
            f"--config-file {config_file!r} (or a _BASE_ of it) is not valid YAML: "
            f"{' '.join(str(e).split())}"
        ) from e
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"--config-file {config_file!r}: its _BASE_ {e.filename!r} does not exist (a "
            "_BASE_ path is relative to the file that names it)"
        ) from e
    try:
        cfg.merge_from_list(opts)
    except ValueError as e:
        raise ValueError(_type_mismatch_message(str(e))) from e
    except (KeyError, AssertionError) as e:
        _raise_config_error(cfg, e)
    return cfg


def _raise_config_error(cfg: CN, error: Exception) -> None:
    """yacs' KeyError / AssertionError of a merge as qdet's: an unknown key with the keys
    close to it, or the problem in one line."""
    message = str(error)
    if "Non-existent" not in message:  # e.g. an odd number of KEY VALUE overrides
        raise ValueError(f"bad config or overrides: {message}") from error
    bad = message.split(":")[-1].strip().strip("'\"")
    near = difflib.get_close_matches(bad, _all_keys(cfg), n=5, cutoff=0.5)
    raise KeyError(
        f"unknown config key {bad!r}; did you mean one of {near}? qdet's keys "
        "are declared in qdet/config.py, Detectron2's in detectron2/config/"
        "defaults.py"
    ) from error


def _type_mismatch_message(message: str) -> str:
    """yacs' "Type mismatch (<class 'int'> vs. <class 'str'>) with values (4 vs. 4) for
    config key: QUANT.W_BITS" as what to write instead."""
    found = re.search(
        r"<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) for "
        r"config key: (\S+)",
        message,
    )
    if not found:
        return f"bad config or overrides: {message}"
    want, got, default, value, key = found.groups()
    return (
        f"{key} takes a value of type {want}, not {value!r} (type {got}): write it as its "
        f"default is written ({key} {default})"
    )
