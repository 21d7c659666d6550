"""Configurations: one to/from-dict pair for both configs, CLI flags generated from every field, --print-config,
the finetuning step, and pretraining with an anisotropic mask patch taken from the model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anatomask_lab import analysis, finetune
from anatomask_lab.cli import build_parser, main
from anatomask_lab.config import (
    FinetuneConfig,
    PretrainConfig,
    config_from_dict,
    config_to_dict,
    finetune_config,
    flat_fields,
    pretrain_config,
)
from anatomask_lab.config_args import config_to_args, overrides_from_args
from anatomask_lab.masking import mask_counts

ANISO = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))  # mask patch 16 x 16 x 8

PRETRAIN_CASES = [
    pretrain_config("tiny"),
    pretrain_config("H", "hard_to_easy", lr=3e-5, decoder_width=64, per_iteration=True, normalize_ranking=False,
                    iters_per_epoch=7, quiet=True, strides=ANISO, patch_size=(32, 32, 16)),
    pretrain_config("B", "low_significance", momentum0=0.99, momentum1=0.995, grad_clip=3.0, norm_pooling="batch",
                    grad_checkpointing=True),
]
FINETUNE_CASES = [
    finetune_config("tiny"),
    finetune_config("L", val_cases=3, rotate_scale_p=0.2, flips=False, deep_supervision=False, init="runs/x"),
]


@pytest.mark.parametrize("cfg", PRETRAIN_CASES + FINETUNE_CASES, ids=lambda c: type(c).__name__)
def test_dict_round_trip(cfg):
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(d, type(cfg)) == cfg


@pytest.mark.parametrize("cfg", PRETRAIN_CASES + FINETUNE_CASES, ids=lambda c: type(c).__name__)
def test_cli_flags_rebuild_every_field(cfg):
    command, cls = ("pretrain", PretrainConfig) if isinstance(cfg, PretrainConfig) else ("finetune", FinetuneConfig)
    build = pretrain_config if command == "pretrain" else finetune_config
    for preset in ("tiny", "B"):  # whatever the preset, the flags win
        args = build_parser().parse_args([command, "--preset", preset, *config_to_args(cfg)])
        assert build(preset, **overrides_from_args(args, cls)) == cfg


@pytest.mark.parametrize("command,cls", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_every_field_has_a_flag_with_help_and_default(command, cls, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for name, (f, _, _) in flat_fields(cls).items():
        flag = "--" + (f.metadata.get("flag") or name).replace("_", "-")
        assert flag in text, f"{name} has no flag"
        assert f.metadata["help"], f"{name} has no help text"
    assert text.count("(default:") >= len(flat_fields(cls))
    assert "default: 0.0001 (preset B); tiny: 0.001, H: 2e-05" in " ".join(text.split()) or command == "finetune"


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_print_config_creates_nothing(command, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([command, "--preset", "tiny", "--out", str(out), "--lr", "0.5", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"] == 0.5 and printed["out_dir"] == str(out)
    assert not out.exists()


def test_non_finite_hyperparameters_are_refused(capsys):
    for bad in ({"lr": math.inf}, {"weight_decay": math.nan}, {"gamma": math.nan}):
        with pytest.raises(ValueError, match="must be"):
            pretrain_config("tiny", **bad)
    assert main(["finetune", "--preset", "tiny", "--lr", "inf", "--print-config"]) == 2
    assert "lr must be a finite number" in capsys.readouterr().err


def test_finetune_train_step_is_one_clipped_adamw_step():
    torch.manual_seed(0)
    cfg = finetune_config("tiny", grad_clip=0.5)
    model = finetune.build_segmenter("tiny", 1, 3)
    ref = finetune.build_segmenter("tiny", 1, 3)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(1, 1, 64, 64, 64), torch.randint(0, 3, (1, 64, 64, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = finetune.train_step(model, opt, scaler, x, y, cfg)
    from anatomask_lab.losses import deep_supervision_loss

    ref_loss = deep_supervision_loss(list(ref(x)), y)
    ref_loss.backward()
    assert torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5) > 0.5
    opt_ref.step()
    torch.testing.assert_close(loss, ref_loss.detach())
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_trace_runs_the_real_pretraining_step(monkeypatch):
    from anatomask_lab.ema import make_teacher
    from anatomask_lab.models import build_mim

    calls = []
    real = analysis.train_step
    monkeypatch.setattr(analysis, "train_step", lambda *a, **k: calls.append(k["cfg"]) or real(*a, **k))
    torch.manual_seed(0)
    student = build_mim("tiny")
    teacher = make_teacher(student)
    batches = iter([{"image": torch.randn(2, 1, 32, 32, 32), "label": torch.ones(2, 32, 32, 32, dtype=torch.long)}] * 2)
    trace = analysis.trace_self_distillation(student, teacher, batches, steps=2, gamma=0.6)
    assert len(calls) == 2 and calls[0].grad_clip == PretrainConfig().grad_clip
    assert trace.n_top == [mask_counts(8, 0.6, r)[1] for r in trace.r_t]


@pytest.mark.usefixtures("one_thread")
def test_pretraining_with_anisotropic_strides(tiny_dataset, tmp_path):
    from anatomask_lab.pretrain import run
    from anatomask_lab.runs import read_metrics

    cfg = pretrain_config("tiny", data_dir=str(tiny_dataset), out_dir=str(tmp_path / "r"), strides=ANISO,
                          patch_size=(32, 32, 16), epochs=1, iters_per_epoch=2, log_every=1, device="cpu", quiet=True)
    steps = read_metrics(run(cfg), "step")
    n = (32 // 16) * (32 // 16) * (16 // 8)
    assert [s["n_masked"] for s in steps] == [mask_counts(n, 0.6)[0]] * 2
    assert all(math.isfinite(s["loss"]) for s in steps)
    with pytest.raises(ValueError, match="multiples of the mask patch"):
        pretrain_config("tiny", strides=ANISO, patch_size=(32, 32, 12))
