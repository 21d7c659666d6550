"""Masking core: exact counts, top-k selection, uniform fill, determinism, schedule and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anatomask_lab.masking import (
    active_maps,
    anatomask_mask,
    anatomical_ratio,
    check_mask,
    mask_counts,
    mask_to_voxels,
    patch_grid,
    patch_loss,
    patch_mean,
    patchify,
    random_mask,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(name)


def test_reference_counts():
    # 112x112x128 input, 16-voxel patches: 7x7x8 grid, 392 patches; the reference keeps round(392 * 0.4) = 157
    assert patch_grid((112, 112, 128), 16) == (7, 7, 8)
    assert mask_counts(392, 0.6) == (235, 0)
    assert mask_counts(392, 0.6, 0.5) == (235, 117)
    assert mask_counts(392, 0.9, 0.5) == (392 - 39, 176)
    assert mask_counts(10, 0.6, 0.5) == (6, 3)
    assert mask_counts(10, 0.5, 0.5) == (5, 2)  # floor(2.5)
    assert mask_counts(4, 0.5, 1.0) == (2, 2)


@settings(max_examples=60, deadline=None)
@given(
    grid=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    gamma=st.floats(0.05, 0.95),
    r_t=st.floats(0.0, 1.0),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_counts_property(grid, gamma, r_t, batch, seed):
    n = math.prod(grid)
    expected = n - round(n * (1 - gamma))
    if expected <= 0 or expected >= n:
        with pytest.raises(ValueError, match="gamma"):
            random_mask(batch, grid, gamma)
        return
    g = torch.Generator().manual_seed(seed)
    m = random_mask(batch, grid, gamma, generator=g)
    assert m.dtype == torch.bool and tuple(m.shape) == (batch, *grid)
    assert m.flatten(1).sum(1).tolist() == [expected] * batch

    loss = torch.rand(batch, *grid, generator=g)
    a = anatomask_mask(loss, gamma, r_t, generator=g)
    assert a.shape == loss.shape
    assert a.flatten(1).sum(1).tolist() == [expected] * batch
    # every one of the n_top highest losses is masked
    _, n_top = mask_counts(n, gamma, r_t)
    top_idx = loss.flatten(1).topk(n_top, dim=1).indices
    assert torch.gather(a.flatten(1), 1, top_idx).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["high", "low"])
def test_selected_set_is_true_top_k(device, order):
    device = _device(device)
    g = torch.Generator(device=device).manual_seed(1)
    loss = torch.randn(8, 7, 7, 8, generator=g, device=device)
    gamma, r_t = 0.6, 0.5
    n_masked, n_top = mask_counts(392, gamma, r_t)
    m = anatomask_mask(loss, gamma, r_t, generator=g, order=order)
    flat_loss, flat_m = loss.flatten(1).cpu(), m.flatten(1).cpu()
    for b in range(8):
        ranked = np.argsort(-flat_loss[b].numpy() if order == "high" else flat_loss[b].numpy(), kind="stable")
        assert flat_m[b, ranked[:n_top]].all()
        assert int(flat_m[b].sum()) == n_masked


def test_top_set_exact_with_r_one():
    # r_t = 1: the masked set is exactly the n_masked highest (or lowest) losses
    g = torch.Generator().manual_seed(2)
    loss = torch.rand(3, 5, 6, generator=g)
    m = anatomask_mask(loss, 0.4, 1.0, generator=g)
    n_masked, _ = mask_counts(30, 0.4)
    expected = torch.zeros(3, 30, dtype=torch.bool)
    expected.scatter_(1, loss.flatten(1).topk(n_masked, dim=1).indices, True)
    assert torch.equal(m.flatten(1), expected)
    low = anatomask_mask(loss, 0.4, 1.0, generator=g, order="low")
    expected = torch.zeros(3, 30, dtype=torch.bool)
    expected.scatter_(1, (-loss.flatten(1)).topk(n_masked, dim=1).indices, True)
    assert torch.equal(low.flatten(1), expected)


def test_r_zero_behaves_like_random_mask():
    # With r_t = 0 no patch is chosen by loss: a loss map that strongly prefers some patches must not bias the mask.
    g = torch.Generator().manual_seed(3)
    loss = torch.zeros(1, 4, 5).expand(4000, 4, 5).clone()
    loss[:, 0, :] = 100.0
    m = anatomask_mask(loss, 0.5, 0.0, generator=g)
    freq = m.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.04)


def test_random_fill_is_uniform_chi_square():
    # the random part of the mask is uniform over the patches that were not chosen by loss
    g = torch.Generator().manual_seed(4)
    gamma, r_t, draws = 0.5, 0.5, 6000
    loss = torch.arange(12, dtype=torch.float32).flip(0).view(1, 3, 4).expand(draws, 3, 4).contiguous()
    m = anatomask_mask(loss, gamma, r_t, generator=g).flatten(1)
    n_masked, n_top = mask_counts(12, gamma, r_t)  # 6 masked, 3 top (patches 0, 1, 2 have the highest loss)
    assert m[:, :n_top].all()
    counts = m[:, n_top:].sum(0).double().numpy()
    expected = draws * (n_masked - n_top) / (12 - n_top)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 8 degrees of freedom: the 0.999 quantile is 26.1
    assert chi2 < 26.1, (chi2, counts)


def test_random_mask_is_uniform_chi_square():
    g = torch.Generator().manual_seed(5)
    m = random_mask(8000, (2, 3, 2), 0.25, generator=g).flatten(1)
    counts = m.sum(0).double().numpy()
    expected = 8000 * 3 / 12
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 31.3  # 11 degrees of freedom, 0.999 quantile


def test_ties_are_broken_at_random():
    # all losses equal: the top set must not always be the first patches
    g = torch.Generator().manual_seed(6)
    loss = torch.ones(2000, 10)
    m = anatomask_mask(loss, 0.5, 1.0, generator=g)
    freq = m.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.05)


@pytest.mark.parametrize("bad", [float("nan"), -math.inf])
def test_unscored_patches_are_never_top(bad):
    g = torch.Generator().manual_seed(7)
    loss = torch.rand(500, 20, generator=g)
    unscored = torch.rand(500, 20, generator=g) < 0.5
    loss[unscored] = bad
    n_masked, n_top = mask_counts(20, 0.6, 0.5)
    m = anatomask_mask(loss, 0.6, 0.5, generator=g)
    assert m.sum(1).eq(n_masked).all()
    # the top-scoring finite patches are masked
    finite = torch.where(unscored, torch.full_like(loss, -math.inf), loss)
    n_scored = (~unscored).sum(1)
    for b in range(20):
        k = min(n_top, int(n_scored[b]))
        assert m[b, finite[b].topk(k).indices].all()
    # all unscored: a purely random mask with the exact count
    all_bad = torch.full((50, 20), bad)
    assert anatomask_mask(all_bad, 0.6, 0.5, generator=g).sum(1).eq(n_masked).all()


def test_unscored_never_picked_as_low():
    loss = torch.tensor([[-math.inf, math.nan, 0.5, 0.1, 0.2, 0.9, 0.3, 0.4, 0.6, 0.7]])
    g = torch.Generator().manual_seed(8)
    for _ in range(20):
        m = anatomask_mask(loss, 0.4, 1.0, generator=g, order="low")
        assert m[0].nonzero().flatten().tolist() == [3, 4, 6, 7]


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_under_seed(device):
    device = _device(device)
    loss = torch.rand(4, 7, 7, 8, device=device)
    masks = []
    for _ in range(2):
        g = torch.Generator(device=device).manual_seed(123)
        masks.append(
            (random_mask(4, (7, 7, 8), 0.6, generator=g), anatomask_mask(loss, 0.6, 0.3, generator=g))
        )
    assert torch.equal(masks[0][0], masks[1][0]) and torch.equal(masks[0][1], masks[1][1])
    assert masks[0][0].device.type == device.type and masks[0][1].device.type == device.type
    g = torch.Generator(device=device).manual_seed(124)
    assert not torch.equal(masks[0][1], anatomask_mask(loss, 0.6, 0.3, generator=g))


@pytest.mark.gpu
def test_no_host_device_sync_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    g = torch.Generator(device="cuda").manual_seed(0)
    loss = torch.rand(8, 7, 7, 8, device="cuda", generator=g)
    anatomask_mask(loss, 0.6, 0.3, generator=g)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        random_mask(8, (7, 7, 8), 0.6, generator=g)
        anatomask_mask(loss, 0.6, 0.3, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_anatomical_ratio_schedule():
    assert anatomical_ratio(0, 1000) == 0.0
    assert anatomical_ratio(500, 1000) == pytest.approx(0.25)
    assert anatomical_ratio(1000, 1000) == pytest.approx(0.5)
    assert anatomical_ratio(250, 1000, r0=0.5, rT=0.0) == pytest.approx(0.375)
    assert anatomical_ratio(2.5, 10) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="total_epochs"):
        anatomical_ratio(0, 0)
    with pytest.raises(ValueError, match="epoch"):
        anatomical_ratio(11, 10)
    with pytest.raises(ValueError, match="rT"):
        anatomical_ratio(1, 10, rT=1.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": "0.6"}, "gamma"),
        ({"gamma": 0.01}, "gamma"),  # masks 0 of 20 patches
        ({"gamma": 0.99}, "gamma"),  # masks all 20
        ({"r_t": -0.1}, "r_t"),
        ({"r_t": 1.1}, "r_t"),
        ({"order": "middle"}, "order"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"patch_loss": torch.rand(2, 4, 5), "gamma": 0.6, "r_t": 0.5, **kwargs}
    order = args.pop("order", "high")
    with pytest.raises(ValueError, match=match):
        anatomask_mask(args["patch_loss"], args["gamma"], args["r_t"], order=order)


def test_bad_patch_loss():
    with pytest.raises(ValueError, match="patch_loss.*floating"):
        anatomask_mask(torch.ones(2, 4, 5, dtype=torch.long), 0.6, 0.5)
    with pytest.raises(ValueError, match="patch_loss.*shape"):
        anatomask_mask(torch.rand(5), 0.6, 0.5)
    with pytest.raises(ValueError, match="patch_loss.*Tensor"):
        anatomask_mask(np.random.rand(2, 4, 5), 0.6, 0.5)
    with pytest.raises(ValueError, match="grid"):
        random_mask(2, (0, 3), 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        random_mask(0, (4, 4), 0.5)


def test_patch_helpers_against_loops():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 6, 4, 8, generator=g)
    p = (3, 2, 4)
    patches = patchify(x, p)
    assert patches.shape == (2, 2, 2, 2, 3 * 24)
    assert torch.equal(patches[1, 1, 0, 1], x[1, :, 3:6, 0:2, 4:8].reshape(-1))

    mean = patch_mean(x, p)
    assert torch.allclose(mean[0, 1, 1, 0], x[0, :, 3:6, 2:4, 0:4].mean())

    mask = torch.tensor([[[[True, False], [False, True]], [[False, False], [True, True]]]])
    vox = mask_to_voxels(mask, p)
    assert vox.shape == (1, 6, 4, 8)
    assert vox[0, 3:6, 2:4, 4:8].all() and not vox[0, 0:3, 0:2, 4:8].any()

    pred = torch.randn(2, 3, 6, 4, 8, generator=g)
    raw = patch_loss(pred, x, p, normalize=False)
    assert torch.allclose(raw, patch_mean((pred - x) ** 2, p), atol=1e-6)
    norm = patch_loss(pred, x, p)
    t = x[1, :, 0:3, 2:4, 4:8]
    t = (t - t.mean()) / torch.sqrt(t.var() + 1e-6)
    assert torch.allclose(norm[1, 0, 1, 1], ((pred[1, :, 0:3, 2:4, 4:8] - t) ** 2).mean(), atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        patch_grid((33, 34, 35), 16)
    with pytest.raises(ValueError, match="shape"):
        patch_loss(pred, x[:, :1], p)


def test_active_maps_and_check_mask():
    mask = torch.tensor([[[[True, False], [False, True]], [[False, False], [True, True]]]])  # [1, 2, 2, 2]
    strides = [(1, 1, 1), (2, 1, 2), (2, 2, 2)]  # patch (4, 2, 4)
    maps = active_maps(mask, (4, 2, 4), strides)
    assert [tuple(m.shape) for m in maps] == [(1, 8, 4, 8), (1, 8, 4, 8), (1, 4, 4, 4), (1, 2, 2, 2)]
    assert torch.equal(maps[0], ~mask_to_voxels(mask, (4, 2, 4))) and torch.equal(maps[-1], ~mask)
    assert torch.equal(maps[2], ~mask_to_voxels(mask, (2, 2, 2)))
    x = torch.zeros(1, 1, 8, 4, 8)
    assert check_mask(mask, x, (4, 2, 4)) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"mask of shape \(1, 2, 2, 2\) does not match input \(1, 1, 8, 4, 16\)"):
        check_mask(mask, torch.zeros(1, 1, 8, 4, 16), (4, 2, 4))
    with pytest.raises(ValueError, match="bool"):
        check_mask(mask.float(), x, (4, 2, 4))


def test_reference_rt_schedule_is_one_epoch_ahead():
    # the authors' code: 0.5 * (epoch + 1) / (E - 1); the paper's form starts at r0
    assert [anatomical_ratio(e, 5, schedule="reference") for e in range(5)] == [0.125, 0.25, 0.375, 0.5, 0.625]
    assert [anatomical_ratio(e, 5) for e in range(5)] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert anatomical_ratio(999, 1000, schedule="reference") == pytest.approx(0.5 * 1000 / 999)
    assert anatomical_ratio(3, 5, 0.5, 0.0, schedule="reference") == 0.0
    with pytest.raises(ValueError, match="schedule must be"):
        anatomical_ratio(0, 5, schedule="cosine")
    with pytest.raises(ValueError, match="at least 2 epochs"):
        anatomical_ratio(0, 1, schedule="reference")
