"""Expected failures, each carrying a one-line message that names the file and the problem.

CLIs catch `LightCNNError` and print ``error: <message>`` without a traceback;
anything else is a bug and keeps its traceback.
"""


def did_you_mean(name, choices):
    """' (did you mean 'x'?)' for the closest of `choices` to a mistyped `name` (difflib), or ''."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class LightCNNError(Exception):
    """Base class of every expected, user-facing failure."""


class CheckpointError(LightCNNError):
    """A weight file (.h5, .pth, .tflite, .net) is missing, malformed or does not fit the model."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for a class outside the allow-list (it may be trying to run code)."""


class ImageError(LightCNNError):
    """An image file cannot be decoded or is unusable (truncated, empty, too large, ...)."""


class ShapeError(LightCNNError, ValueError):
    """An array has the wrong rank, layout, dtype or size for the layer it is given to."""


class TrainingError(LightCNNError):
    """Training cannot continue (e.g. the loss became NaN). finetune keeps the best model so far in best.h5;
    a tuning trial ends as failed and keeps nothing."""
