"""Patch sampling: shapes, padding, image/label agreement under crops and flips, determinism, workers, errors."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.data.io import DataError
from anatomask_lab.data.phantom import generate_cohort
from anatomask_lab.data.prepare import preparer
from anatomask_lab.data.sampler import PatchDataset, check_patch_size, extract_patch, load_case

PAD = [-7.0, -9.0]
SHAPES = {"a": (30, 20, 24), "b": (8, 40, 12), "c": (20, 20, 20)}


def _code(shape):
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (x * 10000 + y * 100 + z).astype(np.float32)


def _decode(code):
    c = code.astype(np.int64)
    return c // 10000, (c // 100) % 100, c % 100


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Channel 0 = label value, channel 1 = the voxel's own coordinates, so every patch voxel can be traced."""
    root = tmp_path_factory.mktemp("syn")
    cases = []
    for cid, shape in SHAPES.items():
        d = root / "cases" / cid
        d.mkdir(parents=True)
        label = np.zeros(shape, np.uint8)
        label[2:5, 3:6, 4:7] = 1
        label[-2, -2, -2] = 2  # a single voxel of class 2
        image = np.stack([label.astype(np.float32), _code(shape)])
        np.save(d / "image.npy", image)
        has_label = cid != "c"
        if has_label:
            np.save(d / "label.npy", label)
        fg = np.concatenate([np.concatenate([np.full((len(a), 1), k), a], 1)
                             for k, a in ((1, np.argwhere(label == 1)), (2, np.argwhere(label == 2)))])
        np.save(d / "fg.npy", fg.astype(np.int32) if has_label else np.zeros((0, 4), np.int32))
        (d / "meta.json").write_text(json.dumps({"case_id": cid, "shape": list(shape), "pad_value": PAD}))
        cases.append({"id": cid, "has_label": has_label, "split": "train", "shape": list(shape)})
    (root / "dataset.json").write_text(json.dumps({"cases": cases, "splits": {"train": list(SHAPES)},
                                                   "channels": ["a", "b"]}))
    return root


def test_items_have_the_documented_shapes_and_types(synthetic):
    ds = PatchDataset(synthetic, patch_size=(16, 16, 16), with_label=True)
    assert ds.case_ids == ["a", "b"] and len(ds) == 2  # the unlabelled case is left out
    item = ds[0]
    assert item["image"].shape == (2, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16, 16) and item["label"].dtype == torch.int64
    assert item["case"] == "a"
    assert "label" not in PatchDataset(synthetic, patch_size=(8, 8, 8))[2]
    assert len(PatchDataset(synthetic, patch_size=(8, 8, 8), samples_per_epoch=10)) == 10


def test_image_and_label_stay_aligned_under_crops_pads_and_flips(synthetic):
    ds = PatchDataset(synthetic, patch_size=(16, 16, 16), with_label=True, samples_per_epoch=40, seed=1)
    flipped = np.zeros(3, int)
    for i in range(len(ds)):
        item = ds[i]
        img, lab = item["image"].numpy(), item["label"].numpy()
        shape = SHAPES[item["case"]]
        label = np.load(synthetic / "cases" / item["case"] / "label.npy")
        pad = img[1] == PAD[1]
        assert np.all(img[0][pad] == PAD[0]) and np.all(lab[pad] == 0)
        x, y, z = _decode(np.where(pad, 0, img[1]))
        np.testing.assert_array_equal(lab[~pad], label[x, y, z][~pad])
        np.testing.assert_array_equal(img[0][~pad], label[x, y, z][~pad])
        if item["case"] == "b":
            assert pad.all(axis=(1, 2)).sum() == 16 - shape[0]  # x is 8 < 16: padded planes
        for axis, coord in enumerate((x, y, z)):
            d = np.diff(np.where(pad, np.nan, coord), axis=axis)
            d = d[np.isfinite(d)]
            flipped[axis] += bool(d.size and d.max() < 0)
    assert np.all(flipped > 5)  # each axis is flipped in some samples


def test_deterministic_per_seed_epoch_and_index(synthetic):
    kw = {"patch_size": (12, 12, 12), "with_label": True, "samples_per_epoch": 6}
    a, b = PatchDataset(synthetic, seed=3, **kw), PatchDataset(synthetic, seed=3, **kw)
    for i in range(6):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    first = [a[i]["image"] for i in range(6)]
    a.set_epoch(1)
    assert any(not torch.equal(first[i], a[i]["image"]) for i in range(6))
    a.set_epoch(0)
    assert all(torch.equal(first[i], a[i]["image"]) for i in range(6))
    c = PatchDataset(synthetic, seed=4, **kw)
    assert any(not torch.equal(first[i], c[i]["image"]) for i in range(6))
    with pytest.raises(IndexError):
        a[6]


