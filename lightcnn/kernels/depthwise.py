"""Depthwise 2-D convolution: one KHxKW filter per channel, no mixing across channels.

    y[n, oh, ow, c] = act( b[c] + sum_{i < KH, j < KW} xpad[n, oh*SH + i, ow*SW + j, c] * w[i, j, c] )

x (N,H,W,C), w (KH,KW,C), b (C,) -> y (N,Ho,Wo,C); xpad is x with zero padding
(top, bottom, left, right). PyTorch's symmetric padding and TensorFlow "SAME" (e.g. (0,1,0,1)
for a stride-2 3x3 on an even input) are both just four numbers; see lightcnn.kernels.shapes.

Output size: Ho = floor((H + top + bottom - KH) / SH) + 1, likewise Wo.
Cost: 2*KH*KW FLOPs per output element, i.e. C times fewer than a dense conv of the same
shape, so the kernel is bound by memory and loop overhead rather than arithmetic. That is why
it is written the way it is:
  - the channel loop is innermost: in NHWC the C values of one pixel are contiguous, so every
    multiply-add is a unit-stride vector operation over C (and w[i, j, :] is contiguous too);
  - one thread handles one (image, output row) at a time, with a C-length accumulator that
    stays in L1; the KH input rows it reads are reused by the neighbouring output pixels;
  - padding is never materialised: each output pixel clamps its window to the rows/columns
    that lie inside the input, so border pixels simply run fewer taps (one pass over C per tap);
  - interior pixels of 3x3 and 5x5 kernels (all MobileNet depthwise layers) sum every tap in a
    single pass over C, so the accumulator is stored once rather than once per tap.
The bias and the activation (an ACT_* code from lightcnn.kernels.activation) are fused into
the store of each output pixel, so y is written exactly once.

Backward (dy is the gradient w.r.t. the pre-activation output, as for every conv kernel):
    dx[n, h, w, c] = sum over the (i, j, oh, ow) with oh*SH + i - top = h, ow*SW + j - left = w
                     of dy[n, oh, ow, c] * w[i, j, c]           gathered per input row, parallel-safe
    dw[i, j, c]    = sum_{n, oh, ow} dy[n, oh, ow, c] * xpad[n, oh*SH + i, ow*SW + j, c]
    db[c]          = sum_{n, oh, ow} dy[n, oh, ow, c]
dw and db are accumulated in a fixed number of per-chunk partial buffers (rows split into
chunks, one chunk per parallel iteration) and summed afterwards, so no two threads write the
same cell and the result does not depend on the thread count.

Deliberately not here: channel multipliers > 1 (no supported model uses them), dilation, and
the activation derivative in backward (apply activation_backward first).
"""

import numpy as np

from lightcnn._jit import kernel, prange
from lightcnn.kernels.activation import (ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6, ACTIVATIONS, act_inplace,
                                         act_scalar, hard_swish_scalar, relu6_scalar, relu_scalar)
from lightcnn.kernels.shapes import conv_output_size

__all__ = ["depthwise_conv2d_forward", "depthwise_conv2d_backward"]

# Partial dw/db buffers for the backward; fixed so the summation order never depends on threads.
_DW_CHUNKS = 16


# --------------------------------------------------------------------------- argument checks


