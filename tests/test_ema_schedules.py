"""EMA update and schedules: pinned numbers."""

import math

import pytest
import torch
from torch import nn

from anatomask_lab.ema import make_teacher, momentum_at, update_momentum
from anatomask_lab.schedules import cosine_lr, warmup_cosine_lr


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.Linear(3, 2))


def test_update_momentum_parameters_and_buffers():
    student = _net()
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(2.0)
        student[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_momentum(student, teacher, 0.9)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * before[k] + 0.1 * s, atol=1e-6), k
        else:
            assert torch.equal(v, s), k
    update_momentum(student, teacher, 0.0)
    for k, v in teacher.state_dict().items():
        assert torch.allclose(v.float(), student.state_dict()[k].float())
    with pytest.raises(ValueError, match="momentum"):
        update_momentum(student, teacher, 1.5)


def test_momentum_schedule_pinned():
    assert momentum_at(0.0) == pytest.approx(0.999)
    assert momentum_at(0.125) == pytest.approx(0.99945)
    assert momentum_at(0.25) == pytest.approx(0.9999)
    assert momentum_at(0.9) == pytest.approx(0.9999)
    assert momentum_at(0.3, warmup=0.0) == pytest.approx(0.9999)


def test_lr_schedules_pinned():
    assert cosine_lr(0, 100, 1e-4) == pytest.approx(1e-4)
    assert cosine_lr(50, 100, 1e-4) == pytest.approx(5e-5)
    assert cosine_lr(100, 100, 1e-4) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(25, 100, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # 20 warm-up steps from 1e-6 to 1e-4, then cosine over the remaining 80
    assert warmup_cosine_lr(0, 100, 20, 1e-4) == pytest.approx(1e-6)
    assert warmup_cosine_lr(10, 100, 20, 1e-4) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert warmup_cosine_lr(20, 100, 20, 1e-4) == pytest.approx(1e-4)
    assert warmup_cosine_lr(60, 100, 20, 1e-4) == pytest.approx(5e-5)
    assert warmup_cosine_lr(100, 100, 20, 1e-4) == pytest.approx(0.0, abs=1e-12)
