"""Dense layer, softmax, classification losses and dropout.

    dense:    y = act(x @ w + b)          x (N,F), w (F,O), b (O,) -> y (N,O);  2*F flops per output (one BLAS GEMM)
              backward (dy w.r.t. the pre-activation):  dx = dy @ w.T,  dw = x.T @ dy,  db = sum_n dy
    softmax:  p_k = exp(z_k - max z) / sum_j exp(z_j - max z);   log_softmax = z - max z - log sum exp(z - max z)

    cross entropy, exactly torch.nn.functional.cross_entropy(reduction="mean"), with class weights w (K,)
    (all ones when absent), label smoothing e and W = sum_n w[y_n]:
        loss = (1 - e) * sum_n w[y_n] * (-logp[n, y_n]) / W  +  (e / K) * sum_n sum_k w[k] * (-logp[n, k]) / W
        dlogits[n] = ((1 - e) * w[y_n] * (p[n] - onehot(y_n)) + (e / K) * (sum(w) * p[n] - w)) / W
    (with uniform weights W = N, i.e. the plain batch mean.)

    focal loss (Lin et al. 2017, softmax form), weighted mean like CE with q = 1 - p[n, y_n]:
        FL_n = -w[y_n] * q^gamma * logp[n, y_n];   loss = sum_n FL_n / W
        dFL_n / dz[n] = w[y_n] * (gamma * q^(gamma-1) * p_y * logp_y - q^gamma) * (onehot(y_n) - p[n])
    q is summed from the other classes' probabilities, not 1 - p_y, so it keeps its digits when p_y -> 1.

    dropout (inverted): mask = (u >= p) / (1 - p) with u ~ U[0,1) from the caller's Generator;
        y = x * mask, dx = dy * mask, so inference needs no rescaling.

Softmax-family kernels work row by row in a Numba kernel, accumulating sum exp in float64.
Deliberately absent: ignore_index, soft/probability targets, reductions other than the mean,
and any hidden global RNG (dropout takes an explicit np.random.Generator).
"""

import math

import numpy as np

from lightcnn._jit import kernel, prange
from lightcnn.kernels.activation import ACT_NONE, act_forward_flat, activation_code


# --------------------------------------------------------------------------- kernels


@kernel
def _bias_act(z, b, act, alpha, y):
    """y = act(z + b), z and y (N,O); z is the wrapper's own GEMM output, reused as scratch."""
    n, o = z.shape
    for i in range(n):
        for j in range(o):
            z[i, j] += b[j]
    # dispatch outside the element loop, into a separate array so the loop vectorises
    act_forward_flat(z.reshape(-1), act, alpha, y.reshape(-1))


def _log_softmax_rows_body(z, logp):
    """logp[n] = z[n] - max z[n] - log sum exp(z[n] - max z[n])."""
    n, k = z.shape
    for i in prange(n):
        zmax = z[i, 0]
        for j in range(1, k):
            if z[i, j] > zmax:
                zmax = z[i, j]
        total = 0.0
        for j in range(k):
            total += math.exp(np.float64(z[i, j] - zmax))
        lse = math.log(total)
        for j in range(k):
            logp[i, j] = (z[i, j] - zmax) - lse


def _softmax_rows_body(z, p):
    n, k = z.shape
    for i in prange(n):
        zmax = z[i, 0]
        for j in range(1, k):
            if z[i, j] > zmax:
                zmax = z[i, j]
        total = 0.0
        for j in range(k):
            total += math.exp(np.float64(z[i, j] - zmax))
        inv = 1.0 / total
        for j in range(k):
            p[i, j] = math.exp(np.float64(z[i, j] - zmax)) * inv


# One body, two compilations: rows spread over threads for big inputs; a serial loop for the small
# ones (a 2-class head on a batch of 32 is 64 exponentials, far less than waking a thread costs),
# which training on cached features calls every step.
_log_softmax_rows = kernel(parallel=True)(_log_softmax_rows_body)
_log_softmax_rows_serial = kernel(_log_softmax_rows_body)
_softmax_rows = kernel(parallel=True)(_softmax_rows_body)
_softmax_rows_serial = kernel(_softmax_rows_body)
SOFTMAX_SERIAL_MAX = 1 << 14  # elements; below this the serial loop is faster on 2 cores


