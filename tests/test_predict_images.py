"""``predict --images``: raw files in, label maps (and probabilities) out in each input's geometry, prepared exactly
as the training data were (checked against ``predict --data`` on the same files prepared as a dataset)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from anatomask_lab import finetune
from anatomask_lab.cli import main
from anatomask_lab.data import io as data_io
from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.data.preprocess import CaseSource, preprocess_dataset
from anatomask_lab.data.recipe import RECIPE_FILE, read_run_recipe
from anatomask_lab.inference import accumulator_device, sliding_window_predict
from anatomask_lab.predict import predict_split
from anatomask_lab.runs import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (33, 34, 35)


def _sitk_reads():
    """SimpleITK is installed and the kit's image reader goes through it for .mha files."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return hasattr(data_io, "load_image") and ".mha" in getattr(data_io, "SITK_ENDINGS", ())


def _finetune(data, out):
    cfg = finetune.finetune_config("tiny", data_dir=str(data), out_dir=str(out), init="scratch", epochs=1,
                                   iters_per_epoch=1, batch_size=1, val_cases=1, quiet=True, device="cpu", seed=3)
    return finetune.run(cfg)


def _phantom_ct(release, k=0):
    """A phantom CT volume (HU, int16) cut to 33 x 34 x 35 voxels."""
    case = sorted(d for d in release.iterdir() if d.is_dir())[k]
    return np.asarray(nib.load(case / "ct.nii.gz").dataobj)[5:38, 6:40, 2:37].astype(np.int16)


def _affine(columns, spacing, origin):
    """Voxel-to-world matrix whose array axes point along ``columns`` (signed world axes 1..3) with ``spacing``."""
    aff = np.eye(4)
    aff[:3, :3] = 0
    for axis, (col, s) in enumerate(zip(columns, spacing, strict=True)):
        aff[abs(col) - 1, axis] = np.sign(col) * s
    aff[:3, 3] = origin
    return aff


def _save(path, array, affine, *, sform_code=2, qform_code=1):
    img = nib.Nifti1Image(array, affine)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def ct_run(tiny_dataset, tmp_path_factory):
    return _finetune(tiny_dataset, tmp_path_factory.mktemp("ft_ct") / "run")


@pytest.fixture(scope="module")
def raw_ct(phantom_release, tmp_path_factory):
    """Three single-channel CT cases with non-trivial geometry: LPS with a zero border (.nii.gz), permuted axes with
    other qform/sform codes (.nii), and, where SimpleITK reads, a MetaImage with an oblique-free LPS direction."""
    d = tmp_path_factory.mktemp("raw_ct") / "images"
    d.mkdir()
    lps = _phantom_ct(phantom_release, 0)
    lps[:, :, :3] = 0  # a border outside the scanned field: cropped away, predicted background
    lps[-2:] = 0
    _save(d / "lps.nii.gz", lps, _affine((-1, -2, 3), (3.5, 4.2, 5.0), (120.5, -33.2, 57.0)))
    perm = np.ascontiguousarray(_phantom_ct(phantom_release, 1).transpose(2, 0, 1)).astype(np.float32)
    _save(d / "perm.nii", perm, _affine((3, -1, 2), (4.4, 3.9, 4.1), (-10.0, 20.0, 30.0)), sform_code=4,
          qform_code=2)
    if _sitk_reads():
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(_phantom_ct(phantom_release, 2).transpose(2, 1, 0))  # ITK arrays are [k, j, i]
        img.SetSpacing((4.1, 3.6, 4.8))
        img.SetOrigin((-50.0, 12.5, 300.0))
        img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
        sitk.WriteImage(img, str(d / "itk.mha"))
    return d


