"""dataset.json through DatasetInfo: round trips, legacy files, malformed files, unsafe case ids, splits."""

import json

import numpy as np
import pytest

from anatomask_lab.data.dataset import CaseEntry, DatasetInfo, case_dir, check_case_id, read_case_meta
from anatomask_lab.data.io import DataError, save_nifti
from anatomask_lab.data.prepare import flare22

AFF = np.diag([-3.0, -3.0, 5.0, 1.0])


def _legacy(**changes):
    """A dataset.json as the code before DatasetInfo wrote it (no source_classes), with ``changes`` applied."""
    content = {
        "format": "anatomask-lab preprocessed v1", "name": "toy", "channels": ["CT"],
        "labels": {"background": 0, "liver": 1, "spleen": 2}, "class_names": ["background", "liver", "spleen"],
        "class_sources": {"liver": ["liver"], "spleen": ["spleen"]}, "spacing": [1.5, 1.5, 1.5], "axes": "x",
        "label_dtype": "uint8", "normalisation": "z", "split_source": "data set",
        "splits": {"train": ["a", "b"], "val": ["c"], "test": ["d"]}, "num_cases": 4,
        "cases": [{"id": i, "has_label": i != "b", "split": s, "shape": [4, 5, 6]}
                  for i, s in (("a", "train"), ("b", "train"), ("c", "val"), ("d", "test"))],
        "source_table": "my release",
    }
    content.update(changes)
    return content


def _write(folder, content):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(content) if not isinstance(content, str) else content)
    return folder


def test_a_legacy_file_reads_with_its_helpers_and_round_trips(tmp_path):
    info = DatasetInfo.read(_write(tmp_path / "ds", _legacy()))
    assert info.num_classes == 3 and info.in_channels == 1 and info.spacing == (1.5, 1.5, 1.5)
    assert info.labels == {"background": 0, "liver": 1, "spleen": 2}
    assert info.class_table() == {1: "liver", 2: "spleen"}
    assert info.split("train") == ("a", "b") and info.split("all") == ("a", "b", "c", "d")
    assert info.case("b") == CaseEntry("b", False, "train", (4, 5, 6))
    assert info.extra == {"source_table": "my release"} and info.source_classes == ()
    info.write(tmp_path / "copy")
    written = json.loads((tmp_path / "copy" / "dataset.json").read_text())
    # additive: every old key kept, unchanged; nnU-Net's names derived from them
    assert written == {**_legacy(), "source_classes": [], "channel_names": {"0": "CT"}, "numTraining": 3}
    assert DatasetInfo.read(tmp_path / "copy") == info


def test_a_prepared_folder_reads_back_exactly(tiny_dataset):
    on_disk = json.loads((tiny_dataset / "dataset.json").read_text())
    info = DatasetInfo.read(tiny_dataset)
    assert info.to_json() == on_disk
    assert info.class_names == ("background", "liver", "spleen", "kidney_left", "kidney_right", "aorta")
    assert info.source_classes[:2] == ("spleen", "kidney_right")  # the TotalSegmentator v2 table, value order
    table = info.label_table()
    assert table.names == info.class_names[1:] and table.sources[0] == ("liver",)
    assert sorted(sum(info.splits.values(), ())) == sorted(info.case_ids) and len(info.split("test")) == 1
    meta = read_case_meta(tiny_dataset, info.split("test")[0])
    assert meta["shape"] == list(info.case(meta["case_id"]).shape)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"dataset\.json: not valid JSON"),
    ("[1, 2]", r"dataset\.json: expected a JSON object, found list"),
    (json.dumps({"name": "x"}), r"dataset\.json: no 'cases' list"),
    (json.dumps(_legacy(channels="CT")), r"dataset\.json: 'channels' must be a list of strings"),
    (json.dumps(_legacy(labels={"background": 0, "liver": 2}, class_names=None)),
     r"dataset\.json: 'labels' must map class names to the ids 0\.\.1"),
    (json.dumps(_legacy(class_names=["background", "spleen", "liver"])), "'labels' and 'class_names' disagree"),
    (json.dumps(_legacy(spacing=[1.5, 0, 1.5])), "'spacing' must be three positive numbers"),
    (json.dumps(_legacy(cases=[{"split": "train"}])), "must be an object with an 'id'"),
])
def test_malformed_files_raise_one_line_errors_naming_the_file(tmp_path, content, message):
    folder = _write(tmp_path / "ds", content)
    with pytest.raises(DataError, match=message) as err:
        DatasetInfo.read(folder)
    assert str(folder / "dataset.json") in str(err.value) and "\n" not in str(err.value)


