"""Certify or predict over a dataset, one result row per example, resumable.

A run writes `NAME.tsv` (Cohen et al.'s columns, one row per example, flushed
as soon as it is known) and `NAME.json` (settings, versions, seed, times).
The result of example i depends only on (seed, i, settings, batch size): its
noise comes from a generator seeded by `example_seed(seed, i)`, so a run can be
interrupted, resumed or split over processes (one NAME each: a writer holds
`NAME.lock` and a second one is refused) without changing any row.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from smoothing import sequential, stats
from smoothing.core import Smooth
from smoothing.noise import NOISE_SAMPLER
from smoothing.packing import base_predictions, packed_counts

try:
    import fcntl
except ImportError:  # Windows: no flock; results are not locked there
    fcntl = None

Mode = Literal["certify", "predict", "attack"]

COLUMNS: dict[str, tuple[str, ...]] = {
    "certify": ("idx", "label", "predict", "radius", "correct", "time"),
    # Cohen's predict columns, then the base classifier's clean prediction, which
    # seed 004 (App. A.3) uses to score abstentions for empirical clean accuracy.
    "predict": ("idx", "label", "predict", "correct", "time", "base_predict", "clean_correct"),
    # The decision on the attacked input, the same decision on the clean input (seed 004's
    # clean accuracy), and the perturbation's norms rounded UP (see smoothing.attack_runner).
    "attack": ("idx", "label", "predict", "correct", "time", "clean_predict", "clean_correct",
               "l2", "linf"),
}

# Radii are written rounded DOWN to this many decimals: a written certificate
# must never claim more than the computed one.
RADIUS_DECIMALS = 6


class ResultFileError(ValueError):
    """The result files cannot be used as asked (other settings, unwritable, malformed)."""


# The streams of one example's randomness, each its own generator (see example_seed).
STREAM_CLEAN, STREAM_ATTACK, STREAM_ADVERSARIAL, STREAM_DEFENSE = 0, 1, 2, 3


def example_seed(seed: int, index: int, stream: int = 0) -> int:
    """The one seeding rule: a 64-bit seed for example `index` of a run seeded with `seed`.

    `stream` separates independent uses of randomness within one example: 0 is the
    evaluation of the clean input (certify, predict, and an attack file's clean columns),
    1 the attack's own randomness, 2 PREDICT on the attacked input, 3 a random defense's
    randomness. Stream 0 is SeedSequence([seed, index]), the rule from before streams
    existed, so certify and predict results are unchanged; stream s > 0 is
    SeedSequence([seed, index, s]). All must be integers >= 0 (numpy's SeedSequence takes
    non-negative entropy only)."""
    if seed < 0 or index < 0 or stream < 0:
        raise ValueError(
            f"seed, index and stream must be >= 0, got seed={seed}, index={index}, "
            f"stream={stream}"
        )
    entropy = [seed, index] if stream == 0 else [seed, index, stream]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def example_generator(
    seed: int, index: int, device: torch.device | str, stream: int = 0
) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(example_seed(seed, index, stream))
    return generator


class ForwardPassCounter:
    """How many inputs a module has evaluated: the batch sizes of its forward calls, summed.

    A forward hook, so that every path calling the model counts (noisy batches, the clean
    input, an attack's gradient steps) without each caller keeping its own tally. Inner
    modules are not hooked: a denoise-then-classify model counts one per image.
    """

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self._handle = module.register_forward_hook(self._add)

    def _add(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.count += int(args[0].shape[0])

    def __enter__(self) -> ForwardPassCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()


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


# The libraries of the engine; callers that load models add theirs (see ResultFile.packages).
ENGINE_PACKAGES: tuple[str, ...] = ("robustify", "torch", "numpy", "scipy", "statsmodels")


def package_versions(names: Sequence[str] = ENGINE_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
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


class ResultLock:
    """An exclusive lock on one result, held from `ResultFile.open` to `close`.

    flock on `NAME.lock`: the kernel releases it when the holder exits, killed or not, so a
    crashed run never blocks the next one. The lock file names its holder (pid, host, start
    time) for the refusal message and is removed on release. flock is POSIX only; where
    `fcntl` is missing (Windows) results are not locked.
    """

    def __init__(self, path: Path, what: Path):
        self.path, self.what = path, what
        self._handle: Any = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            handle = self.path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise ResultFileError(
                    f"{self.what} is being written by another process "
                    f"({holder}); nothing was changed. Wait for it, or use another --out "
                    "(parallel shards need one --out each)."
                ) from None
            # The holder we raced with may have removed the file after we opened it: a lock
            # on a removed file protects nothing, so try again on the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {_now()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        # Removed while still held, so no other process can lock the file being removed.
        self.path.unlink(missing_ok=True)
        self._handle.close()
        self._handle = None


@dataclass
class ResultFile:
    """A TSV of result rows plus its JSON sidecar, opened for appending.

    `settings` are everything that decides a row's values; a rerun with equal
    settings resumes, with other settings it refuses unless `overwrite`.
    `packages` are the libraries whose versions the sidecar records; `environment`
    (e.g. device name, code commit) is recorded beside them in `versions_history`.
    Nothing is written before the first row (or a finished run with no row left to
    compute), so a run that fails early leaves the files as they were.
    """

    stem: Path
    mode: Mode
    settings: dict[str, Any]
    overwrite: bool = False
    packages: Sequence[str] = ENGINE_PACKAGES
    environment: dict[str, Any] = field(default_factory=dict)
    done: dict[int, dict[str, str]] = field(default_factory=dict, init=False)
    # Base-classifier evaluations per row, written with the sidecar (at close and on each
    # skip): a row of a process killed in between has no count and is reported uncounted.
    forward_passes: dict[int, int] = field(default_factory=dict, init=False)

    @property
    def tsv(self) -> Path:
        # with_name, not with_suffix: a stem such as "sigma0.25" has a dot of its own
        return self.stem.with_name(self.stem.name + ".tsv")

    @property
    def sidecar(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    @property
    def lock_file(self) -> Path:
        return self.stem.with_name(self.stem.name + ".lock")

    def open(self, extra: dict[str, Any]) -> None:
        """Lock, check, then start fresh, resume, or refuse. Changes nothing when refusing."""
        # The sampler decides every row's noise: rows of another one are not this run.
        self.settings = _canonical({"noise": NOISE_SAMPLER, **self.settings})
        folder = self.stem.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ResultFileError(f"cannot create output folder {folder}: {error}") from error
        if not os.access(folder, os.W_OK):
            raise ResultFileError(f"output folder {folder} is not writable")
        self._lock = ResultLock(self.lock_file, self.tsv)
        self._lock.acquire()
        try:
            self._prepare(extra)
        except BaseException:
            self._lock.release()
            raise

    def _prepare(self, extra: dict[str, Any]) -> None:
        if self.tsv.exists():
            # Opened for appending, which writes nothing: os.access would pass for root even
            # where the write then fails (an immutable file, a read-only mount).
            try:
                self.tsv.open("ab").close()
            except OSError as error:
                raise ResultFileError(
                    f"{self.tsv} is not writable ({error.strerror}); nothing was changed"
                ) from error
        versions = package_versions(self.packages)
        exists = self.tsv.exists() or self.sidecar.exists()
        self._fresh = not exists or self.overwrite
        self._truncate_to: int | None = None
        if self._fresh:
            record = {"started": _now(), "resumed": [], "versions_history": []}
        else:
            previous = self._check_resumable(versions)
            self.done = self._read_done_rows()
            self.forward_passes = {
                int(index): int(count)
                for index, count in previous.get("forward_passes_by_row", {}).items()
                if int(index) in self.done
            }
            record = previous
            record.setdefault("resumed", []).append(_now())
            record.setdefault("versions_history", [])
            if not record["versions_history"] and "versions" in previous:
                # a file written before the history was kept: its versions start the history
                record["versions_history"].append(
                    {"time": previous.get("started"), "versions": previous["versions"]}
                )
        record["versions_history"].append(
            {"time": _now(), "versions": versions, **self.environment}
        )
        record.update(
            mode=self.mode, settings=self.settings, versions=versions,
            command=sys.argv, finished=None, **self.environment, **extra,
        )
        self._record = record
        self._handle = None

    def _write_files(self) -> None:
        """The deferred writes of `open`: header (fresh run), dropped partial row, sidecar."""
        if self._fresh or not self.tsv.exists():
            self.tsv.write_text("\t".join(COLUMNS[self.mode]) + "\n")
        elif self._truncate_to is not None:
            # the process died mid-line: drop the partial row, it is recomputed
            with self.tsv.open("r+b") as handle:
                handle.truncate(self._truncate_to)
        self._write_sidecar(self._record)
        self._handle = self.tsv.open("a", encoding="utf-8")

    def append(self, row: dict[str, Any], forward_passes: int | None = None) -> None:
        """Write one row; `forward_passes` is the number of base-classifier evaluations
        that computed it (None: not counted)."""
        if self._handle is None:
            self._write_files()
        self._handle.write("\t".join(str(row[c]) for c in COLUMNS[self.mode]) + "\n")
        self._handle.flush()
        self.done[int(row["idx"])] = {c: str(row[c]) for c in COLUMNS[self.mode]}
        if forward_passes is not None:
            self.forward_passes[int(row["idx"])] = int(forward_passes)
        # skipped by an earlier run, readable now: no longer skipped
        self._record.get("skipped", {}).pop(str(row["idx"]), None)

    @property
    def skipped(self) -> dict[str, str]:
        """Index (as text) -> why, of the examples skipped by this run or earlier ones."""
        return dict(getattr(self, "_record", {}).get("skipped", {}))

    def skip(self, index: int, reason: str) -> None:
        """Record in the sidecar that example `index` was skipped (it gets no row), and why.

        A rerun tries it again: skipped again, it is recorded again, the same way.
        """
        if self._handle is None:
            self._write_files()
        self._record.setdefault("skipped", {})[str(index)] = reason
        self._count_forward_passes()
        self._write_sidecar(self._record)

    def close(self, finished: bool) -> None:
        try:
            if self._handle is None and not finished:
                return  # failed before its first row: the files stay as they were
            if self._handle is None:
                self._write_files()  # resumed with every row already done
            self._handle.close()
            if finished:
                self._record["finished"] = _now()
            self._record["rows"] = len(self.done)
            self._count_forward_passes()
            self._write_sidecar(self._record)
        finally:
            self._lock.release()

    def _count_forward_passes(self) -> None:
        """The sidecar's `forward_passes`: base-classifier evaluations of the rows in the
        TSV, summed over every run that wrote them; rows without a count (written by a
        process killed before its sidecar was, or by a version that did not count) are
        left out and numbered in `forward_passes_uncounted_rows`."""
        counted = {i: c for i, c in self.forward_passes.items() if i in self.done}
        self._record["forward_passes"] = sum(counted.values())
        self._record["forward_passes_uncounted_rows"] = len(self.done) - len(counted)
        self._record["forward_passes_by_row"] = {str(i): counted[i] for i in sorted(counted)}

    def _check_resumable(self, versions: dict[str, str]) -> dict[str, Any]:
        """The previous sidecar, if its results may be extended by this run."""
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
        # Another torch draws other noise from the same seed: its rows and ours would not be
        # one reproducible run.
        old_torch = previous.get("versions", {}).get("torch")
        if old_torch is not None and old_torch != versions.get("torch"):
            raise ResultFileError(
                f"{self.tsv} was made with torch {old_torch}, this is torch "
                f"{versions.get('torch')}: its noise differs; nothing was changed. "
                "Use another --out, or --overwrite to replace it."
            )
        return previous

    def _read_done_rows(self) -> dict[int, dict[str, str]]:
        if not self.tsv.exists():
            return {}
        raw = self.tsv.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        lines = complete.decode("utf-8").splitlines()
        if not lines or tuple(lines[0].split("\t")) != COLUMNS[self.mode]:
            raise ResultFileError(f"{self.tsv} does not start with the header of a {self.mode} run")
        rows: dict[int, dict[str, str]] = {}
        first_line: dict[int, int] = {}
        for number, line in enumerate(lines[1:], start=2):
            values = line.split("\t")
            if len(values) != len(COLUMNS[self.mode]):
                raise ResultFileError(f"{self.tsv}, line {number}: malformed row {line!r}")
            row = dict(zip(COLUMNS[self.mode], values, strict=True))
            index = int(row["idx"])
            if index in rows:
                raise ResultFileError(
                    f"{self.tsv}, line {number}: idx {index} already appears on line "
                    f"{first_line[index]}; a result must hold each example once "
                    "(nothing was changed; --overwrite replaces the file)"
                )
            rows[index], first_line[index] = row, number
        if len(complete) != len(raw):
            self._truncate_to = len(complete)
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
    # certify only: skip the n estimation draws of an example whose guess is not its label
    early_exit: bool = False
    # certify only: certify at these radii sequentially (smoothing.sequential); None: CERTIFY
    radii: tuple[float, ...] | None = None
    looks: int = sequential.LOOKS
    futility: float = sequential.FUTILITY
    # fill each forward pass with the draws of several examples (smoothing.packing); each
    # example's draws are those of the per-example loop, so its row is too (up to
    # batch-size dependent rounding of the model, see docs/scale.md)
    pack: bool = False

    def examples_per_pass(self) -> int:
        """How many examples share the passes of a group: as many as all their draws fill
        one --batch, so a crash loses at most a pass of work; 1 where packing cannot help."""
        if not self.pack or self.early_exit or self.radii is not None:
            return 1
        draws = self.n if self.mode == "predict" else self.n0 + self.n
        return max(1, self.batch_size // draws)

    def __post_init__(self) -> None:
        # refused before any file is touched, not at the first example
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.mode != "certify" and (self.early_exit or self.radii is not None):
            raise ValueError("early exit and sequential certification apply to certify only")
        if self.radii is not None:
            self.radii = sequential.check_radii(self.radii)
            sequential.design(self.n, self.alpha, (), self.looks, self.futility)  # checks them


def run(
    smooth: Smooth,
    dataset: Sequence[tuple[torch.Tensor, int]],
    indices: Sequence[int],
    results: ResultFile,
    settings: RunSettings,
    extra_record: dict[str, Any] | None = None,
    progress: bool = True,
    skip_errors: tuple[type[Exception], ...] = (),
) -> ResultFile:
    """Certify or predict every example in `indices` not already in `results`.

    An example whose computation raises one of `skip_errors` (e.g. an unreadable image)
    gets no row; its index and the error are recorded in the sidecar's `skipped`.
    """
    accuracy = "certified acc" if settings.mode == "certify" else "smoothed acc"
    counted = isinstance(smooth.base_classifier, torch.nn.Module)  # a plain callable: not
    with ForwardPassCounter(smooth.base_classifier) if counted else contextlib.nullcontext() \
            as counter:
        compute_row: Callable[[int], dict[str, Any]]
        if settings.examples_per_pass() > 1:
            compute_row = _PackedRows(smooth, dataset, indices, results, settings,
                                      counter if counted else None)
        else:
            def compute_row(index: int) -> dict[str, Any]:
                return _one_example(smooth, dataset, index, settings)
        return run_rows(
            compute_row, indices, results,
            extra_record=extra_record, progress=progress, skip_errors=skip_errors,
            description=settings.mode, accuracy_name=accuracy,
            forward_passes=(lambda: counter.count) if counted else None,
        )


def run_rows(
    compute_row: Callable[[int], dict[str, Any]],
    indices: Sequence[int],
    results: ResultFile,
    *,
    extra_record: dict[str, Any] | None = None,
    progress: bool = True,
    skip_errors: tuple[type[Exception], ...] = (),
    description: str = "run",
    accuracy_name: str = "acc",
    forward_passes: Callable[[], int] | None = None,
) -> ResultFile:
    """The dataset loop of every mode: open `results`, compute and append the row of each
    index not already done, skip what raises one of `skip_errors`, close.

    `compute_row(index)` returns the row's columns (`correct` among them, for the bar).
    `forward_passes()`, when given, is a running count of base-classifier evaluations
    (`ForwardPassCounter`): each row is credited with what its computation added.
    """
    results.open(extra_record or {})
    todo = [i for i in indices if i not in results.done]
    wanted = set(indices)
    correct = sum(int(r["correct"]) for i, r in results.done.items() if i in wanted)
    processed = len(indices) - len(todo)
    finished = False
    bar = tqdm(
        total=len(indices), initial=processed, unit="img",
        desc=description, disable=not progress, dynamic_ncols=True,
    )
    try:
        for index in todo:
            passes_before = forward_passes() if forward_passes is not None else 0
            try:
                row = compute_row(index)
            except skip_errors as error:
                results.skip(index, str(error))
                bar.update(1)
                continue
            # a packed row brings its own count (its group's passes are shared)
            passes = row.pop("forward_passes", None)
            if passes is None and forward_passes is not None:
                passes = forward_passes() - passes_before
            results.append(row, passes)
            correct += int(row["correct"])
            processed += 1
            bar.update(1)
            bar.set_postfix_str(
                f"{accuracy_name} {correct / processed:.3f}",
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
    radius = base_prediction = None
    if settings.mode == "certify":
        prediction, radius = _certify(smooth, x, int(label), settings, generator)
    else:
        prediction = smooth.predict(x, settings.n, settings.alpha, settings.batch_size, generator)
        base_prediction = smooth.base_predict(x)
    return _row(index, int(label), prediction, time.perf_counter() - started, radius,
                base_prediction)


def _row(
    index: int, label: int, prediction: int, elapsed: float, radius: float | None = None,
    base_prediction: int | None = None,
) -> dict[str, Any]:
    """A certify row (give `radius`) or a predict row (give `base_prediction`)."""
    if radius is not None:
        row: dict[str, Any] = {"radius": floor_radius(radius)}
    else:
        # seed 004, App. A.3: an abstention is scored by the base classifier's clean answer
        scored = base_prediction if prediction == Smooth.ABSTAIN else prediction
        row = {"base_predict": base_prediction, "clean_correct": int(scored == label)}
    row.update(idx=index, label=label, predict=prediction, correct=int(prediction == label),
               time=f"{elapsed:.3f}")
    return row


class _PackedRows:
    """`compute_row` for `run_rows` that computes the next examples' rows together.

    Asked for the row of `index`, it computes those of `index` and of the examples after
    it in `indices` that are still to do, as many as `settings.examples_per_pass()`,
    through `packed_counts`: each example's draws come from its own generator in the
    order of the per-example loop (CERTIFY: n0 selection, then n estimation draws), so
    its row is the per-example row. An example that fails to load, or a group whose
    images differ in shape, is computed (or fails) on its own, at its turn.
    """

    def __init__(
        self, smooth: Smooth, dataset: Sequence[tuple[torch.Tensor, int]],
        indices: Sequence[int], results: ResultFile, settings: RunSettings,
        counter: ForwardPassCounter | None,
    ):
        self.smooth, self.dataset, self.settings = smooth, dataset, settings
        self.results, self.counter = results, counter
        self.indices = list(indices)
        self.position = {index: k for k, index in enumerate(self.indices)}
        self.ready: dict[int, dict[str, Any] | Exception] = {}

    def __call__(self, index: int) -> dict[str, Any]:
        if index not in self.ready:
            self._compute_group(index)
        outcome = self.ready.pop(index)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _group(self, index: int) -> list[int]:
        size = self.settings.examples_per_pass()
        group = []
        for candidate in itertools.islice(self.indices, self.position[index], None):
            if candidate not in self.results.done and candidate not in self.ready:
                group.append(candidate)
            if len(group) == size:
                break
        return group

    def _compute_group(self, index: int) -> None:
        settings, smooth = self.settings, self.smooth
        loaded = []
        for candidate in self._group(index):
            try:
                image, label = self.dataset[candidate]
            except Exception as error:  # raised at its turn, as the per-example loop would
                self.ready[candidate] = error
                continue
            loaded.append((candidate, image.to(settings.device), int(label)))
        if len({tuple(x.shape) for _, x, _ in loaded}) > 1:
            for candidate, _, _ in loaded:
                self.ready[candidate] = _one_example(smooth, self.dataset, candidate, settings)
            return
        if not loaded:
            return
        started = time.perf_counter()
        before = self.counter.count if self.counter is not None else 0
        generators = [example_generator(settings.seed, i, settings.device) for i, _, _ in loaded]
        images = [x for _, x, _ in loaded]
        if settings.mode == "certify":
            requests = [(x, settings.n0, g) for x, g in zip(images, generators, strict=True)]
            requests += [(x, settings.n, g) for x, g in zip(images, generators, strict=True)]
            counts = [c.cpu().numpy() for c in packed_counts(smooth, requests, settings.batch_size)]
            per_example = settings.n0 + settings.n
        else:
            requests = [(x, settings.n, g) for x, g in zip(images, generators, strict=True)]
            counts = [c.cpu().numpy() for c in packed_counts(smooth, requests, settings.batch_size)]
            base = base_predictions(smooth, images)
            per_example = settings.n + 1
        if self.counter is not None and self.counter.count - before != per_example * len(loaded):
            raise RuntimeError(  # the hook disagrees with the draws made: a bug, not input
                f"packed forward passes: counted {self.counter.count - before}, expected "
                f"{per_example * len(loaded)}"
            )
        elapsed = (time.perf_counter() - started) / len(loaded)
        for k, (candidate, _, label) in enumerate(loaded):
            if settings.mode == "certify":
                prediction, radius = stats.certify_from_counts(
                    counts[k], counts[len(loaded) + k], settings.alpha, smooth.sigma
                )
                row = _row(candidate, label, prediction, elapsed, radius=radius)
            else:
                prediction = stats.predict_from_counts(counts[k], settings.alpha)
                row = _row(candidate, label, prediction, elapsed, base_prediction=base[k])
            row["forward_passes"] = per_example if self.counter is not None else None
            self.ready[candidate] = row


def _certify(
    smooth: Smooth, x: torch.Tensor, label: int, settings: RunSettings,
    generator: torch.Generator,
) -> tuple[int, float]:
    """CERTIFY, or its sequential form at a grid of radii, with the label-aware early exit.

    The selection and estimation draws come from the example's one generator in that
    order, as in `Smooth.certify`: stopping after the selection draws changes no other row
    (each example has its own generator), and a row that does not stop is the same as
    without early exit.
    """
    if not settings.early_exit and settings.radii is None:
        return smooth.certify(
            x, settings.n0, settings.n, settings.alpha, settings.batch_size, generator
        )
    if settings.radii is not None:
        # the sequential form evaluates only the selection draws that can change the guess
        guess, _ = smooth.guess(x, settings.n0, settings.batch_size, generator)
    else:
        selection = smooth.sample_counts(x, settings.n0, settings.batch_size, generator)
        guess = int(np.argmax(selection.cpu().numpy()))  # ties to the lowest index
    if settings.early_exit and guess != label:
        # Not certified whatever the estimation draws say: CERTIFY would return the guess
        # (wrong) or abstain, correct = 0 and no radius counted either way. Written with the
        # guess and radius 0; with early exit, predict outside {label, -1} marks such a row.
        return guess, 0.0
    if settings.radii is not None:
        certificate = sequential.certify_guess_at_radii(
            smooth, x, guess, settings.n, settings.alpha, settings.batch_size, settings.radii,
            generator, settings.looks, settings.futility,
        )
        return certificate.prediction, certificate.radius
    estimation = smooth.sample_counts(x, settings.n, settings.batch_size, generator)
    return stats.certify_from_counts(
        selection.cpu().numpy(), estimation.cpu().numpy(), settings.alpha, smooth.sigma
    )
