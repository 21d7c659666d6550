"""STU-Net (Huang et al. 2023): a scalable residual U-Net for 3D segmentation, sizes tiny / S / B / L / H.

Architecture facts (``docs/method.md``, section "STU-Net"):

* 6 encoder stages; stage 0 has stride 1, stages 1-5 stride 2 (total 32); kernels 3; every stage is
  ``blocks`` residual blocks ``conv3 (stride s) -> InstanceNorm -> LeakyReLU -> conv3 -> InstanceNorm (+ shortcut)
  -> LeakyReLU``. The first block of every stage (and of every decoder stage) has a 1x1 strided projection
  shortcut ``conv3``; convolutions have biases.
* Decoder: per scale, nearest upsampling + 1x1 conv, concatenation with the skip, residual blocks (2C -> C); a 1x1
  segmentation head at each of the 5 decoder scales (deep supervision).

With these rules the parameter counts at ``in_channels=1, num_classes=105`` are S 14.60M, B 58.26M, L 440.30M and
H 1457.33M, as in STU-Net's table. Block key names (``conv1/norm1/conv2/norm2/conv3``) are STU-Net's own.

The ``tiny`` size (widths 8-16-32-64-128-128, one block per stage, decoder width 128) is ours, for CPU teaching
runs: 3.67M parameters as a 105-class STU-Net, 3.32M as an MIM model (most of them in the deep, low-resolution
stages), and a pretraining step on two 64^3 patches takes about a second on 2 CPU cores.

The encoder is the submodule ``encoder`` (``STUNetEncoder``); the MIM model's sparse encoder subclasses it, so
``stunet.encoder.load_state_dict(mim.encoder.state_dict(), strict=False)`` loads the pretrained stages by key (the
6th stage exists only here). :func:`load_encoder_weights` also adapts the first convolution to another number of
input channels. STU-Net's own checkpoints (its key names, nnU-Net's axis order) are read and written by
:mod:`anatomask_lab.stunet_weights`.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SIZES",
    "EncoderLoadReport",
    "ResBlock",
    "STUNet",
    "STUNetDecoder",
    "STUNetEncoder",
    "STUNetSpec",
    "adapt_in_channels",
    "fit_input_channels",
    "build_stunet",
    "encoder_keys",
    "init_he",
    "load_encoder_weights",
    "normalize_strides",
    "size_name",
]

Stride3 = tuple[int, int, int]


@dataclass(frozen=True)
class STUNetSpec:
    """Widths and depths of one STU-Net size.

    Attributes:
        widths: channels of the 6 encoder stages.
        blocks: residual blocks per stage (encoder and decoder alike).
        decoder_width: width of the MIM decoder at its deepest scale (halved per scale); equal to the width of the
            deepest pretrained stage, so that the deepest densify projection is the identity (SparK's rule).
    """

    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    decoder_width: int


SIZES: Mapping[str, STUNetSpec] = types.MappingProxyType(
    {
        "tiny": STUNetSpec((8, 16, 32, 64, 128, 128), (1,) * 6, 128),
        "S": STUNetSpec((16, 32, 64, 128, 256, 256), (1,) * 6, 256),
        "B": STUNetSpec((32, 64, 128, 256, 512, 512), (1,) * 6, 512),
        "L": STUNetSpec((64, 128, 256, 512, 1024, 1024), (2,) * 6, 1024),
        "H": STUNetSpec((96, 192, 384, 768, 1536, 1536), (3,) * 6, 1536),
    }
)

DEFAULT_STRIDES: tuple[int, ...] = (1, 2, 2, 2, 2, 2)


def size_name(widths: Sequence[int], blocks: Sequence[int]) -> str | None:
    """The name of the size with these encoder widths and blocks per stage (``"B"`` ...), or None."""
    for name, spec in SIZES.items():
        if tuple(spec.widths) == tuple(widths) and tuple(spec.blocks) == tuple(blocks):
            return name
    return None


def get_spec(size: str | STUNetSpec) -> STUNetSpec:
    """The :class:`STUNetSpec` of a size name (``tiny``, ``S``, ``B``, ``L``, ``H``) or a spec itself."""
    if isinstance(size, STUNetSpec):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown STU-Net size {size!r}; choose one of {sorted(SIZES)} or pass an STUNetSpec")
    return SIZES[size]


def normalize_strides(strides: Sequence[int | Sequence[int]] | None, n_stages: int) -> tuple[Stride3, ...]:
    """Per-stage strides as 3-tuples; ``None`` gives STU-Net's default (1, 2, 2, ...).

    Raises:
        ValueError: wrong number of stages or a stride that is not a positive int / 3-tuple of positive ints.
    """
    if strides is None:
        strides = DEFAULT_STRIDES[:n_stages]
    strides = list(strides)
    if len(strides) != n_stages:
        raise ValueError(f"expected {n_stages} per-stage strides, got {len(strides)}: {strides}")
    out = []
    for s in strides:
        s3 = (int(s),) * 3 if isinstance(s, int) else tuple(int(v) for v in s)
        if len(s3) != 3 or any(v < 1 for v in s3):
            raise ValueError(f"a stride must be a positive int or a 3-tuple of positive ints, got {s!r}")
        out.append(s3)
    return tuple(out)


def total_stride(strides: Sequence[Stride3]) -> Stride3:
    """Product of the per-stage strides, per axis."""
    return tuple(math.prod(s[a] for s in strides) for a in range(3))


def check_input(x: torch.Tensor, in_channels: int, multiple: Sequence[int], what: str) -> None:
    """Raise a ``ValueError`` naming the shapes unless ``x`` is ``[B, in_channels, *spatial]`` with spatial sizes
    that are multiples of ``multiple``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} expects input [B, C, D, H, W], got {shape}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{what} expects {in_channels} input channel(s), got input of shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s % m for s, m in zip(spatial, multiple, strict=True)):
        raise ValueError(
            f"{what}: spatial size {spatial} of input {tuple(x.shape)} is not a multiple of the total stride "
            f"{tuple(multiple)}"
        )


