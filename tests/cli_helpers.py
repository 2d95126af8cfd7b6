"""What the tests share to run a command and read what it wrote: one `invoke`, one `rows`, one
`sidecar`, so that every test reads a result file the way the others do."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result


def invoke(command: click.Command, *args: object, catch_exceptions: bool = False) -> Result:
    """Run `command` with `args` (each passed as `str`) in click's test runner.

    An exception escapes to pytest with its traceback unless `catch_exceptions` is set, which
    turns it into `result.exception` and exit code 1 the way click's runner does by default.
    """
    return CliRunner().invoke(command, [str(arg) for arg in args],
                              catch_exceptions=catch_exceptions)


def rows(stem: Path, *, without_time: bool = False) -> list[dict[str, str]]:
    """The rows of the file `STEM.tsv` (a result file, a loss log), each a dict from column
    name to its text.

    `without_time` leaves out the wall-clock `time` column, the one column two runs of the same
    command do not share.
    """
    header, *lines = stem.with_name(stem.name + ".tsv").read_text().splitlines()
    names = header.split("\t")
    table = [dict(zip(names, line.split("\t"), strict=True)) for line in lines]
    if without_time:
        table = [{name: value for name, value in row.items() if name != "time"} for row in table]
    return table


def sidecar(stem: Path) -> dict:
    """The JSON record `STEM.json` written next to the result file."""
    return json.loads(stem.with_name(stem.name + ".json").read_text())


@contextlib.contextmanager
def certify_interrupted_at(monkeypatch: pytest.MonkeyPatch, call: int) -> Iterator[None]:
    """`Smooth.certify` raises KeyboardInterrupt (a Ctrl-C) at its `call`-th call, inside."""
    from smoothing.core import Smooth

    original, calls = Smooth.certify, {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Smooth, "certify", interrupted)
        yield
