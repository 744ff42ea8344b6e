"""qdet's PTQ under a target (qdet/study/ptq.py): an FP checkpoint built for
``QUANT.TARGET`` and calibrated only: its FP weights loaded, every quantizer calibrated,
the bits and target asked for, in eval mode."""

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from target_models import RETINANET, TINY, _images

from qdet.config import load_config
from qdet.quantization import QConv2d
from qdet.quantization.quantizers import Quantizer
from qdet.study.ptq import calibrated_target_model, target_opts


def test_an_fp_checkpoint_calibrated_for_the_target(tmp_path):
    torch.manual_seed(0)
    fp = build_model(load_config(RETINANET, [*TINY, "QUANT.ENABLED", "False"]))
    DetectionCheckpointer(fp, save_dir=str(tmp_path)).save("fp")
    cfg = load_config(RETINANET, [*TINY, "QUANT.ENABLED", "False", *target_opts(4, 8)])
    torch.manual_seed(1)  # another init: what the model holds comes from the checkpoint
    model = calibrated_target_model(cfg, str(tmp_path / "fp.pth"), [_images(), _images()], 1)
    assert not model.training
    state = model.state_dict()
    for key, value in fp.state_dict().items():
        assert torch.equal(state[key], value), key
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    assert len(quantizers) > 40 and all(q.initialized for q in quantizers)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QConv2d)}
    assert all(c.target is not None and c.target.name == "onnxruntime" for c in convs.values())
    bits = {n: (c.weight_quantizer.bits, c.input_quantizer.bits) for n, c in convs.items()}
    ends = {"backbone.bottom_up.stem.conv1", "head.cls_score", "head.bbox_pred"}  # at 8 bits
    assert {n for n, b in bits.items() if b != (4, 8)} == ends and len(bits) > 20
