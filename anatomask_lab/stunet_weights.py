"""STU-Net / nnU-Net weight files in and out: key names, axis order, safe reading (``docs/weights.md``).

**Files.** STU-Net's released checkpoints (``small_ep4k.model`` ... ``huge_ep4k.model``) are nnU-Net trainer
checkpoints: a pickled dict holding the network's weights under ``state_dict`` (nnU-Net v1 trainers) or
``network_weights`` (nnU-Net v2), next to training state (optimiser, grad scaler, loss curves as numpy scalars).
STU-Net's v1 finetuning script reads ``state_dict``; its v2 script reads ``network_weights`` from ``.pth`` files and
``state_dict`` from ``.model`` files. The kit's exports carry both entries (the same tensors, stored once).

**Names.** STU-Net and the kit's :class:`~anatomask_lab.models.stunet.STUNet` have the same modules in the same
order under other names::

    kit (build_stunet)               STU-Net
    encoder.stages.{s}.{b}.*         conv_blocks_context.{s}.{b}.*          s = 0..5, shallowest first
    decoder.upsamples.{u}.conv.*     upsample_layers.{u}.conv.*             u = 0..4, deepest scale first
    decoder.stages.{u}.{b}.*         conv_blocks_localization.{u}.{b}.*
    decoder.heads.{u}.*              seg_outputs.{u}.*

and inside every residual block both use ``conv1, norm1, conv2, norm2`` and the 1x1 projection ``conv3`` of a
stage's first block (the activations hold no weights).

**Axis order.** The kit's arrays are (x, y, z) of the canonical RAS grid (:mod:`anatomask_lab.data.preprocess`);
nnU-Net reads images with SimpleITK and feeds the network (z, y, x) of the file's voxel grid. A kernel learned in
one order is the other's with its three spatial axes reversed, ``w_kit = w_stunet.permute(0, 1, 4, 3, 2)`` (the
permutation is its own inverse); so are per-axis strides (:func:`kit_strides`). Flips are a different matter: the
weights do not say which way the training files' axes ran, so the kit assumes that they ran along R, A and S (a file
stored in the canonical orientation), where nnU-Net's (z, y, x) is exactly the kit's (x, y, z) reversed.

**Reading.** :func:`read_weights_file` uses ``torch.load(weights_only=True)`` and allows, beyond tensors and plain
containers, only numpy scalars, arrays and dtypes (rebuilt from raw bytes; nothing is called); any other pickled
object is refused with a one-line error that says how to re-save the weights.
"""

from __future__ import annotations

import contextlib
import pickle
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anatomask_lab.models.stunet import STUNet, fit_input_channels, size_name

__all__ = [
    "AXES",
    "STUNET_KEY_PREFIXES",
    "WEIGHT_ENTRIES",
    "StunetLoadReport",
    "convert_axes",
    "describe_stunet",
    "from_stunet_keys",
    "is_stunet_checkpoint",
    "kit_strides",
    "load_stunet_weights",
    "read_weights_file",
    "resolve_axes",
    "reverse_kernel_axes",
    "stunet_encoder",
    "stunet_key",
    "stunet_state",
    "to_stunet_keys",
]

# axis-order name -> what the three spatial dimensions of a kernel [O, I, d0, d1, d2] are
AXES: Mapping[str, str] = types.MappingProxyType({"stunet": "(z, y, x)", "kit": "(x, y, z)"})
WEIGHT_ENTRIES = ("network_weights", "state_dict")  # nnU-Net v2, v1
# our prefix -> STU-Net's (STU-Net's nnU-Net v1 and v2 networks use the same module names)
STUNET_KEY_PREFIXES: Mapping[str, str] = types.MappingProxyType({
    "encoder.stages.": "conv_blocks_context.",
    "decoder.upsamples.": "upsample_layers.",
    "decoder.stages.": "conv_blocks_localization.",
    "decoder.heads.": "seg_outputs.",
})
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_FIRST_CONVS = ("encoder.stages.0.0.conv1.weight", "encoder.stages.0.0.conv3.weight")


