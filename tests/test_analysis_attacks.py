"""Tests of `analyze` on attack result files (issue 8, section 4).

Known answers: Clopper-Pearson intervals against scipy's beta quantiles and the closed forms
at 0/n and n/n; accuracies counted by hand on small files written here (in the attack
contract's layout: TSV + JSON sidecar); and the certified cells of Choi et al. (2024),
Table 3 ("Ours": 34.2, 20.6 at eps 0.5, 1.0; 53.4, 46.0 at radius 0), which come from the
authors' CERTIFY files in ../shared/reference. No attack file of the paper exists, so the
empirical cells of that test are synthetic attack files made to hold the paper's counts
(42.6% = 213/500, ...); what is tested there is the pairing and the layout.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta

from cli.analyze import analyze_command
from smoothing import analysis
from smoothing.runner import COLUMNS, ResultFile
from tests.cli_helpers import invoke
from tests.test_analysis import CHOI, assert_one_error, reference

ATTACK_HEADER = ("idx", "label", "predict", "correct", "time", "clean_predict",
                 "clean_correct", "l2", "linf")

# Eight digits attacked with SmoothAdv at L2 eps 0.5, sigma 0.25 (hand-made):
#   robust: rows 0-4 correct; row 5 abstains on x_adv (not robust); rows 6, 7 wrong -> 5/8
#   clean: rows 0-5 decided and correct; row 6 abstains on x and the base classifier is
#   right (clean_correct 1, App. A.3); row 7 wrong -> 7/8
HAND_ROWS = [
    (0, 1, 1, 1, "2.1", 1, 1, "0.500000", "0.210000"),
    (1, 2, 2, 1, "2.0", 2, 1, "0.431200", "0.190000"),
    (2, 3, 3, 1, "2.2", 3, 1, "0.500001", "0.300000"),
    (3, 4, 4, 1, "2.0", 4, 1, "0.500000", "0.280000"),
    (4, 5, 5, 1, "2.3", 5, 1, "0.499999", "0.250000"),
    (5, 6, -1, 0, "2.0", 6, 1, "0.500000", "0.330000"),
    (6, 7, 1, 0, "2.1", -1, 1, "0.500000", "0.270000"),
    (7, 8, 3, 0, "2.0", 2, 0, "0.500000", "0.300000"),
]
SMOOTHADV = {"attack": "smoothadv", "norm": "l2", "eps": 0.5, "sigma": 0.25, "n": 100,
             "alpha": 0.001, "m_test": 32, "steps": 100, "step_size": 0.5 * 4 / 3 / 100,
             "restarts": 1, "seed": 0, "model": "digits-sigma0.25", "dataset": "digits"}


def write_attack(stem: Path, rows, settings: dict | None = SMOOTHADV, mode: str = "attack",
                 header=ATTACK_HEADER) -> Path:
    """An attack result as the contract lays it out: STEM.tsv and its sidecar STEM.json."""
    tsv = stem.with_name(stem.name + ".tsv")
    tsv.write_text("\t".join(header) + "\n"
                   + "".join("\t".join(map(str, row)) + "\n" for row in rows))
    if settings is not None:
        stem.with_name(stem.name + ".json").write_text(
            json.dumps({"mode": mode, "settings": settings}))
    return tsv


def write_certify(stem: Path, rows, settings: dict | None = None) -> Path:
    tsv = stem.with_name(stem.name + ".tsv")
    tsv.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                   + "".join("\t".join(map(str, row)) + "\n" for row in rows))
    if settings is not None:
        stem.with_name(stem.name + ".json").write_text(
            json.dumps({"mode": "certify", "settings": settings}))
    return tsv


# click's runner catches what the command raises (exit code 1), as it does by default
run = partial(invoke, analyze_command, catch_exceptions=True)


@pytest.fixture
def hand_file(tmp_path: Path) -> Path:
    return write_attack(tmp_path / "smoothadv_0.5", HAND_ROWS)


# --- Clopper-Pearson -----------------------------------------------------------------------------


def scipy_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact interval from the beta quantiles (Clopper and Pearson 1934), written out."""
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else beta.ppf(tail, k, n - k + 1)
    high = 1.0 if k == n else beta.ppf(1 - tail, k + 1, n - k)
    return float(low), float(high)