def init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's He initialisation: conv weights ``kaiming_normal_(a=neg_slope)``, biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResBlock(nn.Module):
    """STU-Net residual block (dense execution).

    ``y = act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))`` with ``conv1`` strided and ``shortcut`` the 1x1
    strided ``conv3`` when present (identity otherwise).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of ``conv1`` and ``conv3``.
        projection: build the 1x1 projection shortcut ``conv3`` (required when channels or stride change).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Stride3 = (1, 1, 1), projection: bool = False):
        super().__init__()
        if not projection and (in_channels != out_channels or tuple(stride) != (1, 1, 1)):
            raise ValueError("a block that changes channels or stride needs the projection shortcut")
        self.stride = tuple(stride)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=self.stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=self.stride) if projection else None

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.norm1(self.conv1(x_bcdhw)), 1e-2)
        y = self.norm2(self.conv2(y))
        shortcut = self.conv3(x_bcdhw) if self.conv3 is not None else x_bcdhw
        return F.leaky_relu(y + shortcut, 1e-2)


def _run_blocks(blocks: nn.Sequential, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    return x


class STUNetEncoder(nn.Module):
    """STU-Net encoder: ``stages[i]`` is an ``nn.Sequential`` of :class:`ResBlock` s.

    Args:
        in_channels: input channels.
        widths: channels per stage.
        blocks: residual blocks per stage.
        strides: per-stage strides (3-tuples, see :func:`normalize_strides`).
        grad_checkpointing: recompute each block in the backward pass (saves activation memory).
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        strides: Sequence[Stride3],
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if not (len(widths) == len(blocks) == len(strides)):
            raise ValueError(f"widths {widths}, blocks {blocks} and strides {strides} must have equal lengths")
        self.in_channels = int(in_channels)
        self.widths = tuple(int(w) for w in widths)
        self.strides = tuple(tuple(s) for s in strides)
        self.grad_checkpointing = grad_checkpointing
        self.stages = nn.ModuleList()
        c_in = in_channels
        for width, depth, stride in zip(self.widths, blocks, self.strides, strict=True):
            stage = [ResBlock(c_in, width, stride, projection=True)]
            stage += [ResBlock(width, width) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*stage))
            c_in = width

    def get_downsample_ratio(self) -> int | Stride3:
        """Total stride: an int when isotropic, else a per-axis tuple."""
        ratio = total_stride(self.strides)
        return ratio[0] if len(set(ratio)) == 1 else ratio

    def get_feature_map_channels(self) -> list[int]:
        """Channels of the feature map of every stage, shallowest first."""
        return list(self.widths)

    def forward(self, x_bcdhw: torch.Tensor) -> list[torch.Tensor]:
        """Dense forward. Returns the output of every stage, shallowest first."""
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        feats = []
        for stage in self.stages:
            x_bcdhw = _run_blocks(stage, x_bcdhw, use_ckpt)
            feats.append(x_bcdhw)
        return feats


