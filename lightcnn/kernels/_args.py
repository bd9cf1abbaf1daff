"""Argument checks shared by the convolution kernels (conv.py, transpose.py): one-line errors naming the
function and the argument, and inputs normalised to C-contiguous float32/float64 arrays."""

import numpy as np

from lightcnn.kernels.activation import ACTIVATIONS

# Upper bound on the im2col buffer; one image is always processed whole even if larger.
CHUNK_BYTES = 1 << 25


def _float_array(a, name, fn):
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{fn}: {name} must be float32 or float64, got {a.dtype}")
    return np.ascontiguousarray(a)


def _nhwc(x, fn, name="x"):
    x = _float_array(x, name, fn)
    if x.ndim != 4:
        raise ValueError(f"{fn}: {name} must be (N,H,W,C), got shape {x.shape}")
    return x


def _like(a, x, shape, name, fn, legend):
    """Cast a parameter/gradient to x's dtype and check its exact shape."""
    a = np.asarray(a)
    if a.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} must be {legend} = {tuple(shape)}, got {a.shape}")
    return np.ascontiguousarray(a, dtype=x.dtype)


def _pair(v, name, fn, minimum):
    t = (v, v) if np.isscalar(v) else tuple(v)
    if len(t) != 2 or any(int(e) != e or e < minimum for e in t):
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return int(t[0]), int(t[1])


def _pad4(pad, fn):
    t = (pad,) * 4 if np.isscalar(pad) else tuple(pad)
    if len(t) != 4 or any(int(e) != e or e < 0 for e in t):
        raise ValueError(f"{fn}: pad must be (top, bottom, left, right) ints >= 0, got {pad!r}")
    return tuple(int(e) for e in t)


def _act_code(act, fn):
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"{fn}: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[act]
    if int(act) not in ACTIVATIONS.values():
        raise ValueError(f"{fn}: unknown activation code {act!r}; expected one of {sorted(ACTIVATIONS.values())}")
    return int(act)


def _bias_or_zeros(b, x, n_out, fn):
    if b is None:
        return np.zeros(n_out, dtype=x.dtype)
    return _like(b, x, (n_out,), "b", fn, "(O,)")


def _images_per_chunk(n_img, row_bytes):
    return max(1, min(n_img, CHUNK_BYTES // max(row_bytes, 1)))


