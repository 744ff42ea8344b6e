"""The check of an integer export (``QUANT.TARGET``): is every quantized conv an integer
kernel in the graph onnxruntime runs, and does each compute PyTorch's codes?

- **Kernels.** onnxruntime's optimised graph (``SessionOptions.optimized_model_filepath``)
  must hold one ``QLinearConv`` per quantized conv call of the model (RetinaNet's head: per
  level) and no float ``Conv`` beyond the model's float layers. A quantized conv left in
  float (an unfused Q/DQ group) is an export failure.
- **Layer by layer, on the integer kernels.** The session returns every QuantizeLinear's
  codes (after its Clip). PyTorch then runs the model with each quantizer's output
  replaced by onnxruntime's codes of that tensor (:func:`substituting_outputs`), so every
  layer sees exactly the runtime's inputs, and compares the codes each quantizer computes
  from them with the runtime's. Only values within :data:`TIE_TOL` code units of a rounding
  boundary may differ (float32 against the int32 accumulator plus requantisation): they
  are counted; any other difference is a failure.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qdet.export.graphs import INPUT_NAME, export_graph
from qdet.export.runtime import inference_session
from qdet.quantization.functional import MODE_SIGNED, MODE_UNSIGNED
from qdet.quantization.layers import QConv2d
from qdet.quantization.modes import substituting_outputs

# Code units: float32 rounding of a conv's sum against the runtime's exact int32 one, and
# of its requantisation multiplier, stays below this for n <= 255 (measured: docs/deployment.md,
# "Deployment: integer kernels").
TIE_TOL = 2e-3
INTEGER_OPS = (
    "QLinearConv",
    "QLinearAdd",
    "QGemm",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "QLinearMul",
    "QLinearSoftmax",
    "QLinearConcat",
    "ConvInteger",
    "MatMulInteger",
)
# What an attention matmul of two quantized operands becomes: with its output quantized,
# or with float output (the logits, to which float terms are added).
MATMUL_OPS = ("QLinearMatMul", "MatMulIntegerToFloat")


def optimized_nodes(path: str, threads: int = 1) -> list[tuple[str, str]]:
    """(op type, node name) of the graph onnxruntime runs for ``path`` after its
    optimisations; unfused nodes keep the exporter's names (``/backbone/.../Gemm``)."""
    import onnx  # optional: the export extra
    import onnxruntime as ort  # optional: the export extra

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return [(n.op_type, n.name) for n in graph.node]


def optimized_op_counts(path: str, threads: int = 1) -> dict[str, int]:
    """Op types of the graph onnxruntime runs for ``path`` after its optimisations."""
    return dict(collections.Counter(op for op, _ in optimized_nodes(path, threads)))


def float_layers_named(meta: dict, nodes: list[tuple[str, str]]) -> list[str]:
    """The quantized layers of ``meta`` (integer convs, Linears, attentions) that own a
    float Conv / Gemm / MatMul in the optimised graph ``nodes``: each is a layer the
    runtime runs in float (an unfused Q/DQ group)."""
    floating = {op for kind in ("conv", "linear", "matmul") for op in KERNEL_KINDS[kind][1]}
    paths = {*meta.get("integer_convs", []), *meta.get("integer_linears", [])}
    paths |= set(meta.get("integer_matmuls", []))
    named = set()
    for op, name in nodes:
        if op not in floating:
            continue
        scope = "." + name.strip("/").replace("/", ".") + "."
        named |= {p for p in paths if p and f".{p}." in scope}
    return sorted(named)


# Per layer kind, the op types onnxruntime runs it as: integer, float.
KERNEL_KINDS = {
    "conv": (("QLinearConv", "ConvInteger"), ("Conv", "FusedConv")),
    "conv_transpose": (("QLinearConvTranspose",), ("ConvTranspose",)),
    "linear": (("QGemm",), ("Gemm", "FusedGemm")),
    "matmul": (
        ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger"),
        ("MatMul", "FusedMatMul"),
    ),
    "softmax": (("QLinearSoftmax",), ("Softmax",)),
    "sigmoid": (("QLinearSigmoid",), ("Sigmoid",)),
    "layer_norm": ((), ("LayerNormalization",)),  # onnxruntime has no integer LayerNorm
    "add": (("QLinearAdd",), ("Add",)),
    "mul": (("QLinearMul",), ("Mul",)),
}