class UpsampleLayer(nn.Module):
    """Nearest upsampling by ``scale`` and a 1x1 conv (computed before the upsampling, which gives the same result
    with 1/prod(scale) of the work)."""

    def __init__(self, in_channels: int, out_channels: int, scale: Stride3):
        super().__init__()
        self.scale = tuple(scale)
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        x_bcdhw = self.conv(x_bcdhw)
        if self.scale == (1, 1, 1):
            return x_bcdhw
        return F.interpolate(x_bcdhw, scale_factor=self.scale, mode="nearest")


class STUNetDecoder(nn.Module):
    """STU-Net decoder: ``upsamples[u]``, ``stages[u]`` (2C -> C residual blocks) and ``heads[u]`` (1x1 conv to the
    classes), deepest scale first (u = 0 works at the second-deepest encoder resolution)."""

    def __init__(
        self, widths: Sequence[int], blocks: Sequence[int], strides: Sequence[Stride3], num_classes: int
    ):
        super().__init__()
        n = len(widths) - 1
        self.upsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        for u in range(n):
            deep, skip = widths[n - u], widths[n - 1 - u]
            self.upsamples.append(UpsampleLayer(deep, skip, strides[n - u]))
            stage = [ResBlock(2 * skip, skip, projection=True)]
            stage += [ResBlock(skip, skip) for _ in range(blocks[n - 1 - u] - 1)]
            self.stages.append(nn.Sequential(*stage))
            self.heads.append(nn.Conv3d(skip, num_classes, 1))

    def forward(self, feats: list[torch.Tensor], use_checkpoint: bool = False) -> list[torch.Tensor]:
        """Returns the logits of every decoder scale, deepest first."""
        x = feats[-1]
        logits = []
        for u, (up, stage, head) in enumerate(zip(self.upsamples, self.stages, self.heads, strict=True)):
            x = torch.cat([up(x), feats[-2 - u]], dim=1)
            x = _run_blocks(stage, x, use_checkpoint)
            logits.append(head(x))
        return logits


class STUNet(nn.Module):
    """STU-Net for segmentation: ``encoder`` (:class:`STUNetEncoder`) + ``decoder`` (:class:`STUNetDecoder`).

    ``forward(x)`` with ``x`` of shape ``[B, in_channels, D, H, W]`` (spatial sizes multiples of the total stride,
    32 by default) returns the full-resolution logits ``[B, num_classes, D, H, W]``, or with deep supervision a list
    of logits from full resolution down to 1/16 (nnU-Net's order). All 5 heads exist in either mode, so that state
    dicts do not depend on it.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spec: STUNetSpec,
        strides: Sequence[Stride3],
        deep_supervision: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.spec = spec
        self.deep_supervision = deep_supervision
        self.grad_checkpointing = grad_checkpointing
        self.encoder = STUNetEncoder(in_channels, spec.widths, spec.blocks, strides, grad_checkpointing)
        self.decoder = STUNetDecoder(spec.widths, spec.blocks, strides, num_classes)

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x_bcdhw, self.in_channels, total_stride(self.encoder.strides), "STUNet")
        feats = self.encoder(x_bcdhw)
        logits = self.decoder(feats, self.grad_checkpointing and torch.is_grad_enabled())
        if self.deep_supervision:
            return logits[::-1]
        return logits[-1]

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's state dict, keys relative to ``encoder`` (same keys as ``MIMModel.encoder``)."""
        return self.encoder.state_dict()


