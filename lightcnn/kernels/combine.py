"""Ops that join tensors: channel concatenation, residual add, per-channel scaling.

    concat_channels:  y = [x_1 | x_2 | ...] along C     xs (N,H,W,C_i) -> y (N,H,W,sum C_i)
                      backward splits dy back into the C_i slices (copies, C-contiguous)
    add:              y = a + b                           (the inverted-residual shortcut)
                      backward hands dy to both branches
    scale_channels:   y[n,h,w,c] = x[n,h,w,c] * s[n,c]   (the multiply at the end of squeeze-excitation)
                      dx = dy * s[n,c];   ds[n,c] = sum_{h,w} dy[n,h,w,c] * x[n,h,w,c]

Costs are one read and one write per element; everything except the ds reduction is a
single NumPy broadcast or memcpy, which is already memory-bound, so only the reduction
is a Numba kernel (parallel over the batch, float64 accumulation).

Deliberately absent: broadcasting in add (shapes must match exactly, a mismatch is a bug in
the graph), concatenation along other axes, and the squeeze-excitation block itself, which the
layers compose from global average pooling, dense/1x1 convs, relu and hard_sigmoid.
"""

import numpy as np

from lightcnn._jit import kernel, prange
from lightcnn.kernels import _reuse

# --------------------------------------------------------------------------- kernels


@kernel(parallel=True)
def _scale_channels_ds(dy, x, ds):
    """ds[n, c] = sum over h, w of dy * x; dy, x viewed as (N, H*W, C)."""
    n, hw, c = x.shape
    for i in prange(n):
        acc = np.zeros(c, dtype=np.float64)
        for p in range(hw):
            for j in range(c):
                acc[j] += dy[i, p, j] * x[i, p, j]
        for j in range(c):
            ds[i, j] = acc[j]


# --------------------------------------------------------------------------- helpers


def _float_nhwc(x, name):
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N,H,W,C), got {x.shape}")
    return x


# --------------------------------------------------------------------------- concat


def concat_channels(xs):
    """xs: list of (N,H,W,C_i) with equal N, H, W and dtype -> y (N,H,W,sum C_i)."""
    xs = [_float_nhwc(x, f"xs[{i}]") for i, x in enumerate(xs)]
    if not xs:
        raise ValueError("concat_channels needs at least one array")
    nhw, dtype = xs[0].shape[:3], xs[0].dtype
    for i, x in enumerate(xs):
        if x.shape[:3] != nhw or x.dtype != dtype:
            raise ValueError(
                f"xs[{i}] must have shape (N,H,W,C_i) = {nhw + ('C_i',)} and dtype {dtype}, got {x.shape} {x.dtype}"
            )
    return np.concatenate(xs, axis=-1, out=_reuse.empty(nhw + (sum(x.shape[3] for x in xs),), dtype))


def concat_channels_backward(dy, channel_sizes):
    """dy (N,H,W,sum C_i), channel_sizes [C_1, C_2, ...] -> list of dx_i (N,H,W,C_i), C-contiguous copies."""
    dy = _float_nhwc(dy, "dy")
    sizes = [int(c) for c in channel_sizes]
    if any(c < 0 for c in sizes) or sum(sizes) != dy.shape[-1]:
        raise ValueError(f"channel_sizes {sizes} must be non-negative and sum to dy's C = {dy.shape[-1]}")
    out, start = [], 0
    for c in sizes:
        out.append(np.ascontiguousarray(dy[..., start:start + c]))
        start += c
    return out


# --------------------------------------------------------------------------- add


def add_forward(a, b):
    """a, b of identical shape (N,H,W,C) (any shape) and dtype -> a + b (a new array)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"add needs equal shapes and dtypes, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    return a + b


def add_backward(dy):
    """dy (...) -> (da, db), both read-only views of dy.

    No copy is made: both branches receive the same gradient. The views are marked
    read-only so a caller that tried to accumulate into one in place (and thereby corrupt
    the other branch's gradient) fails loudly instead.
    """
    dy = np.asarray(dy)
    da = dy.view()
    db = dy.view()
    da.flags.writeable = False
    db.flags.writeable = False
    return da, db


# --------------------------------------------------------------------------- scale_channels


def _check_scale(x, s):
    x = _float_nhwc(x, "x")
    s = np.asarray(s)
    n, c = x.shape[0], x.shape[3]
    if s.shape != (n, c):
        raise ValueError(f"s must have shape (N,C) = {(n, c)}, got {s.shape}")
    return x, s.astype(x.dtype, copy=False)


def scale_channels_forward(x, s):
    """x (N,H,W,C), s (N,C) -> y = x * s[:, None, None, :] (N,H,W,C)."""
    x, s = _check_scale(x, s)
    return x * s[:, None, None, :]


def scale_channels_backward(dy, x, s):
    """dy (N,H,W,C), x (N,H,W,C), s (N,C) -> (dx (N,H,W,C), ds (N,C))."""
    x, s = _check_scale(x, s)
    dy = _float_nhwc(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    xc = np.ascontiguousarray(x)
    n, h, w, c = x.shape
    dx = dy * s[:, None, None, :]
    ds = np.empty((n, c), dtype=x.dtype)
    _scale_channels_ds(dy.reshape(n, h * w, c), xc.reshape(n, h * w, c), ds)
    return dx, ds
