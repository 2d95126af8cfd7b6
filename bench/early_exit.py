"""Forward passes saved by `certify --early-exit`, and the analyze output it must not change.

The digits test split certified by `digits-clean` (trained without noise) at sigma 0.5,
n0 = 100, n = 10,000, alpha = 0.001, twice through the command line: as it is and with
`--early-exit`. Reported: the `forward_passes` of both JSON files and their ratio (expected:
1 - the fraction of wrong guesses times n / (n0 + n)), and whether `analyze --format json`
(ACR and certified accuracy at 0, 0.25, ..., the largest radius) is identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from click.testing import CliRunner

ARGS = ["--model", "digits-clean", "--sigma", "0.5", "--n0", "100", "--n", "10000",
        "--batch", "1000", "--quiet"]


def _analyze(tsv: Path) -> list[dict]:
    from cli.analyze import analyze_command

    result = CliRunner().invoke(analyze_command, [str(tsv), "--format", "json"])
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    summaries = json.loads(result.output)
    for summary in summaries:
        del summary["file"]
    return summaries


def early_exit_savings(max_examples: int | None = None, threads: int | None = None) -> dict:
    from cli.main import certify_command

    extra = [] if max_examples is None else ["--max", str(max_examples)]
    extra += [] if threads is None else ["--threads", str(threads)]
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, flags in (("full", []), ("early_exit", ["--early-exit"])):
            stem = Path(folder) / name
            result = CliRunner().invoke(
                certify_command, [*ARGS, *extra, *flags, "--out", str(stem)]
            )
            if result.exit_code != 0:
                raise RuntimeError(result.output)
            record = json.loads(stem.with_suffix(".json").read_text())
            lines = stem.with_suffix(".tsv").read_text().splitlines()[1:]
            runs[name] = {
                "forward_passes": record["forward_passes"],
                "rows": len(lines),
                "wrong_guesses": sum(
                    line.split("\t")[2] not in (line.split("\t")[1], "-1") for line in lines
                ) if flags else None,
                "analyze": _analyze(stem.with_suffix(".tsv")),
            }
    full, early = runs["full"], runs["early_exit"]
    return {
        "what": "certify --early-exit against the full run: digits test split, digits-clean, "
                "sigma 0.5, n0 100, n 10,000",
        "examples": full["rows"],
        "forward_passes_full": full["forward_passes"],
        "forward_passes_early_exit": early["forward_passes"],
        "ratio": early["forward_passes"] / full["forward_passes"],
        "wrong_guesses": early["wrong_guesses"],
        "analyze_identical": early["analyze"] == full["analyze"],
        "analyze": full["analyze"],
    }


def print_early_exit(record: dict) -> None:
    print(f"early exit ({record['what']}; {record['examples']} examples):")
    print(f"  forward passes {record['forward_passes_early_exit']:,} of "
          f"{record['forward_passes_full']:,} ({record['ratio']:.3f}); "
          f"{record['wrong_guesses']} wrong guesses skipped their n draws; analyze output "
          f"{'identical' if record['analyze_identical'] else 'DIFFERENT'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max", type=int, default=None, help="the first MAX test digits")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print_early_exit(early_exit_savings(args.max, args.threads))
