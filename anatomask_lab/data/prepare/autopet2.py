"""AutoPET II: whole-body FDG PET/CT with a lesion mask; CT and SUV become two channels.

Release layout: ``<src>/PETCT_<patient>/<study date and name>/{CTres,SUV,SEG}.nii.gz`` (``CTres`` is the CT
resampled to the PET grid). Case ids are ``PETCT_<patient>_<k>`` with ``k`` the study's rank by name; the study
folder name is kept in the case metadata. There is no official split: 70/10/20 by patient (seeded), so studies of
one patient never straddle train and test.
"""

from __future__ import annotations

from pathlib import Path

from anatomask_lab.data.io import DataError
from anatomask_lab.data.labels import make_label_table
from anatomask_lab.data.prepare import common_options, report
from anatomask_lab.data.preprocess import CaseSource, preprocess_dataset

HELP = "AutoPET II (PETCT_*/<study>/{CTres,SUV,SEG}.nii.gz; CT + SUV channels, lesion label)"

CLASSES: tuple[str, ...] = ("lesion",)


def find_cases(src) -> tuple[list[CaseSource], list[str]]:
    """Scan an AutoPET II release.

    Returns:
        ``(cases, patient per case)``.

    Raises:
        DataError: missing folder, no ``PETCT_*`` studies, a study without ``CTres`` or ``SUV``.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    patients = sorted(d for d in src.iterdir() if d.is_dir() and d.name.startswith("PETCT_"))
    if not patients:
        entries = sorted(p.name for p in src.iterdir())
        raise DataError(f"{src}: no PETCT_* patient folders (AutoPET II layout); found {entries[:6]}")
    cases, groups = [], []
    for pat in patients:
        studies = sorted(d for d in pat.iterdir() if d.is_dir())
        if not studies:
            raise DataError(f"{pat}: no study folder inside")
        for k, study in enumerate(studies):
            ct, suv, seg = study / "CTres.nii.gz", study / "SUV.nii.gz", study / "SEG.nii.gz"
            for f in (ct, suv):
                if not f.is_file():
                    raise DataError(f"{f}: missing (each study needs CTres.nii.gz and SUV.nii.gz)")
            cases.append(CaseSource(f"{pat.name}_{k}", (ct, suv), ("CT", "PET"),
                                    label=seg if seg.is_file() else None,
                                    info=(("patient", pat.name), ("study", study.name))))
            groups.append(pat.name)
    return cases, groups


def prepare(src, out, *, spacing=(1.5, 1.5, 1.5), workers=None, clip: bool = True, label_mode: str = "nearest",
            seed: int = 0, progress: bool = True) -> Path:
    """Find AutoPET II studies under ``src`` and write the preprocessed dataset to ``out``."""
    cases, groups = find_cases(src)
    return preprocess_dataset(cases, out, name="autopet2", channels=["CT", "PET"], table=make_label_table(CLASSES),
                              spacing=spacing, clip=clip, label_mode=label_mode, workers=workers,
                              progress=progress, seed=seed, split_groups=groups)


def add_arguments(parser) -> None:
    return None


def run(args) -> int:
    out = prepare(args.src, args.out, **common_options(args))
    print(report(out))
    return 0
