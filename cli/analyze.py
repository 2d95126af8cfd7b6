"""`analyze`: ACR and certified accuracy of CERTIFY result files, as tables, JSON or a plot."""

from __future__ import annotations

import json
import math

import click

from cli.errors import CommandError
from smoothing import analysis

FORMATS = ("table", "markdown", "latex", "json")




def _parse_radii(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[float] | None:
    if value is None:
        return None
    radii = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            raise click.BadParameter(
                f"empty entry in {value!r}; give comma-separated numbers such as 0,0.25,0.5"
            )
        try:
            radius = float(part)
        except ValueError:
            raise click.BadParameter(
                f"{part!r} is not a number; give comma-separated numbers such as 0,0.25,0.5"
            ) from None
        if not math.isfinite(radius) or radius < 0:
            raise click.BadParameter(f"radius {part!r} must be a finite number >= 0")
        radii.append(radius)
    # Sorted and unique: table columns read left to right, and JSON keys must not collide.
    return sorted(set(radii))


def _parse_labels(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[str] | None:
    if value is None:
        return None
    labels = [part.strip() for part in value.split(",")]
    if any(not label for label in labels):
        raise click.BadParameter(f"empty label in {value!r}")
    return labels


@click.command(
    "analyze",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        "\b\nExamples:\n"
        "  analyze runs/imagenet_sigma_0.25.tsv runs/imagenet_sigma_0.50.tsv\n"
        "  analyze runs/*.tsv --radii 0,0.5,1.0 --format latex --plot figures/certified"
    ),
)
@click.argument(
    "files", metavar="FILE...", nargs=-1, required=True,
    type=click.Path(exists=True, dir_okay=False),
)
@click.option(
    "--radii", callback=_parse_radii, metavar="R1,R2,...",
    help="L2 radii for the table columns, comma-separated "
    "[default: 0 to the largest radius in the files, step 0.25].",
)
@click.option(
    "--format", "output_format", type=click.Choice(FORMATS, case_sensitive=False),
    default="table", show_default=True,
    help="table: aligned text; markdown; latex: booktabs tabular, best value per column in "
    "bold; json: one object per file, accuracies as fractions in [0, 1].",
)
@click.option(
    "--plot", "plot_stem", type=click.Path(dir_okay=False), metavar="PATH_STEM",
    help="Also plot certified accuracy against radius, one line per file, to PATH_STEM.png "
    "and PATH_STEM.pdf.",
)
@click.option(
    "--labels", callback=_parse_labels, metavar="A,B,...",
    help="Comma-separated names for the files in tables and the plot legend, one per FILE "
    "[default: the file names without .tsv].",
)
def analyze_command(
    files: tuple[str, ...],
    radii: list[float] | None,
    output_format: str,
    plot_stem: str | None,
    labels: list[str] | None,
) -> None:
    """Summarize CERTIFY result files (TSV: idx label predict radius correct time).

    \b
    Certified accuracy at radius r: fraction of ALL examples predicted correctly
        with a certified L2 radius >= r (abstentions count as wrong).
    ACR (average certified radius): mean over ALL examples of the certified
        radius, counting 0 for abstentions and wrong predictions.

    Prints one row per FILE: ACR and certified accuracy (%) at each radius.
    Files from Cohen et al.'s reference certify.py are accepted as they are.
    PREDICT outputs (no radius column) are rejected: they certify nothing.
    """
    if labels is not None and len(labels) != len(files):
        raise click.BadParameter(
            f"{len(labels)} label(s) for {len(files)} file(s); give one label per FILE",
            param_hint="'--labels'",
        )
    try:
        results_list = [analysis.load_results(path) for path in files]
    except ValueError as error:
        raise CommandError(str(error)) from None
    if radii is None:
        radii = analysis.default_radii(results_list)

    output_format = output_format.lower()
    if output_format == "json":
        summaries = analysis.summary_json(results_list, radii)
        for summary, label in zip(summaries, labels or [], strict=False):
            summary["label"] = label  # beside the path, which stays the file's identity
        text = json.dumps(summaries, indent=2) + "\n"
    elif output_format == "markdown":
        text = analysis.markdown_table(results_list, radii, labels)
    elif output_format == "latex":
        text = analysis.latex_table(results_list, radii, labels)
    else:
        text = analysis.text_table(results_list, radii, labels)
    click.echo(text, nl=False)

    if plot_stem is not None:
        try:
            written = analysis.plot_certified_accuracy(results_list, plot_stem, labels)
        except OSError as error:
            raise CommandError(f"cannot write the plot {plot_stem}: {error}") from None
        # stderr, so that stdout stays a clean table or JSON document for pipes.
        click.echo("wrote " + ", ".join(str(path) for path in written), err=True)
