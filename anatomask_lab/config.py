"""Frozen configuration dataclasses and presets for pretraining and finetuning.

A papermill parameters cell or the CLI holds flat literals; :func:`pretrain_config` / :func:`finetune_config` turn
them into one frozen :class:`PretrainConfig` / :class:`FinetuneConfig`, so notebook, CLI and Python API build the
same object. Defaults are the reference recipe (``docs/method.md``); presets differ only where the reference differs
per model size. Every field carries its help text (``metadata["help"]``), from which the CLI flags are generated
(:mod:`anatomask_lab.config_args`), so each field is reachable from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

__all__ = [
    "ABLATIONS",
    "FINETUNE_PRESETS",
    "LOG_BACKENDS",
    "METHODS",
    "PRESETS",
    "FinetuneConfig",
    "MaskingConfig",
    "ModelConfig",
    "PretrainConfig",
    "config_from_dict",
    "config_to_dict",
    "finetune_config",
    "flat_fields",
    "pretrain_config",
]

METHODS = ("anatomask", "spark")
SIZES = ("tiny", "S", "B", "L", "H")
AMP = ("auto", "bf16", "fp16", "fp32")
LOG_BACKENDS = ("none", "tensorboard", "wandb")
_LOG_HELP = ("mirror metrics.jsonl (which stays the record) to TensorBoard (<out>/tensorboard) or Weights & Biases "
             "(<out>/wandb; needs the wandb package); under torchrun write --log-to (torchrun takes --log for an "
             "abbreviation of its own flags)")


def _f(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, flag: str | None = None,
       **kwargs: Any) -> Any:
    """A dataclass field with its CLI help text, allowed values and (optional) flag name."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag}, **kwargs)


@dataclass(frozen=True)
class MaskingConfig:
    """How the student's mask is drawn."""

    gamma: float = _f(0.6, "masking ratio: share of patches hidden from the student (paper: 0.6)")
    r0: float = _f(0.0, "r_t at the start of training (easy-to-hard: 0 -> 0.5; hard-to-easy: 0.5 -> 0)")
    rT: float = _f(0.5, "r_t at the end of training")
    order: str = _f("high", "mask the hardest patches ('high', AnatoMask) or the easiest ('low' ablation)",
                    choices=("high", "low"))
    per_iteration: bool = _f(False, "advance r_t every iteration instead of every epoch")
    rt_schedule: str = _f("paper", "r_t = r0 + t/T (rT - r0) from t = 0 ('paper', Eq. 3) or the authors' code's "
                          "r0 + (t + 1)/(T - 1) (rT - r0), one epoch ahead ('reference')",
                          choices=("paper", "reference"))
    normalize_ranking: bool = _f(True, "rank patches by the loss against per-patch normalised targets (as the "
                                 "student's loss); --no-normalize-ranking ranks by raw intensities (authors' code)")


