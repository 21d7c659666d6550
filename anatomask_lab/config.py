"""Frozen configuration dataclasses and presets for pretraining.

A papermill parameters cell or the CLI holds flat literals; :func:`pretrain_config` turns them into one frozen
:class:`PretrainConfig`, so notebook, CLI and Python API build the same object. Defaults are the reference recipe
(``shared/reference/method-notes.md``); presets differ only where the reference differs per model size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ABLATIONS",
    "METHODS",
    "PRESETS",
    "MaskingConfig",
    "ModelConfig",
    "PretrainConfig",
    "config_from_dict",
    "config_to_dict",
    "pretrain_config",
]

METHODS = ("anatomask", "spark")


@dataclass(frozen=True)
class MaskingConfig:
    """How the student's mask is drawn.

    Attributes:
        gamma: masking ratio (paper: 0.6).
        r0, rT: masking dynamics r_t = r0 + t/T (rT - r0); easy-to-hard is (0, 0.5), hard-to-easy (0.5, 0).
        order: "high" (AnatoMask) or "low" (low-significance ablation).
        per_iteration: advance r_t every iteration instead of every epoch.
        normalize_ranking: rank patches by the loss against per-patch normalised targets (consistent with the
            student's loss); False ranks by the loss against raw intensities, as the authors' code does.
    """

    gamma: float = 0.6
    r0: float = 0.0
    rT: float = 0.5
    order: str = "high"
    per_iteration: bool = False
    normalize_ranking: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """The MIM network: STU-Net encoder size, sparse backend and decoder."""

    size: str = "B"
    in_channels: int = 1
    backend: str = "masked"
    decoder: str = "hierarchical"
    decoder_width: int | None = None
    norm_pooling: str = "sample"
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run.

    Attributes:
        method: "anatomask" (EMA teacher picks the hardest patches) or "spark" (random masking, no teacher).
        teacher: "ema" (self-distillation) or "frozen" (the no-self-distillation ablation: a frozen random copy).
        data_dir: preprocessed dataset folder (``anatomask-lab prepare``).
        out_dir: run folder (config, code version, metrics.jsonl, checkpoints).
        patch_size: training crop in voxels (multiples of 16).
        epochs, iters_per_epoch: iters_per_epoch=None means training cases // batch_size (at least 1).
        lr, weight_decay, warmup_epochs, warmup_lr, grad_clip: AdamW(0.9, 0.999) and its schedule.
        momentum0, momentum1, momentum_warmup: teacher momentum ramp over the first share of training.
        amp: "auto" (bf16 on CUDA where supported, fp32 on CPU), "bf16", "fp16" or "fp32".
        device: "auto", "cpu", "cuda" or "cuda:N".
        workers: DataLoader worker processes.
        ckpt_every: write a checkpoint every N epochs (and at the end).
        log_every: log (and synchronise) every N iterations.
        seed: seeds weights, data order and masks.
        quiet: no progress bars.
    """

    method: str = "anatomask"
    teacher: str = "ema"
    data_dir: str = "data/phantom_prepared"
    out_dir: str = "runs/pretrain"
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    patch_size: tuple[int, int, int] = (112, 112, 128)
    batch_size: int = 4
    epochs: int = 1000
    iters_per_epoch: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 20
    warmup_lr: float = 1e-6
    grad_clip: float = 12.0
    momentum0: float = 0.999
    momentum1: float = 0.9999
    momentum_warmup: float = 0.25
    amp: str = "auto"
    device: str = "auto"
    workers: int = 2
    ckpt_every: int = 10
    log_every: int = 10
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        _check(self.teacher in ("ema", "frozen"), "teacher", self.teacher, "'ema' or 'frozen'")
        _check(0.0 < self.masking.gamma < 1.0, "gamma", self.masking.gamma, "in (0, 1)")
        for name in ("r0", "rT"):
            value = getattr(self.masking, name)
            _check(0.0 <= value <= 1.0, name, value, "in [0, 1]")
        _check(self.masking.order in ("high", "low"), "order", self.masking.order, "'high' or 'low'")
        _check(
            self.model.backend in ("masked", "spconv"), "backend", self.model.backend, "'masked' or 'spconv'"
        )
        _check(
            self.model.decoder in ("hierarchical", "simple"),
            "decoder",
            self.model.decoder,
            "'hierarchical' or 'simple'",
        )
        _check(
            len(self.patch_size) == 3 and all(p > 0 and p % 16 == 0 for p in self.patch_size),
            "patch_size",
            self.patch_size,
            "three positive multiples of 16",
        )
        for name in ("batch_size", "epochs", "ckpt_every", "log_every"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _check(
            self.iters_per_epoch is None or self.iters_per_epoch >= 1,
            "iters_per_epoch",
            self.iters_per_epoch,
            "None or >= 1",
        )
        _check(self.amp in ("auto", "bf16", "fp16", "fp32"), "amp", self.amp, "auto, bf16, fp16 or fp32")
        _check(
            self.lr > 0 and self.weight_decay >= 0 and self.grad_clip > 0,
            "lr/weight_decay/grad_clip",
            (self.lr, self.weight_decay, self.grad_clip),
            "lr > 0, weight_decay >= 0, grad_clip > 0",
        )
        _check(
            0.0 <= self.momentum0 <= 1.0 and 0.0 <= self.momentum1 <= 1.0,
            "momentum0/momentum1",
            (self.momentum0, self.momentum1),
            "in [0, 1]",
        )


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


# Per-size presets: only what differs from the defaults. "tiny" is the 2-core CPU teaching scale.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"size": "tiny"},
        "patch_size": (64, 64, 64),
        "batch_size": 2,
        "epochs": 4,
        "warmup_epochs": 1,
        "lr": 1e-3,
        "workers": 0,
        "ckpt_every": 1,
        "log_every": 5,
    },
    "S": {"model": {"size": "S"}},
    "B": {"model": {"size": "B"}},
    "L": {"model": {"size": "L", "grad_checkpointing": True}},
    "H": {
        "model": {"size": "H", "grad_checkpointing": True},
        "lr": 2e-5,
        "weight_decay": 3e-5,
        "warmup_epochs": 10,
    },
}

