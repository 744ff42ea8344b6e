#!/usr/bin/env python
"""Convert a torchvision ResNet checkpoint to Detectron2's format (for R18/R34 backbones).

    python tools/convert_torchvision_to_d2.py resnet18-f37072fd.pth output/pretrained/R-18.pkl

Get the input file where you have internet access, e.g.
``torchvision.models.resnet18(
weights="IMAGENET1K_V1").state_dict()`` saved with ``torch.save``; qdet never downloads.
The output is a pickle {"model": name -> ndarray, "matching_heuristics": True} that
``MODEL.WEIGHTS`` accepts; Detectron2's checkpointer then matches ``res2.0.conv1.weight``
to ``backbone.bottom_up.res2.0.conv1.weight``. torchvision's ResNets take RGB input
normalised by ImageNet mean/std: the R18/R34 configs set INPUT.FORMAT and PIXEL_MEAN/STD.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
import torch

# torchvision name -> Detectron2 name, applied in order.
RENAMES = (
    (r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}"),
    (r"\.bn(\d)\.", lambda m: f".conv{m.group(1)}.norm."),
    (r"\.downsample\.0\.", lambda m: ".shortcut."),
    (r"\.downsample\.1\.", lambda m: ".shortcut.norm."),
    (r"^conv1\.", lambda m: "stem.conv1."),
    (r"^bn1\.", lambda m: "stem.conv1.norm."),
)


def convert_name(name: str) -> str | None:
    """Detectron2's name for a torchvision ResNet parameter; None for the classifier."""
    if name.startswith("fc."):
        return None
    for pattern, repl in RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def convert(state: dict[str, torch.Tensor]) -> dict:
    model = {}
    for name, value in state.items():
        new = convert_name(name)
        if new is not None and not name.endswith("num_batches_tracked"):
            model[new] = value.detach().cpu().numpy()
    if not any(k.startswith("res2.") for k in model):
        raise ValueError("no layer1.* keys: this does not look like a torchvision ResNet")
    return {"model": model, "__author__": "torchvision", "matching_heuristics": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="torchvision ResNet state dict (.pth)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    args = parser.parse_args()
    if not os.path.isfile(args.input):
        raise SystemExit(f"error: {args.input} does not exist")
    state = torch.load(args.input, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    out = convert(state)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "wb") as f:
        pickle.dump(out, f)
    print(f"wrote {len(out['model'])} tensors to {args.output}")


if __name__ == "__main__":
    main()
