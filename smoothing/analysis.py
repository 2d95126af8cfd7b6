"""Summaries of result files: ACR, certified and empirical accuracy, curves, tables, plots.

CERTIFY files
-------------

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

Attack files
------------
An attack result (``attack`` command) has the columns ``idx label predict correct time
clean_predict clean_correct l2 linf`` and a JSON sidecar (``mode = "attack"``) whose settings
give the threat model (attack, norm, eps; none for ``--attack none``) and sigma. Over all rows:

- empirical robust accuracy: mean of ``correct`` (the decision on the attacked input; an
  abstention is not robust);
- empirical clean accuracy: mean of ``clean_correct`` (Choi et al. 2024, App. A.3: a clean
  abstention is scored by the base classifier),

each with its two-sided 95% Clopper-Pearson interval (statsmodels, ``method="beta"``). A file
whose sidecar is missing or gives no threat model, or with a row outside it
(`perturbation_bound`), is refused. `combined_table` pairs attack files with CERTIFY files of
the same examples into the "robust (certified)" layout of Choi et al. (2024), Tables 1-4.

matplotlib is imported inside `plot_certified_accuracy` only, so the engine does not depend on
plotting at import time.
"""

from __future__ import annotations

import csv
import json
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
# The columns of an attack result (smoothing.runner.COLUMNS["attack"] without `time`).
ATTACK_COLUMNS: tuple[str, ...] = (
    "idx", "label", "predict", "correct", "clean_predict", "clean_correct", "l2", "linf",
)


@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class Results:
    """The rows of one CERTIFY result file, one array entry per row (file order)."""

    path: Path
    idx: np.ndarray = field(repr=False)
    label: np.ndarray = field(repr=False)
    predict: np.ndarray = field(repr=False)
    radius: np.ndarray = field(repr=False)
    correct: np.ndarray = field(repr=False)
    # The grid of a sequential run (`certify --sequential`, from its sidecar): each radius is
    # the largest radius of this grid certified, so the ACR is a grid-ACR. None: CERTIFY's.
    radius_grid: tuple[float, ...] | None = None

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


@dataclass(frozen=True)
class _Layout:
    """What a kind of result file must hold, and how its columns are checked."""

    kind: str
    required: tuple[str, ...]
    integers: tuple[str, ...]
    binary: tuple[str, ...]  # 0 or 1
    nonnegative: tuple[str, ...]  # finite floats >= 0


_CERTIFY = _Layout(
    kind="CERTIFY", required=REQUIRED_COLUMNS, integers=_INTEGER_COLUMNS,
    binary=("correct",), nonnegative=("radius",),
)
_ATTACK = _Layout(
    kind="attack", required=ATTACK_COLUMNS,
    integers=("idx", "label", "predict", "correct", "clean_predict", "clean_correct"),
    binary=("correct", "clean_correct"), nonnegative=("l2", "linf"),
)


def load_results(path: str | Path) -> Results:
    """Read one CERTIFY result file (TSV with a header row).

    Raises ValueError, naming the file (and the line where it applies), when the file is
    missing or empty, lacks a required column, holds a value that is not a number of the
    expected kind (``correct`` must be 0 or 1, ``radius`` finite and >= 0), or repeats an
    ``idx`` (the example would count twice).
    """
    path = Path(path)
    _, columns = _load_table(path, (_CERTIFY,))
    return Results(path=path, radius_grid=sequential_grid(path), **columns)


def sequential_grid(path: str | Path) -> tuple[float, ...] | None:
    """The radii of a `certify --sequential` result, from its sidecar; None for any other
    file (CERTIFY's, Cohen et al.'s without a sidecar, or beside an unrelated JSON file)."""
    try:
        record = read_sidecar(path)
    except ValueError:
        return None
    if record is None or record.get("mode") != "certify":
        return None
    grid = record["settings"].get("sequential")
    if not isinstance(grid, dict) or not isinstance(grid.get("radii"), list):
        return None
    return tuple(float(r) for r in grid["radii"])


