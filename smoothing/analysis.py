"""Summaries of CERTIFY result files: ACR, certified accuracy at radii, curves, tables, plots.

A result file is a tab-separated table with a header row and Cohen et al.'s columns
``idx label predict radius correct time`` (extra columns may follow, in any order; columns are
read by header name). Every TSV written by Cohen et al.'s reference ``certify.py`` is valid input.
The ``time`` column (seconds such as ``15.4`` or ``0:04:31.864298``) is not read.

Definitions follow the reference ``analyze.py``; every row counts in the denominator, so an
abstention (predict -1, correct 0, radius 0) or a wrong prediction counts as not certified:

- certified accuracy at radius r: fraction of all rows with ``correct == 1`` and ``radius >= r``;
- ACR (average certified radius): mean over all rows of ``radius * correct``.

A PREDICT output (no ``radius`` column) is rejected with a ValueError saying so: it carries no
certificate, and silently reporting its clean accuracy as "certified accuracy at 0" would mix
two different quantities.

matplotlib is imported inside `plot_certified_accuracy` only, so the engine does not depend on
plotting at import time.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "radius", "correct")
_INTEGER_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "correct")
# The grid of `default_radii`, as in the papers' tables (Choi et al. 2024, Table 7).
RADIUS_STEP = 0.25


@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class Results:
    """The rows of one CERTIFY result file, one array entry per row (file order)."""

    path: Path
    idx: np.ndarray = field(repr=False)
    label: np.ndarray = field(repr=False)
    predict: np.ndarray = field(repr=False)
    radius: np.ndarray = field(repr=False)
    correct: np.ndarray = field(repr=False)

    @property
    def n(self) -> int:
        """Number of rows (certified examples, abstentions included)."""
        return int(self.radius.shape[0])

    @property
    def max_radius(self) -> float:
        """Largest radius in the file (0.0 when every row abstained)."""
        return float(self.radius.max()) if self.n else 0.0


def _parse_integer(text: str) -> int:
    # Accept "3" and also "3.0" (files re-saved by pandas may carry floats), nothing fractional.
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise ValueError(f"{text!r} is not an integer") from None
        return int(value)


def load_results(path: str | Path) -> Results:
    """Read one CERTIFY result file (TSV with a header row).

    Raises ValueError, naming the file (and the line where it applies), when the file is
    missing or empty, lacks a required column, holds a value that is not a number of the
    expected kind (``correct`` must be 0 or 1, ``radius`` finite and >= 0), or repeats an
    ``idx`` (the example would count twice).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such result file")
    # utf-8-sig: tolerate a byte-order mark left by spreadsheet tools.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            return _read_rows(path, reader)
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} near line "
                f"{reader.line_num + 1}); a result file is a tab-separated text file"
            ) from None
        except csv.Error as error:  # e.g. a field over csv's size limit: not a result file
            raise ValueError(
                f"{path}, line {reader.line_num}: unreadable as tab-separated text ({error})"
            ) from None