def test_a_missing_file_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.json: not found; .*anatomask-lab prepare"):
        DatasetInfo.read(tmp_path)
    assert not DatasetInfo.exists(tmp_path) and DatasetInfo.exists(_write(tmp_path / "ds", _legacy()))


@pytest.mark.parametrize("bad", ["../etc", "..", ".", "/tmp/x", "a/b", "a\\b", "C:x", "", "a\0b", 7])
def test_unsafe_case_ids_are_refused(tmp_path, bad):
    cases = [{"id": bad, "has_label": True, "split": "train"}]
    folder = _write(tmp_path / "ds", _legacy(cases=cases, splits={}))
    with pytest.raises(DataError, match=r"dataset\.json: unsafe case id"):
        DatasetInfo.read(folder)
    with pytest.raises(DataError, match="unsafe case id"):
        case_dir(tmp_path, bad)


def test_plain_case_ids_pass():
    for good in ("FLARE22_Tr_0001", "amos_0001", "PETCT_0a1b_0", "case.v2", "a..b"):
        assert check_case_id(good) == good


def test_splits_are_held_once_by_the_cases(tmp_path):
    moved = _legacy(splits={"train": ["a", "b"], "val": [], "test": ["c", "d"]})  # c is val in its case entry
    with pytest.raises(DataError, match=r"case 'c' is in split 'val' but 'splits' lists it in 'test'"):
        DatasetInfo.read(_write(tmp_path / "a", moved))
    extra = _legacy(splits={"train": ["a", "b", "zz"], "val": ["c"], "test": ["d"]})
    with pytest.raises(DataError, match=r"'splits' lists cases \['zz'\] that are not in 'cases'"):
        DatasetInfo.read(_write(tmp_path / "b", extra))
    twice = _legacy(splits={"train": ["a", "b", "c"], "val": ["c"], "test": ["d"]})
    with pytest.raises(DataError, match="is in splits 'train' and 'val'"):
        DatasetInfo.read(_write(tmp_path / "c", twice))
    no_split = _legacy(cases=[{"id": "a", "has_label": True}], splits={"test": ["a"]})
    assert DatasetInfo.read(_write(tmp_path / "d", no_split)).split("test") == ("a",)  # taken from 'splits'


def test_unknown_split_and_case_errors_list_what_exists(tmp_path):
    info = DatasetInfo.read(_write(tmp_path / "ds", _legacy()))
    with pytest.raises(DataError, match=r"dataset\.json: unknown split 'training'; valid splits: train, val, test"):
        info.split("training")
    with pytest.raises(DataError, match=r"case 'zz' not in dataset\.json"):
        info.case("zz")
    own = DatasetInfo(cases=(CaseEntry("a", True, "holdout"),))
    assert own.split_names == ("train", "val", "test", "holdout") and own.split("holdout") == ("a",)
    assert own.to_json()["splits"] == {"train": [], "val": [], "test": [], "holdout": ["a"]}


def test_write_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    folder = _write(tmp_path / "ds", _legacy())
    before = (folder / "dataset.json").read_bytes()
    broken = DatasetInfo(name="x", extra={"bad": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        broken.write(folder)
    assert (folder / "dataset.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json"]  # no temporary file left behind


def test_label_table_needs_the_release_table(tmp_path):
    info = DatasetInfo.read(_write(tmp_path / "ds", _legacy()))
    with pytest.raises(DataError, match="no source_classes"):
        info.label_table()
    table = info.label_table(("spleen", "kidney", "liver"))
    np.testing.assert_array_equal(table.lut(), [0, 2, 0, 1])  # release value 1 (spleen) -> 2, 3 (liver) -> 1
    with pytest.raises(DataError, match=r"class sources \['spleen'\] are not in the release's class table"):
        info.label_table(("liver",))
    assert DatasetInfo().label_table() is None


def test_flare22_preparation_records_its_release_table(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    save_nifti(src / "FLARE22_Tr_0001_0000.nii.gz", rng.normal(0, 200, (6, 5, 4)).astype(np.int16), AFF)
    save_nifti(src / "FLARE22_Tr_0001.nii.gz", rng.integers(0, 14, (6, 5, 4)).astype(np.uint8), AFF)
    out = flare22.prepare(src, tmp_path / "o", classes="spleen,liver", spacing=(4.0, 4.0, 4.0), workers=0,
                          progress=False)
    info = DatasetInfo.read(out)
    assert info.source_classes == flare22.CLASSES and info.class_names == ("background", "spleen", "liver")
    np.testing.assert_array_equal(info.label_table().lut()[:4], [0, 2, 0, 1])  # liver (1) -> 2, spleen (3) -> 1
