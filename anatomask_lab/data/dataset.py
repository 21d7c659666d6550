"""``dataset.json``: the one reader and writer of a prepared dataset folder's description.

:func:`anatomask_lab.data.preprocess.preprocess_dataset` writes it last; the sampler, finetuning, prediction and
evaluation read it through :class:`DatasetInfo`. The file holds (``docs/data.md`` has the whole folder layout)::

    format, name, channels, labels {name: id}, class_names, class_sources {name: [source structures]},
    source_classes (the release's class table, value order), spacing, axes, label_dtype, normalisation,
    split_source, splits {train, val, test: [ids]}, num_cases, cases [{id, has_label, split, shape}],
    channel_names {"0": name}, numTraining, file_ending, ...

plus any keys a preparer adds (kept as :attr:`DatasetInfo.extra`). Each case's split is held once, by its case
entry; the ``splits`` lists and ``num_cases`` are derived from the cases when writing, and checked against them
when reading.

Four keys carry nnU-Net v2's names where they mean the same: ``labels`` ({name: id}, background 0),
``channel_names`` ({"0": name, ...}, derived from ``channels``), ``numTraining`` (the number of labelled cases,
derived from the cases) and ``file_ending`` (the ending of the source images the cases were prepared from, as an
nnU-Net preprocessed folder keeps its raw data's; absent when unknown or mixed: the kit's own arrays are always
``.npy``). Files written before these keys read as before; when present they must agree with the kit's own keys.

Case ids name folders under ``cases/`` and output files, and a prepared folder may come from another user, so
every id read is checked to be one plain file name.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PureWindowsPath
from typing import Any

from anatomask_lab.data.io import DataError, atomic_write_json
from anatomask_lab.data.labels import LabelTable

__all__ = [
    "AXES",
    "FILE_NAME",
    "FORMAT",
    "SPLITS",
    "CaseEntry",
    "DatasetInfo",
    "case_dir",
    "check_case_id",
    "read_case_meta",
]

FORMAT = "anatomask-lab preprocessed v1"
FILE_NAME = "dataset.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
AXES = "image [C, x, y, z], label [x, y, z]; canonical RAS+ grid (x right, y anterior, z superior)"
_KNOWN = ("format", "name", "channels", "labels", "class_names", "class_sources", "source_classes", "spacing",
          "axes", "label_dtype", "normalisation", "split_source", "splits", "num_cases", "cases", "channel_names",
          "numTraining", "file_ending")


def check_case_id(case_id: Any, where: str | Path = FILE_NAME) -> str:
    """Return ``case_id`` if it is one plain file name, else raise.

    Args:
        case_id: the id to check.
        where: the file named in the error.

    Raises:
        DataError: not a non-empty string, holds a path separator or NUL, is ``.`` or ``..``, or is absolute.
    """
    bad = (not isinstance(case_id, str) or not case_id or any(c in case_id for c in "/\\\0")
           or case_id in (".", "..") or bool(PureWindowsPath(case_id).drive))
    if bad:
        raise DataError(f"{where}: unsafe case id {case_id!r} (expected a plain name: no path separators, "
                        "no '..', not absolute)")
    return case_id


@dataclass(frozen=True)
class CaseEntry:
    """One case of a prepared dataset.

    Attributes:
        id: case id, the folder name under ``cases/``.
        has_label: whether ``label.npy`` exists.
        split: the split the case belongs to (``train``, ``val``, ``test``, or a data set's own name).
        shape: preprocessed shape [X, Y, Z], or None when not recorded.
    """

    id: str
    has_label: bool
    split: str
    shape: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as written in ``dataset.json``."""
        return {"id": self.id, "has_label": self.has_label, "split": self.split,
                "shape": list(self.shape) if self.shape is not None else None}


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says about a prepared dataset folder.

    Attributes:
        name: data set name (``flare22``, ``totalsegmentator``, ...).
        channels: channel names, e.g. ``("CT",)`` or ``("CT", "PET")``.
        class_names: output classes by id, background first (empty for an images-only data set).
        class_sources: output class -> the source structures merged into it.
        source_classes: the release's class table in value order (empty when not recorded).
        spacing: voxel spacing in mm, or None.
        cases: every case, in preparation order.
        normalisation: how intensities were normalised (text).
        split_source: where the splits come from (text).
        label_dtype: dtype name of ``label.npy``, or None.
        axes: the array axis convention (text).
        file_ending: ending of the source image files (``.nii.gz``, ``.mha``, ...), or None when unknown or mixed.
        format: format tag.
        extra: any other keys, written back unchanged.
        path: the file this was read from (named in errors; not compared).
    """

    name: str = ""
    channels: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    class_sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source_classes: tuple[str, ...] = ()
    spacing: tuple[float, ...] | None = None
    cases: tuple[CaseEntry, ...] = ()
    normalisation: str = ""
    split_source: str = ""
    label_dtype: str | None = None
    axes: str = AXES
    file_ending: str | None = None
    format: str = FORMAT
    extra: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False, repr=False)

    # -- reading and writing ------------------------------------------------------------------------------------

    @staticmethod
    def file(data_dir: str | Path) -> Path:
        """``<data_dir>/dataset.json``."""
        return Path(data_dir) / FILE_NAME

    @staticmethod
    def exists(data_dir: str | Path) -> bool:
        """Whether ``data_dir`` holds a ``dataset.json`` (a finished preparation)."""
        return DatasetInfo.file(data_dir).is_file()

    @classmethod
    def read(cls, data_dir: str | Path) -> DatasetInfo:
        """Read and check ``<data_dir>/dataset.json``.

        Raises:
            DataError: the file is missing, not JSON, or malformed (message names the file and the problem).
        """
        path = cls.file(data_dir)
        if not path.is_file():
            raise DataError(f"{path}: not found; is {data_dir} a prepared dataset folder (run `anatomask-lab "
                            "prepare`)?")
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(content, path)

    @classmethod
    def from_json(cls, content: Any, path: str | Path = FILE_NAME) -> DatasetInfo:
        """Build from the parsed content of a ``dataset.json`` (``path`` is named in errors).

        Raises:
            DataError: a malformed entry.
        """
        if not isinstance(content, Mapping):
            raise DataError(f"{path}: expected a JSON object, found {type(content).__name__}")
        def get(key: str, default: Any = None) -> Any:  # a null value counts as absent
            value = content.get(key)
            return default if value is None else value

        cases = _cases(content, path)
        _check_num_training(content, cases, path)
        return cls(
            name=str(get("name") or ""),
            channels=_channels(content, path),
            class_names=_class_names(content, path),
            class_sources={str(k): _strings(v, f"class_sources[{k!r}]", path)
                           for k, v in _mapping(get("class_sources", {}), "class_sources", path).items()},
            source_classes=_strings(get("source_classes", []), "source_classes", path),
            spacing=_spacing(get("spacing"), path),
            cases=cases,
            normalisation=str(get("normalisation") or ""),
            split_source=str(get("split_source") or ""),
            label_dtype=get("label_dtype"),
            axes=str(get("axes") or AXES),
            file_ending=_file_ending(get("file_ending"), path),
            format=str(get("format") or FORMAT),
            extra={k: v for k, v in content.items() if k not in _KNOWN},
            path=Path(path),
        )

    def to_json(self) -> dict[str, Any]:
        """The ``dataset.json`` content (derived keys ``labels``, ``splits`` and ``num_cases`` included)."""
        return {
            "format": self.format,
            "name": self.name,
            "channels": list(self.channels),
            "labels": self.labels,
            "class_names": list(self.class_names),
            "class_sources": {n: list(s) for n, s in self.class_sources.items()},
            "source_classes": list(self.source_classes),
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "axes": self.axes,
            "label_dtype": self.label_dtype,
            "normalisation": self.normalisation,
            "split_source": self.split_source,
            "splits": {s: list(ids) for s, ids in self.splits.items()},
            "num_cases": len(self.cases),
            "cases": [c.to_json() for c in self.cases],
            "channel_names": self.channel_names,
            "numTraining": self.num_training,
            **({"file_ending": self.file_ending} if self.file_ending is not None else {}),
            **self.extra,
        }

    def write(self, data_dir: str | Path) -> Path:
        """Write ``<data_dir>/dataset.json`` atomically; returns its path."""
        return atomic_write_json(self.file(data_dir), self.to_json())

    # -- classes ------------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of output classes, background included (the network's output channels)."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Number of image channels (the network's input channels)."""
        return len(self.channels)

    @property
    def channel_names(self) -> dict[str, str]:
        """nnU-Net's ``channel_names``: ``{"0": first channel, "1": second, ...}``."""
        return {str(i): c for i, c in enumerate(self.channels)}

    @property
    def num_training(self) -> int:
        """nnU-Net's ``numTraining``: the number of labelled cases (in nnU-Net, the cases of imagesTr/labelsTr)."""
        return sum(c.has_label for c in self.cases)

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> id, background included."""
        return {n: i for i, n in enumerate(self.class_names)}

    def class_table(self) -> dict[int, str]:
        """Foreground id -> class name (what :func:`anatomask_lab.evaluate.load_class_table` returns)."""
        return {i: n for i, n in enumerate(self.class_names) if i}

    def label_table(self, source_classes: Sequence[str] | None = None) -> LabelTable | None:
        """The class table the preparer applied (None for an images-only data set).

        Args:
            source_classes: the release's class table, when ``dataset.json`` does not record it.

        Raises:
            DataError: no release table is known, or a class's sources are not in it.
        """
        names = self.class_names[1:]
        if not names:
            return None
        table = tuple(source_classes) if source_classes is not None else self.source_classes
        if not table:
            raise DataError(f"{self._where}: no source_classes (the release's class table) recorded")
        sources = tuple(tuple(self.class_sources.get(n, (n,))) for n in names)
        missing = sorted({s for group in sources for s in group} - set(table))
        if missing:
            raise DataError(f"{self._where}: class sources {missing[:5]} are not in the release's class table")
        return LabelTable(tuple(names), sources, table)

    # -- cases and splits ---------------------------------------------------------------------------------------

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Every case id, in preparation order."""
        return tuple(c.id for c in self.cases)

    @property
    def split_names(self) -> tuple[str, ...]:
        """``train``, ``val``, ``test``, then any other split a case names."""
        return tuple(dict.fromkeys((*SPLITS, *(c.split for c in self.cases))))

    @property
    def splits(self) -> dict[str, tuple[str, ...]]:
        """Split name -> case ids (derived from the cases; every name of :attr:`split_names` present)."""
        return {s: tuple(c.id for c in self.cases if c.split == s) for s in self.split_names}

    def split(self, name: str) -> tuple[str, ...]:
        """Case ids of split ``name`` (``"all"``: every case), in preparation order.

        Raises:
            DataError: an unknown split name (the message lists the valid ones).
        """
        if name == "all":
            return self.case_ids
        if name not in self.split_names:
            raise DataError(f"{self._where}: unknown split {name!r}; valid splits: "
                            f"{', '.join((*self.split_names, 'all'))}")
        return tuple(c.id for c in self.cases if c.split == name)

    def case(self, case_id: str) -> CaseEntry:
        """The entry of ``case_id``.

        Raises:
            DataError: the case is not in ``dataset.json``.
        """
        entry = self._by_id.get(case_id)
        if entry is None:
            raise DataError(f"{self._where}: case {case_id!r} not in dataset.json")
        return entry

    @cached_property
    def _by_id(self) -> dict[str, CaseEntry]:
        return {c.id: c for c in self.cases}

    @property
    def _where(self) -> str:
        return str(self.path) if self.path is not None else FILE_NAME


# -- parsing helpers --------------------------------------------------------------------------------------------


def _mapping(value: Any, key: str, path) -> Mapping:
    if not isinstance(value, Mapping):
        raise DataError(f"{path}: '{key}' must be a JSON object, found {type(value).__name__}")
    return value


def _strings(value: Any, key: str, path) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}: '{key}' must be a list of strings")
    return tuple(value)