@dataclass(frozen=True)
class ModelConfig:
    """The MIM network: STU-Net encoder size, sparse backend and decoder."""

    size: str = _f("B", "STU-Net size", choices=SIZES)
    in_channels: int = _f(1, "input channels (image modalities)")
    backend: str = _f("masked", "sparse execution: 'masked' (dense conv + re-masking, anywhere) or 'spconv' (CUDA)",
                      choices=("masked", "spconv"))
    decoder: str = _f("hierarchical", "MIM decoder: SparK's hierarchical light decoder or the simple ablation",
                      choices=("hierarchical", "simple"))
    decoder_width: int | None = _f(None, "deepest decoder width, a multiple of 16 (auto: the size's default)")
    norm_pooling: str = _f("sample", "masked-norm statistics per 'sample' or pooled over the 'batch' (authors' code)",
                           choices=("sample", "batch"))
    grad_checkpointing: bool = _f(False, "recompute the encoder's blocks in the backward pass (saves memory)")
    init: str = _f("he", "weight initialisation: 'he' (nnU-Net's He init of the encoder, as STU-Net finetuning "
                   "builds it) or 'reference' (PyTorch's default init, as the authors' pretraining leaves it)",
                   choices=("he", "reference"))
    strides: tuple[tuple[int, int, int], ...] | None = _f(
        None, "per-stage encoder strides of the 5 MIM stages, each 1 or 2 per axis (e.g. 1 2 2 2 2 or 1 1,2,2 ...); "
        "the mask patch is their product (auto: 1 2 2 2 2, 16 voxels)")


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run (see ``metadata["help"]`` of each field, or ``anatomask-lab pretrain --help``)."""

    method: str = _f("anatomask", "AnatoMask (EMA teacher picks the hardest patches) or SparK (random masks)",
                     choices=METHODS)
    teacher: str = _f("ema", "'ema' (self-distillation) or 'frozen' (ablation: a frozen random copy)",
                      choices=("ema", "frozen"))
    data_dir: str = _f("data/phantom_prepared", "preprocessed dataset folder (anatomask-lab prepare)", flag="data")
    out_dir: str = _f("runs/pretrain", "run folder (config, code version, metrics.jsonl, checkpoints)", flag="out")
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    patch_size: tuple[int, int, int] = _f((112, 112, 128), "training crop in voxels, multiples of the mask patch")
    batch_size: int = _f(4, "patches per step (per process under DDP)")
    epochs: int = _f(1000, "training epochs")
    iters_per_epoch: int | None = _f(None, "steps per epoch (auto: training cases // (batch size x processes))")
    lr: float = _f(1e-4, "peak AdamW(0.9, 0.999) learning rate")
    weight_decay: float = _f(1e-5, "AdamW weight decay")
    warmup_epochs: int = _f(20, "linear learning-rate warm-up epochs, then cosine decay")
    warmup_lr: float = _f(1e-6, "learning rate at the start of the warm-up")
    grad_clip: float = _f(12.0, "gradient-norm clipping threshold")
    momentum0: float = _f(0.999, "teacher EMA momentum at the start")
    momentum1: float = _f(0.9999, "teacher EMA momentum after the ramp")
    momentum_warmup: float = _f(0.25, "share of training over which the momentum ramps from momentum0 to momentum1")
    amp: str = _f("auto", "precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32", choices=AMP)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    workers: int = _f(2, "DataLoader worker processes")
    ckpt_every: int = _f(10, "write a checkpoint every N epochs (and at the end)")
    log_every: int = _f(10, "log (and synchronise with the device) every N steps")
    seed: int = _f(0, "seeds weights, data order and masks")
    quiet: bool = _f(False, "no progress bars")
    log: str = _f("none", _LOG_HELP, choices=LOG_BACKENDS, flag="log_to")

    def __post_init__(self) -> None:
        _check_common(self)
        _check(0.0 < self.masking.gamma < 1.0, "gamma", self.masking.gamma, "in (0, 1)")
        for name in ("r0", "rT"):
            _check(0.0 <= getattr(self.masking, name) <= 1.0, name, getattr(self.masking, name), "in [0, 1]")
        patch = mask_patch_size(self.model.strides)
        _check(len(self.patch_size) == 3 and all(p > 0 and p % q == 0 for p, q in zip(self.patch_size, patch,
                                                                                      strict=False)),
               "patch_size", self.patch_size, f"three positive multiples of the mask patch {patch}")
        _check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        _check(self.iters_per_epoch is None or self.iters_per_epoch >= 1, "iters_per_epoch", self.iters_per_epoch,
               "auto or >= 1")
        _check(self.weight_decay >= 0 and self.warmup_lr >= 0 and self.warmup_epochs >= 0,
               "weight_decay/warmup_lr/warmup_epochs", (self.weight_decay, self.warmup_lr, self.warmup_epochs),
               ">= 0")
        for name in ("momentum0", "momentum1", "momentum_warmup"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "in [0, 1]")


@dataclass(frozen=True)
class FinetuneConfig:
    """One finetuning run (defaults: the reference recipe; ``preset="tiny"`` is the CPU teaching scale)."""

    data_dir: str = _f("data/phantom_prepared", "preprocessed dataset folder with labels", flag="data")
    out_dir: str = _f("runs/finetune", "run folder (config, metrics.jsonl, init_report.json, checkpoints)",
                      flag="out")
    size: str = _f("B", "STU-Net size", choices=SIZES)
    init: str = _f("scratch", "'scratch', a pretraining run folder / checkpoint, an exported encoder, or STU-Net "
                   "weights (.model/.pth with 'state_dict' or 'network_weights'; docs/weights.md)")
    init_axes: str = _f("auto", "axis order of the --init kernels: auto (as the file records; else STU-Net files "
                        "are nnU-Net's file order z,y,x and are transposed, the kit's own are x,y,z), stunet, kit",
                        choices=("auto", "stunet", "kit"))
    patch_size: tuple[int, int, int] = _f((128, 128, 128), "training crop in voxels, multiples of 32 (the network "
                                          "downsamples by 32; STU-Net's plans use 128^3)")
    labelled_cases: int | None = _f(None, "finetune on N labelled training cases drawn with the seed (the low-label "
                                    "setting; auto: every training case)")
    batch_size: int = _f(2, "patches per step")
    epochs: int = _f(1000, "training epochs")
    iters_per_epoch: int = _f(250, "steps per epoch (nnU-Net: 250)")
    optimizer: str = _f("adamw", "'adamw' (STU-Net's finetuning: AdamW, cosine decay) or 'sgd' (nnU-Net's: SGD with "
                        "Nesterov momentum 0.99, polynomial decay)", choices=("adamw", "sgd"))
    lr: float = _f(1e-4, "peak learning rate (STU-Net's AdamW: 1e-4; nnU-Net's SGD: 1e-2)")
    weight_decay: float = _f(1e-5, "weight decay (nnU-Net's SGD: 3e-5)")
    eps: float = _f(1e-4, "AdamW epsilon")
    grad_clip: float = _f(12.0, "gradient-norm clipping threshold")
    deep_supervision: bool = _f(True, "Dice+CE on every decoder resolution (nnU-Net's weights)")
    fg_oversample: float = _f(0.33, "share of patches centred on foreground (nnU-Net: 0.33)")
    flips: bool = _f(True, "random flips along each axis")
    rotate_scale_p: float = _f(0.0, "probability per sample of a random rotation (up to 30 degrees per axis) and "
                               "scaling (0.7-1.4), as nnU-Net's augmentation (0 = off)")
    val_every: int = _f(10, "validation Dice every N epochs; the best checkpoint is kept")
    val_cases: int | None = _f(None, "validate on at most N cases (auto: all validation cases)")
    overlap: float = _f(0.5, "sliding-window overlap for validation")
    amp: str = _f("auto", "precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32", choices=AMP)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    workers: int = _f(2, "DataLoader worker processes")
    ckpt_every: int = _f(10, "write the last checkpoint every N epochs (and at the end)")
    seed: int = _f(0, "seeds weights, data order and augmentation")
    quiet: bool = _f(False, "no progress bars")
    log: str = _f("none", _LOG_HELP, choices=LOG_BACKENDS, flag="log_to")

    def __post_init__(self) -> None:
        _check_common(self)
        _check(len(self.patch_size) == 3 and all(p >= 64 and p % 32 == 0 for p in self.patch_size), "patch_size",
               self.patch_size, "three multiples of 32 of at least 64 (the network downsamples by 32 and its "
               "instance norms need more than one voxel at the deepest stage)")
        _check(self.iters_per_epoch >= 1 and self.val_every >= 1, "iters_per_epoch/val_every",
               (self.iters_per_epoch, self.val_every), ">= 1")
        for name in ("fg_oversample", "rotate_scale_p"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "in [0, 1]")
        _check(0.0 <= self.overlap < 1.0, "overlap", self.overlap, "in [0, 1)")
        _check(self.labelled_cases is None or self.labelled_cases >= 1, "labelled_cases", self.labelled_cases,
               "auto or >= 1")
        _check(self.weight_decay >= 0 and self.eps > 0, "weight_decay/eps", (self.weight_decay, self.eps),
               "weight_decay >= 0, eps > 0")


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_common(cfg: Any) -> None:
    """Checks both configs share: choices, finite numbers, positive sizes and rates."""
    for f, value, _ in _walk(cfg):
        choices = f.metadata.get("choices")
        if choices is not None:
            _check(value in choices, f.name, value, f"one of {choices}")
        if isinstance(value, float):
            _check(math.isfinite(value), f.name, value, "a finite number")
    for name in ("batch_size", "epochs", "ckpt_every"):
        _check(getattr(cfg, name) >= 1, name, getattr(cfg, name), ">= 1")
    _check(cfg.lr > 0 and cfg.grad_clip > 0, "lr/grad_clip", (cfg.lr, cfg.grad_clip), "> 0")
    _check(cfg.workers >= 0, "workers", cfg.workers, ">= 0")


def mask_patch_size(strides: Any = None) -> tuple[int, int, int]:
    """The mask patch (total stride of the 5 MIM stages) per axis; ``None`` is STU-Net's default (16, 16, 16)."""
    if strides is None:
        return (16, 16, 16)
    per_axis = [(s, s, s) if isinstance(s, int) else tuple(s) for s in strides]
    return tuple(math.prod(s[a] for s in per_axis) for a in range(3))


