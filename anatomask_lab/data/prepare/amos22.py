"""AMOS22: abdominal CT and MRI with 15 organ labels; CT and MRI are told apart by the case number.

Release layout: ``imagesTr/amos_XXXX.nii.gz`` with ``labelsTr/amos_XXXX.nii.gz``, ``imagesVa`` (with ``labelsVa``
where released) and ``imagesTs``. Ids below 500 are CT, 500 and above MRI. The release's own split is kept
(Tr -> train, Va -> val, Ts -> test). ``--modality ct`` (default), ``mr`` or ``all``.
"""

from __future__ import annotations

import re
from pathlib import Path

from anatomask_lab.data.io import DataError
from anatomask_lab.data.labels import make_label_table
from anatomask_lab.data.prepare import common_options, parse_classes, report
from anatomask_lab.data.preprocess import CaseSource, preprocess_dataset

HELP = "AMOS22 (imagesTr/labelsTr/imagesVa/imagesTs; CT id < 500, MRI id >= 500)"

#: AMOS22 label values 1..15, with TotalSegmentator-style names.
CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "pancreas", "adrenal_gland_right", "adrenal_gland_left", "duodenum", "urinary_bladder",
    "prostate_uterus",
)
MRI_FIRST_ID = 500
_NAME = re.compile(r"^amos_(\d{4})\.nii\.gz$")
_PARTS = (("Tr", "train"), ("Va", "val"), ("Ts", "test"))


def modality_of(case_number: int) -> str:
    """``"CT"`` for AMOS ids below 500, else ``"MR"``."""
    return "CT" if case_number < MRI_FIRST_ID else "MR"


def find_cases(src, modality: str = "ct") -> list[CaseSource]:
    """Scan an AMOS22 release, keeping ``modality`` (``ct``, ``mr`` or ``all``).

    Raises:
        DataError: missing folder, no ``images{Tr,Va,Ts}``, a labelled part image without its label or the reverse,
            unexpected file names.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if modality not in ("ct", "mr", "all"):
        raise DataError(f"modality must be ct, mr or all, not {modality!r}")
    if not any((src / f"images{p}").is_dir() for p, _ in _PARTS):
        entries = sorted(p.name for p in src.iterdir())
        raise DataError(f"{src}: no imagesTr/imagesVa/imagesTs folder (AMOS22 layout); found {entries[:6]}")
    cases = []
    for part, split in _PARTS:
        img_dir, lab_dir = src / f"images{part}", src / f"labels{part}"
        if not img_dir.is_dir():
            continue
        labels = {}
        if lab_dir.is_dir():
            for f in sorted(lab_dir.glob("*.nii.gz")):
                if not _NAME.match(f.name):
                    raise DataError(f"{f}: unexpected file name (amos_XXXX.nii.gz)")
                labels[f.name] = f
        images = sorted(img_dir.glob("*.nii.gz"))
        for f in images:
            m = _NAME.match(f.name)
            if not m:
                raise DataError(f"{f}: unexpected file name (amos_XXXX.nii.gz)")
            mod = modality_of(int(m.group(1)))
            if labels and f.name not in labels:
                raise DataError(f"{f}: no label {lab_dir / f.name}")
            if modality != "all" and mod.lower() != modality:
                continue
            cases.append(CaseSource(f.name[: -len(".nii.gz")], (f,), (mod,), label=labels.get(f.name), split=split,
                                    info=(("modality", mod),)))
        names = {f.name for f in images}
        for name, f in labels.items():
            if name not in names:
                raise DataError(f"{f}: label without its image in {img_dir}")
    if not cases:
        raise DataError(f"{src}: no {modality.upper()} cases found")
    return cases


def prepare(src, out, *, classes=None, modality: str = "ct", spacing=(1.5, 1.5, 1.5), workers=None,
            clip: bool = True, label_mode: str = "nearest", seed: int = 0, progress: bool = True) -> Path:
    """Find AMOS22 cases under ``src`` and write the preprocessed dataset to ``out``."""
    cases = find_cases(src, modality)
    table = make_label_table(CLASSES, parse_classes(classes) if isinstance(classes, str) else classes)
    channel = {"ct": "CT", "mr": "MR", "all": "CT_or_MR"}[modality]
    return preprocess_dataset(cases, out, name="amos22", channels=[channel], table=table, spacing=spacing,
                              clip=clip, label_mode=label_mode, workers=workers, progress=progress, seed=seed,
                              extra={"modality_by_case": {c.case_id: c.modalities[0] for c in cases}})


def add_arguments(parser) -> None:
    parser.add_argument("--classes", default=None, help="comma-separated class entries (default: all 15)")
    parser.add_argument("--modality", choices=("ct", "mr", "all"), default="ct",
                        help="which cases: CT (id < 500, default), MR (id >= 500) or all")


def run(args) -> int:
    out = prepare(args.src, args.out, classes=args.classes, modality=args.modality, **common_options(args))
    print(report(out))
    return 0
