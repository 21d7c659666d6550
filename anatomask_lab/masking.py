"""AnatoMask's masking core: random masks, reconstruction-guided masks, the masking dynamics, patch helpers and
the active (visible) voxel maps that sparse execution derives from a mask.

A mask is a boolean tensor ``mask_bg`` of shape ``[B, *grid]`` with one entry per patch (one patch = the encoder's
total downsampling, 16 voxels per axis for STU-Net); ``True`` means *masked*, i.e. hidden from the student.

Counting rules (those of the authors' code; ``docs/method.md``, section "Counting rules of the mask"):

* ``n`` grid cells, ``n_visible = round(n * (1 - gamma))`` (Python's round: halves go to the even integer),
  ``n_masked = n - n_visible``; every sample in a batch has exactly ``n_masked`` masked patches.
* AnatoMask masks ``n_top = floor(r_t * n_masked)`` highest-loss patches and fills the remaining
  ``n_masked - n_top`` uniformly at random from the other patches. (Algorithm 1 of the paper writes
  ``ceil(r_t * n)``; we follow the code, which keeps the mask ratio exactly gamma.)

Everything here is vectorised over the batch, runs on the device of its inputs, draws randomness only from the
``generator`` it is given (never from a global RNG) and performs no host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "active_maps",
    "anatomask_mask",
    "anatomical_ratio",
    "check_mask",
    "mask_counts",
    "mask_to_voxels",
    "patch_grid",
    "patch_mean",
    "patch_loss",
    "patchify",
    "random_mask",
]


# ----------------------------------------------------------------------------------------------------------------
# counts and validation
# ----------------------------------------------------------------------------------------------------------------
def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float):
        raise ValueError(f"gamma must be a number in (0, 1), got {gamma!r}")
    if not (0.0 < gamma < 1.0) or math.isnan(gamma):
        raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
    return float(gamma)


def _check_ratio(r_t: float, name: str = "r_t") -> float:
    if isinstance(r_t, bool) or not isinstance(r_t, int | float):
        raise ValueError(f"{name} must be a number in [0, 1], got {r_t!r}")
    if not (0.0 <= r_t <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {r_t}")
    return float(r_t)


def mask_counts(n: int, gamma: float, r_t: float = 0.0) -> tuple[int, int]:
    """Number of masked patches and of loss-selected ("top") patches for ``n`` grid cells.

    Args:
        n: number of patches per sample.
        gamma: masking ratio in (0, 1).
        r_t: anatomical-significance ratio in [0, 1].

    Returns:
        ``(n_masked, n_top)`` with ``n_masked = n - round(n * (1 - gamma))`` and ``n_top = floor(r_t * n_masked)``.

    Raises:
        ValueError: gamma or r_t out of range, or a gamma that masks no patch or every patch of the grid.
    """
    gamma = _check_gamma(gamma)
    r_t = _check_ratio(r_t)
    n_masked = n - round(n * (1.0 - gamma))
    if n_masked <= 0 or n_masked >= n:
        raise ValueError(
            f"gamma={gamma} masks {n_masked} of {n} patches; choose a gamma that masks at least one patch and "
            f"leaves at least one visible (grid too small for this gamma)"
        )
    # a small epsilon keeps floor(0.5 * 10) == 5 despite binary rounding of r_t * n_masked
    n_top = math.floor(r_t * n_masked + 1e-9)
    return n_masked, n_top


def _grid_tuple(grid: Sequence[int] | torch.Size) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    if len(grid) == 0 or any(g <= 0 for g in grid):
        raise ValueError(f"grid must be a non-empty sequence of positive sizes, got {grid}")
    return grid


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------
_UNSCORED = -(2**62)  # composite key of a patch that must never be chosen by loss


def _select(score_bn: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[B, N]``: the ``k`` largest entries of each row of ``score_bn``."""
    idx_bk = score_bn.topk(k, dim=1, sorted=False).indices
    return torch.zeros(score_bn.shape, dtype=torch.bool, device=score_bn.device).scatter_(1, idx_bk, True)


