#!/usr/bin/env python
"""Convert an MAE ViT or an official Swin checkpoint to a Detectron2 checkpoint for qdet.

    python tools/convert_pretrained_transformer.py --arch vit \\
        mae_pretrain_vit_base.pth output/pretrained/mae_pretrain_vit_base_d2.pth
    python tools/convert_pretrained_transformer.py --arch swin \\
        swin_base_patch4_window7_224_22k.pth \\
        output/pretrained/swin_base_patch4_window7_224_22k_d2.pth

Inputs are the files Detectron2's ViTDet project starts from: MAE's ViT-B
(``mae_pretrain_vit_base.pth``, from the MAE repository) and Microsoft's ImageNet-21k
Swin-B (``swin_base_patch4_window7_224_22k.pth``); get them where you have internet
access, qdet never downloads. Their block names already are Detectron2's (``blocks.3.attn
.qkv``, ``layers.2.blocks.5.mlp.fc1``): the conversion prefixes them with the backbone's
path in qdet's models (``backbone.net.`` for ViTDet, ``backbone.bottom_up.`` for Swin
+ FPN) and drops what the detector does not have (class token, final norm, classifier,
MAE's decoder, Swin's attention masks and index buffers). The output is a Detectron2
checkpoint {"model": name -> tensor} for ``MODEL.WEIGHTS``.
"""

from __future__ import annotations

import argparse
import os

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
import torch

PREFIX = {"vit": "backbone.net.", "swin": "backbone.bottom_up."}
# Kept keys, by the pretrained model's names.
KEEP = {
    "vit": ("pos_embed", "patch_embed.", "blocks."),
    "swin": ("patch_embed.", "layers.", "absolute_pos_embed"),
}
# Buffers the detector recomputes, or that only classification / MAE pretraining has.
DROP_SUFFIX = ("attn_mask", "relative_position_index")


def convert(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Detectron2 names (qdet's backbone prefix) for the backbone tensors of ``state``."""
    if arch not in PREFIX:
        raise ValueError(f"--arch {arch!r}: choose from {list(PREFIX)}")
    out = {}
    for name, tensor in state.items():
        if name.startswith(KEEP[arch]) and not name.endswith(DROP_SUFFIX):
            out[PREFIX[arch] + name] = tensor
    if not any(".blocks." in k for k in out):
        raise ValueError(
            f"no transformer blocks found for --arch {arch}: is this a {arch} checkpoint? "
            f"first keys: {list(state)[:5]}"
        )
    return out


def load_state(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input checkpoint {path!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # MAE and Swin wrap theirs in "model"
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(PREFIX))
    parser.add_argument("input", help="MAE ViT or official Swin .pth")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    args = parser.parse_args()
    model = convert(load_state(args.input), args.arch)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    torch.save({"model": model, "__author__": "qdet convert_pretrained_transformer"}, tmp)
    os.replace(tmp, args.output)
    print(f"wrote {len(model)} tensors to {args.output}")


if __name__ == "__main__":
    main()
