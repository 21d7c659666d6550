"""Finetuning, sliding-window inference, losses, prediction in the original geometry, and their errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from anatomask_lab import finetune, pretrain
from anatomask_lab.config import config_to_dict
from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.evaluate import evaluate_folders
from anatomask_lab.export import export_encoder
from anatomask_lab.inference import gaussian_importance, sliding_window_predict, window_starts
from anatomask_lab.losses import deep_supervision_loss, deep_supervision_weights, dice_ce_loss, soft_dice_loss
from anatomask_lab.predict import predict_split, write_reference_labels
from anatomask_lab.runs import load_checkpoint, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gaussian_importance_and_windows():
    g = gaussian_importance((16, 17, 18))
    assert g.shape == (16, 17, 18) and float(g.max()) == pytest.approx(1.0) and float(g.min()) > 0
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(2))
    for size, win in [(35, 16), (64, 64), (100, 32), (17, 16)]:
        starts = window_starts(size, win, 0.5)
        assert starts[0] == 0 and starts[-1] + win == size
        assert all(b - a <= win // 2 for a, b in zip(starts, starts[1:], strict=False))
    assert window_starts(10, 16, 0.5) == [0]


@pytest.mark.parametrize("mirror", [False, True])
def test_sliding_window_equals_whole_volume_for_a_pointwise_model(mirror):
    # a 1x1x1 convolution is translation- and flip-equivariant, so stitching must reproduce the direct result
    torch.manual_seed(0)
    model = nn.Conv3d(2, 3, 1).eval()
    image = torch.randn(2, 33, 34, 35)
    prob = sliding_window_predict(model, image, (16, 16, 16), 3, overlap=0.5, mirror=mirror, batch_size=3)
    with torch.no_grad():
        direct = torch.softmax(model(image[None]), 1)[0]
    assert prob.shape == (3, 33, 34, 35)
    assert torch.allclose(prob, direct, atol=1e-5)
    small = torch.randn(2, 10, 12, 9)  # smaller than the window: padded, then cropped back
    prob = sliding_window_predict(model, small, (16, 16, 16), 3)
    with torch.no_grad():
        assert torch.allclose(prob, torch.softmax(model(small[None]), 1)[0], atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(model, small, (16, 16, 16), 3, overlap=1.0)


def test_losses_pinned():
    assert deep_supervision_weights(5) == pytest.approx([w / 1.875 for w in (1, 0.5, 0.25, 0.125, 0)])
    assert deep_supervision_weights(1) == [1.0]
    target = torch.randint(0, 3, (2, 8, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50
    assert float(soft_dice_loss(perfect, target)) == pytest.approx(0.0, abs=1e-4)
    assert float(dice_ce_loss(perfect, target)) == pytest.approx(0.0, abs=1e-3)
    uniform = torch.zeros(2, 3, 8, 8, 8)
    assert float(torch.nn.functional.cross_entropy(uniform, target)) == pytest.approx(np.log(3), rel=1e-5)
    outs = [perfect, perfect[:, :, ::2, ::2, ::2]]
    assert float(deep_supervision_loss(outs, target)) == pytest.approx(float(dice_ce_loss(perfect, target)), abs=1e-3)


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    cfg = pretrain.pretrain_config("tiny", data_dir=str(tiny_dataset), out_dir=str(out), patch_size=(32, 32, 32),
                                   epochs=1, iters_per_epoch=1, quiet=True, device="cpu")
    return pretrain.run(cfg)


def _ft(data, out, init="scratch", **kw):
    base = dict(data_dir=str(data), out_dir=str(out), init=str(init), epochs=2, iters_per_epoch=2, val_every=1,
                quiet=True, device="cpu")
    return finetune.finetune_config("tiny", **{**base, **kw})


@pytest.mark.slow
def test_finetune_from_pretrained_predict_and_evaluate(tiny_dataset, pretrained, tmp_path):
    out = finetune.run(_ft(tiny_dataset, tmp_path / "ft", init=pretrained))
    report = json.loads((out / "init_report.json").read_text())
    student = load_checkpoint(pretrained / "checkpoints" / "last.pt")["student"]
    assert len(report["loaded"]) == len([k for k in student if k.startswith("encoder.")])
    assert report["unexpected"] == [] and all(k.startswith("stages.5.") for k in report["missing"])
    epochs = read_metrics(out, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1] and all(0.0 <= r["val_dice"] <= 1.0 for r in epochs)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["best_dice"] == max(r["val_dice"] for r in epochs)

    # predictions come back in each source image's geometry and can be evaluated against the reference labels
    preds = predict_split(out, tiny_dataset, tmp_path / "pred", device="cpu", quiet=True)
    refs = write_reference_labels(tiny_dataset, tmp_path / "gt")
    info = DatasetInfo.read(tiny_dataset)
    assert [p.name for p in preds] == [f"{c}.nii.gz" for c in info.split("test")] == [r.name for r in refs]
    for p, r in zip(preds, refs, strict=True):
        pi, ri = nib.load(p), nib.load(r)
        assert pi.shape == ri.shape and np.allclose(pi.affine, ri.affine)
        assert set(np.unique(np.asarray(pi.dataobj))) <= set(range(6))
    rows = evaluate_folders(tmp_path / "pred", tmp_path / "gt", classes=info.class_table(),
                            tolerances=3.0, progress=False)
    assert {r["class"] for r in rows} <= set(info.class_names[1:])

    # resume continues to a longer schedule
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    state["config"]["epochs"] = 3
    torch.save(state, out / "checkpoints" / "last.pt")
    finetune.run(resume=True, out_dir=str(out))
    assert [r["epoch"] for r in read_metrics(out, "epoch")] == [0, 1, 2]


def test_finetune_from_exported_encoder(tiny_dataset, pretrained, tmp_path):
    export_encoder(pretrained, tmp_path / "enc.pt")
    model = finetune.build_segmenter("tiny", 1, 6)
    report = finetune.load_init(model, str(tmp_path / "enc.pt"))
    enc = load_checkpoint(tmp_path / "enc.pt")["encoder"]
    assert len(report["loaded"]) == len(enc)
    assert torch.equal(model.encoder.state_dict()["stages.1.0.conv1.weight"], enc["stages.1.0.conv1.weight"])
    # two input channels (CT + PET): the first convolution is adapted, the rest loads as is
    model2 = finetune.build_segmenter("tiny", 2, 6)
    report2 = finetune.load_init(model2, str(tmp_path / "enc.pt"))
    assert "stages.0.0.conv1.weight" in report2["adapted"]
    with pytest.raises(ValueError, match="neither a pretraining checkpoint"):
        torch.save({"something": torch.zeros(1)}, tmp_path / "junk.pt")
        finetune.load_init(model, str(tmp_path / "junk.pt"))


def test_checkpoint_of_another_architecture_is_refused(tiny_dataset, tmp_path):
    out = tmp_path / "ft"
    (out / "checkpoints").mkdir(parents=True)
    other = finetune.build_segmenter("S", 1, 6)
    cfg = json.loads(json.dumps(config_to_dict(_ft(tiny_dataset, out))))
    torch.save({"model": other.state_dict(), "config": cfg, "in_channels": 1, "num_classes": 6},
               out / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match="does not match STU-Net-tiny"):
        finetune.load_segmenter(out, which="last")


def test_bad_finetune_config():
    with pytest.raises(ValueError, match="patch_size"):
        finetune.finetune_config("tiny", patch_size=(48, 64, 64))
    with pytest.raises(ValueError, match="fg_oversample"):
        finetune.finetune_config("tiny", fg_oversample=1.5)
    with pytest.raises(ValueError, match="unknown finetuning parameter"):
        finetune.finetune_config("tiny", learning_rate=1)


def test_rotate_scale_augmentation():
    from anatomask_lab.augment import random_rotate_scale, rotation_matrices

    r = rotation_matrices(torch.tensor([[0.3, -0.2, 1.1]]))[0]
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-6) and float(torch.det(r)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(6, 1, 16, 16, 16, generator=g)
    label = (image[:, 0] > 0).long()
    same_i, same_l = random_rotate_scale(image, label, p=0.0, generator=g)
    assert torch.equal(same_i, image) and torch.equal(same_l, label)
    out_i, out_l = random_rotate_scale(image, label, p=1.0, generator=g)
    assert out_i.shape == image.shape and out_l.dtype == label.dtype
    assert not torch.equal(out_i, image)
    assert set(out_l.unique().tolist()) <= {0, 1}
    # labels follow the image: where the rotated image is clearly positive, the label is 1
    inside = out_i[:, 0] > 1.0
    assert (out_l[inside] == 1).float().mean() > 0.9
    with pytest.raises(ValueError, match="p must"):
        random_rotate_scale(image, label, p=2.0)


@pytest.mark.slow
def test_cli_finetune_predict_evaluate(tiny_dataset, pretrained, tmp_path, capsys):
    from anatomask_lab.cli import main

    ft, pred, gt = tmp_path / "ft", tmp_path / "pred", tmp_path / "gt"
    assert main(["finetune", "--preset", "tiny", "--data", str(tiny_dataset), "--init", str(pretrained), "--out",
                 str(ft), "--epochs", "1", "--iters-per-epoch", "1", "--device", "cpu", "--quiet"]) == 0
    assert len(json.loads((ft / "init_report.json").read_text())["loaded"]) > 0
    assert main(["predict", "--model", str(ft), "--data", str(tiny_dataset), "--out", str(pred), "--reference",
                 str(gt), "--device", "cpu", "--quiet"]) == 0
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", str(tiny_dataset / "dataset.json"),
                 "--tolerances", "4", "--quiet"]) == 0
    assert (pred / "evaluation" / "per_case.csv").exists() and (pred / "evaluation" / "summary.md").exists()
    # a missing model folder is a clear error, not a traceback
    assert main(["predict", "--model", str(tmp_path / "nope"), "--data", str(tiny_dataset), "--out", str(pred)]) == 2
    assert "nope" in capsys.readouterr().err