def _load_table(
    path: Path, layouts: Sequence[_Layout]
) -> tuple[_Layout, dict[str, np.ndarray]]:
    """The first of `layouts` whose columns the file's header has, and the checked columns."""
    if not path.is_file():
        raise ValueError(f"{path}: no such result file")
    # utf-8-sig: tolerate a byte-order mark left by spreadsheet tools.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            return _read_rows(path, reader, layouts)
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


def _missing_columns_message(path: Path, layout: _Layout, names: list[str]) -> str:
    missing = [name for name in layout.required if name not in names]
    hint = ""
    if layout is _CERTIFY and all(name in names for name in ATTACK_COLUMNS):
        hint = (" - this is an attack result (clean_correct, l2, linf columns); it holds "
                "empirical, not certified, accuracy")
    elif layout is _CERTIFY and "radius" in missing and "predict" in names and "correct" in names:
        hint = (" - this looks like a PREDICT output; certified accuracy and ACR need "
                "the output of CERTIFY")
    elif layout is _ATTACK and "radius" in names:
        hint = " - this is a CERTIFY result, not an attack result"
    return (
        f"{path}: missing column(s) {', '.join(missing)} in header "
        f"{_shown(' '.join(names), 200)} (expected tab-separated columns "
        f"{' '.join(layout.required)}{' time' if layout is _CERTIFY else ''}){hint}"
    )


def _read_rows(
    path: Path, reader: Any, layouts: Sequence[_Layout]
) -> tuple[_Layout, dict[str, np.ndarray]]:
    """The rows of an open result file (`load_results` checks them, as documented there)."""
    header = next(reader, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file (expected a header row with columns "
                         f"{' '.join(layouts[0].required)}"
                         f"{' time' if layouts[0] is _CERTIFY else ''})")
    names = [cell.strip() for cell in header]
    layout = next(
        (candidate for candidate in layouts if all(c in names for c in candidate.required)), None
    )
    if layout is None:
        raise ValueError(_missing_columns_message(path, layouts[0], names))
    position = {name: names.index(name) for name in layout.required}
    values: dict[str, list] = {name: [] for name in layout.required}
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
        for name in layout.required:
            text = row[position[name]].strip()
            try:
                value = _parse_integer(text) if name in layout.integers else float(text)
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}: column {name!r} has non-numeric value {_shown(text)}"
                ) from None
            if name in layout.binary and value not in (0, 1):
                raise ValueError(
                    f"{path}, line {line}: column {name!r} must be 0 or 1, got {_shown(text)}"
                )
            if name in layout.nonnegative and not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{path}, line {line}: column {name!r} must be a finite number >= 0, "
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
    if not values["idx"]:
        raise ValueError(f"{path}: empty file (a header but no result rows)")
    return layout, {
        name: np.asarray(column, dtype=np.int64 if name in layout.integers else np.float64)
        for name, column in values.items()
    }


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
        if results.radius_grid is not None:  # the ACR of a sequential run is a grid-ACR
            summaries[-1]["radius_grid"] = list(results.radius_grid)
    return summaries


def grid_notes(results_list: Sequence[Results], labels: Sequence[str] | None = None) -> str:
    """A line under a table for each sequential file: its ACR is a grid-ACR."""
    lines = [
        f"{name}: sequential at radii {', '.join(format_radius(r) for r in results.radius_grid)}"
        ": each radius is the largest of that grid certified, so its ACR is a grid-ACR "
        "(radii rounded down to the grid); between two grid radii certified accuracy is "
        "that of the larger."
        for name, results in zip(_labels_for(results_list, labels), results_list, strict=True)
        if results.radius_grid is not None
    ]
    return "".join(line + "\n" for line in lines)


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


# --- attack results: empirical robust and clean accuracy ---------------------------------------

# The attack writer rounds the norm columns UP to this many decimals (so they never understate).
NORM_DECIMALS = 6
# A row is inside the threat model when its norm column is <= eps * (1 + PERTURBATION_RTOL) plus
# one unit of the column's last decimal. The relative part absorbs float32 rounding of the
# projection (the attack contract); the absolute unit absorbs the rounding up of the column,
# which alone exceeds the relative part for small eps (Linf 8/255 on the boundary is written
# 0.031373 > 8/255 * (1 + 1e-5)). A true norm above eps * (1 + 1e-5) + 1e-6 is always refused.
PERTURBATION_RTOL = 1e-5
CONFIDENCE = 0.95
NORMS = ("l2", "linf")