def _shown(text: str, limit: int = 40) -> str:
    """`text` for an error message, cut short: a corrupt file may hold megabytes in one field."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _read_rows(path: Path, reader: Any) -> Results:
    """The rows of an open result file (`load_results` checks them, as documented there)."""
    header = next(reader, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file (expected a header row with columns "
                         f"{' '.join(REQUIRED_COLUMNS)} time)")
    names = [cell.strip() for cell in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        hint = ""
        if "radius" in missing and "predict" in names and "correct" in names:
            hint = (" - this looks like a PREDICT output; certified accuracy and ACR need "
                    "the output of CERTIFY")
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} in header "
            f"{_shown(' '.join(names), 200)} (expected tab-separated columns "
            f"{' '.join(REQUIRED_COLUMNS)} time){hint}"
        )
    position = {name: names.index(name) for name in REQUIRED_COLUMNS}
    values: dict[str, list] = {name: [] for name in REQUIRED_COLUMNS}
    line_of_idx: dict[int, int] = {}  # a repeated example would be counted twice
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # a trailing blank line is not a result
        line = reader.line_num
        if len(row) < len(names):
            raise ValueError(
                f"{path}, line {line}: {len(row)} field(s) but the header has {len(names)} "
                "(is the file tab-separated?)"
            )
        for name in REQUIRED_COLUMNS:
            text = row[position[name]].strip()
            try:
                value = _parse_integer(text) if name in _INTEGER_COLUMNS else float(text)
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}: column {name!r} has non-numeric value {_shown(text)}"
                ) from None
            if name == "correct" and value not in (0, 1):
                raise ValueError(
                    f"{path}, line {line}: column 'correct' must be 0 or 1, got {_shown(text)}"
                )
            if name == "radius" and not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{path}, line {line}: column 'radius' must be a finite number >= 0, "
                    f"got {_shown(text)}"
                )
            if name == "idx":
                if value in line_of_idx:
                    raise ValueError(
                        f"{path}, line {line}: idx {value} already appears on line "
                        f"{line_of_idx[value]}; each example must be counted once"
                    )
                line_of_idx[value] = line
            values[name].append(value)
    if not values["radius"]:
        raise ValueError(f"{path}: empty file (a header but no result rows)")
    return Results(
        path=path,
        idx=np.asarray(values["idx"], dtype=np.int64),
        label=np.asarray(values["label"], dtype=np.int64),
        predict=np.asarray(values["predict"], dtype=np.int64),
        radius=np.asarray(values["radius"], dtype=np.float64),
        correct=np.asarray(values["correct"], dtype=np.int64),
    )


def average_certified_radius(results: Results) -> float:
    """ACR: mean over all rows of radius * correct (abstentions and wrong rows count 0)."""
    return float(np.mean(results.radius * results.correct))


def _certified_fractions(results: Results, radii: np.ndarray) -> np.ndarray:
    # Radii of correct rows, sorted: the count with radius >= r is what lies right of r.
    certified = np.sort(results.radius[results.correct == 1])
    counts = certified.size - np.searchsorted(certified, radii, side="left")
    return counts / results.n


def certified_accuracy(results: Results, radii: Iterable[float]) -> dict[float, float]:
    """Certified accuracy (a fraction in [0, 1]) at each radius r: P[correct and radius >= r]."""
    radii = [float(r) for r in radii]
    fractions = _certified_fractions(results, np.asarray(radii, dtype=np.float64))
    return {r: float(f) for r, f in zip(radii, fractions, strict=True)}


def certified_accuracy_curve(
    results: Results, num: int = 1000, max_radius: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy on `num` evenly spaced radii from 0 to `max_radius`.

    `max_radius` defaults to the file's largest radius; pass a common value to put several
    files on one grid. Returns (radii, fractions).
    """
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    top = results.max_radius if max_radius is None else float(max_radius)
    radii = np.linspace(0.0, top, num)
    return radii, _certified_fractions(results, radii)


def default_radii(results_list: Sequence[Results], step: float = RADIUS_STEP) -> list[float]:
    """0, step, 2*step, ... up to the largest radius over the files (included when on the grid)."""
    top = max((r.max_radius for r in results_list), default=0.0)
    # The tolerance keeps a grid point equal to the maximum that floor division would lose.
    count = int(math.floor(top / step + 1e-9))
    return [k * step for k in range(count + 1)]


def format_radius(radius: float) -> str:
    """The radius as the papers print it: 0.0, 0.25, 0.5, 1.0 (at most 6 decimals)."""
    text = f"{float(radius):.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _labels_for(results_list: Sequence[Results], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [r.path.stem for r in results_list]
    if len(labels) != len(results_list):
        raise ValueError(f"{len(labels)} label(s) given for {len(results_list)} file(s)")
    return list(labels)


def _table_cells(
    results_list: Sequence[Results], radii: Sequence[float]
) -> list[tuple[str, list[str]]]:
    """Per file: (ACR with 3 decimals, certified accuracies in % with 1 decimal)."""
    rows = []
    for results in results_list:
        accuracy = certified_accuracy(results, radii)
        rows.append((
            f"{average_certified_radius(results):.3f}",
            [f"{100 * accuracy[float(r)]:.1f}" for r in radii],
        ))
    return rows


