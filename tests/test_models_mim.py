"""MIM model: decoders, loss, the information flow of masking, teacher copies and input checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from anatomask_lab.masking import mask_to_voxels, patch_loss, patchify, random_mask
from anatomask_lab.models import SIZES, MIMModel, STUNetSpec, build_mim, mim_loss

SMALL = STUNetSpec((4, 8, 8, 16, 16, 16), (1, 2, 1, 1, 1, 1), 32)
SHAPE = (32, 32, 48)
GRID = (2, 2, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(decoder="hierarchical", **kw) -> MIMModel:
    torch.manual_seed(0)
    return build_mim(SMALL, decoder=decoder, **kw)


def mask(gamma=0.6, seed=0, batch=2, grid=GRID):
    return random_mask(batch, grid, gamma, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decoder", ["hierarchical", "simple"])
def test_forward_shape_and_gradients_reach_every_parameter(decoder):
    model = make(decoder, in_channels=2)
    x = torch.randn(2, 2, *SHAPE)
    recon = model(x, mask())
    assert recon.shape == x.shape
    loss, per_patch = mim_loss(recon, x, mask())
    assert per_patch.shape == (2, *GRID) and per_patch.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if "mask_token" in n)


def test_hierarchical_decoder_structure():
    model = build_mim("B", device="meta")
    dec = model.decoder
    assert model.downsample_ratio == 16 and model.patch_size == (16, 16, 16)
    assert model.encoder.get_feature_map_channels() == [32, 64, 128, 256, 512]
    assert len(dec.densify) == 4  # no full-resolution densify map: no block would use it
    assert isinstance(dec.densify[0].proj, nn.Identity)  # deepest: 512 -> 512
    assert [d.proj.weight.shape[:2] for d in list(dec.densify)[1:]] == [(256, 256), (128, 128), (64, 64)]
    assert [d.proj.kernel_size for d in list(dec.densify)[1:]] == [(3, 3, 3)] * 3
    assert [b.up.in_channels for b in dec.blocks] == [512, 256, 128, 64]
    assert [b.up.kernel_size for b in dec.blocks] == [(4, 4, 4)] * 4 and dec.blocks[0].up.stride == (2, 2, 2)
    assert dec.head.in_channels == 32 and dec.head.out_channels == 1
    assert isinstance(dec.blocks[0].conv[1], nn.BatchNorm3d) and isinstance(dec.blocks[0].conv[2], nn.ReLU6)
    h = build_mim("H", device="meta", decoder_width=768)
    assert h.decoder.width == 768 and SIZES["H"].decoder_width == 1536
    assert not isinstance(h.decoder.densify[0].proj, nn.Identity)


def test_simple_decoder_uses_only_the_deepest_features():
    model = make("simple").eval()
    x = torch.randn(2, 1, *SHAPE)
    m = mask()
    feats = model.encoder(x, m)
    out = model.decoder(feats, m)
    shallow_changed = [f * 3 + 1 for f in feats[:-1]] + [feats[-1]]
    torch.testing.assert_close(model.decoder(shallow_changed, m), out)
    assert len(model.decoder.densify) == 1 and len(model.decoder.blocks) == 2
    assert [b[0].stride for b in model.decoder.blocks] == [(4, 4, 4), (4, 4, 4)]
    hier = make("hierarchical").eval()
    feats = hier.encoder(x, m)
    changed = [feats[0] * 3 + 1, *feats[1:]]  # stage-0 features feed no decoder block
    torch.testing.assert_close(hier.decoder(changed, m), hier.decoder(feats, m))
    changed = [feats[0], feats[1] * 3 + 1, *feats[2:]]
    assert not torch.allclose(hier.decoder(changed, m), hier.decoder(feats, m))


@pytest.mark.parametrize("backend", ["masked", pytest.param("spconv", marks=pytest.mark.needs_spconv)])
def test_reconstruction_ignores_the_masked_input(backend):
    model = make(backend=backend)  # train mode: decoder BN uses batch statistics
    x = torch.randn(2, 1, *SHAPE)
    m = mask()
    noise = torch.randn_like(x) * 50 * mask_to_voxels(m, 16).unsqueeze(1)
    torch.testing.assert_close(model(x + noise, m), model(x, m))
    visible_noise = torch.randn_like(x) * (~mask_to_voxels(m, 16)).unsqueeze(1)
    assert not torch.allclose(model(x + visible_noise, m), model(x, m))


@pytest.mark.needs_spconv
def test_backends_give_the_same_reconstruction_and_gradients():
    """fp32 reconstructions agree to ~1e-6; gradients are compared in fp64, because in fp32 a decoder ReLU6 input
    within rounding distance of a kink (0 or 6) flips branches now and then among ~1e6 activations."""
    x = torch.randn(2, 1, *SHAPE)
    m = mask(0.5, seed=3)
    recons, grads = [], []
    for backend in ("masked", "spconv"):
        model = make(backend=backend)
        recons.append(model(x, m).detach())
        model = model.double()
        loss, _ = mim_loss(model(x.double(), m), x.double(), m)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(recons[1], recons[0], rtol=1e-4, atol=1e-4 * recons[0].abs().max().item())
    scale = max(g.abs().max().item() for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * scale)


def test_loss_values():
    torch.manual_seed(1)
    x = torch.randn(2, 1, *SHAPE) * 3 + 2
    recon = torch.randn_like(x)
    m = mask(0.6)
    loss, per_patch = mim_loss(recon, x, m)
    # by hand: per-patch normalised target (unbiased variance, eps 1e-6), MSE per patch, mean over masked patches
    xp, rp = patchify(x, 16), patchify(recon, 16)
    target = (xp - xp.mean(-1, keepdim=True)) / (xp.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = (rp - target).pow(2).mean(-1)
    torch.testing.assert_close(per_patch, by_hand)
    torch.testing.assert_close(loss, by_hand[m].mean())
    assert not per_patch.requires_grad
    _, raw = mim_loss(recon, x, m, normalize_ranking=False)
    torch.testing.assert_close(raw, (rp - xp).pow(2).mean(-1))
    torch.testing.assert_close(raw, patch_loss(recon, x, 16, normalize=False))
    # the loss depends on masked patches only
    recon2 = recon + 10 * (~mask_to_voxels(m, 16)).unsqueeze(1)
    torch.testing.assert_close(mim_loss(recon2, x, m)[0], loss)
    # reconstructing the normalised target exactly gives zero loss
    zero, _ = mim_loss(_unpatchify(target, x.shape), x, m)
    assert zero.item() < 1e-10


def _unpatchify(p_bgc: torch.Tensor, shape) -> torch.Tensor:
    b, c, d, h, w = shape
    g = (d // 16, h // 16, w // 16)
    x = p_bgc.reshape(b, *g, c, 16, 16, 16).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(shape)


def test_loss_errors_name_the_shapes():
    x = torch.randn(2, 1, *SHAPE)
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32, 32\).*\(2, 1, 32, 32, 48\)"):
        mim_loss(torch.randn(2, 1, 32, 32, 32), x, mask())
    with pytest.raises(ValueError, match=r"grid \(2, 2, 5\) does not divide"):
        mim_loss(x, x, torch.zeros(2, 2, 2, 5, dtype=torch.bool))


def test_teacher_is_a_deepcopy_that_runs_in_eval_without_grad():
    student = make()
    x = torch.randn(2, 1, *SHAPE)
    student(x, mask())  # one training forward: BN running statistics move
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    state = teacher.state_dict()
    assert any(k.endswith("running_mean") for k in state) and any(k.endswith("mask_token") for k in state)
    assert any(k.endswith("num_batches_tracked") for k in state)
    with torch.no_grad():
        out_t = teacher(x, mask(seed=1))
        _, ranking = mim_loss(out_t, x, mask(seed=1))
    assert torch.isfinite(ranking).all() and ranking.shape == (2, *GRID)
    clone = make().eval()
    clone.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(clone(x, mask(seed=1)), out_t)
    # student and teacher with different masks, interleaved
    recon = student(x, mask(seed=2))
    with torch.no_grad():
        teacher(x, mask(seed=3))
    mim_loss(recon, x, mask(seed=2))[0].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_anisotropic_strides_and_options():
    model = make(strides=[1, (1, 2, 2), 2, 2, 2], norm_pooling="batch", grad_checkpointing=True)
    assert model.patch_size == (8, 16, 16) and model.downsample_ratio == (8, 16, 16)
    x = torch.randn(2, 1, 16, 32, 48)
    m = mask(grid=(2, 2, 3))
    recon = model(x, m)
    assert recon.shape == x.shape
    mim_loss(recon, x, m)[0].backward()
    simple = make("simple", strides=[1, (1, 2, 2), 2, 2, 2, 2])  # STU-Net's 6 strides: the 6th is ignored
    assert simple(x, m).shape == x.shape
    with pytest.raises(ValueError, match="stride 1 in stage 0"):
        make(strides=[2, 2, 2, 2, 1])
    with pytest.raises(ValueError, match="decoder_width"):
        make(decoder_width=40)
    with pytest.raises(ValueError, match="decoder must be"):
        make("unet")


def test_input_errors_name_the_shapes():
    model = make()
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32, 40\).*multiple of the total stride \(16, 16, 16\)"):
        model(torch.randn(2, 1, 32, 32, 40), torch.zeros(2, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"1 input channel.*\(2, 3, 32, 32, 48\)"):
        model(torch.randn(2, 3, *SHAPE), mask())
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2, 2\) does not match input \(2, 1, 32, 32, 48\)"):
        model(torch.randn(2, 1, *SHAPE), torch.zeros(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 2, 2, 3\)"):
        model(torch.randn(2, 1, *SHAPE), mask(batch=1))
    assert model.grid((112, 112, 128)) == (7, 7, 8)


def test_reference_init_is_pytorch_default_and_he_is_wider():
    import math

    from anatomask_lab.models import build_mim

    torch.manual_seed(0)
    he, ref = build_mim("tiny", init="he"), build_mim("tiny", init="reference")
    w_he, w_ref = he.encoder.stages[2][0].conv1.weight, ref.encoder.stages[2][0].conv1.weight
    fan_in = w_he[0].numel()
    assert abs(w_he.std().item() / math.sqrt(2 / (1 + 1e-4) / fan_in) - 1) < 0.1  # He (a = 0.01)
    assert abs(w_ref.std().item() / math.sqrt(1 / (3 * fan_in)) - 1) < 0.1  # kaiming_uniform(a=sqrt(5))
    proj_he = he.decoder.densify[1].proj.weight
    proj_ref = ref.decoder.densify[1].proj.weight
    assert abs(proj_he.std().item() / 0.02 - 1) < 0.15  # trunc-normal(0.02)
    assert abs(proj_ref.std().item() / math.sqrt(1 / (3 * proj_ref[0].numel())) - 1) < 0.1
    with pytest.raises(ValueError, match="init must be"):
        build_mim("tiny", init="xavier")
