"""Sliding-window prediction with Gaussian importance weighting, mirror test-time augmentation and batched windows.

The class-probability sums of the whole volume (``[K, D, H, W]`` float32, plus one ``[D, H, W]`` weight sum) live
on the network's device by default, or on the CPU (``accumulate="cpu"``): with 100+ classes those buffers, not the
network, are what fills a GPU (118 classes x 256 x 256 x 300 voxels take 9.3 GB in float32), so CPU accumulation
lets a TotalSegmentator-size volume be predicted on a 24 GB card. Only one batch of weighted window probabilities
then crosses to the host per step. Accumulation stays float32 either way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["ACCUMULATE", "accumulator_device", "gaussian_importance", "sliding_window_predict", "window_starts"]

ACCUMULATE: tuple[str, ...] = ("device", "cpu")  # where the class-probability sums live


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Importance map ``[*patch_size]``: a Gaussian centred on the window (sigma = size * sigma_scale), max 1.

    Values are floored at the smallest non-zero value so that every voxel of a window counts.
    """
    axes = []
    for size in patch_size:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        sigma = max(size * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    g = axes[0]
    for a in axes[1:]:
        g = g[..., None] * a
    g = g / g.max()
    return g.clamp_min(g[g > 0].min()).float()


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``window`` voxels covering ``size`` voxels with at least ``overlap`` overlap."""
    if window >= size:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((size - window) / step) + 1
    spacing = (size - window) / (n - 1) if n > 1 else 0
    return sorted({round(i * spacing) for i in range(n)})


def accumulator_device(device: torch.device | str, accumulate: str = "device") -> torch.device:
    """Where :func:`sliding_window_predict` keeps its probability sums: the network's ``device`` or the CPU.

    Raises:
        ValueError: ``accumulate`` is not one of :data:`ACCUMULATE`.
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE)}, not {accumulate!r}")
    return torch.device("cpu") if accumulate == "cpu" else torch.device(device)


@torch.no_grad()
def sliding_window_predict(
    model: nn.Module,
    image_cdhw: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    *,
    overlap: float = 0.5,
    mirror: bool = False,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    accumulate: str = "device",
) -> torch.Tensor:
    """Softmax probabilities ``[K, D, H, W]`` (on the CPU) of a whole volume.

    Windows of ``patch_size`` overlap by ``overlap`` (0.5 default); each window's softmax output is weighted by a
    Gaussian importance map and the weighted sum is normalised. Volumes smaller than the window are zero-padded.
    With ``mirror=True`` each window is also predicted flipped along every combination of axes (8 passes) and the
    results are averaged (test-time augmentation).

    Args:
        model: network in eval mode returning logits ``[B, K, *patch]`` (or a list whose first item is those).
        image_cdhw: preprocessed image ``[C, D, H, W]``.
        patch_size: window size.
        num_classes: K.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        mirror: mirror test-time augmentation.
        batch_size: windows per forward pass.
        device: where the network runs.
        amp_dtype: autocast dtype on CUDA (None = fp32).
        accumulate: ``"device"`` keeps the ``[K, D, H, W]`` float32 sums beside the network; ``"cpu"`` keeps them in
            host memory (for many classes on a small GPU). Both give the same result.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if isinstance(image_cdhw, torch.Tensor):
        image = image_cdhw.detach().float().cpu()
    else:
        image = torch.from_numpy(np.array(image_cdhw, dtype=np.float32))  # a copy: memmaps are read-only
    if image.dim() != 4:
        raise ValueError(f"image must be [C, D, H, W], got shape {tuple(image.shape)}")
    device = torch.device(device)
    acc_device = accumulator_device(device, accumulate)
    spatial = tuple(image.shape[1:])
    pad = [max(p - s, 0) for p, s in zip(patch_size, spatial, strict=True)]
    padded = torch.nn.functional.pad(image, [v for p in reversed(pad) for v in (p // 2, p - p // 2)])
    pspatial = tuple(padded.shape[1:])
    weight = gaussian_importance(patch_size).to(device)
    acc_weight = weight.to(acc_device)
    acc = torch.zeros((num_classes, *pspatial), dtype=torch.float32, device=acc_device)
    norm = torch.zeros(pspatial, dtype=torch.float32, device=acc_device)
    starts = itertools.product(*(window_starts(s, p, overlap) for s, p in zip(pspatial, patch_size, strict=True)))
    slices = [tuple(slice(s, s + p) for s, p in zip(st, patch_size, strict=True)) for st in starts]
    flips = [()] + ([f for r in range(1, 4) for f in itertools.combinations((2, 3, 4), r)] if mirror else [])
    for i in range(0, len(slices), batch_size):
        chunk = slices[i : i + batch_size]
        x = torch.stack([padded[(slice(None), *sl)] for sl in chunk]).to(device)
        prob = torch.zeros((len(chunk), num_classes, *patch_size), device=device)
        for axes in flips:
            xin = x.flip(axes) if axes else x
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(xin)
            logits = out[0] if isinstance(out, list | tuple) else out
            p = torch.softmax(logits.float(), dim=1)
            prob += p.flip(axes) if axes else p
        prob /= len(flips)
        prob = (prob * weight).to(acc_device)
        for j, sl in enumerate(chunk):
            acc[(slice(None), *sl)] += prob[j]
            norm[sl] += acc_weight
    acc /= norm
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial, strict=True))
    return acc[(slice(None), *crop)].cpu()
