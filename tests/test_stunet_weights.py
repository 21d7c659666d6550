"""STU-Net weights in and out: exports load strictly into STU-Net as its repository defines it and compute the same
function (names and axis order), STU-Net checkpoints initialise the kit's network, and bad files are refused."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anatomask_lab import finetune
from anatomask_lab.cli import main
from anatomask_lab.config import config_to_dict, pretrain_config
from anatomask_lab.export import export_encoder
from anatomask_lab.models import STUNetSpec, build_mim, build_stunet, load_encoder_weights
from anatomask_lab.runs import load_checkpoint, load_student_encoder, save_checkpoint
from anatomask_lab.stunet_weights import (
    convert_axes,
    from_stunet_keys,
    kit_strides,
    read_weights_file,
    to_stunet_keys,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIMS = (8, 16, 32, 64, 128, 128)
ISO_POOLS = [[2, 2, 2]] * 5


# ----------------------------------------------------------------------------------------------------------------
# STU-Net as its repository publishes it (nnU-Net v1 network file): module names, nesting and forward order
# ----------------------------------------------------------------------------------------------------------------
class RefResBlock(nn.Module):
    """conv1 -> norm1 -> act1 -> conv2 -> norm2, plus the input (through the 1x1 conv3 when present) -> act2."""

    def __init__(self, c_in, c_out, kernel, pad, stride=1, use_1x1conv=False):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=pad)
        self.norm1 = nn.InstanceNorm3d(c_out, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(c_out, c_out, kernel, padding=pad)
        self.norm2 = nn.InstanceNorm3d(c_out, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = nn.Conv3d(c_in, c_out, 1, stride=stride) if use_1x1conv else None

    def forward(self, x):
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return self.act2(y + shortcut)


class RefUpsample(nn.Module):
    """Nearest upsampling by the pooling kernel, then a 1x1 conv."""

    def __init__(self, c_in, c_out, pool):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel_size=1)
        self.pool = [float(p) for p in pool]

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=self.pool, mode="nearest"))


class RefSTUNet(nn.Module):
    """STU-Net: ``conv_blocks_context`` (6 stages), ``upsample_layers``, ``conv_blocks_localization``, ``seg_outputs``;
    pooling kernels per axis in nnU-Net's order (z, y, x); returns the logits full resolution first."""

    def __init__(self, in_channels, num_classes, depth, dims, pools, kernels=((3, 3, 3),) * 6):
        super().__init__()
        pads = [[k // 2 for k in kernel] for kernel in kernels]
        n = len(pools)
        self.conv_blocks_context = nn.ModuleList()
        for d in range(n + 1):
            c_in = in_channels if d == 0 else dims[d - 1]
            stride = 1 if d == 0 else pools[d - 1]
            self.conv_blocks_context.append(nn.Sequential(
                RefResBlock(c_in, dims[d], kernels[d], pads[d], stride=stride, use_1x1conv=True),
                *[RefResBlock(dims[d], dims[d], kernels[d], pads[d]) for _ in range(depth[d] - 1)]))
        self.upsample_layers = nn.ModuleList(RefUpsample(dims[-1 - u], dims[-2 - u], pools[-1 - u]) for u in range(n))
        self.conv_blocks_localization = nn.ModuleList(nn.Sequential(
            RefResBlock(2 * dims[-2 - u], dims[-2 - u], kernels[-2 - u], pads[-2 - u], use_1x1conv=True),
            *[RefResBlock(dims[-2 - u], dims[-2 - u], kernels[-2 - u], pads[-2 - u]) for _ in range(depth[-2 - u] - 1)])
            for u in range(n))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], num_classes, 1) for u in range(n))

    def forward(self, x):
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outputs = []
        for u, (up, stage, head) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization,
                                                  self.seg_outputs, strict=True)):
            x = stage(torch.cat((up(x), skips[-(u + 1)]), dim=1))
            outputs.append(head(x))
        return outputs[::-1]


