"""The install story: environment.yml follows pyproject.toml, the CLI lists its subcommands."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_every_runtime_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = (ROOT / "environment.yml").read_text().lower()
    listed = set(re.findall(r"^\s*-\s*([a-z0-9_.\-]+)\s*[=<>]", env, flags=re.M))
    conda_names = {"torch": "pytorch"}
    missing = []
    for dep in deps:
        name = _name(dep)
        if name.startswith("spconv-") and "python_version >= '3.12'" in dep:
            continue  # environment.yml pins Python 3.11, which takes the cu120 build
        if conda_names.get(name, name) not in listed:
            missing.append(name)
    assert not missing, f"runtime dependencies missing from environment.yml: {missing}"


def test_pinned_versions_agree():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = (ROOT / "environment.yml").read_text().lower()
    for dep in deps:
        m = re.match(r"([a-z0-9_.\-]+)==([0-9.]+)", dep.lower())
        if m and "python_version >= '3.12'" not in dep:
            name, version = m.groups()
            assert re.search(rf"{re.escape(name)}\s*==?\s*{re.escape(version)}\b", env), (name, version)


def test_cli_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "anatomask_lab.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: anatomask-lab" in out
    for command in ("phantom", "prepare", "pretrain", "export", "finetune", "predict", "evaluate", "demo", "bench"):
        assert command in out
