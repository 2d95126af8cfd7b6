"""Base classifiers and datasets, by name.

Importing this package registers every builder; heavy libraries (open_clip,
torchvision's model zoo) are imported only when their builder runs.
"""

# importing the modules registers their builders
from classifiers import clip, cohen, datasets, digits, torchvision_models  # noqa: F401
from classifiers.registry import (
    CLASSIFIERS,
    DATASETS,
    UnknownNameError,
    build_classifier,
    build_dataset,
)

__all__ = ["CLASSIFIERS", "DATASETS", "UnknownNameError", "build_classifier", "build_dataset"]