@pytest.mark.parametrize(("k", "n"), [(3, 10), (5, 8), (7, 8), (213, 500), (1, 1000)])
def test_clopper_pearson_matches_beta_quantiles(k: int, n: int) -> None:
    estimate = analysis.clopper_pearson(k, n)
    assert (estimate.successes, estimate.n, estimate.value) == (k, n, k / n)
    assert (estimate.low, estimate.high) == pytest.approx(scipy_interval(k, n), rel=1e-9)
    assert estimate.low < k / n < estimate.high


@pytest.mark.parametrize("n", [1, 8, 500])
def test_clopper_pearson_edges_have_closed_forms(n: int) -> None:
    # 0/n: [0, 1 - (alpha/2)^(1/n)]; n/n: [(alpha/2)^(1/n), 1]
    none = analysis.clopper_pearson(0, n)
    assert none.low == 0.0
    assert none.high == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
    every = analysis.clopper_pearson(n, n)
    assert every.high == 1.0
    assert every.low == pytest.approx(0.025 ** (1 / n), rel=1e-9)


def test_clopper_pearson_refuses_impossible_counts() -> None:
    for k, n in ((-1, 5), (6, 5), (0, 0)):
        with pytest.raises(ValueError):
            analysis.clopper_pearson(k, n)


# --- reading attack files ------------------------------------------------------------------------


def test_hand_counted_accuracies(hand_file: Path) -> None:
    results = analysis.load_attack_results(hand_file)
    assert (results.attack, results.norm, results.eps, results.sigma) == (
        "smoothadv", "l2", 0.5, 0.25)
    assert results.n == 8
    robust, clean = analysis.robust_accuracy(results), analysis.clean_accuracy(results)
    assert (robust.successes, robust.value) == (5, 5 / 8)
    assert (clean.successes, clean.value) == (7, 7 / 8)
    assert (robust.low, robust.high) == pytest.approx(scipy_interval(5, 8), rel=1e-9)
    assert (clean.low, clean.high) == pytest.approx(scipy_interval(7, 8), rel=1e-9)
    # load_any tells the kinds apart by the header
    assert isinstance(analysis.load_any(hand_file), analysis.AttackResults)


def test_a_file_written_by_the_result_writer_reads_back(tmp_path: Path) -> None:
    assert COLUMNS["attack"] == ATTACK_HEADER  # the shared contract
    writer = ResultFile(tmp_path / "written", "attack", dict(SMOOTHADV))
    writer.open({})
    for row in HAND_ROWS:
        writer.append(dict(zip(ATTACK_HEADER, row, strict=True)))
    writer.close(finished=True)
    results = analysis.load_attack_results(writer.tsv)
    assert results.idx.tolist() == list(range(8))
    assert results.clean_predict.tolist() == [1, 2, 3, 4, 5, 6, -1, 2]
    assert analysis.robust_accuracy(results).successes == 5
    assert analysis.clean_accuracy(results).successes == 7


def test_table_shows_settings_and_intervals_rounded_outward(hand_file: Path) -> None:
    result = run(str(hand_file))
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("smoothadv_0.5"))
    low, high = scipy_interval(5, 8)
    clean_low, clean_high = scipy_interval(7, 8)
    expected = ["smoothadv_0.5", "8", "smoothadv", "l2", "0.5", "0.25",
                "87.5", f"[{math.floor(1000 * clean_low) / 10:.1f},",
                f"{math.ceil(1000 * clean_high) / 10:.1f}]",
                "62.5", f"[{math.floor(1000 * low) / 10:.1f},",
                f"{math.ceil(1000 * high) / 10:.1f}]"]
    assert row.split() == expected
    # 5/8: [0.2449, 0.9148] -> printed [24.4, 91.5] holds it (nearest rounding gives 24.5)
    assert expected[-3:] == ["62.5", "[24.4,", "91.5]"]


