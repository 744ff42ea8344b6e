#!/usr/bin/env python
"""Run a qdet whole-detector ONNX file without torch or Detectron2: onnxruntime, numpy and
opencv only. One file: copy it beside the model.

    pip install onnxruntime numpy opencv-python-headless
    python qdet_runner.py --onnx model.onnx --input photos/ --output detections/

``tools/export_onnx.py`` writes the file (Detectron2's own inference traced in one graph,
qdet's quantized layers inside). This module does what Detectron2 does around that graph
at test time: reads a picture (grayscale and RGBA converted), puts it in the file's channel
order, resizes it as ``ResizeShortestEdge(min_size_test, max_size_test)`` does (PIL's
bilinear, which Detectron2 uses for uint8 pictures), runs the file, scales the boxes back
to the picture, drops empty ones and pastes the masks as ``detector_postprocess`` and
``paste_masks_in_image`` do. :class:`Detector` returns numpy arrays; the command line draws
them and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

FORMAT = "qdet-detector-1"  # the metadata "graph" of a whole-detector file
TEXT_METADATA = ("producer", "graph", "input", "input_format", "target")  # the rest is JSON
MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def session_options(threads: int = 0, spinning: bool = True, arena: bool = True):
    """onnxruntime's CPU session options for a qdet file (``threads`` = 0: onnxruntime's
    default). ``spinning`` False: idle threads sleep rather than spin (several sessions
    timed in turn in one process would otherwise take each other's cores). ``arena``
    False: no CPU memory arena, so a session returns its activations' memory after each
    run instead of keeping its high-water mark (several large sessions open side by side,
    e.g. ViTDet-B's whole files at 1024 x 1024, would otherwise not fit in memory)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime rewrites a DequantizeLinear weight -> MatMul (a quantized Linear: ViT,
    # Swin) into MatMulNBits, by default at accuracy level 4: activations quantized to int8
    # per block on the fly, about 1e-3 relative off the dequantized product QAT computed.
    # Level 1 keeps it in float32: the trained model.
    options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, "1")
    return options


def read_metadata(session) -> dict:
    """A session's ONNX metadata: qdet's entries decoded (JSON but for
    :data:`TEXT_METADATA`); entries other tools added (onnxruntime's quantizer writes
    ``onnx.*`` ones) kept as text when they are not JSON."""
    meta = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            meta[key] = value if key in TEXT_METADATA else json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f"qdet_runner needs {module}: pip install onnxruntime numpy opencv-python-headless"
        ) from e


# -- pictures -------------------------------------------------------------------------------
def read_image(path: str) -> np.ndarray:
    """The picture at ``path`` as (H, W, 3) BGR uint8: grayscale expanded, alpha dropped,
    16-bit scaled to 8; an error naming the file if opencv cannot decode it."""
    cv2 = _require("cv2")
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read {path!r} as an image (opencv could not decode it)")
    return as_bgr(image)


