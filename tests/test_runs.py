"""Run-folder contracts (runs.py), the atomic writer, and the shared optimiser step (runtime.py)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from anatomask_lab.atomic import atomic_dir, atomic_write_json
from anatomask_lab.config import config_to_dict, pretrain_config
from anatomask_lab.runs import (
    checkpoint_path,
    is_finished,
    load_student_encoder,
    save_checkpoint,
)
from anatomask_lab.runtime import optimizer_step, resolve_device


def _pretrain_ckpt(path, epoch, epochs):
    cfg = config_to_dict(pretrain_config("tiny", epochs=epochs))
    student = {"encoder.stages.0.w": torch.ones(2), "decoder.x": torch.zeros(1)}
    save_checkpoint(path, {"student": student, "epoch": epoch, "config": cfg})


def test_checkpoint_path_of_folder_and_file(tmp_path):
    assert checkpoint_path(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    assert checkpoint_path(tmp_path, "best") == tmp_path / "checkpoints" / "best.pt"
    file = tmp_path / "x.pt"
    file.write_bytes(b"")
    assert checkpoint_path(file) == file and checkpoint_path(file, "best") == file


def test_is_finished_follows_the_last_checkpoint(tmp_path):
    assert not is_finished(tmp_path)  # no checkpoint yet
    _pretrain_ckpt(checkpoint_path(tmp_path), epoch=2, epochs=3)
    assert not is_finished(tmp_path)
    _pretrain_ckpt(checkpoint_path(tmp_path), epoch=3, epochs=3)
    assert is_finished(tmp_path)


def test_load_student_encoder_from_run_export_and_foreign(tmp_path):
    _pretrain_ckpt(checkpoint_path(tmp_path / "run"), epoch=1, epochs=1)
    enc = load_student_encoder(tmp_path / "run")
    assert list(enc) == ["stages.0.w"] and torch.equal(enc["stages.0.w"], torch.ones(2))
    save_checkpoint(tmp_path / "export.pt", {"encoder": {"stages.0.w": torch.full((2,), 3.0)}})
    assert torch.equal(load_student_encoder(tmp_path / "export.pt")["stages.0.w"], torch.full((2,), 3.0))
    save_checkpoint(tmp_path / "other.pt", {"model": {}})
    with pytest.raises(ValueError, match="other.pt: neither a pretraining checkpoint nor an exported encoder"):
        load_student_encoder(tmp_path / "other.pt")


def test_atomic_writes_follow_the_umask_and_leave_no_temporaries(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
        folder = atomic_dir(tmp_path / "case", lambda d: (d / "f.txt").write_text("1"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})  # not serialisable: the old file stays
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"x":1}'
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_optimizer_step_clips_and_matches_a_manual_step():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4) * 100
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer_step(a(x).pow(2).mean(), opt_a, scaler, a.parameters(), grad_clip=1.0)
    b(x).pow(2).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    assert norm > 1.0  # the clip was active
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_resolve_device_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'foo' is not a device name"):
        resolve_device("foo")
