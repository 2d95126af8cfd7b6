"""`analyze`: summaries of result files, as tables, JSON or a plot.

CERTIFY files: ACR and certified accuracy. Attack files: empirical clean and robust accuracy
with Clopper-Pearson intervals. Attack files with `--certified`: Choi et al.'s combined table.
"""

from __future__ import annotations

import json
import math

import click

from cli.errors import CommandError
from smoothing import analysis

FORMATS = ("table", "markdown", "latex", "json")
NO_CERTIFICATE = "none"


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
        "  analyze runs/*.tsv --radii 0,0.5,1.0 --format latex --plot figures/certified\n"
        "  analyze runs/attack_pgd_0.5.tsv runs/attack_smoothadv_0.5.tsv\n"
        "  analyze runs/clip_pgd_0.5.tsv runs/ours_0.5.tsv runs/ours_1.0.tsv \\\n"
        "      --certified none --certified runs/certify_0.25.tsv \\\n"
        "      --certified runs/certify_0.50.tsv --labels CLIP,Ours,Ours"
    ),
)
@click.argument(
    "files", metavar="FILE...", nargs=-1, required=True,
    type=click.Path(exists=True, dir_okay=False),
)
@click.option(
    "--radii", callback=_parse_radii, metavar="R1,R2,...",
    help="L2 radii for the table columns, comma-separated "
    "[default: 0 to the largest radius in the files, step 0.25]. CERTIFY files only.",
)
@click.option(
    "--format", "output_format", type=click.Choice(FORMATS, case_sensitive=False),
    default="table", show_default=True,
    help="table: aligned text; markdown; latex: booktabs tabular, best value per column in "
    "bold; json: accuracies as fractions in [0, 1] (attack files: with their intervals).",
)
@click.option(
    "--plot", "plot_stem", type=click.Path(dir_okay=False), metavar="PATH_STEM",
    help="Also plot certified accuracy against radius, one line per file, to PATH_STEM.png "
    "and PATH_STEM.pdf. CERTIFY files only.",
)
@click.option(
    "--labels", callback=_parse_labels, metavar="A,B,...",
    help="Comma-separated names for the files in tables and the plot legend, one per FILE "
    "[default: the file names without .tsv]. With --certified, attack files of one label "
    "form one row.",
)
@click.option(
    "--certified", "certified_files", multiple=True, metavar="CERTIFY.tsv|none",
    help="Repeat once per FILE (attack files), in order: the CERTIFY result of the same "
    "model and examples, or 'none' (no certificate, e.g. an undefended model). Prints the "
    "combined table 'robust (certified)' of Choi et al. (2024), Tables 1-4.",
)
def analyze_command(
    files: tuple[str, ...],
    radii: list[float] | None,
    output_format: str,
    plot_stem: str | None,
    labels: list[str] | None,
    certified_files: tuple[str, ...],
) -> None:
    """Summarize CERTIFY or attack result files.

    \b
    Certified accuracy at radius r: fraction of ALL examples predicted correctly
        with a certified L2 radius >= r (abstentions count as wrong).
    ACR (average certified radius): mean over ALL examples of the certified
        radius, counting 0 for abstentions and wrong predictions.
    Empirical robust accuracy (attack files): fraction of ALL examples still
        predicted correctly after the attack (an abstention is not robust).
    Empirical clean accuracy (attack files): fraction correct on the clean input,
        an abstention scored by the base classifier (Choi et al. 2024, App. A.3).

    CERTIFY files (idx label predict radius correct time): one row per FILE, ACR and
    certified accuracy (%) at each radius. Files from Cohen et al.'s reference
    certify.py are accepted as they are. PREDICT outputs are rejected.

    Attack files (written by `attack`, with their OUT.json): one row per FILE, clean
    and robust accuracy with 95% Clopper-Pearson intervals. A file with a row whose
    perturbation exceeds eps is refused.

    With --certified, FILE... are attack files and each is paired with the CERTIFY
    file of the same examples: certified accuracy at radius eps is shown in
    parentheses beside the robust accuracy at eps, and at radius 0 beside clean.
    """
    if labels is not None and len(labels) != len(files):
        raise click.BadParameter(
            f"{len(labels)} label(s) for {len(files)} file(s); give one label per FILE",
            param_hint="'--labels'",
        )
    if certified_files and len(certified_files) != len(files):
        raise click.BadParameter(
            f"{len(certified_files)} given for {len(files)} FILE(s); give one per FILE, in "
            f"order ('--certified {NO_CERTIFICATE}' for a file without a certificate)",
            param_hint="'--certified'",
        )
    try:
        loaded = [analysis.load_any(path) for path in files]
    except ValueError as error:
        raise CommandError(str(error)) from None
    attacks = [r for r in loaded if isinstance(r, analysis.AttackResults)]
    certifies = [r for r in loaded if isinstance(r, analysis.Results)]
    if certified_files:
        if certifies:
            raise CommandError(
                f"{certifies[0].path} is a CERTIFY result; with --certified every FILE is an "
                "attack result and the CERTIFY files go to --certified, one per FILE"
            )
        _refuse_certify_options(radii, plot_stem, "the combined table (--certified)")
        text = _combined(attacks, certified_files, labels, output_format.lower())
    elif attacks and certifies:
        raise CommandError(
            f"{attacks[0].path} is an attack result and {certifies[0].path} a CERTIFY result; "
            "analyze summarizes one kind at a time. To put certified accuracy beside empirical "
            "robust accuracy, give the attack files as FILE... and their CERTIFY files with "
            "--certified (one per FILE, in order)"
        )
    elif attacks:
        _refuse_certify_options(radii, plot_stem, "attack files")
        text = _attack_table(attacks, labels, output_format.lower())
    else:
        text = _certify_table(certifies, radii, labels, output_format.lower())
    click.echo(text, nl=False)

    if plot_stem is not None:
        try:
            written = analysis.plot_certified_accuracy(certifies, plot_stem, labels)
        except OSError as error:
            raise CommandError(f"cannot write the plot {plot_stem}: {error}") from None
        # stderr, so that stdout stays a clean table or JSON document for pipes.
        click.echo("wrote " + ", ".join(str(path) for path in written), err=True)


