"""Prediction on raw image files (``anatomask-lab predict --images DIR``), as ``nnUNetv2_predict -i DIR -o OUT``.

Cases in ``DIR`` (not its subfolders; hidden files and files without an image ending are ignored):

- a single file ``<case><ending>`` (single-channel models only), or
- a channel set ``<case>_0000<ending>``, ``<case>_0001<ending>``, ... with exactly the model's channels, in order,

with ``<ending>`` one of ``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr`` (the last four through
SimpleITK, the ``sitk`` extra). Each case is prepared exactly as the model's training data were, by the same
:func:`anatomask_lab.data.preprocess.preprocess_case` and the recipe stored with the run
(:mod:`anatomask_lab.data.recipe`): canonical orientation, non-zero crop, the training spacing and image
interpolation, per-channel normalisation. The sliding window's softmax (Gaussian-weighted, optionally mirrored) is
arg-maxed on that grid and mapped back to the input's grid by nearest neighbour. Outputs in ``OUT``:

- ``<case><ending>``: the label map (uint8; int16 beyond 256 classes) with the input's shape, voxel order and
  geometry, in the input's format; a NIfTI input's header is copied, so qform, sform and their codes are the
  input's.
- ``<case>.npz`` (``--save-probabilities``): ``probabilities`` float32 ``[K, I, J, K']`` on the same grid and in
  the same voxel order as the label map (NIfTI voxel order; ITK index order ``[i, j, k]``, the reverse of
  ``SimpleITK.GetArrayFromImage``), background 1 outside the non-zero crop, so that its arg-max over the first
  axis is the written label map; ``class_names`` [K]; ``affine`` [4, 4], the RAS voxel-to-world matrix of that
  grid. It holds 4 K bytes per input voxel before compression: keep it for few classes.

Existing outputs are refused unless ``overwrite`` (replace them) or ``resume`` (``--continue``: keep cases whose
outputs all exist, predict the rest; every file is written atomically, so an existing one is complete). ``OUT``
may not be ``DIR``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anatomask_lab.data.dataset import check_case_id
from anatomask_lab.data.io import (
    IMAGE_ENDINGS,
    DataError,
    atomic_write_npz,
    image_ending,
    save_like,
    to_file_order,
)
from anatomask_lab.data.recipe import Recipe, read_run_recipe
from anatomask_lab.finetune import load_segmenter
from anatomask_lab.inference import sliding_window_predict
from anatomask_lab.progress import progress
from anatomask_lab.runs import CHECKPOINT_DIR
from anatomask_lab.runtime import autocast_dtype, resolve_device

__all__ = ["ImageCase", "channel_modalities", "find_image_cases", "plan_outputs", "predict_images", "same_place"]

_CHANNEL = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")


@dataclass(frozen=True)
class ImageCase:
    """One case found in an image folder.

    Attributes:
        case_id: output name (``<case>`` of ``<case><ending>`` or ``<case>_XXXX<ending>``).
        paths: one file per channel, in channel order.
        ending: the files' ending as spelled (``.nii.gz``, ``.mha``, ...); outputs take it.
    """

    case_id: str
    paths: tuple[Path, ...]
    ending: str

    def outputs(self, out_dir: str | Path, save_probabilities: bool = False) -> list[Path]:
        """The files a prediction of this case writes into ``out_dir``."""
        out = Path(out_dir)
        return [out / f"{self.case_id}{self.ending}"] + ([out / f"{self.case_id}.npz"] if save_probabilities else [])


def same_place(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (after resolving links, or as the same existing inode)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _group_files(folder: Path) -> dict[str, dict[int | None, Path]]:
    """Case -> {channel (None for a single file): path} over the image files of ``folder``."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file() and image_ending(p))
    if not files:
        raise DataError(f"--images {folder}: no image files (endings {', '.join(IMAGE_ENDINGS)})")
    groups: dict[str, dict[int | None, Path]] = {}
    for p in files:
        stem = p.name[: -len(image_ending(p))]
        match = _CHANNEL.fullmatch(stem)
        case, channel = (match["case"], int(match["channel"])) if match else (stem, None)
        check_case_id(case, p)
        chans = groups.setdefault(case, {})
        if channel in chans or (chans and (channel is None) != (None in chans)):
            other = chans.get(channel) or next(iter(chans.values()))
            raise DataError(f"{p}: case {case!r} also has {other.name}; one file per channel (a single file "
                            f"{case}<ending>, or {case}_0000<ending>, {case}_0001<ending>, ...)")
        chans[channel] = p
    return groups