def _read_labels(path):
    """Voxel array in the file's own voxel order (ITK index order for MetaImage) and the RAS affine."""
    if path.name.endswith(".mha"):
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        return (sitk.GetArrayFromImage(img).transpose(2, 1, 0),
                data_io.itk_to_ras_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection()))
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _via_dataset(run, images, cases, tmp_path, channels=("CT",), modalities=("CT",)):
    """The same raw files prepared as a dataset with the training dataset's settings, then ``predict_split``."""
    recipe = read_run_recipe(run)
    info = DatasetInfo.read(recipe.data_dir)
    sources = [CaseSource(c, tuple(images / f for f in files), modalities) for c, files in cases.items()]
    data = preprocess_dataset(sources, tmp_path / "as_dataset", name="raw", channels=list(channels),
                              table=info.label_table(), spacing=recipe.spacing, clip=recipe.clip,
                              image_kind=recipe.image_kind, workers=0, progress=False)
    predict_split(run, data, tmp_path / "via_data", split="train", device="cpu", quiet=True)
    return {c: np.asarray(nib.load(tmp_path / "via_data" / f"{c}.nii.gz").dataobj) for c in cases}


# ----------------------------------------------------------------------------------------------------------------
# the run's recipe
# ----------------------------------------------------------------------------------------------------------------
def test_run_stores_the_training_preprocessing(ct_run, tiny_dataset):
    stored = json.loads((ct_run / RECIPE_FILE).read_text())
    prepared = json.loads((tiny_dataset / "prepare.json").read_text())
    assert stored["spacing"] == prepared["spacing"] == [4.0, 4.0, 4.0]
    assert (stored["clip"], stored["image_kind"]) == (prepared["clip"], prepared["image_kind"])
    assert stored["channels"] == ["CT"] and stored["modalities"] == ["CT"]
    assert stored["class_names"] == list(DatasetInfo.read(tiny_dataset).class_names)


