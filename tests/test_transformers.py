"""Quantized ViTDet / Swin Mask R-CNN: exact MHA / MLP selection, training, conversion."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from train_net_cli import run_train_net

from qdet.config import load_config
from qdet.distill import Distiller, TermSpec, term_specs
from qdet.engine import build_qat_optimizer
from qdet.quantization import QLinear, calibrate
from qdet.study import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "vit": os.path.join(ROOT, "configs/digits/vitdet_tiny_4bit.yaml"),
    "swin": os.path.join(ROOT, "configs/digits/swin_tiny_4bit.yaml"),
}
SMALL = ["MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)"]
SMALL += ["INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST"]
SMALL += ["160", "QUANT.CALIB_BATCHES", "1"]


def _model(arch: str, *opts: str):
    torch.manual_seed(0)
    return build_model(load_config(CONFIGS[arch], [*SMALL, *opts]))


def _block_linears(arch: str, cfg_opts=()) -> dict[str, list[str]]:
    """Expected names, from the config's depths (not from qdet's patterns)."""
    cfg = load_config(CONFIGS[arch], [*SMALL, *cfg_opts])
    if arch == "vit":
        blocks = [f"backbone.net.blocks.{i}" for i in range(cfg.MODEL.VIT.DEPTH)]
    else:
        blocks = [
            f"backbone.bottom_up.layers.{i}.blocks.{j}"
            for i, depth in enumerate(cfg.MODEL.SWIN.DEPTHS)
            for j in range(depth)
        ]
    return {
        "mha": [f"{b}.attn.{n}" for b in blocks for n in ("qkv", "proj")],
        "mlp": [f"{b}.mlp.{n}" for b in blocks for n in ("fc1", "fc2")],
    }


@pytest.mark.parametrize("arch", ["vit", "swin"])
@pytest.mark.parametrize("targets", [["mha"], ["mlp"], ["mha", "mlp"]])
def test_selection_is_exactly_the_targeted_block_linears(arch, targets):
    model = _model(arch, "QUANT.TARGETS", str(targets))
    expected = _block_linears(arch)
    want = sorted(n for t in targets for n in expected[t])
    got = sorted(n for n, m in model.named_modules() if isinstance(m, QLinear))
    assert got == want
    assert sorted(model.quantized_layers) == want
    # Nothing else: patch embedding, patch merging, pyramid, RPN and ROI heads stay FP.
    for name, m in model.named_modules():
        if name not in want:
            assert not hasattr(m, "weight_quantizer"), name
    for name in want:
        layer = model.get_submodule(name)
        assert layer.input_quantizer.signed is True  # LayerNorm / attention / GELU outputs
        assert (layer.weight_quantizer.bits, layer.input_quantizer.bits) == (4, 4)


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown target.*'attn'.*\['mha', 'mlp'\]"):
        _model("vit", "QUANT.TARGETS", "['attn']")


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_tiny_model_trains_then_eval_only_gives_box_and_mask_ap(arch, tmp_path):
    from detectron2.data import build_detection_train_loader

    cfg = load_config(CONFIGS[arch], SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    loader = iter(build_detection_train_loader(cfg))
    calibrate(model, [next(loader)], num_batches=1)
    optimizer = build_qat_optimizer(cfg, model)
    model.train()
    layer = model.get_submodule(model.quantized_layers[0])
    before = layer.weight.detach().clone()
    for _ in range(2):
        with EventStorage():
            losses = model(next(loader))
        assert {"loss_mask", "loss_cls", "loss_rpn_cls"} <= set(losses)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert layer.input_quantizer.upper.grad is not None
        assert layer.weight_quantizer.scale.grad is not None
        optimizer.step()
    assert not torch.equal(before, layer.weight.detach())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("trained")
    r = run_train_net(
        "--eval-only",
        "--config-file",
        CONFIGS[arch],
        *SMALL,
        "MODEL.WEIGHTS",
        str(tmp_path / "trained.pth"),
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
    )
    log = r.stdout + r.stderr
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log
    assert len(re.findall(r"copypaste: AP,AP50,AP75", log)) == 2


def _fake_pretrained(arch: str) -> tuple[dict, dict]:
    """A pretrained-format checkpoint (MAE / official Swin names, extras included) and the
    backbone tensors it should set, named as in qdet's model."""
    fp = _model(arch, "QUANT.ENABLED", "False")
    net, prefix = (
        (fp.backbone.net, "backbone.net.")
        if arch == "vit"
        else (fp.backbone.bottom_up, "backbone.bottom_up.")
    )
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    if arch == "vit":
        state["cls_token"] = torch.zeros(1, 1, 96)
        state["norm.weight"] = torch.ones(96)
        state["decoder_embed.weight"] = torch.zeros(8, 96)
        state["mask_token"] = torch.zeros(1, 1, 8)
    else:
        state = {k: v for k, v in state.items() if not re.match(r"norm\d", k)}
        state["layers.0.blocks.0.attn_mask"] = torch.zeros(4, 36, 36)
        state["norm.weight"] = torch.ones(384)
        state["head.weight"] = torch.zeros(21841, 8)
    keep = {
        prefix + k: v
        for k, v in state.items()
        if k in net.state_dict() and not k.endswith("relative_position_index")
    }
    return {"model": state}, keep


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_converted_pretrained_checkpoint_loads_into_the_quantized_model(arch, tmp_path):
    raw, expected = _fake_pretrained(arch)
    torch.save(raw, tmp_path / "pretrained.pth")
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools/convert_pretrained_transformer.py"),
            "--arch",
            arch,
            str(tmp_path / "pretrained.pth"),
            str(tmp_path / "d2.pth"),
        ],
        check=True,
        capture_output=True,
    )
    converted = torch.load(tmp_path / "d2.pth", weights_only=True)["model"]
    assert set(converted) == set(expected)
    model = _model(arch)  # 4-bit MHA + MLP
    DetectionCheckpointer(model).load(str(tmp_path / "d2.pth"))
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_adamw_layer_decay_scales_each_vit_block():
    cfg = load_config(CONFIGS["vit"], [*SMALL, "SOLVER.LAYER_DECAY", "0.5"])
    model = build_model(cfg)
    optimizer = build_qat_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    depth, base = cfg.MODEL.VIT.DEPTH, cfg.SOLVER.BASE_LR
    for i in range(depth):
        w = model.backbone.net.blocks[i].mlp.fc1.weight
        assert lr_of[id(w)] == pytest.approx(base * 0.5 ** (depth - i))
    assert lr_of[id(model.backbone.net.patch_embed.proj.weight)] == pytest.approx(
        base * 0.5 ** (depth + 1)
    )
    assert lr_of[id(model.roi_heads.box_predictor.cls_score.weight)] == pytest.approx(base)
    quant = model.backbone.net.blocks[0].attn.qkv.input_quantizer.upper
    assert lr_of[id(quant)] == cfg.QUANT.BASE_LR  # the quantizer group keeps its own LR