def _zyx(x):
    """(x, y, z) <-> (z, y, x) of a [B, C, *, *, *] tensor (its own inverse)."""
    return x.permute(0, 1, 4, 3, 2)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norm weights and biases included), so that a swapped name changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def _pretraining_checkpoint(path, seed=0):
    """A kit pretraining checkpoint (``student``, ``config``) of the tiny MIM model with random weights."""
    mim = _randomise(build_mim("tiny"), seed)
    save_checkpoint(path, {"student": mim.state_dict(), "config": config_to_dict(pretrain_config("tiny")),
                           "epoch": 1})
    return path


def _outputs_match(kit_net, ref_net, x_kit):
    """Largest relative difference of the 5 deep-supervision outputs (float32)."""
    with torch.no_grad():
        ours = kit_net(x_kit)
        theirs = [_zyx(t) for t in ref_net(_zyx(x_kit))]
    assert len(ours) == len(theirs) == 5
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs, strict=True))


# ----------------------------------------------------------------------------------------------------------------
# (a) + (b): exports load strictly into STU-Net and compute the same function
# ----------------------------------------------------------------------------------------------------------------
def test_export_loads_strictly_into_stunet_and_computes_the_same(tmp_path):
    ckpt = _pretraining_checkpoint(tmp_path / "pre.pt")
    report = export_encoder(ckpt, tmp_path / "stunet_tiny.pth", naming="stunet", num_classes=3)
    assert report["axes"] == "stunet" and report["unexpected"] == []
    saved = torch.load(tmp_path / "stunet_tiny.pth", weights_only=True)  # what nnU-Net's torch.load sees
    weights = saved["network_weights"]
    assert saved["state_dict"].keys() == weights.keys()  # STU-Net's v1 loader reads state_dict, v2's .pth loader this
    ref = RefSTUNet(1, 3, [1] * 6, TINY_DIMS, ISO_POOLS)
    ref.load_state_dict(weights, strict=True)  # every name and shape as STU-Net defines them

    torch.manual_seed(0)  # the export's fresh parts: He init seeded with 0, then the pretrained encoder
    kit = build_stunet("tiny", num_classes=3)
    load_encoder_weights(kit, load_checkpoint(ckpt)["student"])
    x = torch.randn(1, 1, 64, 64, 32, generator=torch.Generator().manual_seed(1))  # x != z; 4 deepest voxels
    assert _outputs_match(kit, ref, x) < 1e-4  # float32 rounding; a wrong name or axis gives ~1

    # control: the kit's axis order loaded into STU-Net does not compute the same function on nnU-Net's arrays
    export_encoder(ckpt, tmp_path / "kit_axes.pth", naming="stunet", num_classes=3, axes="kit")
    ref_kit_axes = RefSTUNet(1, 3, [1] * 6, TINY_DIMS, ISO_POOLS)
    ref_kit_axes.load_state_dict(torch.load(tmp_path / "kit_axes.pth", weights_only=True)["network_weights"])
    assert _outputs_match(kit, ref_kit_axes, x) > 1e-2
    # the pretrained kernels are the student's, spatial axes reversed; 1x1 kernels and vectors are unchanged
    student = load_checkpoint(ckpt)["student"]
    w = student["encoder.stages.1.0.conv1.weight"]
    assert torch.equal(weights["conv_blocks_context.1.0.conv1.weight"], w.permute(0, 1, 4, 3, 2))
    assert not torch.equal(weights["conv_blocks_context.1.0.conv1.weight"], w)
    assert torch.equal(weights["conv_blocks_context.1.0.norm1.bias"], student["encoder.stages.1.0.norm1.bias"])
    assert sorted(saved["pretrained_keys"]) == sorted(
        to_stunet_keys({f"encoder.{k}": None for k in report["loaded"]}))
    assert not any(k.startswith("conv_blocks_context.5.") for k in saved["pretrained_keys"])


