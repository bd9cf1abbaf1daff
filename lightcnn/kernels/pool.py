"""Pooling: max, average and global average over NHWC planes, forward and backward.

Max pool, window (KH, KW), stride (SH, SW), padding (top, bottom, left, right):

    y[n, oh, ow, c]      = max_{i < KH, j < KW} xpad[n, oh*SH + i, ow*SW + j, c]      (padding = -inf)
    argmax[n, oh, ow, c] = h*W + w of the winning input element (first maximum in row-major
                           window order; a NaN wins and propagates, as in PyTorch)

Average pool, same windows:

    y[n, oh, ow, c] = sum of the in-bounds x under the window / divisor
    divisor         = count_include_pad ? window area clipped to the padded input : in-bounds area

The "clipped to the padded input" part is PyTorch's rule: with ceil_mode a last window may hang
past the bottom/right padding, and those phantom cells never count, even with count_include_pad.

Global average pool: y[n, c] = mean_{h, w} x[n, h, w, c]  ->  y (N, C).

Output size (lightcnn.kernels.shapes.conv_output_size, per axis):
    floor mode  Ho = floor((H + top + bottom - KH) / SH) + 1
    ceil mode   Ho = ceil((H + top + bottom - KH) / SH) + 1, minus one if the last window would
                start in the bottom padding (PyTorch's rule; SqueezeNet's MaxPool2d(3, 2, ceil_mode=True)).

Cost: KH*KW compares or adds per output element; pooling is memory-bound. Loops run over
(n, output row) in parallel with the channel loop innermost, so every load is a contiguous
run of C values.

Backward: max pool scatters dy to the recorded argmax (ties go to the first maximum only);
average pool scatters dy / divisor over the window. Both run one image per thread because
neighbouring windows overlap.

Deliberately not here: dilation, divisor_override, adaptive pooling other than global
average (the supported models never use them), and windows that lie entirely in padding:
every padding must be smaller than the window, so each window sees at least one input.
"""

import numpy as np

from lightcnn._jit import kernel, prange
from lightcnn.kernels import _reuse
from lightcnn.kernels.shapes import conv_output_size

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "global_avg_pool_forward",
    "global_avg_pool_backward",
]


# --------------------------------------------------------------------------- argument checks


