"""nnU-Net v2 raw data sets: ``DatasetXXX_Name/`` with ``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``.

Layout read: ``imagesTr/<case>_<XXXX><ending>`` (one file per channel ``XXXX`` = 0000, 0001, ...),
``labelsTr/<case><ending>`` for every training case, optional ``imagesTs/<case>_<XXXX><ending>`` (unlabelled), and
``dataset.json`` with ``channel_names`` (``modality`` in older files), ``labels``, ``numTraining`` and
``file_ending``. Channels named CT (any case) get the kit's CT normalisation, every other channel a per-case
z-score over its non-zero voxels.

Classes: integer labels keep their names and values. A region (a label mapped to a list of values, nnU-Net's
region-based training) whose values no other entry uses becomes one class merging them; a region overlapping other
labels cannot be one class of a single label map, so it is recorded under ``regions`` in ``dataset.json`` (as
class ids) instead, and its values that have no name of their own become classes ``label_<value>``.

Splits: with ``--splits splits_final.json`` fold ``--fold`` (default 0) gives ``train`` and ``val``; training cases
the fold leaves out go to ``test`` (none for nnU-Net's own files). Without it: the seeded 70/10/20 split of the
training cases. ``imagesTs`` cases (``--imagesTs``): their own split ``imagesTs`` (default), ``train`` (pretraining
only: finetuning uses labelled cases) or left out (``skip``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from anatomask_lab.data.io import DataError, image_ending
from anatomask_lab.data.labels import LabelTable
from anatomask_lab.data.prepare import common_options, report
from anatomask_lab.data.preprocess import CaseSource, preprocess_dataset, random_splits

HELP = "an nnU-Net v2 raw data set (dataset.json, imagesTr/<case>_XXXX, labelsTr, imagesTs; any channels)"

REQUIRED_KEYS: tuple[str, ...] = ("channel_names", "labels", "numTraining", "file_ending")
TEST_IMAGES: tuple[str, ...] = ("split", "train", "skip")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class NnunetDataset:
    """What :func:`find_cases` found: everything :func:`prepare` hands to the preprocessing.

    Attributes:
        name: the data set folder's name (``DatasetXXX_Name``).
        channels: channel names in channel order.
        table: the class table (source values 1..N, output classes).
        cases: training cases (labelled) then ``imagesTs`` cases (unlabelled), each with its split.
        split_source: where the splits come from (text).
        extra: keys added to ``dataset.json`` (``source_format``, ``regions``, ``nnunet_splits``, ...).
        notes: what was mapped and how, one line each (printed by the CLI).
    """

    name: str
    channels: tuple[str, ...]
    table: LabelTable
    cases: tuple[CaseSource, ...]
    split_source: str
    extra: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def channel_modality(name: str) -> str:
    """The kit's modality for an nnU-Net channel name: ``CT`` for "CT" (any case), ``PET`` for names with "PET",
    else ``MR`` (every modality but CT is z-scored over its non-zero voxels)."""
    upper = name.strip().upper()
    return "CT" if upper == "CT" else "PET" if "PET" in upper else "MR"


def read_dataset_json(src: Path) -> dict:
    """``<src>/dataset.json``, checked for nnU-Net v2's required keys (``modality`` stands in for
    ``channel_names``).

    Raises:
        DataError: missing, not JSON, a required key missing or of the wrong type.
    """
    path = src / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (an nnU-Net v2 raw data set has dataset.json, imagesTr, labelsTr)")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object")
    if "channel_names" not in content and "modality" in content:
        content["channel_names"] = content["modality"]
    for key in REQUIRED_KEYS:
        if key not in content:
            raise DataError(f"{path}: missing required key {key!r} (nnU-Net v2 needs {', '.join(REQUIRED_KEYS)})")
    names = content["channel_names"]
    if (not isinstance(names, dict) or not names or sorted(names) != [str(i) for i in range(len(names))]
            or not all(isinstance(v, str) and v for v in names.values())):
        raise DataError(f"{path}: 'channel_names' must map \"0\", \"1\", ... to channel names, found {names!r}")
    ending = content["file_ending"]
    if not isinstance(ending, str) or not ending.startswith(".") or image_ending("x" + ending) != ending.lower():
        raise DataError(f"{path}: file_ending {ending!r} is not a readable image format "
                        "(.nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr)")
    n = content["numTraining"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DataError(f"{path}: numTraining must be a non-negative integer, found {n!r}")
    if not isinstance(content["labels"], dict):
        raise DataError(f"{path}: 'labels' must map label names to values")
    return content


def _label_values(labels: Mapping, where) -> tuple[dict[int, str], dict[str, tuple[int, ...]]]:
    """``(value -> name of the integer labels, region name -> values)``, checked."""
    single: dict[int, str] = {}
    regions: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        values = [value] if not isinstance(value, list) else value
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise DataError(f"{where}: label {name!r} must be a non-negative integer or a list of them, "
                            f"found {value!r}")
        if name == "ignore":
            raise DataError(f"{where}: label 'ignore' (nnU-Net's partial annotation) is not supported; relabel "
                            "those voxels or leave the label out")
        if len(set(values)) == 1:
            if values[0] in single:
                raise DataError(f"{where}: labels {single[values[0]]!r} and {name!r} both have value {values[0]}")
            single[values[0]] = name
        else:
            regions[name] = tuple(sorted(set(values)))
    if single.get(0) is None:
        raise DataError(f"{where}: 'labels' has no background entry with value 0")
    if any(0 in vals for vals in regions.values()):
        raise DataError(f"{where}: a region in 'labels' includes the background value 0")
    return single, regions


def label_table(labels: Mapping, where="dataset.json") -> tuple[LabelTable, dict[str, list[int]], list[str]]:
    """The kit's class table for nnU-Net ``labels``, the regions it cannot hold as classes, and notes.

    Source values 1..N (N the largest value named) are the release table: value ``v`` is the integer label named
    ``v``, else ``label_<v>``. Classes follow the values: integer labels one each; a region whose values nothing
    else names merged into one class; values only named by overlapping regions one ``label_<v>`` class each.

    Returns:
        ``(table, {region: [class ids]} of the regions kept out of the table, notes)``.

    Raises:
        DataError: a malformed entry, no background 0, a repeated value, a value in 1..N with no entry, or the
            nnU-Net ``ignore`` label.
    """
    single, regions = _label_values(labels, where)
    top = max([*single, *(v for vals in regions.values() for v in vals)])
    if top == 0:
        raise DataError(f"{where}: 'labels' has no foreground label")
    users: dict[int, list[str]] = {v: [single[v]] if v in single else [] for v in range(1, top + 1)}
    for name, vals in regions.items():
        for v in vals:
            users[v].append(name)
    missing = [v for v, who in users.items() if not who]
    if missing:
        raise DataError(f"{where}: label values {missing[:5]} have no entry in 'labels' (nnU-Net labels are "
                        "consecutive integers)")
    source = tuple(single.get(v, f"label_{v}") for v in range(1, top + 1))
    merged = {n: vals for n, vals in regions.items() if all(users[v] == [n] for v in vals)}
    names, sources, notes = [], [], []
    for v in range(1, top + 1):
        region = next((n for n, vals in merged.items() if v in vals), None)
        if region is not None and v != merged[region][0]:
            continue  # merged into the class made at the region's first value
        names.append(region or source[v - 1])
        sources.append(tuple(source[u - 1] for u in merged[region]) if region else (source[v - 1],))
        if region:
            notes.append(f"region {region!r} (values {list(merged[region])}) is one class: no other label uses them")
        elif v not in single:
            notes.append(f"value {v} has no label of its own; it is class {source[v - 1]!r}")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: label names {names} repeat once unnamed values are called label_<value>")
    table = LabelTable(tuple(names), tuple(sources), source)
    lut = table.lut()
    kept_out = {n: sorted({int(lut[v]) for v in vals}) for n, vals in regions.items() if n not in merged}
    notes += [f"region {n!r} overlaps other labels: not a class; dataset.json 'regions' lists its class ids {ids}"
              for n, ids in kept_out.items()]
    return table, kept_out, notes


def _channel_files(folder: Path, ending: str, n_channels: int) -> dict[str, list[Path | None]]:
    """Case -> one file per channel (None where missing) of ``<folder>/<case>_<XXXX><ending>``.

    Raises:
        DataError: a file named otherwise, or a channel index beyond ``channel_names``.
    """
    found: dict[str, list[Path | None]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending) or not f.is_file():
            continue
        m = _CHANNEL.match(f.name[: -len(ending)])
        if not m:
            raise DataError(f"{f}: not named <case>_<XXXX>{ending} (XXXX: the 4-digit channel)")
        channel = int(m["channel"])
        if channel >= n_channels:
            raise DataError(f"{f}: channel {m['channel']} but dataset.json names {n_channels} channel(s) "
                            f"(0000..{n_channels - 1:04d})")
        found.setdefault(m["case"], [None] * n_channels)[channel] = f
    return found


def _complete(found: dict[str, list[Path | None]], folder: Path, ending: str) -> dict[str, tuple[Path, ...]]:
    """Every case with all its channels, or an error naming the first missing file."""
    for case, files in found.items():
        for c, f in enumerate(files):
            if f is None:
                raise DataError(f"{folder / f'{case}_{c:04d}{ending}'}: missing (case {case!r} has channel(s) "
                                f"{[i for i, g in enumerate(files) if g is not None]} of {len(files)})")
    return {case: tuple(files) for case, files in found.items()}


def _training_cases(src: Path, ending: str, n_channels: int, num_training: int) -> dict[str, tuple[Path, Path]]:
    """Case -> (channel files, label file) of ``imagesTr``/``labelsTr``, checked against ``numTraining``."""
    img_dir, lab_dir = src / "imagesTr", src / "labelsTr"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DataError(f"{d}: missing (an nnU-Net v2 raw data set has imagesTr and labelsTr)")
    images = _complete(_channel_files(img_dir, ending, n_channels), img_dir, ending)
    if not images:
        others = sorted(p.name for p in img_dir.iterdir())[:4]
        raise DataError(f"{img_dir}: no <case>_<XXXX>{ending} files (file_ending in dataset.json); found {others}")
    labels = {f.name[: -len(ending)]: f for f in sorted(lab_dir.iterdir())
              if f.name.endswith(ending) and not f.name.startswith(".") and f.is_file()}
    for case, files in images.items():
        if case not in labels:
            raise DataError(f"{files[0]}: no label {lab_dir / (case + ending)}")
    for case, f in labels.items():
        if case not in images:
            raise DataError(f"{f}: label without images {img_dir / f'{case}_0000{ending}'}")
    if len(images) != num_training:
        raise DataError(f"{src / 'dataset.json'}: numTraining is {num_training} but imagesTr/labelsTr hold "
                        f"{len(images)} cases; fix numTraining or the folders")
    return {case: (images[case], labels[case]) for case in sorted(images)}


def read_splits(path, fold: int, cases) -> dict[str, str]:
    """Case -> ``train``/``val`` from fold ``fold`` of nnU-Net's ``splits_final.json``; other cases -> ``test``.

    Args:
        path: ``splits_final.json``: a list with one ``{"train": [ids], "val": [ids]}`` per fold.
        fold: the fold (0-based).
        cases: the training case ids found.

    Raises:
        DataError: unreadable or malformed file, a fold out of range, a case in both lists, or ids (of any fold)
            that are not training cases.
    """
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(folds, list) or not folds or not all(
            isinstance(f, dict) and all(isinstance(f.get(k), list) and all(isinstance(i, str) for i in f[k])
                                        for k in ("train", "val")) for f in folds):
        raise DataError(f"{path}: expected a list of {{\"train\": [case ids], \"val\": [case ids]}}, one per fold")
    if not 0 <= fold < len(folds):
        raise DataError(f"--fold {fold}: {path} has folds 0..{len(folds) - 1}")
    known = set(cases)
    unknown = sorted({i for f in folds for k in ("train", "val") for i in f[k]} - known)
    if unknown:
        raise DataError(f"{path}: names cases that are not in imagesTr: {unknown[:5]}")
    both = sorted(set(folds[fold]["train"]) & set(folds[fold]["val"]))
    if both:
        raise DataError(f"{path}: fold {fold} has cases in both train and val: {both[:5]}")
    split_of = {i: "test" for i in cases}
    split_of.update({i: "train" for i in folds[fold]["train"]})
    split_of.update({i: "val" for i in folds[fold]["val"]})
    return split_of


def _test_cases(src: Path, ending: str, modalities: tuple[str, ...], split: str) -> list[CaseSource]:
    """The unlabelled ``imagesTs`` cases (none when the folder is absent), each in ``split``."""
    folder = src / "imagesTs"
    if not folder.is_dir():
        return []
    images = _complete(_channel_files(folder, ending, len(modalities)), folder, ending)
    return [CaseSource(case, images[case], modalities, split=split) for case in sorted(images)]


def find_cases(src, *, splits=None, fold: int | None = None, test_images: str = "split",
               seed: int = 0) -> NnunetDataset:
    """Scan an nnU-Net v2 raw data set and decide classes, channels and splits (nothing is read but names).

    Args:
        src: the ``DatasetXXX_Name`` folder.
        splits: nnU-Net's ``splits_final.json``, or None for the seeded 70/10/20 split.
        fold: fold of ``splits`` (default 0); only with ``splits``.
        test_images: ``imagesTs`` cases in their own split ``imagesTs`` (``split``), in ``train`` (``train``)
            or left out (``skip``).
        seed: seed of the 70/10/20 split.

    Raises:
        DataError: see :func:`read_dataset_json`, :func:`label_table`, :func:`read_splits`; a missing channel,
            label or folder; ``numTraining`` against what the folders hold.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if test_images not in TEST_IMAGES:
        raise DataError(f"--imagesTs {test_images!r}: choose one of {', '.join(TEST_IMAGES)}")
    if fold is not None and splits is None:
        raise DataError(f"--fold {fold}: needs --splits (nnU-Net's splits_final.json)")
    content = read_dataset_json(src)
    ending = content["file_ending"]
    channels = tuple(content["channel_names"][str(i)] for i in range(len(content["channel_names"])))
    modalities = tuple(channel_modality(c) for c in channels)
    table, regions, notes = label_table(content["labels"], src / "dataset.json")
    training = _training_cases(src, ending, len(channels), content["numTraining"])
    extra: dict = {"source_format": "nnU-Net v2 raw", "source_dataset": str(src.resolve()),
                   "imagesTs": test_images, **({"regions": regions} if regions else {})}
    if splits is not None:
        split_of = read_splits(splits, fold or 0, list(training))
        extra["nnunet_splits"] = {"file": str(Path(splits).resolve()), "fold": fold or 0}
        split_source = f"nnU-Net {Path(splits).name} fold {fold or 0} (train, val); cases outside it: test"
    else:
        split_of = random_splits(list(training), seed)
        split_source = f"random 70/10/20 of imagesTr, seed {seed}"
    cases = [CaseSource(case, images, modalities, label=label, split=split_of[case])
             for case, (images, label) in training.items()]
    if test_images != "skip":
        cases += _test_cases(src, ending, modalities, "imagesTs" if test_images == "split" else "train")
        split_source += ("; imagesTs: own split 'imagesTs', unlabelled" if test_images == "split"
                         else "; imagesTs: train, unlabelled (pretraining only)")
    return NnunetDataset(src.resolve().name, channels, table, tuple(cases), split_source, extra, tuple(notes))


