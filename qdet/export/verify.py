"""The export check: is the ONNX model the PyTorch model, layer by layer and end to end?

Why layer by layer. At 4 bits, two runtimes cannot agree end to end to float precision:
their convs sum in different orders (about 1e-6 relative), so now and then an activation
that sits within that distance of a rounding boundary lands one code apart, and the next
quantized layers amplify that one step into many (a flip in ``res4`` of a trained 4-bit
RetinaNet moved about 97% of its head outputs by more than 1e-3; docs/deployment.md, "Export").
What can be checked exactly is what the export writes:

- weights: every quantized weight's integers hold at most 2^b values, on the layer's grid,
  and DequantizeLinear gives the PyTorch fake-quantized weight (to float rounding);
- activations: every QuantizeLinear of the file, given onnxruntime's own input to it,
  gives the code the PyTorch quantizer gives for that input, except where the input is
  within :data:`TIE_TOL` (in code units) of a rounding boundary.

A failure of either is an export error, and so are boundary ties above :data:`MAX_TIE_RATE`
of the codes checked (:func:`check_tie_rate`): float rounding makes them rare (the digits
RetinaNet-R18's integer check on 8 images checks about 20 million codes; the deployment
study's checks counted 21 to 317 ties, at most 1.6e-5); many more mean the file's
arithmetic is not the model's. The rate counts each tensor's distinct tied values once
(``tie_values``): copies of one value in a tensor are one rounding decision, and a value
that sits at a boundary flips at every copy (the tiny Swin's QFD W4A8 file on 8 pictures:
6270 codes at a tie, 351 distinct values; 6160 of the codes in one attention output, each
within 3e-5 code units of its boundary). Codes at a tie, copies included, are capped
too, at :data:`MAX_TIED_CODE_RATE`.

End to end is reported, with a warning below :data:`MIN_AGREEMENT` (not a failure: on an
untrained 3-bit model the cascade alone took it to 82%): head outputs' mean and max
difference, and how many of PyTorch's confident detections (score >= :data:`CONFIDENT`)
onnxruntime finds too (same class, IoU >= :data:`BOX_IOU`). ``tools/export_onnx.py
--eval`` compares COCO AP.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import torch
from detectron2.structures import Instances, pairwise_iou
from torch import nn

from qdet.export import integer_check
from qdet.export.graphs import INPUT_NAME, export_graph
from qdet.export.qdq import activation_grid
from qdet.export.runtime import OnnxRetinaNet, inference_session, onnx_metadata

TIE_TOL = 1e-4  # code units: float32 rounding of n (x - l) / (u - l) is below 2e-5 (n <= 255)
WEIGHT_RTOL = 1e-5  # relative to max |w|: float rounding (~1e-7); one step at 8 bits is 4e-3
CONFIDENT = 0.5
BOX_IOU = 0.9
MIN_AGREEMENT = 0.9
MAX_TIE_RATE = 1e-4  # boundary ties per code checked; the study's checks: <= 1.6e-5
# Codes at a tie, copies included, per code checked: a looser cap, so that copies of a few
# tied values cannot flip any number of codes (the tiny Swin's QFD W4A8 file: 1.6e-4).
MAX_TIED_CODE_RATE = 10 * MAX_TIE_RATE
SUBSTITUTED_RTOL = 1e-4  # float32 through a few float ops; one 8-bit step is 4e-3


@dataclass
class VerifyReport:
    images: int = 0
    weights_checked: int = 0
    activations_checked: int = 0
    activation_values: int = 0
    boundary_flips: int = 0
    tie_values: int = 0  # distinct values among each tensor's boundary_flips (check_tie_rate)
    head_mean_abs: float = 0.0
    head_max_abs: float = 0.0
    substituted_max_abs: float = 0.0  # end to end with onnxruntime's quantized tensors
    confident_torch: int = 0
    confident_found: int = 0
    # An integer export (QUANT.TARGET): integer op counts of the graph onnxruntime runs,
    # and its float convs (qdet.export.integer_check).
    target: str = ""
    integer_kernels: dict = field(default_factory=dict)
    kernels_by_kind: dict = field(default_factory=dict)  # integer / float ops per layer kind
    float_convs: int = 0
    failures: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def agreement(self) -> float:
        return self.confident_found / self.confident_torch if self.confident_torch else 1.0

    def summary(self) -> str:
        if self.target:
            kernels = ", ".join(f"{v} {k}" for k, v in sorted(self.integer_kernels.items()))
            s = (
                f"onnxruntime runs {kernels} and {self.float_convs} float convs; "
                f"{self.activations_checked} QuantizeLinear nodes x {self.images} images "
                f"({self.activation_values} codes of the integer kernels, each layer fed the "
                f"runtime's own inputs) give PyTorch's codes, {self.boundary_flips} one code "
                f"apart at a rounding boundary ({self.tie_values} distinct values); head "
                "outputs |onnx - torch| mean "
                f"{self.head_mean_abs:.2g}, max {self.head_max_abs:.2g}"
            )
        else:
            s = (
                f"{self.weights_checked} quantized weights on their grids; "
                f"{self.activations_checked} QuantizeLinear nodes x {self.images} images "
                f"({self.activation_values} values) give PyTorch's codes, "
                f"{self.boundary_flips} one code apart at a rounding boundary "
                f"({self.tie_values} distinct values); with "
                f"onnxruntime's quantized tensors substituted the outputs agree to "
                f"{self.substituted_max_abs:.2g}; head outputs |onnx - torch| mean "
                f"{self.head_mean_abs:.2g}, max {self.head_max_abs:.2g}"
            )
        if self.confident_torch:
            s += (
                f"; {self.confident_found}/{self.confident_torch} confident detections "
                f"(score >= {CONFIDENT}) found by onnxruntime (same class, IoU >= {BOX_IOU})"
            )
        return s


def _constants(proto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper  # optional: the export extra

    values = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute:
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def check_weights(model: nn.Module, proto, meta: dict, report: VerifyReport) -> None:
    """The quantized weights of the file against the model's fake-quantized weights."""
    constants = _constants(proto)
    dq = [
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants
    ]
    expected = meta.get("qdq_weights", [])
    if len(dq) != len(expected):
        report.failures.append(
            f"the file has {len(dq)} constant DequantizeLinear nodes, the export wrote "
            f"{len(expected)} quantized weights"
        )
        return
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node, info in zip(dq, expected):
        layer_path = info["path"].rsplit(".", 1)[0]
        layer = model.get_submodule(layer_path)
        with torch.no_grad():
            want = layer.weight_quantizer(layer.weight).float().cpu().numpy()
        integers, scale = constants[node.input[0]], constants[node.input[1]]
        if integers.shape != want.shape:
            report.failures.append(f"{layer_path}: weight shape {integers.shape}, not {want.shape}")
            continue
        if scale.ndim == 1:
            scale = scale.reshape(-1, *([1] * (integers.ndim - 1)))
        got = integers.astype(np.float32) * scale
        if info.get("offset"):  # QFD at 8 bits: (2s / n) k, then Add(-s)
            add = consumers[node.output[0]][0]
            got = got + constants[add.input[1]]
        levels = np.unique(integers).size
        if levels > 2 ** info["bits"]:
            report.failures.append(
                f"{layer_path}: {levels} distinct weight integers for {info['bits']} bits"
            )
        err = float(np.abs(got - want).max()) if want.size else 0.0
        if err > WEIGHT_RTOL * max(float(np.abs(want).max()), 1e-12):
            report.failures.append(f"{layer_path}: dequantized weight differs by {err:.3g}")
        report.weights_checked += 1


