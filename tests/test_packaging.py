"""The Python versions setup.cfg admits are ones the code and its pins can run on."""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def lowest_admitted_python() -> Version:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    match = re.fullmatch(r">=\s*(\d+\.\d+)", config["options"]["python_requires"].strip())
    assert match, "python_requires should be a plain lower bound"
    return Version(match.group(1))


def pinned() -> list[str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return [line.split("==")[0] for line in lines if "==" in line and not line.startswith("#")]


def test_the_code_runs_on_the_lowest_admitted_python():
    # smoothing/runner.py uses datetime.UTC, new in Python 3.11
    assert lowest_admitted_python() >= Version("3.11")


@pytest.mark.parametrize("name", pinned())
def test_every_installed_pin_supports_the_lowest_admitted_python(name):
    try:
        requires = metadata.metadata(name).get("Requires-Python")
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed here")
    if requires:
        lowest = lowest_admitted_python()
        assert SpecifierSet(requires).contains(Version(f"{lowest}.0")), (
            f"{name} needs Python {requires}; setup.cfg admits {lowest}"
        )