def prepare(src, out, *, splits=None, fold: int | None = None, test_images: str = "split",
            spacing=(1.5, 1.5, 1.5), workers=None, clip: bool = True, label_mode: str = "nearest", seed: int = 0,
            progress: bool = True) -> Path:
    """Find the nnU-Net data set under ``src`` (:func:`find_cases`) and write the preprocessed dataset to ``out``."""
    found = find_cases(src, splits=splits, fold=fold, test_images=test_images, seed=seed)
    return _preprocess(found, out, spacing=spacing, workers=workers, clip=clip, label_mode=label_mode, seed=seed,
                       progress=progress)


def _preprocess(found: NnunetDataset, out, **options) -> Path:
    return preprocess_dataset(found.cases, out, name=found.name, channels=found.channels, table=found.table,
                              split_source=found.split_source, extra=found.extra, **options)


def add_arguments(parser) -> None:
    parser.add_argument("--splits", type=Path, default=None, metavar="JSON",
                        help="nnU-Net's splits_final.json: the fold's train/val become train/val (default: the "
                             "seeded 70/10/20 split)")
    parser.add_argument("--fold", type=int, default=None, help="fold of --splits (default 0)")
    parser.add_argument("--imagesTs", choices=TEST_IMAGES, default="split", dest="test_images",
                        help="unlabelled imagesTs cases: their own split 'imagesTs' (default), 'train' (used by "
                             "pretraining only) or 'skip'")


def run(args) -> int:
    found = find_cases(args.src, splits=args.splits, fold=args.fold, test_images=args.test_images, seed=args.seed)
    for note in found.notes:
        print(f"note: {note}")
    out = _preprocess(found, args.out, **common_options(args))
    print(report(out))
    return 0
