"""The ``anatomask-lab`` command.

Each subcommand lives beside the code it drives: a module listed in ``COMMAND_MODULES`` defines
``add_cli(subparsers)``, which adds its parser and sets ``func`` (a callable taking the parsed namespace and
returning an exit code). The list is explicit; nothing is discovered by name.

Every parser of the command, subcommands included, is an :class:`ArgumentParser` and formats its help with
:class:`HelpFormatter`: descriptions (often a module's docstring) and option help pass through :func:`plain`, which
turns reST markup into plain text, paragraphs are re-wrapped to the terminal, and each option shows its default.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap

from anatomask_lab import __version__

COMMAND_MODULES: tuple[str, ...] = (
    "anatomask_lab.data.phantom",
    "anatomask_lab.data.prepare",
    "anatomask_lab.pretrain",
    "anatomask_lab.export",
    "anatomask_lab.finetune",
    "anatomask_lab.predict",
    "anatomask_lab.evaluate",
    "anatomask_lab.demo",
    "anatomask_lab.study",
    "anatomask_lab.bench",
    "anatomask_lab.course",
)


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|ref|doc|py:\w+):`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")
_INTERPRETED = re.compile(r"(?<![`\w])`([^`\s](?:[^`]*[^`\s])?)`(?![`\w])")
_STRONG = re.compile(r"\*\*([^*\s](?:[^*]*[^*\s])?)\*\*")
_DIRECTIVE = re.compile(r"^(\s*)\.\. (\w[\w-]*)::\s*", re.M)


def _role_text(match: re.Match) -> str:
    """The text a reader should see for ``:role:`target```: its title, else the target (``~`` keeps the last part)."""
    target = match.group(1).strip()
    titled = re.fullmatch(r"(.+?)\s*<[^>]+>", target)
    if titled:
        return titled.group(1)
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return target.lstrip(".")


def plain(text: str | None) -> str:
    """reST markup of a docstring or help string as plain text for a terminal.

    Roles (``:func:`x```, ``:class:`~a.B```) become their name, inline literals and interpreted text lose their
    backticks, ``**strong**`` its stars, a paragraph ending in ``::`` ends in ``:`` (a lone ``::`` line goes), and a
    directive (``.. note::``) becomes its name (``Note:``). Everything else, ``%`` templates included, is kept.
    """
    if not text:
        return ""
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _DIRECTIVE.sub(lambda m: f"{m.group(1)}{m.group(2).capitalize()}: ", text)
    text = re.sub(r"^[ \t]*::[ \t]*\n", "", text, flags=re.M)
    return re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)


def _fill_paragraph(block: str, width: int, indent: str) -> str:
    """Re-wrap one paragraph; a bullet list wraps item by item, an indented (literal) block is kept as it is."""
    lines = block.splitlines()
    if all(line.startswith((" ", "\t")) for line in lines):
        return "\n".join(indent + line for line in lines)
    items: list[list[str]] = []
    for line in lines:
        if re.match(r"\s*[*-] ", line) or not items:
            items.append([line.strip()])
        else:
            items[-1].append(line.strip())
    out = []
    for words in items:
        bullet = re.match(r"[*-] ", words[0])
        hang = indent + ("  " if bullet else "")
        out.append(textwrap.fill(" ".join(words), width, initial_indent=indent, subsequent_indent=hang,
                                 break_on_hyphens=False, break_long_words=False))
    return "\n".join(out)


def _default_text(value: object) -> str:
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Plain-text help: reST markup removed (:func:`plain`), paragraphs re-wrapped, every option's default shown.

    An option's default is appended as ``(default: X)`` unless its help already says ``default`` (the
    configuration flags name the default of each preset) or the default is ``None`` (nothing set).
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = [b for b in re.split(r"\n\s*\n", textwrap.dedent(plain(text)).strip("\n")) if b.strip()]
        return "\n\n".join(_fill_paragraph(b, width, indent) for b in blocks)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help)
        default = action.default
        if (default is None or default is argparse.SUPPRESS or "default" in text.lower()
                or isinstance(action, argparse._HelpAction | argparse._VersionAction)
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return f"{text} (default: {_default_text(default).replace('%', '%%')})".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """The command's parser class; sub-parsers inherit it, so every help page uses :class:`HelpFormatter`.

    A ``formatter_class`` passed by a subcommand is replaced: the whole command formats help one way.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="anatomask-lab",
        description="AnatoMask masked image modelling for 3D medical image segmentation: data, pretraining, "
        "finetuning, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"anatomask-lab {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (bad files, flags, folders, diverging runs, an optional package not installed): one
    line and exit 2, not a traceback."""
    from nibabel.filebasedimages import ImageFileError

    return (ValueError, OSError, KeyError, FloatingPointError, RuntimeError, ImportError, ImageFileError)


def _one_line(exc: BaseException) -> str:
    """The error as one line, naming the file where the exception knows it."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, KeyError) and exc.args:
        text = f"missing entry {exc.args[0]!r}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
