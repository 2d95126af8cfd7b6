"""Tests of smoothing.analysis and the `analyze` command.

Known answers come from three places: the printed tables of the papers (Choi et al. 2024,
Table 7a; Cohen et al. 2019, ImageNet certified accuracies), hand computation on tiny files
written here, and an independent exact re-computation (fractions.Fraction on the raw text)
for the reference files of Cohen et al.
"""

from __future__ import annotations

import json
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cli.analyze import analyze_command
from smoothing import analysis
from tests.cli_helpers import invoke

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHOI = SHARED / "reference" / "choi2024"
COHEN = SHARED / "reference" / "cohen2019"

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"

# A hand-made CERTIFY file (Cohen's time format in seconds, plus two extra columns):
#   row 0: correct, radius 0.5
#   row 1: correct, radius 0.25 (exactly on a threshold: counts at 0.25)
#   row 2: abstain (predict -1, radius 0, correct 0)
#   row 3: wrong with a large radius 1.3 (never counts, but sets the file's largest radius)
#   row 4: correct, radius 1.0 (exactly on a threshold)
#   row 5: correct, radius 0.1
# Hand computation, n = 6 rows:
#   ACR = (0.5 + 0.25 + 1.0 + 0.1) / 6 = 1.85 / 6
#   certified accuracy: r=0 -> 4/6, 0.25 -> 3/6, 0.5 -> 2/6, 0.75 -> 1/6, 1.0 -> 1/6, 1.25 -> 0
HAND_ROWS = [
    ("0", "1", "1", "0.5", "1", "15.4"),
    ("1", "2", "2", "0.25", "1", "15.6"),
    ("2", "3", "-1", "0.0", "0", "16.0"),
    ("3", "4", "7", "1.3", "0", "15.9"),
    ("4", "5", "5", "1.0", "1", "16.2"),
    ("5", "6", "6", "0.1", "1", "15.1"),
]
HAND_ACR = 1.85 / 6
HAND_ACCURACY = {0.0: 4 / 6, 0.25: 3 / 6, 0.5: 2 / 6, 0.75: 1 / 6, 1.0: 1 / 6, 1.25: 0.0}

# A second hand-made file (hh:mm:ss time format, as in most of Cohen's files), n = 4:
#   correct radii 0.8 and 0.3, one abstain, one wrong.
#   ACR = 1.1 / 4 = 0.275; certified accuracy: 0 -> 2/4, 0.25 -> 2/4, 0.5 -> 1/4, 0.75 -> 1/4
OTHER_ROWS = [
    ("10", "0", "0", "0.8", "1", "0:04:31.864298"),
    ("11", "1", "1", "0.3", "1", "0:02:12.456987"),
    ("12", "2", "-1", "0.0", "0", "0:02:08.385143"),
    ("13", "3", "9", "0.6", "0", "0:02:10.000001"),
]
OTHER_ACR = 1.1 / 4
OTHER_ACCURACY = {0.0: 0.5, 0.25: 0.5, 0.5: 0.25, 0.75: 0.25}


def write_tsv(path: Path, header: str, rows: list[tuple[str, ...]]) -> Path:
    path.write_text(header + "\n" + "".join("\t".join(row) + "\n" for row in rows))
    return path


@pytest.fixture
def hand_file(tmp_path: Path) -> Path:
    rows = [(*row, "100000", f"0.{i}9") for i, row in enumerate(HAND_ROWS)]
    return write_tsv(tmp_path / "hand_run.tsv", HEADER + "\tcount\tpA", rows)


@pytest.fixture
def other_file(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "other_run.tsv", HEADER, OTHER_ROWS)


# click's runner catches what the command raises (exit code 1), as it does by default
run = partial(invoke, analyze_command, catch_exceptions=True)


def reference(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"reference result file {path} is not available on this machine")
    return path


# --- published numbers -------------------------------------------------------------------------

# Choi et al. (ECCV 2024), Table 7(a), ImageNet, adapted T2I + CLIP (last row of each sigma block).
CHOI_TABLE_7A = {
    "0.25": (0.303, {"0.0": 53.4, "0.25": 44.8, "0.5": 34.2, "0.75": 21.6}),
    "0.50": (0.409, {"0.0": 46.0, "0.25": 38.8, "0.5": 32.4, "0.75": 25.0, "1.0": 20.6,
                     "1.25": 15.4}),
}