# The paper's Table 1-3 ablations as overrides of the AnatoMask default.
ABLATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "random_masking": {"method": "spark"},
    "no_self_distillation": {"teacher": "frozen"},
    "low_significance": {"masking": {"order": "low"}},
    "hard_to_easy": {"masking": {"r0": 0.5, "rT": 0.0}},
    "gamma_0.8": {"masking": {"gamma": 0.8}},
    "gamma_0.9": {"masking": {"gamma": 0.9}},
    "simple_decoder": {"model": {"decoder": "simple"}},
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def pretrain_config(preset: str = "B", ablation: str = "none", **overrides: Any) -> PretrainConfig:
    """Build a :class:`PretrainConfig` from a preset, an ablation and flat overrides.

    Flat keys of the nested configs are accepted (``gamma=0.8``, ``backend="spconv"``, ``size="S"``); ``None``
    values are ignored, so a CLI or a papermill cell can pass every parameter through.

    Example:
        >>> cfg = pretrain_config("tiny", method="spark", epochs=2, data_dir="data/p")
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {ablation!r}")
    masking_keys = {f.name for f in fields(MaskingConfig)}
    model_keys = {f.name for f in fields(ModelConfig)}
    top_keys = {f.name for f in fields(PretrainConfig)}
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in masking_keys:
            nested = _merge(nested, {"masking": {key: value}})
        elif key in model_keys:
            nested = _merge(nested, {"model": {key: value}})
        elif key in top_keys:
            nested = _merge(nested, {key: value})
        else:
            raise ValueError(f"unknown pretraining parameter {key!r}")
    merged = _merge(_merge(PRESETS[preset], ABLATIONS[ablation]), nested)
    return config_from_dict(merged)


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict[str, Any]) -> PretrainConfig:
    """Inverse of :func:`config_to_dict`; missing keys take the defaults."""
    d = dict(d)
    masking = MaskingConfig(**d.pop("masking", {}))
    model = ModelConfig(**d.pop("model", {}))
    if "patch_size" in d:
        d["patch_size"] = tuple(int(p) for p in d["patch_size"])
    unknown = set(d) - {f.name for f in fields(PretrainConfig)}
    if unknown:
        raise ValueError(f"unknown pretraining parameters {sorted(unknown)}")
    return replace(PretrainConfig(masking=masking, model=model), **d)