@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class AttackResults:
    """The rows of one attack result file (file order) and the settings of its sidecar.

    `attack`, `norm`, `eps` and `sigma` come from the sidecar's ``settings``; `norm` and `eps`
    are None for ``--attack none``, `sigma` is None where the base classifier was attacked.
    """

    path: Path
    idx: np.ndarray = field(repr=False)
    label: np.ndarray = field(repr=False)
    predict: np.ndarray = field(repr=False)
    correct: np.ndarray = field(repr=False)
    clean_predict: np.ndarray = field(repr=False)
    clean_correct: np.ndarray = field(repr=False)
    l2: np.ndarray = field(repr=False)
    linf: np.ndarray = field(repr=False)
    attack: str = "none"
    norm: str | None = None
    eps: float | None = None
    sigma: float | None = None
    settings: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        """Number of rows (attacked examples)."""
        return int(self.idx.shape[0])

    @property
    def perturbation(self) -> np.ndarray:
        """The norm column of the threat model (l2 or linf); the l2 column for attack none."""
        return self.linf if self.norm == "linf" else self.l2


def sidecar_path(path: str | Path) -> Path:
    """The JSON settings file written beside a result TSV: ``NAME.tsv`` -> ``NAME.json``."""
    path = Path(path)
    stem = path.name[: -len(".tsv")] if path.name.endswith(".tsv") else path.name
    return path.with_name(stem + ".json")


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a result file as a dict, or None when there is none (Cohen's files).

    Raises ValueError naming the sidecar when it exists but is not a JSON object.
    """
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{sidecar}: not a valid JSON settings file ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings", {}), dict):
        raise ValueError(f"{sidecar}: not a settings file (expected an object with 'settings')")
    return record


def _positive_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _threat_model(path: Path) -> tuple[dict[str, Any], str, str | None, float | None, float | None]:
    """(settings, attack, norm, eps, sigma) of an attack file, from its sidecar, checked."""
    sidecar = sidecar_path(path)
    record = read_sidecar(path)
    if record is None:
        raise ValueError(
            f"{path}: its settings file {sidecar.name} is missing; without it the threat model "
            "(attack, norm, eps) is unknown and the rows cannot be checked against it"
        )
    if record.get("mode") != "attack":
        raise ValueError(
            f"{sidecar}: mode is {record.get('mode')!r}, not 'attack'; {path.name} has an "
            "attack result's columns but another run's settings"
        )
    settings = record.get("settings", {})
    attack = settings.get("attack")
    if not isinstance(attack, str) or not attack:
        raise ValueError(f"{sidecar}: settings give no attack name ('attack')")
    norm, eps = settings.get("norm"), settings.get("eps")
    if attack == "none":
        norm, eps = None, None
    else:
        if norm not in NORMS:
            raise ValueError(
                f"{sidecar}: attack {attack!r} with norm {norm!r}; expected 'l2' or 'linf'"
            )
        if not _positive_number(eps):
            raise ValueError(
                f"{sidecar}: attack {attack!r} with eps {eps!r}; expected a number > 0"
            )
        eps = float(eps)
    sigma = settings.get("sigma")
    if sigma is not None and not _positive_number(sigma):
        raise ValueError(f"{sidecar}: sigma {sigma!r} is neither null nor a number > 0")
    return settings, attack, norm, eps, None if sigma is None else float(sigma)


def perturbation_bound(eps: float) -> float:
    """The largest norm column accepted at radius eps (see PERTURBATION_RTOL)."""
    return eps * (1 + PERTURBATION_RTOL) + 10.0**-NORM_DECIMALS


def load_attack_results(path: str | Path) -> AttackResults:
    """Read one attack result file (TSV) and its JSON sidecar, and check them.

    Raises ValueError, naming the file, for the row-level faults of `load_results` (missing
    column, non-numeric or out-of-range value, repeated ``idx``), for a missing or unreadable
    sidecar, one whose mode is not ``attack`` or that gives no norm/eps (attack none aside),
    a row whose perturbation (the sidecar norm's column) exceeds `perturbation_bound(eps)`
    or, for attack none, is not zero, and a row whose ``correct`` or ``clean_correct``
    contradicts its prediction and label.
    """
    path = Path(path)
    _, columns = _load_table(path, (_ATTACK,))
    settings, attack, norm, eps, sigma = _threat_model(path)
    results = AttackResults(path=path, **columns, attack=attack, norm=norm, eps=eps,
                            sigma=sigma, settings=settings)
    idx = results.idx
    if eps is None:
        outside = np.flatnonzero((results.l2 > 0) | (results.linf > 0))
        if outside.size:
            i = outside[0]
            raise ValueError(
                f"{path}: idx {idx[i]} has a perturbation (l2 {results.l2[i]:.6f}, linf "
                f"{results.linf[i]:.6f}) but the attack is 'none'"
            )
    else:
        bound = perturbation_bound(eps)
        outside = np.flatnonzero(results.perturbation > bound)
        if outside.size:
            i = outside[0]
            shown = format_eps(eps, norm)
            raise ValueError(
                f"{path}: idx {idx[i]} has {norm} perturbation {results.perturbation[i]:.6f} > "
                f"eps {shown} (accepted up to {bound:.7f}); the attack left the threat model "
                f"({outside.size} row(s) outside), so its accuracy is not at eps {shown}"
            )
    # correct = [predict == label]; clean_correct too, except after a clean abstention, which
    # the base classifier's prediction (not in the file) scores (Choi et al. 2024, App. A.3).
    wrong = np.flatnonzero(results.correct != (results.predict == results.label))
    if wrong.size:
        i = wrong[0]
        raise ValueError(
            f"{path}: idx {idx[i]} has correct {results.correct[i]} but predict "
            f"{results.predict[i]} and label {results.label[i]}"
        )
    decided = results.clean_predict != -1
    wrong = np.flatnonzero(decided & (results.clean_correct != (results.clean_predict
                                                                == results.label)))
    if wrong.size:
        i = wrong[0]
        raise ValueError(
            f"{path}: idx {idx[i]} has clean_correct {results.clean_correct[i]} but "
            f"clean_predict {results.clean_predict[i]} and label {results.label[i]}"
        )
    return results


def load_any(path: str | Path) -> Results | AttackResults:
    """Read a CERTIFY or an attack result file, whichever its header says it is."""
    path = Path(path)
    layout, columns = _load_table(path, (_CERTIFY, _ATTACK))
    if layout is _CERTIFY:
        return Results(path=path, radius_grid=sequential_grid(path), **columns)
    return load_attack_results(path)


@dataclass(frozen=True)
class Proportion:
    """An estimated accuracy: `successes` of `n`, with its two-sided Clopper-Pearson interval."""

    successes: int
    n: int
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def value(self) -> float:
        return self.successes / self.n


def clopper_pearson(successes: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    """`successes` of `n` with the exact (Clopper-Pearson) two-sided interval at `confidence`."""
    from statsmodels.stats.proportion import proportion_confint

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="beta")
    return Proportion(int(successes), int(n), float(low), float(high), confidence)


def robust_accuracy(results: AttackResults, confidence: float = CONFIDENCE) -> Proportion:
    """Empirical robust accuracy: the fraction of rows still correct after the attack.

    An abstention (predict -1) counts as not robust.
    """
    return clopper_pearson(int(results.correct.sum()), results.n, confidence)


def clean_accuracy(results: AttackResults, confidence: float = CONFIDENCE) -> Proportion:
    """Empirical clean accuracy (Choi et al. 2024, App. A.3): the mean of ``clean_correct``."""
    return clopper_pearson(int(results.clean_correct.sum()), results.n, confidence)


def format_eps(eps: float | None, norm: str | None) -> str:
    """eps as a table shows it: 0.5, 1.0; Linf multiples of 1/255 as 8/255; '-' for none."""
    if eps is None:
        return "-"
    steps = eps * 255
    if norm == "linf" and eps < 1 and abs(steps - round(steps)) < 1e-6:
        return f"{round(steps)}/255"
    return format_radius(eps)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_interval(proportion: Proportion) -> str:
    """The interval in % with 1 decimal, rounded outward so that it holds the computed one."""
    low = math.floor(1000 * proportion.low) / 10
    high = math.ceil(1000 * proportion.high) / 10
    return f"[{low:.1f}, {high:.1f}]"


def _attack_cells(results: AttackResults) -> list[str]:
    """attack, norm, eps, sigma, clean %, its interval, robust %, its interval."""
    clean, robust = clean_accuracy(results), robust_accuracy(results)
    return [
        results.attack, results.norm or "-", format_eps(results.eps, results.norm),
        "-" if results.sigma is None else f"{results.sigma:g}",
        _percent(clean.value), format_interval(clean),
        _percent(robust.value), format_interval(robust),
    ]


_ATTACK_TITLE = (
    "Empirical clean and robust accuracy (%) with 95% Clopper-Pearson intervals; "
    "robust = still correct after the attack (an abstention is not robust)."
)


def _aligned(header: list[str], body: list[list[str]], left: int = 1) -> list[str]:
    """Rows aligned in columns: the first `left` columns to the left, the others to the right."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cell.ljust(width) if i < left else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(row) for row in body)]


def _attack_labels(attacks: Sequence[AttackResults], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [r.path.stem for r in attacks]
    if len(labels) != len(attacks):
        raise ValueError(f"{len(labels)} label(s) given for {len(attacks)} file(s)")
    return list(labels)


def attack_text_table(
    attacks: Sequence[AttackResults], labels: Sequence[str] | None = None
) -> str:
    """A plain-text table, one row per attack file: n, attack, norm, eps, sigma, accuracies."""
    header = ["file", "n", "attack", "norm", "eps", "sigma", "clean", "95% CI", "robust",
              "95% CI"]
    body = [[name, str(r.n), *_attack_cells(r)]
            for name, r in zip(_attack_labels(attacks, labels), attacks, strict=True)]
    return "\n".join([_ATTACK_TITLE, "", *_aligned(header, body)]) + "\n"


def attack_markdown_table(
    attacks: Sequence[AttackResults], labels: Sequence[str] | None = None
) -> str:
    """A Markdown table, one row per attack file (as `attack_text_table`)."""
    names = [name.replace("|", "\\|") for name in _attack_labels(attacks, labels)]
    header = ["File", "n", "Attack", "Norm", "ε", "σ", "Clean", "95% CI", "Robust", "95% CI"]
    lines = [
        _ATTACK_TITLE, "",
        "| " + " | ".join(header) + " |",
        "| --- | ---: | --- | --- | " + " | ".join("---:" for _ in header[4:]) + " |",
    ]
    for name, r in zip(names, attacks, strict=True):
        lines.append("| " + " | ".join([name, str(r.n), *_attack_cells(r)]) + " |")
    return "\n".join(lines) + "\n"


def attack_latex_table(
    attacks: Sequence[AttackResults], labels: Sequence[str] | None = None
) -> str:
    """A booktabs LaTeX tabular, one row per attack file; intervals beside the accuracies."""
    names = [_latex_escape(name) for name in _attack_labels(attacks, labels)]
    lines = [
        r"\begin{tabular}{lrllllcc}",
        r"\toprule",
        r"File & $n$ & Attack & Norm & $\varepsilon$ & $\sigma$ & Clean (\%) & Robust (\%) \\",
        r"\midrule",
    ]
    for name, r in zip(names, attacks, strict=True):
        attack, norm, eps, sigma, clean, clean_ci, robust, robust_ci = _attack_cells(r)
        norm = {"l2": r"$\ell_2$", "linf": r"$\ell_\infty$"}.get(norm, norm)
        cells = [name, str(r.n), _latex_escape(attack), norm, eps, sigma,
                 f"{clean} {clean_ci}", f"{robust} {robust_ci}"]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _proportion_json(proportion: Proportion) -> dict[str, Any]:
    return {"value": proportion.value, "successes": proportion.successes, "n": proportion.n,
            "interval": [proportion.low, proportion.high], "confidence": proportion.confidence}


# The attack settings a summary repeats from the sidecar (the rest stays in the sidecar).
_SUMMARY_SETTINGS = ("n", "alpha", "m_test", "steps", "step_size", "restarts", "seed")


def attack_summary_json(attacks: Sequence[AttackResults]) -> list[dict[str, Any]]:
    """One JSON-ready object per attack file: threat model, settings, accuracies, intervals.

    ``n`` is the number of rows; PREDICT's number of noise draws is ``settings.n``.
    """
    summaries = []
    for r in attacks:
        summaries.append({
            "file": str(r.path),
            "n": r.n,
            "attack": r.attack, "norm": r.norm, "eps": r.eps, "sigma": r.sigma,
            "settings": {key: r.settings.get(key) for key in _SUMMARY_SETTINGS},
            "max_perturbation": float(r.perturbation.max()),
            "clean_accuracy": _proportion_json(clean_accuracy(r)),
            "robust_accuracy": _proportion_json(robust_accuracy(r)),
        })
    return summaries


# --- the combined table: empirical robust (certified) accuracy, Choi et al. 2024 Tables 1-4 ---

# Settings that name the model and data; an attack and a certify sidecar that both record one
# must agree on it, or the two files are not of the same smoothed classifier.
SAME_MODEL_KEYS: tuple[str, ...] = (
    "model", "dataset", "split", "sigma", "denoiser", "classifier_weights_sha256",
)


@dataclass(frozen=True)
class CombinedCell:
    """One attack file at one eps, with the certify file of the same examples if any."""

    attack: AttackResults
    certify: Results | None

    @property
    def robust(self) -> Proportion:
        return robust_accuracy(self.attack)

    @property
    def clean(self) -> Proportion:
        return clean_accuracy(self.attack)

    @property
    def certified(self) -> float | None:
        """Certified accuracy at L2 radius eps (None without a certify file)."""
        if self.certify is None:
            return None
        return certified_accuracy(self.certify, [self.attack.eps])[self.attack.eps]

    @property
    def certified_clean(self) -> float | None:
        """Certified accuracy at radius 0: the clean accuracy of CERTIFY (None without one)."""
        return None if self.certify is None else certified_accuracy(self.certify, [0.0])[0.0]


@dataclass(frozen=True)
class CombinedTable:
    """Rows (label, {(norm, eps): cell}) and the (norm, eps) columns, L2 first, eps rising."""

    columns: list[tuple[str, float]]
    rows: list[tuple[str, dict[tuple[str, float], CombinedCell]]]


def _first(values: Iterable[int], limit: int = 5) -> str:
    values = sorted(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def check_pair(attack: AttackResults, certify: Results) -> None:
    """Refuse (ValueError naming both files) a certify file that is not of the attacked model
    and examples: another idx set, other labels, another recorded model, a Linf attack
    (certificates are L2 radii), or an attack on the base classifier (no sigma)."""
    where = f"{attack.path} and {certify.path}"
    if attack.norm != "l2":
        raise ValueError(
            f"{where}: {attack.path.name} is a {attack.norm} attack, but certified radii are "
            "L2; a certificate can stand beside L2 attacks only"
        )
    if attack.sigma is None:
        raise ValueError(
            f"{where}: {attack.path.name} attacked the base classifier (no sigma), while a "
            "certificate is of the smoothed classifier; pair it with none"
        )
    attacked, certified = set(attack.idx.tolist()), set(certify.idx.tolist())
    if attacked != certified:
        only_attack, only_certify = attacked - certified, certified - attacked
        parts = []
        if only_attack:
            parts.append(f"{len(only_attack)} idx only in {attack.path.name} "
                         f"({_first(only_attack)})")
        if only_certify:
            parts.append(f"{len(only_certify)} idx only in {certify.path.name} "
                         f"({_first(only_certify)})")
        raise ValueError(f"{where} are not of the same examples: {'; '.join(parts)}")
    certify_label = dict(zip(certify.idx.tolist(), certify.label.tolist(), strict=True))
    for index, label in zip(attack.idx.tolist(), attack.label.tolist(), strict=True):
        if certify_label[index] != label:
            raise ValueError(
                f"{where}: idx {index} has label {label} in {attack.path.name} but "
                f"{certify_label[index]} in {certify.path.name}; not the same data"
            )
    record = read_sidecar(certify.path)
    recorded = {} if record is None else record.get("settings", {})
    for key in SAME_MODEL_KEYS:
        if key in attack.settings and key in recorded and attack.settings[key] != recorded[key]:
            raise ValueError(
                f"{where}: {key} is {attack.settings[key]!r} in the attack's settings but "
                f"{recorded[key]!r} in the certify run's; not the same model"
            )


def combined_table(
    attacks: Sequence[AttackResults],
    certifies: Sequence[Results | None],
    labels: Sequence[str] | None = None,
) -> CombinedTable:
    """Pair attack file i with certify file i (or None) and lay them out as in Choi et al.

    Files with the same label form one row; each (norm, eps) of the attacks is a column.
    Labels default to the attack files' names. Raises ValueError for an attack without eps
    (attack none), two files of one row at the same eps, and a pair `check_pair` refuses.
    """
    if len(certifies) != len(attacks):
        raise ValueError(f"{len(certifies)} certify file(s) for {len(attacks)} attack file(s)")
    names = _attack_labels(attacks, labels)
    rows: dict[str, dict[tuple[str, float], CombinedCell]] = {}
    for name, attack, certify in zip(names, attacks, certifies, strict=True):
        if attack.eps is None:
            raise ValueError(
                f"{attack.path}: attack 'none' has no eps; the combined table has one column "
                "per eps (every attack file already carries its clean accuracy)"
            )
        if certify is not None:
            check_pair(attack, certify)
        column = (attack.norm, attack.eps)
        row = rows.setdefault(name, {})
        if column in row:
            raise ValueError(
                f"{row[column].attack.path} and {attack.path} are both {name!r} at "
                f"{attack.norm} eps {attack.eps:g}; give them different --labels"
            )
        row[column] = CombinedCell(attack, certify)
    columns = sorted({c for row in rows.values() for c in row},
                     key=lambda c: (NORMS.index(c[0]), c[1]))
    return CombinedTable(columns=columns, rows=list(rows.items()))


def _column_name(column: tuple[str, float]) -> str:
    norm, eps = column
    return f"{'L2' if norm == 'l2' else 'Linf'} {format_eps(eps, norm)}"


def _row_n(cells: dict[tuple[str, float], CombinedCell]) -> str:
    return "/".join(dict.fromkeys(str(cell.attack.n) for cell in cells.values()))


def _combined_cells(table: CombinedTable) -> list[list[tuple[str, str | None] | None]]:
    """Per row: per robust column then per clean column, (empirical %, certified % or None)."""
    out = []
    for _, cells in table.rows:
        robust, clean = [], []
        for column in table.columns:
            cell = cells.get(column)
            if cell is None:
                robust.append(None)
                clean.append(None)
                continue
            certified, certified_clean = cell.certified, cell.certified_clean
            robust.append((_percent(cell.robust.value),
                           None if certified is None else _percent(certified)))
            clean.append((_percent(cell.clean.value),
                           None if certified_clean is None else _percent(certified_clean)))
        out.append(robust + clean)
    return out


def _cell_text(cell: tuple[str, str | None] | None) -> str:
    if cell is None:
        return "-"
    empirical, certified = cell
    return empirical if certified is None else f"{empirical} ({certified})"


_COMBINED_TITLE = (
    "Empirical robust accuracy (%) under attack at eps, certified accuracy (%) at L2 radius "
    "eps in parentheses; clean accuracy (%) of the same runs, certified accuracy at radius 0 "
    "in parentheses (Choi et al. 2024, Tables 1-4)."
)


def combined_text_table(table: CombinedTable) -> str:
    """The combined table as aligned text: row, n, robust (certified) per eps, clean per eps."""
    header = ["row", "n", *(f"robust {_column_name(c)}" for c in table.columns),
              *(f"clean {_column_name(c)}" for c in table.columns)]
    body = [[label, _row_n(cells), *map(_cell_text, row)]
            for (label, cells), row in zip(table.rows, _combined_cells(table), strict=True)]
    return "\n".join([_COMBINED_TITLE, "", *_aligned(header, body)]) + "\n"


def combined_markdown_table(table: CombinedTable) -> str:
    """The combined table in Markdown."""
    header = ["Row", "n", *(f"Robust {_column_name(c)}" for c in table.columns),
              *(f"Clean {_column_name(c)}" for c in table.columns)]
    lines = [
        _COMBINED_TITLE.replace("eps", "ε"), "",
        "| " + " | ".join(header) + " |",
        "| --- | " + " | ".join("---:" for _ in header[1:]) + " |",
    ]
    for (label, cells), row in zip(table.rows, _combined_cells(table), strict=True):
        cells_text = [label.replace("|", "\\|"), _row_n(cells), *map(_cell_text, row)]
        lines.append("| " + " | ".join(cells_text) + " |")
    return "\n".join(lines) + "\n"


def combined_latex_table(table: CombinedTable) -> str:
    """The combined table as a booktabs tabular laid out as Choi et al. (2024), Table 3.

    The best printed empirical value and the best printed certified value of each column are
    bold (ties too). Needs ``\\usepackage{booktabs}``.
    """
    grid = _combined_cells(table)
    bold: list[list[str]] = [["-" if c is None else "" for c in row] for row in grid]
    for j in range(2 * len(table.columns)):
        present = [row[j] for row in grid if row[j] is not None]
        best_empirical = max((float(c[0]) for c in present), default=None)
        best_certified = max((float(c[1]) for c in present if c[1] is not None), default=None)
        for i, row in enumerate(grid):
            if row[j] is None:
                continue
            empirical, certified = row[j]
            text = rf"\textbf{{{empirical}}}" if float(empirical) == best_empirical else empirical
            if certified is not None:
                shown = (rf"\textbf{{{certified}}}" if float(certified) == best_certified
                         else certified)
                text += f" ({shown})"
            bold[i][j] = text
    k = len(table.columns)

    def heading(column: tuple[str, float]) -> str:
        norm, eps = column
        prefix = "" if norm == "l2" else r"$\ell_\infty$, "
        return prefix + rf"$\varepsilon={format_eps(eps, norm)}$"

    lines = [
        r"\begin{tabular}{lc" + "c" * (2 * k) + "}",
        r"\toprule",
        r" & & \multicolumn{" + str(k) + r"}{c}{Robust accuracy (\%)} & \multicolumn{" + str(k)
        + r"}{c}{Clean accuracy (\%)} \\",
        rf"\cmidrule(lr){{3-{2 + k}}}\cmidrule(lr){{{3 + k}-{2 + 2 * k}}}",
        " & ".join(["Method", "$n$", *(heading(c) for c in table.columns * 2)]) + r" \\",
        r"\midrule",
    ]
    for (label, cells), row in zip(table.rows, bold, strict=True):
        lines.append(" & ".join([_latex_escape(label), _row_n(cells), *row]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def combined_summary_json(table: CombinedTable) -> dict[str, Any]:
    """The combined table as a JSON-ready object: columns, and per row its cells' values."""
    rows = []
    for label, cells in table.rows:
        entries = []
        for (norm, eps), cell in sorted(cells.items(), key=lambda item:
                                        table.columns.index(item[0])):
            entries.append({
                "norm": norm, "eps": eps,
                "attack_file": str(cell.attack.path),
                "certify_file": None if cell.certify is None else str(cell.certify.path),
                "n": cell.attack.n, "attack": cell.attack.attack, "sigma": cell.attack.sigma,
                "robust_accuracy": _proportion_json(cell.robust),
                "clean_accuracy": _proportion_json(cell.clean),
                "certified_accuracy": cell.certified,
                "certified_clean_accuracy": cell.certified_clean,
            })
        rows.append({"label": label, "cells": entries})
    return {"columns": [{"norm": norm, "eps": eps} for norm, eps in table.columns],
            "rows": rows}
