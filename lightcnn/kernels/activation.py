"""Element-wise activations and their derivatives.

    relu(v)          = max(v, 0)
    relu6(v)         = min(max(v, 0), 6)
    elu(v)           = v                      if v > 0
                       alpha * (exp(v) - 1)   otherwise      (expm1, accurate near 0)
    sigmoid(v)       = 1 / (1 + exp(-v))    evaluated from e = exp(-|v|) <= 1 as 1/(1+e) or e/(1+e),
                                            so exp never overflows for large |v|
    hard_sigmoid(v)  = relu6(v + 3) / 6     (PyTorch's, not Keras' old 0.2*v + 0.5)
    hard_swish(v)    = v * relu6(v + 3) / 6

Derivatives follow PyTorch at the kinks, so gradients match autograd bit-for-bit
in sign and zero pattern:
    relu'(0) = 0;  relu6'(v) = 1 only for 0 < v < 6;  hard_sigmoid'(v) = 1/6 only for -3 < v < 3;
    hard_swish'(v) = 0 for v <= -3, 1 for v >= 3, (2v + 3)/6 in between;
    elu'(v) = alpha * exp(v) for v <= 0;  sigmoid'(v) = s (1 - s).

Every activation is identified by an integer code (ACT_*) so that it can be passed
into a Numba kernel as a plain scalar. Kernels fuse it into their epilogue in one of
two ways: call a scalar kernel (``relu6_scalar(v)``, which LLVM inlines) per element, or -- much
faster in a tight element loop -- call ``act_forward_flat(block, act, alpha, out)``
on a flat output block they own, which tests `act` once outside the loop so the loop
vectorises (a per-element test on `act` blocks vectorisation and costs 10-50x).
Cost: 1 flop (relu) to one exp (elu, sigmoid) per element; the standalone
forward/backward are memory-bound and parallel (in chunks) only for large arrays.

ELU's exponential is `expm1_nonpositive`, a branch-free Taylor series plus doublings in
float64, not a call to libm's expm1, which stops LLVM vectorising the loop (26 M float32 values
on one thread: 198 ms with the call, 88 ms without, on a busy machine; a covid_squeezenet
training step at batch 32 applies ELU to ~110 M values). Its error is below 1e-15 relative in
float64, so float32 results round as math.expm1's do (identical on 26 M samples). The packed GEMM's
epilogue (gemm.py's `elu`, where every float32 conv with ELU and alpha 1 now applies it) has its own
float32 version on 16 lanes instead, within 1 ulp of that: there the float64 one was 100 ms of seed 001's
850 ms training step.

Backward from the output: for relu, relu6 and ELU with alpha >= 0 the derivative is a
function of y = act(x) alone (relu' = [y > 0], relu6' = [0 < y < 6], elu' = 1 if y > 0
else y + alpha, PyTorch's own formula for in-place ELU). A layer that fuses the activation
into its producer's epilogue keeps y (the next layer's input anyway) instead of the
pre-activation, and its backward needs no exponential (`activation_backward_from_output`).

Deliberately absent: in-place public wrappers (kernels never write into their
inputs) and GELU/SiLU/tanh (no supported model uses them).

Shapes: activation_forward(x (...)) -> y (...);  activation_backward(dy (...), x (...)) -> dx (...);
activation_backward_from_output(dy (...), y (...)) -> dx (...).
"""

import math

import numpy as np

from lightcnn._jit import kernel, prange
from lightcnn.kernels import _reuse

ACT_NONE = 0
ACT_RELU = 1
ACT_RELU6 = 2
ACT_ELU = 3
ACT_SIGMOID = 4
ACT_HARD_SIGMOID = 5
ACT_HARD_SWISH = 6

ACTIVATIONS = {
    "none": ACT_NONE,
    "relu": ACT_RELU,
    "relu6": ACT_RELU6,
    "elu": ACT_ELU,
    "sigmoid": ACT_SIGMOID,
    "hard_sigmoid": ACT_HARD_SIGMOID,
    "hard_swish": ACT_HARD_SWISH,
}