def _check_nhwc(x, name="x"):
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must be a 4-D array of shape (N,H,W,C); got {shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64; got {x.dtype}")
    return np.ascontiguousarray(x)


def _pair(value, name):
    if np.isscalar(value):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints; got {value}")
    return value


def _window_args(x_shape, kernel_size, stride, pad, ceil_mode):
    """Normalise window arguments and return (kh, kw, sh, sw, pad4, Ho, Wo)."""
    kh, kw = _pair(kernel_size, "kernel")
    sh, sw = _pair(stride if stride is not None else (kh, kw), "stride")
    pad = tuple(int(p) for p in pad)
    if len(pad) != 4 or min(pad) < 0:
        raise ValueError(f"pad must be four non-negative ints (top, bottom, left, right); got {pad}")
    top, bottom, left, right = pad
    # A window entirely inside padding has no input to pool (max would be -inf, avg 0/0).
    if max(top, bottom) >= kh or max(left, right) >= kw:
        raise ValueError(f"padding {pad} must be smaller than the window {(kh, kw)} on every side")
    _, h, w, _ = x_shape
    ho = conv_output_size(h, kh, sh, top, bottom, ceil_mode)
    wo = conv_output_size(w, kw, sw, left, right, ceil_mode)
    return kh, kw, sh, sw, pad, ho, wo


def _check_x_shape(x_shape):
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or min(x_shape) < 1:
        raise ValueError(f"x_shape must be (N,H,W,C) with positive sizes; got {x_shape}")
    return x_shape


# --------------------------------------------------------------------------- max pool


@kernel(parallel=True)
def _max_pool_fwd(x, kh, kw, sh, sw, top, left, y, argmax):
    n_img, h_in, w_in, n_ch = x.shape
    _, h_out, w_out, _ = y.shape
    for row in prange(n_img * h_out):
        n = row // h_out
        oh = row - n * h_out
        h0 = max(oh * sh - top, 0)
        h1 = min(oh * sh - top + kh, h_in)
        for ow in range(w_out):
            w0 = max(ow * sw - left, 0)
            w1 = min(ow * sw - left + kw, w_in)
            yo = y[n, oh, ow]
            ao = argmax[n, oh, ow]
            first = h0 * w_in + w0
            for c in range(n_ch):
                yo[c] = -np.inf
                ao[c] = first
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    xi = x[n, ih, iw]
                    idx = ih * w_in + iw
                    for c in range(n_ch):
                        v = xi[c]
                        # `v != v` is NaN: PyTorch lets a NaN win so it propagates.
                        if v > yo[c] or v != v:
                            yo[c] = v
                            ao[c] = idx


def max_pool2d_forward(x: np.ndarray, kernel: tuple[int, ...] = (2, 2), stride: tuple[int, ...] | None = None,
                       pad: tuple[int, ...] = (0, 0, 0, 0), ceil_mode: bool = False) -> tuple:
    """Max pool x (N,H,W,C) -> (y (N,Ho,Wo,C), argmax (N,Ho,Wo,C) int64).

    kernel, stride: int or (h, w); stride defaults to the kernel. pad: (top, bottom, left, right),
    padded cells are -inf. argmax holds the flat index h*W + w into the input plane.
    """
    x = _check_nhwc(x)
    kh, kw, sh, sw, pad, ho, wo = _window_args(x.shape, kernel, stride, pad, ceil_mode)
    n, _, _, c = x.shape
    y = _reuse.empty((n, ho, wo, c), x.dtype)
    argmax = _reuse.empty((n, ho, wo, c), np.int64)
    _max_pool_fwd(x, kh, kw, sh, sw, pad[0], pad[2], y, argmax)
    return y, argmax


@kernel(parallel=True)
def _max_pool_bwd(dy, argmax, dx):
    """dx = 0, then dx[n, argmax] += dy, image by image; returns how many argmax entries fall outside the
    input plane (those are skipped, and the caller raises). Zeroing each image's dx right before its scatter,
    on that image's thread, keeps it in cache: a separate fill was 8 ms of serial work per 51 MB at batch 32."""
    n_img, h_out, w_out, n_ch = dy.shape
    w_in = dx.shape[2]
    plane = dx.shape[1] * w_in
    bad = 0
    # One image per thread: overlapping windows can send several dy to the same dx cell.
    for n in prange(n_img):
        dxn = dx[n]
        for ih in range(dxn.shape[0]):
            for iw in range(w_in):
                cell = dxn[ih, iw]
                for c in range(n_ch):
                    cell[c] = 0
        for oh in range(h_out):
            for ow in range(w_out):
                for c in range(n_ch):
                    idx = argmax[n, oh, ow, c]
                    if idx < 0 or idx >= plane:
                        bad += 1
                        continue
                    ih = idx // w_in
                    dxn[ih, idx - ih * w_in, c] += dy[n, oh, ow, c]
    return bad


def max_pool2d_backward(dy: np.ndarray, argmax: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
    """Gradient of max pooling: dy (N,Ho,Wo,C), argmax (N,Ho,Wo,C) -> dx x_shape (N,H,W,C)."""
    x_shape = _check_x_shape(x_shape)
    dy = _check_nhwc(dy, "dy")
    argmax = np.ascontiguousarray(argmax, dtype=np.int64)
    if argmax.shape != dy.shape:
        raise ValueError(f"argmax shape {argmax.shape} must equal dy shape {dy.shape} (N,Ho,Wo,C)")
    if dy.shape[0] != x_shape[0] or dy.shape[3] != x_shape[3]:
        raise ValueError(f"dy (N,Ho,Wo,C) = {dy.shape} does not match x_shape (N,H,W,C) = {x_shape}")
    dx = _reuse.empty(x_shape, dy.dtype)
    if _max_pool_bwd(dy, argmax, dx):
        raise ValueError(f"argmax holds indices outside the {x_shape[1]}x{x_shape[2]} input plane")
    return dx


# --------------------------------------------------------------------------- average pool


@kernel(parallel=True)
def _avg_pool_fwd(x, kh, kw, sh, sw, top, bottom, left, right, include_pad, y):
    n_img, h_in, w_in, n_ch = x.shape
    _, h_out, w_out, _ = y.shape
    for row in prange(n_img * h_out):
        n = row // h_out
        oh = row - n * h_out
        # PyTorch clips the window to the padded input before counting (ceil-mode overhang).
        h0 = oh * sh - top
        h1 = min(h0 + kh, h_in + bottom)
        hpad = h1 - h0
        h0 = max(h0, 0)
        h1 = min(h1, h_in)
        for ow in range(w_out):
            w0 = ow * sw - left
            w1 = min(w0 + kw, w_in + right)
            wpad = w1 - w0
            w0 = max(w0, 0)
            w1 = min(w1, w_in)
            if include_pad:
                inv = 1.0 / (hpad * wpad)
            else:
                inv = 1.0 / ((h1 - h0) * (w1 - w0))
            yo = y[n, oh, ow]
            for c in range(n_ch):
                yo[c] = 0.0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    xi = x[n, ih, iw]
                    for c in range(n_ch):
                        yo[c] += xi[c]
            for c in range(n_ch):
                yo[c] *= inv


def avg_pool2d_forward(x: np.ndarray, kernel: tuple[int, ...] = (2, 2), stride: tuple[int, ...] | None = None,
                       pad: tuple[int, ...] = (0, 0, 0, 0), ceil_mode: bool = False,
                       count_include_pad: bool = True) -> np.ndarray:
    """Average pool x (N,H,W,C) -> y (N,Ho,Wo,C).

    kernel, stride: int or (h, w); stride defaults to the kernel. pad: (top, bottom, left, right).
    count_include_pad: divide by the window area inside the padded input (True, PyTorch's default)
    or by the number of real input cells under the window (False; Keras "same" pooling).
    """
    x = _check_nhwc(x)
    kh, kw, sh, sw, pad, ho, wo = _window_args(x.shape, kernel, stride, pad, ceil_mode)
    n, _, _, c = x.shape
    y = np.empty((n, ho, wo, c), dtype=x.dtype)
    _avg_pool_fwd(x, kh, kw, sh, sw, pad[0], pad[1], pad[2], pad[3], bool(count_include_pad), y)
    return y


@kernel(parallel=True)
def _avg_pool_bwd(dy, kh, kw, sh, sw, top, bottom, left, right, include_pad, dx):
    n_img, h_out, w_out, n_ch = dy.shape
    _, h_in, w_in, _ = dx.shape
    # One image per thread: overlapping windows write to shared dx cells.
    for n in prange(n_img):
        for oh in range(h_out):
            h0 = oh * sh - top
            h1 = min(h0 + kh, h_in + bottom)
            hpad = h1 - h0
            h0 = max(h0, 0)
            h1 = min(h1, h_in)
            for ow in range(w_out):
                w0 = ow * sw - left
                w1 = min(w0 + kw, w_in + right)
                wpad = w1 - w0
                w0 = max(w0, 0)
                w1 = min(w1, w_in)
                if include_pad:
                    inv = 1.0 / (hpad * wpad)
                else:
                    inv = 1.0 / ((h1 - h0) * (w1 - w0))
                g = dy[n, oh, ow]
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        d = dx[n, ih, iw]
                        for c in range(n_ch):
                            d[c] += g[c] * inv


def avg_pool2d_backward(dy: np.ndarray, x_shape: tuple[int, ...], kernel: tuple[int, ...] = (2, 2),
                        stride: tuple[int, ...] | None = None, pad: tuple[int, ...] = (0, 0, 0, 0),
                        ceil_mode: bool = False, count_include_pad: bool = True) -> np.ndarray:
    """Gradient of average pooling: dy (N,Ho,Wo,C) -> dx x_shape (N,H,W,C); same window arguments as forward."""
    x_shape = _check_x_shape(x_shape)
    kh, kw, sh, sw, pad, ho, wo = _window_args(x_shape, kernel, stride, pad, ceil_mode)
    dy = _check_nhwc(dy, "dy")
    expected = (x_shape[0], ho, wo, x_shape[3])
    if dy.shape != expected:
        raise ValueError(f"dy must have shape (N,Ho,Wo,C) = {expected} for x_shape {x_shape}; got {dy.shape}")
    dx = np.zeros(x_shape, dtype=dy.dtype)
    _avg_pool_bwd(dy, kh, kw, sh, sw, pad[0], pad[1], pad[2], pad[3], bool(count_include_pad), dx)
    return dx


# --------------------------------------------------------------------------- global average pool


@kernel(parallel=True)
def _global_avg_fwd(x, y):
    n_img, h_in, w_in, n_ch = x.shape
    inv = 1.0 / (h_in * w_in)
    for n in prange(n_img):
        yn = y[n]
        for c in range(n_ch):
            yn[c] = 0.0
        for ih in range(h_in):
            for iw in range(w_in):
                xi = x[n, ih, iw]
                for c in range(n_ch):
                    yn[c] += xi[c]
        for c in range(n_ch):
            yn[c] *= inv


@kernel(parallel=True)
def _global_avg_bwd(g, dx):
    """dx[n, h, w, :] = g[n, :] for every (h, w): one streaming write, in parallel over images and rows
    (a NumPy broadcast assignment is the same pass on one thread; 12.8 M floats at covid_squeezenet's head)."""
    n_img, h_in, w_in, n_ch = dx.shape
    for r in prange(n_img * h_in):
        n = r // h_in
        ih = r - n * h_in
        gn = g[n]
        for iw in range(w_in):
            d = dx[n, ih, iw]
            for c in range(n_ch):
                d[c] = gn[c]


def global_avg_pool_forward(x: np.ndarray) -> np.ndarray:
    """Mean over the spatial axes: x (N,H,W,C) -> y (N,C)."""
    x = _check_nhwc(x)
    y = np.empty((x.shape[0], x.shape[3]), dtype=x.dtype)
    _global_avg_fwd(x, y)
    return y


def global_avg_pool_backward(dy: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
    """Gradient of the spatial mean: dy (N,C) -> dx x_shape (N,H,W,C), every cell dy / (H*W)."""
    x_shape = _check_x_shape(x_shape)
    dy = np.asarray(dy)
    if dy.shape != (x_shape[0], x_shape[3]):
        raise ValueError(f"dy must have shape (N,C) = {(x_shape[0], x_shape[3])} for x_shape {x_shape}; got {dy.shape}")
    if dy.dtype not in (np.float32, np.float64):
        raise ValueError(f"dy must be float32 or float64; got {dy.dtype}")
    dx = _reuse.empty(x_shape, dy.dtype)
    _global_avg_bwd(np.ascontiguousarray(dy * dy.dtype.type(1.0 / (x_shape[1] * x_shape[2]))), dx)
    return dx
