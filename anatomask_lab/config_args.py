"""Command-line flags generated from the configuration dataclasses, and back.

Every leaf field of :class:`~anatomask_lab.config.PretrainConfig` / :class:`~anatomask_lab.config.FinetuneConfig`
becomes one flag (``lr`` -> ``--lr``, ``masking.gamma`` -> ``--gamma``) with the field's help text, its allowed
values and its default per preset. Unset flags stay ``None`` and leave the preset's value alone.
:func:`config_to_args` writes the flags that rebuild a configuration (used to launch ``torchrun`` from a notebook).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from anatomask_lab.config import config_to_dict, flat_fields

__all__ = [
    "add_config_arguments",
    "add_run_arguments",
    "config_to_args",
    "flat_values",
    "ignored_flags",
    "overrides_from_args",
    "print_config",
    "require_out",
]

AUTO = "auto"  # what an optional field (None by default) accepts on the command line to mean None


def _stride(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a stride is one int or three comma-separated ints, got {text!r}")
    return tuple(parts)


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return AUTO if text == AUTO else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _show(value: Any) -> str:
    if value is None:
        return AUTO
    if isinstance(value, tuple | list):
        return " ".join(_show(v) if isinstance(v, tuple | list) else str(v) for v in value)
    return str(value)


def _defaults(name: str, presets: dict[str, Any], build: Callable[[str], Any], default_preset: str) -> str:
    """'default: X' or, where presets differ, 'default: X; tiny: Y, H: Z' (X: the default preset's value)."""
    values = {p: build(p) for p in presets}
    first = values[default_preset]
    others = [f"{p}: {_show(v)}" for p, v in values.items() if v != first]
    text = f"default: {_show(first)}"
    return text + (f" (preset {default_preset}); " + ", ".join(others) if others else "")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, presets: dict[str, dict[str, Any]],
                         build: Callable[..., Any], default_preset: str = "B") -> None:
    """Add one flag per leaf field of ``cls``; ``build(preset)`` builds a config of a preset (for the defaults)."""
    configs = {p: build(p) for p in presets}
    group = parser.add_argument_group(f"{cls.__name__} fields (unset flags keep the preset's value)")
    for name, (f, path, hint) in flat_fields(cls).items():

        def value_of(preset: str, path=path) -> Any:
            node = configs[preset]
            for p in path:
                node = getattr(node, p)
            return node

        flag = _flag(name, f)
        text = f.metadata.get("help", "") + f" ({_defaults(name, presets, value_of, default_preset)})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text.replace("%", "%%")}
        hint_s = str(hint)
        optional = "None" in hint_s
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "strides":
            kwargs.update(nargs=5, type=_optional(_stride), metavar="S")
        elif hint_s.startswith("tuple"):
            kwargs.update(nargs=3, type=int, metavar=("X", "Y", "Z"))
        else:
            base = int if "int" in hint_s else float if "float" in hint_s else str
            kwargs["type"] = _optional(base) if optional else base
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        flags = [flag] if flag == f"--{name.replace('_', '-')}" else [flag, f"--{name.replace('_', '-')}"]
        group.add_argument(*flags, **kwargs)


def _flag(name: str, f: Any) -> str:
    """The command-line flag of a flat config field."""
    return "--" + (f.metadata.get("flag") or name).replace("_", "-")


def flat_values(cfg: Any) -> dict[str, Any]:
    """Flat field name -> value of a configuration (``gamma`` for ``cfg.masking.gamma``)."""
    values = {}
    for name, (_, path, _) in flat_fields(type(cfg)).items():
        value = cfg
        for p in path:
            value = getattr(value, p)
        values[name] = value
    return values


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flat overrides of the flags the user set (``auto`` -> explicit ``None`` handled by the caller's config)."""
    out = {}
    for name in flat_fields(cls):
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
            if AUTO in value:
                value = AUTO
        out[name] = value
    return out


def config_to_args(cfg: Any) -> list[str]:
    """Flags that rebuild ``cfg`` from any preset: ``overrides_from_args(parse(config_to_args(cfg)))`` == cfg."""
    args: list[str] = []
    values = flat_values(cfg)
    for name, (f, _, hint) in flat_fields(type(cfg)).items():
        value = values[name]
        flag = _flag(name, f)
        if hint is bool:
            args.append(flag if value else f"--no-{flag[2:]}")
        elif value is None:
            args += [flag] + ([AUTO] * 5 if name == "strides" else [AUTO])
        elif name == "strides":
            args += [flag, *(",".join(map(str, s)) for s in value)]
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def print_config(cfg: Any) -> None:
    """Print the resolved configuration as JSON (``--print-config``)."""
    print(json.dumps(config_to_dict(cfg), indent=2))


def require_out(args: argparse.Namespace) -> str:
    """The ``--out`` run folder, required for training (``--print-config`` alone does without)."""
    if args.out_dir is None:
        raise ValueError("--out is required: the run folder to write")
    return args.out_dir


def _resume_value(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")
    return text


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume [auto]``, ``--overwrite`` and ``--print-config`` of the training commands."""
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_value, metavar="auto",
                        help="continue the run in --out from its last checkpoint with its stored configuration; "
                        "--resume auto: continue when --out has a checkpoint, else start (for job chains)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (its config, metrics and checkpoints are removed first)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit (creates nothing)")


def ignored_flags(args: argparse.Namespace, cls: type, stored: Any, requested: Any) -> list[str]:
    """The flags the user set that would change ``stored`` (a resumed run's configuration, which is kept).

    ``requested`` is the configuration the flags build; a field it changes is named by its flag when the user set
    that flag, else by ``--preset`` / ``--ablation`` when given (the preset's defaults alone name nothing).
    """
    fields = flat_fields(cls)
    given = set(overrides_from_args(args, cls))
    old, new = flat_values(stored), flat_values(requested)
    changed = [name for name in fields if name != "out_dir" and old[name] != new[name]]
    flags = [_flag(name, fields[name][0]) for name in changed if name in given]
    if any(name not in given for name in changed):
        flags += [f"--{key}" for key in ("preset", "ablation") if getattr(args, key, None) is not None]
    return flags