# Below this many elements the thread start-up costs more than the loop.
_PARALLEL_MIN_SIZE = 1 << 17


# One small kernel per activation and per derivative. Epilogue loops branch on `act` once and
# then call the one they need with no code argument: a constant code passed into a shared
# act_scalar would be typed as a literal and compiled once per code (14 specialisations of
# act_scalar for MobileNetV2), and a runtime code would be tested per element.
# Each case is a chain of selects ("c if test else t"), not early returns, so LLVM emits
# branch-free (vectorisable) code: random signs would mispredict branches. The tests are
# ordered so that NaN falls through every clamp unchanged, as in PyTorch: a diverging network
# must reach training's NaN check, not be masked to 0.


# 1/k!, k = 1..15: the Taylor series of expm1 on [-0.625, 0] to < 1e-16 relative.
_E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12, _E13, _E14, _E15 = (
    1.0 / math.factorial(k) for k in range(1, 16))


@kernel(fastmath="contract")  # the Horner steps as FMAs: ELU 75 -> 52 ms on 26 M values, one core
def expm1_nonpositive(u):
    """expm1(u) = exp(u) - 1 for u <= 0 (NaN stays NaN), in float64, with no call and no branch.

    u is clamped to [-40, 0] (expm1(-40) = -1 + 4e-18), scaled by 1/64 into [-0.625, 0], where a
    degree-15 Taylor polynomial has relative error < 1e-16, and doubled back six times with
    expm1(2t) = m (m + 2), m = expm1(t): no cancellation near 0, and the relative error does not
    grow (the step's condition number 2(m+1)/(m+2) is <= 1 on (-1, 0]). Measured against
    math.expm1: < 9e-16 relative over 4 M float64 values in [-1000, -1e-300] with separate multiplies and
    adds, < 4.5e-16 with the FMAs it is compiled with; float32 results were identical on 26 M normal samples
    either way.
    """
    u = -40.0 if u < -40.0 else u
    t = u * 0.015625
    p = _E15
    p = p * t + _E14
    p = p * t + _E13
    p = p * t + _E12
    p = p * t + _E11
    p = p * t + _E10
    p = p * t + _E9
    p = p * t + _E8
    p = p * t + _E7
    p = p * t + _E6
    p = p * t + _E5
    p = p * t + _E4
    p = p * t + _E3
    p = p * t + _E2
    p = p * t + _E1
    m = p * t
    m = m * (m + 2.0)
    m = m * (m + 2.0)
    m = m * (m + 2.0)
    m = m * (m + 2.0)
    m = m * (m + 2.0)
    return m * (m + 2.0)


@kernel
def relu_scalar(v):
    return 0.0 if v < 0 else v


@kernel
def relu6_scalar(v):
    t = 0.0 if v < 0 else v
    return 6.0 if t > 6 else t


@kernel
def elu_scalar(v, alpha):
    u = 0.0 if v > 0 else v  # expm1 of the clamped value: no overflow for large v
    e = alpha * expm1_nonpositive(u)
    return v if v > 0 else e


@kernel
def sigmoid_scalar(v):
    # exp(-|v|) <= 1 never overflows; for v < 0, sigmoid(v) = exp(v) / (1 + exp(v)).
    e = math.exp(-abs(v))
    s = 1.0 / (1.0 + e)
    return s if v >= 0 else e * s


@kernel
def hard_sigmoid_scalar(v):
    t = v + 3.0
    t = 0.0 if t < 0 else t
    t = 6.0 if t > 6 else t
    return t / 6.0


@kernel
def hard_swish_scalar(v):
    t = v + 3.0
    t = 0.0 if t < 0 else t
    t = 6.0 if t > 6 else t
    return v * t / 6.0