def test_qfd_distills_a_simple_feature_pyramid_level():
    teacher = _model("vit", "QUANT.ENABLED", "False", "QUANT.FEATURE_TAP", "p3")
    student = _model("vit")
    student.load_state_dict(teacher.state_dict(), strict=False)
    from detectron2.data import build_detection_train_loader

    cfg = load_config(CONFIGS["vit"], SMALL)
    batch = next(iter(build_detection_train_loader(cfg)))
    calibrate(student, [batch], num_batches=1)
    calibrate(teacher, [batch], num_batches=1)
    student.attach_distiller(Distiller(student, teacher, [TermSpec("qfd", ["p3"], 0.5)]))
    student.train()
    with EventStorage():
        losses = student(batch)
    images = student.preprocess_image(batch).tensor
    with torch.no_grad():
        f_t = teacher.backbone(images)["p3"]
        f_s = student.backbone(images)["p3"]
    expected = 0.5 * torch.mean((f_s - f_t) ** 2)
    torch.testing.assert_close(losses["loss_distill_qfd"], expected, rtol=1e-4, atol=1e-6)
    losses["loss_distill_qfd"].backward()
    assert student.backbone.net.blocks[0].mlp.fc1.weight.grad is not None


def test_every_shipped_config_loads():
    paths = []
    for folder in ("configs", "configs/digits"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".yaml"):
                paths.append(os.path.join(ROOT, folder, name))
    assert len(paths) > 40
    for path in paths:
        cfg = load_config(path, [])
        if cfg.QUANT.ENABLED:
            from qdet.quantization.settings import quantize_kwargs

            quantize_kwargs(cfg.QUANT)  # bits, method and targets are valid
        if cfg.DISTILL.ENABLED:
            term_specs(cfg)  # losses, options and weights are valid


