"""Pretraining engine: the AnatoMask and SparK steps, the loop on phantom data, resume after SIGKILL, DDP, export."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anatomask_lab.config import PRESETS, config_to_dict, pretrain_config
from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.ema import make_teacher
from anatomask_lab.export import export_encoder
from anatomask_lab.masking import mask_counts
from anatomask_lab.models import build_stunet, load_encoder_weights
from anatomask_lab.pretrain import build_models, mim_step, run, train_step
from anatomask_lab.runs import load_checkpoint, read_metrics

PATCH = (32, 32, 32)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(data, out, **kw):
    base = dict(data_dir=str(data), out_dir=str(out), patch_size=PATCH, epochs=3, iters_per_epoch=3, batch_size=2,
                quiet=True, log_every=1, warmup_epochs=1, device="cpu")
    base.update(kw)
    return pretrain_config("tiny", **base)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, *PATCH, generator=g)
    x[:, :, 8:24, 8:24, 8:24] += 3 * torch.randn(2, 1, 16, 16, 16, generator=g)  # a textured "organ"
    return x


def _hook_counter(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_anatomask_step_masks_counts_and_top_patches():
    cfg = _cfg("unused", "unused")
    student, teacher = build_models(cfg, torch.device("cpu"))
    calls = _hook_counter(teacher)
    g = torch.Generator().manual_seed(0)
    x = _batch()
    n = 8
    for r_t in (0.0, 0.5, 1.0):
        res = mim_step(student, teacher, x, gamma=0.6, r_t=r_t, generator=g)
        n_masked, n_top = mask_counts(n, 0.6, r_t)
        assert res.student_mask.flatten(1).sum(1).tolist() == [n_masked] * 2
        assert res.teacher_mask.flatten(1).sum(1).tolist() == [n_masked] * 2
        # unscored (teacher-visible) patches are -inf; the n_top hardest scored ones are in the student's mask
        scored = res.teacher_patch_loss.isfinite()
        assert torch.equal(scored, res.teacher_mask)
        k = min(n_top, n_masked)
        top = res.teacher_patch_loss.flatten(1).topk(k, dim=1).indices
        assert torch.gather(res.student_mask.flatten(1), 1, top).all()
        assert torch.isfinite(res.loss) and res.loss.requires_grad
    assert len(calls) == 3  # one teacher forward per step


def test_spark_has_no_teacher_pass():
    cfg = _cfg("unused", "unused", method="spark")
    student, teacher = build_models(cfg, torch.device("cpu"))
    assert teacher is None
    res = mim_step(student, None, _batch(), gamma=0.6, r_t=0.5, generator=torch.Generator().manual_seed(0))
    assert res.teacher_loss is None and res.student_mask.flatten(1).sum(1).tolist() == [5, 5]


def test_train_step_ema_moves_teacher_towards_student_at_momentum():
    cfg = _cfg("unused", "unused")
    student, teacher = build_models(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = 0.9
    train_step(student, student, teacher, opt, scaler, _batch(), cfg=cfg, r_t=0.3, m=m,
               generator=torch.Generator().manual_seed(0))
    after_s, after_t = student.state_dict(), teacher.state_dict()
    moved = 0
    for k, v in after_t.items():
        if v.is_floating_point():
            assert torch.allclose(v, m * before[k] + (1 - m) * after_s[k], atol=1e-6), k
            moved += int(not torch.equal(v, before[k]))
    assert moved > 0
    assert not torch.equal(after_t["encoder.stages.0.0.conv1.weight"], after_s["encoder.stages.0.0.conv1.weight"])


def test_loss_falls_on_a_fixed_batch():
    cfg = _cfg("unused", "unused", lr=2e-3)
    torch.manual_seed(0)
    student, teacher = build_models(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = _batch()
    losses = []
    for i in range(12):
        res = train_step(student, student, teacher, opt, scaler, x, cfg=cfg, r_t=0.3, m=0.99,
                         generator=torch.Generator().manual_seed(i % 2))
        losses.append(float(res.loss.detach()))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_frozen_teacher_differs_and_stays_fixed():
    cfg = _cfg("unused", "unused", teacher="frozen")
    student, teacher = build_models(cfg, torch.device("cpu"))
    k = "encoder.stages.0.0.conv1.weight"
    assert not torch.equal(student.state_dict()[k], teacher.state_dict()[k])
    snapshot = teacher.state_dict()[k].clone()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    train_step(student, student, teacher, opt, torch.amp.GradScaler("cpu", enabled=False), _batch(), cfg=cfg,
               r_t=0.5, m=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(teacher.state_dict()[k], snapshot)


def test_teacher_and_student_with_different_masks_in_one_process():
    cfg = _cfg("unused", "unused")
    student, _ = build_models(cfg, torch.device("cpu"))
    teacher = make_teacher(student)
    x = _batch()
    m1 = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    m1[:, 0] = True
    m2 = ~m1
    student.eval()
    a = student(x, m1)
    b = teacher(x, m2)
    a2 = student(x, m1)
    assert torch.allclose(a, a2) and not torch.allclose(a, b)


@pytest.mark.parametrize("method", ["anatomask", "spark"])
def test_run_writes_run_folder(tiny_dataset, tmp_path, method):
    out = run(_cfg(tiny_dataset, tmp_path / method, method=method, epochs=2, iters_per_epoch=2))
    assert json.loads((out / "config.json").read_text())["method"] == method
    assert "torch" in json.loads((out / "version.json").read_text())
    steps, epochs = read_metrics(out, "step"), read_metrics(out, "epoch")
    assert len(steps) == 4 and len(epochs) == 2
    for rec in steps:
        assert rec["n_masked"] == mask_counts(8, 0.6)[0]
        assert rec["n_top"] == (mask_counts(8, 0.6, rec["r_t"])[1] if method == "anatomask" else 0)
        assert {"loss", "lr", "r_t", "samples_per_s", "time"} <= set(rec)
        assert (rec["teacher_loss"] is None) == (method == "spark")
    assert [r["r_t"] for r in epochs] == [0.0, 0.25]  # per-epoch easy-to-hard schedule over 2 epochs
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["step"] == 4
    assert (state["teacher"] is None) == (method == "spark")


def _final_weights(out: Path) -> dict:
    return load_checkpoint(out / "checkpoints" / "last.pt")["student"]


def _pretrain_cmd(data, out, *extra):
    return [sys.executable, "-m", "anatomask_lab.cli", "pretrain", "--preset", "tiny", "--data", str(data),
            "--out", str(out), "--patch-size", *map(str, PATCH), "--epochs", "4", "--iters-per-epoch", "3",
            "--batch-size", "2", "--device", "cpu", "--quiet", *extra]


@pytest.mark.slow
def test_sigkill_and_resume_reach_the_same_weights(tiny_dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_pretrain_cmd(tiny_dataset, full), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_pretrain_cmd(tiny_dataset, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["epoch"]
    assert 1 <= killed_at < 4
    subprocess.run(_pretrain_cmd(tiny_dataset, killed, "--resume"), check=True, env=env, capture_output=True)
    a, b = _final_weights(full), _final_weights(killed)
    assert load_checkpoint(ckpt)["epoch"] == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_dataset, data)
    out = tmp_path / "run"
    run(_cfg(data, out, epochs=1, iters_per_epoch=2))
    ckpt = out / "checkpoints" / "last.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # corrupt every training image after preparation, then continue for more epochs
    for case in DatasetInfo.read(data).split("train"):
        path = data / "cases" / case / "image.npy"
        arr = np.load(path)
        arr[:] = np.nan
        np.save(path, arr)
    state = load_checkpoint(ckpt)
    state["config"]["epochs"] = 3
    torch.save(state, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        run(resume=True, out_dir=str(out))
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_ddp_two_gloo_processes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "anatomask_lab.cli", "pretrain", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out),
           "--patch-size", *map(str, PATCH), "--epochs", "2", "--iters-per-epoch", "2", "--batch-size", "1",
           "--device", "cpu", "--quiet", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert len(state["mask_rng"]) == 2 and not torch.equal(state["mask_rng"][0], state["mask_rng"][1])
    steps = read_metrics(out, "step")
    assert len(steps) == 4  # rank 0 only: 2 epochs x 2 iterations
    assert state["step"] == 4


def test_export_loads_into_build_stunet(tiny_dataset, tmp_path):
    out = run(_cfg(tiny_dataset, tmp_path / "run", epochs=1, iters_per_epoch=1))
    report = export_encoder(out, tmp_path / "enc.pt")
    assert report["unexpected"] == [] and len(report["loaded"]) > 0
    assert all(k.startswith("stages.5.") for k in report["missing"])  # only the 6th stage is not pretrained
    net = build_stunet("tiny", num_classes=6)
    enc = load_checkpoint(tmp_path / "enc.pt")["encoder"]
    rep = load_encoder_weights(net, enc)
    student = load_checkpoint(out / "checkpoints" / "last.pt")["student"]
    assert torch.equal(net.encoder.state_dict()["stages.0.0.conv1.weight"], student["encoder.stages.0.0.conv1.weight"])
    assert len(rep.loaded) == len(report["loaded"])
    # STU-Net naming: every STU-Net key is present so that STU-Net's nnU-Net loader accepts it
    stu = export_encoder(out, tmp_path / "enc_stunet.pth", naming="stunet", num_classes=6)
    weights = load_checkpoint(tmp_path / "enc_stunet.pth")["network_weights"]
    assert stu["file"].endswith(".pth")
    assert any(k.startswith("conv_blocks_context.0.0.conv1") for k in weights)
    assert {k.split(".")[0] for k in weights} == {"conv_blocks_context", "upsample_layers",
                                                  "conv_blocks_localization", "seg_outputs"}
    # kernels in nnU-Net's file order (z, y, x) by default: the student's with their spatial axes reversed
    assert torch.equal(weights["conv_blocks_context.0.0.conv1.weight"],
                       student["encoder.stages.0.0.conv1.weight"].permute(0, 1, 4, 3, 2))
    assert stu["axes"] == "stunet" and load_checkpoint(tmp_path / "enc_stunet.pth")["axes"] == "stunet"


def test_config_presets_and_bad_values():
    h = pretrain_config("H")
    assert (h.lr, h.weight_decay, h.warmup_epochs, h.model.grad_checkpointing) == (2e-5, 3e-5, 10, True)
    b = pretrain_config("B")
    assert (b.lr, b.weight_decay, b.warmup_epochs, b.batch_size, b.patch_size, b.grad_clip, b.epochs) == (
        1e-4, 1e-5, 20, 4, (112, 112, 128), 12.0, 1000)
    assert pretrain_config("B", "hard_to_easy").masking.r0 == 0.5
    assert pretrain_config("B", "low_significance").masking.order == "low"
    assert pretrain_config("B", "no_self_distillation").teacher == "frozen"
    assert pretrain_config("B", gamma=0.8).masking.gamma == 0.8
    d = config_to_dict(pretrain_config("tiny", backend="spconv"))
    assert d["model"]["backend"] == "spconv" and set(PRESETS) == {"tiny", "S", "B", "L", "H"}
    for bad, match in [({"gamma": 1.2}, "gamma"), ({"patch_size": (100, 112, 128)}, "patch_size"),
                       ({"method": "mae"}, "method"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(ValueError, match=match):
            pretrain_config("B", **bad)