@kernel
def act_scalar(v, act, alpha):
    """The activation `act` (an ACT_* code, a runtime value) applied to one pre-activation value v."""
    if act == ACT_RELU:
        return relu_scalar(v)
    if act == ACT_RELU6:
        return relu6_scalar(v)
    if act == ACT_ELU:
        return elu_scalar(v, alpha)
    if act == ACT_SIGMOID:
        return sigmoid_scalar(v)
    if act == ACT_HARD_SIGMOID:
        return hard_sigmoid_scalar(v)
    if act == ACT_HARD_SWISH:
        return hard_swish_scalar(v)
    return v


# Derivatives: selects again; `|`/`&` on booleans instead of `or`/`and`, which would branch.
# The kink tests are PyTorch's own, so NaN inputs also get PyTorch's gradient.


@kernel
def relu_grad_scalar(v):
    return 0.0 if v <= 0 else 1.0


@kernel
def relu6_grad_scalar(v):
    return 0.0 if (v <= 0) | (v >= 6) else 1.0


@kernel
def elu_grad_scalar(v, alpha):
    u = 0.0 if v > 0 else v
    e = alpha * (expm1_nonpositive(u) + 1.0)
    return 1.0 if v > 0 else e


@kernel
def sigmoid_grad_scalar(v):
    e = math.exp(-abs(v))
    s = 1.0 / (1.0 + e)
    s = s if v >= 0 else e * s
    return s * (1.0 - s)


@kernel
def hard_sigmoid_grad_scalar(v):
    return 1.0 / 6.0 if (v > -3) & (v < 3) else 0.0


@kernel
def hard_swish_grad_scalar(v):
    g = (2.0 * v + 3.0) / 6.0
    g = 0.0 if v <= -3 else g
    return 1.0 if v >= 3 else g


# The scalars unify to float64 (the literals are float64): the extra precision is
# free next to the memory traffic, and the caller's store rounds back to x.dtype.


# Elements per parallel work item: large enough that the per-chunk dispatch on `act` is
# free, small enough (64 KiB of float32) to stay in L2 when a caller fuses two passes.
ACT_CHUNK = 1 << 14


@kernel
def act_forward_flat(x, act, alpha, out):
    """out[i] = act(x[i]) on flat (1-D) arrays of equal size; out may be x itself.

    The loop over elements sits *inside* each activation's branch. With the `act` test
    inside the loop LLVM cannot vectorise and falls back to branches, which cost up to
    ~50x on random-sign data (measured: ReLU backward 26 ms -> 0.3 ms on 3.2 M floats).
    Loops run over range(x.size) of a slice, never range(start, stop): a possibly
    negative index brings back Numba's wraparound check and costs another 10x.
    Kernels that fuse an activation into an output block they own can call this on
    a flat slice of it.
    """
    if act == ACT_RELU:
        for i in range(x.size):
            out[i] = relu_scalar(x[i])
    elif act == ACT_RELU6:
        for i in range(x.size):
            out[i] = relu6_scalar(x[i])
    elif act == ACT_ELU:
        for i in range(x.size):
            out[i] = elu_scalar(x[i], alpha)
    elif act == ACT_SIGMOID:
        for i in range(x.size):
            out[i] = sigmoid_scalar(x[i])
    elif act == ACT_HARD_SIGMOID:
        for i in range(x.size):
            out[i] = hard_sigmoid_scalar(x[i])
    elif act == ACT_HARD_SWISH:
        for i in range(x.size):
            out[i] = hard_swish_scalar(x[i])
    else:
        for i in range(x.size):
            out[i] = x[i]


@kernel
def act_inplace(a, act, alpha):
    """a[i] = act(a[i]) on a flat array, in place.

    One array argument, not act_forward_flat(a, ..., a): with two arguments that alias,
    LLVM's runtime overlap check fails and the loop runs scalar (~4x slower).
    """
    if act == ACT_RELU:
        for i in range(a.size):
            a[i] = relu_scalar(a[i])
    elif act == ACT_RELU6:
        for i in range(a.size):
            a[i] = relu6_scalar(a[i])
    elif act == ACT_ELU:
        for i in range(a.size):
            a[i] = elu_scalar(a[i], alpha)
    elif act == ACT_SIGMOID:
        for i in range(a.size):
            a[i] = sigmoid_scalar(a[i])
    elif act == ACT_HARD_SIGMOID:
        for i in range(a.size):
            a[i] = hard_sigmoid_scalar(a[i])
    elif act == ACT_HARD_SWISH:
        for i in range(a.size):
            a[i] = hard_swish_scalar(a[i])