def test_json_summary(hand_file: Path) -> None:
    result = run(str(hand_file), "--format", "json", "--labels", "SmoothAdv")
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    assert summary["label"] == "SmoothAdv"
    assert (summary["n"], summary["attack"], summary["norm"], summary["eps"], summary["sigma"]) \
        == (8, "smoothadv", "l2", 0.5, 0.25)
    assert summary["settings"]["n"] == 100 and summary["settings"]["m_test"] == 32
    assert summary["max_perturbation"] == 0.500001
    assert summary["robust_accuracy"]["value"] == 5 / 8
    assert summary["robust_accuracy"]["interval"] == pytest.approx(scipy_interval(5, 8))
    assert summary["clean_accuracy"]["successes"] == 7
    assert summary["clean_accuracy"]["confidence"] == 0.95


def test_markdown_and_latex(hand_file: Path, tmp_path: Path) -> None:
    linf = write_attack(tmp_path / "pgd_linf", [(0, 1, 1, 1, "0.1", 1, 1, "0.700000", "0.031373")],
                        {"attack": "pgd", "norm": "linf", "eps": 8 / 255, "sigma": None})
    result = run(str(hand_file), str(linf), "--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "| smoothadv_0.5 | 8 | smoothadv | l2 | 0.5 | 0.25 | 87.5 |" in lines[4]
    assert "| pgd_linf | 1 | pgd | linf | 8/255 | - | 100.0 | [2.5, 100.0] | 100.0 |" in lines[5]
    result = run(str(hand_file), str(linf), "--format", "latex", "--labels", "a_b,c")
    assert result.exit_code == 0, result.output
    assert r"a\_b & 8 & smoothadv & $\ell_2$ & 0.5 & 0.25 & 87.5 [" in result.stdout
    assert r"c & 1 & pgd & $\ell_\infty$ & 8/255 & - & 100.0 [2.5, 100.0]" in result.stdout


def test_attack_none_has_no_threat_model(tmp_path: Path) -> None:
    path = write_attack(tmp_path / "none", [(0, 1, 1, 1, "0.1", 1, 1, "0.000000", "0.000000"),
                                            (1, 1, 0, 0, "0.1", 0, 0, "0.000000", "0.000000")],
                        {"attack": "none", "norm": None, "eps": None, "sigma": None})
    results = analysis.load_attack_results(path)
    assert (results.norm, results.eps) == (None, None)
    assert analysis.robust_accuracy(results).value == 0.5
    result = run(str(path))
    assert result.exit_code == 0, result.output
    assert next(line for line in result.stdout.splitlines() if line.startswith("none")).split()[
        2:6] == ["none", "-", "-", "-"]


# --- the threat model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "eps", "l2", "linf", "inside"),
    [
        ("l2", 0.5, "0.500005", "9.000000", True),   # within eps (1 + 1e-5); linf not checked
        ("l2", 0.5, "0.500007", "0.000000", False),  # beyond eps (1 + 1e-5) + 1e-6
        # Linf on the boundary: float32(8/255) rounded UP to 6 decimals is 0.031373, above
        # 8/255 * (1 + 1e-5) = 0.0313729 but within one unit of the column's last decimal
        ("linf", 8 / 255, "4.000000", "0.031373", True),
        ("linf", 8 / 255, "0.000000", "0.031375", False),
        ("linf", 4 / 255, "0.000000", "0.015687", True),
        ("linf", 4 / 255, "0.000000", "0.015700", False),
    ],
)
def test_a_row_outside_the_threat_model_is_refused(tmp_path, norm, eps, l2, linf, inside):
    rows = [HAND_ROWS[0][:7] + ("0.100000", "0.010000"), (3, 4, 4, 1, "2.0", 4, 1, l2, linf)]
    path = write_attack(tmp_path / "run", rows, {**SMOOTHADV, "norm": norm, "eps": eps})
    if inside:
        assert analysis.load_attack_results(path).n == 2
        assert run(str(path)).exit_code == 0
        return
    value = linf if norm == "linf" else l2
    with pytest.raises(ValueError, match=rf"idx 3 has {norm} perturbation {value} > eps"):
        analysis.load_attack_results(path)
    assert_one_error(run(str(path)), str(path), "idx 3", value)


