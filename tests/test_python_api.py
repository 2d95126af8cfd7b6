"""The Python API: one import as in Cohen et al.'s core.py, and the README's example runs."""

from __future__ import annotations

import math
import re
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from tests.cli_helpers import rows

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    text = README.read_text()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section shows one Python example"
    return blocks[0]


def test_public_api_is_importable_from_the_packages() -> None:
    import classifiers
    import denoisers
    import smoothing
    from smoothing import Smooth
    from smoothing.core import Smooth as CoreSmooth

    assert Smooth is CoreSmooth and smoothing.ABSTAIN == Smooth.ABSTAIN == -1
    for package in (smoothing, classifiers, denoisers):
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert not missing, f"{package.__name__} exports names it lacks: {missing}"


def test_readme_example_runs_and_certifies_the_digits(tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_example(), str(README), "exec"), namespace)  # noqa: S102

    # Known answer: when all n = 1000 votes go to the top class, the Clopper-Pearson lower
    # bound is alpha^(1/n) and the radius sigma * Phi^-1(alpha^(1/n)).
    best = 0.25 * NormalDist().inv_cdf(0.001 ** (1 / 1000))
    assert namespace["prediction"] == namespace["label"]
    assert 0 < namespace["radius"] <= best
    header = (tmp_path / "runs" / "my_model.tsv").read_text().splitlines()[0]
    assert header.split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    table = rows(tmp_path / "runs" / "my_model")
    assert [int(r["idx"]) for r in table] == list(range(10))
    radii = [float(r["radius"]) for r in table]
    assert max(radii) == math.floor(best * 1e6) / 1e6  # some example got every vote
    assert sum(int(r["correct"]) for r in table) >= 9  # a noise-trained model on easy digits
    assert (tmp_path / "runs" / "my_model.json").is_file()


class BatchNormLinear(torch.nn.Module):
    """Class 1 iff x.mean() > 0.5, through a BatchNorm whose running statistics make it so."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(1)
        self.norm.running_mean.fill_(0.5)
        self.norm.running_var.fill_(1.0 - self.norm.eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        centered = self.norm(images.mean(dim=(1, 2, 3)).unsqueeze(1))
        return torch.cat([-centered, centered], dim=1)


def test_smooth_puts_a_batchnorm_model_in_eval_mode() -> None:
    from smoothing import Smooth

    model = BatchNormLinear().train()
    before = model.norm.running_mean.clone()
    smooth = Smooth(model, num_classes=2, sigma=0.25)
    assert not model.training
    # mean 0.9, far above 0.5 in units of the mean's noise (sigma / sqrt(64)): class 1 always.
    # In train mode each noisy batch would be centred on itself: about half the votes each way.
    x = torch.full((1, 8, 8), 0.9)
    prediction, radius = smooth.certify(x, 100, 1000, 0.001, 250, torch.Generator().manual_seed(0))
    assert prediction == 1
    assert radius == pytest.approx(0.25 * NormalDist().inv_cdf(0.001 ** (1 / 1000)))
    assert torch.equal(model.norm.running_mean, before)


@pytest.mark.parametrize("columns", [3, 11])
def test_logits_without_num_classes_columns_are_refused(columns: int) -> None:
    from smoothing import Smooth

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, columns))
    smooth = Smooth(model, num_classes=10, sigma=0.25)
    x = torch.rand(1, 8, 8)
    with pytest.raises(ValueError, match=r"expected \[10, 10\]"):
        smooth.sample_counts(x, 10, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"expected \[1, 10\]"):
        smooth.base_predict(x)


def test_a_plain_function_is_a_base_classifier_too() -> None:
    from smoothing import Smooth

    def always_one(images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0]]).expand(images.shape[0], 2)

    smooth = Smooth(always_one, num_classes=2, sigma=0.5)
    prediction, radius = smooth.certify(torch.rand(1, 4, 4), 10, 100, 0.001, 50,
                                        torch.Generator().manual_seed(0))
    assert prediction == 1
    assert radius == pytest.approx(0.5 * NormalDist().inv_cdf(0.001 ** (1 / 100)))
