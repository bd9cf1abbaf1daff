"""Batch normalisation over the channel (last) axis of NHWC activations.

Training (statistics of the batch, over N, H and W; M = N*H*W values per channel):

    mean_c = sum x / M                       var_c = sum (x - mean_c)^2 / M      (biased)
    inv_std_c = 1 / sqrt(var_c + eps)        xhat = (x - mean_c) * inv_std_c
    y = gamma_c * xhat + beta_c

    backward:  dbeta = sum dy      dgamma = sum dy * xhat
               dx = gamma * inv_std / M * (M * dy - dbeta - xhat * dgamma)

Running statistics follow PyTorch: new = (1 - momentum) * old + momentum * batch, and the
running variance is fed the *unbiased* batch variance var * M / (M - 1).

Inference folds the four per-channel vectors into one multiply-add,

    scale = gamma / sqrt(running_var + eps)     shift = beta - running_mean * scale
    y = act(x * scale + shift)                  dx = dy * scale   (frozen BN)

and ``fold_batchnorm_into_conv`` goes one step further and removes the BN entirely:
w' = w * scale (over the output-channel axis), b' = b * scale + shift.

Cost: inference 2 flops per element (+ activation); training forward reads x three
times (mean, variance, normalise) and backward reads dy and xhat twice, all memory-bound.
Channel sums are accumulated in float64 over fixed row chunks, so float32 statistics are
accurate for large M and results do not depend on the number of threads.

Training takes an activation whose derivative its output gives (relu, relu6, ELU): forward
applies it while normalising, and backward takes dz = dy * act'(.) from the output row by row
inside both of its passes, so neither the pre-activation nor dz is ever stored. The output can
go into channels col0.. of a wider array (a Fire module's concatenation), and backward then
reads its gradient from the same channels.

Deliberately absent: group/layer/instance norm, and the "cudnn" momentum=None cumulative
average. The cache is exactly what backward needs: xhat (same shape as x) and inv_std (C,);
x itself is not kept.
"""

from typing import NamedTuple

import numpy as np

from lightcnn._jit import kernel, prange
from lightcnn.kernels import _reuse
from lightcnn.kernels.activation import (ACT_CHUNK, ACT_NONE, act_backward_from_output_flat, act_forward_flat,
                                         act_inplace, activation_code, grad_from_output)

# Rows per chunk of the channel reductions; the chunking depends on M only (not on the
# thread count) so the float64 partial sums are added in the same order on every machine.
_ROWS_PER_CHUNK = 2048
# Below this many elements the element-wise passes run serially.
_PARALLEL_MIN_SIZE = 1 << 17


class BatchNormCache(NamedTuple):
    """What batchnorm_train_backward needs: xhat (N,H,W,C) and inv_std (C,)."""

    xhat: np.ndarray
    inv_std: np.ndarray


# --------------------------------------------------------------------------- kernels


@kernel(parallel=True)
def _chunk_sums(a, rows_per_chunk, partial):
    """partial[k, c] = sum of a[r, c] over the rows r of chunk k (float64)."""
    m, c = a.shape
    for k in prange(partial.shape[0]):
        stop = min(m, (k + 1) * rows_per_chunk)
        for r in range(k * rows_per_chunk, stop):
            for j in range(c):
                partial[k, j] += a[r, j]


@kernel(parallel=True)
def _chunk_sq_dev(a, mean, rows_per_chunk, partial):
    """partial[k, c] = sum of (a[r, c] - mean[c])^2 over the rows of chunk k (float64; mean float32 or float64)."""
    m, c = a.shape
    for k in prange(partial.shape[0]):
        stop = min(m, (k + 1) * rows_per_chunk)
        for r in range(k * rows_per_chunk, stop):
            for j in range(c):
                d = a[r, j] - mean[j]
                partial[k, j] += d * d


# In the three training kernels below, y and dy are (M, >= col0 + C) rows whose channels col0..col0+C
# belong to this BN, and dz = dy * act'(.) is taken from y (act_backward_from_output_flat copies dy for
# ACT_NONE, which never reads y). In a concatenation's slot the rows are strided, so dz is taken one row
# at a time into a C-float scratch; otherwise (`whole`: y and dy are (M, C)) over a whole block of rows in
# one flat call: a squeeze conv's 16-64 channels make rows too short to pay for a call each (56x56x16 at
# batch 32: 2.7 ms a pass by rows, 1.2 ms by blocks).


