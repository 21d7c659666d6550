"""The masked-image-modelling network: sparse STU-Net encoder, densify, decoder, reconstruction loss.

``MIMModel.forward(x, mask_bg)`` encodes the visible patches sparsely (:class:`~.sparse.SparseEncoder`, the first 5
STU-Net stages, total stride 16) and reconstructs the whole input. Two decoders:

* ``"hierarchical"`` (the paper's choice, SparK's LightDecoder): for the 4 deepest scales, deepest first, *densify*
  (instance norm over active voxels, a learned mask token at inactive voxels, projection to the decoder width:
  identity / 1x1 for the deepest scale, 3x3 otherwise; the width halves per scale), then 4 upsampling blocks
  (transposed conv k4 s2 -> conv3 + BN + ReLU6 -> conv3 + BN) with the densified map of each scale added before its
  block, and a final 1x1 conv to the input channels. The reference also densifies the full-resolution stage-0
  features, which no block uses; we do not.
* ``"simple"`` (paper Table 1 ablation, after the authors' code): densify the deepest features only, then two
  blocks (transposed conv with kernel 2f, stride f = 4 per isotropic axis -> BN -> ReLU6), widths w -> w/4 -> w/16,
  and a 1x1 conv to the input channels.

Decoder widths (``SIZES[size].decoder_width``): tiny 128, S 256, B 512, L 1024, H 1536 (the width of the deepest
pretrained stage, so that the deepest projection is the identity; B and H are the reference's values).

The decoder's BatchNorm running statistics and the mask tokens are parameters / buffers, so ``copy.deepcopy`` (the
EMA teacher) and ``state_dict`` carry all state. Gradient checkpointing covers the encoder's residual blocks only:
recomputing the decoder's BatchNorm in training mode would update its running statistics twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..masking import active_maps, check_mask, patch_loss
from .sparse import SparseEncoder, masked_instance_norm
from .stunet import Stride3, STUNetSpec, check_input, get_spec, init_he, normalize_strides, total_stride

__all__ = ["DECODERS", "Densify", "LightDecoder", "MIMModel", "SimpleDecoder", "UpBlock", "build_mim", "mim_loss"]

DECODERS = ("hierarchical", "simple")


def _init_decoder(module: nn.Module) -> None:
    # the authors' LightDecoder initialisation: conv trunc-normal(0.02), transposed conv He (fan_out), BN (1, 0)
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.ConvTranspose3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d) and m.bias is not None:
            nn.init.zeros_(m.bias)


class Densify(nn.Module):
    """Norm over active voxels, mask token at inactive voxels, projection to the decoder width.

    Args:
        enc_width: channels of the encoder feature map.
        dec_width: decoder width at this scale.
        kernel: projection kernel (1 or 3); with 1 and equal widths the projection is the identity.
    """

    def __init__(self, enc_width: int, dec_width: int, kernel: int):
        super().__init__()
        self.norm = nn.InstanceNorm3d(enc_width, eps=1e-6, affine=True)
        self.mask_token = nn.Parameter(torch.zeros(1, enc_width, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        if kernel == 1 and enc_width == dec_width:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Conv3d(enc_width, dec_width, kernel, padding=kernel // 2)

    def forward(self, f_bcdhw: torch.Tensor, act_b1dhw: torch.Tensor, pooling: str) -> torch.Tensor:
        """``f`` zero at inactive voxels -> dense ``[B, dec_width, *S]``."""
        f = masked_instance_norm(f_bcdhw, act_b1dhw, self.norm, pooling)
        f = torch.where(act_b1dhw, f, self.mask_token.to(f.dtype))
        return self.proj(f)


class UpBlock(nn.Module):
    """SparK's decoder block: transposed conv (k4 s2 p1; k3 s1 p1 on axes with scale 1), conv3 + BN + ReLU6,
    conv3 + BN."""

    def __init__(self, in_channels: int, out_channels: int, scale: Stride3):
        super().__init__()
        kernel = tuple(4 if s == 2 else 3 for s in scale)
        self.up = nn.ConvTranspose3d(in_channels, in_channels, kernel, stride=tuple(scale), padding=1)
        self.conv = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
        )

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x_bcdhw))


class LightDecoder(nn.Module):
    """Hierarchical decoder over the 4 deepest encoder scales (see the module docstring).

    Args:
        enc_widths: the 5 encoder widths, shallowest first.
        width: decoder width at the deepest scale (halved per scale; must be divisible by 16).
        strides: the 5 encoder strides (3-tuples of 1 / 2; stage 0 must have stride 1).
        out_channels: reconstructed channels (= input channels).
        norm_pooling: densify norm statistics per ``"sample"`` or over the ``"batch"``.
    """

    def __init__(
        self, enc_widths: Sequence[int], width: int, strides: Sequence[Stride3], out_channels: int, norm_pooling: str
    ):
        super().__init__()
        n = len(enc_widths) - 1
        self.strides = tuple(strides)
        self.patch_size = total_stride(self.strides)
        self.norm_pooling = norm_pooling
        self.width = width
        chans = [width // 2**i for i in range(n + 1)]
        self.densify = nn.ModuleList(
            Densify(enc_widths[n - i], chans[i], 1 if i == 0 else 3) for i in range(n)
        )
        self.blocks = nn.ModuleList(UpBlock(chans[i], chans[i + 1], self.strides[n - i]) for i in range(n))
        self.head = nn.Conv3d(chans[-1], out_channels, 1)
        _init_decoder(self)

    def forward(self, feats: list[torch.Tensor], mask_bg: torch.Tensor) -> torch.Tensor:
        """Stage outputs (shallowest first) + mask -> reconstruction ``[B, out_channels, *input]``."""
        n = len(self.blocks)
        acts = active_maps(mask_bg, self.patch_size, self.strides)  # acts[k + 1]: output of stage k
        x = None
        for i, (densify, block) in enumerate(zip(self.densify, self.blocks, strict=True)):
            k = n - i
            d = densify(feats[k], acts[k + 1].unsqueeze(1), self.norm_pooling)
            x = block(d if x is None else x + d)
        return self.head(x)


def _split_factor(p: int) -> tuple[int, int]:
    f1 = 2 ** math.ceil(math.log2(p) / 2)
    return f1, p // f1


def _up_conv(c_in: int, c_out: int, factor: Sequence[int]) -> nn.ConvTranspose3d:
    kernel = tuple(2 * f if f > 1 else 3 for f in factor)
    padding = tuple(f // 2 if f > 1 else 1 for f in factor)
    return nn.ConvTranspose3d(c_in, c_out, kernel, stride=tuple(factor), padding=padding)


class SimpleDecoder(nn.Module):
    """Non-hierarchical decoder of the paper's Table 1: deepest features only, two upsampling blocks.

    Args:
        enc_widths: the 5 encoder widths, shallowest first.
        width: decoder width (divisible by 16).
        strides: the 5 encoder strides.
        out_channels: reconstructed channels.
        norm_pooling: densify norm statistics per ``"sample"`` or over the ``"batch"``.
    """

    def __init__(
        self, enc_widths: Sequence[int], width: int, strides: Sequence[Stride3], out_channels: int, norm_pooling: str
    ):
        super().__init__()
        self.strides = tuple(strides)
        self.patch_size = total_stride(self.strides)
        self.norm_pooling = norm_pooling
        self.width = width
        f1, f2 = zip(*(_split_factor(p) for p in self.patch_size), strict=True)
        self.densify = nn.ModuleList([Densify(enc_widths[-1], width, 1)])
        self.blocks = nn.ModuleList(
            nn.Sequential(_up_conv(c_in, c_out, f), nn.BatchNorm3d(c_out), nn.ReLU6(inplace=True))
            for c_in, c_out, f in ((width, width // 4, f1), (width // 4, width // 16, f2))
        )
        self.head = nn.Conv3d(width // 16, out_channels, 1)
        _init_decoder(self)

    def forward(self, feats: list[torch.Tensor], mask_bg: torch.Tensor) -> torch.Tensor:
        act_b1dhw = active_maps(mask_bg, self.patch_size, self.strides)[-1].unsqueeze(1)
        x = self.densify[0](feats[-1], act_b1dhw, self.norm_pooling)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class MIMModel(nn.Module):
    """Sparse STU-Net encoder + decoder for masked image modelling.

    Attributes:
        encoder: :class:`~.sparse.SparseEncoder` (``forward(x, mask_bg)`` -> 5 feature maps).
        decoder: :class:`LightDecoder` or :class:`SimpleDecoder`.
        patch_size: mask unit per axis (total stride of the 5 stages, (16, 16, 16) by default).
        downsample_ratio: ``patch_size`` as an int when isotropic (16), else the tuple.
    """

    def __init__(self, encoder: SparseEncoder, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.in_channels = encoder.in_channels
        self.patch_size = encoder.patch_size
        self.downsample_ratio = encoder.get_downsample_ratio()

    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Patch grid of an input spatial shape (a ``ValueError`` unless it divides evenly)."""
        spatial = tuple(spatial)
        if len(spatial) != 3 or any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise ValueError(f"spatial size {spatial} is not a multiple of the patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size, strict=True))

    def forward(self, x_bcdhw: torch.Tensor, mask_bg: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x`` from its visible patches.

        Args:
            x_bcdhw: input ``[B, C, D, H, W]``, spatial sizes multiples of ``patch_size``.
            mask_bg: bool ``[B, *grid]``, True = masked (hidden from the encoder).

        Returns:
            Reconstruction ``[B, C, D, H, W]`` (compare with per-patch normalised targets, see :func:`mim_loss`).
        """
        check_input(x_bcdhw, self.in_channels, self.patch_size, "MIMModel")
        check_mask(mask_bg, x_bcdhw, self.patch_size)
        return self.decoder(self.encoder(x_bcdhw, mask_bg), mask_bg)


def build_mim(
    size: str | STUNetSpec,
    in_channels: int = 1,
    *,
    backend: str = "masked",
    decoder: str = "hierarchical",
    norm_pooling: str = "sample",
    decoder_width: int | None = None,
    strides: Sequence[int | Sequence[int]] | None = None,
    grad_checkpointing: bool = False,
    spconv_algo: str = "auto",
    init: str = "he",
    device: torch.device | str | None = None,
) -> MIMModel:
    """Build the MIM network for an STU-Net size.

    Args:
        size: ``"tiny"``, ``"S"``, ``"B"``, ``"L"``, ``"H"`` or an :class:`~.stunet.STUNetSpec`.
        in_channels: input (and reconstructed) channels.
        backend: sparse encoder backend, ``"masked"`` or ``"spconv"``.
        decoder: ``"hierarchical"`` or ``"simple"``.
        norm_pooling: masked-norm statistics per ``"sample"`` or pooled over the ``"batch"`` (authors' code).
        decoder_width: deepest decoder width; default ``SIZES[size].decoder_width``.
        strides: 5 (or STU-Net's 6, the last ignored) per-stage strides of 1 / 2; stage 0 must have stride 1.
        grad_checkpointing: recompute the encoder's residual blocks in the backward pass.
        spconv_algo: ``"auto"``, ``"native"`` or ``"implicit_gemm"`` (see :mod:`.spconv_backend`).
        init: ``"he"``: He initialisation of the encoder (as STU-Net's segmentation network) and trunc-normal(0.02)
            densify projections; ``"reference"``: PyTorch's default initialisation of both, as the authors'
            pretraining leaves them (its encoder conv weights are about 2.4x narrower). The decoder blocks are
            initialised as SparK's light decoder in both.
        device: where to allocate (``"meta"`` works).
    """
    spec = get_spec(size)
    if strides is not None and len(strides) == len(spec.widths):
        strides = list(strides)[:5]
    strides5 = normalize_strides(strides, 5)
    if strides5[0] != (1, 1, 1) or any(s not in (1, 2) for st in strides5 for s in st):
        raise ValueError(f"MIM strides must be 1 or 2 per axis with stride 1 in stage 0, got {strides5}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if init not in ("he", "reference"):
        raise ValueError(f"init must be 'he' or 'reference', got {init!r}")
    width = spec.decoder_width if decoder_width is None else int(decoder_width)
    if width < 16 or width % 16:
        raise ValueError(f"decoder_width must be a positive multiple of 16, got {width}")
    widths5, blocks5 = spec.widths[:5], spec.blocks[:5]
    dec_cls = LightDecoder if decoder == "hierarchical" else SimpleDecoder
    with torch.device(device) if device is not None else contextlib.nullcontext():
        encoder = SparseEncoder(
            in_channels,
            widths5,
            blocks5,
            strides5,
            backend=backend,
            norm_pooling=norm_pooling,
            grad_checkpointing=grad_checkpointing,
            spconv_algo=spconv_algo,
        )
        model = MIMModel(encoder, dec_cls(widths5, width, strides5, in_channels, norm_pooling))
    if init == "he":
        init_he(model.encoder)
    else:  # PyTorch's default initialisation, also for the densify projections
        for d in model.decoder.densify:
            if isinstance(d.proj, nn.Conv3d):
                d.proj.reset_parameters()
    return model


def mim_loss(
    recon_bcdhw: torch.Tensor,
    x_bcdhw: torch.Tensor,
    mask_bg: torch.Tensor,
    *,
    normalize_ranking: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparK / AnatoMask reconstruction loss and the per-patch loss map for the teacher's ranking.

    The patch size is ``spatial // grid`` per axis (16 for the default STU-Net strides).

    Args:
        recon_bcdhw: reconstruction ``[B, C, *spatial]``.
        x_bcdhw: original input, same shape.
        mask_bg: bool ``[B, *grid]``, True = masked.
        normalize_ranking: the ranking map uses the per-patch normalised target (default, consistent with the
            loss); False uses the raw target (the authors' code).

    Returns:
        ``(loss, patch_loss_bg)``: the scalar mean over masked patches of the per-patch MSE against the per-patch
        normalised target ``(x - mean) / sqrt(var + 1e-6)``; and the per-patch MSE map ``[B, *grid]`` (float32,
        detached) over **all** patches (the caller masks out visible ones for ranking, e.g. with -inf).

    Raises:
        ValueError: shapes that do not match (naming them).
    """
    if recon_bcdhw.shape != x_bcdhw.shape:
        raise ValueError(f"reconstruction {tuple(recon_bcdhw.shape)} and input {tuple(x_bcdhw.shape)} differ in shape")
    if x_bcdhw.dim() < 3 or mask_bg.dim() != x_bcdhw.dim() - 1 or mask_bg.shape[0] != x_bcdhw.shape[0]:
        raise ValueError(f"mask {tuple(mask_bg.shape)} does not fit input {tuple(x_bcdhw.shape)}: expected [B, *grid]")
    spatial, grid = x_bcdhw.shape[2:], mask_bg.shape[1:]
    if any(g <= 0 or s % g for s, g in zip(spatial, grid, strict=True)):
        raise ValueError(f"mask grid {tuple(grid)} does not divide the input's spatial size {tuple(spatial)}")
    patch = tuple(s // g for s, g in zip(spatial, grid, strict=True))
    per_patch = patch_loss(recon_bcdhw, x_bcdhw, patch, normalize=True)
    masked = mask_bg.to(per_patch.dtype)
    loss = (per_patch * masked).sum() / masked.sum().clamp_min(1.0)
    if normalize_ranking:
        ranking = per_patch.detach()
    else:
        with torch.no_grad():
            ranking = patch_loss(recon_bcdhw, x_bcdhw, patch, normalize=False)
    return loss, ranking