def test_foreground_oversampling(synthetic):
    def share(p, cls):
        ds = PatchDataset(synthetic, patch_size=(6, 6, 6), with_label=True, fg_oversample=p,
                          samples_per_epoch=60, flips=False)
        return np.mean([(ds[i]["label"] == cls).any().item() for i in range(len(ds))])

    always = share(1.0, 1) + share(1.0, 2)
    assert always >= 1.0  # every patch holds foreground
    assert 0.25 < share(1.0, 2) < 0.75  # classes are drawn uniformly, so the single voxel is found half the time
    assert share(0.0, 2) < 0.1
    with pytest.raises(DataError, match="probability"):
        PatchDataset(synthetic, fg_oversample=1.5)


def test_multi_worker_loader_matches_single_process(synthetic):
    ds = PatchDataset(synthetic, patch_size=(8, 8, 8), with_label=True, samples_per_epoch=8, seed=2)
    ds.set_epoch(4)
    one = list(DataLoader(ds, batch_size=4, num_workers=0))
    two = list(DataLoader(ds, batch_size=4, num_workers=2))
    for p, q in zip(one, two, strict=True):
        assert torch.equal(p["image"], q["image"]) and torch.equal(p["label"], q["label"]) and p["case"] == q["case"]


def test_distributed_sampler_splits_indices_between_ranks(synthetic):
    ds = PatchDataset(synthetic, patch_size=(8, 8, 8), samples_per_epoch=10)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        idx = list(sampler)
        seen += idx
        batch = next(iter(DataLoader(ds, batch_size=len(idx), sampler=sampler)))
        for k, i in enumerate(idx):
            assert torch.equal(batch["image"][k], ds[i]["image"])
    assert sorted(seen) == list(range(10))


def test_patch_size_checks(synthetic):
    assert check_patch_size((112, 112, 128), divisor=16) == (112, 112, 128)
    with pytest.raises(DataError, match="larger than the allowed 512"):
        PatchDataset(synthetic, patch_size=(112, 112, 640))
    with pytest.raises(DataError, match="multiple of 16"):
        PatchDataset(synthetic, patch_size=(112, 112, 120), divisor=16)
    for bad in ((0, 8, 8), (8, 8), "abc"):
        with pytest.raises(DataError, match="patch size"):
            check_patch_size(bad)


def test_missing_or_wrong_inputs(synthetic, tmp_path):
    with pytest.raises(DataError, match=r"dataset\.json: not found"):
        DatasetInfo.read(tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        PatchDataset(synthetic, split="training")
    with pytest.raises(DataError, match="no labelled cases"):
        PatchDataset(synthetic, split="val", with_label=True)
    with pytest.raises(DataError, match="not in dataset.json"):
        PatchDataset(synthetic, cases=["zz"])
    with pytest.raises(DataError, match="no preprocessed case 'zz'"):
        load_case(synthetic, "zz")
    image, label, meta = load_case(synthetic, "c")
    assert label is None and isinstance(image, np.memmap) and meta["fg"].shape == (0, 4)


def test_unknown_splits_and_unsafe_case_ids_are_named(synthetic, tmp_path):
    with pytest.raises(DataError, match=r"unknown split 'training'; valid splits: train, val, test, all"):
        PatchDataset(synthetic, split=["train", "training"])
    assert PatchDataset(synthetic, split=["val", "train"], patch_size=(8, 8, 8)).case_ids == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"unsafe case id '\.\./c'"):
        load_case(synthetic / "cases" / "a", "../c")  # would open <dataset>/cases/c
    content = json.loads((synthetic / "dataset.json").read_text())
    content["cases"][0]["id"] = content["splits"]["train"][0] = "../../a"
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"dataset\.json: unsafe case id '\.\./\.\./a'"):
        PatchDataset(tmp_path, patch_size=(8, 8, 8))


def test_extract_patch_pads_each_channel():
    arr = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    out = extract_patch(arr, (-2, 0, 3), (6, 4, 2), [-1.0, -2.0])
    assert out.shape == (2, 6, 4, 2)
    np.testing.assert_array_equal(out[:, 2:, :, 0], arr[:, :, :, 3])
    assert np.all(out[0, :2] == -1) and np.all(out[1, :, :, 1] == -2)
    assert np.all(extract_patch(arr[0], (10, 0, 0), (2, 2, 2), 5.0) == 5.0)


def test_default_patch_on_a_prepared_phantom(tmp_path):
    generate_cohort(tmp_path / "raw", 2, seed=0, shape=(40, 40, 24), spacing=(4.8, 4.8, 10.0), workers=0,
                    progress=False)
    out = preparer("totalsegmentator").prepare(tmp_path / "raw", tmp_path / "ds", classes="phantom",
                                               spacing=(4.0, 4.0, 4.0), workers=0, progress=False)
    ds = PatchDataset(out, split="all", with_label=True, fg_oversample=0.33)
    item = ds[0]
    assert item["image"].shape == (1, 112, 112, 128)  # volume ~48x48x60: padded
    assert 0 < int(item["label"].max()) <= 15
    info = DatasetInfo.read(out)
    image, label, meta = load_case(out, info.case_ids[0])
    assert image.shape[1:] == label.shape == tuple(meta["shape"])