def _torch_codes(x: np.ndarray, grid: dict) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's codes for the activation ``x`` (before the file's Sub / Clip) on ``grid``,
    k = round(n clip((x - l) / (u - l), 0, 1)), and the distance of n t from the nearest
    rounding boundary (in code units)."""
    x = torch.from_numpy(x)
    lower, upper = torch.tensor(grid["lower"]), torch.tensor(grid["upper"])
    scaled = grid["n"] * torch.clamp((x - lower) / (upper - lower), 0, 1)
    to_boundary = (scaled - torch.floor(scaled) - 0.5).abs()
    return torch.round(scaled).numpy(), to_boundary.numpy()


def _activation_input(proto, node, constants: dict) -> str:
    """The tensor a QuantizeLinear's chain starts from: back through the Clip and Sub with
    constant operands that the export writes in front of it."""
    producers = {out: n for n in proto.graph.node for out in n.output}
    name = node.input[0]
    while name in producers and producers[name].op_type in ("Sub", "Clip"):
        before = producers[name]
        if not all(i in constants or i == "" for i in before.input[1:]):
            break
        name = before.input[0]
    return name


def _scalar(constants: dict, name: str) -> float | None:
    if name == "" or name not in constants:
        return None
    return float(np.asarray(constants[name]).reshape(-1)[0])


def _chain_constants(proto, node, constants: dict) -> dict:
    """Every constant of an activation's chain in the file (module docstring of
    :mod:`qdet.export.qdq`): the Sub before it, the Clip's bounds, QuantizeLinear's and
    DequantizeLinear's scale and zero point, the Add after it."""
    producers = {out: n for n in proto.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = {"offset_in": None, "clip_min": None, "clip_max": None, "offset_out": None}
    name = node.input[0]
    while name in producers and producers[name].op_type in ("Sub", "Clip"):
        before = producers[name]
        if not all(i in constants or i == "" for i in before.input[1:]):
            break
        if before.op_type == "Sub":
            found["offset_in"] = _scalar(constants, before.input[1])
        else:
            found["clip_min"] = _scalar(constants, before.input[1])
            found["clip_max"] = _scalar(constants, before.input[2] if len(before.input) > 2 else "")
        name = before.input[0]
    found["q_step"] = _scalar(constants, node.input[1])
    found["q_zero"] = _scalar(constants, node.input[2]) if len(node.input) > 2 else 0.0
    (dq,) = [n for n in consumers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
    found["dq_step"] = _scalar(constants, dq.input[1])
    found["dq_zero"] = _scalar(constants, dq.input[2]) if len(dq.input) > 2 else 0.0
    after = consumers.get(dq.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add" and after[0].input[1] in constants:
        found["offset_out"] = _scalar(constants, after[0].input[1])
    return found


def _chain_problems(grid, found: dict) -> list[str]:
    """What in the file's chain is not the model quantizer's grid ``grid``."""
    expected = {
        "offset_in": grid.offset_in,
        "clip_max": grid.clip_max,
        "q_zero": 0.0,
        "dq_step": grid.dq_step,
        "dq_zero": 0.0,
        "offset_out": grid.offset_out,
    }
    if grid.clip_min is not None:
        expected["clip_min"] = grid.clip_min
    problems = []
    for key, want in expected.items():
        got = found.get(key)
        if want is None or got is None:
            if (want is None) != (got is None or (key == "clip_min" and got == -np.inf)):
                problems.append(f"{key} {got} in the file, {want} in the model")
        elif not np.isclose(got, want, rtol=1e-6, atol=0.0):
            problems.append(f"{key} {got:.6g} in the file, {want:.6g} in the model")
    return problems


def model_grids(model: nn.Module, meta: dict, proto, report: VerifyReport) -> list[dict] | None:
    """Each QuantizeLinear's grid from the model's own quantizer (named by the export's
    metadata, in graph order), its step checked against the node's scale in the file: the
    check's expected codes never come from what the export wrote about itself."""
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    written = meta.get("qdq_activations", [])
    if len(q_nodes) != len(written):
        report.failures.append(
            f"the file has {len(q_nodes)} QuantizeLinear nodes, the export wrote {len(written)}"
        )
        return None
    constants = _constants(proto)
    grids = []
    for node, info in zip(q_nodes, written):
        try:
            quantizer = model.get_submodule(info["path"])
        except AttributeError:
            report.failures.append(f"{info['path']!r}: no such quantizer in the model")
            return None
        full = activation_grid(quantizer, info["path"])
        grid = full.as_dict()
        scale = float(np.asarray(constants.get(node.input[1], np.nan)).reshape(-1)[0])
        if not np.isclose(scale, grid["q_step"], rtol=1e-6, atol=0.0):
            report.failures.append(
                f"{info['path']}: QuantizeLinear's scale {scale:.6g} is not the model "
                f"quantizer's step {grid['q_step']:.6g}"
            )
        # Every other constant of the chain, DequantizeLinear's included.
        for problem in _chain_problems(full, _chain_constants(proto, node, constants)):
            report.failures.append(f"{info['path']}: {problem}")
        grids.append(grid)
    return grids


def _chain_output(proto, node, constants: dict) -> str:
    """The tensor a QuantizeLinear's chain ends in: its DequantizeLinear, then the Add of a
    constant offset the export writes after a signed map."""
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    (dq,) = [n for n in consumers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
    after = consumers.get(dq.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add" and after[0].input[1] in constants:
        return after[0].output[0]
    return dq.output[0]


def check_activations(
    model: nn.Module,
    proto,
    meta: dict,
    batches: list[np.ndarray],
    report: VerifyReport,
    input_name: str = INPUT_NAME,
    substituted: bool = True,
) -> None:
    """Every QuantizeLinear of the file on onnxruntime's own inputs against the codes the
    model's quantizer gives for them (:func:`model_grids`); then, with ``substituted``, end
    to end with every quantizer's output replaced by onnxruntime's
    (:func:`check_substituted`; a network-only file's head outputs). ``batches`` are fed as
    ``input_name``."""
    import onnx  # optional: the export extra

    grids = model_grids(model, meta, proto, report)
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    if not grids:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    constants = _constants(proto)
    inputs = [_activation_input(proto, n, constants) for n in q_nodes]
    ends = [_chain_output(proto, n, constants) for n in q_nodes]
    names = [name for n, x in zip(q_nodes, inputs) for name in (x, n.output[0])]
    heads = [o.name for o in proto.graph.output]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in [*names, *ends])
    session = inference_session(probe.SerializeToString())
    for images in batches:
        values = session.run([*heads, *names, *ends], {input_name: images})
        head_values, values = values[: len(heads)], values[len(heads) :]
        for i, grid in enumerate(grids):
            x, codes = values[2 * i], values[2 * i + 1].astype(np.int64) - grid["code_offset"]
            want, to_boundary = _torch_codes(x, grid)
            differ = codes != want
            at_boundary = to_boundary < TIE_TOL
            if (differ & ~at_boundary).any():
                worst = int((differ & ~at_boundary).sum())
                report.failures.append(
                    f"{grid['path']}: {worst} codes differ from PyTorch's away from any "
                    "rounding boundary"
                )
            report.boundary_flips += int((differ & at_boundary).sum())
            report.tie_values += int(np.unique(x[differ & at_boundary]).size)
            report.activation_values += int(codes.size)
        if substituted:
            chain_ends = values[2 * len(grids) :]
            check_substituted(model, images, grids, chain_ends, head_values, report)
    report.activations_checked = len(grids)


@torch.no_grad()
def check_substituted(
    model: nn.Module,
    images: np.ndarray,
    grids: list[dict],
    chain_ends: list[np.ndarray],
    heads: list[np.ndarray],
    report: VerifyReport,
) -> None:
    """End to end without the cascade: PyTorch runs with every quantizer's output replaced
    by onnxruntime's (the k-th call of a quantizer takes the k-th chain of its path), so
    only the float ops differ (stem, predictors, sums, pooling, resizing) and the outputs
    must agree to float rounding (:data:`SUBSTITUTED_RTOL` of the largest output)."""
    by_path: dict[str, list[torch.Tensor]] = {}
    for grid, value in zip(grids, chain_ends):
        by_path.setdefault(grid["path"], []).append(torch.from_numpy(value))
    calls = dict.fromkeys(by_path, 0)

    def replace(path):
        def hook(_module, _inputs, output):
            k = calls[path]
            calls[path] += 1
            if k >= len(by_path[path]):
                return output  # more calls than chains: counted below
            return by_path[path][k].to(output.dtype)

        return hook

    handles = [model.get_submodule(path).register_forward_hook(replace(path)) for path in by_path]
    try:
        outputs = export_graph(model).eval()(torch.from_numpy(images))
    finally:
        for h in handles:
            h.remove()
    extra = {p: c for p, c in calls.items() if c != len(by_path[p])}
    if extra:
        report.failures.append(
            f"quantizers called a different number of times than the file has chains: {extra}"
        )
        return
    scale = max(float(np.abs(h).max()) for h in heads) if heads else 1.0
    for out, head in zip(outputs, heads):
        err = float(np.abs(out.numpy() - head).max()) if head.size else 0.0
        report.substituted_max_abs = max(report.substituted_max_abs, err)
        if err > SUBSTITUTED_RTOL * max(scale, 1.0):
            report.failures.append(
                f"with onnxruntime's quantized tensors substituted, an output differs by "
                f"{err:.3g} (largest output {scale:.3g}): a float op of the file is not "
                "PyTorch's"
            )
            return


def _confident_found(t: Instances, o: Instances) -> tuple[int, int]:
    t = t[t.scores >= CONFIDENT]
    if len(t) == 0 or len(o) == 0:
        return len(t), 0
    iou = pairwise_iou(t.pred_boxes, o.pred_boxes)
    iou[t.pred_classes[:, None] != o.pred_classes[None, :]] = 0
    return len(t), int((iou.max(dim=1).values >= BOX_IOU).sum())


def check_tie_rate(report: VerifyReport) -> None:
    """A failure when the tied values (``tie_values``: distinct values one code apart at a
    rounding boundary, per tensor) exceed :data:`MAX_TIE_RATE` of the activation codes
    checked, or the codes at a tie, copies included, :data:`MAX_TIED_CODE_RATE`: ties are
    float rounding, which is rare; a file whose scales or offsets are off by a hair puts
    many distinct values there. A value repeated in a tensor counts once against the first
    limit: its copies are one rounding decision (module docstring)."""
    codes = report.activation_values
    if report.tie_values > MAX_TIE_RATE * codes:
        report.failures.append(
            f"{report.tie_values} distinct values ({report.boundary_flips} of {codes} "
            "activation codes) are one code apart at a rounding boundary, above the "
            f"{MAX_TIE_RATE:g} that float rounding explains: the file's arithmetic differs "
            "from the model's by a hair (re-export it; if it persists, report the model)"
        )
    elif report.boundary_flips > MAX_TIED_CODE_RATE * codes:
        report.failures.append(
            f"{report.boundary_flips} of {codes} activation codes ({report.tie_values} "
            f"distinct values) are one code apart at a rounding boundary, above the "
            f"{MAX_TIED_CODE_RATE:g} that float rounding explains: the file's arithmetic "
            "differs from the model's by a hair (re-export it; if it persists, report the "
            "model)"
        )


@torch.no_grad()
def verify(model: nn.Module, path: str, batched_inputs_list, threads: int = 0) -> VerifyReport:
    """Check the ONNX file at ``path`` against ``model`` (module docstring) on the images of
    ``batched_inputs_list`` (Detectron2 batches, e.g. a test loader). Failures are listed
    in the report, not raised."""
    import onnx  # optional: the export extra

    model.eval()
    graph = export_graph(model).eval()
    proto = onnx.load(path)
    report = VerifyReport()
    runner = OnnxRetinaNet(model, path, threads) if graph.kind == "retinanet" else None
    session = runner.session if runner else inference_session(path, threads)
    meta = onnx_metadata(session)
    report.target = meta.get("target", "")
    if not report.target:
        check_weights(model, proto, meta, report)
    batches, diffs = [], []
    for batch in batched_inputs_list:
        images = model.preprocess_image(batch).tensor
        batches.append(images.cpu().numpy())
        got = session.run(None, {INPUT_NAME: batches[-1]})
        for name, want, out in zip(graph.output_names, graph(images), got):
            if tuple(want.shape) != out.shape:
                report.failures.append(
                    f"{name}: shape {out.shape} in ONNX, not {tuple(want.shape)}"
                )
                continue
            diffs.append(np.abs(out - want.cpu().numpy()).ravel())
        report.images += len(batch)
        if runner is not None:
            for t, o in zip(model(batch), runner(batch)):
                n, found = _confident_found(t["instances"].to("cpu"), o["instances"])
                report.confident_torch += n
                report.confident_found += found
    if diffs:
        all_diffs = np.concatenate(diffs)
        report.head_mean_abs, report.head_max_abs = float(all_diffs.mean()), float(all_diffs.max())
    if report.target and batches:
        nodes = integer_check.optimized_nodes(path, threads or 1)
        counts = dict(collections.Counter(op for op, _ in nodes))
        float_calls = integer_check.network_conv_calls(model, torch.from_numpy(batches[0]))
        integer_check.check_kernels(meta, counts, float_calls, report, nodes)
        integer_check.check_layers(model, path, batches, meta, report)
    elif not report.target:
        check_activations(model, proto, meta, batches, report)
    check_tie_rate(report)
    if report.agreement < MIN_AGREEMENT:
        report.warnings.append(
            f"onnxruntime finds only {report.confident_found} of PyTorch's "
            f"{report.confident_torch} confident detections (below {MIN_AGREEMENT:.0%}): "
            "compare COCO AP with --eval"
        )
    return report
