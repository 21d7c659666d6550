"""STU-Net: sizes and exact parameter counts, shapes, options, input checks, encoder keys and weight loading."""

from __future__ import annotations

import pytest
import torch

from anatomask_lab.models import SIZES, STUNetSpec, build_mim, build_stunet, encoder_keys, load_encoder_weights

SMALL = STUNetSpec((4, 8, 8, 16, 16, 16), (1, 2, 1, 1, 1, 1), 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("size", "millions"), [("S", 14.60), ("B", 58.26), ("L", 440.30), ("H", 1457.33)]
)
def test_parameter_counts_match_stunet_table_on_meta(size, millions):
    model = build_stunet(size, in_channels=1, num_classes=105, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    count = n_params(model)
    assert abs(count / 1e6 - millions) / millions < 0.005
    assert round(count / 1e6, 2) == millions  # the rules reproduce the table to the last digit


def test_meta_device_context_manager_and_sizes():
    with torch.device("meta"):
        model = build_stunet("L")
    assert next(model.parameters()).is_meta
    assert SIZES["B"].widths == (32, 64, 128, 256, 512, 512) and SIZES["H"].blocks == (3,) * 6
    assert [SIZES[s].decoder_width for s in ("tiny", "S", "B", "L", "H")] == [128, 256, 512, 1024, 1536]
    with pytest.raises(TypeError):
        SIZES["X"] = SIZES["B"]  # read-only mapping: no module-level mutable state
    with pytest.raises(ValueError, match="unknown STU-Net size"):
        build_stunet("XL")


def test_block_structure_follows_stunet():
    model = build_stunet("B", device="meta")
    keys = set(model.state_dict())
    # projection shortcut in the first block of every stage (stage 0 included) and of every decoder stage
    assert all(f"encoder.stages.{i}.0.conv3.weight" in keys for i in range(6))
    assert all(f"decoder.stages.{u}.0.conv3.weight" in keys for u in range(5))
    assert "encoder.stages.0.0.norm1.weight" in keys and "encoder.stages.0.0.conv1.bias" in keys
    assert len(model.decoder.heads) == 5
    assert model.decoder.stages[0][0].conv1.in_channels == 2 * 512
    big = build_stunet("H", device="meta")
    assert len(big.encoder.stages[3]) == 3 and big.encoder.stages[3][1].conv3 is None


def test_forward_shapes_deep_supervision_on_and_off():
    torch.manual_seed(0)
    model = build_stunet(SMALL, in_channels=2, num_classes=3)
    x = torch.randn(1, 2, 32, 32, 64)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, 32 // f, 32 // f, 64 // f) for f in (1, 2, 4, 8, 16)]
    model.deep_supervision = False
    single = model(x)
    torch.testing.assert_close(single, outs[0])
    tiny = build_stunet("tiny", num_classes=5, deep_supervision=False)
    assert tiny(torch.randn(1, 1, 64, 32, 32)).shape == (1, 5, 64, 32, 32)


def test_he_initialisation():
    model = build_stunet(SMALL)
    conv = model.encoder.stages[2][0].conv2
    fan_in = conv.weight[0].numel()
    std = conv.weight.std().item()
    assert abs(std / (2.0 / (1 + 1e-4) / fan_in) ** 0.5 - 1) < 0.15
    assert torch.count_nonzero(conv.bias) == 0


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    plain = build_stunet(SMALL, num_classes=2)
    ckpt = build_stunet(SMALL, num_classes=2, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 64)
    grads = []
    for model in (plain, ckpt):
        loss = sum(o.square().mean() for o in model(x))
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_anisotropic_strides():
    strides = [1, (1, 2, 2), 2, 2, 2, 2]
    model = build_stunet(SMALL, num_classes=2, strides=strides)
    outs = model(torch.randn(1, 1, 32, 32, 64))
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 32, 64), (32, 16, 32), (16, 8, 16), (8, 4, 8), (4, 2, 4)]
    assert model.encoder.get_downsample_ratio() == (16, 32, 32)
    with pytest.raises(ValueError, match="expected 6 per-stage strides"):
        build_stunet(SMALL, strides=[1, 2, 2])


def test_input_errors_name_the_shapes():
    model = build_stunet(SMALL)
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 32, 48\).*multiple of the total stride \(32, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match=r"1 input channel.*\(1, 2, 32, 32, 32\)"):
        model(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        model(torch.randn(1, 32, 32, 32))


def test_mim_encoder_loads_into_stunet_by_key():
    mim = build_mim(SMALL)
    stunet = build_stunet(SMALL, num_classes=4)
    enc_state = mim.encoder.state_dict()
    assert set(enc_state) < set(stunet.encoder_state_dict())
    result = stunet.encoder.load_state_dict(enc_state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("stages.5.") for k in result.missing_keys)
    for key, value in enc_state.items():
        torch.testing.assert_close(stunet.encoder.state_dict()[key], value)
    assert encoder_keys(mim) == [f"encoder.{k}" for k in enc_state]
    assert set(encoder_keys(stunet)) == {f"encoder.{k}" for k in stunet.encoder_state_dict()}


def test_load_encoder_weights_adapts_the_first_convs():
    mim = build_mim(SMALL)
    stunet = build_stunet(SMALL, in_channels=2, num_classes=3)
    report = load_encoder_weights(stunet, mim.state_dict())  # full MIM state: decoder keys are unexpected
    assert set(report.adapted) == {"stages.0.0.conv1.weight", "stages.0.0.conv3.weight"}
    assert report.unexpected and all(k.startswith("decoder.") for k in report.unexpected)
    assert report.missing and all(k.startswith("stages.5.") for k in report.missing)
    assert len(report.loaded) == len(mim.encoder.state_dict())
    w1 = mim.encoder.stages[0][0].conv1.weight
    w2 = stunet.encoder.stages[0][0].conv1.weight
    torch.testing.assert_close(w2, torch.cat([w1, w1], dim=1) / 2)
    # same response to a 2-channel input with equal channels as the 1-channel conv to one channel
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(
        stunet.encoder.stages[0][0].conv1(x.repeat(1, 2, 1, 1, 1)), mim.encoder.stages[0][0].conv1(x)
    )
    same = build_stunet(SMALL, num_classes=3)
    rep = load_encoder_weights(same, mim.encoder.state_dict())
    assert not rep.adapted and not rep.unexpected
    wrong = build_stunet(STUNetSpec((4, 8, 16, 16, 16, 16), (1,) * 6, 32))
    with pytest.raises(ValueError, match="source shape"):
        load_encoder_weights(wrong, mim.encoder.state_dict())
