"""The install story: ranges in pyproject.toml, exact pins in constraints.txt, spconv optional, notebooks shipped in
the wheel, and the Makefile and environment.yml installing the same thing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
MAKEFILE = (ROOT / "Makefile").read_text()
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
SELF = canonicalize_name(PROJECT["name"])


def _make_var(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)\s*$", MAKEFILE, flags=re.M)
    assert match, f"Makefile defines no {name}"
    return match.group(1)


def _constraints() -> dict[str, str]:
    """constraints.txt as canonical name -> exact version; every line must be a plain ``name==version`` pin."""
    pins: dict[str, str] = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert match, f"constraints.txt line {n} is not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = match.group(2)
    return pins


def _requirements(*groups: str) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]] if "runtime" in groups else []
    for extra in groups:
        reqs += [Requirement(r) for r in EXTRAS.get(extra, [])]
    return reqs


# -- pyproject.toml -----------------------------------------------------------------------------------------------


def test_runtime_dependencies_are_ranges_with_a_floor():
    for text in PROJECT["dependencies"]:
        req = Requirement(text)
        assert "==" not in text and "===" not in text, f"runtime dependency pinned exactly: {text}"
        assert any(s.operator == ">=" for s in req.specifier), f"runtime dependency without a lower bound: {text}"
    torch_req = next(r for r in _requirements("runtime") if r.name == "torch")
    assert not torch_req.specifier.contains("2.2.2") and torch_req.specifier.contains("2.3.0")  # torch.amp.GradScaler


def test_spconv_only_in_its_extra_one_build_per_python():
    for group in ("runtime", *(e for e in EXTRAS if e != "spconv")):
        named = [str(r) for r in _requirements(group) if r.name.startswith("spconv")]
        assert not named, f"spconv outside the spconv extra ({group}): {named}"
    spconv = _requirements("spconv")
    assert {r.name for r in spconv} == {"spconv-cu120", "spconv-cu126"}
    for minor, build in ((11, "spconv-cu120"), (12, "spconv-cu126"), (13, "spconv-cu126")):
        env = {"python_version": f"3.{minor}", "python_full_version": f"3.{minor}.0"}
        chosen = [r.name for r in spconv if r.marker is None or r.marker.evaluate(env)]
        assert chosen == [build], f"Python 3.{minor} takes {chosen}, expected {build}"


def test_extras_the_issue_names():
    names = {extra: {canonicalize_name(r.name) for r in _requirements(extra)} for extra in EXTRAS}
    assert "jupyterlab" in names["lab"] and "jupyterlab" not in {canonicalize_name(r.name)
                                                                   for r in _requirements("runtime")}
    assert names["sitk"] == {"simpleitk"} and names["log"] == {"tensorboard"}
    assert {"pytest", "pytest-xdist", "nbval", "ruff", "hypothesis", "monai", "playwright"} <= names["dev"]
    dev_self = [r for r in _requirements("dev") if canonicalize_name(r.name) == SELF]
    assert dev_self and {"lab", "sitk", "log"} <= set(dev_self[0].extras), "dev must pull the extras its tests need"


def test_license_is_an_spdx_string():
    assert PROJECT["license"] == "Apache-2.0"
    floor = re.search(r"setuptools>=(\d+)", " ".join(PYPROJECT["build-system"]["requires"]))
    assert floor and int(floor.group(1)) >= 77  # the first setuptools that reads an SPDX license string


def test_every_subpackage_and_the_notebooks_are_packaged():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "anatomask_lab").rglob("__init__.py")}
    assert found - listed == set(), f"subpackages missing from [tool.setuptools].packages: {sorted(found - listed)}"
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]["anatomask_lab.notebooks"]
    assert "anatomask_lab.notebooks" in listed and (ROOT / mapped).resolve() == ROOT / "notebooks"
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["anatomask_lab.notebooks"] == ["*.ipynb"]


# -- constraints.txt ----------------------------------------------------------------------------------------------


def test_constraints_pin_every_dependency_within_its_range():
    pins = _constraints()
    assert "torch" not in pins, "torch is pinned by the Makefile (TORCH_VERSION), not by constraints.txt"
    py311 = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64"}
    for req in _requirements("runtime", *EXTRAS):
        name = canonicalize_name(req.name)
        if name in (SELF, "torch") or (req.marker is not None and not req.marker.evaluate(py311)):
            continue  # the project itself, torch, and what only another Python or platform installs
        assert name in pins, f"{name} ({req}) has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req}"
    assert pins["simpleitk"] == "2.5.7" and pins["tensorboard"] == "2.21.0"


def test_constraints_cover_what_is_installed_here():
    """Every installed distribution of the project's dependency closure is pinned, at the version installed.

    Only meaningful in an environment built with constraints.txt (`make`); skipped elsewhere."""
    from importlib import metadata

    pins = _constraints()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    if any(installed.get(name) not in (None, version) for name, version in pins.items()):
        pytest.skip("this environment was not installed with constraints.txt")
    closure, todo = set(), [r for r in _requirements("runtime", *EXTRAS) if r.marker is None or r.marker.evaluate()]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in closure or name in (SELF, "torch") or name not in installed:
            continue  # the project's own extras are all in the roots already
        closure.add(name)
        for text in metadata.requires(name) or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(sub)
    assert closure - set(pins) == set(), f"installed but unpinned: {sorted(closure - set(pins))}"


# -- Makefile, CI, environment.yml ---------------------------------------------------------------------------------


def test_makefile_installs_torch_first_then_the_project_with_the_constraints():
    assert _make_var("CONSTRAINTS") == "constraints.txt" and (ROOT / "constraints.txt").is_file()
    recipe = MAKEFILE[MAKEFILE.index("$(STAMP): pyproject.toml"):MAKEFILE.index("install: $(STAMP)")]
    assert recipe.splitlines()[0].split(":", 1)[1].split() == ["pyproject.toml", "$(CONSTRAINTS)"]
    assert recipe.index("torch==$(TORCH_VERSION)") < recipe.index('-c $(CONSTRAINTS) -e ".[$(EXTRAS)]"')
    assert '-c $(CONSTRAINTS) -e ".[spconv]"' in recipe
    extras = set(_make_var("EXTRAS").split(","))
    assert extras <= set(EXTRAS) and {"dev", "lab", "sitk", "log"} <= extras
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in ci and "make test-browser" in ci


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_reinstalls_when_pyproject_or_constraints_change(tmp_path):
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    stamp = tmp_path / ".venv" / f".installed-{_make_var('TORCH_VERSION')}"
    stamp.parent.mkdir()
    stamp.touch()

    def up_to_date(newer: str | None = None, *args: str) -> bool:
        for name in ("pyproject.toml", "constraints.txt"):
            os.utime(tmp_path / name, (1_000_000, 1_000_000))
        os.utime(stamp, (2_000_000, 2_000_000))
        if newer:
            os.utime(tmp_path / newer, (3_000_000, 3_000_000))
        rc = subprocess.run(["make", "-q", "install", *args], cwd=tmp_path, capture_output=True).returncode
        assert rc in (0, 1)
        return rc == 0

    assert up_to_date()
    assert not up_to_date("constraints.txt")
    assert not up_to_date("pyproject.toml")
    assert not up_to_date(None, "TORCH_VERSION=0.0.1")  # another torch: another stamp


def test_environment_yml_matches_makefile_and_constraints():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert sorted(conda) == ["pip", "python=3.11"], f"conda must provide Python and pip only, got {conda}"
    assert SpecifierSet(PROJECT["requires-python"]).contains("3.11")
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert f"torch=={_make_var('TORCH_VERSION')}" in pip, "environment.yml's torch differs from the Makefile's"
    index = f"https://download.pytorch.org/whl/{_make_var('TORCH_CUDA')}"
    assert f"--extra-index-url {index}" in pip, "environment.yml's CUDA index differs from the Makefile's TORCH_CUDA"
    assert f"-c {_make_var('CONSTRAINTS')}" in pip
    project = [line for line in pip if line.startswith("-e .[")]
    assert len(project) == 1
    extras = set(project[0][len("-e .["):-1].split(","))
    assert extras <= set(EXTRAS) and set(_make_var("EXTRAS").split(",")) | {"spconv"} <= extras
    assert [line for line in pip if not line.startswith(("-", "torch=="))] == [], "pins belong in constraints.txt"


def test_makefile_gpu_env_installs_the_same_as_environment_yml():
    recipe = MAKEFILE[MAKEFILE.index("$(GPU_STAMP): pyproject.toml"):MAKEFILE.index("gpu-env: $(GPU_STAMP)")]
    assert "torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/$(TORCH_CUDA)" in recipe
    assert '-c $(CONSTRAINTS) -e ".[$(EXTRAS),spconv]"' in recipe
    assert re.search(r"^TORCH_CUDA \?= cu\d{3}$", MAKEFILE, flags=re.M)


# -- spconv is optional -------------------------------------------------------------------------------------------


@pytest.fixture
def no_spconv(monkeypatch):
    """spconv hidden from imports, as in an environment without the spconv extra."""
    for name in [m for m in sys.modules if m == "spconv" or m.startswith("spconv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "spconv", None)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)


def test_masked_backend_runs_without_spconv(no_spconv, one_thread):
    from anatomask_lab.masking import random_mask
    from anatomask_lab.models import STUNetSpec, build_mim, mim_loss

    torch.manual_seed(0)
    model = build_mim(STUNetSpec((4, 8, 8, 16, 16, 16), (1, 1, 1, 1, 1, 1), 32), backend="masked")
    x = torch.randn(1, 1, 32, 32, 48)
    mask = random_mask(1, (2, 2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    loss, _ = mim_loss(model(x, mask), x, mask)
    loss.backward()
    assert torch.isfinite(loss) and sys.modules["spconv"] is None


def test_spconv_backend_without_spconv_says_how_to_install(no_spconv):
    from anatomask_lab.models import STUNetSpec, build_mim

    with pytest.raises(ImportError, match=re.escape('pip install "anatomask-lab[spconv]"')) as info:
        build_mim(STUNetSpec((4, 8, 8, 16, 16, 16), (1, 1, 1, 1, 1, 1), 32), backend="spconv")
    assert "\n" not in str(info.value) and "masked" in str(info.value)


def test_cli_spconv_backend_without_spconv_is_one_line_and_writes_nothing(no_spconv, tiny_dataset, tmp_path, capsys):
    from anatomask_lab.cli import main
    from anatomask_lab.runs import LOCK_FILE

    out = tmp_path / "run"
    rc = main(["pretrain", "--preset", "tiny", "--backend", "spconv", "--data", str(tiny_dataset),
               "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and 'pip install "anatomask-lab[spconv]"' in err
    assert not out.exists() or {p.name for p in out.iterdir()} <= {LOCK_FILE}  # no config, no checkpoint


# -- the wheel ----------------------------------------------------------------------------------------------------


def test_wheel_ships_the_notebooks_and_the_course_runs_from_it(tmp_path):
    src = tmp_path / "src"
    for name in ("anatomask_lab", "notebooks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("anatomask_lab-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        zf.extractall(tmp_path / "site")
    shipped = [n for n in names if n.startswith("anatomask_lab/notebooks/") and not n.endswith("/")]
    assert sorted(n.rsplit("/", 1)[1] for n in shipped) == NOTEBOOKS
    assert not [n for n in names if n.startswith("notebooks/")]
    assert "License-Expression: Apache-2.0" in meta and "anatomask-lab = anatomask_lab.cli:main" in entry_points
    runtime = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert runtime and not [line for line in runtime if "==" in line.split(";")[0] or "spconv" in line]

    # the installed package, run from outside the checkout, finds its own notebooks
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, anatomask_lab; from anatomask_lab.cli import main; print(anatomask_lab.__file__); "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    res = subprocess.run([sys.executable, "-c", code, "course", "--out", "handout"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    site = str((tmp_path / "site").resolve())
    assert res.stdout.splitlines()[0].startswith(site)
    assert f"from {site}/anatomask_lab/notebooks" in res.stdout
    handout = sorted(p.name for p in (elsewhere / "handout").glob("*.ipynb"))
    assert handout == NOTEBOOKS
    cells = json.loads((elsewhere / "handout" / NOTEBOOKS[0]).read_text())["cells"]
    assert not [c for c in cells if "solution" in c.get("metadata", {}).get("tags", [])]


def test_notebooks_dir_is_the_checkout_here():
    from anatomask_lab.course import notebooks_dir

    assert notebooks_dir() == ROOT / "notebooks"


def test_cli_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "anatomask_lab.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: anatomask-lab" in out
    for command in ("phantom", "prepare", "pretrain", "export", "finetune", "predict", "evaluate", "demo", "bench"):
        assert command in out
