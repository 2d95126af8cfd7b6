"""The embedded default: scikit-learn's bundled handwritten digits and a small CNN for them.

Everything here works offline: the 8x8 digits ship inside scikit-learn and the
trained weights ship inside this package (`classifiers/weights/`), trained by
`python -m classifiers.train_digits` (the same folder holds a JSON of each run's
settings and accuracy beside the weights).

Names registered:

- dataset `digits`: a fixed stratified 75/25 split of the 1797 images
  (1347 train, 450 test), images [1, 8, 8] in [0, 1].
- models `digits-sigma0.25`, `digits-sigma0.50`: the CNN trained with Gaussian
  noise augmentation at that sigma; `digits-clean`: trained without noise (a base
  for denoised smoothing); `digits`: whichever noise-trained model matches the
  sigma it is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from classifiers.registry import CLASSIFIERS, DATASETS
from classifiers.weights_io import load_classifier_weights

NUM_CLASSES = 10
CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(NUM_CLASSES))
SPLITS = ("train", "test")

# The split is part of the certificate's meaning (which images were held out),
# so it is fixed here once and never taken from the caller.
_TEST_SIZE = 0.25
_SPLIT_SEED = 0

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# sigma label (as in the file name) -> weights file; "0.00" is the clean model.
_WEIGHT_FILES: dict[str, str] = {
    "0.25": "digits_cnn_sigma0.25.safetensors",
    "0.50": "digits_cnn_sigma0.50.safetensors",
    "0.00": "digits_cnn_sigma0.00.safetensors",
}


class DigitsDataset:
    """One split of the digits: `(image [1, 8, 8] float32 in [0, 1], label int)` pairs.

    `indices` are the positions of this split's images in `load_digits()`, so two
    splits can be checked for overlap.
    """

    classes: Sequence[str] = CLASS_NAMES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray, split: str):
        self.images = images
        self.labels = labels
        self.indices = indices
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, size={len(self)})"


def load_digits_split(split: str) -> DigitsDataset:
    """The `train` (1347 images) or `test` (450 images) split of scikit-learn's digits."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {', '.join(SPLITS)}")
    bunch = load_digits()
    labels = bunch.target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=_TEST_SIZE,
        random_state=_SPLIT_SEED,
        stratify=labels,
    )
    indices = train_idx if split == "train" else test_idx
    # pixel values are integers 0..16 in the bundled data
    images = torch.from_numpy(bunch.images[indices] / 16.0).to(torch.float32).unsqueeze(1)
    return DigitsDataset(images, torch.from_numpy(labels[indices]).long(), indices, split)


@DATASETS.register("digits", "scikit-learn's bundled 8x8 handwritten digits (offline)")
def build_digits_dataset(split: str = "test", data_root: str | None = None) -> DigitsDataset:
    """The digits split; `data_root` is ignored (the data ship with scikit-learn)."""
    return load_digits_split(split)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: [B, 1, 8, 8] in [0, 1] -> logits [B, 10].

    Two conv+pool stages (8x8 -> 4x4 -> 2x2) and a two-layer head; about 13k
    parameters, small enough that certifying with 10^4 noise draws per image
    runs on a laptop CPU.
    """

    # mean and std of the pixels of the whole digits set in [0, 1]
    MEAN = 0.305
    STD = 0.376

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 2 * 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.MEAN) / self.STD))


def _sigma_label(sigma: float) -> str:
    return f"{sigma:.2f}"


def weights_path(sigma: float) -> Path:
    """The shipped weights file of the model trained at noise level `sigma` (0 = clean)."""
    label = _sigma_label(sigma)
    if label not in _WEIGHT_FILES:
        raise ValueError(f"no shipped digits weights for sigma={sigma}")
    return WEIGHTS_DIR / _WEIGHT_FILES[label]


def load_digits_cnn(path: str | Path) -> DigitsCNN:
    """A DigitsCNN in eval mode with the weights in the safetensors file `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits CNN weights not found at {path}; the shipped ones live in {WEIGHTS_DIR} "
            "and are rebuilt with `python -m classifiers.train_digits --sigma SIGMA --out PATH`"
        )
    model = DigitsCNN()
    # strict key/shape check with one error naming the file (another architecture's weights)
    load_classifier_weights(model, path)
    model.weight_files = [path]  # read by the CLI to record the weights' sha256
    return model.eval()


def _check_classes(class_names: Sequence[str]) -> None:
    if len(class_names) != NUM_CLASSES:
        raise ValueError(
            f"the digits models have {NUM_CLASSES} classes (0-9), "
            f"got {len(class_names)} class names"
        )


def _build(train_sigma: float, class_names: Sequence[str], weights: str | Path | None) -> DigitsCNN:
    _check_classes(class_names)
    return load_digits_cnn(weights if weights is not None else weights_path(train_sigma))


@CLASSIFIERS.register("digits", "digits CNN trained with noise at the sigma being certified")
def build_digits(
    class_names: Sequence[str],
    sigma: float | None = None,
    weights: str | Path | None = None,
    **_: object,
) -> DigitsCNN:
    """The noise-trained digits CNN whose training sigma matches `sigma` (0.25 or 0.50)."""
    noise_trained = [s for s in _WEIGHT_FILES if float(s) > 0]
    if sigma is None or _sigma_label(sigma) not in noise_trained:
        raise ValueError(
            f"model 'digits' has weights trained at sigma {', '.join(noise_trained)}, "
            f"not at sigma={sigma}; pick one of those, or name a model explicitly: "
            "digits-sigma0.25, digits-sigma0.50, digits-clean"
        )
    return _build(float(sigma), class_names, weights)


@CLASSIFIERS.register("digits-sigma0.25", "digits CNN trained with Gaussian noise, sigma 0.25")
def build_digits_sigma025(
    class_names: Sequence[str],
    sigma: float | None = None,
    weights: str | Path | None = None,
    **_: object,
) -> DigitsCNN:
    """The digits CNN trained with N(0, 0.25^2) noise augmentation."""
    return _build(0.25, class_names, weights)


@CLASSIFIERS.register("digits-sigma0.50", "digits CNN trained with Gaussian noise, sigma 0.50")
def build_digits_sigma050(
    class_names: Sequence[str],
    sigma: float | None = None,
    weights: str | Path | None = None,
    **_: object,
) -> DigitsCNN:
    """The digits CNN trained with N(0, 0.5^2) noise augmentation."""
    return _build(0.5, class_names, weights)


@CLASSIFIERS.register("digits-clean", "digits CNN trained without noise (for denoised smoothing)")
def build_digits_clean(
    class_names: Sequence[str],
    sigma: float | None = None,
    weights: str | Path | None = None,
    **_: object,
) -> DigitsCNN:
    """The digits CNN trained on clean images only."""
    return _build(0.0, class_names, weights)