def _refuse_certify_options(radii: list[float] | None, plot_stem: str | None, what: str) -> None:
    for name, value in (("--radii", radii), ("--plot", plot_stem)):
        if value is not None:
            raise click.UsageError(
                f"{name} is about the certified radii of CERTIFY files, not for {what} "
                "(certified accuracy at eps comes with --certified)"
            )


def _certify_table(
    results_list: list[analysis.Results],
    radii: list[float] | None,
    labels: list[str] | None,
    output_format: str,
) -> str:
    if radii is None:
        radii = analysis.default_radii(results_list)
    if output_format == "json":
        summaries = analysis.summary_json(results_list, radii)
        for summary, label in zip(summaries, labels or [], strict=False):
            summary["label"] = label  # beside the path, which stays the file's identity
        return json.dumps(summaries, indent=2) + "\n"
    notes = analysis.grid_notes(results_list, labels)
    if output_format == "markdown":
        return analysis.markdown_table(results_list, radii, labels) + (notes and "\n" + notes)
    if output_format == "latex":
        # LaTeX comments, so that the tabular still compiles as it is
        comments = "".join(f"% {line}\n" for line in notes.splitlines())
        return analysis.latex_table(results_list, radii, labels) + comments
    return analysis.text_table(results_list, radii, labels) + (notes and "\n" + notes)


def _attack_table(
    attacks: list[analysis.AttackResults], labels: list[str] | None, output_format: str
) -> str:
    if output_format == "json":
        summaries = analysis.attack_summary_json(attacks)
        for summary, label in zip(summaries, labels or [], strict=False):
            summary["label"] = label
        return json.dumps(summaries, indent=2) + "\n"
    if output_format == "markdown":
        return analysis.attack_markdown_table(attacks, labels)
    if output_format == "latex":
        return analysis.attack_latex_table(attacks, labels)
    return analysis.attack_text_table(attacks, labels)


def _combined(
    attacks: list[analysis.AttackResults],
    certified_files: tuple[str, ...],
    labels: list[str] | None,
    output_format: str,
) -> str:
    try:
        certifies = [
            None if path == NO_CERTIFICATE else analysis.load_any(path) for path in certified_files
        ]
        for path, certify in zip(certified_files, certifies, strict=True):
            if isinstance(certify, analysis.AttackResults):
                raise ValueError(
                    f"{path} (given to --certified) is an attack result; --certified takes "
                    "CERTIFY results"
                )
        table = analysis.combined_table(attacks, certifies, labels)
    except ValueError as error:
        raise CommandError(str(error)) from None
    if output_format == "json":
        return json.dumps(analysis.combined_summary_json(table), indent=2) + "\n"
    if output_format == "markdown":
        return analysis.combined_markdown_table(table)
    if output_format == "latex":
        return analysis.combined_latex_table(table)
    return analysis.combined_text_table(table)
