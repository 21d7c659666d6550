"""The course material: the student edition of the notebooks.

Every notebook holds exercises: a markdown cell tagged ``exercise`` that states the task, a code cell tagged
``exercise`` for the student's answer, and a worked solution in cells tagged ``solution`` that ends in an assertion.
The student edition is the same notebooks with every ``solution`` cell removed (and any outputs cleared), ready to
hand out; ``anatomask-lab course --out DIR`` writes it (``--solutions`` writes the notebooks as they are, which is how
an installed wheel hands them out). The lesson plan is ``docs/course.md``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from anatomask_lab.atomic import atomic_write

__all__ = ["EXERCISE_TAG", "SOLUTION_TAG", "add_cli", "notebooks_dir", "student_notebook", "write_student_edition"]

EXERCISE_TAG = "exercise"
SOLUTION_TAG = "solution"


def notebooks_dir() -> Path:
    """The folder of the kit's notebooks (the course's source, the demo's reports).

    An installed wheel carries them as package data (``anatomask_lab/notebooks/*.ipynb``, mapped from the
    repository's ``notebooks/`` by ``pyproject.toml``); a checkout, or an editable install of it, has them in
    ``notebooks/`` beside the package. The installed copy wins when both exist.

    Raises:
        FileNotFoundError: neither place holds a notebook (a broken install).
    """
    shipped = resources.files("anatomask_lab") / "notebooks"
    checkout = Path(__file__).resolve().parents[1] / "notebooks"
    candidates = [Path(str(shipped)), checkout] if isinstance(shipped, Path) else [checkout]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.ipynb")):
            return folder
    raise FileNotFoundError(f"no notebooks in {' or '.join(map(str, candidates))}: reinstall anatomask-lab (the "
                            "wheel ships them) or run from a checkout")


def _tags(cell: dict[str, Any]) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def student_notebook(nb: dict[str, Any]) -> dict[str, Any]:
    """A copy of a notebook (as loaded JSON) without its ``solution`` cells, outputs and execution counts."""
    cells = []
    for cell in nb["cells"]:
        if SOLUTION_TAG in _tags(cell):
            continue
        cell = dict(cell)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    return {**nb, "cells": cells}


def _check_destination(src: Path, out: Path) -> None:
    if out == src or src in out.parents:
        raise ValueError(f"the student edition must go outside the source notebooks folder {src}, got {out}")


def write_student_edition(src_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                          solutions: bool = False) -> list[Path]:
    """Write every ``*.ipynb`` of ``src_dir`` into ``out_dir`` without its solution cells (unless ``solutions``).

    Nothing is written unless every target can be: an existing file stops the whole edition unless ``overwrite``.
    Each notebook is written atomically, in the format the repository commits (one-space indented JSON).

    Args:
        src_dir: folder of the notebooks with solutions (``notebooks/``).
        out_dir: folder for the student edition; created; must not be ``src_dir`` or lie inside it.
        overwrite: replace notebooks already in ``out_dir``.
        solutions: copy the notebooks unchanged, solutions and outputs included (the teacher's edition; how an
            installed wheel hands out the notebooks to run or edit).

    Returns:
        The paths written, in name order.

    Raises:
        ValueError: ``out_dir`` is ``src_dir`` or inside it.
        FileNotFoundError: ``src_dir`` is missing or holds no notebook.
        FileExistsError: a target exists and ``overwrite`` is False.
    """
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    _check_destination(src, out)
    sources = sorted(src.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {src}")
    targets = [out / path.name for path in sources]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} notebook(s) already in {out} (e.g. {existing[0]}); pass "
                              "--overwrite to replace them")
    for path, target in zip(sources, targets, strict=True):
        nb = json.loads(path.read_text(encoding="utf-8"))
        text = json.dumps(nb if solutions else student_notebook(nb), indent=1, ensure_ascii=False) + "\n"
        atomic_write(target, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return targets


def add_cli(subparsers) -> None:
    """Add ``anatomask-lab course --out DIR [--overwrite] [--solutions]``."""
    p = subparsers.add_parser("course", help="write the student edition of the notebooks (solutions removed)",
                              description=__doc__)
    p.add_argument("--out", required=True, help="folder for the student edition (outside the notebooks folder)")
    p.add_argument("--overwrite", action="store_true", help="replace notebooks already in --out")
    p.add_argument("--solutions", action="store_true",
                   help="copy the notebooks with their solutions (the teacher's edition, e.g. from an installed wheel)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    written = write_student_edition(notebooks_dir(), args.out, overwrite=args.overwrite, solutions=args.solutions)
    for path in written:
        print(path)
    edition = "notebooks with solutions" if args.solutions else "student edition"
    print(f"wrote the {edition} ({len(written)} notebooks) from {notebooks_dir()}; lesson plan: docs/course.md")
    return 0