def text_table(
    results_list: Sequence[Results], radii: Sequence[float], labels: Sequence[str] | None = None
) -> str:
    """A plain-text table aligned in columns: file, n, ACR, certified accuracy (%) per radius."""
    names = _labels_for(results_list, labels)
    header = ["file", "n", "ACR"] + [format_radius(r) for r in radii]
    body = [
        [name, str(results.n), acr, *accuracies]
        for name, results, (acr, accuracies) in zip(
            names, results_list, _table_cells(results_list, radii), strict=True
        )
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    lines = ["Certified accuracy (%) at L2 radius eps; ACR = average certified radius.", ""]
    lines += [line(header), *(line(row) for row in body)]
    return "\n".join(lines) + "\n"


def markdown_table(
    results_list: Sequence[Results], radii: Sequence[float], labels: Sequence[str] | None = None
) -> str:
    """A Markdown table: file, n, ACR, then certified accuracy (%) at each radius eps."""
    names = [name.replace("|", "\\|") for name in _labels_for(results_list, labels)]
    header = ["File", "n", "ACR"] + [f"ε={format_radius(r)}" for r in radii]
    lines = [
        "Certified accuracy (%) at L2 radius ε; ACR = average certified radius.",
        "",
        "| " + " | ".join(header) + " |",
        "| --- | " + " | ".join("---:" for _ in header[1:]) + " |",
    ]
    for name, results, (acr, accuracies) in zip(
        names, results_list, _table_cells(results_list, radii), strict=True
    ):
        lines.append("| " + " | ".join([name, str(results.n), acr, *accuracies]) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def latex_table(
    results_list: Sequence[Results], radii: Sequence[float], labels: Sequence[str] | None = None
) -> str:
    """A booktabs LaTeX tabular in the style of Choi et al. (2024), Table 7.

    Columns: file, ACR, certified accuracy (%) at each radius; the best printed value of each
    column is bold (every tied value too). Needs ``\\usepackage{booktabs}``.
    """
    names = [_latex_escape(name) for name in _labels_for(results_list, labels)]
    cells = [[acr, *accuracies] for acr, accuracies in _table_cells(results_list, radii)]
    # Compare the printed values so that equal-looking numbers are bold together.
    for column in range(1 + len(radii)):
        best = max(float(row[column]) for row in cells)
        for row in cells:
            if float(row[column]) == best:
                row[column] = rf"\textbf{{{row[column]}}}"
    k = len(radii)
    lines = [
        r"\begin{tabular}{l" + "c" * (1 + k) + "}",
        r"\toprule",
    ]
    if k:
        lines += [
            r" & & \multicolumn{" + str(k) + r"}{c}{Certified accuracy at $\varepsilon$ (\%)} \\",
            r"\cmidrule(lr){3-" + str(2 + k) + "}",
        ]
    lines.append(" & ".join(["File", "ACR", *(format_radius(r) for r in radii)]) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join([name, *row]) + r" \\" for name, row in zip(names, cells, strict=True)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def summary_json(results_list: Sequence[Results], radii: Sequence[float]) -> list[dict]:
    """One JSON-ready object per file: file, n, acr, certified_accuracy {radius text: fraction}."""
    summaries = []
    for results in results_list:
        accuracy = certified_accuracy(results, radii)
        summaries.append({
            "file": str(results.path),
            "n": results.n,
            "acr": average_certified_radius(results),
            "certified_accuracy": {format_radius(r): accuracy[float(r)] for r in radii},
        })
    return summaries


def plot_certified_accuracy(
    results_list: Sequence[Results],
    path_stem: str | Path,
    labels: Sequence[str] | None = None,
    num: int = 1000,
) -> list[Path]:
    """Plot certified accuracy (%) against L2 radius, one line per file; save PNG and PDF.

    Writes ``path_stem.png`` and ``path_stem.pdf`` (a trailing .png/.pdf on `path_stem` is
    dropped; missing parent folders are created). Returns the written paths.
    """
    # Lazy import, and a bare Figure rather than pyplot: no global backend switch, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = _labels_for(results_list, labels)
    stem = Path(path_stem)
    if stem.suffix.lower() in (".png", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    top = max((r.max_radius for r in results_list), default=0.0)
    top = top if top > 0 else 1.0  # every row abstained: still draw a sensible axis

    figure = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (name, results) in enumerate(zip(names, results_list, strict=True)):
        radii, fractions = certified_accuracy_curve(results, num=num, max_radius=top)
        # The default colour cycle has 10 colours: change the dash after each full cycle.
        style = ("-", "--", ":", "-.")[(i // 10) % 4]
        # matplotlib leaves labels starting with "_" out of the legend; a file may be named so.
        label = " " + name if name.startswith("_") else name
        axes.plot(radii, 100 * fractions, linestyle=style, label=label)
    axes.set_xlabel(r"L2 radius $\varepsilon$")
    axes.set_ylabel("Certified accuracy (%)")
    axes.set_xlim(0, top)
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    if len(results_list) <= 6:
        axes.legend(loc="upper right", fontsize="small")
    else:  # many curves: a legend inside would hide them
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    written = []
    for suffix in (".png", ".pdf"):
        target = stem.with_name(stem.name + suffix)
        figure.savefig(target, dpi=150, bbox_inches="tight")
        written.append(target)
    return written