@pytest.mark.parametrize("arch,blocks", [("vitdet", 4), ("swin", 5)])
def test_digits_ablation_rows(arch, blocks, tmp_path):
    """Table 8's digits rows differ only in bits and targets; the fine-tunes (quantized
    and the FP control) share one schedule and start from the FP row's model."""
    study = ablation.build_study(arch, False, str(tmp_path), [])
    cfgs = {name: study.config(row, study.seeds[0]) for name, row in study.rows.items()}
    both, fp_model = ["mha", "mlp"], str(tmp_path / arch / "fp" / "model_final.pth")
    expected = {  # suffix: (quantized, W, A, targets)
        "fp_finetune": (False, 4, 4, both),
        "8bit": (True, 8, 8, both),
        "6bit": (True, 6, 6, both),
        "4bit": (True, 4, 4, both),
        "4bit_mha": (True, 4, 4, ["mha"]),
        "4bit_mlp": (True, 4, 4, ["mlp"]),
    }
    assert not cfgs["fp"].QUANT.ENABLED and cfgs["fp"].MODEL.WEIGHTS == ""
    schedules = set()
    for suffix, (enabled, w, a, targets) in expected.items():
        cfg = cfgs[suffix]
        got = (cfg.QUANT.ENABLED, cfg.QUANT.W_BITS, cfg.QUANT.A_BITS, list(cfg.QUANT.TARGETS))
        assert got == (enabled, w, a, targets), suffix
        assert fp_model == cfg.MODEL.WEIGHTS and cfg.OUTPUT_DIR.endswith(suffix)
        schedules.add((cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SOLVER.STEPS))
    assert len(schedules) == 1 and schedules.pop()[0] < cfgs["fp"].SOLVER.MAX_ITER

    # Two Linear layers per block for each target; the shares of MHA and MLP add up.
    rows = ("fp", "4bit", "4bit_mha", "4bit_mlp")
    counts = {s: ablation.quantized_share(build_model(cfgs[s])) for s in rows}
    assert counts["fp"] == (0, 0.0)
    assert [counts[s][0] for s in ("4bit", "4bit_mha", "4bit_mlp")] == [
        4 * blocks,
        2 * blocks,
        2 * blocks,
    ]
    assert counts["4bit_mha"][1] + counts["4bit_mlp"][1] == pytest.approx(counts["4bit"][1])
    assert 0 < counts["4bit_mha"][1] < counts["4bit_mlp"][1] < 1  # MLP (8d^2) > MHA (4d^2)


