"""Randomized smoothing (Cohen et al., 2019): the smoothed classifier, runs over datasets, analysis.

Code written against Cohen et al.'s `core.Smooth` ports by one import::

    from smoothing import Smooth

`run` certifies or predicts a whole dataset into resumable TSV + JSON result
files; `load_results` and `certified_accuracy` read them back.
"""

from smoothing.analysis import (
    Results,
    average_certified_radius,
    certified_accuracy,
    load_results,
)
from smoothing.core import NonFiniteOutputError, Smooth
from smoothing.runner import (
    ResultFile,
    ResultFileError,
    RunSettings,
    example_generator,
    example_seed,
    run,
    select_indices,
)

ABSTAIN = Smooth.ABSTAIN

__all__ = [
    "ABSTAIN",
    "NonFiniteOutputError",
    "ResultFile",
    "ResultFileError",
    "Results",
    "RunSettings",
    "Smooth",
    "average_certified_radius",
    "certified_accuracy",
    "example_generator",
    "example_seed",
    "load_results",
    "run",
    "select_indices",
]