@kernel(parallel=True)
def _chunk_sums_pair(dy, y, col0, act, alpha, xhat, rows_per_chunk, partial_dy, partial_dyx):
    """Chunked sums of dz and of dz * xhat per channel (float64); xhat (M, C)."""
    m, c = xhat.shape
    whole = col0 == 0 and y.shape[1] == c
    for k in prange(partial_dy.shape[0]):
        lo = k * rows_per_chunk
        hi = min(m, lo + rows_per_chunk)
        if whole:
            block = np.empty((hi - lo, c), dtype=xhat.dtype)
            act_backward_from_output_flat(dy[lo:hi].reshape(-1), y[lo:hi].reshape(-1), act, alpha,
                                          block.reshape(-1))
            xb = xhat[lo:hi]
            for r in range(hi - lo):
                for j in range(c):
                    g = block[r, j]
                    partial_dy[k, j] += g
                    partial_dyx[k, j] += g * xb[r, j]
        else:
            dz = np.empty(c, dtype=xhat.dtype)
            for r in range(lo, hi):
                act_backward_from_output_flat(dy[r, col0:col0 + c], y[r, col0:col0 + c], act, alpha, dz)
                for j in range(c):
                    g = dz[j]
                    partial_dy[k, j] += g
                    partial_dyx[k, j] += g * xhat[r, j]


@kernel(parallel=True)
def _normalize(x, mean, inv_std, gamma, beta, act, alpha, xhat, y, col0):
    """xhat = (x - mean) * inv_std; y[:, col0:col0 + C] = act(xhat * gamma + beta).  x, xhat (M, C)."""
    m, c = x.shape
    for r in prange(m):
        yr = y[r, col0:col0 + c]
        for j in range(c):
            h = (x[r, j] - mean[j]) * inv_std[j]
            xhat[r, j] = h
            yr[j] = h * gamma[j] + beta[j]
        if act != ACT_NONE:
            act_inplace(yr, act, alpha)


