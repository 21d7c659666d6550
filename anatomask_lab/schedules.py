"""Learning-rate schedules as pure functions of the step (per iteration), pinned by tests."""

from __future__ import annotations

import math

__all__ = ["cosine_lr", "poly_lr", "warmup_cosine_lr"]


def cosine_lr(step: int, total_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    """Cosine decay from ``base_lr`` at step 0 to ``final_lr`` at ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t))


def warmup_cosine_lr(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    warmup_lr: float = 1e-6,
    final_lr: float = 0.0,
) -> float:
    """Linear warm-up from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then cosine to ``final_lr``.

    This is the pretraining recipe of the reference (20 warm-up epochs from 1e-6, then cosine to 0).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    return cosine_lr(step - warmup_steps, max(total_steps - warmup_steps, 1), base_lr, final_lr)


def poly_lr(step: int, total_steps: int, base_lr: float, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay ``base_lr * (1 - step / total_steps) ** exponent`` (0 at ``total_steps``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    return base_lr * (1.0 - t) ** exponent
