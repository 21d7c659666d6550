"""The preprocessing recipe of a prepared dataset, stored with each finetuning run as ``<run>/preprocessing.json``.

A model only sees images prepared the way its training data were: reoriented to the closest canonical (RAS+)
orientation, cropped to the non-zero box of all channels, resampled to the dataset's spacing with its image
interpolation, and normalised per channel (CT: clipped to the body's 0.5/99.5 percentiles when ``clip``, then a
z-score; any other modality: z-score over the non-zero voxels). ``predict --images`` reads this record to prepare
new raw images through :func:`anatomask_lab.data.preprocess.preprocess_case`, so the dataset folder is not needed
at prediction time. The record (JSON)::

    format       "anatomask-lab preprocessing v1"
    dataset      the dataset's name;  data_dir: the folder it was read from (absolute)
    channels     channel names, in input order
    modalities   per channel: "CT" (the CT rule) or another modality (z-score over non-zero voxels); null for a
                 channel whose cases mixed modalities (prediction then needs --modality)
    spacing      target spacing in mm along the canonical x, y, z axes
    clip         CT clipping before the z-score
    image_kind   image interpolation: "cubic" or "linear"
    class_names  output classes, background first
    file_ending  the raw files' ending when the preparer recorded one (e.g. ".nii.gz"), else null

A run whose dataset could not be described (no ``prepare.json``, as in hand-made folders) stores
``{"format": ..., "unavailable": reason}`` instead, and prediction on raw images names that reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anatomask_lab.data.dataset import DatasetInfo, read_case_meta
from anatomask_lab.data.io import DataError, atomic_write_json

__all__ = ["RECIPE_FILE", "RECIPE_FORMAT", "Recipe", "read_run_recipe", "recipe_of_dataset", "write_run_recipe"]

RECIPE_FILE = "preprocessing.json"
RECIPE_FORMAT = "anatomask-lab preprocessing v1"
IMAGE_KINDS = ("cubic", "linear")


@dataclass(frozen=True)
class Recipe:
    """How a dataset's images were preprocessed (see the module docstring for each field)."""

    channels: tuple[str, ...]
    modalities: tuple[str | None, ...]
    spacing: tuple[float, float, float]
    clip: bool
    image_kind: str
    class_names: tuple[str, ...] = ()
    dataset: str = ""
    data_dir: str = ""
    file_ending: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written to ``preprocessing.json``."""
        return {"format": RECIPE_FORMAT, "dataset": self.dataset, "data_dir": self.data_dir,
                "channels": list(self.channels), "modalities": list(self.modalities), "spacing": list(self.spacing),
                "clip": self.clip, "image_kind": self.image_kind, "class_names": list(self.class_names),
                "file_ending": self.file_ending}

    @classmethod
    def from_json(cls, content: Any, path: str | Path = RECIPE_FILE) -> Recipe:
        """Check and build a record read from ``path``.

        Raises:
            DataError: another format, a stored reason why the record is unavailable, or a malformed field.
        """
        if not isinstance(content, dict) or content.get("format") != RECIPE_FORMAT:
            raise DataError(f"{path}: not an anatomask-lab preprocessing record (format {RECIPE_FORMAT!r})")
        if "unavailable" in content:
            raise DataError(f"{path}: the run's preprocessing is unknown: {content['unavailable']}")
        channels, modalities = content.get("channels"), content.get("modalities")
        spacing, kind = content.get("spacing"), content.get("image_kind")
        if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
            raise DataError(f"{path}: 'channels' must be a non-empty list of names")
        if (not isinstance(modalities, list) or len(modalities) != len(channels)
                or not all(m is None or isinstance(m, str) for m in modalities)):
            raise DataError(f"{path}: 'modalities' must give one modality (or null) per channel")
        if (not isinstance(spacing, list) or len(spacing) != 3
                or not all(isinstance(s, int | float) and not isinstance(s, bool) and s > 0 for s in spacing)):
            raise DataError(f"{path}: 'spacing' must be three positive numbers, found {spacing!r}")
        if kind not in IMAGE_KINDS or not isinstance(content.get("clip"), bool):
            raise DataError(f"{path}: 'image_kind' must be one of {IMAGE_KINDS} and 'clip' true or false")
        return cls(tuple(channels), tuple(modalities), tuple(float(s) for s in spacing), content["clip"], kind,
                   tuple(str(n) for n in content.get("class_names") or ()), str(content.get("dataset") or ""),
                   str(content.get("data_dir") or ""), content.get("file_ending"))


def _channel_modalities(data_dir: Path, info: DatasetInfo) -> tuple[str | None, ...]:
    """Per channel, the one modality every case recorded in its ``meta.json``, or None where cases disagree."""
    seen: list[set[str]] = [set() for _ in info.channels]
    for case_id in info.case_ids:
        mods = read_case_meta(data_dir, case_id).get("modalities") or []
        if len(mods) != len(seen):
            raise DataError(f"{data_dir / 'cases' / case_id / 'meta.json'}: {len(mods)} modalities for "
                            f"{len(seen)} channels")
        for s, m in zip(seen, mods, strict=True):
            s.add(str(m))
    return tuple(next(iter(s)) if len(s) == 1 else None for s in seen)


def recipe_of_dataset(data_dir: str | Path) -> Recipe:
    """The recipe of a prepared dataset folder, from its ``prepare.json``, ``dataset.json`` and case metadata.

    Raises:
        DataError: ``dataset.json`` or ``prepare.json`` is missing or malformed, or a case's metadata is unreadable.
    """
    data_dir = Path(data_dir)
    info = DatasetInfo.read(data_dir)
    stamp = data_dir / "prepare.json"
    try:
        settings = json.loads(stamp.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{stamp}: not found; {data_dir} was not written by `anatomask-lab prepare`, so its "
                        "preprocessing settings are unknown") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{stamp}: not valid JSON ({exc})") from exc
    if not isinstance(settings, dict):
        raise DataError(f"{stamp}: expected a JSON object")
    content = {"format": RECIPE_FORMAT, "dataset": info.name, "data_dir": os.path.abspath(data_dir),
               "channels": list(info.channels), "modalities": list(_channel_modalities(data_dir, info)),
               "spacing": settings.get("spacing", list(info.spacing or ())), "clip": settings.get("clip"),
               "image_kind": settings.get("image_kind"), "class_names": list(info.class_names),
               "file_ending": info.extra.get("file_ending")}
    return Recipe.from_json(content, stamp)


def write_run_recipe(run_dir: str | Path, data_dir: str | Path) -> Path:
    """Write ``<run_dir>/preprocessing.json`` for a run trained on ``data_dir`` (atomically).

    A dataset that cannot be described is no reason to stop finetuning: the file then records why, and
    ``predict --images`` reports it.
    """
    try:
        content = recipe_of_dataset(data_dir).to_json()
    except DataError as exc:
        content = {"format": RECIPE_FORMAT, "unavailable": str(exc)}
    return atomic_write_json(Path(run_dir) / RECIPE_FILE, content)


def read_run_recipe(run_dir: str | Path, data_dir: str | None = None) -> Recipe:
    """The recipe stored with a run, or (for a run made before runs stored one) that of its dataset folder.

    Args:
        run_dir: the finetuning run folder.
        data_dir: the run's configured dataset folder, used only when ``preprocessing.json`` is absent.

    Raises:
        DataError: the stored record is unusable, or it is absent and the dataset folder is gone.
    """
    path = Path(run_dir) / RECIPE_FILE
    if path.is_file():
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        return Recipe.from_json(content, path)
    if data_dir and DatasetInfo.exists(data_dir):
        return recipe_of_dataset(data_dir)
    raise DataError(f"{path}: not found (the run predates stored preprocessing) and its dataset folder "
                    f"{data_dir!r} from the run's config is gone: the preprocessing of new images is unknown; "
                    "restore that folder (or write its preprocessing.json into the run)")