def find_image_cases(images_dir: str | Path, in_channels: int) -> list[ImageCase]:
    """The cases of an image folder for a model taking ``in_channels`` channels (rules in the module docstring).

    Raises:
        DataError: not a folder, no image files, a single file for a multi-channel model, a channel set with
            missing or extra channels or mixed endings, an unusable case name.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise DataError(f"--images {folder}: not a folder")
    cases = []
    for case, chans in _group_files(folder).items():
        first = next(iter(chans.values()))
        ending = first.name[-len(image_ending(first)):]
        if None in chans and in_channels != 1:
            raise DataError(f"{first}: the model takes {in_channels} channels; name the case's files "
                            f"{case}_0000{ending} ... {case}_{in_channels - 1:04d}{ending}")
        if None not in chans and sorted(chans) != list(range(in_channels)):
            missing = [f"{case}_{c:04d}{ending}" for c in range(in_channels) if c not in chans]
            extra = sorted(chans[c].name for c in chans if c >= in_channels)
            raise DataError(f"case {case!r} in {folder}: " + (f"channel file(s) {', '.join(missing)} missing"
                            if missing else f"{len(chans)} channel files ({', '.join(extra)} beyond)")
                            + f"; the model takes {in_channels} channel(s)")
        paths = tuple(chans[c] for c in sorted(chans, key=lambda c: c or 0))
        if len({image_ending(p) for p in paths}) > 1:
            raise DataError(f"case {case!r} in {folder}: its channel files have different endings "
                            f"({', '.join(p.name for p in paths)})")
        cases.append(ImageCase(case, paths, ending))
    return cases


def plan_outputs(cases: Sequence[ImageCase], images_dir: str | Path, out_dir: str | Path, *,
                 save_probabilities: bool = False, overwrite: bool = False, resume: bool = False) -> list[ImageCase]:
    """The cases still to predict, after the output checks.

    Raises:
        ValueError: ``out_dir`` is ``images_dir`` (or an output would be an input file), both ``overwrite`` and
            ``resume``, or outputs exist and neither is set.
    """
    if overwrite and resume:
        raise ValueError("--overwrite and --continue exclude each other: replace every output, or keep finished ones")
    if same_place(images_dir, out_dir):
        raise ValueError(f"--out {out_dir} is the --images folder {images_dir}: predictions must not sit among (or "
                         "replace) the inputs; choose another folder")
    inputs = {p.resolve() for c in cases for p in c.paths}
    todo, existing = [], []
    for case in cases:
        outs = case.outputs(out_dir, save_probabilities)
        clash = next((o for o in outs if o.resolve() in inputs), None)
        if clash is not None:
            raise ValueError(f"{clash}: the output would replace an input image; choose another --out")
        present = [o for o in outs if o.exists()]
        if resume and len(present) == len(outs):
            continue
        if present and not (overwrite or resume):
            existing.append(present[0].name)
        todo.append(case)
    if existing:
        raise ValueError(f"--out {out_dir} already holds predictions of {len(existing)} case(s) "
                         f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}): pass --overwrite to "
                         "replace them, or --continue to keep finished cases and predict the rest")
    return todo


def channel_modalities(recipe: Recipe, override: Sequence[str] | None = None) -> tuple[str, ...]:
    """The modality of each input channel (``"CT"`` selects CT normalisation): the recipe's, or ``override``.

    Raises:
        ValueError: ``override`` has another length than the channels, or the recipe leaves a channel open (its
            training cases mixed modalities) and no override is given.
    """
    if override:
        mods = tuple(m.strip().upper() if m.strip().upper() == "CT" else m.strip() for m in override)
        if len(mods) != len(recipe.channels) or not all(mods):
            raise ValueError(f"--modality gives {len(mods)} modalities; the model takes {len(recipe.channels)} "
                             f"channel(s) ({', '.join(recipe.channels)})")
        return mods
    open_channels = [c for c, m in zip(recipe.channels, recipe.modalities, strict=True) if m is None]
    if open_channels:
        raise ValueError(f"the training cases of channel(s) {', '.join(open_channels)} mixed modalities (e.g. CT "
                         "and MR): pass --modality, one per channel (CT for CT normalisation, e.g. MR otherwise)")
    return tuple(str(m) for m in recipe.modalities)


def run_folder(model_run: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint file (``<run>/checkpoints/<which>.pt``)."""
    path = Path(model_run)
    if not path.is_file():
        return path
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent


@dataclass(frozen=True)
class _Settings:
    """What every case of one prediction shares."""

    recipe: Recipe
    modalities: tuple[str, ...]
    class_names: tuple[str, ...]
    patch_size: tuple[int, int, int]
    batch_size: int
    overlap: float
    mirror: bool
    device: torch.device
    amp_dtype: torch.dtype | None
    accumulate: str
    save_probabilities: bool


