"""Batch augmentation on the training device: random rotation and scaling (nnU-Net style, optional).

Crops, flips and foreground oversampling happen in the data loader (:mod:`anatomask_lab.data.sampler`); this adds
the spatial transform that is cheaper on the GPU than in worker processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_rotate_scale", "rotation_matrices"]


def rotation_matrices(angles_b3: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[B, 3, 3]`` from angles ``[B, 3]`` (radians) about the three axes, applied x, y, z."""
    c, s = torch.cos(angles_b3), torch.sin(angles_b3)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def random_rotate_scale(
    image_bc: torch.Tensor,
    label_b: torch.Tensor,
    *,
    p: float = 0.2,
    max_degrees: float = 30.0,
    scale: tuple[float, float] = (0.7, 1.4),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (up to ``max_degrees`` about each axis) and scale each sample with probability ``p``.

    Images are resampled trilinearly, labels by nearest neighbour; outside the volume images get 0 (the mean of a
    z-scored image) and labels background. Samples that are not drawn are returned unchanged.

    Args:
        image_bc: ``[B, C, D, H, W]``.
        label_b: ``[B, D, H, W]`` integer labels.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    b, device = image_bc.shape[0], image_bc.device
    draw = torch.rand(b, 7, generator=generator, device=device)
    apply_b = draw[:, 0] < p
    angles = (draw[:, 1:4] * 2 - 1) * math.radians(max_degrees)
    zoom = scale[0] + draw[:, 4] * (scale[1] - scale[0])
    mat = rotation_matrices(angles) / zoom[:, None, None]  # sampling grid: zoom > 1 magnifies
    eye = torch.eye(3, device=device).expand(b, 3, 3)
    mat = torch.where(apply_b[:, None, None], mat, eye)
    theta = torch.cat([mat, torch.zeros(b, 3, 1, device=device)], dim=2).to(image_bc.dtype)
    grid = F.affine_grid(theta, list(image_bc.shape), align_corners=False)
    image = F.grid_sample(image_bc, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    label = F.grid_sample(label_b[:, None].to(image_bc.dtype), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].round().to(label_b.dtype)
    keep = ~apply_b
    image = torch.where(keep[:, None, None, None, None], image_bc, image)
    label = torch.where(keep[:, None, None, None], label_b, label)
    return image, label