def _channels(content: Mapping, path) -> tuple[str, ...]:
    """``channels``, or nnU-Net's ``channel_names`` {"0": name, ...} (indices 0..C-1); both must agree."""
    channels = _strings(content["channels"], "channels", path) if content.get("channels") is not None else None
    if content.get("channel_names") is None:
        return channels or ()
    names = _mapping(content["channel_names"], "channel_names", path)
    if sorted(names) != sorted(str(i) for i in range(len(names))) or not all(isinstance(v, str)
                                                                              for v in names.values()):
        raise DataError(f"{path}: 'channel_names' must map the indices \"0\"..\"{len(names) - 1}\" to names")
    from_names = tuple(names[str(i)] for i in range(len(names)))
    if channels is not None and channels != from_names:
        raise DataError(f"{path}: 'channel_names' {dict(names)} and 'channels' {list(channels)} disagree")
    return from_names


def _check_num_training(content: Mapping, cases: tuple[CaseEntry, ...], path) -> None:
    """nnU-Net's ``numTraining``, when present, must be the number of labelled cases."""
    value = content.get("numTraining")
    if value is None:
        return
    n = sum(c.has_label for c in cases)
    if not isinstance(value, int) or isinstance(value, bool) or value != n:
        raise DataError(f"{path}: 'numTraining' is {value!r} but {n} cases are labelled")