def test_a_perturbation_under_attack_none_is_refused(tmp_path: Path) -> None:
    path = write_attack(tmp_path / "none", [(4, 1, 1, 1, "0.1", 1, 1, "0.000000", "0.000001")],
                        {"attack": "none", "norm": None, "eps": None, "sigma": None})
    assert_one_error(run(str(path)), "none.tsv", "idx 4", "'none'")


# --- refusals ------------------------------------------------------------------------------------


def test_missing_sidecar_is_refused(tmp_path: Path) -> None:
    path = write_attack(tmp_path / "bare", HAND_ROWS, settings=None)
    assert_one_error(run(str(path)), "bare.tsv", "bare.json", "missing")


@pytest.mark.parametrize(
    ("settings", "mode", "fragments"),
    [
        ({**SMOOTHADV, "eps": None}, "attack", ["eps None"]),
        ({k: v for k, v in SMOOTHADV.items() if k != "eps"}, "attack", ["eps None"]),
        ({**SMOOTHADV, "eps": -0.5}, "attack", ["eps -0.5"]),
        ({**SMOOTHADV, "eps": True}, "attack", ["eps True"]),
        ({**SMOOTHADV, "norm": None}, "attack", ["norm None"]),
        ({**SMOOTHADV, "norm": "l1"}, "attack", ["norm 'l1'"]),
        ({k: v for k, v in SMOOTHADV.items() if k != "attack"}, "attack", ["no attack name"]),
        ({**SMOOTHADV, "sigma": 0}, "attack", ["sigma 0"]),
        (SMOOTHADV, "certify", ["mode is 'certify'"]),
    ],
)
def test_sidecar_without_a_threat_model_is_refused(tmp_path, settings, mode, fragments):
    path = write_attack(tmp_path / "run", HAND_ROWS, settings, mode=mode)
    assert_one_error(run(str(path)), "run.json", *fragments)


def test_sidecar_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = write_attack(tmp_path / "run", HAND_ROWS)
    (tmp_path / "run.json").write_text("{not json")
    assert_one_error(run(str(path)), "run.json", "not a valid JSON")


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ((1, 2, 2, 2, "0.1", 2, 1, "0.1", "0.1"), ["line 3", "'correct' must be 0 or 1"]),
        ((1, 2, 2, 1, "0.1", 2, "yes", "0.1", "0.1"), ["line 3", "'clean_correct'", "'yes'"]),
        ((1, 2, 2, 1, "0.1", 2.5, 1, "0.1", "0.1"), ["line 3", "'clean_predict'"]),
        ((1, 2, 2, 1, "0.1", 2, 1, "-0.1", "0.1"), ["line 3", "'l2' must be a finite"]),
        ((1, 2, 2, 1, "0.1", 2, 1, "0.1", "nan"), ["line 3", "'linf' must be a finite"]),
        ((1, 2, 2, 1, "0.1", 2, 1), ["line 3", "7 field(s)"]),
        ((0, 2, 2, 1, "0.1", 2, 1, "0.1", "0.1"), ["line 3", "idx 0 already appears on line 2"]),
        ((1, 2, 3, 1, "0.1", 2, 1, "0.1", "0.1"), ["idx 1 has correct 1 but predict 3"]),
        ((1, 2, 2, 1, "0.1", 2, 0, "0.1", "0.1"), ["idx 1 has clean_correct 0 but clean_pred"]),
    ],
    ids=["correct-2", "clean-text", "fraction", "negative-norm", "nan-norm", "short",
         "duplicate-idx", "correct-contradicts", "clean-contradicts"],
)
def test_malformed_rows_are_refused(tmp_path, row, fragments):
    path = write_attack(tmp_path / "bad", [HAND_ROWS[0], row])
    with pytest.raises(ValueError):
        analysis.load_attack_results(path)
    assert_one_error(run(str(path)), "bad.tsv", *fragments)


def test_load_results_names_an_attack_file(hand_file: Path) -> None:
    with pytest.raises(ValueError, match="missing column.*radius.*attack result"):
        analysis.load_results(hand_file)


def test_mixing_certify_and_attack_files_needs_certified(tmp_path, hand_file) -> None:
    certify = write_certify(tmp_path / "certify", [(0, 1, 1, "0.7", 1, "1.0")])
    assert_one_error(run(str(hand_file), str(certify)), "attack result", "CERTIFY result",
                     "--certified")


