"""The one error type of `adapt`."""


class AdaptError(ValueError):
    """A refused adaptation: bad input, or an output folder holding another run."""