def _file_ending(value: Any, path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("."):
        raise DataError(f"{path}: 'file_ending' must be a string starting with '.', found {value!r}")
    return value


def _spacing(value: Any, path) -> tuple[float, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value)):
        raise DataError(f"{path}: 'spacing' must be three positive numbers, found {value!r}")
    return tuple(float(v) for v in value)


def _class_names(content: Mapping, path) -> tuple[str, ...]:
    """``class_names`` (preferred) or the ids of ``labels``, which must then be 0..K-1; both must agree."""
    names = _strings(content["class_names"], "class_names", path) if content.get("class_names") is not None else None
    labels = _mapping(content.get("labels") or {}, "labels", path)
    if labels:
        ids = sorted(labels.values()) if all(isinstance(v, int) for v in labels.values()) else None
        if ids != list(range(len(labels))):
            raise DataError(f"{path}: 'labels' must map class names to the ids 0..{len(labels) - 1}")
        from_labels = tuple(sorted(labels, key=labels.get))
        if names is not None and names != from_labels:
            raise DataError(f"{path}: 'labels' and 'class_names' disagree")
        names = from_labels
    return names or ()


def _split_of(content: Mapping, path) -> dict[str, str]:
    """Case id -> split from the ``splits`` lists (each id in one split at most)."""
    split_of: dict[str, str] = {}
    for name, ids in _mapping(content.get("splits") or {}, "splits", path).items():
        for case_id in _strings(ids, f"splits[{name!r}]", path):
            if split_of.setdefault(case_id, name) != name:
                raise DataError(f"{path}: case {case_id!r} is in splits {split_of[case_id]!r} and {name!r}")
    return split_of