@pytest.mark.parametrize("option", [["--radii", "0,0.5"], ["--plot", "PLOT"]])
def test_certify_only_options_are_refused_for_attack_files(tmp_path, hand_file, option):
    if option[0] == "--plot":
        option = ["--plot", str(tmp_path / "plot")]
    assert_one_error(run(str(hand_file), *option), option[0], "CERTIFY")
    assert not list(tmp_path.glob("plot*"))


# --- the combined table (Choi et al. 2024, Tables 1-4) -------------------------------------------


def attack_like(certify_tsv: Path, stem: Path, eps: float, robust: int, clean: int,
                sigma: float | None, attack: str = "smoothadv") -> Path:
    """An attack file on the examples (idx, label) of `certify_tsv`: the first `robust` rows
    robust, the first `clean` rows clean-correct, every perturbation exactly eps."""
    lines = [line.split("\t") for line in certify_tsv.read_text().splitlines() if line.strip()]
    position = {name: lines[0].index(name) for name in ("idx", "label")}
    rows = []
    for k, fields in enumerate(lines[1:]):
        index, label = int(fields[position["idx"]]), int(fields[position["label"]])
        rows.append((index, label, label if k < robust else label + 1, int(k < robust), "1.0",
                     label if k < clean else label + 1, int(k < clean), f"{eps:.6f}", "0.5"))
    return write_attack(stem, rows, {**SMOOTHADV, "attack": attack, "eps": eps, "sigma": sigma,
                                     "model": "clip-b32", "dataset": "imagenet"})


def table3_files(tmp_path: Path) -> list[str]:
    """Choi et al. (2024) Table 3, rows CLIP and Ours: the arguments of `analyze`."""
    sigma25 = reference(CHOI / "imagenet_clip_if2_adapted_sigma_0.25.tsv")
    sigma50 = reference(CHOI / "imagenet_clip_if2_adapted_sigma_0.50.tsv")
    files = [
        attack_like(sigma25, tmp_path / "clip_0.5", 0.5, 7, 291, None, "pgd"),  # 1.4, 58.2
        attack_like(sigma25, tmp_path / "clip_1.0", 1.0, 1, 291, None, "pgd"),  # 0.2, 58.2
        attack_like(sigma25, tmp_path / "ours_0.5", 0.5, 213, 288, 0.25),  # 42.6, 57.6
        attack_like(sigma50, tmp_path / "ours_1.0", 1.0, 157, 281, 0.50),  # 31.4, 56.2
    ]
    return [*map(str, files), "--certified", "none", "--certified", "none",
            "--certified", str(sigma25), "--certified", str(sigma50),
            "--labels", "CLIP,CLIP,Ours,Ours"]


