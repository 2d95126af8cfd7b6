"""Results of a run split over processes: each writes a shard, one merge joins them.

Under `torchrun` (or any launcher of `world_size` ranks) rank r takes the examples
`indices[r::world_size]` of the selection and writes `OUT.rank{r}-of-{world_size}.tsv/.json`
through the same `ResultFile` (its own lock, its own resume). When every rank is done the
shards are merged into `OUT.tsv` in index order. Because the result of example i depends
only on (seed, i, settings, batch size), the merged rows are those of a one-process run.

`merge_results` is also the merge of job-array runs that each wrote their own `--out`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smoothing.runner import ENGINE_PACKAGES, ResultFile, ResultFileError

__all__ = [
    "check_foreign_shards",
    "merge_results",
    "merge_shards",
    "shard_indices",
    "shard_stem",
]

# The columns whose values do not depend on who computed a row (all but the wall time).
_TIMING_COLUMNS = frozenset({"time"})


def shard_stem(stem: Path, rank: int, world_size: int) -> Path:
    """`OUT` -> `OUT.rank{rank}-of-{world_size}`: the result stem of one rank's shard."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return stem.with_name(f"{stem.name}.rank{rank}-of-{world_size}")


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The examples of rank `rank`: every `world_size`-th one of the selection from `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return list(indices[rank::world_size])


def _shard_pattern(stem: Path) -> re.Pattern[str]:
    return re.compile(re.escape(stem.name) + r"\.rank(\d+)-of-(\d+)\.(?:tsv|json)")


def check_foreign_shards(stem: Path, world_size: int) -> None:
    """Refuse shards of `stem` written by a run over another number of processes.

    Their rows are valid but split another way; merging them with this run's would need
    another rule, so the user decides (merge them first, or remove them).
    """
    if not stem.parent.is_dir():
        return
    pattern = _shard_pattern(stem)
    foreign: dict[str, str] = {}  # shard stem -> its number of processes
    for path in stem.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(2)) != world_size:
            foreign[path.name.rsplit(".", 1)[0]] = match.group(2)
    if foreign:
        first = min(foreign)
        raise ResultFileError(
            f"{stem.parent / first}.tsv is a shard of a run over {foreign[first]} processes, "
            f"this run has {world_size}; nothing was changed. Rerun with that number of "
            "processes, merge those shards (merge-results), or move them away "
            f"({', '.join(sorted(foreign))})."
        )


def _read_source(
    stem: Path, mode: str, settings: dict[str, Any], world_size: int | None
) -> tuple[dict[int, dict[str, str]], dict[str, str], dict[str, Any]]:
    """Rows, skipped examples and sidecar of one finished source, checked against `settings`.

    Opened as a resume would open it, so the same checks (mode, settings, torch version,
    malformed rows) name the same problems, and the lock refuses a source still being written.
    """
    source = ResultFile(stem, mode, settings, packages=ENGINE_PACKAGES)  # type: ignore[arg-type]
    if not source.tsv.is_file() or not source.sidecar.is_file():
        raise ResultFileError(f"{source.tsv} (or its {source.sidecar.name}) is missing")
    try:
        # read before opening: opening marks the record as a run in progress
        record = json.loads(source.sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ResultFileError(f"{source.sidecar} cannot be read: {error}") from None
    source.open({})
    try:
        if world_size is not None:
            recorded = (record.get("distributed") or {}).get("world_size")
            if recorded != world_size:
                raise ResultFileError(
                    f"{source.tsv} was written by a run over {recorded} processes, not "
                    f"{world_size}; nothing was changed"
                )
        if record.get("finished") is None:
            raise ResultFileError(
                f"{source.tsv} is not finished ({len(source.done)} rows); rerun the command "
                "that writes it (it resumes), then merge"
            )
        return dict(source.done), source.skipped, record
    finally:
        source.close(finished=False)  # no row was appended: writes nothing, releases the lock


def merge_results(
    stem: Path,
    sources: Sequence[Path],
    mode: str,
    settings: dict[str, Any],
    *,
    world_size: int | None = None,
    overwrite: bool = False,
    packages: Sequence[str] = ENGINE_PACKAGES,
    environment: dict[str, Any] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> ResultFile:
    """Merge the finished results `sources` (stems) into `stem`.tsv/.json, rows in index order.

    Every source must have been made with `settings` (and, for torchrun shards, over
    `world_size` processes); an example in two sources must have the same row in both
    (apart from its time). Rows already in `stem` with the same settings are kept. The
    merged file is written beside `stem` and then moved onto it, under `stem`'s lock, so a
    reader never sees half a merge. Returns the merged ResultFile (closed).
    """
    target = ResultFile(stem, mode, settings, overwrite=overwrite,  # type: ignore[arg-type]
                        packages=packages, environment=environment or {})
    extra = dict(extra_record or {})
    target.open(extra)
    try:
        rows: dict[int, dict[str, str]] = {}
        origin: dict[int, Path] = {}
        skipped: dict[str, str] = {}
        merged_from = []
        existing = dict(target.done)
        # each row's base-classifier evaluations, carried over so the total stays right
        counts: dict[int, int] = dict(target.forward_passes)
        for source in sources:
            source_rows, source_skipped, record = _read_source(
                source, mode, target.settings, world_size
            )
            for index, count in record.get("forward_passes_by_row", {}).items():
                counts.setdefault(int(index), int(count))
            for index, row in source_rows.items():
                if index in rows and not _same_row(rows[index], row):
                    raise ResultFileError(
                        f"idx {index} has different rows in {origin[index].name}.tsv and "
                        f"{source.name}.tsv; nothing was changed"
                    )
                rows.setdefault(index, row)
                origin.setdefault(index, source)
            skipped.update(source_skipped)
            merged_from.append({
                "file": source.name + ".tsv", "rows": len(source_rows),
                "finished": record.get("finished"), "distributed": record.get("distributed"),
                "selection": record.get("selection"),
            })
        for index, row in existing.items():
            if index in rows and not _same_row(rows[index], row):
                raise ResultFileError(
                    f"idx {index} of {target.tsv} differs from its row in "
                    f"{origin[index].name}.tsv; nothing was changed (--overwrite replaces it)"
                )
            rows.setdefault(index, row)
        for index in rows:
            skipped.pop(str(index), None)
        extra.update(merged_from=merged_from, world_size=world_size)
        staging = ResultFile(
            stem.with_name(stem.name + ".merging"), mode, target.settings,  # type: ignore[arg-type]
            overwrite=True, packages=packages, environment=environment or {},
        )
        staging.open(extra)
        try:
            for index in sorted(rows):
                staging.append(rows[index], forward_passes=counts.get(index))
            for index, reason in sorted(skipped.items(), key=lambda item: int(item[0])):
                staging.skip(int(index), reason)
        finally:
            staging.close(finished=True)
        staging.tsv.replace(target.tsv)
        staging.sidecar.replace(target.sidecar)
        target.done = staging.done
        target._record = staging._record
    finally:
        target.close(finished=False)  # nothing appended through it: releases the lock only
    return target


def merge_shards(
    stem: Path,
    mode: str,
    settings: dict[str, Any],
    world_size: int,
    **kwargs: Any,
) -> ResultFile:
    """Merge the `world_size` shards `stem.rank{r}-of-{world_size}` into `stem` (see
    merge_results); refuses shards of another number of processes, naming them."""
    check_foreign_shards(stem, world_size)
    sources = [shard_stem(stem, rank, world_size) for rank in range(world_size)]
    return merge_results(stem, sources, mode, settings, world_size=world_size, **kwargs)


def _same_row(first: dict[str, str], second: dict[str, str]) -> bool:
    return all(first[c] == second[c] for c in first if c not in _TIMING_COLUMNS)