def as_bgr(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or uint16 -> (H, W, 3) BGR uint8."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"pictures are uint8 or uint16, not {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if channels == 3:
        return image
    raise ValueError(f"a picture has 1, 3 or 4 channels, not {channels}")


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Detectron2's ``ResizeShortestEdge.get_output_shape``: the short edge to ``short``,
    the long one at most ``max_size``."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
    if min(new_h, new_w) < 1:
        raise ValueError(
            f"a {width} x {height} picture resizes to {new_w} x {new_h} (short edge {short}, "
            f"long edge at most {max_size}): crop it to a less extreme aspect ratio first"
        )
    return new_h, new_w


PRECISION_BITS = 22  # PIL's fixed-point weights for 8-bit pictures (Resample.c)


def _pil_bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear resampling along one axis as taps: (size_out, K) input indices and
    their integer weights. A triangle filter widened by the downscale factor
    (antialiasing), normalised over the taps PIL takes (``int(center -+ support + 0.5)``,
    clipped to the picture), then in PIL's fixed point (times 2**22, rounded half away
    from zero); unused taps weigh 0."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    center = (np.arange(size_out) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((center + support + 0.5).astype(np.int64), size_in)
    index = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
    inside = index < hi[:, None]
    w = np.clip(1.0 - np.abs((index - center[:, None] + 0.5) / support), 0.0, None) * inside
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    fixed = np.floor(w * (1 << PRECISION_BITS) + 0.5).astype(np.int32)  # w >= 0
    return np.minimum(index, size_in - 1), fixed


def _resample(image: np.ndarray, axis: int, size: int) -> np.ndarray:
    """One pass of PIL's bilinear resize of a uint8 picture along ``axis`` (0: rows, 1:
    columns), in PIL's integer arithmetic: the weighted sum plus half a unit, shifted
    down, clipped to uint8 (exactly PIL's pixels)."""
    index, weights = _pil_bilinear_taps(image.shape[axis], size)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    # int32 holds it: the weights of an output sum to 2**22, times 255, plus 2**21.
    out = np.full(image.shape[:axis] + (size,) + image.shape[axis + 1 :], 1 << 21, np.int32)
    for k in range(index.shape[1]):  # a few taps: 2 when enlarging, ~2x the factor else
        out += np.take(image, index[:, k], axis=axis).astype(np.int32) * weights[:, k].reshape(
            shape
        )
    return np.clip(out >> PRECISION_BITS, 0, 255).astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` (H, W, C uint8) resized as PIL's bilinear resize (what Detectron2's
    ``ResizeTransform`` runs on uint8 pictures), pixel for pixel: horizontal pass, then
    vertical pass, each in PIL's fixed point."""
    if image.shape[:2] == (height, width):
        return image
    across = image if image.shape[1] == width else _resample(image, 1, width)
    return across if across.shape[0] == height else _resample(across, 0, height)


# -- masks ----------------------------------------------------------------------------------
def _sampling_matrix(centers: np.ndarray, size: int) -> np.ndarray:
    """(len(centers), size) bilinear weights of ``grid_sample(align_corners=False)`` with
    zero padding, for sampling coordinates in [-1, 1]."""
    position = ((centers + 1.0) * size - 1.0) / 2.0
    low = np.floor(position).astype(np.int64)
    frac = position - low
    matrix = np.zeros((len(centers), size), dtype=np.float32)
    for offset, weight in ((0, 1.0 - frac), (1, frac)):
        index = low + offset
        inside = (index >= 0) & (index < size)
        matrix[np.nonzero(inside)[0], index[inside]] = weight[inside]
    return matrix


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5
) -> np.ndarray:
    """(N, M, M) mask probabilities in their boxes -> (N, height, width) bool, as
    Detectron2's ``paste_masks_in_image``: each pixel centre mapped into its box, the mask
    sampled bilinearly there, then thresholded."""
    out = np.zeros((len(masks), height, width), dtype=bool)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    for i, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes)):
        gy = (ys - y0) / max(y1 - y0, 1e-12) * 2 - 1
        gx = (xs - x0) / max(x1 - x0, 1e-12) * 2 - 1
        rows, cols = _sampling_matrix(gy, mask.shape[0]), _sampling_matrix(gx, mask.shape[1])
        out[i] = rows @ mask.astype(np.float32) @ cols.T >= threshold
    return out


# -- the file -------------------------------------------------------------------------------
class Detector:
    """A whole-detector file in onnxruntime. ``detector(image_bgr)`` -> ``{"boxes": (N, 4)
    XYXY in the picture's pixels, "classes": (N,), "scores": (N,)[, "masks": (N, H, W)
    bool]}``."""

    def __init__(self, path: str, threads: int = 0, spinning: bool = True, arena: bool = True):
        ort = _require("onnxruntime")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--onnx {path!r} does not exist; tools/export_onnx.py --config-file CONFIG "
                "--output FILE.onnx MODEL.WEIGHTS CHECKPOINT writes it"
            )
        try:
            self.session = ort.InferenceSession(
                path,
                session_options(threads, spinning, arena),
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # onnxruntime's own errors: not an ONNX file, bad graph
            raise ValueError(f"onnxruntime cannot load {path!r}: {e}") from e
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("graph") != FORMAT:
            what = (
                f"qdet's network-only export (graph {meta['graph']!r}: head or backbone "
                "outputs, the post-processing left to Detectron2)"
                if meta.get("producer") == "qdet"
                else "not a qdet file"
            )
            raise ValueError(
                f"{path!r} is {what}, not a whole detector; write one with "
                "tools/export_onnx.py --config-file CONFIG --output FILE.onnx MODEL.WEIGHTS "
                "CHECKPOINT; a --network-only file holds the network alone"
            )
        self.meta = read_metadata(self.session)
        self.path = path
        self.input_format = self.meta["input_format"]
        self.min_size, self.max_size = self.meta["min_size_test"], self.meta["max_size_test"]
        self.class_names = self.meta.get("class_names", [])
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def preprocess(self, image_bgr: np.ndarray) -> np.ndarray:
        """The (3, h, w) float32 input: the file's channel order, resized."""
        image = as_bgr(image_bgr)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        if self.min_size:
            image = resize(image, *resized_shape(*image.shape[:2], self.min_size, self.max_size))
        return np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)

    def run(self, chw: np.ndarray) -> dict[str, np.ndarray]:
        """The file's outputs for one preprocessed input, by name."""
        return dict(zip(self.outputs, self.session.run(None, {self.input_name: chw})))

    def __call__(self, image_bgr: np.ndarray) -> dict[str, np.ndarray]:
        height, width = image_bgr.shape[:2]
        chw = self.preprocess(image_bgr)
        raw = self.run(chw)
        return postprocess(raw, chw.shape[1:], (height, width))


def postprocess(
    raw: dict[str, np.ndarray], input_size: tuple[int, int], size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Detectron2's ``detector_postprocess``: boxes scaled from the input's size to the
    picture's, clipped, empty ones dropped, masks pasted."""
    (in_h, in_w), (height, width) = input_size, size
    boxes = raw["pred_boxes"].astype(np.float32).reshape(-1, 4)
    boxes = boxes * np.array([width / in_w, height / in_h] * 2, dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {
        "boxes": boxes[keep],
        "classes": raw["pred_classes"].astype(np.int64)[keep],
        "scores": raw["scores"].astype(np.float32)[keep],
    }
    if "pred_masks" in raw:
        masks = raw["pred_masks"][keep][:, 0]
        out["masks"] = paste_masks(masks, out["boxes"], height, width)
    return out


# -- the command line -----------------------------------------------------------------------
def list_images(inputs: list[str]) -> list[str]:
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_TYPES)
            )
            if not found:
                raise FileNotFoundError(
                    f"--input {item!r} is a folder without images {IMAGE_TYPES}"
                )
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r}: no such file or folder")
    return files


def draw(image_bgr: np.ndarray, found: dict, class_names: list[str]) -> np.ndarray:
    """Boxes, masks (blended) and "class score" labels on a copy of the picture."""
    cv2 = _require("cv2")
    canvas = image_bgr.copy()
    palette = np.array([[56, 56, 255], [151, 157, 255], [31, 112, 255], [29, 178, 255],
                        [49, 210, 207], [10, 249, 72], [23, 204, 146], [134, 219, 61],
                        [52, 147, 26], [187, 212, 0]], dtype=np.uint8)  # fmt: skip
    for i, (box, cls, score) in enumerate(zip(found["boxes"], found["classes"], found["scores"])):
        color = palette[int(cls) % len(palette)]
        if "masks" in found:
            mask = found["masks"][i]
            canvas[mask] = (0.5 * canvas[mask] + 0.5 * color).astype(np.uint8)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), tuple(int(c) for c in color), 1)
        name = class_names[int(cls)] if int(cls) < len(class_names) else str(int(cls))
        cv2.putText(canvas, f"{name} {score:.2f}", (x0, max(y0 - 3, 8)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, tuple(int(c) for c in color), 1)  # fmt: skip
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True, help="a whole-detector file of tools/export_onnx.py")
    p.add_argument("--input", nargs="+", required=True, help="pictures or folders of them")
    p.add_argument("--output", required=True, help="folder for the drawings and detections.json")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    p.add_argument(
        "--score",
        type=float,
        default=0.5,
        help="detections drawn and written: score at least this (Detectron2's demo: 0.5)",
    )
    args = p.parse_args(argv)
    cv2 = _require("cv2")
    try:
        detector = Detector(args.onnx, args.threads)
        files = list_images(args.input)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"qdet_runner: error: {e}", file=sys.stderr)
        return 2
    inputs = {os.path.abspath(f) for f in files}
    outputs = [os.path.join(args.output, os.path.basename(f)) for f in files]
    if any(os.path.abspath(o) in inputs for o in outputs):
        print(f"qdet_runner: error: --output {args.output!r} would overwrite the input "
              "pictures: choose another folder", file=sys.stderr)  # fmt: skip
        return 2
    os.makedirs(args.output, exist_ok=True)
    results, skipped = {}, 0
    for path, out in zip(files, outputs):
        try:
            image = read_image(path)
        except ValueError as e:  # named, skipped; the rest go on
            print(f"qdet_runner: skipped: {e}", file=sys.stderr)
            skipped += 1
            continue
        found = detector(image)
        keep = found["scores"] >= args.score
        found = {k: v[keep] for k, v in found.items()}
        cv2.imwrite(out, draw(image, found, detector.class_names))
        names = detector.class_names
        results[os.path.basename(path)] = [
            {
                "box": [round(float(v), 2) for v in box],
                "class": names[c] if c < len(names) else c,
                "score": round(float(score), 4),
            }
            for box, c, score in zip(found["boxes"], found["classes"].tolist(), found["scores"])
        ]
    with open(os.path.join(args.output, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(
        f"{len(results)} picture(s) drawn in {args.output}"
        + (f", {skipped} skipped" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