# --------------------------------------------------------------------------- validation


def _float2d(a, name, legend):
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape {legend}, got {a.shape}")
    return np.ascontiguousarray(a)


def _labels(labels, n, k):
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape (N,) = ({n},), got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, K) = [0, {k}), got range [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _class_weights(class_weights, k):
    if class_weights is None:
        return np.ones(k)
    w = np.asarray(class_weights, dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"class_weights must have shape (K,) = ({k},), got {w.shape}")
    if np.any(w < 0):
        raise ValueError("class_weights must be non-negative")
    return w


def _logits(logits):
    z = _float2d(logits, "logits", "(N,K)")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"logits must have shape (N,K) with N, K >= 1, got {z.shape}")
    return z


# --------------------------------------------------------------------------- dense


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, act: int = ACT_NONE,
                  alpha: float = 1.0) -> np.ndarray:
    """y = act(x @ w + b).  x (N,F), w (F,O), b (O,) or None -> y (N,O) in x's dtype."""
    code = activation_code(act)
    x = _float2d(x, "x", "(N,F)")
    w = _float2d(w, "w", "(F,O)")
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"w must have shape (F,O) with F = {x.shape[1]}, got {w.shape}")
    w = w.astype(x.dtype, copy=False)
    y = x @ w  # BLAS GEMM; y is a fresh array we own, so the epilogue may use it as scratch
    if b is None and code == ACT_NONE:
        return y
    o = w.shape[1]
    if b is None:
        b = np.zeros(o, dtype=x.dtype)
    else:
        b = np.asarray(b)
        if b.shape != (o,):
            raise ValueError(f"b must have shape (O,) = ({o},), got {b.shape}")
        b = np.ascontiguousarray(b, dtype=x.dtype)
    if code == ACT_NONE:
        y += b
        return y
    out = np.empty_like(y)
    _bias_act(y, b, code, x.dtype.type(alpha), out)
    return out


def dense_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple:
    """dy (N,O) w.r.t. the pre-activation output, x (N,F), w (F,O) -> (dx (N,F), dw (F,O), db (O,))."""
    x = _float2d(x, "x", "(N,F)")
    w = _float2d(w, "w", "(F,O)").astype(x.dtype, copy=False)
    dy = _float2d(dy, "dy", "(N,O)").astype(x.dtype, copy=False)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"w must have shape (F,O) with F = {x.shape[1]}, got {w.shape}")
    if dy.shape != (x.shape[0], w.shape[1]):
        raise ValueError(f"dy must have shape (N,O) = {(x.shape[0], w.shape[1])}, got {dy.shape}")
    dx = dy @ w.T
    dw = x.T @ dy
    db = dy.sum(axis=0, dtype=np.float64).astype(x.dtype)
    return dx, dw, db


# --------------------------------------------------------------------------- softmax


