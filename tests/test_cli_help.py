"""Every help page of the CLI: plain text (no reST), every option explained with its default, split choices listed."""

from __future__ import annotations

import argparse
import re

import pytest

from anatomask_lab.cli import HelpFormatter, build_parser, plain
from anatomask_lab.data.dataset import SPLITS

RAW_REST = ("``", ":func:", ":class:", ":mod:", ":meth:", ":attr:", ".. note::")


def _parsers(parser: argparse.ArgumentParser, name: str = "anatomask-lab"):
    """(command line, parser) for the root parser and every sub-parser, depth first."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _parsers(subparser, f"{name} {sub}")


PARSERS = dict(_parsers(build_parser()))


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings
            and not isinstance(a, argparse._HelpAction | argparse._VersionAction)]


def _rendered(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help of one option as printed (its lines in the help page), joined into one line."""
    formatter = parser._get_formatter()
    return " ".join(formatter._format_action(action).split())


def test_every_subcommand_is_walked():
    names = set(PARSERS)
    for command in ("pretrain", "finetune", "predict", "evaluate", "demo", "study", "course", "prepare", "phantom"):
        assert f"anatomask-lab {command}" in names
    assert "anatomask-lab prepare totalsegmentator" in names  # nested sub-parsers too
    assert len(names) > 15


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_is_plain_text(name):
    text = PARSERS[name].format_help()
    leaked = [token for token in RAW_REST if token in text]
    assert not leaked, f"{name} --help shows reST markup {leaked}"
    assert not re.search(r"(?<![`\w])`\w[^`\n]*`(?!`)", text), f"{name} --help shows `interpreted text`"
    assert not re.search(r"\S::\s*$", text, flags=re.M), f"{name} --help ends a line in '::'"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = PARSERS[name]
    assert isinstance(parser._get_formatter(), HelpFormatter), f"{name} does not use the CLI's HelpFormatter"
    for action in _options(parser):
        flag = "/".join(action.option_strings)
        text = plain(action.help or "")
        assert re.sub(r"\(default:?[^)]*\)", "", text).strip(" ;,."), f"{name} {flag} has no help text"
        if action.default is not None and action.default is not argparse.SUPPRESS:
            assert "default" in _rendered(parser, action).lower(), f"{name} {flag} does not show its default"


def test_split_options_list_their_choices():
    found = 0
    for name, parser in PARSERS.items():
        for action in _options(parser):
            if "--split" in action.option_strings:
                found += 1
                line = _rendered(parser, action)
                missing = [s for s in SPLITS if s not in line]
                assert not missing, f"{name} --split does not list {missing}: {line}"
    assert found >= 1


def test_config_flags_show_the_preset_default_once():
    text = " ".join(PARSERS["anatomask-lab pretrain"].format_help().split())
    assert re.search(r"--gamma GAMMA .*?\(default: 0\.6", text)
    assert "default: None" not in text  # unset flags (None: keep the preset's value) get no second default


def test_plain_turns_rest_into_text():
    doc = ("The :class:`~anatomask_lab.models.sparse.SparseEncoder` runs :func:`anatomask_lab.masking.active_maps` "
           "and :mod:`.spconv_backend` (see :meth:`Foo.bar <anatomask_lab.x.Foo.bar>`) on ``[B, *grid]`` masks, "
           "**twice**, with `gamma` set.\n\nExample::\n\n    x = 1\n\n::\n\n    y = 2\n\n.. note:: be careful\n")
    assert plain(doc) == ("The SparseEncoder runs anatomask_lab.masking.active_maps and spconv_backend (see Foo.bar) "
                          "on [B, *grid] masks, twice, with gamma set.\n\nExample:\n\n    x = 1\n\n\n    y = 2\n\n"
                          "Note: be careful\n")
    untouched = "5% of cases, %(default)s, a * b * c, it's `not' "
    assert plain(untouched) == untouched
    assert plain(None) == ""


def test_descriptions_are_rewrapped_with_bullets_kept():
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter,
                                     description="First paragraph that is rather long and\nbroken early.\n\n"
                                                 "* one item that goes on\n  over two lines\n* two\n\n    code  kept")
    text = parser.format_help()
    assert "First paragraph that is rather long and broken early." in text
    assert "* one item that goes on over two lines\n* two" in text
    assert "    code  kept" in text


def test_flag_defaults_read_on_or_off():
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="say less")
    parser.add_argument("--rate", type=float, default=0.5, help="a rate in %%")
    parser.add_argument("--mode", default="fast", help="mode (default: fast unless --quiet)")
    text = " ".join(parser.format_help().split())
    assert "say less (default: off)" in text and "a rate in % (default: 0.5)" in text
    assert "mode (default: fast unless --quiet)" in text and "(default: fast)" not in text