def predict_case(model: nn.Module, case: ImageCase, out_dir: Path, s: _Settings) -> list[Path]:
    """Prepare, predict and write one case (label map, and probabilities when asked); returns the files written.

    Raises:
        DataError: an unreadable, non-finite or constant image, or channels on different grids.
        FloatingPointError: the model's probabilities are not finite (nothing is written).
    """
    from anatomask_lab.data.preprocess import CaseSource, preprocess_case
    from anatomask_lab.data.resample import restore_to_canonical

    source = CaseSource(case.case_id, images=case.paths, modalities=s.modalities)
    res = preprocess_case(source, None, spacing=s.recipe.spacing, clip=s.recipe.clip, image_kind=s.recipe.image_kind)
    num_classes = len(s.class_names)
    prob = sliding_window_predict(model, res["image"], s.patch_size, num_classes, overlap=s.overlap,
                                  mirror=s.mirror, batch_size=s.batch_size, device=s.device, amp_dtype=s.amp_dtype,
                                  accumulate=s.accumulate)
    if not bool(torch.isfinite(prob).all()):
        raise FloatingPointError(f"{case.paths[0]}: the model's probabilities are not finite; nothing written")
    meta, reference = res["meta"], case.paths[0]
    canon_affine = np.asarray(meta["canonical"]["affine"], np.float64)
    dtype = np.uint8 if num_classes <= 256 else np.int16
    labels = restore_to_canonical(prob.argmax(0).numpy().astype(dtype), meta)
    out = case.outputs(out_dir, s.save_probabilities)
    written = [save_like(out[0], labels, canon_affine, reference, dtype=dtype)]
    if s.save_probabilities:
        background = np.zeros(num_classes, np.float32)
        background[0] = 1.0
        canon = restore_to_canonical(prob.numpy(), meta, fill=background)
        probabilities, affine = to_file_order(canon, canon_affine, reference)
        written.append(atomic_write_npz(out[1], probabilities=probabilities, class_names=np.array(s.class_names),
                                        affine=affine))
    return written


def predict_images(model_run: str | Path, images_dir: str | Path, out_dir: str | Path, *, overlap: float = 0.5,
                   mirror: bool = False, device: str = "auto", which: str = "best", amp: str = "auto",
                   accumulate: str = "device", save_probabilities: bool = False, overwrite: bool = False,
                   resume: bool = False, modalities: Sequence[str] | None = None, quiet: bool = False) -> list[Path]:
    """Predict every case of an image folder and write the results in each input's geometry.

    Args:
        model_run: finetuning run folder or checkpoint file.
        images_dir: folder of raw images (layout in the module docstring).
        out_dir: output folder (not ``images_dir``).
        overlap: sliding-window overlap in [0, 1).
        mirror: mirror test-time augmentation (8 flips).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        which: checkpoint, ``best`` (falls back to ``last``) or ``last``.
        amp: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
        accumulate: class-probability sums on the ``device`` or on the ``cpu`` (many classes, small GPU).
        save_probabilities: also write ``<case>.npz``.
        overwrite: replace existing outputs.
        resume: skip cases whose outputs all exist.
        modalities: one per channel, overriding the run's recipe (needed when training mixed modalities).
        quiet: no progress bar.

    Returns:
        The files written, in case order.

    Raises:
        DataError: the run's preprocessing is unknown, the folder's layout or an image is unusable.
        ValueError: output conflicts (see :func:`plan_outputs`), or the recipe disagrees with the model.
    """
    dev = resolve_device(device)
    model, cfg = load_segmenter(model_run, which=which, device=dev)
    recipe = read_run_recipe(run_folder(model_run), cfg.get("data_dir"))
    if len(recipe.channels) != model.in_channels:
        raise ValueError(f"{model_run}: the model takes {model.in_channels} channels but its stored preprocessing "
                         f"names {len(recipe.channels)} ({', '.join(recipe.channels)})")
    names = recipe.class_names if len(recipe.class_names) == model.num_classes else tuple(
        f"class_{k}" for k in range(model.num_classes))
    settings = _Settings(recipe, channel_modalities(recipe, modalities), names, tuple(cfg["patch_size"]),
                         int(cfg.get("batch_size", 2)), overlap, mirror, dev, autocast_dtype(amp, dev), accumulate,
                         save_probabilities)
    cases = find_image_cases(images_dir, model.in_channels)
    todo = plan_outputs(cases, images_dir, out_dir, save_probabilities=save_probabilities, overwrite=overwrite,
                        resume=resume)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for case in progress(todo, desc="predict images", disable=quiet, unit="case"):
        written += predict_case(model, case, out, settings)
    return written