# ----------------------------------------------------------------------------------------------------------------
# names and axes
# ----------------------------------------------------------------------------------------------------------------
def to_stunet_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a kit STUNet state dict (``encoder.*``, ``decoder.*``) to STU-Net's key names.

    Raises:
        ValueError: a key with no STU-Net counterpart.
    """
    return {stunet_key(key): value for key, value in state.items()}


def stunet_key(key: str) -> str:
    """STU-Net's name of one kit key (``encoder.stages.0.0.conv1.weight -> conv_blocks_context.0.0.conv1.weight``).

    Raises:
        ValueError: the key has no STU-Net counterpart.
    """
    for ours, theirs in STUNET_KEY_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise ValueError(f"key {key!r} has no STU-Net counterpart")


def from_stunet_keys(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename STU-Net keys to the kit's; returns the renamed dict and the source keys that have no counterpart."""
    out, unknown = {}, []
    for key, value in state.items():
        for ours, theirs in STUNET_KEY_PREFIXES.items():
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def reverse_kernel_axes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Reverse the three spatial axes of every 3-D kernel ``[O, I, a, b, c] -> [O, I, c, b, a]`` (contiguous copies);
    other entries (biases, norm weights, 1-D or 2-D tensors) are passed through. Its own inverse."""
    return {k: v.permute(0, 1, 4, 3, 2).contiguous() if isinstance(v, torch.Tensor) and v.dim() == 5 else v
            for k, v in state.items()}


def convert_axes(state: Mapping[str, Any], src: str, dst: str) -> dict[str, Any]:
    """Weights stored in axis order ``src`` (``"stunet"`` or ``"kit"``, see :data:`AXES`) in order ``dst``."""
    for name in (src, dst):
        if name not in AXES:
            raise ValueError(f"axis order must be one of {sorted(AXES)}, got {name!r}")
    return dict(state) if src == dst else reverse_kernel_axes(state)


def kit_strides(pool_op_kernel_sizes: list[list[int]], axes: str = "stunet") -> tuple[tuple[int, int, int], ...]:
    """The kit's 6 per-stage strides (``build_stunet(strides=...)``) from an nnU-Net plan's pooling kernels.

    Args:
        pool_op_kernel_sizes: 5 strides of encoder stages 1-5 (STU-Net's v1 trainers), or 6 with a leading
            ``[1, 1, 1]`` (nnU-Net v2 plans); each a per-axis list in ``axes`` order.
        axes: ``"stunet"`` (file order z, y, x: reversed here) or ``"kit"``.
    """
    pools = [tuple(int(v) for v in p) for p in pool_op_kernel_sizes]
    if len(pools) == 6 and pools[0] == (1, 1, 1):
        pools = pools[1:]
    if len(pools) != 5 or any(len(p) != 3 or min(p) < 1 for p in pools):
        raise ValueError(f"expected 5 (or 6 with a leading [1, 1, 1]) per-axis pooling kernels, got "
                         f"{pool_op_kernel_sizes}")
    if axes not in AXES:
        raise ValueError(f"axis order must be one of {sorted(AXES)}, got {axes!r}")
    return ((1, 1, 1), *(p[::-1] if axes == "stunet" else p for p in pools))


def resolve_axes(obj: Mapping[str, Any], axes: str, path: str | Path, default: str) -> str:
    """The axis order of the weights in ``obj``: ``axes`` when given, else what the file records, else ``default``.

    Raises:
        ValueError: ``axes`` is not ``auto``/``stunet``/``kit``, or the file records an unknown order.
    """
    if axes not in ("auto", *AXES):
        raise ValueError(f"axes must be 'auto', 'stunet' or 'kit', got {axes!r}")
    if axes != "auto":
        return axes
    recorded = obj.get("axes")
    if recorded is None:
        return default
    if recorded not in AXES:
        raise ValueError(f"{path}: its 'axes' entry {recorded!r} is neither 'stunet' nor 'kit'")
    return recorded


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------
def _numpy_globals() -> list[Any]:
    """What numpy scalars, arrays and dtypes pickle to, under numpy 2's module names and (torch >= 2.6, which
    takes ``(object, name)`` pairs) numpy 1's, which files written before 2024 use."""
    import numpy as np
    from numpy._core import multiarray

    dtype_classes = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    allowed: list[Any] = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6):
        allowed += [(multiarray.scalar, "numpy.core.multiarray.scalar"),
                    (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    return allowed


def _allow_numpy() -> contextlib.AbstractContextManager:
    """A context in which ``torch.load(weights_only=True)`` accepts numpy data (a no-op before torch 2.5)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(_numpy_globals()) if safe_globals is not None else contextlib.nullcontext()


def _unsafe_message(path: Path) -> str:
    try:
        names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)[:5])
    except Exception:  # a legacy (non-zip) file: torch cannot list them without unpickling
        names = "see torch.load's message"
    return (f"{path}: holds pickled Python objects besides weights ({names}), which the kit does not unpickle (that "
            f"could run code); if you trust the file, re-save its weights once: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save({{'state_dict': c['state_dict']}}, "
            f"'weights.model')\" (use 'network_weights' for nnU-Net v2 files)")


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` (numpy scalars, arrays and dtypes allowed), memory-mapped
    when the file is in torch's zip format (only the tensors that are used are then read).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch checkpoint, not a dict, or pickled objects beyond weights (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with _allow_numpy():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():
            raise ValueError(_unsafe_message(path)) from None
        raise ValueError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # corrupt, truncated or foreign file
        text = str(exc).strip().splitlines()
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{text[0] if text else ''})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    return obj


def is_stunet_checkpoint(obj: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint dict has nnU-Net's weight entry (``network_weights`` or ``state_dict``)."""
    return any(isinstance(obj.get(k), Mapping) for k in WEIGHT_ENTRIES)


def stunet_state(obj: Mapping[str, Any], path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The STU-Net weights of an nnU-Net-style checkpoint dict and the entry they came from.

    With both entries, the one STU-Net's v2 loader would read is taken (``state_dict`` for ``.model`` files,
    ``network_weights`` otherwise). ``module.`` / ``_orig_mod.`` prefixes (DDP, ``torch.compile``) are removed.

    Raises:
        ValueError: neither entry, a non-tensor value, or no ``conv_blocks_context.*`` key (not STU-Net).
    """
    path = Path(path)
    present = [k for k in WEIGHT_ENTRIES if isinstance(obj.get(k), Mapping)]
    if not present:
        raise ValueError(f"{path}: no 'network_weights' or 'state_dict' entry (entries: {sorted(map(str, obj))[:8]})"
                         "; not an nnU-Net / STU-Net checkpoint")
    entry = present[0] if len(present) == 1 else ("state_dict" if path.suffix == ".model" else "network_weights")
    state = {}
    for key, value in obj[entry].items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {entry}[{key!r}] is a {type(value).__name__}, not a tensor")
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    if not any(k.startswith("conv_blocks_context.") for k in state):
        raise ValueError(f"{path}: its {entry!r} holds no STU-Net weights (no conv_blocks_context.* keys; first keys: "
                         f"{list(state)[:3]})")
    return state, entry


def describe_stunet(state: Mapping[str, torch.Tensor]) -> str:
    """``"STU-Net-B (1 input channel)"``, or the widths and blocks of an STU-Net that is none of the sizes."""
    widths, blocks, s = [], [], 0
    while f"conv_blocks_context.{s}.0.conv1.weight" in state:
        widths.append(int(state[f"conv_blocks_context.{s}.0.conv1.weight"].shape[0]))
        blocks.append(sum(1 for b in range(64) if f"conv_blocks_context.{s}.{b}.conv1.weight" in state))
        s += 1
    first = state.get("conv_blocks_context.0.0.conv1.weight")
    channels = f"{first.shape[1]} input channel{'s' if first.shape[1] != 1 else ''}" if first is not None else "?"
    name = size_name(widths, blocks)
    what = f"STU-Net-{name}" if name else f"an STU-Net with widths {tuple(widths)}, blocks {tuple(blocks)}"
    return f"{what} ({channels})"


# ----------------------------------------------------------------------------------------------------------------
# loading into the kit's STUNet
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StunetLoadReport:
    """Outcome of :func:`load_stunet_weights`.

    Attributes:
        loaded: kit keys (``encoder.*``, ``decoder.*``) that received weights (``adapted`` ones included).
        missing: kit keys left at their initialisation (the heads; parts the source does not hold).
        skipped: source (STU-Net) keys deliberately not transferred: the segmentation heads (another task's
            classes, as STU-Net's own finetuning does), the decoder when ``decoder=False``, and keys that a kit
            export records as not pretrained.
        unexpected: source keys with no place in the kit's network.
        adapted: first-convolution keys whose input channels were adapted (:func:`adapt_in_channels`).
        axes: the axis order the source was read in (``"stunet"``: transposed to the kit's).
        entry: the checkpoint entry read (``network_weights`` or ``state_dict``).
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    skipped: tuple[str, ...]
    unexpected: tuple[str, ...]
    adapted: tuple[str, ...]
    axes: str
    entry: str


def _pretrained_record(obj: Mapping[str, Any], path: Path) -> set[str] | None:
    """The STU-Net keys a kit export records as pretrained (None: every key of the file is trained)."""
    record = obj.get("pretrained_keys")
    if record is None:
        return None
    if not isinstance(record, list | tuple) or not all(isinstance(k, str) for k in record):
        raise ValueError(f"{path}: its 'pretrained_keys' entry is not a list of key names")
    return set(record)


def _model_size(model: STUNet) -> str:
    name = size_name(model.spec.widths, model.spec.blocks)
    return f"STU-Net-{name}" if name else f"STU-Net with widths {model.spec.widths}"


def load_stunet_weights(model: STUNet, obj: Mapping[str, Any], path: str | Path, axes: str = "auto",
                        decoder: bool = True) -> StunetLoadReport:
    """Load STU-Net weights (a checkpoint dict read by :func:`read_weights_file`) into the kit's ``model``.

    Everything but the segmentation heads is transferred (encoder and, with ``decoder``, the decoder), as STU-Net's
    finetuning does; a kit export's ``pretrained_keys`` record limits this to what was pretrained. The first
    convolutions are adapted to another number of input channels.

    Args:
        model: the kit's STUNet (any class count).
        obj: the checkpoint dict; ``path``: its file, for messages.
        axes: the order the file's kernels are stored in: ``"auto"`` (the file's ``axes`` record, else nnU-Net's
            file order ``"stunet"``), ``"stunet"`` (transposed to the kit's) or ``"kit"`` (taken as they are).
        decoder: also transfer the decoder (upsampling convs and decoder stages).

    Raises:
        ValueError: not STU-Net weights, or a shape that does not fit ``model`` (naming the file, both key names
            and what the file holds).
    """
    path = Path(path)
    state, entry = stunet_state(obj, path)
    axes = resolve_axes(obj, axes, path, default="stunet")
    pretrained = _pretrained_record(obj, path)
    mapped, unexpected = from_stunet_keys(convert_axes(state, axes, "kit"))
    target = model.state_dict()
    new, adapted, skipped = {}, [], []
    for key, value in mapped.items():
        source_key = stunet_key(key)
        if (key.startswith("decoder.heads.") or (not decoder and key.startswith("decoder."))
                or (pretrained is not None and source_key not in pretrained)):
            skipped.append(source_key)
            continue
        if key not in target:
            unexpected.append(source_key)
            continue
        want = target[key].shape
        if value.shape != want:
            fitted = fit_input_channels(value, want) if key in _FIRST_CONVS else None
            if fitted is None:
                raise ValueError(f"{path}: {source_key} has shape {tuple(value.shape)}, the kit's {key} needs "
                                 f"{tuple(want)}: the file holds {describe_stunet(state)}, the network is "
                                 f"{_model_size(model)}; choose the matching --size")
            value = fitted
            adapted.append(key)
        new[key] = value
    model.load_state_dict(new, strict=False)
    missing = [k for k in target if k not in new]
    return StunetLoadReport(tuple(new), tuple(missing), tuple(skipped), tuple(unexpected), tuple(adapted), axes,
                            entry)


def stunet_encoder(obj: Mapping[str, Any], path: str | Path, axes: str = "auto") -> dict[str, torch.Tensor]:
    """The encoder of STU-Net weights in the kit's order, keys as in ``STUNet.encoder`` (``stages.*``).

    Keys a kit export records as not pretrained are left out; ``axes`` as in :func:`load_stunet_weights`.
    """
    path = Path(path)
    state, _ = stunet_state(obj, path)
    axes = resolve_axes(obj, axes, path, default="stunet")
    pretrained = _pretrained_record(obj, path)
    if pretrained is not None:
        state = {k: v for k, v in state.items() if k in pretrained}
    mapped, _ = from_stunet_keys(convert_axes(state, axes, "kit"))
    return {k[len("encoder."):]: v for k, v in mapped.items() if k.startswith("encoder.")}