def _check_nhwc(x, name):
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must be a 4-D array of shape (N,H,W,C); got {shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64; got {x.dtype}")
    return np.ascontiguousarray(x)


def _check_args(x, w, stride, pad):
    """Validate x (N,H,W,C), w (KH,KW,C), stride, pad; return (x, w, (sh, sw), pad4, Ho, Wo)."""
    x = _check_nhwc(x, "x")
    w = np.asarray(w)
    n, h, wd, c = x.shape
    if w.ndim != 3 or w.shape[2] != c:
        raise ValueError(f"w must have shape (KH,KW,C) with C={c} to match x (N,H,W,C)={x.shape}; got {w.shape}")
    w = np.ascontiguousarray(w, dtype=x.dtype)
    if np.isscalar(stride):
        stride = (stride, stride)
    stride = tuple(int(s) for s in stride)
    if len(stride) != 2 or min(stride) < 1:
        raise ValueError(f"stride must be a pair of positive ints (SH, SW); got {stride}")
    pad = tuple(int(p) for p in pad)
    if len(pad) != 4 or min(pad) < 0:
        raise ValueError(f"pad must be four non-negative ints (top, bottom, left, right); got {pad}")
    kh, kw, _ = w.shape
    ho = conv_output_size(h, kh, stride[0], pad[0], pad[1])
    wo = conv_output_size(wd, kw, stride[1], pad[2], pad[3])
    return x, w, stride, pad, ho, wo


def _act_code(act):
    code = ACTIVATIONS.get(act) if isinstance(act, str) else int(act)
    if code not in ACTIVATIONS.values():
        raise ValueError(f"unknown activation {act!r}; expected an ACT_* code or one of {sorted(ACTIVATIONS)}")
    return code


# --------------------------------------------------------------------------- forward


@kernel
def _epilogue(acc, act, alpha, out):
    """out[c] = act(acc[c]); `act` is branched on once, outside the channel loop."""
    # Passing act_scalar a constant code lets its if-chain fold away, leaving a branch-free
    # loop that LLVM vectorises; with the runtime code the chain would run per element.
    n_ch = acc.shape[0]
    if act == ACT_RELU:
        for c in range(n_ch):
            out[c] = relu_scalar(acc[c])
    elif act == ACT_RELU6:
        for c in range(n_ch):
            out[c] = relu6_scalar(acc[c])
    elif act == ACT_HARD_SWISH:
        for c in range(n_ch):
            out[c] = hard_swish_scalar(acc[c])
    elif act == ACT_NONE:
        for c in range(n_ch):
            out[c] = acc[c]
    else:
        for c in range(n_ch):
            out[c] = act_scalar(acc[c], act, alpha)


@kernel
def _taps3(r, wr, c):
    return r[0, c] * wr[0, c] + r[1, c] * wr[1, c] + r[2, c] * wr[2, c]


@kernel
def _taps5(r, wr, c):
    return r[0, c] * wr[0, c] + r[1, c] * wr[1, c] + r[2, c] * wr[2, c] + r[3, c] * wr[3, c] + r[4, c] * wr[4, c]


@kernel
def _window3x3(r0, r1, r2, w, b, acc):
    # All 9 taps in one pass over C: acc is stored once instead of loaded and stored per tap,
    # which is what bounds the generic loop (about 1.8x faster on MobileNet shapes).
    for c in range(acc.shape[0]):
        acc[c] = b[c] + _taps3(r0, w[0], c) + _taps3(r1, w[1], c) + _taps3(r2, w[2], c)


@kernel
def _window5x5(r0, r1, r2, r3, r4, w, b, acc):
    for c in range(acc.shape[0]):
        acc[c] = (b[c] + _taps5(r0, w[0], c) + _taps5(r1, w[1], c) + _taps5(r2, w[2], c)
                  + _taps5(r3, w[3], c) + _taps5(r4, w[4], c))


@kernel
def _quad3x3(r0, r1, r2, w, b, out):
    """Four neighbouring output pixels of a 3x3 stride-1 window (before activation): out (4, C)
    from input rows r0, r1, r2 (6, C).

    Four outputs share 4 of their 6 input columns and all 9 weights: loading each once per
    channel vector and keeping them in registers is what makes this ~1.7x faster than four
    separate windows (those reload 18 vectors per output). Sums run in _window3x3's order.
    """
    for c in range(out.shape[1]):
        w00, w01, w02 = w[0, 0, c], w[0, 1, c], w[0, 2, c]
        w10, w11, w12 = w[1, 0, c], w[1, 1, c], w[1, 2, c]
        w20, w21, w22 = w[2, 0, c], w[2, 1, c], w[2, 2, c]
        a0, a1, a2, a3, a4, a5 = r0[0, c], r0[1, c], r0[2, c], r0[3, c], r0[4, c], r0[5, c]
        b0, b1, b2, b3, b4, b5 = r1[0, c], r1[1, c], r1[2, c], r1[3, c], r1[4, c], r1[5, c]
        d0, d1, d2, d3, d4, d5 = r2[0, c], r2[1, c], r2[2, c], r2[3, c], r2[4, c], r2[5, c]
        bc = b[c]
        out[0, c] = (bc + (a0 * w00 + a1 * w01 + a2 * w02) + (b0 * w10 + b1 * w11 + b2 * w12)
                     + (d0 * w20 + d1 * w21 + d2 * w22))
        out[1, c] = (bc + (a1 * w00 + a2 * w01 + a3 * w02) + (b1 * w10 + b2 * w11 + b3 * w12)
                     + (d1 * w20 + d2 * w21 + d3 * w22))
        out[2, c] = (bc + (a2 * w00 + a3 * w01 + a4 * w02) + (b2 * w10 + b3 * w11 + b4 * w12)
                     + (d2 * w20 + d3 * w21 + d4 * w22))
        out[3, c] = (bc + (a3 * w00 + a4 * w01 + a5 * w02) + (b3 * w10 + b4 * w11 + b5 * w12)
                     + (d3 * w20 + d4 * w21 + d5 * w22))


@kernel
def _pair3x3_s2(r0, r1, r2, w, b, out):
    """Two output pixels of a 3x3 stride-2 window (before activation): out (2, C) from rows (5, C).

    Two, not four: four stride-2 outputs need 27 input vectors + 9 weights, more than the
    32 vector registers, and LLVM then gives up vectorising the channel loop (12x slower).
    Written out in full for the same reason: a loop over the pixels inside the channel loop
    would become the innermost loop.
    """
    for c in range(out.shape[1]):
        w00, w01, w02 = w[0, 0, c], w[0, 1, c], w[0, 2, c]
        w10, w11, w12 = w[1, 0, c], w[1, 1, c], w[1, 2, c]
        w20, w21, w22 = w[2, 0, c], w[2, 1, c], w[2, 2, c]
        a0, a1, a2, a3, a4 = r0[0, c], r0[1, c], r0[2, c], r0[3, c], r0[4, c]
        b0, b1, b2, b3, b4 = r1[0, c], r1[1, c], r1[2, c], r1[3, c], r1[4, c]
        d0, d1, d2, d3, d4 = r2[0, c], r2[1, c], r2[2, c], r2[3, c], r2[4, c]
        bc = b[c]
        out[0, c] = (bc + (a0 * w00 + a1 * w01 + a2 * w02) + (b0 * w10 + b1 * w11 + b2 * w12)
                     + (d0 * w20 + d1 * w21 + d2 * w22))
        out[1, c] = (bc + (a2 * w00 + a3 * w01 + a4 * w02) + (b2 * w10 + b3 * w11 + b4 * w12)
                     + (d2 * w20 + d3 * w21 + d4 * w22))


@kernel
def _interior_groups(src, r0, w0_first, n_groups, w, b, sw, act, alpha, out):
    """Output pixels 0 .. g*n_groups - 1 of `out` (all windows inside the input), g = 4 (stride 1)
    or 2 (stride 2) at a time, then the activation over the block in one vectorised pass
    (applying it inside the group loops would need one copy of them per activation)."""
    g = 4 if sw == 1 else 2
    span = (g - 1) * sw + 3  # input columns read by g outputs: 6 (stride 1) or 5 (stride 2)
    for q in range(n_groups):
        c0 = w0_first + g * q * sw
        x0 = src[r0, c0:c0 + span]
        x1 = src[r0 + 1, c0:c0 + span]
        x2 = src[r0 + 2, c0:c0 + span]
        o = out[g * q:g * q + g]
        if sw == 1:
            _quad3x3(x0, x1, x2, w, b, o)
        else:
            _pair3x3_s2(x0, x1, x2, w, b, o)
    if act != ACT_NONE:
        act_inplace(out.reshape(-1), act, alpha)


@kernel
def dw_output_row(src, r_base, h_in, w, b, sh, sw, top, left, act, alpha, oh, acc, out):
    """One output row: out (Wo, C) = act(b + depthwise conv of the image rows around oh).

    src (R, W, C) holds input rows r_base .. r_base + R - 1 of an image with h_in rows (the
    whole image, r_base = 0, or a band of rows kept in cache by a fused kernel); it must
    contain every in-image row the window of output row oh touches. acc (C,) is scratch.
    """
    kh, kw, _ = w.shape
    w_in, n_ch = src.shape[1], src.shape[2]
    w_out = out.shape[0]
    h0 = oh * sh - top
    # Clamp the window to the input instead of reading a padded copy.
    i_lo = max(0, -h0)
    i_hi = min(kh, h_in - h0)
    r0 = h0 - r_base  # src row of input row h0
    ow = np.int64(0)  # not the literal 0: a literal argument is typed Literal[int](0), a callee specialisation of its own
    if kh == 3 and kw == 3 and i_lo == 0 and i_hi == 3 and sw <= 2:
        # Interior columns in groups of g: ow_first .. ow_first + g*n_groups - 1.
        g = 4 if sw == 1 else 2
        ow_first = (left + sw - 1) // sw
        ow_last = (w_in - 3 + left) // sw  # last ow whose window ends inside the input
        n_groups = max(0, (ow_last - ow_first + 1) // g)
        if n_groups > 0:
            _border_pixels(src, r0, i_lo, i_hi, w_in, n_ch, w, b, sw, left, act, alpha, ow, ow_first, acc, out)
            _interior_groups(src, r0, ow_first * sw - left, n_groups, w, b, sw, act, alpha,
                             out[ow_first:ow_first + g * n_groups])
            ow = ow_first + g * n_groups
    _border_pixels(src, r0, i_lo, i_hi, w_in, n_ch, w, b, sw, left, act, alpha, ow, w_out, acc, out)


@kernel
def _border_pixels(src, r0, i_lo, i_hi, w_in, n_ch, w, b, sw, left, act, alpha, ow_lo, ow_hi, acc, out):
    """Output pixels ow_lo .. ow_hi - 1 one at a time (any kernel size, windows clamped to the input)."""
    kh, kw, _ = w.shape
    for ow in range(ow_lo, ow_hi):
        w0 = ow * sw - left
        j_lo = max(0, -w0)
        j_hi = min(kw, w_in - w0)
        inside = i_lo == 0 and i_hi == kh and j_lo == 0 and j_hi == kw
        if inside and kh == 3 and kw == 3:
            _window3x3(src[r0, w0:w0 + 3], src[r0 + 1, w0:w0 + 3], src[r0 + 2, w0:w0 + 3], w, b, acc)
        elif inside and kh == 5 and kw == 5:
            _window5x5(src[r0, w0:w0 + 5], src[r0 + 1, w0:w0 + 5], src[r0 + 2, w0:w0 + 5],
                       src[r0 + 3, w0:w0 + 5], src[r0 + 4, w0:w0 + 5], w, b, acc)
        else:
            # Border pixels (and other kernel sizes): one pass over C per valid tap.
            for c in range(n_ch):
                acc[c] = b[c]
            for i in range(i_lo, i_hi):
                for j in range(j_lo, j_hi):
                    xr = src[r0 + i, w0 + j]
                    wr = w[i, j]
                    for c in range(n_ch):
                        acc[c] += xr[c] * wr[c]
        _epilogue(acc, act, alpha, out[ow])


def _dw_forward_body(x, w, b, sh, sw, top, left, act, alpha, y):
    n_img, h_in, w_in, n_ch = x.shape
    _, h_out, w_out, _ = y.shape
    for row in prange(n_img * h_out):
        n = row // h_out
        oh = row - n * h_out
        acc = np.empty(n_ch, dtype=y.dtype)
        dw_output_row(x[n], np.int64(0), h_in, w, b, sh, sw, top, left, act, alpha, oh, acc, y[n, oh])


dw_forward = kernel(parallel=True)(_dw_forward_body)
# The same loop on the calling thread only, for maps too small to share (the inference plan).
dw_forward_serial = kernel(_dw_forward_body)


def depthwise_conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: tuple[int,
                             ...] = (1, 1),
                             pad: tuple[int, ...] = (0, 0, 0, 0), act: int = ACT_NONE,
                             alpha: float = 1.0) -> np.ndarray:
    """Depthwise conv with fused bias and activation: x (N,H,W,C), w (KH,KW,C), b (C,) -> y (N,Ho,Wo,C).

    stride (SH, SW) or int; pad (top, bottom, left, right); act an ACT_* code or name
    (alpha is ELU's). y has x's dtype.
    """
    x, w, (sh, sw), pad, ho, wo = _check_args(x, w, stride, pad)
    n, _, _, c = x.shape
    if b is None:
        b = np.zeros(c, dtype=x.dtype)
    else:
        b = np.asarray(b)
        if b.shape != (c,):
            raise ValueError(f"b must have shape (C,) = ({c},); got {b.shape}")
        b = np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((n, ho, wo, c), dtype=x.dtype)
    dw_forward(x, w, b, sh, sw, pad[0], pad[2], _act_code(act), np.float32(alpha), y)
    return y


# --------------------------------------------------------------------------- backward


@kernel(parallel=True)
def _dw_backward_input(dy, w, sh, sw, top, left, dx):
    n_img, h_out, w_out, n_ch = dy.shape
    kh, kw, _ = w.shape
    _, h_in, w_in, _ = dx.shape
    # Gather: each thread owns one input row of dx, so no write is shared.
    for row in prange(n_img * h_in):
        n = row // h_in
        ih = row - n * h_in
        for iw in range(w_in):
            d = dx[n, ih, iw]
            for c in range(n_ch):
                d[c] = 0.0
            for i in range(kh):
                t = ih + top - i
                if t < 0 or t % sh != 0 or t // sh >= h_out:
                    continue
                oh = t // sh
                for j in range(kw):
                    u = iw + left - j
                    if u < 0 or u % sw != 0 or u // sw >= w_out:
                        continue
                    g = dy[n, oh, u // sw]
                    wr = w[i, j]
                    for c in range(n_ch):
                        d[c] += g[c] * wr[c]


@kernel(parallel=True)
def _dw_backward_params(dy, x, sh, sw, top, left, dw_part, db_part):
    n_img, h_in, w_in, n_ch = x.shape
    n_chunks, kh, kw, _ = dw_part.shape
    _, h_out, w_out, _ = dy.shape
    rows = n_img * h_out
    for chunk in prange(n_chunks):
        pw = dw_part[chunk]
        pb = db_part[chunk]
        for row in range(chunk * rows // n_chunks, (chunk + 1) * rows // n_chunks):
            n = row // h_out
            oh = row - n * h_out
            h0 = oh * sh - top
            i_lo = max(0, -h0)
            i_hi = min(kh, h_in - h0)
            for ow in range(w_out):
                w0 = ow * sw - left
                j_lo = max(0, -w0)
                j_hi = min(kw, w_in - w0)
                g = dy[n, oh, ow]
                for c in range(n_ch):
                    pb[c] += g[c]
                for i in range(i_lo, i_hi):
                    for j in range(j_lo, j_hi):
                        xr = x[n, h0 + i, w0 + j]
                        pwij = pw[i, j]
                        for c in range(n_ch):
                            pwij[c] += g[c] * xr[c]


def depthwise_conv2d_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride: tuple[int, ...] = (1, 1),
                              pad: tuple[int, ...] = (0, 0, 0, 0)) -> tuple:
    """Gradients of the depthwise conv: dy (N,Ho,Wo,C) w.r.t. the pre-activation output,
    x (N,H,W,C), w (KH,KW,C) -> (dx (N,H,W,C), dw (KH,KW,C), db (C,)), all in x's dtype.
    """
    x, w, (sh, sw), pad, ho, wo = _check_args(x, w, stride, pad)
    dy = _check_nhwc(dy, "dy")
    n, h, wd, c = x.shape
    if dy.shape != (n, ho, wo, c):
        raise ValueError(f"dy must have shape (N,Ho,Wo,C) = {(n, ho, wo, c)}; got {dy.shape}")
    dy = dy.astype(x.dtype, copy=False)
    dx = np.empty_like(x)
    _dw_backward_input(dy, w, sh, sw, pad[0], pad[2], dx)
    chunks = max(1, min(_DW_CHUNKS, n * ho))
    dw_part = np.zeros((chunks,) + w.shape, dtype=x.dtype)
    db_part = np.zeros((chunks, c), dtype=x.dtype)
    _dw_backward_params(dy, x, sh, sw, pad[0], pad[2], dw_part, db_part)
    return dx, dw_part.sum(axis=0), db_part.sum(axis=0)
