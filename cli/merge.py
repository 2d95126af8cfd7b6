"""Console script `merge-results`: join result files of one run split by hand (job arrays).

A SLURM job array (or any set of processes) that runs the same command with other
--start/--skip/--max and one --out each writes results that differ only in which examples
they hold. `merge-results OUT A.tsv B.tsv ...` checks they were made with the same settings
and writes OUT.tsv/.json with every row once, in index order, as one run would have. The
shards of a torchrun run are merged by rank 0 itself (see cli.distributed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.errors import CommandError
from cli.main import RECORDED_PACKAGES
from smoothing.analysis import read_sidecar
from smoothing.runner import ResultFileError
from smoothing.shards import merge_results


def _stem(path: str) -> Path:
    stem = Path(path)
    return stem.with_name(stem.name[: -len(".tsv")]) if stem.name.endswith(".tsv") else stem


@click.command("merge-results", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("files", metavar="FILE...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--overwrite", is_flag=True,
              help="Replace an OUT made with other settings (its rows are lost).")
def merge_command(out: str, files: tuple[str, ...], overwrite: bool) -> None:
    """Merge the result FILEs (TSVs written by certify, predict or attack, each with its
    JSON beside it) of one command run over parts of a dataset into OUT.tsv and OUT.json.

    Every FILE must be a finished run with the same settings (only --start/--skip/--max
    and --out may differ); an example in two FILEs must have the same row in both. Rows
    already in OUT (same settings) are kept. Nothing is written when a FILE is refused.
    """
    target = _stem(out)
    sources = [_stem(name) for name in files]
    if target in sources:
        raise CommandError(f"OUT {target}.tsv is also one of the FILEs; choose another OUT")
    try:
        record: dict[str, Any] | None = read_sidecar(f"{sources[0]}.tsv")
    except ValueError as error:
        raise CommandError(str(error)) from error
    if record is None or "mode" not in record:
        raise CommandError(
            f"{sources[0]}.tsv has no settings file ({sources[0].name}.json) saying how it was "
            "made; only results written by this toolkit can be merged"
        )
    try:
        merged = merge_results(
            target, sources, record["mode"], record["settings"], overwrite=overwrite,
            packages=RECORDED_PACKAGES,
            extra_record={"merged_by": "merge-results"},
        )
    except ResultFileError as error:
        raise CommandError(str(error)) from error
    click.echo(f"wrote {merged.tsv} ({len(merged.done)} rows from {len(sources)} files) and "
               f"{merged.sidecar.name}")
