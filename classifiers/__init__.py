"""Base classifiers and datasets, by name.

Importing this package registers every builder; heavy libraries (open_clip,
torchvision's model zoo, efficientnet-lite-pytorch) are imported only when their
builder runs.
"""

# importing the modules registers their builders
from classifiers import (  # noqa: F401
    clip,
    datasets,
    digits,
    efficientnet,
    sample_images,
    torchvision_models,
)
from classifiers.registry import (
    CLASSIFIERS,
    DATASETS,
    UnknownNameError,
    build_classifier,
    build_dataset,
)

__all__ = ["CLASSIFIERS", "DATASETS", "UnknownNameError", "build_classifier", "build_dataset"]