def test_anisotropic_multiblock_stunet_matches_with_reversed_strides():
    # nnU-Net's pooling kernels are (z, y, x); the kit's strides are the same per stage, reversed
    spec = STUNetSpec((4, 8, 8, 16, 16, 16), (2, 1, 2, 1, 1, 1), 16)
    pools_zyx = [[2, 2, 2], [1, 2, 2], [2, 2, 2], [1, 1, 2], [2, 2, 2]]
    strides = kit_strides(pools_zyx)
    assert strides[0] == (1, 1, 1) and strides[2] == (2, 2, 1) and strides[4] == (2, 1, 1)
    assert kit_strides([[1, 1, 1], *pools_zyx]) == strides  # nnU-Net v2 plans list stage 0 too
    kit = _randomise(build_stunet(spec, in_channels=2, num_classes=4, strides=strides), seed=3)
    ref = RefSTUNet(2, 4, spec.blocks, spec.widths, pools_zyx)
    ref.load_state_dict(convert_axes(to_stunet_keys(kit.state_dict()), "kit", "stunet"), strict=True)
    x = torch.randn(2, 2, 32, 32, 24, generator=torch.Generator().manual_seed(2))  # strides 32, 16, 8 per axis
    assert _outputs_match(kit, ref, x) < 1e-4  # float32 rounding; a wrong name or axis gives ~1
    # and back: STU-Net's weights, mapped and transposed, are the kit's
    back, unknown = from_stunet_keys(convert_axes(ref.state_dict(), "stunet", "kit"))
    assert unknown == [] and all(torch.equal(back[k], v) for k, v in kit.state_dict().items())
    with pytest.raises(ValueError, match="pooling kernels"):
        kit_strides(pools_zyx[:4])


