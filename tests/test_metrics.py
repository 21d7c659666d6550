"""anatomask_lab.metrics against MONAI's independent implementation (compute_surface_dice, use_subvoxels=True)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from anatomask_lab import metrics

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")
monai_utils = pytest.importorskip("monai.metrics.utils")

ATOL = 1e-6


def monai_nsd(pred: np.ndarray, gt: np.ndarray, spacing, tolerance: float) -> float:
    """MONAI's NSD of one binary pair (NaN when both empty, 0 when one is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = monai_metrics.compute_surface_dice(
            torch.from_numpy(pred[None, None]), torch.from_numpy(gt[None, None]), [tolerance],
            include_background=True, spacing=[float(s) for s in spacing], use_subvoxels=True)
    return float(value[0, 0])


def monai_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = monai_metrics.compute_dice(torch.from_numpy(pred[None, None]).float(),
                                           torch.from_numpy(gt[None, None]).float(), include_background=True)
    return float(value[0, 0])


def blobs(rng: np.random.Generator, shape, sigma: float, level: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), sigma, mode="constant", cval=0.5) > level


# ----------------------------------------------------------------------------------------------------------------
# area table and surface area
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (3.0, 0.5, 1.1), (1.5, 1.5, 5.0)])
def test_area_table_matches_monai(spacing):
    reference = monai_utils.get_code_to_measure_table(spacing)[0].numpy()
    np.testing.assert_allclose(metrics.surfel_table(spacing), reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 2.3)])
def test_contour_table_matches_monai(spacing):
    reference = np.asarray(monai_utils.get_code_to_measure_table(spacing)[0], dtype=np.float64)
    np.testing.assert_allclose(metrics.surfel_table(spacing), reference, rtol=1e-12)


def test_sphere_area_close_to_4_pi_r2():
    radius = 20.0
    grid = np.ogrid[:50, :50, :50]
    sphere = sum((g - 24.5) ** 2 for g in grid) <= radius**2
    # marching cubes on a binary mask overestimates a smooth surface by a few percent (staircase)
    ratio = metrics.surface_area(sphere, 1.0) / (4 * math.pi * radius**2)
    assert 1.0 < ratio < 1.12
    assert metrics.surface_area(sphere, 0.5) == pytest.approx(ratio * 4 * math.pi * 10.0**2, rel=1e-12)
    assert metrics.surface_area(np.zeros((3, 3, 3), bool), 1.0) == 0.0


@pytest.mark.parametrize("order", [(1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0)])
def test_area_follows_axes_under_transposition(order):
    mask = blobs(np.random.default_rng(5), (14, 11, 9), 1.0, 0.5)
    spacing = np.array([0.6, 1.1, 2.7])
    reference = metrics.surface_area(mask, spacing)
    assert metrics.surface_area(mask.transpose(order), spacing[list(order)]) == pytest.approx(reference, rel=1e-12)


def test_single_voxel_area_is_octahedron():
    voxel = np.ones((1, 1, 1), dtype=bool)  # 8 corner triangles of a regular octahedron with vertices 0.5 away
    assert metrics.surface_area(voxel, 1.0) == pytest.approx(8 * math.sqrt(3) / 8)


# ----------------------------------------------------------------------------------------------------------------
# NSD against MONAI
# ----------------------------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    ndim=st.sampled_from([2, 3, 3]),
    sigma=st.sampled_from([0.0, 0.7, 1.5]),
    tolerance=st.floats(0.0, 6.0),
)
def test_surface_dice_matches_monai_on_random_shapes(seed, ndim, sigma, tolerance):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(2, 18 if ndim == 3 else 40, ndim))
    spacing = tuple(rng.uniform(0.3, 3.0, ndim))
    level = 0.5 if sigma == 0 else rng.uniform(0.45, 0.55)
    pred, gt = blobs(rng, shape, sigma, level), blobs(rng, shape, sigma, level)
    if rng.random() < 0.3:  # a near-miss prediction: the ground truth shifted by one voxel
        pred = np.roll(gt, 1, axis=int(rng.integers(ndim)))
    ours = metrics.surface_dice(pred, gt, spacing, tolerance, convention="flare")
    reference = monai_nsd(pred, gt, spacing, tolerance)
    if not gt.any() and not pred.any():
        assert math.isnan(reference) and ours == 1.0
    else:
        assert abs(ours - reference) <= ATOL


def _voxel(shape, *index):
    mask = np.zeros(shape, dtype=bool)
    mask[index] = True
    return mask


