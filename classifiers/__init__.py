"""Base classifiers and datasets, by name.

`build_classifier(name, class_names=...)` builds a registered model (`--list-models`),
`build_from_factory("file.py:factory", class_names=...)` your own. Importing this
package registers every builder; heavy libraries (open_clip, torchvision's model zoo,
efficientnet-lite-pytorch) are imported only when their builder runs.
"""

# importing the modules registers their builders
from classifiers import (  # noqa: F401
    clip,
    cohen,
    custom,
    datasets,
    digits,
    efficientnet,
    sample_images,
    torchvision_models,
)
from classifiers.cohen import CifarResNet, build_cohen
from classifiers.custom import FactoryError, build_from_factory
from classifiers.registry import (
    CLASSIFIERS,
    DATASETS,
    LabeledImages,
    UnknownNameError,
    build_classifier,
    build_dataset,
)
from classifiers.torchvision_models import NormalizedClassifier
from classifiers.weights_io import load_classifier_weights, save_classifier_weights

__all__ = [
    "CLASSIFIERS",
    "DATASETS",
    "CifarResNet",
    "FactoryError",
    "LabeledImages",
    "NormalizedClassifier",
    "UnknownNameError",
    "build_classifier",
    "build_cohen",
    "build_dataset",
    "build_from_factory",
    "load_classifier_weights",
    "save_classifier_weights",
]