# ----------------------------------------------------------------------------------------------------------------
# (c): STU-Net checkpoints as nnU-Net writes them initialise the kit's network
# ----------------------------------------------------------------------------------------------------------------
class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy's reconstructors under numpy 1's module names, as files saved before numpy 2 have them."""

    def save_global(self, obj, name=None):
        from numpy._core import multiarray

        if obj is multiarray.scalar or obj is multiarray._reconstruct:
            self.write(pickle.GLOBAL + f"numpy.core.multiarray\n{obj.__name__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _Numpy1PickleModule:
    Pickler = _Numpy1Pickler


def _trained_stunet(num_classes=7, seed=5):
    ref = _randomise(RefSTUNet(1, num_classes, [1] * 6, TINY_DIMS, ISO_POOLS), seed)
    params = list(ref.parameters())
    # SGD's state dict as after training (momentum buffers), written out: torch.optim's first use imports for seconds
    opt = {"state": {i: {"momentum_buffer": torch.ones_like(p)} for i, p in enumerate(params)},
           "param_groups": [{"lr": 0.01, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-5, "nesterov": True,
                             "maximize": False, "foreach": None, "differentiable": False, "fused": None,
                             "params": list(range(len(params)))}]}
    return ref, opt


def _save_v1(path, ref, opt):
    """nnU-Net v1 trainer checkpoint (STU-Net's released ``*.model``), with numpy-1 pickles of numpy scalars."""
    torch.save({"epoch": 4000, "state_dict": ref.state_dict(), "optimizer_state_dict": opt,
                "lr_scheduler_state_dict": None,
                "plot_stuff": ([np.float64(0.9), np.mean(np.array([0.5, 0.7]))], [np.float32(0.8)], [],
                               [np.float64(0.61)]),
                "best_stuff": (np.int64(3000), np.float64(0.4), np.float64(0.62)),
                "amp_grad_scaler": torch.amp.GradScaler("cpu").state_dict()}, path, pickle_module=_Numpy1PickleModule)


def _save_v2(path, ref, opt):
    """nnU-Net v2 trainer checkpoint (``checkpoint_final.pth``), DDP prefixes included."""
    torch.save({"network_weights": {f"module.{k}": v for k, v in ref.state_dict().items()},
                "optimizer_state": opt, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": np.array([0.4, 0.5])},
                "_best_ema": np.float64(0.5), "current_epoch": 1000, "trainer_name": "STUNetTrainer_base",
                "init_args": {"plans": {"configurations": {}}, "configuration": "3d_fullres", "fold": 0,
                              "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, path)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_stunet_checkpoint_initialises_the_kit_network(tmp_path, variant):
    ref, opt = _trained_stunet()
    file = tmp_path / ("stunet_tiny.model" if variant == "v1" else "checkpoint_final.pth")
    (_save_v1 if variant == "v1" else _save_v2)(file, ref, opt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(file, weights_only=True)  # plain weights_only refuses the numpy scalars

    model = finetune.build_segmenter("tiny", 1, 3)
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.heads.")}
    report = finetune.load_init(model, str(file))
    expected = from_stunet_keys(convert_axes(ref.state_dict(), "stunet", "kit"))[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in state if not k.startswith("decoder.heads."))
    assert all(torch.equal(state[k], v) for k, v in heads_before.items())  # 7-class heads are not transferred
    assert report["naming"] == "stunet" and report["axes"] == "stunet"
    assert report["entry"] == ("state_dict" if variant == "v1" else "network_weights")
    assert len(report["loaded"]) == len(state) - 10 and set(report["missing"]) == set(heads_before)
    assert sorted(report["skipped"]) == sorted(k for k in ref.state_dict() if k.startswith("seg_outputs."))
    assert report["unexpected"] == [] and report["adapted"] == []
    # the kernels were transposed: a 3x3x3 kernel equals STU-Net's with its spatial axes reversed
    w = ref.state_dict()["conv_blocks_context.2.0.conv2.weight"]
    assert torch.equal(model.encoder.stages[2][0].conv2.weight, w.permute(0, 1, 4, 3, 2))
    # the encoder alone, as load_student_encoder gives it; and the axis order can be overridden
    encoder = load_student_encoder(file)
    assert set(encoder) == set(model.encoder.state_dict())
    assert torch.equal(load_student_encoder(file, axes="kit")["stages.2.0.conv2.weight"], w)
    model_kit = finetune.build_segmenter("tiny", 1, 3)
    assert finetune.load_init(model_kit, str(file), "kit")["axes"] == "kit"
    assert torch.equal(model_kit.encoder.stages[2][0].conv2.weight, w)
    # two input channels: the first convolutions are adapted (summed, spread over the channels)
    model2 = finetune.build_segmenter("tiny", 2, 3)
    report2 = finetune.load_init(model2, str(file))
    assert set(report2["adapted"]) == {"encoder.stages.0.0.conv1.weight", "encoder.stages.0.0.conv3.weight"}
    assert torch.allclose(model2.encoder.stages[0][0].conv3.weight,
                          ref.state_dict()["conv_blocks_context.0.0.conv3.weight"].repeat(1, 2, 1, 1, 1) / 2)


def test_kit_export_round_trip_loads_only_what_was_pretrained(tmp_path):
    ckpt = _pretraining_checkpoint(tmp_path / "pre.pt", seed=4)
    export_encoder(ckpt, tmp_path / "enc.model", naming="stunet", num_classes=3)
    model = finetune.build_segmenter("tiny", 1, 6)
    report = finetune.load_init(model, str(tmp_path / "enc.model"))
    student = load_checkpoint(ckpt)["student"]
    pretrained = {k for k in student if k.startswith("encoder.")}
    assert set(report["loaded"]) == pretrained and report["axes"] == "stunet"  # recorded by the export
    assert all(torch.equal(model.state_dict()[k], student[k]) for k in pretrained)  # transposed back exactly
    assert all(k.startswith(("encoder.stages.5.", "decoder.")) for k in report["missing"])
    assert any(k.startswith("decoder.") for k in report["missing"])  # the export's decoder was never trained
    assert all(k.startswith(("conv_blocks_context.5.", "upsample_layers.", "conv_blocks_localization.",
                             "seg_outputs.")) for k in report["skipped"])
    # the finetuning CLI takes the axis order as --init-axes
    assert main(["finetune", "--preset", "tiny", "--init", str(tmp_path / "enc.model"), "--init-axes", "kit",
                 "--print-config"]) == 0


def test_export_cli_help_and_axes(tmp_path, capsys):
    ckpt = _pretraining_checkpoint(tmp_path / "pre.pt")
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(z, y, x)" in help_text and "--axes" in help_text
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "k.pth"), "--naming", "stunet",
                 "--axes", "kit", "--num-classes", "2"]) == 0
    assert "(x, y, z) order" in capsys.readouterr().out
    assert read_weights_file(tmp_path / "k.pth")["axes"] == "kit"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "a.pt"), "--axes", "stunet"]) == 2
    assert "applies to --naming stunet" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


