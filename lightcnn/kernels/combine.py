"""Ops that join tensors: channel concatenation, residual add, per-channel scaling.

    concat_channels:  y = [x_1 | x_2 | ...] along C     xs (N,H,W,C_i) -> y (N,H,W,sum C_i)
                      backward splits dy back into the C_i slices (copies, C-contiguous)
    concat_fitted:    y = [fit(a) | b] along C, a cropped or zero-padded at the bottom/right to b's H x W
                      (seed 001's skip: a 4x transpose conv of 13x13 gives 52x52 against the skip's 56x56);
                      backward: da = dy's first slot cropped back to a's H x W (concat_fitted_grad_a),
                      db = dy's second slot, plus b's gradient from another path (concat_fitted_grad_b)
    add:              y = a + b                           (the inverted-residual shortcut)
                      backward hands dy to both branches
    scale_channels:   y[n,h,w,c] = x[n,h,w,c] * s[n,c]   (the multiply at the end of squeeze-excitation)
                      dx = dy * s[n,c];   ds[n,c] = sum_{h,w} dy[n,h,w,c] * x[n,h,w,c]

Costs are one read and one write per element. A whole-array NumPy broadcast or memcpy is already
memory-bound; a copy into or out of a channel slot is not (NumPy copies it in C-sized pieces, serially):
concat_fitted and its backward are parallel kernels (seed 001's 2 x 51 MB skip concatenation at batch
32 on 2 threads: NumPy's zero-pad, crop and concatenate 44.7 ms, the kernel 10.7; 7.9 with its own copy loops
instead of the pixel helper the three kernels share). So is the ds
reduction (parallel over the batch, float64 accumulation).

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


@kernel
def _fit_pixel(src, n, h, w, count, dst, d0):
    """dst[d0:d0+count] = src[n, h, w, :count], or zeros where (h, w) lies outside src's plane: one pixel of
    src cropped or zero-padded at the bottom/right."""
    if h < src.shape[1] and w < src.shape[2]:
        row = src[n, h, w]
        for c in range(count):
            dst[d0 + c] = row[c]
    else:
        for c in range(count):
            dst[d0 + c] = 0.0


@kernel(parallel=True)
def _concat_fitted(a, b, y):
    """y[n,h,w] = [a[n,h,w] (0 outside a) | b[n,h,w]]; y (N,H,W,Ca+Cb) with b's N, H, W. One pass over y: two
    place_fitted calls write each pixel's cache lines twice (13-17 ms against 10.7 at batch 32, 2 threads)."""
    n_img, h_out, w_out, cb = b.shape
    ca = a.shape[3]
    for r in prange(n_img * h_out):
        n = r // h_out
        h = r - n * h_out
        for w in range(w_out):
            o = y[n, h, w]
            _fit_pixel(a, n, h, w, ca, o, 0)
            _fit_pixel(b, n, h, w, cb, o, ca)


@kernel(parallel=True)
def place_fitted(x, y, col0):
    """y[n,h,w,col0:col0+C] = x[n,h,w] (0 outside x): x (N,Hx,Wx,C) cropped or zero-padded at the bottom/right
    into a channel slot of y (N,H,W,C_total). An inference plan's `place` step (seed 001's skip concatenation:
    NumPy's two slot copies 7.1 ms at batch 8 on 2 threads, with this kernel 3.8)."""
    n_img, h_out, w_out, _ = y.shape
    for r in prange(n_img * h_out):
        n = r // h_out
        h = r - n * h_out
        for w in range(w_out):
            _fit_pixel(x, n, h, w, x.shape[3], y[n, h, w], col0)


@kernel(parallel=True)
def _first_slot_fitted(dy, da):
    """da[n,h,w,c] = dy[n,h,w,c] inside dy's H x W, 0 outside (a's rows/columns that were cropped off)."""
    n_img, ha, wa, ca = da.shape
    for r in prange(n_img * ha):
        n = r // ha
        h = r - n * ha
        for w in range(wa):
            _fit_pixel(dy, n, h, w, ca, da[n, h, w], 0)


@kernel(parallel=True)
def _slot_plus(dy, col0, g, use_g, out):
    """out[n,h,w,c] = dy[n,h,w,col0 + c] (+ g[n,h,w,c] when use_g); out (N,H,W,C)."""
    n_img, h_out, w_out, c_out = out.shape
    for r in prange(n_img * h_out):
        n = r // h_out
        h = r - n * h_out
        for w in range(w_out):
            o = out[n, h, w]
            src = dy[n, h, w]
            if use_g:
                add = g[n, h, w]
                for c in range(c_out):
                    o[c] = src[col0 + c] + add[c]
            else:
                for c in range(c_out):
                    o[c] = src[col0 + c]


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


def concat_fitted(a, b):
    """[fit(a) | b] along C: a (N,Ha,Wa,Ca) cropped or zero-padded at the bottom/right to b's (N,H,W,Cb)
    -> y (N,H,W,Ca+Cb). Equal to concat_channels([a cropped/padded, b])."""
    a, b = _float_nhwc(a, "a"), _float_nhwc(b, "b")
    if a.shape[0] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"a and b must have equal N and dtype, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    n, h, w, cb = b.shape
    y = _reuse.empty((n, h, w, a.shape[3] + cb), a.dtype)
    _concat_fitted(np.ascontiguousarray(a), np.ascontiguousarray(b), y)
    return y


def concat_fitted_grad_a(dy, a_shape):
    """dy (N,H,W,Ca+Cb) of concat_fitted(a, b), a's shape (N,Ha,Wa,Ca) -> da (N,Ha,Wa,Ca): dy's first Ca
    channels cropped back to Ha x Wa (zeros where a was cropped off)."""
    dy = _float_nhwc(dy, "dy")
    a_shape = tuple(int(v) for v in a_shape)
    if len(a_shape) != 4 or a_shape[0] != dy.shape[0] or not 0 <= a_shape[3] <= dy.shape[3]:
        raise ValueError(f"a_shape must be (N,Ha,Wa,Ca) with N = {dy.shape[0]} and Ca <= {dy.shape[3]}, got {a_shape}")
    da = _reuse.empty(a_shape, dy.dtype)
    _first_slot_fitted(np.ascontiguousarray(dy), da)
    return da


def concat_fitted_grad_b(dy, ca, g=None):
    """dy (N,H,W,Ca+Cb) of concat_fitted(a, b) -> db (N,H,W,Cb): dy's channels ca.., plus g (N,H,W,Cb) when
    given (b's gradient along another path, added in the same pass)."""
    dy = np.ascontiguousarray(_float_nhwc(dy, "dy"))
    n, h, w, c = dy.shape
    if not 0 <= ca <= c:
        raise ValueError(f"ca must be within 0..{c}, got {ca}")
    db = _reuse.empty((n, h, w, c - ca), dy.dtype)
    if g is None:
        _slot_plus(dy, ca, db, False, db)
        return db
    g = np.asarray(g)
    if g.shape != db.shape:
        raise ValueError(f"g must have shape {db.shape}, got {g.shape}")
    _slot_plus(dy, ca, np.ascontiguousarray(g, dtype=dy.dtype), True, db)
    return db


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