@kernel
def act_backward_flat(dy, x, act, alpha, out):
    """out[i] = dy[i] * act'(x[i]) on flat arrays of equal size; see act_forward_flat."""
    if act == ACT_RELU:
        for i in range(x.size):
            out[i] = dy[i] * relu_grad_scalar(x[i])
    elif act == ACT_RELU6:
        for i in range(x.size):
            out[i] = dy[i] * relu6_grad_scalar(x[i])
    elif act == ACT_ELU:
        for i in range(x.size):
            out[i] = dy[i] * elu_grad_scalar(x[i], alpha)
    elif act == ACT_SIGMOID:
        for i in range(x.size):
            out[i] = dy[i] * sigmoid_grad_scalar(x[i])
    elif act == ACT_HARD_SIGMOID:
        for i in range(x.size):
            out[i] = dy[i] * hard_sigmoid_grad_scalar(x[i])
    elif act == ACT_HARD_SWISH:
        for i in range(x.size):
            out[i] = dy[i] * hard_swish_grad_scalar(x[i])
    else:
        for i in range(x.size):
            out[i] = dy[i]


@kernel
def act_backward_from_output_flat(dy, y, act, alpha, out):
    """out[i] = dy[i] * act'(x[i]) computed from y[i] = act(x[i]), for the codes in OUTPUT_GRAD_ACTS.

    relu' = [y > 0]; relu6' = [0 < y < 6]; elu' = 1 if y > 0 else y + alpha (alpha >= 0, so
    y > 0 exactly when x > 0, and alpha * exp(x) = alpha * expm1(x) + alpha = y + alpha).
    The tests are the pre-activation ones moved through a monotone map, so kinks and NaN
    give what act_backward_flat gives.
    """
    if act == ACT_RELU:
        for i in range(y.size):
            out[i] = dy[i] * relu_grad_scalar(y[i])
    elif act == ACT_RELU6:
        for i in range(y.size):
            out[i] = dy[i] * relu6_grad_scalar(y[i])
    elif act == ACT_ELU:
        for i in range(y.size):
            v = y[i]
            out[i] = dy[i] * (1.0 if v > 0 else v + alpha)
    else:
        for i in range(y.size):
            out[i] = dy[i]


