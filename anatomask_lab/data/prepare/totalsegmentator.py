"""TotalSegmentator (v1: 104 structures, v2: 117) and the phantom cohort, which uses the same layout.

Release layout: ``<src>/<subject>/ct.nii.gz``, ``<src>/<subject>/segmentations/<structure>.nii.gz`` (one binary
mask per structure) and ``<src>/meta.csv`` (``;``-separated, columns ``image_id`` and ``split`` among others).
The masks are merged into one label map with a stable class table: the official TotalSegmentator class order of
the release version (``total_v1`` / ``total`` in TotalSegmentator's ``map_to_binary.py``), or a selection of it
(``--classes liver,spleen,vertebrae=vertebrae_*``; ``--classes phantom`` is the demo's 15-class table).

    anatomask-lab prepare totalsegmentator --src DIR --out DIR [--classes a,b,c] [--spacing 1.5] [--workers N]
"""

from __future__ import annotations

import csv
from pathlib import Path

from anatomask_lab.data.io import DataError
from anatomask_lab.data.labels import make_label_table
from anatomask_lab.data.prepare import common_options, parse_classes, report
from anatomask_lab.data.preprocess import CaseSource, preprocess_dataset

HELP = "TotalSegmentator v1/v2 release layout (also the phantom cohort)"

_RIBS_L = tuple(f"rib_left_{i}" for i in range(1, 13))
_RIBS_R = tuple(f"rib_right_{i}" for i in range(1, 13))
_LUMBAR_TO_C1 = ("vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1",
                 *(f"vertebrae_T{i}" for i in range(12, 0, -1)), *(f"vertebrae_C{i}" for i in range(7, 0, -1)))
_LIMB_MUSCLES = ("gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
                 "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
                 "iliopsoas_left", "iliopsoas_right")

#: TotalSegmentator v1 classes in label order (value 1 first), 104 structures.
V1_STRUCTURES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
    "lung_lower_lobe_right", *_LUMBAR_TO_C1, "esophagus", "trachea", "heart_myocardium", "heart_atrium_left",
    "heart_ventricle_left", "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "small_bowel", "duodenum",
    "colon", *_RIBS_L, *_RIBS_R, "humerus_left", "humerus_right", "scapula_left", "scapula_right",
    "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face",
    *_LIMB_MUSCLES, "urinary_bladder",
)

#: TotalSegmentator v2 classes in label order (value 1 first), 117 structures.
V2_STRUCTURES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea", "thyroid_gland", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left", "kidney_cyst_right", "sacrum",
    "vertebrae_S1", *_LUMBAR_TO_C1, "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk",
    "subclavian_artery_right", "subclavian_artery_left", "common_carotid_artery_right",
    "common_carotid_artery_left", "brachiocephalic_vein_left", "brachiocephalic_vein_right",
    "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left",
    "humerus_right", "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left",
    "femur_right", "hip_left", "hip_right", "spinal_cord", *_LIMB_MUSCLES, "brain", "skull", *_RIBS_L, *_RIBS_R,
    "sternum", "costal_cartilages",
)

TABLES = {"v1": V1_STRUCTURES, "v2": V2_STRUCTURES}


def _presets() -> dict[str, tuple[str, ...]]:
    from anatomask_lab.data.phantom import PHANTOM_CLASSES

    return {"phantom": PHANTOM_CLASSES}


def detect_version(names: set[str], example: Path) -> str:
    """``"v1"`` or ``"v2"`` from the structure names found (v2 when both fit, e.g. the phantom).

    Raises:
        DataError: names that belong to neither table.
    """
    if names <= set(V2_STRUCTURES):
        return "v2"
    if names <= set(V1_STRUCTURES):
        return "v1"
    unknown = sorted(names - set(V1_STRUCTURES) - set(V2_STRUCTURES))
    if unknown:
        raise DataError(f"{example}: structures {unknown[:8]} are in neither the v1 (104) nor the v2 (117) "
                        "TotalSegmentator class table")
    raise DataError(f"{example}: structure files mix the v1 and v2 class tables")


def _read_meta(path: Path) -> dict[str, str]:
    text = path.read_text()
    first = text.splitlines()[0] if text.strip() else ""
    delim = ";" if ";" in first else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delim))
    if not rows or "image_id" not in rows[0]:
        raise DataError(f"{path}: expected a ';'-separated table with an image_id column")
    if "split" not in rows[0]:
        return {}
    return {r["image_id"].strip(): (r.get("split") or "").strip() or None for r in rows}