def softmax(logits: np.ndarray) -> np.ndarray:
    """logits (N,K) -> probabilities p (N,K), each row summing to 1 (max-subtracted, stable)."""
    z = _logits(logits)
    p = np.empty_like(z)
    (_softmax_rows_serial if z.size < SOFTMAX_SERIAL_MAX else _softmax_rows)(z, p)
    return p


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits (N,K) -> log-probabilities logp (N,K) (log-sum-exp with the max subtracted)."""
    z = _logits(logits)
    logp = np.empty_like(z)
    (_log_softmax_rows_serial if z.size < SOFTMAX_SERIAL_MAX else _log_softmax_rows)(z, logp)
    return logp


# --------------------------------------------------------------------------- losses


def cross_entropy(logits: np.ndarray, labels: np.ndarray, class_weights: np.ndarray | None = None,
                  label_smoothing: float = 0.0) -> tuple:
    """Mean cross entropy as torch.nn.functional.cross_entropy(reduction="mean").

    logits (N,K), labels (N,) ints in [0,K), class_weights (K,) or None, label_smoothing in [0,1]
    -> (loss: Python float, dlogits (N,K) in logits' dtype).
    """
    z = _logits(logits)
    n, k = z.shape
    y = _labels(labels, n, k)
    w = _class_weights(class_weights, k)
    e = float(label_smoothing)
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    # The loss is formed in float64 whatever the logits' dtype; it is one number per batch.
    logp = log_softmax(z.astype(np.float64))
    p = np.exp(logp)
    wy = w[y]
    total_w = wy.sum()
    if total_w <= 0:
        raise ValueError("the labelled classes have zero total weight; the weighted mean is undefined")
    rows = np.arange(n)
    nll = -(wy * logp[rows, y]).sum() / total_w
    smooth = -(logp @ w).sum() / total_w
    loss = (1.0 - e) * nll + (e / k) * smooth

    grad = (e / k) * (w.sum() * p - w[None, :])
    grad += (1.0 - e) * wy[:, None] * p
    grad[rows, y] -= (1.0 - e) * wy
    grad /= total_w
    return float(loss), grad.astype(z.dtype)


def focal_loss(logits: np.ndarray, labels: np.ndarray, gamma: float = 2.0,
               class_weights: np.ndarray | None = None) -> tuple:
    """Softmax focal loss, FL = -w_y (1 - p_y)^gamma log p_y, weighted mean like cross_entropy.

    logits (N,K), labels (N,), gamma >= 0, class_weights (K,) or None -> (loss float, dlogits (N,K)).
    gamma = 0 gives exactly cross_entropy without smoothing.
    """
    z = _logits(logits)
    n, k = z.shape
    y = _labels(labels, n, k)
    w = _class_weights(class_weights, k)
    gamma = float(gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logp = log_softmax(z.astype(np.float64))
    p = np.exp(logp)
    rows = np.arange(n)
    wy = w[y]
    total_w = wy.sum()
    if total_w <= 0:
        raise ValueError("the labelled classes have zero total weight; the weighted mean is undefined")
    logp_y = logp[rows, y]
    p_y = p[rows, y]
    q = p.sum(axis=1) - p_y  # = 1 - p_y without cancellation (sum over the other classes)
    q = np.maximum(q, 0.0)
    q_g = q**gamma
    loss = -(wy * q_g * logp_y).sum() / total_w

    # gamma * q^(gamma-1) * p_y * log p_y vanishes as q -> 0 for gamma > 0 (p_y log p_y ~ -q);
    # evaluated only where q > 0 so 0^(negative) never appears.
    safe_q = np.where(q > 0, q, 1.0)
    first = np.where(q > 0, gamma * safe_q ** (gamma - 1.0) * p_y * logp_y, 0.0)
    coef = wy * (first - q_g) / total_w  # dFL/dz = coef * (onehot - p)
    grad = -coef[:, None] * p
    grad[rows, y] += coef
    return float(loss), grad.astype(z.dtype)


# --------------------------------------------------------------------------- dropout


def dropout_forward(x: np.ndarray, p: float, rng: np.random.Generator) -> tuple:
    """Inverted dropout (training only).  x (...) -> (y (...), mask (...)), both in x's dtype.

    Each element is kept with probability 1 - p; mask holds 0 or 1/(1-p), so y = x * mask and
    E[y] = x. p = 0 is the identity (mask of ones); p = 1 drops everything. `rng` is an
    np.random.Generator: the same generator state gives the same mask.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1], got {p}")
    if p == 0.0:
        return x.copy(), np.ones_like(x)
    if p == 1.0:
        return np.zeros_like(x), np.zeros_like(x)
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """dx = dy * mask.  dy (...), mask (...) from dropout_forward -> dx (...)."""
    dy = np.asarray(dy)
    mask = np.asarray(mask)
    if dy.shape != mask.shape:
        raise ValueError(f"dy must have the mask's shape {mask.shape}, got {dy.shape}")
    return dy * mask.astype(dy.dtype, copy=False)
