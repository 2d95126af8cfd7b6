"""Certify or predict over a dataset, one result row per example, resumable.

A run writes `NAME.tsv` (Cohen et al.'s columns, one row per example, flushed
as soon as it is known) and `NAME.json` (settings, versions, seed, times).
The result of example i depends only on (seed, i, settings, batch size): its
noise comes from a generator seeded by `example_seed(seed, i)`, so a run can be
interrupted, resumed or split over processes without changing any row.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from smoothing.core import Smooth

Mode = Literal["certify", "predict"]

COLUMNS: dict[str, tuple[str, ...]] = {
    "certify": ("idx", "label", "predict", "radius", "correct", "time"),
    # Cohen's predict columns, then the base classifier's clean prediction, which
    # seed 004 (App. A.3) uses to score abstentions for empirical clean accuracy.
    "predict": ("idx", "label", "predict", "correct", "time", "base_predict", "clean_correct"),
}

# Radii are written rounded DOWN to this many decimals: a written certificate
# must never claim more than the computed one.
RADIUS_DECIMALS = 6


class ResultFileError(ValueError):
    """The result files cannot be used as asked (other settings, unwritable, malformed)."""


def example_seed(seed: int, index: int) -> int:
    """The one seeding rule: a 64-bit seed for example `index` of a run seeded with `seed`."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def example_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(example_seed(seed, index))
    return generator


def floor_radius(radius: float) -> str:
    scale = 10**RADIUS_DECIMALS
    return f"{math.floor(radius * scale) / scale:.{RADIUS_DECIMALS}f}"