def _walk(cfg: Any):
    """``(field, value, path)`` of every leaf field, nested configs flattened (path: names from the top)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            for sub, v, path in _walk(value):
                yield sub, v, (f.name, *path)
        else:
            yield f, value, (f.name,)


def flat_fields(cls: type) -> dict[str, tuple[dataclasses.Field, tuple[str, ...], Any]]:
    """Flat name -> (field, path from the top, type hint) for every leaf field of a config class."""
    out: dict[str, tuple[dataclasses.Field, tuple[str, ...], Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            for name, (sub, path, hint) in flat_fields(hints[f.name]).items():
                out[name] = (sub, (f.name, *path), hint)
        else:
            out[f.name] = (f, (f.name,), hints[f.name])
    return out


# Per-size presets: only what differs from the defaults. "tiny" is the 2-core CPU teaching scale.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model": {"size": "tiny"}, "patch_size": (64, 64, 64), "batch_size": 2, "epochs": 4, "warmup_epochs": 1,
             "lr": 1e-3, "workers": 0, "ckpt_every": 1, "log_every": 5},
    "S": {"model": {"size": "S"}},
    "B": {"model": {"size": "B"}},
    "L": {"model": {"size": "L", "grad_checkpointing": True}},
    "H": {"model": {"size": "H", "grad_checkpointing": True}, "lr": 2e-5, "weight_decay": 3e-5, "warmup_epochs": 10},
}

FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "patch_size": (64, 64, 64), "batch_size": 2, "epochs": 4, "iters_per_epoch": 10,
             "lr": 3e-3, "val_every": 2, "workers": 0, "ckpt_every": 1},
    "S": {"size": "S"}, "B": {"size": "B"}, "L": {"size": "L"}, "H": {"size": "H"},
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


def _nest(cls: type, overrides: dict[str, Any], what: str) -> dict[str, Any]:
    """Flat overrides (``gamma=0.8``) -> nested dict (``{"masking": {"gamma": 0.8}}``).

    ``None`` values are ignored; ``"auto"`` sets an optional field (default ``None``) to ``None``.
    """
    known = flat_fields(cls)
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in known:
            raise ValueError(f"unknown {what} parameter {key!r}")
        _, path, hint = known[key]
        if value == "auto" and "None" in str(hint):  # the CLI's word for None on an optional field
            value = None
        *parents, leaf = path
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def pretrain_config(preset: str = "B", ablation: str = "none", **overrides: Any) -> PretrainConfig:
    """Build a :class:`PretrainConfig` from a preset, an ablation and flat overrides.

    Flat keys of the nested configs are accepted (``gamma=0.8``, ``backend="spconv"``, ``size="S"``); ``None``
    values are ignored, so a CLI or a papermill cell can pass every parameter through.

    Example:
        >>> cfg = pretrain_config("tiny", method="spark", epochs=2, data_dir="data/p")
    """
    _check(preset in PRESETS, "preset", preset, f"one of {sorted(PRESETS)}")
    _check(ablation in ABLATIONS, "ablation", ablation, f"one of {sorted(ABLATIONS)}")
    nested = _nest(PretrainConfig, overrides, "pretraining")
    return config_from_dict(_merge(_merge(PRESETS[preset], ABLATIONS[ablation]), nested), PretrainConfig)


def finetune_config(preset: str = "B", **overrides: Any) -> FinetuneConfig:
    """Preset + flat overrides (``None`` values ignored), as :func:`pretrain_config`."""
    _check(preset in FINETUNE_PRESETS, "preset", preset, f"one of {sorted(FINETUNE_PRESETS)}")
    nested = _nest(FinetuneConfig, overrides, "finetuning")
    return config_from_dict(_merge(FINETUNE_PRESETS[preset], nested), FinetuneConfig)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def config_from_dict(d: dict[str, Any], cls: type = PretrainConfig) -> Any:
    """Inverse of :func:`config_to_dict` for ``cls`` (a config class); missing keys take the defaults.

    Raises:
        ValueError: unknown keys (named) or invalid values.
    """
    d = dict(d)
    if cls is FinetuneConfig and not d.get("extra", True):
        d.pop("extra")  # run folders written before 0.2 carry an always-empty "extra" entry
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} parameters {sorted(unknown)}")
    kwargs = {}
    for key, value in d.items():
        if is_dataclass(hints[key]):
            kwargs[key] = config_from_dict(value, hints[key])
        else:
            kwargs[key] = _tuples(value) if "tuple" in str(hints[key]) else value
    return cls(**kwargs)
