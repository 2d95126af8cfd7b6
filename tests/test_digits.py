"""The embedded default: the digits split, the shipped CNN weights and their certified accuracy.

The certified-accuracy check is issue 2's acceptance bar for the demo model: on the
450 test images at sigma 0.25 with n = 10,000 and alpha = 0.001, certified accuracy
at least 0.90 at radius 0 and at least 0.60 at radius 0.5.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from classifiers.digits import (
    CLASS_NAMES,
    WEIGHTS_DIR,
    DigitsCNN,
    load_digits_cnn,
    load_digits_split,
    weights_path,
)
from classifiers.registry import CLASSIFIERS
from classifiers.train_digits import train
from cli.main import certify_command
from smoothing.analysis import certified_accuracy, load_results
from tests.cli_helpers import invoke


def test_split_is_fixed_disjoint_and_stratified():
    train_set, test_set = load_digits_split("train"), load_digits_split("test")
    assert (len(train_set), len(test_set)) == (1347, 450)
    assert not set(train_set.indices) & set(test_set.indices)
    assert len(set(train_set.indices) | set(test_set.indices)) == 1797
    # stratified: every class holds a quarter of its images out, to within one image
    total = Counter(train_set.labels.tolist()) + Counter(test_set.labels.tolist())
    held_out = Counter(test_set.labels.tolist())
    for label, count in total.items():
        assert abs(held_out[label] - count / 4) <= 1
    image, label = test_set[0]
    assert image.shape == (1, 8, 8) and 0.0 <= image.min() and image.max() <= 1.0
    # the same call gives the same split
    assert (load_digits_split("test").indices == test_set.indices).all()


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown digits split 'val'"):
        load_digits_split("val")


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5])
def test_shipped_weights_match_their_training_record(sigma):
    """The JSON beside each weights file records the clean test accuracy at training time;
    the shipped weights must reproduce it exactly, so the two cannot drift apart."""
    path = weights_path(sigma)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["settings"]["train_sigma"] == sigma
    test_set = load_digits_split("test")
    model = load_digits_cnn(path)
    with torch.inference_mode():
        predictions = model(test_set.images).argmax(dim=1)
    accuracy = int((predictions == test_set.labels).sum()) / len(test_set)
    assert accuracy == pytest.approx(record["test_accuracy"]["clean"], abs=1e-9)
    assert accuracy >= 0.97


def test_registry_names_load_the_matching_weights():
    test_set = load_digits_split("test")
    images = test_set.images[:16]

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return model(images)

    expected = {s: logits(load_digits_cnn(weights_path(s))) for s in (0.0, 0.25, 0.5)}
    named = {
        "digits-clean": 0.0, "digits-sigma0.25": 0.25, "digits-sigma0.50": 0.5,
    }
    for name, sigma in named.items():
        model = CLASSIFIERS.build(name, class_names=CLASS_NAMES)
        assert torch.equal(logits(model), expected[sigma]), name
    # `digits` follows the sigma being certified
    for sigma in (0.25, 0.5):
        model = CLASSIFIERS.build("digits", class_names=CLASS_NAMES, sigma=sigma)
        assert torch.equal(logits(model), expected[sigma])
    assert not torch.equal(expected[0.25], expected[0.5])


def test_digits_model_without_weights_for_the_sigma_is_refused():
    with pytest.raises(ValueError, match="digits-sigma0.25, digits-sigma0.50, digits-clean"):
        CLASSIFIERS.build("digits", class_names=CLASS_NAMES, sigma=0.3)


def test_wrong_number_of_class_names_is_refused():
    with pytest.raises(ValueError, match="10 classes"):
        CLASSIFIERS.build("digits-clean", class_names=("cat", "dog"))


def test_missing_weights_file_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m classifiers.train_digits"):
        load_digits_cnn(tmp_path / "absent.safetensors")
    assert WEIGHTS_DIR.is_dir()


def test_training_is_deterministic_in_its_seed():
    first, first_losses = train(0.25, epochs=1, batch_size=256, lr=3e-3, weight_decay=0.01,
                                noise_copies=1, seed=5)
    second, second_losses = train(0.25, epochs=1, batch_size=256, lr=3e-3, weight_decay=0.01,
                                  noise_copies=1, seed=5)
    other, _ = train(0.25, epochs=1, batch_size=256, lr=3e-3, weight_decay=0.01,
                     noise_copies=1, seed=6)
    assert first_losses == second_losses
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in
               zip(first.state_dict().values(), other.state_dict().values(), strict=True))
    assert isinstance(first, DigitsCNN) and not first.training


def test_demo_model_meets_the_certified_accuracy_bar(tmp_path):
    """Issue 2: the sigma-0.25 demo model, full test split, n = 10,000, alpha = 0.001."""
    out = tmp_path / "digits_sigma0.25"
    result = invoke(certify_command, "--sigma", "0.25", "--n", "10000", "--alpha", "0.001",
                    "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    results = load_results(out.with_name(out.name + ".tsv"))
    assert results.n == 450
    accuracy = certified_accuracy(results, [0.0, 0.5])
    assert accuracy[0.0] >= 0.90
    assert accuracy[0.5] >= 0.60