@pytest.mark.parametrize("sigma", sorted(CHOI_TABLE_7A))
def test_reproduces_choi2024_table_7a(sigma: str) -> None:
    path = reference(CHOI / f"imagenet_clip_if2_adapted_sigma_{sigma}.tsv")
    acr, percent = CHOI_TABLE_7A[sigma]
    result = run(str(path), "--format", "json", "--radii", ",".join(percent))
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    assert summary["n"] == 500
    assert round(summary["acr"], 3) == acr
    measured = {key: round(100 * value, 1) for key, value in summary["certified_accuracy"].items()}
    assert measured == percent

    # The printed table shows the same figures, in the paper's precision and order.
    result = run(str(path), "--format", "markdown", "--radii", ",".join(percent))
    assert result.exit_code == 0, result.output
    expected_cells = [f"{acr:.3f}"] + [f"{value:.1f}" for value in percent.values()]
    assert "| " + " | ".join(expected_cells) + " |" in result.stdout


def test_default_radii_cover_table_7a_columns() -> None:
    paths = [reference(CHOI / f"imagenet_clip_if2_adapted_sigma_{s}.tsv") for s in CHOI_TABLE_7A]
    result = run(*map(str, paths))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # Largest radius over both files is 1.6 (sigma 0.50), so the grid stops at 1.5.
    header = next(line for line in lines if line.startswith("file"))
    assert header.split()[3:] == ["0.0", "0.25", "0.5", "0.75", "1.0", "1.25", "1.5"]
    row_25 = next(line for line in lines if "sigma_0.25" in line).split()
    assert row_25[1:7] == ["500", "0.303", "53.4", "44.8", "34.2", "21.6"]
    row_50 = next(line for line in lines if "sigma_0.50" in line).split()
    assert row_50[1:9] == ["500", "0.409", "46.0", "38.8", "32.4", "25.0", "20.6", "15.4"]


# Cohen et al. (ICML 2019), certified top-1 accuracy on ImageNet (ResNet-50, trained and
# certified at the same sigma), rounded to whole percent as printed in the paper, at radii
# 0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0. (The paper is not among seeds/: figures quoted from it.)
COHEN_IMAGENET = {
    "0.25": [67, 49, 0, 0, 0, 0, 0],
    "0.50": [57, 46, 37, 29, 0, 0, 0],
    "1.00": [44, 38, 33, 26, 19, 15, 12],
}


@pytest.mark.parametrize("sigma", sorted(COHEN_IMAGENET))
def test_reproduces_cohen2019_imagenet(sigma: str) -> None:
    path = reference(COHEN / f"imagenet_resnet50_noise_{sigma}_test_sigma_{sigma}.tsv")
    accuracy = analysis.certified_accuracy(analysis.load_results(path), [0, 0.5, 1, 1.5, 2, 2.5, 3])
    assert [round(100 * value) for value in accuracy.values()] == COHEN_IMAGENET[sigma]