def test_combined_table_reproduces_choi2024_table_3_certified_cells(tmp_path: Path) -> None:
    result = run(*table3_files(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("row"))
    assert header.split() == ["row", "n", "robust", "L2", "0.5", "robust", "L2", "1.0",
                              "clean", "L2", "0.5", "clean", "L2", "1.0"]
    clip = next(line for line in lines if line.startswith("CLIP")).split()
    assert clip == ["CLIP", "500", "1.4", "0.2", "58.2", "58.2"]
    ours = next(line for line in lines if line.startswith("Ours"))
    # Table 3 "Ours": 42.6 (34.2) | 31.4 (20.6) | 57.6 (53.4) | 56.2 (46.0); the parentheses
    # are certified accuracy at eps and at 0 of the authors' CERTIFY files (sigma 0.25, 0.50)
    assert ours.split("  ")[0] == "Ours"
    assert [cell.strip() for cell in ours.split("  ") if cell.strip()][2:] == [
        "42.6 (34.2)", "31.4 (20.6)", "57.6 (53.4)", "56.2 (46.0)"]


def test_combined_markdown_latex_and_json(tmp_path: Path) -> None:
    files = table3_files(tmp_path)
    markdown = run(*files, "--format", "markdown")
    assert markdown.exit_code == 0, markdown.output
    assert "| Row | n | Robust L2 0.5 | Robust L2 1.0 | Clean L2 0.5 | Clean L2 1.0 |" \
        in markdown.stdout
    assert "| Ours | 500 | 42.6 (34.2) | 31.4 (20.6) | 57.6 (53.4) | 56.2 (46.0) |" \
        in markdown.stdout
    latex = run(*files, "--format", "latex")
    assert latex.exit_code == 0, latex.output
    # bold: the best empirical and the best certified value of each column
    assert (r"CLIP & 500 & 1.4 & 0.2 & \textbf{58.2} & \textbf{58.2} \\") in latex.stdout
    assert (r"Ours & 500 & \textbf{42.6} (\textbf{34.2}) & \textbf{31.4} (\textbf{20.6}) & "
            r"57.6 (\textbf{53.4}) & 56.2 (\textbf{46.0}) \\") in latex.stdout
    assert r"\multicolumn{2}{c}{Robust accuracy (\%)}" in latex.stdout
    document = run(*files, "--format", "json")
    assert document.exit_code == 0, document.output
    summary = json.loads(document.stdout)
    assert summary["columns"] == [{"norm": "l2", "eps": 0.5}, {"norm": "l2", "eps": 1.0}]
    clip, ours = summary["rows"]
    assert clip["label"] == "CLIP" and clip["cells"][0]["certified_accuracy"] is None
    first, second = ours["cells"]
    assert first["certified_accuracy"] == 171 / 500 and first["certified_clean_accuracy"] \
        == 267 / 500
    assert second["certified_accuracy"] == 103 / 500 and second["certified_clean_accuracy"] \
        == 230 / 500
    assert first["robust_accuracy"]["interval"] == pytest.approx(scipy_interval(213, 500))
    assert second["certify_file"].endswith("sigma_0.50.tsv")


def test_certified_cell_is_certified_accuracy_at_eps(tmp_path: Path) -> None:
    # hand-made: radii 0.6 (correct), 0.5 (correct, on the threshold), 0.4, abstain
    certify = write_certify(tmp_path / "certify", [
        (0, 1, 1, "0.6", 1, "1"), (1, 2, 2, "0.5", 1, "1"), (2, 3, 3, "0.4", 1, "1"),
        (3, 4, -1, "0.0", 0, "1"),
    ])
    attack = write_attack(tmp_path / "attack", [
        (0, 1, 1, 1, "1", 1, 1, "0.5", "0.1"), (1, 2, 0, 0, "1", 2, 1, "0.5", "0.1"),
        (2, 3, 3, 1, "1", 3, 1, "0.5", "0.1"), (3, 4, 4, 1, "1", -1, 0, "0.5", "0.1"),
    ])
    table = analysis.combined_table([analysis.load_attack_results(attack)],
                                    [analysis.load_results(certify)])
    (label, cells), = table.rows
    cell = cells[("l2", 0.5)]
    assert (cell.robust.value, cell.clean.value) == (3 / 4, 3 / 4)
    assert (cell.certified, cell.certified_clean) == (2 / 4, 3 / 4)
    assert label == "attack"


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    certify = write_certify(tmp_path / "certify", [(i, i + 1, i + 1, "0.7", 1, "1.0")
                                                   for i in range(8)])
    return write_attack(tmp_path / "attack", HAND_ROWS), certify


def test_combined_refuses_other_examples(tmp_path, pair) -> None:
    attack, _ = pair
    certify = write_certify(tmp_path / "other", [(i, i + 1, i + 1, "0.7", 1, "1.0")
                                                 for i in range(2, 12)])
    assert_one_error(run(str(attack), "--certified", str(certify)), "not of the same examples",
                     "2 idx only in attack.tsv (0, 1)", "4 idx only in other.tsv (8, 9, 10, 11)")


def test_combined_refuses_other_labels(tmp_path, pair) -> None:
    attack, _ = pair
    certify = write_certify(tmp_path / "other", [(i, 0, 0, "0.7", 1, "1.0") for i in range(8)])
    assert_one_error(run(str(attack), "--certified", str(certify)), "idx 0 has label 1",
                     "but 0 in other.tsv")


def test_combined_refuses_another_recorded_model(tmp_path) -> None:
    attack = write_attack(tmp_path / "attack", HAND_ROWS)
    certify = write_certify(tmp_path / "certify", [(i, i + 1, i + 1, "0.7", 1, "1.0")
                                                   for i in range(8)],
                            {"model": "digits-sigma0.25", "sigma": 0.5, "dataset": "digits"})
    assert_one_error(run(str(attack), "--certified", str(certify)), "sigma is 0.25",
                     "0.5 in the certify run's")


@pytest.mark.parametrize(
    ("settings", "fragments"),
    [
        ({**SMOOTHADV, "norm": "linf", "eps": 0.5}, ["linf attack", "L2"]),
        ({**SMOOTHADV, "sigma": None}, ["base classifier", "pair it with none"]),
    ],
)
def test_combined_refuses_a_certificate_that_cannot_apply(tmp_path, pair, settings, fragments):
    _, certify = pair
    attack = write_attack(tmp_path / "attack", HAND_ROWS, settings)
    assert_one_error(run(str(attack), "--certified", str(certify)), *fragments)
    assert run(str(attack), "--certified", "none").exit_code == 0


def test_combined_refuses_two_files_in_one_cell_and_attack_none(tmp_path, pair) -> None:
    attack, certify = pair
    twin = write_attack(tmp_path / "twin", HAND_ROWS)
    assert_one_error(run(str(attack), str(twin), "--certified", "none", "--certified", "none",
                         "--labels", "A,A"), "both 'A'", "different --labels")
    assert run(str(attack), str(twin), "--certified", "none", "--certified", "none",
               "--labels", "A,B").exit_code == 0
    none = write_attack(tmp_path / "none", [(0, 1, 1, 1, "0.1", 1, 1, "0.0", "0.0")],
                        {"attack": "none", "norm": None, "eps": None, "sigma": None})
    assert_one_error(run(str(none), "--certified", "none"), "none.tsv", "has no eps")


def test_combined_refuses_misplaced_files(tmp_path, pair) -> None:
    attack, certify = pair
    assert_one_error(run(str(attack), "--certified", str(certify), "--certified", "none"),
                     "--certified", "2 given for 1 FILE")
    assert_one_error(run(str(attack), "--certified", str(attack)), "attack result",
                     "--certified takes CERTIFY")
    assert_one_error(run(str(certify), "--certified", str(certify)), "certify.tsv",
                     "CERTIFY result", "go to --certified")
    assert_one_error(run(str(attack), "--certified", str(tmp_path / "nope.tsv")), "nope.tsv",
                     "no such result file")
    assert_one_error(run(str(attack), "--certified", str(certify), "--radii", "0.5"), "--radii")
    assert_one_error(run(str(attack), "--certified", str(certify), "--plot",
                         str(tmp_path / "plot")), "--plot")
    assert not list(tmp_path.glob("plot*"))


def test_combined_columns_order_l2_first_then_eps(tmp_path, pair) -> None:
    attack_05, certify = pair
    rows_10 = [row[:7] + ("1.000000", "0.1") for row in HAND_ROWS]
    attack_10 = write_attack(tmp_path / "attack_10", rows_10, {**SMOOTHADV, "eps": 1.0})
    rows_linf = [row[:7] + ("2.0", "0.031373") for row in HAND_ROWS]
    attack_linf = write_attack(tmp_path / "attack_linf", rows_linf,
                               {**SMOOTHADV, "norm": "linf", "eps": 8 / 255})
    table = analysis.combined_table(
        [analysis.load_attack_results(p) for p in (attack_linf, attack_10, attack_05)],
        [None, analysis.load_results(certify), analysis.load_results(certify)],
        ["row", "row", "row"],
    )
    assert table.columns == [("l2", 0.5), ("l2", 1.0), ("linf", 8 / 255)]
    text = analysis.combined_text_table(table)
    assert "robust Linf 8/255" in text
    # certificate: all 8 rows correct at radius 0.7 -> 100 at 0.5, 0 at 1.0
    body = [cell.strip() for cell in text.splitlines()[-1].split("  ") if cell.strip()]
    assert body == ["row", "8", "62.5 (100.0)", "62.5 (0.0)", "62.5", "87.5 (100.0)",
                    "87.5 (100.0)", "87.5"]
    assert np.isclose(table.rows[0][1][("l2", 1.0)].certified, 0.0)