@kernel(parallel=True)
def _train_dx(dy, y, col0, act, alpha, xhat, k_scale, k_dbeta, k_dgamma, dx, rows_per_block):
    """dx = k_scale * (dz - k_dbeta - xhat * k_dgamma), dz written into dx first (by blocks of rows_per_block
    rows, or row by row in a slot).  xhat, dx (M, C)."""
    m, c = xhat.shape
    whole = col0 == 0 and y.shape[1] == c
    for k in prange((m + rows_per_block - 1) // rows_per_block):
        lo = k * rows_per_block
        hi = min(m, lo + rows_per_block)
        block = dx[lo:hi]
        if whole:
            act_backward_from_output_flat(dy[lo:hi].reshape(-1), y[lo:hi].reshape(-1), act, alpha,
                                          block.reshape(-1))
        else:
            for r in range(hi - lo):
                act_backward_from_output_flat(dy[lo + r, col0:col0 + c], y[lo + r, col0:col0 + c], act, alpha,
                                              block[r])
        xb = xhat[lo:hi]
        for r in range(hi - lo):
            for j in range(c):
                block[r, j] = k_scale[j] * (block[r, j] - k_dbeta[j] - xb[r, j] * k_dgamma[j])


@kernel
def _affine_act_block(x, scale, shift, act, alpha, y):
    """y = act(x * scale + shift) on an (R, C) block of rows."""
    m, c = x.shape
    # With an activation, the affine result goes to a scratch block that is still in cache
    # when act_forward_flat reads it: that keeps the activation dispatch outside the element
    # loop, and a separate (non-aliased) output lets LLVM vectorise it (in place it would not).
    t = y if act == ACT_NONE else np.empty((m, c), dtype=y.dtype)
    for r in range(m):
        for j in range(c):
            t[r, j] = x[r, j] * scale[j] + shift[j]
    if act != ACT_NONE:
        act_forward_flat(t.reshape(-1), act, alpha, y.reshape(-1))


@kernel(parallel=True)
def _affine_act_chunks(x, scale, shift, act, alpha, y, rows_per_chunk):
    m = x.shape[0]
    for k in prange((m + rows_per_chunk - 1) // rows_per_chunk):
        lo, hi = k * rows_per_chunk, min(m, (k + 1) * rows_per_chunk)
        _affine_act_block(x[lo:hi], scale, shift, act, alpha, y[lo:hi])


# --------------------------------------------------------------------------- helpers


def _as_rows(x, name="x"):
    """x (..., C) as a C-contiguous (M, C) float view; M = product of the leading axes."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty channel (last) axis, got shape {x.shape}")
    x = np.ascontiguousarray(x)
    return x, x.reshape(-1, x.shape[-1])


def _channel_vec(v, c, dtype, name):
    v = np.asarray(v)
    if v.shape != (c,):
        raise ValueError(f"{name} must have shape (C,) = ({c},), got {v.shape}")
    return np.ascontiguousarray(v, dtype=dtype)


def _column_sum(a, centre=None):
    """Per-column float64 sum of a (M, C), or of (a - centre)^2 when centre is given."""
    m, c = a.shape
    chunks = max(1, -(-m // _ROWS_PER_CHUNK))
    partial = np.zeros((chunks, c), dtype=np.float64)
    if centre is None:
        _chunk_sums(a, _ROWS_PER_CHUNK, partial)
    else:
        _chunk_sq_dev(a, centre, _ROWS_PER_CHUNK, partial)
    return partial.sum(axis=0)


def batch_statistics(rows):
    """rows (M, C) float32, M >= 1 -> (mean (C,), biased var (C,)), both float64, with the chunked parallel
    sums of training mode. Two passes, the variance around the float64 mean: no cancellation of E[x^2] - E[x]^2,
    and no error from rounding the mean (batchnorm_train_forward centres on the float32 mean it normalises
    with, which moves a variance of 6e-5 around a mean of 300 by 1e-6 relative)."""
    m = rows.shape[0]
    mean64 = _column_sum(rows) / m
    return mean64, _column_sum(rows, mean64) / m


# --------------------------------------------------------------------------- inference


def fold_batchnorm(gamma, beta, running_mean, running_var, eps):
    """(gamma, beta, running_mean, running_var) each (C,) -> (scale (C,), shift (C,)).

    y = x * scale + shift equals the eval-mode BN. Computed in float64, returned in gamma's dtype.
    """
    gamma = np.asarray(gamma)
    c = gamma.shape[0] if gamma.ndim == 1 else None
    if c is None:
        raise ValueError(f"gamma must have shape (C,), got {gamma.shape}")
    vecs = [_channel_vec(v, c, np.float64, n) for v, n in
            ((gamma, "gamma"), (beta, "beta"), (running_mean, "running_mean"), (running_var, "running_var"))]
    g, b, mu, var = vecs
    if eps < 0 or np.any(var + eps <= 0):
        raise ValueError("running_var + eps must be positive in every channel")
    scale = g / np.sqrt(var + eps)
    shift = b - mu * scale
    dtype = gamma.dtype if gamma.dtype in (np.float32, np.float64) else np.float32
    return scale.astype(dtype), shift.astype(dtype)


def batchnorm_inference_forward(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, act: int = ACT_NONE,
                                alpha: float = 1.0) -> np.ndarray:
    """y = act(x * scale + shift) per channel.  x (N,H,W,C) (any leading axes), scale/shift (C,) -> y like x."""
    code = activation_code(act)
    x, rows = _as_rows(x)
    c = x.shape[-1]
    scale = _channel_vec(scale, c, x.dtype, "scale")
    shift = _channel_vec(shift, c, x.dtype, "shift")
    y = np.empty_like(x)
    y_rows, a = y.reshape(rows.shape), x.dtype.type(alpha)
    if x.size >= _PARALLEL_MIN_SIZE:
        _affine_act_chunks(rows, scale, shift, code, a, y_rows, max(1, ACT_CHUNK // c))
    else:
        _affine_act_block(rows, scale, shift, code, a, y_rows)
    return y


def batchnorm_inference_backward(dy: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """dx = dy * scale (frozen / eval-mode BN).  dy (N,H,W,C) w.r.t. the pre-activation output, scale (C,)."""
    dy, _ = _as_rows(dy, "dy")
    scale = _channel_vec(scale, dy.shape[-1], dy.dtype, "scale")
    return dy * scale


def fold_batchnorm_into_conv(w, b, scale, shift):
    """Absorb y = conv(x) * scale + shift into the conv itself.

    w: any layout whose LAST axis is the output channel O -- HWIO (KH,KW,C,O), pointwise (C,O),
    depthwise (KH,KW,C) or dense (F,O); b (O,) or None; scale, shift (O,).
    Returns (w' = w * scale, b' = b * scale + shift), in w's dtype.
    """
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float64) or w.ndim < 1:
        raise ValueError(f"w must be a float array whose last axis is the output channel, got {w.dtype} {w.shape}")
    o = w.shape[-1]
    scale = _channel_vec(scale, o, np.float64, "scale")
    shift = _channel_vec(shift, o, np.float64, "shift")
    bias = np.zeros(o) if b is None else _channel_vec(b, o, np.float64, "b")
    w_folded = (w.astype(np.float64) * scale).astype(w.dtype)
    b_folded = (bias * scale + shift).astype(w.dtype)
    return w_folded, b_folded


# --------------------------------------------------------------------------- training


def _rows_with_slot(a, like, col0, name, fn):
    """a (N,H,W,C_total) holding `like` (N,H,W,C)'s channels at col0.. -> a as C-contiguous (M, C_total) rows."""
    c = like.shape[-1]
    if (not isinstance(a, np.ndarray) or a.shape[:-1] != like.shape[:-1] or a.dtype != like.dtype
            or not a.flags.c_contiguous or not 0 <= col0 <= a.shape[-1] - c):
        raise ValueError(f"{fn}: {name} must be a C-contiguous {like.dtype} array of shape {like.shape[:-1]} + (C_total,) "
                         f"with channels {col0}..{col0 + c} in it, got {getattr(a, 'shape', None)}")
    return a.reshape(-1, a.shape[-1])


def _training_act(act, alpha, fn):
    code = activation_code(act)
    if not grad_from_output(code, alpha):
        raise ValueError(f"{fn}: a fused activation in training must have its derivative in terms of its output "
                         f"(relu, relu6, elu with alpha >= 0), got {act!r}")
    return code


def batchnorm_train_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, act: int = ACT_NONE,
                            alpha: float = 1.0, out: np.ndarray | None = None, col0: int = 0) -> tuple:
    """Normalise with the batch's own statistics (over N, H, W), then y = act(normalised).

    x (N,H,W,C), gamma/beta (C,) -> (y (N,H,W,C), BatchNormCache(xhat (N,H,W,C), inv_std (C,)),
    batch_mean (C,), batch_var (C,) biased).  Needs M = N*H*W >= 1.  `act`: relu, relu6 or ELU
    (alpha >= 0), see the module docstring. With `out` (N,H,W,C_total) y goes into its channels
    col0..col0+C and that view is returned as y.
    """
    fn = "batchnorm_train_forward"
    code = _training_act(act, alpha, fn)
    x, rows = _as_rows(x)
    m, c = rows.shape
    if m == 0:
        raise ValueError("batch norm in training mode needs at least one value per channel")
    gamma = _channel_vec(gamma, c, x.dtype, "gamma")
    beta = _channel_vec(beta, c, x.dtype, "beta")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mean64 = _column_sum(rows) / m
    mean = mean64.astype(x.dtype)
    # Two-pass variance around the rounded mean: no catastrophic cancellation of E[x^2]-E[x]^2.
    var64 = _column_sum(rows, mean) / m
    inv_std = (1.0 / np.sqrt(var64 + eps)).astype(x.dtype)
    xhat = _reuse.empty_like(x)
    if out is None:
        y = _reuse.empty_like(x)
        y_rows, col0 = y.reshape(rows.shape), 0
    else:
        y_rows, col0 = _rows_with_slot(out, x, col0, "out", fn), int(col0)
        y = out[..., col0:col0 + c]
    _normalize(rows, mean, inv_std, gamma, beta, code, x.dtype.type(alpha), xhat.reshape(rows.shape), y_rows, col0)
    return y, BatchNormCache(xhat, inv_std), mean, var64.astype(x.dtype)


def batchnorm_train_backward(dy: np.ndarray, cache: tuple, gamma: np.ndarray, y: np.ndarray | None = None,
                             act: int = ACT_NONE, alpha: float = 1.0, col0: int = 0) -> tuple:
    """Full batch-norm gradient (the batch statistics depend on x).

    dy (N,H,W,C), cache from batchnorm_train_forward, gamma (C,) -> (dx (N,H,W,C), dgamma (C,), dbeta (C,)).
    With a fused activation, dy is w.r.t. the activation's output and y is that output; with col0,
    dy and y are the whole (N,H,W,C_total) concatenation and this BN's channels start at col0.
    """
    fn = "batchnorm_train_backward"
    code = _training_act(act, alpha, fn)
    xhat, inv_std = cache
    xhat, xhat_rows = _as_rows(xhat, "cache.xhat")
    dy = np.asarray(dy)
    if dy.dtype not in (np.float32, np.float64):
        raise ValueError(f"dy must be float32 or float64, got {dy.dtype}")
    if code == ACT_NONE and col0 == 0 and dy.shape == xhat.shape:
        dy_rows = np.ascontiguousarray(dy, dtype=xhat.dtype).reshape(xhat_rows.shape)
        y_rows = dy_rows  # never read for ACT_NONE
    else:
        if code == ACT_NONE and y is None:
            y = dy
        dy_rows = _rows_with_slot(np.ascontiguousarray(dy, dtype=xhat.dtype), xhat, col0, "dy", fn)
        y_rows = _rows_with_slot(y, xhat, col0, "y", fn)
        if y_rows.shape != dy_rows.shape:
            raise ValueError(f"{fn}: dy and y must have one shape, got {dy.shape} and {getattr(y, 'shape', None)}")
    m, c = xhat_rows.shape
    inv_std = _channel_vec(inv_std, c, np.float64, "cache.inv_std")
    gamma = _channel_vec(gamma, c, np.float64, "gamma")
    chunks = max(1, -(-m // _ROWS_PER_CHUNK))
    p_dy = np.zeros((chunks, c))
    p_dyx = np.zeros((chunks, c))
    dt = xhat.dtype
    a = dt.type(alpha)
    _chunk_sums_pair(dy_rows, y_rows, int(col0), code, a, xhat_rows, _ROWS_PER_CHUNK, p_dy, p_dyx)
    dbeta = p_dy.sum(axis=0)
    dgamma = p_dyx.sum(axis=0)
    dx = _reuse.empty_like(xhat)
    _train_dx(dy_rows, y_rows, int(col0), code, a, xhat_rows, (gamma * inv_std).astype(dt), (dbeta / m).astype(dt),
              (dgamma / m).astype(dt), dx.reshape(xhat_rows.shape), max(1, ACT_CHUNK // c))
    return dx, dgamma.astype(dt), dbeta.astype(dt)


def update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """PyTorch's running-average update; all vectors (C,), count = M = N*H*W values per channel.

    new_mean = (1 - momentum) * running_mean + momentum * batch_mean
    new_var  = (1 - momentum) * running_var  + momentum * batch_var * count / (count - 1)
    Returns new arrays (the inputs are not modified), in running_mean's dtype.
    """
    running_mean = np.asarray(running_mean)
    if running_mean.ndim != 1:
        raise ValueError(f"running_mean must have shape (C,), got {running_mean.shape}")
    c = running_mean.shape[0]
    rv = _channel_vec(running_var, c, np.float64, "running_var")
    bm = _channel_vec(batch_mean, c, np.float64, "batch_mean")
    bv = _channel_vec(batch_var, c, np.float64, "batch_var")
    count = int(count)
    if count < 2:
        raise ValueError(f"the unbiased variance needs count >= 2 values per channel, got {count}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    dtype = running_mean.dtype if running_mean.dtype in (np.float32, np.float64) else np.float32
    new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * bm
    new_var = (1.0 - momentum) * rv + momentum * bv * (count / (count - 1))
    return new_mean.astype(dtype), new_var.astype(dtype)