def kernels_by_kind(counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per layer kind (:data:`KERNEL_KINDS`), how many run as integer and as float ops in
    an optimised graph's op counts (``float`` includes the post-processing's own adds and
    multiplies in a whole file)."""
    return {
        kind: {
            "integer": sum(counts.get(op, 0) for op in integer),
            "float": sum(counts.get(op, 0) for op in floating),
        }
        for kind, (integer, floating) in KERNEL_KINDS.items()
    }


def float_convs(counts: dict[str, int]) -> int:
    """Float convs of an optimised graph (onnxruntime's fused and NCHWc variants too)."""
    return counts.get("Conv", 0) + counts.get("FusedConv", 0)


def check_kernels(meta: dict, counts: dict[str, int], float_layers: int, report, nodes=()) -> None:
    """Every quantized conv a QLinearConv, every quantized Linear a QGemm, every attention
    matmul an integer matmul (:data:`MATMUL_OPS`); no float conv beyond ``float_layers``."""
    failures_before = len(report.failures)
    expected = len(meta["integer_convs"])
    got, floats = counts.get("QLinearConv", 0), float_convs(counts)
    report.integer_kernels = {k: v for k, v in counts.items() if k in INTEGER_OPS}
    report.kernels_by_kind = kernels_by_kind(counts)
    report.float_convs = floats
    if got != expected or floats != float_layers:
        report.failures.append(
            f"{expected} quantized conv calls should run as QLinearConv, onnxruntime runs "
            f"{got} (and {floats} float convs, the model has {float_layers} float conv "
            "calls): some Q/DQ group did not fuse and runs in float"
        )
    linears, gemms = len(meta.get("integer_linears", [])), counts.get("QGemm", 0)
    if gemms != linears:
        report.failures.append(
            f"{linears} quantized Linear calls should run as QGemm, onnxruntime runs {gemms}: "
            "some Q/DQ group did not fuse and runs in float"
        )
    matmuls = len(meta.get("integer_matmuls", []))
    fused = sum(counts.get(op, 0) for op in MATMUL_OPS)
    if fused != matmuls:
        report.failures.append(
            f"{matmuls} attention matmul calls should run as {' or '.join(MATMUL_OPS)}, "
            f"onnxruntime runs {fused}: some Q/DQ group did not fuse and runs in float"
        )
    unfused = len(report.failures) > failures_before
    if unfused and (named := float_layers_named(meta, nodes)):
        report.failures.append(f"running in float: {', '.join(named)}")


def _codes_names(proto) -> list[str]:
    """Each QuantizeLinear's codes in graph order: its output, or its Clip's."""
    consumers = collections.defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    names = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        after = consumers[node.output[0]]
        clip = [n for n in after if n.op_type == "Clip"]
        names.append(clip[0].output[0] if clip else node.output[0])
    return names


class _Substitute:
    """Feeds PyTorch the runtime's codes, quantizer call by call, comparing its own."""

    def __init__(self, runtime_codes: list[np.ndarray], grids: list[dict], report):
        self.codes, self.grids, self.report = runtime_codes, grids, report
        self.i = 0

    def __call__(self, quantizer, x, out, requantize):
        i, self.i = self.i, self.i + 1
        grid = self.grids[i]
        if grid["requantize"] != requantize:
            raise RuntimeError(
                f"the export's QuantizeLinear {i} ({grid['path'] or 'a requantisation'}) "
                "is not where PyTorch quantizes: graph and model disagree in order"
            )
        offset = grid["zero_point"] if quantizer.target.activation_zero_point == "zero" else 0
        codes = torch.from_numpy(self.codes[i].astype(np.int64) + offset)
        lower, upper, scale, mode = (
            t.detach() if torch.is_tensor(t) else t for t in quantizer._affine()
        )
        n = quantizer.n_levels
        if requantize:  # on the grid already: PyTorch's codes are its output's
            mine = quantizer._encode_output(out.detach(), lower, scale, mode).long()
            near = torch.zeros_like(mine, dtype=torch.bool)
        else:
            t = n * torch.clamp((x.detach().float() - lower) / (upper - lower), 0, 1)
            mine = torch.round(t).long()
            near = (t - torch.floor(t) - 0.5).abs() < TIE_TOL
        differ = mine != codes
        if not requantize:  # copies of one value are one rounding decision (check_tie_rate)
            self.report.tie_values += int(torch.unique(t[differ & near]).numel())
        if (differ & ~near).any():
            where = grid["path"] or f"the requantisation after QuantizeLinear {i - 1}"
            self.report.failures.append(
                f"{where}: {int((differ & ~near).sum())} of {codes.numel()} codes of the "
                "integer kernels differ from PyTorch's on the same inputs, away from a "
                "rounding boundary"
            )
        self.report.boundary_flips += int((differ & near).sum())
        self.report.activation_values += codes.numel()
        assert mode in (MODE_UNSIGNED, MODE_SIGNED)
        return quantizer._decode(codes.to(out.device), lower, scale, mode).to(out.dtype)


@torch.no_grad()
def check_layers(
    model: nn.Module,
    path: str,
    batches: list[np.ndarray],
    meta: dict,
    report,
    input_name: str = INPUT_NAME,
    run_model: Callable[[np.ndarray], object] | None = None,
):
    """Layer by layer on the integer kernels (module docstring). Each of ``batches`` is fed
    as ``input_name`` and given to ``run_model`` (default: the network-only graph of
    :func:`qdet.export.graphs.export_graph` on it), which must make the quantizer calls the
    file makes, in its order (a whole file: Detectron2's inference on the picture)."""
    import onnx  # optional: the export extra

    proto = onnx.load(path)
    names = _codes_names(proto)
    grids = meta["integer_activations"]
    if len(names) != len(grids):
        report.failures.append(
            f"the file has {len(names)} QuantizeLinear nodes, the export wrote {len(grids)}"
        )
        return
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = inference_session(proto.SerializeToString())
    if run_model is None:
        graph = export_graph(model).eval()
        run_model = lambda images: graph(torch.from_numpy(images))  # noqa: E731
    for images in batches:
        runtime = session.run(names, {input_name: images})
        substitute = _Substitute(runtime, grids, report)
        with substituting_outputs(substitute):
            run_model(images)
        if substitute.i != len(grids):
            report.failures.append(
                f"PyTorch quantized {substitute.i} tensors, the file has {len(grids)}"
            )
    report.activations_checked = len(grids)


def float_conv_calls(model: nn.Module, run: Callable[[], object]) -> int:
    """How many float (unquantized) conv calls ``model`` makes while ``run()`` runs it (the
    exported network on a batch, or Detectron2's whole inference on a picture)."""
    calls = [0]

    def count(_module, _inputs):
        calls[0] += 1

    handles = [
        m.register_forward_pre_hook(count)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and not isinstance(m, QConv2d)
        and not name.startswith("distiller")
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls[0]


def network_conv_calls(model: nn.Module, images: torch.Tensor) -> int:
    """:func:`float_conv_calls` of the exported network on ``images``."""
    graph = export_graph(model).eval()
    return float_conv_calls(model, lambda: graph(images))
