"""pyproject.toml and the requirements files describe the same package (the README installs from the latter)."""
import importlib
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def requirements(name: str) -> set[str]:
    out = set()
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out |= requirements(line[3:].strip())
        elif line:
            out.add(line.replace(" ", ""))
    return out


def test_dependencies_match_the_requirements_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["dependencies"]) == requirements("requirements.txt")
    extras = project["optional-dependencies"]
    assert set(extras["library"]) == requirements("requirements-library.txt")
    assert set(extras["ray"]) == requirements("requirements-ray.txt")
    assert set(extras["eval"]) == requirements("requirements-eval.txt")
    assert set(extras["serve"]) == requirements("requirements-serve.txt")
    assert set(extras["serve-ray"]) == requirements("requirements-serve-ray.txt")
    assert set(extras["train"]) == requirements("requirements-train.txt")
    assert set(extras["dev"]) | requirements("requirements.txt") == requirements("requirements-dev.txt")


def test_console_script_is_the_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, _, name = project["scripts"]["mucodec"].partition(":")
    from mucodec import cli

    assert getattr(importlib.import_module(module), name) is cli.cli
