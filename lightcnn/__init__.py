"""lightcnn: a from-scratch CNN engine for CPU in NumPy + Numba.

Shape legend (used by every docstring in the package)
-----------------------------------------------------
Activations     x (N, H, W, C)       float32, NHWC, C-contiguous
Conv kernel     w (KH, KW, C, O)     "HWIO": input channels C, output channels O
Pointwise       w (C, O)             a 1x1 conv is one GEMM on the (N*H*W, C) view
Depthwise       w (KH, KW, C)        one KHxKW filter per channel
Transpose conv  w (KH, KW, C, O)     C = channels of its input, O = of its output
Dense           w (F, O)             x (N, F) @ w + b
Padding         (top, bottom, left, right) in pixels, always explicit: PyTorch's
                symmetric padding and TensorFlow "SAME" (extra row/column at the
                bottom/right) are both just four numbers.

Data flows one way: image -> preprocess -> NHWC batch -> models -> layers ->
kernels -> logits -> postprocess. Converters transpose foreign layouts (OIHW)
into these once, at conversion time.

Importing lightcnn compiles nothing: Numba kernels compile lazily on first
call and are cached on disk (see lightcnn._jit).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: importing lightcnn stays free of numpy
    from lightcnn.api import Classifier

__version__ = "0.1.0"

__all__ = ["__version__", "load", "list_models", "list_weights"]


def load(name_or_path: str | os.PathLike = "mobilenet_v2", simulate_quantization: bool | None = None,
         engine: str | None = None, weights: str | os.PathLike | None = None) -> Classifier:
    """Load a model by registry name, architecture (+ weights tag) or .h5 path; see lightcnn.api.load."""
    from lightcnn.api import load as _load

    return _load(name_or_path, simulate_quantization=simulate_quantization, engine=engine, weights=weights)


def list_models(pretrained: bool | None = None) -> list[str]:
    """Architecture names; pretrained=True only those with registered weights, False only those without."""
    from lightcnn.registry import list_models as _list_models

    return _list_models(pretrained)


def list_weights(arch: str | None = None) -> list[str]:
    """Registered weight names (lightcnn.load accepts each), of one architecture when `arch` is given."""
    from lightcnn.registry import list_weights as _list_weights

    return _list_weights(arch)
