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

__all__ = ["add_config_arguments", "config_to_args", "overrides_from_args", "print_config", "require_out"]

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

        flag = "--" + (f.metadata.get("flag") or name).replace("_", "-")
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
    for name, (f, path, hint) in flat_fields(type(cfg)).items():
        value = cfg
        for p in path:
            value = getattr(value, p)
        flag = "--" + (f.metadata.get("flag") or name).replace("_", "-")
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