EDGE_CASES = {
    "one voxel, same": (_voxel((5, 6, 7), 2, 3, 4), _voxel((5, 6, 7), 2, 3, 4), (1.0, 1.0, 1.0), 0.0),
    "one voxel, next along z": (_voxel((5, 6, 7), 2, 3, 4), _voxel((5, 6, 7), 2, 3, 5), (0.5, 0.8, 3.0), 1.0),
    "one voxel, far": (_voxel((9, 9, 9), 1, 1, 1), _voxel((9, 9, 9), 7, 6, 5), (1.2, 0.9, 2.0), 3.0),
    "one voxel vs blob": (_voxel((8, 8, 8), 4, 4, 4), np.pad(np.ones((4, 4, 4), bool), 2), (1.0, 0.7, 2.5), 1.5),
    "corner voxels": (_voxel((4, 5, 6), 0, 0, 0), _voxel((4, 5, 6), 3, 4, 5), (1.0, 2.0, 3.0), 20.0),
    "full volume": (np.ones((4, 5, 6), bool), np.ones((4, 5, 6), bool), (0.7, 1.1, 2.3), 0.0),
    "full vs half": (np.ones((6, 5, 4), bool), np.arange(6)[:, None, None] < np.full((6, 5, 4), 3),
                     (1.5, 1.5, 1.5), 3.0),
    "slab on the border": (np.arange(8)[None, :, None] < np.full((5, 8, 5), 2),
                           np.arange(8)[None, :, None] < np.full((5, 8, 5), 4), (0.8, 1.5, 0.8), 3.0),
    "distance equals tolerance": (np.arange(10)[:, None, None] < np.full((10, 4, 4), 3),
                                  np.arange(10)[:, None, None] < np.full((10, 4, 4), 5), (1.5, 1.0, 1.0), 3.0),
    "one-voxel-thick volume": (np.ones((1, 6, 6), bool), _voxel((1, 6, 6), 0, 2, 2), (2.0, 1.0, 1.0), 2.0),
    "2-D pixels on the border": (_voxel((6, 7), 0, 3), _voxel((6, 7), 5, 6), (0.6, 1.7), 4.0),
    "2-D full vs pixel": (np.ones((5, 5), bool), _voxel((5, 5), 2, 2), (1.0, 1.0), 1.0),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_surface_dice_matches_monai_on_edge_cases(name):
    pred, gt, spacing, tolerance = EDGE_CASES[name]
    for a, b in ((pred, gt), (gt, pred)):
        reference = monai_nsd(a, b, spacing, tolerance)
        assert abs(metrics.surface_dice(a, b, spacing, tolerance) - reference) <= ATOL


def test_surface_dice_is_one_for_identical_and_monotone_in_tolerance():
    rng = np.random.default_rng(3)
    gt = blobs(rng, (20, 20, 12), 1.5, 0.5)
    pred = np.roll(gt, 2, axis=0)
    assert metrics.surface_dice(gt, gt, (1.0, 1.0, 2.0), 0.0) == 1.0
    values = [metrics.surface_dice(pred, gt, (1.0, 1.0, 2.0), t) for t in (0.0, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] < values[-1] <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# Dice and the empty-case conventions
# ----------------------------------------------------------------------------------------------------------------
def test_dice_matches_monai():
    rng = np.random.default_rng(1)
    for _ in range(10):
        pred, gt = blobs(rng, (12, 10, 9), 1.0, 0.5), blobs(rng, (12, 10, 9), 1.0, 0.5)
        assert metrics.dice(pred, gt) == pytest.approx(monai_dice(pred, gt), abs=ATOL)
    assert metrics.dice(gt, gt) == 1.0


EMPTY = np.zeros((4, 4, 4), dtype=bool)
SOME = _voxel((4, 4, 4), 1, 2, 3)


@pytest.mark.parametrize(
    ("pred", "gt", "totalseg", "flare"),
    [(EMPTY, EMPTY, math.nan, 1.0), (SOME, EMPTY, math.nan, 0.0), (EMPTY, SOME, 0.0, 0.0)],
    ids=["both empty", "gt empty", "pred empty"],
)
def test_empty_case_conventions(pred, gt, totalseg, flare):
    for fn in (metrics.dice, lambda p, g, **kw: metrics.surface_dice(p, g, (1.0, 1.0, 2.0), 3.0, **kw)):
        np.testing.assert_equal(fn(pred, gt, convention="totalseg"), totalseg)
        np.testing.assert_equal(fn(pred, gt, convention="flare"), flare)
    # MONAI's own choice: NaN when both are empty, else 0
    np.testing.assert_equal(monai_nsd(pred, gt, (1.0, 1.0, 2.0), 3.0), math.nan if not pred.any() | gt.any() else 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        metrics.surface_dice(SOME, SOME[:3], 1.0, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        metrics.surface_dice(SOME, SOME, (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        metrics.surface_dice(SOME, SOME, 1.0, -1.0)
    with pytest.raises(ValueError, match="convention"):
        metrics.dice(SOME, SOME, convention="monai")


# ----------------------------------------------------------------------------------------------------------------
# label maps
# ----------------------------------------------------------------------------------------------------------------
def _label_map(rng: np.random.Generator, shape, n_classes: int) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int16)
    for label in range(1, n_classes + 1):
        labels[blobs(rng, shape, 1.2, 0.53) & (rng.random() < 0.85)] = label
    return labels


def test_evaluate_case_matches_monai_with_flare22_tolerances():
    rng = np.random.default_rng(7)
    shape, spacing = (24, 20, 14), (0.8, 0.8, 2.5)
    gt = _label_map(rng, shape, 13)
    pred = np.where(rng.random(shape) < 0.9, np.roll(gt, 1, axis=1), _label_map(rng, shape, 13))
    pred[pred == 5] = 0  # one class missed entirely
    result = metrics.evaluate_case(pred, gt, spacing, metrics.FLARE22_CLASSES, "flare22", "flare")
    assert list(result) == list(metrics.FLARE22_CLASSES.values())
    one_hot = [torch.from_numpy(np.stack([m == k for k in range(14)])[None]) for m in (pred, gt)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = monai_metrics.compute_surface_dice(
            *one_hot, list(metrics.FLARE22_TOLERANCES_MM.values()), spacing=list(spacing), use_subvoxels=True)[0]
        reference_dsc = monai_metrics.compute_dice(*(t.float() for t in one_hot), include_background=False)[0]
    for k, name in metrics.FLARE22_CLASSES.items():
        if not (gt == k).any():  # FLARE: 1 when both are empty, 0 for a false-positive class
            expected = 0.0 if (pred == k).any() else 1.0
            assert result[name] == {"dsc": expected, "nsd": expected}, name
        else:  # MONAI's DSC is NaN for an empty ground truth, so compare only here
            assert abs(result[name]["nsd"] - float(reference[k - 1])) <= ATOL, name
            assert abs(result[name]["dsc"] - float(reference_dsc[k - 1])) <= ATOL, name
    assert (gt == 5).any() and result["aorta"] == {"dsc": 0.0, "nsd": 0.0}
    assert any(not (gt == k).any() for k in range(1, 14)), "the case should exercise an absent class"


def test_evaluate_case_crops_equal_full_volume_metrics():
    rng = np.random.default_rng(11)
    gt = _label_map(rng, (30, 16, 12), 3)
    pred = np.roll(gt, -1, axis=0)
    classes = {1: "a", 2: "b", 3: "c"}
    result = metrics.evaluate_case(pred, gt, (1.0, 1.3, 2.0), classes, {1: 1.0, 2: 2.0, 3: 0.5})
    for (k, name), tol in zip(classes.items(), (1.0, 2.0, 0.5), strict=True):
        assert result[name]["nsd"] == pytest.approx(metrics.surface_dice(pred == k, gt == k, (1.0, 1.3, 2.0), tol))
        assert result[name]["dsc"] == pytest.approx(metrics.dice(pred == k, gt == k))


def test_evaluate_case_errors():
    gt = np.zeros((5, 5, 5), dtype=np.uint8)
    gt[1:3, 1:3, 1:3] = 2
    with pytest.raises(ValueError, match=r"prediction holds labels \[7\] outside the class table"):
        metrics.evaluate_case(np.where(gt > 0, 7, 0), gt, 1.0, {1: "a", 2: "b"})
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.evaluate_case(gt[:4], gt, 1.0, {2: "b"})
    with pytest.raises(ValueError, match=r"no NSD tolerance for labels \[2\]"):
        metrics.evaluate_case(gt, gt, 1.0, {1: "a", 2: "b"}, {1: 2.0})
    with pytest.raises(ValueError, match="positive integers"):
        metrics.evaluate_case(gt, gt, 1.0, {0: "background", 2: "b"})
    with pytest.raises(ValueError, match="integers"):
        metrics.evaluate_case(gt.astype(float), gt, 1.0, {2: "b"})


def test_one_flare22_table_with_the_release_names_and_ids():
    from anatomask_lab.data.prepare import flare22

    assert dict(metrics.FLARE22_CLASSES) == dict(enumerate(flare22.CLASSES, start=1))  # one table, shared
    assert metrics.FLARE22_CLASSES[2] == "right kidney" and metrics.FLARE22_CLASSES[13] == "left kidney"
    assert metrics.FLARE22_CLASSES[6] == "inferior vena cava" and metrics.FLARE22_CLASSES[7] == "right adrenal gland"
    assert set(metrics.FLARE22_CLASSES) == set(metrics.FLARE22_TOLERANCES_MM) == set(range(1, 14))


def test_resolve_tolerances():
    classes = dict(metrics.FLARE22_CLASSES)
    flare = metrics.resolve_tolerances("flare22", classes)
    assert flare[1] == 5.0 and flare[5] == 2.0 and flare[12] == 7.0 and flare[13] == 3.0
    assert set(metrics.resolve_tolerances("totalseg", {3: "x", 9: "y"}).values()) == {3.0}
    assert metrics.resolve_tolerances("2.5", {4: "x"}) == {4: 2.5}
    assert metrics.resolve_tolerances(1, {4: "x"}) == {4: 1.0}
    with pytest.raises(ValueError, match=r"no NSD tolerance for labels \[14\]"):
        metrics.resolve_tolerances("flare22", {14: "bladder"})
    with pytest.raises(ValueError, match="'totalseg', 'flare22' or a number"):
        metrics.resolve_tolerances("amos", {1: "x"})
