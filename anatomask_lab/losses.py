"""Segmentation losses: soft Dice + cross-entropy with nnU-Net-style deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["deep_supervision_weights", "dice_ce_loss", "soft_dice_loss", "deep_supervision_loss"]


def soft_dice_loss(logits_bk: torch.Tensor, target_b: torch.Tensor, *, smooth: float = 1e-5,
                   batch_dice: bool = True) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (background excluded).

    With ``batch_dice`` (nnU-Net's choice for 3D full-resolution training) the sums run over the batch and space,
    so that a class absent from one patch does not dominate; otherwise Dice is computed per sample and averaged.

    Args:
        logits_bk: ``[B, K, *spatial]``.
        target_b: integer labels ``[B, *spatial]`` in [0, K).
    """
    k = logits_bk.shape[1]
    prob = torch.softmax(logits_bk.float(), dim=1)
    onehot = F.one_hot(target_b.long(), k).movedim(-1, 1).float()
    dims = (0, *range(2, prob.dim())) if batch_dice else tuple(range(2, prob.dim()))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    return 1.0 - dice[..., 1:].mean()


def dice_ce_loss(logits_bk: torch.Tensor, target_b: torch.Tensor) -> torch.Tensor:
    """Soft Dice (foreground) + cross-entropy, equally weighted, as nnU-Net trains."""
    return soft_dice_loss(logits_bk, target_b) + F.cross_entropy(logits_bk.float(), target_b.long())


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights: 1, 1/2, 1/4, ... from the highest resolution; the lowest resolution gets 0; sum 1."""
    w = [1.0 / 2**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def deep_supervision_loss(outputs: Sequence[torch.Tensor], target_b: torch.Tensor) -> torch.Tensor:
    """Weighted Dice+CE over deep-supervision outputs (highest resolution first).

    The target is downsampled to each output's size by nearest-neighbour selection.
    """
    total = outputs[0].new_zeros(())
    for w, out in zip(deep_supervision_weights(len(outputs)), outputs, strict=True):
        if w == 0.0:
            continue
        t = target_b
        if out.shape[2:] != target_b.shape[1:]:
            t = F.interpolate(target_b[:, None].float(), size=out.shape[2:], mode="nearest")[:, 0].long()
        total = total + w * dice_ce_loss(out, t)
    return total
