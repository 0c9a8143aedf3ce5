"""Flip consistency of a torchvision detector's dense outputs: the unsupervised term of
MGRAL's full fine-tune surrogates (capability ``self_training``)."""

from __future__ import annotations

import torch
from torch import nn


def _mirror(x: torch.Tensor) -> torch.Tensor:
    """Columns ``1..W-1`` of a ``[..., W]``-last map, mirrored to align with the original's."""
    return x[..., 1:].flip(-1)


def _levels(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Split a torchvision one-stage head output ``[N, sum(H*W*A), C]`` into per-level
    ``[N, A, C, H, W]`` maps (torchvision orders each level as H, W, A)."""
    n, total, c = flat.shape
    a = total // sum(h * w for h, w in shapes)
    out, start = [], 0
    for h, w in shapes:
        size = h * w * a
        out.append(flat[:, start : start + size].reshape(n, h, w, a, c).permute(0, 3, 4, 1, 2))
        start += size
    return out


def consistency_loss(model: nn.Module, images: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
    """Flip consistency of the dense outputs on ``images`` (and which head it used)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    x = model.transform(images)[0].tensors
    n = x.shape[0]
    features = model.backbone(torch.cat([x, x.flip(-1)]))
    maps = list(features.values()) if isinstance(features, dict) else [features]
    zero = x.new_zeros(())
    if isinstance(model, FCOS | RetinaNet):
        out = model.head(maps)
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        loss = zero
        for key, value in out.items():
            for level in _levels(value, shapes):
                orig, flip = level[:n, ..., 1:], _mirror(level[n:])
                if key == "bbox_regression":
                    if isinstance(model, FCOS):
                        flip = flip[:, :, [2, 1, 0, 3]]  # (l, t, r, b) -> (r, t, l, b)
                    else:
                        flip = flip * flip.new_tensor([-1.0, 1.0, 1.0, 1.0]).view(1, 1, 4, 1, 1)
                    loss = loss + nn.functional.smooth_l1_loss(orig, flip)
                else:
                    loss = loss + nn.functional.mse_loss(orig.sigmoid(), flip.sigmoid()) * orig.shape[2]
        return loss, type(model).__name__
    if isinstance(model, FasterRCNN):
        objectness, deltas = model.rpn.head(maps)
        loss = zero
        for obj, dlt in zip(objectness, deltas, strict=True):
            loss = loss + nn.functional.mse_loss(obj[:n, ..., 1:].sigmoid(), _mirror(obj[n:]).sigmoid())
            a = dlt.shape[1] // 4
            d = dlt.reshape(2 * n, a, 4, *dlt.shape[-2:])
            flip = _mirror(d[n:]) * d.new_tensor([-1.0, 1.0, 1.0, 1.0]).view(1, 1, 4, 1, 1)
            loss = loss + nn.functional.smooth_l1_loss(d[:n, ..., 1:], flip)
        return loss, "FasterRCNN-RPN"
    return zero, "none"