def test_lazy_digits_ablation_rows_match_the_yacs_rows(tmp_path):
    """--lazy: the same rows from configs/lazy/digits (bits, targets, one schedule, every
    fine-tune from the FP run), quantizing the same number of Linears with the same share
    of the ViT's parameters as the yacs rows."""
    from qdet.engine import lazy

    runs = {s: cfg for s, _, cfg in ablation.lazy_run_configs(False, str(tmp_path), [], 2)}
    assert list(runs) == ["fp", "fp_finetune", "8bit", "6bit", "4bit", "4bit_mha", "4bit_mlp"]
    fp_final = str(tmp_path / "lazy_vitdet" / "fp" / "model_final.pth")
    assert not lazy.quant_settings(runs["fp"])[1]["enabled"]
    assert runs["fp"].train.output_dir == os.path.dirname(fp_final)
    bits = {s: lazy.quant_bits(cfg) for s, cfg in runs.items()}
    assert bits == {
        "fp": None, "fp_finetune": None, "8bit": (8, 8), "6bit": (6, 6),
        "4bit": (4, 4), "4bit_mha": (4, 4), "4bit_mlp": (4, 4),
    }  # fmt: skip
    schedules = set()
    for suffix, cfg in list(runs.items())[1:]:
        assert cfg.train.init_checkpoint == fp_final
        assert cfg.train.output_dir == str(tmp_path / "lazy_vitdet" / "seed2" / suffix)
        schedules.add((cfg.train.max_iter, cfg.optimizer.lr))
    assert len(schedules) == 1
    study = ablation.build_study("vitdet", False, str(tmp_path), [])
    for suffix in ("fp_finetune", "4bit", "4bit_mha", "4bit_mlp"):
        yacs_model = build_model(study.config(study.rows[suffix], study.seeds[0]))
        lazy_model = lazy.build_model(runs[suffix])
        assert ablation.quantized_share(lazy_model) == ablation.quantized_share(yacs_model)


def test_roi_align_second_derivative_matches_finite_differences():
    """Double backward of the patched ROIAlign against torch's numerical gradgradcheck,
    and the same values and first gradient as torchvision's kernel."""
    from detectron2.layers import ROIAlign

    from qdet.quantization.second_order import RoIAlignFunction, twice_differentiable

    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 7, 9, dtype=torch.float64, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1.0, 6.0, 5.5], [1, 2.0, 0.3, 8.0, 6.0]], dtype=torch.float64)
    args = (0.5, 3, 2, 2, True)

    def roi(f):
        return RoIAlignFunction.apply(f, rois, *args)

    assert torch.autograd.gradcheck(roi, (features,))
    assert torch.autograd.gradgradcheck(roi, (features,))
    module = ROIAlign((3, 2), 0.5, 2, aligned=True)
    plain = module(features, rois)
    (plain_grad,) = torch.autograd.grad((plain**2).sum(), features)
    with twice_differentiable(module):
        patched = module(features, rois)
    (patched_grad,) = torch.autograd.grad((patched**2).sum(), features)
    assert torch.equal(plain, patched) and torch.allclose(plain_grad, patched_grad)
    assert "forward" not in vars(module)  # restored


def test_ewgs_delta_refresh_runs_through_mask_rcnn():
    """ROIAlign has no double backward in torchvision: the refresh must still reach the
    ViT's quantizers through the box and mask heads."""
    from detectron2.data import build_detection_train_loader

    from qdet.quantization import update_ewgs_deltas

    cfg = load_config(CONFIGS["vit"], [*SMALL, "QUANT.METHOD", "ewgs"])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = next(iter(build_detection_train_loader(cfg)))
    calibrate(model, [batch], num_batches=1)
    deltas = update_ewgs_deltas(
        model, lambda b: sum(model(b).values()), [batch], 1, estimator="joint", max_iter=3
    )
    assert len(deltas) == 2 * len(model.quantized_layers)
    assert any(d > 0 for d in deltas.values())


@pytest.mark.parametrize(
    "arch,tap", [("vit", "backbone.net.blocks.1"), ("swin", "backbone.bottom_up.layers.2.blocks.1")]
)
def test_transformer_block_taps_are_channels_first_maps(arch, tap):
    from qdet.distill.taps import TapRecorder, resolve_tap

    model = _model(arch, "QUANT.ENABLED", "False").eval()
    recorder = TapRecorder(model, [resolve_tap(model, tap)])
    recorder.recording = True
    raw = {}
    block = model.get_submodule(tap)
    block.register_forward_hook(
        lambda m, i, out: raw.update(out=out, hw=(m.H, m.W) if arch == "swin" else None)
    )
    with torch.no_grad():
        model.backbone(torch.randn(1, 3, 128, 128))
    got = recorder.pop()[tap]
    if arch == "vit":  # B x H x W x C tokens
        expected = raw["out"].movedim(-1, 1)
    else:  # B x HW x C tokens of an H x W window grid
        h, w = raw["hw"]
        expected = raw["out"].view(1, h, w, -1).movedim(-1, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