def find_cases(src, version: str = "auto") -> tuple[list[CaseSource], str]:
    """Scan a TotalSegmentator-layout folder.

    Args:
        src: release folder.
        version: ``"v1"``, ``"v2"`` or ``"auto"`` (from the structure names; see :func:`detect_version`).

    Returns:
        ``(cases, version)``; a subject without ``segmentations/`` is unlabelled.

    Raises:
        DataError: missing or empty folder, no ``<subject>/ct.nii.gz``, structure names outside the table, bad
            ``meta.csv``.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    subjects = sorted(d for d in src.iterdir() if d.is_dir() and (d / "ct.nii.gz").is_file())
    dropped = sorted(d for d in src.iterdir() if d.is_dir() and d not in subjects and (
        (d / "ct.nii.gz").is_symlink() or (d / "ct.nii.gz").exists() or (d / "segmentations").is_dir()))
    if dropped:  # a subject whose image cannot be read is an error, not a case to skip silently
        raise DataError(f"{dropped[0] / 'ct.nii.gz'}: missing or unreadable (a broken link or not a file); "
                        f"{len(dropped)} subject(s) affected")
    if not subjects:
        entries = sorted(p.name for p in src.iterdir())
        what = f"it holds {len(entries)} entries, e.g. {entries[:5]}" if entries else "it is empty"
        raise DataError(f"{src}: no TotalSegmentator subjects (<subject>/ct.nii.gz) found; {what}")
    splits = _read_meta(src / "meta.csv") if (src / "meta.csv").is_file() else {}
    masks_of, names = {}, set()
    for d in subjects:
        seg = d / "segmentations"
        if seg.is_dir():
            files = sorted(seg.glob("*.nii.gz"))
            masks_of[d.name] = tuple((f.name[: -len(".nii.gz")], f) for f in files)
            names.update(n for n, _ in masks_of[d.name])
    if version == "auto":
        outside = names - set(V1_STRUCTURES) - set(V2_STRUCTURES)  # name the file of an unknown structure
        example = next((f for m in masks_of.values() for n, f in m if n in outside or not outside), src)
        version = detect_version(names, example) if names else "v2"
    elif version not in TABLES:
        raise DataError(f"unknown TotalSegmentator version {version!r} (v1, v2 or auto)")
    unknown = sorted(names - set(TABLES[version]))
    if unknown:
        bad = next(f for m in masks_of.values() for n, f in m if n == unknown[0])
        raise DataError(f"{bad}: structure {unknown[0]!r} is not in the TotalSegmentator {version} class table "
                        f"({len(unknown)} unknown names)")
    cases = [
        CaseSource(case_id=d.name, images=(d / "ct.nii.gz",), modalities=("CT",), masks=masks_of.get(d.name, ()),
                   split=splits.get(d.name))
        for d in subjects
    ]
    return cases, version


def prepare(src, out, *, classes=None, version: str = "auto", spacing=(1.5, 1.5, 1.5), workers=None,
            clip: bool = True, label_mode: str = "nearest", seed: int = 0, progress: bool = True) -> Path:
    """Find the cases under ``src`` and write the preprocessed dataset to ``out`` (see ``preprocess_dataset``).

    Args:
        classes: None (the version's full table), a preset name (``"phantom"``), or a list of entries
            (``name`` or ``name=glob+glob``; see :func:`anatomask_lab.data.labels.make_label_table`).
    """
    cases, version = find_cases(src, version)
    if isinstance(classes, str):
        classes = parse_classes(classes, _presets())
    table = make_label_table(TABLES[version], classes)
    return preprocess_dataset(cases, out, name="totalsegmentator", channels=["CT"], table=table, spacing=spacing,
                              clip=clip, label_mode=label_mode, workers=workers, progress=progress, seed=seed,
                              extra={"source_table": f"TotalSegmentator {version}"})


def add_arguments(parser) -> None:
    parser.add_argument("--classes", default=None,
                        help="comma-separated class entries (name or name=glob+glob), or 'phantom'; "
                             "default: the full v1/v2 table")
    parser.add_argument("--version", choices=("auto", "v1", "v2"), default="auto",
                        help="class table (default: detected from the structure names)")


def run(args) -> int:
    out = prepare(args.src, args.out, classes=parse_classes(args.classes, _presets()), version=args.version,
                  **common_options(args))
    print(report(out))
    return 0
