"""Class tables and label loading: how a release's labels become one label map with the prepared class ids.

A release brings either one label-map file per case whose values index its class table (FLARE22, AMOS22, AutoPET)
or one binary mask per structure (TotalSegmentator). :func:`make_label_table` turns the release table and an
optional selection (``--classes``) into a :class:`LabelTable`; :func:`load_case_label` reads and merges one case's
labels on its image grid. The preparer (:func:`anatomask_lab.data.preprocess.preprocess_case`) and the reference
writer (:func:`anatomask_lab.data.preprocess.reference_label`) both go through it, so a prepared label and a
reference label of the same case always agree.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anatomask_lab.data.io import DataError, check_same_grid, load_nifti

__all__ = ["LabelTable", "load_case_label", "load_label_map", "make_label_table", "merge_masks"]


@dataclass(frozen=True)
class LabelTable:
    """Output classes 1..K and, for each, the source structures merged into it.

    Attributes:
        names: output class names; class ``i + 1`` is ``names[i]`` (0 is background).
        sources: for each output class, the source structures merged into it.
        source_names: the release's table: ``source_names[i]`` is the source class with value ``i + 1`` in a
            label-map release (or a mask name); masks are merged in this order.
    """

    names: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    source_names: tuple[str, ...]

    def lut(self) -> np.ndarray:
        """Look-up table source value -> output id, int64 [len(source_names) + 1]."""
        index = {n: i + 1 for i, n in enumerate(self.source_names)}
        lut = np.zeros(len(self.source_names) + 1, dtype=np.int64)
        for out_id, srcs in enumerate(self.sources, start=1):
            for s in srcs:
                lut[index[s]] = out_id
        return lut

    def mask_ids(self) -> dict[str, int]:
        """Source structure name -> output id, for the selected structures only."""
        return {s: i for i, srcs in enumerate(self.sources, start=1) for s in srcs}

    @property
    def dtype(self):
        """uint8 up to 255 classes, else int16."""
        return np.uint8 if len(self.names) < 256 else np.int16


def make_label_table(source_names: Sequence[str], classes: Sequence[str] | None = None) -> LabelTable:
    """Build the output class table from a source table and an optional selection.

    Args:
        source_names: the release's classes in value order (value 1 first) or its structure names.
        classes: ``None`` keeps every source class in order; otherwise entries ``name`` (a source class) or
            ``name=pattern[+pattern...]`` (a group of source classes matched with shell wildcards, e.g.
            ``vertebrae=vertebrae_*``). Output ids follow the entry order; each source class joins the first
            entry that matches it; unselected classes become background.

    Raises:
        DataError: an entry matches nothing, or a name repeats.
    """
    source_names = tuple(source_names)
    if classes is None:
        return LabelTable(source_names, tuple((n,) for n in source_names), source_names)
    names, sources, taken = [], [], set()
    for entry in classes:
        entry = entry.strip()
        if not entry:
            continue
        name, _, pattern = entry.partition("=")
        pats = pattern.split("+") if pattern else [name]
        found = [s for s in source_names if any(fnmatch.fnmatchcase(s, p) for p in pats) and s not in taken]
        if not found:
            raise DataError(f"class '{entry}': matches no structure of the source class table "
                            f"({len(source_names)} classes, e.g. {', '.join(source_names[:5])})")
        if name in names:
            raise DataError(f"class '{name}' is listed twice")
        taken.update(found)
        names.append(name)
        sources.append(tuple(found))
    if not names:
        raise DataError("empty class selection")
    return LabelTable(tuple(names), tuple(sources), source_names)


def load_label_map(path: Path, shape, affine, ref: Path, table: LabelTable) -> np.ndarray:
    """Read a label-map file on the canonical grid and renumber its values to the table's output ids.

    Args:
        path: the label map; its values index ``table.source_names`` (0 is background).
        shape: canonical shape of the case's image, which the label must share.
        affine: canonical affine of the case's image.
        ref: the image file, named in errors.
        table: the output class table.

    Raises:
        DataError: another grid, non-integer values, or values outside the source table.
    """
    data, aff, _ = load_nifti(path, dtype=None)
    check_same_grid(shape, affine, ref, data.shape, aff, path)
    if data.dtype.kind == "f" and not np.all(np.mod(data, 1) == 0):
        raise DataError(f"{path}: label map has non-integer values")
    data = data.astype(np.int64)
    n = len(table.source_names)
    bad = (data < 0) | (data > n)
    if bad.any():
        vals = np.unique(data[bad])[:10].tolist()
        raise DataError(f"{path}: label values {vals} outside the class table (0..{n})")
    return table.lut()[data].astype(table.dtype)


def merge_masks(masks, shape, affine, ref: Path, table: LabelTable) -> np.ndarray:
    """Merge binary masks into a label map; where masks overlap, the structure later in the source table wins.

    Args:
        masks: ``(structure, file)`` pairs; structures outside the selection are not read.
        shape: canonical shape of the case's image.
        affine: canonical affine of the case's image.
        ref: the image file, named in errors.
        table: the output class table.

    Raises:
        DataError: a mask on another grid or with values outside {0, 1}.
    """
    ids = table.mask_ids()
    order = {n: i for i, n in enumerate(table.source_names)}
    out = np.zeros(shape, dtype=table.dtype)
    for name, path in sorted(masks, key=lambda m: order.get(m[0], -1)):
        if name not in ids:
            continue
        data, aff, _ = load_nifti(path, dtype=None)
        check_same_grid(shape, affine, ref, data.shape, aff, path)
        vals = np.unique(data)
        if not np.all(np.isin(vals, (0, 1))):
            raise DataError(f"{path}: mask values {vals[:10].tolist()} outside {{0, 1}}")
        out[data > 0] = ids[name]
    return out


def load_case_label(label: Path | None, masks, shape, affine, ref: Path, table: LabelTable | None
                    ) -> np.ndarray | None:
    """One case's label map on its canonical image grid, with the table's output ids (None when unlabelled).

    Args:
        label: a label-map file, or None.
        masks: ``(structure, file)`` pairs, used when ``label`` is None.
        shape: canonical shape of the case's image.
        affine: canonical affine of the case's image.
        ref: the image file, named in errors.
        table: the output class table; None means images only.
    """
    if table is None:
        return None
    if label is not None:
        return load_label_map(Path(label), shape, affine, ref, table)
    if masks:
        return merge_masks(masks, shape, affine, ref, table)
    return None
