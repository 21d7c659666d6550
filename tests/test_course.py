"""The course material: exercises with asserting solutions in every notebook, and the student edition."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from anatomask_lab.course import SOLUTION_TAG, student_notebook, write_student_edition

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _exercises(nb: dict) -> list[list[dict]]:
    """The cells of each exercise: its ``exercise`` markdown cell and every cell up to the next one."""
    groups: list[list[dict]] = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown" and "exercise" in _tags(cell):
            groups.append([])
        if groups:
            groups[-1].append(cell)
    return groups


def _ends_in_assert(source: str) -> bool:
    body = ast.parse(source).body
    return bool(body) and isinstance(body[-1], ast.Assert)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_exercises_with_asserting_solutions(path):
    nb = json.loads(path.read_text())
    groups = _exercises(nb)
    assert len(groups) >= 2, f"{path.name} has {len(groups)} exercises, needs at least 2"
    for group in groups:
        title = _source(group[0]).splitlines()[0]
        student = [c for c in group if c["cell_type"] == "code" and "exercise" in _tags(c)]
        solution = [c for c in group if c["cell_type"] == "code" and SOLUTION_TAG in _tags(c)]
        assert len(student) == 1 and "# your answer here" in _source(student[0]), f"{path.name} {title}: student cell"
        assert solution, f"{path.name} {title}: no solution cell"
        assert group.index(student[0]) < group.index(solution[0]), f"{path.name} {title}: solution before the task"
        assert _ends_in_assert(_source(solution[-1])), f"{path.name} {title}: the solution must end in an assert"
        assert "correct answer" in _source(group[0]).lower(), f"{path.name} {title}: say what a correct answer shows"


def test_student_edition_keeps_exercises_and_drops_every_solution(tmp_path):
    written = write_student_edition(NB_DIR, tmp_path / "student")
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for src, out in zip(NOTEBOOKS, written, strict=True):
        original, student = json.loads(src.read_text()), json.loads(out.read_text())
        assert not [c for c in student["cells"] if SOLUTION_TAG in _tags(c)]
        text = "\n".join(_source(c) for c in student["cells"])
        leaked = [_source(c) for c in original["cells"] if SOLUTION_TAG in _tags(c) and _source(c).strip() in text]
        assert not leaked, f"{out.name}: solution text survives"
        exercise = [c["id"] for c in original["cells"] if "exercise" in _tags(c)]
        assert [c["id"] for c in student["cells"] if "exercise" in _tags(c)] == exercise
        n_solutions = sum(SOLUTION_TAG in _tags(c) for c in original["cells"])
        assert len(student["cells"]) == len(original["cells"]) - n_solutions
        assert out.read_text() == json.dumps(student, indent=1, ensure_ascii=False) + "\n"


def test_student_notebook_clears_outputs():
    nb = {"cells": [{"cell_type": "code", "execution_count": 3, "metadata": {}, "outputs": [{"x": 1}], "source": []},
                    {"cell_type": "code", "execution_count": 4, "metadata": {"tags": ["solution"]}, "outputs": [],
                     "source": ["assert True"]}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    out = student_notebook(nb)
    assert out["cells"] == [{**nb["cells"][0], "execution_count": None, "outputs": []}]
    assert nb["cells"][0]["outputs"] == [{"x": 1}]  # the input is not modified


def test_refuses_out_dir_equal_to_or_inside_src(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    (src / "a.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    for out in (src, src / "student", tmp_path / "nbs" / ".." / "nbs"):
        with pytest.raises(ValueError, match="outside"):
            write_student_edition(src, out)
    assert sorted(p.name for p in src.iterdir()) == ["a.ipynb"]


def test_never_overwrites_unless_asked(tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    mine = out / NOTEBOOKS[0].name
    mine.write_text("a student's work")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_student_edition(NB_DIR, out)
    assert mine.read_text() == "a student's work" and sorted(out.iterdir()) == [mine]  # nothing written at all
    write_student_edition(NB_DIR, out, overwrite=True)
    assert json.loads(mine.read_text())["cells"] and len(list(out.glob("*.ipynb"))) == len(NOTEBOOKS)
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_cli_course(tmp_path, capsys):
    from anatomask_lab.cli import main

    out = tmp_path / "handout"
    assert main(["course", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert main(["course", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["course", "--out", str(out), "--overwrite"]) == 0
    assert main(["course", "--out", str(NB_DIR / "student")]) == 2
    assert not (NB_DIR / "student").exists()


def test_cli_course_solutions_copies_the_notebooks_unchanged(tmp_path, capsys):
    from anatomask_lab.cli import main

    out = tmp_path / "teacher"
    assert main(["course", "--out", str(out), "--solutions"]) == 0
    assert "with solutions" in capsys.readouterr().out
    for src in NOTEBOOKS:
        copied = json.loads((out / src.name).read_text())
        assert copied == json.loads(src.read_text())
        assert any(SOLUTION_TAG in _tags(c) for c in copied["cells"])


@pytest.mark.slow
def test_student_edition_of_01_runs_up_to_the_first_exercise(tmp_path, monkeypatch):
    """Papermill runs the handout of notebook 01 at smoke scale; any error may only come at or after an exercise."""
    import papermill as pm
    from test_notebooks import _smoke_params

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    handout = write_student_edition(NB_DIR, tmp_path / "student")[0]
    assert handout.name.startswith("01_")
    out = tmp_path / "executed.ipynb"
    try:
        pm.execute_notebook(str(handout), str(out), parameters=_smoke_params(handout.name, tmp_path, tmp_path),
                            cwd=str(NB_DIR), progress_bar=False, kernel_name="python3")
    except pm.PapermillExecutionError:
        pass  # where it failed is checked below
    cells = json.loads(out.read_text())["cells"]
    first_exercise = next(i for i, c in enumerate(cells) if "exercise" in _tags(c))
    ran = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and c.get("execution_count")]
    failed = [i for i, c in enumerate(cells) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert all(i >= first_exercise for i in failed), f"the handout fails before its first exercise: cells {failed}"
    assert [i for i in ran if i < first_exercise] == [i for i, c in enumerate(cells[:first_exercise])
                                                       if c["cell_type"] == "code"]
