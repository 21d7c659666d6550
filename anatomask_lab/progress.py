"""Progress bars that suit a terminal, a notebook and a log file.

In a terminal or a notebook :func:`progress` is ``tqdm.auto.tqdm`` as usual. When the stream is not a terminal (a
SLURM log, ``nohup``, a pipe) redrawing the bar with carriage returns would fill the file with thousands of
updates on one line, so the bar prints whole lines instead, at most one every ``interval`` seconds (30 by default)
plus its final state, in plain ASCII.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm as std_tqdm
from tqdm.auto import tqdm as auto_tqdm

__all__ = ["LOG_INTERVAL", "LogBar", "progress"]

#: Least number of seconds between two lines of a bar written to a log file.
LOG_INTERVAL = 30.0
_IN_NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, desc: str = "", total: float | None = None, disable: bool = False,
             unit: str = "it", leave: bool = True, initial: float = 0, file: TextIO | None = None,
             interval: float = LOG_INTERVAL) -> std_tqdm:
    """A tqdm bar over ``iterable`` (or a manual bar with ``total``) that suits where its output goes.

    Args:
        iterable: what to iterate (None for a bar driven by ``update``).
        desc, total, unit, leave, initial: as in tqdm.
        disable: no output at all (the iterable is still walked).
        file: the stream (default ``sys.stderr``).
        interval: least seconds between two lines when ``file`` is not a terminal.
    """
    kwargs: dict[str, Any] = dict(desc=desc, total=total, disable=disable, unit=unit, leave=leave, initial=initial)
    stream = sys.stderr if file is None else file
    if disable or _IN_NOTEBOOK or _is_terminal(stream):
        return auto_tqdm(iterable, file=file, **kwargs)
    return LogBar(iterable, file=stream, interval=interval, **kwargs)


class _Lines:
    """The stream a :class:`LogBar` writes to: each redraw becomes one line; blank redraws and cursor moves
    (``\\r``, ANSI escapes, bare newlines) are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = _ESCAPES.sub("", text).replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class LogBar(std_tqdm):
    """A tqdm bar for log files: a line per redraw, at most one per ``interval`` seconds, and the final state
    when the bar closes. A bar with ``leave=False`` (the steps of one epoch) writes neither its 0% line nor a
    final one, so short epochs add no lines."""

    monitor_interval = 0  # no monitor thread: it would force redraws between updates

    def __init__(self, iterable: Iterable | None = None, *, file: TextIO, interval: float = LOG_INTERVAL,
                 **kwargs: Any) -> None:
        # a bar that leaves no line (an epoch's steps) also skips its 0% line: its first line comes after interval
        quiet_start = not kwargs.get("leave", True)
        self._interval, self._closing = float(interval), False
        self._last_line = time.monotonic() if quiet_start else -float("inf")
        super().__init__(iterable, file=_Lines(file), mininterval=interval, maxinterval=float("inf"), ascii=True,
                         position=0, dynamic_ncols=False, ncols=100, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        if not self._closing and now - self._last_line < self._interval:
            return True  # too soon after the last line
        self._last_line = now
        return super().display(msg=msg, pos=pos)

    def close(self) -> None:
        self._closing = True
        super().close()
