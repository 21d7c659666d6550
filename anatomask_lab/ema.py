"""The EMA teacher: creation, momentum update and the momentum schedule.

theta_T <- m * theta_T + (1 - m) * theta_S after every optimiser step (paper Eq. 1), over parameters *and* buffers
(norm running statistics), as the reference does. Integer buffers (e.g. ``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["make_teacher", "momentum_at", "update_momentum"]


def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of ``student`` in eval mode whose parameters never require gradients."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_momentum(model: nn.Module, ema_model: nn.Module, m: float) -> None:
    """In place: every floating state entry of ``ema_model`` becomes ``m * ema + (1 - m) * model``.

    Args:
        model: the student (its DDP wrapper is unwrapped by the caller).
        ema_model: the teacher, same architecture.
        m: momentum in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must lie in [0, 1], got {m}")
    ema_float, src_float = [], []
    for (name, ema), (src_name, src) in zip(_state_items(ema_model), _state_items(model), strict=True):
        if name != src_name:
            raise ValueError(f"teacher and student differ: {name!r} vs {src_name!r}")
        if ema.is_floating_point():
            ema_float.append(ema)
            src_float.append(src.detach())
        else:
            ema.copy_(src)
    if ema_float:
        torch._foreach_lerp_(ema_float, src_float, 1.0 - m)


def _state_items(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def momentum_at(progress: float, m0: float = 0.999, m1: float = 0.9999, warmup: float = 0.25) -> float:
    """Teacher momentum: linear from ``m0`` to ``m1`` over the first ``warmup`` share of training, then ``m1``.

    The reference rises from 0.999 to 0.9999 over the first 250 of 1000 epochs.

    Args:
        progress: training progress in [0, 1] (step / total steps).
        m0, m1: momentum at the start and after the ramp.
        warmup: share of training over which the momentum ramps (0 = constant ``m1``).
    """
    if warmup <= 0 or progress >= warmup:
        return m1
    return m0 + (m1 - m0) * max(progress, 0.0) / warmup
