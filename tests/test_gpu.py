"""CUDA-only checks (``pytest -m gpu``): real-scale AnatoMask iterations and mixed precision."""

from __future__ import annotations

import math

import pytest
import torch

from anatomask_lab.config import pretrain_config
from anatomask_lab.pretrain import build_models, train_step
from anatomask_lab.runtime import autocast_dtype

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", ["bf16", "fp32"])
def test_stunet_b_anatomask_iterations_without_nan(amp):
    device = torch.device("cuda")
    cfg = pretrain_config("B", patch_size=(112, 112, 128), batch_size=2, amp=amp, device="cuda")
    student, teacher = build_models(cfg, device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 1, 112, 112, 128, device=device, generator=g)
    losses = []
    for step in range(4):
        res = train_step(student, student, teacher, opt, scaler, x, cfg=cfg, r_t=0.25 * step / 3, m=0.999,
                         generator=g, amp_dtype=autocast_dtype(amp, device))
        losses.append(float(res.loss))
        assert int(res.student_mask[0].sum()) == 392 - round(392 * 0.4)
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in teacher.parameters())