def _exact_summary(path: Path, radii: list[str]) -> tuple[int, Fraction, dict[str, Fraction]]:
    """Independent of the module: plain string splitting and exact rational arithmetic."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    names = lines[0].split("\t")
    rows = [dict(zip(names, line.split("\t"), strict=True)) for line in lines[1:]]
    n = len(rows)
    acr = sum((Fraction(row["radius"]) for row in rows if row["correct"] == "1"), Fraction(0)) / n
    accuracy = {
        r: Fraction(
            sum(1 for row in rows if row["correct"] == "1"
                and Fraction(row["radius"]) >= Fraction(r)),
            n,
        )
        for r in radii
    }
    return n, acr, accuracy


def test_cohen2019_files_load_and_agree_with_exact_arithmetic() -> None:
    files = sorted(COHEN.glob("*.tsv")) if COHEN.is_dir() else []
    if not files:
        pytest.skip(f"reference result files of Cohen et al. are not available under {COHEN}")
    radii = ["0", "0.25", "0.5", "1", "2"]
    for path in files:
        results = analysis.load_results(path)
        n, acr, accuracy = _exact_summary(path, radii)
        assert results.n == n, path
        assert analysis.average_certified_radius(results) == pytest.approx(float(acr), abs=1e-12)
        measured = analysis.certified_accuracy(results, [float(r) for r in radii])
        assert measured == {float(r): float(value) for r, value in accuracy.items()}, path


# --- hand-made files ----------------------------------------------------------------------------


def test_load_results_reads_columns_by_name(hand_file: Path) -> None:
    results = analysis.load_results(hand_file)
    assert results.path == hand_file
    assert results.n == 6
    assert results.idx.tolist() == [0, 1, 2, 3, 4, 5]
    assert results.label.tolist() == [1, 2, 3, 4, 5, 6]
    assert results.predict.tolist() == [1, 2, -1, 7, 5, 6]
    assert results.radius.tolist() == [0.5, 0.25, 0.0, 1.3, 1.0, 0.1]
    assert results.correct.tolist() == [1, 1, 0, 0, 1, 1]


def test_hand_computed_acr_and_certified_accuracy(hand_file: Path) -> None:
    results = analysis.load_results(hand_file)
    assert analysis.average_certified_radius(results) == pytest.approx(HAND_ACR, rel=1e-12)
    assert analysis.certified_accuracy(results, HAND_ACCURACY) == HAND_ACCURACY


def test_column_order_does_not_matter(tmp_path: Path) -> None:
    order = [4, 3, 0, 5, 2, 1]  # correct radius idx time predict label
    names = HEADER.split("\t")
    shuffled = write_tsv(
        tmp_path / "shuffled.tsv",
        "note\t" + "\t".join(names[i] for i in order),
        [("x", *(row[i] for i in order)) for row in HAND_ROWS],
    )
    results = analysis.load_results(shuffled)
    assert results.predict.tolist() == [1, 2, -1, 7, 5, 6]
    assert analysis.average_certified_radius(results) == pytest.approx(HAND_ACR, rel=1e-12)
    assert analysis.certified_accuracy(results, HAND_ACCURACY) == HAND_ACCURACY


def test_both_time_formats(tmp_path: Path, other_file: Path) -> None:
    seconds = write_tsv(
        tmp_path / "seconds.tsv", HEADER, [(*row[:5], "15.4") for row in OTHER_ROWS]
    )
    for path in (other_file, seconds):
        results = analysis.load_results(path)
        assert analysis.average_certified_radius(results) == pytest.approx(OTHER_ACR, rel=1e-12)
        assert analysis.certified_accuracy(results, OTHER_ACCURACY) == OTHER_ACCURACY


def test_all_abstain_file(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "abstain.tsv", HEADER,
                     [(str(i), "3", "-1", "0.0", "0", "1.0") for i in range(3)])
    results = analysis.load_results(path)
    assert analysis.average_certified_radius(results) == 0.0
    assert analysis.certified_accuracy(results, [0.0, 0.5]) == {0.0: 0.0, 0.5: 0.0}
    assert analysis.default_radii([results]) == [0.0]


def test_curve_on_a_grid(hand_file: Path) -> None:
    results = analysis.load_results(hand_file)
    radii, fractions = analysis.certified_accuracy_curve(results, num=5, max_radius=1.0)
    assert radii.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fractions.tolist() == [4 / 6, 3 / 6, 2 / 6, 1 / 6, 1 / 6]
    # Default grid: 0 to the file's largest radius (1.3, a wrong row), non-increasing.
    radii, fractions = analysis.certified_accuracy_curve(results, num=131)
    assert radii[0] == 0.0 and radii[-1] == pytest.approx(1.3)
    assert np.all(np.diff(fractions) <= 0)
    assert fractions[0] == 4 / 6 and fractions[-1] == 0.0


def test_default_radii(hand_file: Path, other_file: Path) -> None:
    hand, other = analysis.load_results(hand_file), analysis.load_results(other_file)
    # Largest radius 1.3 (over all rows) -> grid up to 1.25.
    assert analysis.default_radii([hand]) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    # Largest radius 0.8 -> grid up to 0.75; over both files the larger maximum wins.
    assert analysis.default_radii([other]) == [0.0, 0.25, 0.5, 0.75]
    assert analysis.default_radii([other, hand]) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]


def test_default_radii_include_the_maximum_when_on_the_grid(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "top.tsv", HEADER, [("0", "1", "1", "0.75", "1", "2.0")])
    assert analysis.default_radii([analysis.load_results(path)]) == [0.0, 0.25, 0.5, 0.75]


def test_format_radius() -> None:
    assert [analysis.format_radius(r) for r in (0, 0.25, 0.5, 1, 1.25, 0.3)] == [
        "0.0", "0.25", "0.5", "1.0", "1.25", "0.3"
    ]


# --- output formats -----------------------------------------------------------------------------


def test_json_structure_and_values(hand_file: Path, other_file: Path) -> None:
    result = run(str(hand_file), str(other_file), "--format", "json", "--radii", "0.5,0,0.25")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [entry["file"] for entry in data] == [str(hand_file), str(other_file)]
    for entry in data:
        assert set(entry) == {"file", "n", "acr", "certified_accuracy"}
        assert list(entry["certified_accuracy"]) == ["0.0", "0.25", "0.5"]  # sorted radii
    hand, other = data
    assert hand["n"] == 6 and other["n"] == 4
    assert hand["acr"] == pytest.approx(HAND_ACR, rel=1e-12)
    assert other["acr"] == pytest.approx(OTHER_ACR, rel=1e-12)
    assert hand["certified_accuracy"] == {"0.0": 4 / 6, "0.25": 3 / 6, "0.5": 2 / 6}
    assert other["certified_accuracy"] == {"0.0": 0.5, "0.25": 0.5, "0.5": 0.25}


def test_summary_json_function(hand_file: Path) -> None:
    (entry,) = analysis.summary_json([analysis.load_results(hand_file)], [0.0, 1.0])
    assert entry["file"] == str(hand_file)
    assert entry["certified_accuracy"] == {"0.0": 4 / 6, "1.0": 1 / 6}
    json.dumps(entry)  # plain Python types only


def test_json_labels(hand_file: Path, other_file: Path) -> None:
    result = run(str(hand_file), str(other_file), "--format", "json", "--labels", "A,B")
    assert result.exit_code == 0, result.output
    assert [entry["label"] for entry in json.loads(result.stdout)] == ["A", "B"]


def test_markdown_table(hand_file: Path, other_file: Path) -> None:
    result = run(str(hand_file), str(other_file), "--format", "markdown", "--radii",
                 "0,0.25,0.5,0.75", "--labels", "hand,other")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "| File | n | ACR | ε=0.0 | ε=0.25 | ε=0.5 | ε=0.75 |" in lines
    # 1.85/6 = 0.3083; 4/6, 3/6, 2/6, 1/6 in percent.
    assert "| hand | 6 | 0.308 | 66.7 | 50.0 | 33.3 | 16.7 |" in lines
    assert "| other | 4 | 0.275 | 50.0 | 50.0 | 25.0 | 25.0 |" in lines


def test_default_table_is_readable(hand_file: Path) -> None:
    result = run(str(hand_file))
    assert result.exit_code == 0, result.output
    assert "ACR" in result.stdout and "Certified accuracy" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("hand_run"))
    assert row.split() == ["hand_run", "6", "0.308", "66.7", "50.0", "33.3", "16.7", "16.7", "0.0"]


def test_latex_table(hand_file: Path, other_file: Path) -> None:
    result = run(str(hand_file), str(other_file), "--format", "latex", "--radii", "0,0.25,0.5")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for command in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
        assert command in text
    assert r"Certified accuracy at $\varepsilon$ (\%)" in text
    lines = [line.strip() for line in text.splitlines()]
    # Best per column in bold: ACR 0.308 > 0.275; 66.7 > 50.0; 50.0 == 50.0 (both bold);
    # 33.3 > 25.0. File names escaped for LaTeX.
    assert (r"hand\_run & \textbf{0.308} & \textbf{66.7} & \textbf{50.0} & \textbf{33.3} \\"
            in lines)
    assert r"other\_run & 0.275 & 50.0 & \textbf{50.0} & 25.0 \\" in lines


def test_plot_writes_png_and_pdf(tmp_path: Path, hand_file: Path, other_file: Path) -> None:
    results = [analysis.load_results(hand_file), analysis.load_results(other_file)]
    written = analysis.plot_certified_accuracy(results, tmp_path / "figs" / "curve",
                                               labels=["hand", "other"])
    assert written == [tmp_path / "figs" / "curve.png", tmp_path / "figs" / "curve.pdf"]
    assert written[0].read_bytes().startswith(b"\x89PNG")
    assert written[1].read_bytes().startswith(b"%PDF")
    assert all(path.stat().st_size > 1000 for path in written)


def test_cli_plot(tmp_path: Path, hand_file: Path) -> None:
    stem = tmp_path / "cli_curve"
    result = run(str(hand_file), "--plot", str(stem), "--format", "json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the message about written files goes to stderr
    for suffix in (".png", ".pdf"):
        assert (tmp_path / f"cli_curve{suffix}").stat().st_size > 1000
    assert "cli_curve.png" in result.stderr


def test_analysis_does_not_import_matplotlib_at_import_time() -> None:
    import subprocess
    import sys

    code = "import sys, smoothing.analysis; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


# --- bad input ----------------------------------------------------------------------------------


def assert_one_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_loader_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.tsv"
    with pytest.raises(ValueError, match="missing.tsv"):
        analysis.load_results(missing)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        analysis.load_results(empty)
    header_only = write_tsv(tmp_path / "header_only.tsv", HEADER, [])
    with pytest.raises(ValueError, match="no result rows"):
        analysis.load_results(header_only)
    bad = write_tsv(tmp_path / "bad.tsv", HEADER,
                    [HAND_ROWS[0], ("1", "2", "2", "zero", "1", "1.0")])
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: column 'radius'.*'zero'"):
        analysis.load_results(bad)
    bad_correct = write_tsv(tmp_path / "c.tsv", HEADER, [("0", "1", "1", "0.5", "2", "1.0")])
    with pytest.raises(ValueError, match="line 2: column 'correct' must be 0 or 1"):
        analysis.load_results(bad_correct)
    negative = write_tsv(tmp_path / "n.tsv", HEADER, [("0", "1", "1", "-0.5", "1", "1.0")])
    with pytest.raises(ValueError, match="line 2: column 'radius'"):
        analysis.load_results(negative)
    short = write_tsv(tmp_path / "s.tsv", HEADER, [("0", "1", "1")])
    with pytest.raises(ValueError, match="line 2: 3 field"):
        analysis.load_results(short)


def test_predict_file_is_rejected_with_a_clear_error(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "predict_run.tsv", "idx\tlabel\tpredict\tcorrect\ttime",
                     [("0", "1", "1", "1", "0.3"), ("1", "2", "-1", "0", "0.3")])
    with pytest.raises(ValueError, match="radius.*PREDICT"):
        analysis.load_results(path)
    assert_one_error(run(str(path)), "predict_run.tsv", "radius", "PREDICT")


def test_cli_missing_file(tmp_path: Path) -> None:
    assert_one_error(run(str(tmp_path / "nope.tsv")), "nope.tsv")


def test_cli_no_file() -> None:
    assert_one_error(run(), "FILE")


def test_cli_missing_column(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "cols.tsv", "idx\tlabel\tpredict\tradius\ttime",
                     [("0", "1", "1", "0.5", "1.0")])
    assert_one_error(run(str(path)), "cols.tsv", "correct")


def test_cli_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.tsv"
    path.write_text("")
    assert_one_error(run(str(path)), "empty.tsv", "empty")


def test_cli_non_numeric_value(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "nan.tsv", HEADER, [("0", "one", "1", "0.5", "1", "1.0")])
    assert_one_error(run(str(path)), "nan.tsv", "line 2", "label")


@pytest.mark.parametrize("radii", ["0,abc", "-0.5", "0,,1", "inf", ""])
def test_cli_bad_radii(hand_file: Path, radii: str) -> None:
    assert_one_error(run(str(hand_file), "--radii", radii), "--radii")


def test_cli_label_count_mismatch(hand_file: Path) -> None:
    assert_one_error(run(str(hand_file), "--labels", "a,b"), "--labels")


def test_cli_bad_format(hand_file: Path) -> None:
    assert_one_error(run(str(hand_file), "--format", "html"), "--format")


def test_help_explains_the_measures() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "ACR (average certified radius)" in result.stdout
    assert "Certified accuracy at radius r" in result.stdout
    for option in ("--radii", "--format", "--plot", "--labels"):
        assert option in result.stdout


def test_a_repeated_idx_is_refused_not_counted_twice(tmp_path):
    # two examples, three rows: counting the repeat would report n = 3
    path = tmp_path / "run.tsv"
    path.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        "0\t1\t1\t0.5\t1\t0.1\n"
        "1\t0\t0\t0.3\t1\t0.1\n"
        "0\t1\t1\t0.5\t1\t0.1\n"
    )
    with pytest.raises(ValueError, match=r"line 4: idx 0 already appears on line 2"):
        analysis.load_results(path)
    refused = run(str(path))
    assert refused.exit_code == 2 and "idx 0" in refused.output