@kernel(parallel=True)
def _act_forward_chunks(x, act, alpha, out):
    n = x.size
    for k in prange((n + ACT_CHUNK - 1) // ACT_CHUNK):
        lo, hi = k * ACT_CHUNK, min(n, (k + 1) * ACT_CHUNK)
        act_forward_flat(x[lo:hi], act, alpha, out[lo:hi])


@kernel(parallel=True)
def _act_backward_chunks(dy, x, act, alpha, out):
    n = x.size
    for k in prange((n + ACT_CHUNK - 1) // ACT_CHUNK):
        lo, hi = k * ACT_CHUNK, min(n, (k + 1) * ACT_CHUNK)
        act_backward_flat(dy[lo:hi], x[lo:hi], act, alpha, out[lo:hi])


@kernel(parallel=True)
def _act_backward_output_chunks(dy, y, act, alpha, out):
    n = y.size
    for k in prange((n + ACT_CHUNK - 1) // ACT_CHUNK):
        lo, hi = k * ACT_CHUNK, min(n, (k + 1) * ACT_CHUNK)
        act_backward_from_output_flat(dy[lo:hi], y[lo:hi], act, alpha, out[lo:hi])


@kernel(parallel=True)
def _act_backward_output_cols(dy, y, col0, act, alpha, out):
    """out[r, j] = dy[r, col0 + j] * act'(.) from y[r, col0 + j]; dy, y (M, C_total), out (M, c)."""
    c = out.shape[1]
    for r in prange(out.shape[0]):
        act_backward_from_output_flat(dy[r, col0:col0 + c], y[r, col0:col0 + c], act, alpha, out[r])


# Rows per partial sum of the fused bias gradient: fixed by M alone, so the sums are added in the
# same order on any number of threads.
_SUM_ROWS = 512


@kernel(parallel=True)
def _act_backward_output_sums(dy, y, col0, act, alpha, out, partial):
    """out[r, j] = dy[r, col0 + j] * act'(.) from y[r, col0 + j], and partial[b, j] = the sum of out[r, j] over
    block b's rows (_SUM_ROWS of them), in float64. dy, y (M, C_total); out (M, c); partial (blocks, c)."""
    m, c = out.shape
    for blk in prange(partial.shape[0]):
        acc = partial[blk]
        for j in range(c):
            acc[j] = 0.0
        for r in range(blk * _SUM_ROWS, min(m, (blk + 1) * _SUM_ROWS)):
            o = out[r]
            act_backward_from_output_flat(dy[r, col0:col0 + c], y[r, col0:col0 + c], act, alpha, o)
            for j in range(c):
                acc[j] += o[j]


# Activations whose derivative activation_backward_from_output computes from the output.
OUTPUT_GRAD_ACTS = frozenset({ACT_NONE, ACT_RELU, ACT_RELU6, ACT_ELU})


def grad_from_output(act, alpha=1.0):
    """Whether activation_backward_from_output can take act's output in place of its input."""
    code = activation_code(act)
    return code in OUTPUT_GRAD_ACTS and not (code == ACT_ELU and not alpha >= 0)


def activation_code(act):
    """An ACT_* code from a code or a name in ACTIVATIONS (ValueError otherwise)."""
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[act]
    code = int(act)
    if code not in ACTIVATIONS.values():
        raise ValueError(f"unknown activation code {act!r}; expected 0..{max(ACTIVATIONS.values())}")
    return code


def _check_float(x, name):
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    return np.ascontiguousarray(x)


def activation_forward(x: np.ndarray, act: int, alpha: float = 1.0) -> np.ndarray:
    """y = act(x), element-wise.  x (...) -> y (...) of x's shape and dtype.

    `act` is an ACT_* code or a name from ACTIVATIONS; `alpha` is used by ELU only.
    """
    code = activation_code(act)
    x = _check_float(x, "x")
    out = _reuse.empty_like(x)
    if code == ACT_NONE:
        out[...] = x
        return out
    xf, of, a = x.reshape(-1), out.reshape(-1), x.dtype.type(alpha)
    if x.size >= _PARALLEL_MIN_SIZE:
        _act_forward_chunks(xf, code, a, of)
    else:
        act_forward_flat(xf, code, a, of)
    return out


def activation_backward(dy: np.ndarray, x: np.ndarray, act: int, alpha: float = 1.0) -> np.ndarray:
    """dx = dy * act'(x).  dy (...), x (...) the pre-activation input -> dx (...)."""
    code = activation_code(act)
    x = _check_float(x, "x")
    dy = _check_float(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    dy = dy.astype(x.dtype, copy=False)
    out = _reuse.empty_like(x)
    if code == ACT_NONE:
        out[...] = dy
        return out
    dyf, xf, of, a = dy.reshape(-1), x.reshape(-1), out.reshape(-1), x.dtype.type(alpha)
    if x.size >= _PARALLEL_MIN_SIZE:
        _act_backward_chunks(dyf, xf, code, a, of)
    else:
        act_backward_flat(dyf, xf, code, a, of)
    return out


def activation_backward_from_output(dy: np.ndarray, y: np.ndarray, act: int, alpha: float = 1.0) -> np.ndarray:
    """dx = dy * act'(x) from the output y = act(x) (relu, relu6, ELU with alpha >= 0; see grad_from_output).

    dy (...), y (...) -> dx (...) of y's shape and dtype.
    """
    code = activation_code(act)
    if not grad_from_output(code, alpha):
        raise ValueError(f"activation {act!r} (alpha {alpha}) has no derivative in terms of its output; "
                         "use activation_backward with the pre-activation")
    y = _check_float(y, "y")
    dy = _check_float(dy, "dy")
    if dy.shape != y.shape:
        raise ValueError(f"dy must have y's shape {y.shape}, got {dy.shape}")
    dy = dy.astype(y.dtype, copy=False)
    out = _reuse.empty_like(y)
    dyf, yf, of, a = dy.reshape(-1), y.reshape(-1), out.reshape(-1), y.dtype.type(alpha)
    if y.size >= _PARALLEL_MIN_SIZE:
        _act_backward_output_chunks(dyf, yf, code, a, of)
    else:
        act_backward_from_output_flat(dyf, yf, code, a, of)
    return out


def activation_backward_from_output_channels(dy: np.ndarray, y: np.ndarray, col0: int, width: int, act: int,
                                             alpha: float = 1.0) -> np.ndarray:
    """activation_backward_from_output on channels col0..col0+width of a channel concatenation.

    dy, y (N,H,W,C_total) C-contiguous (the concatenation's gradient and value) -> dx (N,H,W,width):
    the slot's gradient without first copying the slot out of dy.
    """
    code = activation_code(act)
    if not grad_from_output(code, alpha):
        raise ValueError(f"activation {act!r} (alpha {alpha}) has no derivative in terms of its output")
    y = _check_float(y, "y")
    dy = _check_float(dy, "dy").astype(y.dtype, copy=False)
    if dy.shape != y.shape or y.ndim != 4 or not 0 <= col0 <= y.shape[3] - width or width < 0:
        raise ValueError(f"dy and y must be one (N,H,W,C_total) shape with channels {col0}..{col0 + width} in it, "
                         f"got {dy.shape} and {y.shape}")
    out = _reuse.empty(y.shape[:3] + (int(width),), y.dtype)
    total = y.shape[3]
    _act_backward_output_cols(dy.reshape(-1, total), y.reshape(-1, total), int(col0), code, y.dtype.type(alpha),
                              out.reshape(-1, int(width)))
    return out


def activation_backward_from_output_and_sum(dy: np.ndarray, y: np.ndarray, act: int, alpha: float = 1.0,
                                            col0: int = 0, width: int | None = None) -> tuple:
    """(dx, db): activation_backward_from_output and, in the same pass, dx summed over every axis
    but the channels: the gradient of a bias added before the activation (a conv's), without a
    second read of dx.

    dy, y (N,H,W,C_total) C-contiguous; with `width` only channels col0..col0+width (a slot of a
    channel concatenation) -> dx (N,H,W,width), db (width,) in y's dtype, summed in float64.
    """
    code = activation_code(act)
    if not grad_from_output(code, alpha):
        raise ValueError(f"activation {act!r} (alpha {alpha}) has no derivative in terms of its output")
    y = _check_float(y, "y")
    dy = _check_float(dy, "dy").astype(y.dtype, copy=False)
    width = y.shape[-1] - col0 if width is None else int(width)
    if dy.shape != y.shape or y.ndim != 4 or not 0 <= col0 <= y.shape[3] - width or width < 0:
        raise ValueError(f"dy and y must be one (N,H,W,C_total) shape with channels {col0}..{col0 + width} in it, "
                         f"got {dy.shape} and {y.shape}")
    out = _reuse.empty(y.shape[:3] + (width,), y.dtype)
    total = y.shape[3]
    m = out.size // max(width, 1)
    partial = np.empty((-(-m // _SUM_ROWS), width), np.float64)
    _act_backward_output_sums(dy.reshape(-1, total), y.reshape(-1, total), int(col0), code, y.dtype.type(alpha),
                              out.reshape(-1, width), partial)
    return out, partial.sum(axis=0).astype(y.dtype)