def build_stunet(
    size: str | STUNetSpec,
    in_channels: int = 1,
    num_classes: int = 105,
    *,
    strides: Sequence[int | Sequence[int]] | None = None,
    deep_supervision: bool = True,
    grad_checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> STUNet:
    """Build STU-Net of a given size with nnU-Net's He initialisation.

    Args:
        size: ``"tiny"``, ``"S"``, ``"B"``, ``"L"``, ``"H"`` or an :class:`STUNetSpec`.
        in_channels: input channels (modalities).
        num_classes: output classes (105 = TotalSegmentator v1 + background).
        strides: 6 per-stage strides (ints or 3-tuples) for anisotropic plans; default (1, 2, 2, 2, 2, 2).
        deep_supervision: return the logits of all 5 decoder scales.
        grad_checkpointing: recompute every residual block in the backward pass (use for L and H).
        device: where to allocate; ``"meta"`` builds without memory (e.g. to count L / H parameters).
    """
    spec = get_spec(size)
    strides3 = normalize_strides(strides, len(spec.widths))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = STUNet(in_channels, num_classes, spec, strides3, deep_supervision, grad_checkpointing)
        init_he(model)
    return model


def encoder_keys(model: nn.Module) -> list[str]:
    """State-dict keys of ``model`` (an STUNet or an MIMModel) that belong to its encoder (prefix ``encoder.``)."""
    return [k for k in model.state_dict() if k.startswith("encoder.")]


@dataclass(frozen=True)
class EncoderLoadReport:
    """Outcome of :func:`load_encoder_weights` (keys relative to the encoder).

    Attributes:
        loaded: encoder keys that received weights (``adapted`` ones included).
        missing: encoder keys of the target left at their initialisation (e.g. the 6th stage).
        unexpected: source keys that were not used (e.g. MIM decoder weights).
        adapted: first-convolution keys whose input channels were adapted (repeated and rescaled).
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    adapted: tuple[str, ...]


def adapt_in_channels(w_src: torch.Tensor, c_dst: int) -> torch.Tensor:
    """A first-convolution weight ``[O, C_src, k, k, k]`` for ``c_dst`` input channels ``[O, c_dst, k, k, k]``.

    Sums over the source channels, then spreads the sum evenly over the target channels: for an input that is equal
    in every channel the response is unchanged (a 1-channel source is repeated and divided by ``c_dst``).
    """
    w_sum = w_src.sum(dim=1, keepdim=True)
    return w_sum.repeat(1, c_dst, *([1] * (w_src.dim() - 2))) / c_dst


def fit_input_channels(value: torch.Tensor, want: Sequence[int]) -> torch.Tensor | None:
    """``value`` adapted to shape ``want`` when the two differ only in input channels (dimension 1), else None."""
    if value.dim() == len(want) >= 2 and value.shape[0] == want[0] and tuple(value.shape[2:]) == tuple(want[2:]):
        return adapt_in_channels(value, want[1])
    return None


def load_encoder_weights(stunet: STUNet, state_dict: Mapping[str, torch.Tensor]) -> EncoderLoadReport:
    """Load pretrained encoder weights into an STUNet by key.

    ``state_dict`` may be ``mim.encoder.state_dict()`` (keys relative to the encoder) or a full model state dict
    (keys ``encoder.*``; other keys are reported as unexpected). When the first convolutions' input channels differ
    (e.g. a 1-channel CT encoder into a 2-channel PET/CT network), their weights are summed over the source channels,
    repeated over the target channels and divided by the target channel count.

    Raises:
        ValueError: a shape mismatch other than the first convolutions' input channels.
    """
    target = stunet.encoder.state_dict()
    prefixed = any(k.startswith("encoder.") for k in state_dict)
    source: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if prefixed:
            if not key.startswith("encoder."):
                unexpected.append(key)
                continue
            key = key[len("encoder.") :]
        source[key] = value
    first_convs = {"stages.0.0.conv1.weight", "stages.0.0.conv3.weight"}
    loaded, adapted, new_state = [], [], {}
    for key, value in source.items():
        if key not in target:
            unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape != want:
            fitted = fit_input_channels(value, want) if key in first_convs else None
            if fitted is None:
                raise ValueError(f"encoder weight {key}: source shape {tuple(value.shape)} != target {tuple(want)}")
            value = fitted
            adapted.append(key)
        new_state[key] = value
        loaded.append(key)
    stunet.encoder.load_state_dict(new_state, strict=False)
    missing = [k for k in target if k not in new_state]
    return EncoderLoadReport(tuple(loaded), tuple(missing), tuple(unexpected), tuple(adapted))
