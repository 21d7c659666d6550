"""The one atomic writer: files and folders appear whole under their final name, or not at all.

Every file the kit writes (checkpoints, configs, prepared cases, NIfTI predictions, reports' JSON) goes through
:func:`atomic_write`: the content is written to a hidden temporary name beside the target, flushed to disk with
``fsync``, then renamed over the target. A crash or ``kill -9`` leaves either the old file or the new one, plus at
worst a stale ``.<name>.tmp-*`` file that the next run may delete. Temporary names always match ``.*.tmp-*``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TMP_GLOB", "atomic_dir", "atomic_write", "atomic_write_json"]

TMP_GLOB = ".*.tmp-*"  # what a killed writer can leave behind


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file under a temporary name beside ``path``, fsync it, then rename it to ``path``.

    Args:
        path: final file name; its folder is created.
        write: called with the temporary path (which keeps ``path``'s suffixes); must create that file.

    Returns:
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: the file is created by ``write`` itself, so it gets the user's umask (mkstemp forces 0600)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{''.join(path.suffixes)}")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (the object is serialised before anything is touched)."""
    text = json.dumps(obj, indent=1) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_dir(final: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary folder beside ``final``, then rename it to ``final`` (an older ``final`` is replaced)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp forces 0700; a shared data set must follow the user's umask
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