def select_indices(
    dataset_size: int, start: int = 0, skip: int = 1, max_examples: int | None = None
) -> list[int]:
    """Examples start, start + skip, ... of the dataset, at most `max_examples` of them."""
    if start < 0 or skip < 1 or (max_examples is not None and max_examples < 1):
        raise ValueError("need start >= 0, skip >= 1 and max >= 1")
    if start >= dataset_size:
        raise ValueError(f"start={start} is past the end of the dataset ({dataset_size} examples)")
    indices = list(range(start, dataset_size, skip))
    return indices if max_examples is None else indices[:max_examples]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("robustify", "torch", "numpy", "scipy", "statsmodels"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON, so a rerun compares like with like."""
    return json.loads(json.dumps(settings, sort_keys=True))


@dataclass
class ResultFile:
    """A TSV of result rows plus its JSON sidecar, opened for appending.

    `settings` are everything that decides a row's values; a rerun with equal
    settings resumes, with other settings it refuses unless `overwrite`.
    """

    stem: Path
    mode: Mode
    settings: dict[str, Any]
    overwrite: bool = False
    done: dict[int, dict[str, str]] = field(default_factory=dict, init=False)

    @property
    def tsv(self) -> Path:
        # with_name, not with_suffix: a stem such as "sigma0.25" has a dot of its own
        return self.stem.with_name(self.stem.name + ".tsv")

    @property
    def sidecar(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    def open(self, extra: dict[str, Any]) -> None:
        """Check the folder, then start fresh, resume, or refuse. Changes nothing when refusing."""
        self.settings = _canonical(self.settings)
        folder = self.stem.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ResultFileError(f"cannot create output folder {folder}: {error}") from error
        if not os.access(folder, os.W_OK):
            raise ResultFileError(f"output folder {folder} is not writable")

        exists = self.tsv.exists() or self.sidecar.exists()
        if exists and not self.overwrite:
            self._check_resumable()
            self.done = self._read_done_rows()
            record = json.loads(self.sidecar.read_text())
            record.setdefault("resumed", []).append(_now())
        else:
            record = {"started": _now(), "resumed": []}
        record.update(
            mode=self.mode, settings=self.settings, versions=package_versions(),
            command=sys.argv, finished=None, **extra,
        )
        if not exists or self.overwrite:
            self.tsv.write_text("\t".join(COLUMNS[self.mode]) + "\n")
        self._write_sidecar(record)
        self._record = record
        self._handle = self.tsv.open("a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        self._handle.write("\t".join(str(row[c]) for c in COLUMNS[self.mode]) + "\n")
        self._handle.flush()
        self.done[int(row["idx"])] = {c: str(row[c]) for c in COLUMNS[self.mode]}

    def close(self, finished: bool) -> None:
        self._handle.close()
        if finished:
            self._record["finished"] = _now()
        self._record["rows"] = len(self.done)
        self._write_sidecar(self._record)

    def _check_resumable(self) -> None:
        if not self.sidecar.exists():
            raise ResultFileError(
                f"{self.tsv} exists without its settings file {self.sidecar.name}; "
                "refusing to append to results of unknown settings (use --overwrite to replace)"
            )
        try:
            previous = json.loads(self.sidecar.read_text())
        except json.JSONDecodeError as error:
            raise ResultFileError(f"{self.sidecar} is not valid JSON: {error}") from error
        old = previous.get("settings", {})
        if previous.get("mode") != self.mode:
            raise ResultFileError(
                f"{self.tsv} holds {previous.get('mode')!r} results, not {self.mode!r}; "
                "choose another --out or pass --overwrite"
            )
        if old != self.settings:
            keys = sorted(set(old) | set(self.settings))
            changed = [
                f"{k}: {old.get(k, '<unset>')!r} -> {self.settings.get(k, '<unset>')!r}"
                for k in keys if old.get(k) != self.settings.get(k)
            ]
            raise ResultFileError(
                f"{self.tsv} was made with other settings ({'; '.join(changed)}); "
                "nothing was changed. Use another --out, or --overwrite to replace it."
            )

    def _read_done_rows(self) -> dict[int, dict[str, str]]:
        if not self.tsv.exists():
            self.tsv.write_text("\t".join(COLUMNS[self.mode]) + "\n")
            return {}
        raw = self.tsv.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        lines = complete.decode("utf-8").splitlines()
        if not lines or tuple(lines[0].split("\t")) != COLUMNS[self.mode]:
            raise ResultFileError(f"{self.tsv} does not start with the header of a {self.mode} run")
        rows = {}
        for number, line in enumerate(lines[1:], start=2):
            values = line.split("\t")
            if len(values) != len(COLUMNS[self.mode]):
                raise ResultFileError(f"{self.tsv}, line {number}: malformed row {line!r}")
            row = dict(zip(COLUMNS[self.mode], values, strict=True))
            rows[int(row["idx"])] = row
        if len(complete) != len(raw):
            # the process died mid-line: drop the partial row, it is recomputed
            with self.tsv.open("r+b") as handle:
                handle.truncate(len(complete))
        return rows

    def _write_sidecar(self, record: dict[str, Any]) -> None:
        temporary = self.sidecar.with_name(self.sidecar.name + ".tmp")
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        temporary.replace(self.sidecar)


@dataclass
class RunSettings:
    """What a certify/predict run over a dataset needs beyond the model and the data."""

    mode: Mode
    n: int
    alpha: float
    batch_size: int
    seed: int = 0
    n0: int = 100
    device: str = "cpu"


def run(
    smooth: Smooth,
    dataset: Sequence[tuple[torch.Tensor, int]],
    indices: Sequence[int],
    results: ResultFile,
    settings: RunSettings,
    extra_record: dict[str, Any] | None = None,
    progress: bool = True,
) -> ResultFile:
    """Certify or predict every example in `indices` not already in `results`."""
    results.open(extra_record or {})
    todo = [i for i in indices if i not in results.done]
    wanted = set(indices)
    correct = sum(int(r["correct"]) for i, r in results.done.items() if i in wanted)
    processed = len(indices) - len(todo)
    finished = False
    bar = tqdm(
        total=len(indices), initial=processed, unit="img",
        desc=settings.mode, disable=not progress, dynamic_ncols=True,
    )
    try:
        for index in todo:
            row = _one_example(smooth, dataset, index, settings)
            results.append(row)
            correct += int(row["correct"])
            processed += 1
            bar.update(1)
            bar.set_postfix_str(
                f"{'certified' if settings.mode == 'certify' else 'smoothed'} acc "
                f"{correct / processed:.3f}",
                refresh=False,  # the bar redraws at its own pace, not once per image
            )
        finished = True
    finally:
        bar.close()
        results.close(finished)
    return results


def _one_example(
    smooth: Smooth, dataset: Sequence[tuple[torch.Tensor, int]], index: int, settings: RunSettings
) -> dict[str, Any]:
    image, label = dataset[index]
    x = image.to(settings.device)
    generator = example_generator(settings.seed, index, settings.device)
    started = time.perf_counter()
    if settings.mode == "certify":
        prediction, radius = smooth.certify(
            x, settings.n0, settings.n, settings.alpha, settings.batch_size, generator
        )
        row = {"radius": floor_radius(radius)}
    else:
        prediction = smooth.predict(x, settings.n, settings.alpha, settings.batch_size, generator)
        base_prediction = smooth.base_predict(x)
        scored = base_prediction if prediction == Smooth.ABSTAIN else prediction
        row = {"base_predict": base_prediction, "clean_correct": int(scored == label)}
    elapsed = time.perf_counter() - started
    row.update(
        idx=index, label=int(label), predict=prediction, correct=int(prediction == label),
        time=f"{elapsed:.3f}",
    )
    return row