# ----------------------------------------------------------------------------------------------------------------
# geometry round trip, equality with the prepared-dataset path, probabilities
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_images_keeps_each_inputs_geometry_and_equals_predict_data(ct_run, raw_ct, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(ct_run), "--images", str(raw_ct), "--out", str(out), "--device", "cpu",
                 "--save-probabilities", "--quiet"]) == 0
    inputs = sorted(p.name for p in raw_ct.iterdir())
    cases = {n.split(".")[0]: n for n in inputs}
    assert sorted(p.name for p in out.iterdir()) == sorted(inputs + [f"{c}.npz" for c in cases])
    class_names = DatasetInfo.read(read_run_recipe(ct_run).data_dir).class_names
    expected = _via_dataset(ct_run, raw_ct, {c: (n,) for c, n in cases.items()}, tmp_path)
    for case, name in cases.items():
        labels, affine = _read_labels(out / name)
        source, source_affine = _read_labels(raw_ct / name)
        assert labels.shape == source.shape and sorted(labels.shape) == sorted(SHAPE)
        np.testing.assert_allclose(affine, source_affine, atol=1e-6, rtol=0)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(range(len(class_names)))
        np.testing.assert_array_equal(labels, expected[case])  # prepared exactly as the training data were
        saved = np.load(out / f"{case}.npz")
        probs = saved["probabilities"]
        assert probs.dtype == np.float32 and probs.shape == (len(class_names), *labels.shape)
        np.testing.assert_array_equal(probs.argmax(0), labels)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        assert list(saved["class_names"]) == list(class_names)
        np.testing.assert_allclose(saved["affine"], source_affine, atol=1e-6, rtol=0)
    assert len(np.unique(expected["lps"])) > 1  # the comparison is not between two constant maps
    lps, _ = _read_labels(out / "lps.nii.gz")
    assert not lps[:, :, :3].any() and not lps[-2:].any()  # the zero border is outside the crop: background
    src, pred = nib.load(raw_ct / "perm.nii"), nib.load(out / "perm.nii")
    assert pred.header.get_sform(coded=True)[1] == 4 and pred.header.get_qform(coded=True)[1] == 2
    np.testing.assert_allclose(pred.header.get_qform(), src.header.get_qform(), atol=1e-6)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_outputs_are_refused_replaced_or_continued(ct_run, raw_ct, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(raw_ct / "lps.nii.gz", images / "a.nii.gz")
    shutil.copy(raw_ct / "perm.nii", images / "b_0000.nii")  # nnU-Net naming of a single channel: case "b"
    out = tmp_path / "pred"
    base = ["predict", "--model", str(ct_run), "--images", str(images), "--out", str(out), "--device", "cpu",
            "--quiet"]
    assert main(base) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii"]
    first = (out / "a.nii.gz").stat().st_mtime_ns
    (out / "b.nii").unlink()
    assert main(base) == 2
    assert "already holds predictions of 1 case(s) (a.nii.gz)" in capsys.readouterr().err
    assert main([*base, "--continue"]) == 0  # keeps a, predicts b
    assert (out / "a.nii.gz").stat().st_mtime_ns == first and (out / "b.nii").is_file()
    assert main([*base, "--overwrite"]) == 0
    assert (out / "a.nii.gz").stat().st_mtime_ns != first
    assert main([*base, "--overwrite", "--continue"]) == 2
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_without_stored_preprocessing_falls_back_to_its_dataset(ct_run, raw_ct, tmp_path, capsys):
    old = tmp_path / "old_run"
    shutil.copytree(ct_run, old)
    (old / RECIPE_FILE).unlink()
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(raw_ct / "lps.nii.gz", images / "lps.nii.gz")
    assert main(["predict", "--model", str(old), "--images", str(images), "--out", str(tmp_path / "a"),
                 "--device", "cpu", "--quiet"]) == 0
    for which in ("best", "last"):  # the dataset folder named by the run's config is gone
        ckpt = old / "checkpoints" / f"{which}.pt"
        if ckpt.is_file():
            state = load_checkpoint(ckpt)
            state["config"]["data_dir"] = str(tmp_path / "moved_away")
            torch.save(state, ckpt)
    assert main(["predict", "--model", str(old), "--images", str(images), "--out", str(tmp_path / "b"),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "preprocessing.json: not found" in err and "moved_away" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# two channels (CT + an MR-like channel with z-score normalisation)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_channel(phantom_release, tiny_dataset, tmp_path_factory):
    """Three phantom cases with a second, MR-like channel, prepared at 4 mm and finetuned briefly."""
    from anatomask_lab.data.prepare.totalsegmentator import find_cases

    root = tmp_path_factory.mktemp("two_channel")
    table = DatasetInfo.read(tiny_dataset).label_table()
    sources = []
    for src in find_cases(phantom_release)[0][:3]:
        ct = nib.load(src.images[0])
        hu = np.asarray(ct.dataobj).astype(np.float32)
        mr = np.where(hu > -500, np.sqrt(hu + 1100.0) * 7.0, 0.0).astype(np.float32)
        mr_path = _save(root / f"{src.case_id}_mr.nii.gz", mr, ct.affine, sform_code=1)
        sources.append(CaseSource(src.case_id, (src.images[0], mr_path), ("CT", "MR"), masks=src.masks))
    data = preprocess_dataset(sources, root / "prepared", name="two", channels=["CT", "MR"], table=table,
                              spacing=(4.0, 4.0, 4.0), workers=0, progress=False)
    return _finetune(data, root / "run"), sources


@pytest.mark.slow
def test_two_channel_sets_equal_predict_data_and_bad_channel_counts(two_channel, ct_run, tmp_path, capsys):
    run, sources = two_channel
    assert json.loads((run / RECIPE_FILE).read_text())["modalities"] == ["CT", "MR"]
    images = tmp_path / "imagesTs"
    images.mkdir()
    src = sources[-1]
    for k, p in enumerate(src.images):  # stored as LPS .nii.gz channel files <case>_000k.nii.gz
        img = nib.load(p)
        _save(images / f"case7_{k:04d}.nii.gz", np.asarray(img.dataobj), img.affine)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "--images", str(images), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case7.nii.gz"]
    expected = _via_dataset(run, images, {"case7": ("case7_0000.nii.gz", "case7_0001.nii.gz")}, tmp_path,
                            channels=("CT", "MR"), modalities=("CT", "MR"))
    labels, affine = _read_labels(out / "case7.nii.gz")
    np.testing.assert_array_equal(labels, expected["case7"])
    np.testing.assert_allclose(affine, nib.load(src.images[0]).affine, atol=1e-6, rtol=0)
    # a channel set for the single-channel model, and a missing channel for the two-channel one
    assert main(["predict", "--model", str(ct_run), "--images", str(images), "--out", str(tmp_path / "x"),
                 "--device", "cpu", "--quiet"]) == 2
    assert "case 'case7'" in (err := capsys.readouterr().err) and "2 channel files" in err
    (images / "case7_0001.nii.gz").unlink()
    assert main(["predict", "--model", str(run), "--images", str(images), "--out", str(tmp_path / "y"),
                 "--device", "cpu", "--quiet"]) == 2
    assert "case7_0001.nii.gz missing" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2
# ----------------------------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("anatomask-lab predict: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(ct_run, raw_ct, tmp_path, capsys):
    base = ["predict", "--model", str(ct_run), "--device", "cpu", "--quiet"]
    folders = {name: tmp_path / name for name in ("corrupt", "nan", "empty", "mixed")}
    for d in folders.values():
        d.mkdir()
    (folders["corrupt"] / "junk.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    nan = np.asarray(nib.load(raw_ct / "perm.nii").dataobj).astype(np.float32)
    nan[3, 4, 5] = np.nan
    _save(folders["nan"] / "nan.nii", nan, np.eye(4))
    (folders["empty"] / "notes.txt").write_text("no images here")
    shutil.copy(raw_ct / "lps.nii.gz", folders["mixed"] / "m.nii.gz")
    shutil.copy(raw_ct / "lps.nii.gz", folders["mixed"] / "m_0000.nii.gz")
    out = str(tmp_path / "out")
    _one_line_error(capsys, [*base, "--images", str(folders["corrupt"]), "--out", out], "junk.nii.gz")
    _one_line_error(capsys, [*base, "--images", str(folders["nan"]), "--out", out], "nan.nii", "NaN")
    _one_line_error(capsys, [*base, "--images", str(folders["empty"]), "--out", out], "no image files")
    _one_line_error(capsys, [*base, "--images", str(folders["mixed"]), "--out", out], "one file per channel")
    _one_line_error(capsys, [*base, "--images", str(raw_ct), "--out", str(raw_ct)], "is the --images folder")
    _one_line_error(capsys, [*base, "--images", str(raw_ct), "--out", out, "--split", "val"], "--split")
    _one_line_error(capsys, [*base, "--images", str(tmp_path / "nowhere"), "--out", out], "not a folder")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(SystemExit) as exc:  # neither --data nor --images
        main([*base, "--out", out])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# class-probability accumulation on the CPU
# ----------------------------------------------------------------------------------------------------------------
def test_accumulation_device_choice_and_equal_results():
    assert accumulator_device("cuda:1", "cpu") == torch.device("cpu")
    assert accumulator_device("cuda:1", "device") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="accumulate"):
        accumulator_device("cpu", "host")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 7, 3, padding=1)).eval()
    image = torch.randn(1, *SHAPE)
    a = sliding_window_predict(model, image, (16, 16, 16), 7, mirror=True, accumulate="device")
    b = sliding_window_predict(model, image, (16, 16, 16), 7, mirror=True, accumulate="cpu")
    assert a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_cpu_accumulation_keeps_the_class_sums_off_the_gpu():
    device = torch.device("cuda")
    model = nn.Conv3d(1, 120, 1).to(device).eval()  # 120 classes
    image = torch.randn(1, 96, 96, 96)
    peaks, results = {}, {}
    for where in ("device", "cpu"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        results[where] = sliding_window_predict(model, image, (32, 32, 32), 120, device=device, accumulate=where)
        peaks[where] = torch.cuda.max_memory_allocated(device)
    sums_bytes = 120 * 96**3 * 4
    assert peaks["device"] - peaks["cpu"] > 0.9 * sums_bytes, peaks
    torch.testing.assert_close(results["device"], results["cpu"], rtol=0, atol=1e-6)