def _tiebroken_key(loss_bn: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exact, order-preserving int64 key of float32 losses with a random low word that breaks ties.

    The float's bit pattern, with the magnitude bits of negative numbers flipped, sorts like the float itself; it
    fills the high 33 bits and 31 random bits fill the rest, so equal losses are ordered at random and distinct
    losses keep their order exactly. NaN and -inf get the lowest key (never chosen).
    """
    bits_bn = loss_bn.view(torch.int32).long()
    ordered_bn = torch.where(bits_bn < 0, bits_bn ^ 0x7FFFFFFF, bits_bn)
    noise_bn = torch.randint(0, 2**31, loss_bn.shape, generator=generator, device=loss_bn.device)
    key_bn = (ordered_bn << 31) | noise_bn
    return key_bn.masked_fill_(torch.isnan(loss_bn) | torch.isneginf(loss_bn), _UNSCORED)


def random_mask(
    batch_size: int,
    grid: Sequence[int],
    gamma: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random patch mask with exactly the same masked count in every sample.

    Args:
        batch_size: B.
        grid: patch grid, e.g. ``(7, 7, 8)`` for a 112x112x128 input and 16-voxel patches.
        gamma: masking ratio in (0, 1).
        generator: source of randomness (its device is used when ``device`` is None).
        device: device of the result.

    Returns:
        Bool tensor ``[B, *grid]``, True = masked; each sample has ``n - round(n * (1 - gamma))`` True entries.
    """
    grid = _grid_tuple(grid)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = math.prod(grid)
    n_masked, _ = mask_counts(n, gamma)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    noise_bn = torch.rand(batch_size, n, generator=generator, device=device)
    return _select(noise_bn, n_masked).view(batch_size, *grid)


def anatomask_mask(
    patch_loss: torch.Tensor,
    gamma: float,
    r_t: float,
    *,
    generator: torch.Generator | None = None,
    order: str = "high",
) -> torch.Tensor:
    """Reconstruction-guided mask: the hardest patches plus a uniform random fill.

    Per sample, the ``floor(r_t * n_masked)`` patches with the highest loss (``order="low"``: the lowest) are masked,
    and the rest of the masked set is drawn uniformly without replacement from the remaining patches, so that the
    masked count equals :func:`random_mask`'s. Ties are broken at random. Patches whose loss is NaN or -inf (not
    scored, e.g. visible to the teacher) are never selected by loss; if a sample has fewer scored patches than
    ``n_top``, its random fill grows to keep the count exact.

    Args:
        patch_loss: float tensor ``[B, *grid]`` of per-patch reconstruction losses.
        gamma: masking ratio in (0, 1).
        r_t: anatomical-significance ratio in [0, 1] (see :func:`anatomical_ratio`); 0 gives a random mask.
        generator: source of randomness, on the device of ``patch_loss``.
        order: ``"high"`` (AnatoMask) or ``"low"`` (the low-significance ablation).

    Returns:
        Bool tensor shaped like ``patch_loss``, True = masked.
    """
    if not isinstance(patch_loss, torch.Tensor):
        raise ValueError(f"patch_loss must be a torch.Tensor [B, *grid], got {type(patch_loss).__name__}")
    if not patch_loss.is_floating_point():
        raise ValueError(f"patch_loss must be a floating-point tensor, got dtype {patch_loss.dtype}")
    if patch_loss.dim() < 2 or patch_loss.numel() == 0:
        raise ValueError(
            f"patch_loss must have shape [B, *grid] with a non-empty grid, got {tuple(patch_loss.shape)}"
        )
    if order not in ("high", "low"):
        raise ValueError(f"order must be 'high' or 'low', got {order!r}")
    b, grid = patch_loss.shape[0], patch_loss.shape[1:]
    n = math.prod(grid)
    n_masked, n_top = mask_counts(n, gamma, r_t)
    device = patch_loss.device

    loss_bn = patch_loss.detach().reshape(b, n).float()
    if order == "low":
        loss_bn = -loss_bn
        loss_bn = loss_bn.masked_fill_(torch.isposinf(loss_bn), math.nan)  # -inf was "unscored": keep it so
    top_bn = torch.zeros(b, n, dtype=torch.bool, device=device)
    if n_top > 0:
        key_bk, idx_bk = _tiebroken_key(loss_bn, generator).topk(n_top, dim=1, sorted=False)
        top_bn.scatter_(1, idx_bk, key_bk > _UNSCORED)

    # uniform random fill: the top patches score 2, all others U[0, 1); the n_masked best are the mask. A sample
    # with fewer scored patches than n_top simply gets a larger random part.
    score_bn = torch.rand(b, n, generator=generator, device=device).masked_fill_(top_bn, 2.0)
    return _select(score_bn, n_masked).view_as(patch_loss)


def anatomical_ratio(epoch: float, total_epochs: float, r0: float = 0.0, rT: float = 0.5, *,
                     schedule: str = "paper") -> float:
    """Masking dynamics r_t (paper Eq. 3).

    ``schedule="paper"``: ``r0 + (epoch / total_epochs) * (rT - r0)``, r0 at the first epoch.
    ``schedule="reference"``: the authors' code, ``r0 + (epoch + 1) / (total_epochs - 1) * (rT - r0)``, one epoch
    ahead, reaching rT one epoch before the end and passing it in the last one (by rT / (T - 1); clipped to [0, 1]).

    Easy-to-hard (the paper's choice) is ``r0=0, rT=0.5``; the hard-to-easy ablation is ``r0=0.5, rT=0``.
    Fractional epochs give a per-iteration schedule.

    Raises:
        ValueError: total_epochs <= 0 (< 2 for "reference"), epoch outside [0, total_epochs], r0 / rT outside
            [0, 1], or an unknown schedule.
    """
    if not total_epochs > 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    if not (0 <= epoch <= total_epochs):
        raise ValueError(f"epoch must lie in [0, total_epochs={total_epochs}], got {epoch}")
    r0 = _check_ratio(r0, "r0")
    rT = _check_ratio(rT, "rT")
    if schedule == "paper":
        return r0 + (epoch / total_epochs) * (rT - r0)
    if schedule == "reference":
        if total_epochs < 2:
            raise ValueError(f"the reference r_t schedule needs at least 2 epochs, got {total_epochs}")
        return min(max(r0 + (epoch + 1) / (total_epochs - 1) * (rT - r0), 0.0), 1.0)
    raise ValueError(f"schedule must be 'paper' or 'reference', got {schedule!r}")


# ----------------------------------------------------------------------------------------------------------------
# patch <-> voxel helpers
# ----------------------------------------------------------------------------------------------------------------
def _patch_tuple(patch_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(patch_size, int):
        return (patch_size,) * ndim
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != ndim:
        raise ValueError(f"patch_size {patch_size} has {len(patch_size)} entries, expected {ndim}")
    return patch_size


def patch_grid(spatial: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """Patch grid of a spatial shape, e.g. ``(112, 112, 128)`` with 16 -> ``(7, 7, 8)``.

    Raises:
        ValueError: a spatial size that is not a multiple of the patch size.
    """
    spatial = tuple(int(s) for s in spatial)
    patch = _patch_tuple(patch_size, len(spatial))
    if any(p <= 0 for p in patch) or any(s % p for s, p in zip(spatial, patch, strict=True)):
        raise ValueError(f"spatial size {spatial} is not a multiple of the patch size {patch}")
    return tuple(s // p for s, p in zip(spatial, patch, strict=True))


def mask_to_voxels(mask_bg: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Upsample a patch mask ``[B, *grid]`` to voxel resolution ``[B, *(grid * patch_size)]`` (nearest)."""
    patch = _patch_tuple(patch_size, mask_bg.dim() - 1)
    out = mask_bg
    for axis, p in enumerate(patch, start=1):
        out = out.repeat_interleave(p, dim=axis)
    return out


def patchify(x_bc: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Cut ``[B, C, *spatial]`` into patches: ``[B, *grid, C * prod(patch_size)]``."""
    b, c, spatial = x_bc.shape[0], x_bc.shape[1], x_bc.shape[2:]
    grid = patch_grid(spatial, patch_size)
    patch = _patch_tuple(patch_size, len(spatial))
    shape = [b, c]
    for g, p in zip(grid, patch, strict=True):
        shape += [g, p]
    x = x_bc.reshape(shape)
    nd = len(spatial)
    # [B, C, g0, p0, g1, p1, ...] -> [B, g0, g1, ..., C, p0, p1, ...]
    perm = [0] + [2 + 2 * i for i in range(nd)] + [1] + [3 + 2 * i for i in range(nd)]
    return x.permute(perm).reshape(b, *grid, c * math.prod(patch))


def patch_mean(err_bc: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Mean of a voxel-wise map ``[B, C, *spatial]`` over each patch's voxels and channels: ``[B, *grid]``.

    A map without a channel axis (``[B, *spatial]``) is passed as ``err.unsqueeze(1)``.
    """
    if err_bc.dim() < 3:
        raise ValueError(f"expected [B, C, *spatial], got {tuple(err_bc.shape)}")
    return patchify(err_bc, patch_size).mean(dim=-1)


def patch_loss(
    pred_bc: torch.Tensor,
    target_bc: torch.Tensor,
    patch_size: int | Sequence[int],
    *,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-patch mean squared error ``[B, *grid]`` between a reconstruction and its target.

    Args:
        pred_bc: reconstruction ``[B, C, *spatial]``.
        target_bc: original input ``[B, C, *spatial]``.
        patch_size: voxels per patch along each axis.
        normalize: compare against the per-patch normalised target ``(x - mean) / sqrt(var + eps)`` over the
            patch's voxels (and channels), as the MIM loss does; False uses the raw target (the authors' ranking).
        eps: variance floor of the normalisation.
    """
    if pred_bc.shape != target_bc.shape:
        raise ValueError(
            f"prediction {tuple(pred_bc.shape)} and target {tuple(target_bc.shape)} differ in shape"
        )
    pred_bgp = patchify(pred_bc, patch_size).float()
    target_bgp = patchify(target_bc, patch_size).float()
    if normalize:
        mean = target_bgp.mean(dim=-1, keepdim=True)
        var = target_bgp.var(dim=-1, keepdim=True)  # unbiased, as SparK's normalisation
        target_bgp = (target_bgp - mean) / torch.sqrt(var + eps)
    return (pred_bgp - target_bgp).pow(2).mean(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# masks for sparse execution
# ----------------------------------------------------------------------------------------------------------------
def check_mask(mask_bg: torch.Tensor, x_bcdhw: torch.Tensor, patch: Sequence[int]) -> tuple[int, ...]:
    """Check that a patch mask fits an input; returns the patch grid.

    Args:
        mask_bg: the mask, expected bool ``[B, *grid]`` (True = masked).
        x_bcdhw: the input ``[B, C, *spatial]`` it masks.
        patch: voxels per patch along each spatial axis, so that ``grid = spatial // patch``.

    Returns:
        The grid ``spatial // patch`` as a tuple.

    Raises:
        ValueError: naming the shapes, for a non-bool mask or a grid / batch that does not match the input.
    """
    grid = tuple(s // p for s, p in zip(x_bcdhw.shape[2:], patch, strict=True))
    if not isinstance(mask_bg, torch.Tensor) or mask_bg.dtype != torch.bool:
        got = mask_bg.dtype if isinstance(mask_bg, torch.Tensor) else type(mask_bg).__name__
        raise ValueError(f"mask must be a bool tensor [B, *grid], got {got}")
    if tuple(mask_bg.shape) != (x_bcdhw.shape[0], *grid):
        raise ValueError(
            f"mask of shape {tuple(mask_bg.shape)} does not match input {tuple(x_bcdhw.shape)}: expected "
            f"{(x_bcdhw.shape[0], *grid)} (grid = spatial // patch {tuple(patch)})"
        )
    return grid


def active_maps(
    mask_bg: torch.Tensor, patch: Sequence[int], strides: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Active (visible) voxels at the input resolution and after every encoder stage.

    At cumulative stride ``s`` a patch covers ``patch // s`` voxels per axis, so the active map there is
    ``mask_to_voxels(~mask_bg, patch // s)``. With ``grid * patch`` the input's spatial size, map ``k`` has the
    spatial size of stage ``k - 1``'s output.

    Args:
        mask_bg: bool ``[B, *grid]``, True = masked.
        patch: voxels per patch along each axis (the product of ``strides``, per axis).
        strides: per-stage strides, each a tuple with one int per axis.

    Returns:
        ``len(strides) + 1`` bool maps ``[B, *S_k]``: ``S_0 = grid * patch`` (the input), then ``S_k = S_{k-1} //
        strides[k-1]``; True = active (visible).
    """
    visible_bg = ~mask_bg
    maps, cum = [], (1,) * len(patch)
    for stride in [(1,) * len(patch), *strides]:
        cum = tuple(c * s for c, s in zip(cum, stride, strict=True))
        maps.append(mask_to_voxels(visible_bg, tuple(p // c for p, c in zip(patch, cum, strict=True))))
    return maps
