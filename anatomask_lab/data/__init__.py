"""Data: NIfTI input/output, the CT phantom cohort, preprocessing, preparers and the patch sampler.

Light modules (numpy, scipy, nibabel) are imported here; the torch-based sampler is imported on first use, so
preprocessing worker processes do not pay for importing torch. ``dataset.json`` is read and written by
:class:`~anatomask_lab.data.dataset.DatasetInfo` only.
"""

from __future__ import annotations

import importlib

from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.data.io import DataError, load_nifti, save_nifti
from anatomask_lab.data.phantom import PHANTOM_CLASSES, PHANTOM_STRUCTURES, generate_case, generate_cohort
from anatomask_lab.data.preprocess import preprocess_dataset
from anatomask_lab.data.resample import restore_to_original, write_prediction

_LAZY = {
    "PatchDataset": "anatomask_lab.data.sampler",
    "load_case": "anatomask_lab.data.sampler",
    "check_patch_size": "anatomask_lab.data.sampler",
}

__all__ = [
    "PHANTOM_CLASSES",
    "PHANTOM_STRUCTURES",
    "DataError",
    "DatasetInfo",
    "PatchDataset",
    "check_patch_size",
    "generate_case",
    "generate_cohort",
    "load_case",
    "load_nifti",
    "preprocess_dataset",
    "restore_to_original",
    "save_nifti",
    "write_prediction",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anatomask_lab.data' has no attribute {name!r}")
