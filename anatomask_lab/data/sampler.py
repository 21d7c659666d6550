"""Random patches from a preprocessed dataset folder, for pretraining and finetuning.

Arrays are opened as memory maps, so a patch costs one strided read; each DataLoader worker opens its own maps.
Every sample depends only on ``(seed, epoch, index)``: the same index gives the same patch in any worker, with
any number of workers or under a DistributedSampler. Call :meth:`PatchDataset.set_epoch` before iterating an
epoch (with ``persistent_workers=False`` so that workers see the new epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from anatomask_lab.data.dataset import DatasetInfo, case_dir, read_case_meta
from anatomask_lab.data.io import DataError

__all__ = ["MAX_PATCH_EDGE", "PatchDataset", "check_patch_size", "extract_patch", "load_case"]

#: Largest patch edge accepted (voxels); 512 at 1.5 mm is 77 cm, more than any body.
MAX_PATCH_EDGE = 512


def load_case(dataset_dir, case_id: str):
    """Open one preprocessed case.

    Returns:
        ``(image, label, meta)``: ``image`` read-only memmap float32 [C, X, Y, Z]; ``label`` memmap [X, Y, Z] or
        None; ``meta`` the case's metadata dict (plus ``"fg"``: int32 [N, 4] foreground rows (class, x, y, z)).

    Raises:
        DataError: an unsafe case id, or the case folder or its files are missing.
    """
    meta = read_case_meta(dataset_dir, case_id)
    d = case_dir(dataset_dir, case_id)
    try:
        image = np.load(d / "image.npy", mmap_mode="r")
        label = np.load(d / "label.npy", mmap_mode="r") if (d / "label.npy").is_file() else None
        meta["fg"] = np.load(d / "fg.npy") if (d / "fg.npy").is_file() else np.zeros((0, 4), np.int32)
    except (OSError, ValueError) as exc:
        raise DataError(f"{d}: unreadable arrays ({exc})") from exc
    return image, label, meta


def check_patch_size(patch_size, *, divisor: int = 1, max_edge: int = MAX_PATCH_EDGE) -> tuple[int, int, int]:
    """Validate a 3D patch size.

    Raises:
        DataError: not three positive integers, an edge above ``max_edge``, or not a multiple of ``divisor``.
    """
    try:
        p = tuple(int(v) for v in patch_size)
    except (TypeError, ValueError) as exc:
        raise DataError(f"patch size {patch_size!r}: expected three integers") from exc
    if len(p) != 3 or any(v <= 0 for v in p):
        raise DataError(f"patch size {patch_size!r}: expected three positive integers")
    if max(p) > max_edge:
        raise DataError(f"patch size {p}: edges larger than the allowed {max_edge} voxels")
    if any(v % divisor for v in p):
        raise DataError(f"patch size {p}: every edge must be a multiple of {divisor} (the network's downsampling)")
    return p


def _start(rng: np.random.Generator, shape, patch, center=None) -> np.ndarray:
    """Patch corner: uniform over all placements (the volume padded when smaller), or around ``center``."""
    shape, patch = np.asarray(shape), np.asarray(patch)
    lo = np.minimum(0, shape - patch)
    hi = np.maximum(0, shape - patch)
    if center is None:
        return np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi, strict=True)])
    return np.clip(np.asarray(center) - patch // 2, lo, hi)


def extract_patch(array: np.ndarray, start, patch, pad_value=0.0) -> np.ndarray:
    """Copy ``array[..., start:start+patch]`` over the last three axes, padding outside the volume.

    Args:
        array: [..., X, Y, Z] (a memmap is fine).
        start: corner, may be negative or reach past the end.
        patch: (px, py, pz).
        pad_value: scalar, or one value per leading channel.
    """
    lead = array.shape[:-3]
    out = np.empty((*lead, *patch), dtype=array.dtype)
    pv = np.asarray(pad_value, dtype=array.dtype)
    out[...] = pv.reshape(pv.shape + (1, 1, 1)) if pv.ndim else pv
    src, dst = [], []
    for s, p, n in zip(start, patch, array.shape[-3:], strict=True):
        a, b = max(int(s), 0), min(int(s) + p, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - int(s), b - int(s)))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchDataset(Dataset):
    """Random (optionally foreground-centred) patches with random flips.

    Args:
        dataset_dir: prepared dataset folder.
        split: ``"train"``, ``"val"``, ``"test"``, ``"all"`` or a sequence of them.
        patch_size: (px, py, pz) voxels; smaller volumes are padded (image with its minimum, label with 0).
        with_label: return labels, and keep only labelled cases.
        fg_oversample: probability that a patch is centred on a foreground voxel of a random present class
            (nnU-Net uses 0.33 for finetuning).
        flips: flip each axis with probability 0.5.
        seed: base seed; sample ``index`` of epoch ``e`` uses ``np.random.default_rng([seed, e, index])``.
        samples_per_epoch: length of an epoch (default: one patch per case); sample ``i`` reads case ``i % n``.
        cases: explicit case ids (overrides ``split``).
        divisor: required multiple for every patch edge.

    Items are dicts: ``image`` float32 tensor [C, *patch], ``label`` int64 tensor [*patch] (when ``with_label``),
    ``case`` the case id.
    """

    def __init__(
        self,
        dataset_dir,
        split: str | Sequence[str] = "train",
        patch_size=(112, 112, 128),
        with_label: bool = False,
        fg_oversample: float = 0.0,
        flips: bool = True,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        cases: Sequence[str] | None = None,
        divisor: int = 1,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.info = DatasetInfo.read(self.dataset_dir)
        self.patch_size = check_patch_size(patch_size, divisor=divisor)
        if not 0.0 <= fg_oversample <= 1.0:
            raise DataError(f"fg_oversample {fg_oversample}: expected a probability in [0, 1]")
        cases = self._select(split, cases)
        if with_label:
            cases = [c for c in cases if self.info.case(c).has_label]
        if not cases:
            raise DataError(f"{self.dataset_dir}: no {'labelled ' if with_label else ''}cases in split {split!r}")
        self.case_ids = list(cases)
        self.with_label = with_label
        self.fg_oversample = float(fg_oversample)
        self.flips = flips
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0
        self._open: dict = {}

    def _select(self, split: str | Sequence[str], cases: Sequence[str] | None) -> list[str]:
        """Case ids of ``cases`` (each checked against ``dataset.json``) or of the named split(s), in file order."""
        if cases is not None:
            return [self.info.case(c).id for c in cases]
        wanted = set().union(*(self.info.split(s) for s in ([split] if isinstance(split, str) else split)))
        return [c for c in self.info.case_ids if c in wanted]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = {}  # memmaps are reopened in each worker
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws ``__getitem__`` uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.samples_per_epoch) if self.samples_per_epoch is not None else len(self.case_ids)

    def _case(self, case_id: str):
        if case_id not in self._open:
            self._open[case_id] = load_case(self.dataset_dir, case_id)
        return self._open[case_id]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        case_id = self.case_ids[index % len(self.case_ids)]
        image, label, meta = self._case(case_id)
        center = None
        use_fg = rng.random() < self.fg_oversample
        fg = meta["fg"]
        if use_fg and len(fg):
            classes = np.unique(fg[:, 0])
            rows = fg[fg[:, 0] == classes[rng.integers(len(classes))]]
            center = rows[rng.integers(len(rows)), 1:]
        start = _start(rng, image.shape[1:], self.patch_size, center)
        flip = rng.random(3) < 0.5 if self.flips else np.zeros(3, bool)
        img = extract_patch(image, start, self.patch_size, meta.get("pad_value", 0.0))
        axes = tuple(int(a) for a in np.nonzero(flip)[0])
        if axes:
            img = np.flip(img, axis=tuple(a + 1 for a in axes))
        out = {"image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), "case": case_id}
        if self.with_label:
            lab = extract_patch(label, start, self.patch_size, 0)
            if axes:
                lab = np.flip(lab, axis=axes)
            out["label"] = torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64))
        return out