# ----------------------------------------------------------------------------------------------------------------
# (d): bad files
# ----------------------------------------------------------------------------------------------------------------
_RAN = []


def _side_effect():
    _RAN.append(1)
    return {}


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


def test_bad_files_are_refused_in_one_line_naming_the_file(tmp_path):
    model = finetune.build_segmenter("tiny", 1, 3)
    torch.save({"epoch": 3, "optimizer_state_dict": {}}, tmp_path / "neither.model")
    with pytest.raises(ValueError, match=r"neither\.model: neither a pretraining checkpoint"):
        finetune.load_init(model, str(tmp_path / "neither.model"))
    # STU-Net-S weights (widths 16..256) into the tiny network: named as such, with the way out
    small = RefSTUNet(1, 3, [1] * 6, (16, 32, 64, 128, 256, 256), ISO_POOLS)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "small.model")
    with pytest.raises(ValueError, match=r"small\.model: conv_blocks_context\.0\.0\.conv1\.weight .*STU-Net-S "
                                         r"\(1 input channel\).*--size"):
        finetune.load_init(model, str(tmp_path / "small.model"))
    # another network in nnU-Net's file layout (not STU-Net's names)
    torch.save({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(1)}}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"plain\.pth: its 'network_weights' holds no STU-Net weights"):
        finetune.load_init(model, str(tmp_path / "plain.pth"))
    # a pickled object that would run code: refused before it runs, with the way to re-save the weights
    torch.save({"state_dict": {}, "plans": _Payload()}, tmp_path / "evil.model")
    with pytest.raises(ValueError, match=r"evil\.model: holds pickled Python objects .*_side_effect.*re-save"):
        finetune.load_init(model, str(tmp_path / "evil.model"))
    assert _RAN == []
    (tmp_path / "junk.model").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.model: not a readable torch checkpoint"):
        finetune.load_init(model, str(tmp_path / "junk.model"))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        finetune.load_init(model, str(tmp_path / "nope.model"))


@pytest.mark.slow
def test_finetune_cli_from_stunet_checkpoint(tiny_dataset, tmp_path, capsys):
    ref, opt = _trained_stunet(num_classes=105)
    _save_v1(tmp_path / "stunet_tiny.model", ref, opt)
    ft = tmp_path / "ft"
    args = ["finetune", "--preset", "tiny", "--data", str(tiny_dataset), "--epochs", "1", "--iters-per-epoch", "1",
            "--batch-size", "1", "--val-cases", "1", "--device", "cpu", "--quiet", "--workers", "0"]
    assert main([*args, "--init", str(tmp_path / "stunet_tiny.model"), "--out", str(ft)]) == 0
    report = json.loads((ft / "init_report.json").read_text())
    assert report["naming"] == "stunet" and report["entry"] == "state_dict" and report["axes"] == "stunet"
    assert len(report["skipped"]) == 10 and all(k.startswith("decoder.heads.") for k in report["missing"])
    assert json.loads((ft / "config.json").read_text())["init_axes"] == "auto"
    # weights of another size: one line on stderr naming the file, and no run is started
    small = RefSTUNet(1, 3, [1] * 6, (16, 32, 64, 128, 256, 256), ISO_POOLS)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "small.model")
    assert main([*args, "--init", str(tmp_path / "small.model"), "--out", str(tmp_path / "ft2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "small.model" in err and "STU-Net-S" in err
    assert not (tmp_path / "ft2" / "config.json").exists()


def test_export_never_replaces_a_file_unless_asked(tmp_path, capsys):
    ckpt = _pretraining_checkpoint(tmp_path / "pre.pt")
    out = tmp_path / "enc.pth"
    out.write_bytes(b"someone else's weights")
    args = ["export", "--ckpt", str(ckpt), "--out", str(out), "--naming", "stunet", "--num-classes", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"someone else's weights"
    assert main([*args, "--overwrite"]) == 0
    assert "network_weights" in torch.load(out, weights_only=True)