def _case(entry: Any, split_of: dict[str, str], path) -> CaseEntry:
    if not isinstance(entry, Mapping) or "id" not in entry:
        raise DataError(f"{path}: every entry of 'cases' must be an object with an 'id'")
    case_id = check_case_id(entry["id"], path)
    split = entry.get("split") or split_of.get(case_id)
    if not isinstance(split, str):
        raise DataError(f"{path}: case {case_id!r} has no split")
    if split_of and split_of.get(case_id, split) != split:
        raise DataError(f"{path}: case {case_id!r} is in split {split!r} but 'splits' lists it in "
                        f"{split_of[case_id]!r}")
    shape = entry.get("shape")
    return CaseEntry(case_id, bool(entry.get("has_label", False)), split,
                     tuple(int(n) for n in shape) if isinstance(shape, list) else None)


def _cases(content: Mapping, path) -> tuple[CaseEntry, ...]:
    raw = content.get("cases")
    if not isinstance(raw, list):
        raise DataError(f"{path}: no 'cases' list")
    split_of = _split_of(content, path)
    cases = tuple(_case(entry, split_of, path) for entry in raw)
    ids = Counter(c.id for c in cases)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        raise DataError(f"{path}: case ids {repeated[:5]} appear twice")
    unknown = sorted(set(split_of) - set(ids))
    if unknown:
        raise DataError(f"{path}: 'splits' lists cases {unknown[:5]} that are not in 'cases'")
    return tuple(cases)


# -- case folders -----------------------------------------------------------------------------------------------


def case_dir(data_dir: str | Path, case_id: str) -> Path:
    """``<data_dir>/cases/<case_id>``, after checking that ``case_id`` is a plain name.

    Raises:
        DataError: an unsafe case id.
    """
    return Path(data_dir) / "cases" / check_case_id(case_id, Path(data_dir) / FILE_NAME)


def read_case_meta(data_dir: str | Path, case_id: str) -> dict[str, Any]:
    """A prepared case's ``meta.json``.

    Raises:
        DataError: an unsafe case id, or the case's ``meta.json`` is missing or not JSON.
    """
    path = case_dir(data_dir, case_id) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path.parent}: no preprocessed case {case_id!r} (meta.json missing)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
