"""conv2d, pointwise and transpose-conv kernels vs their naive twins, finite differences and PyTorch.

Tolerances: float32 forward vs the float64-accumulating twin at rtol = atol = 1e-5
(a K = 75-term float32 dot product drifts ~1e-6 relative); float64 gradient checks at
tests/gradcheck.py's 1e-6 relative; torch parity 1e-5 relative forward and 1e-4
relative backward (both sides float32, different summation orders).
"""

import numpy as np
import pytest

import lightcnn.kernels._args as args_mod
from lightcnn.kernels.activation import ACTIVATIONS
from lightcnn.kernels.conv import (
    conv2d_backward,
    conv2d_forward,
    pointwise_conv_backward,
    pointwise_conv_forward,
)
from lightcnn.kernels.transpose import conv_transpose2d_backward, conv_transpose2d_forward
from tests.gradcheck import assert_gradient
from tests.reference_conv import conv2d_naive, conv_transpose2d_naive, pointwise_naive

RTOL = ATOL = 1e-5

# (N, H, W, C, KH, KW, O, stride, pad (top, bottom, left, right))
CONV_CASES = [
    (1, 5, 5, 1, 3, 3, 1, (1, 1), (1, 1, 1, 1)),  # C = O = 1
    (3, 7, 5, 2, 3, 3, 4, (2, 2), (1, 1, 1, 1)),  # N = 3, H != W, odd, stride 2
    (2, 8, 6, 3, 3, 3, 4, (2, 2), (0, 1, 0, 1)),  # TF SAME, stride 2 on even input
    (1, 9, 9, 3, 3, 3, 8, (2, 2), (0, 1, 0, 1)),  # TF SAME on odd input (extra row never read)
    (1, 1, 1, 3, 3, 3, 4, (1, 1), (1, 1, 1, 1)),  # 1x1 spatial, all taps but one in padding
    (1, 1, 1, 3, 1, 1, 5, (1, 1), (0, 0, 0, 0)),  # 1x1 spatial, 1x1 kernel (pointwise fast path)
    (2, 9, 7, 2, 5, 5, 3, (1, 1), (2, 2, 2, 2)),  # 5x5
    (1, 9, 11, 2, 5, 5, 3, (2, 2), (1, 2, 2, 1)),  # 5x5, stride 2, asymmetric both ways
    (1, 6, 7, 3, 3, 2, 2, (1, 2), (0, 0, 1, 0)),  # non-square kernel and stride
    (2, 5, 4, 3, 1, 1, 4, (2, 2), (0, 0, 0, 0)),  # 1x1 kernel with stride (im2col path)
    (1, 4, 4, 2, 4, 4, 3, (1, 1), (0, 0, 0, 0)),  # kernel covers the input: 1x1 output
    (3, 3, 5, 1, 2, 3, 2, (3, 1), (2, 0, 0, 2)),  # padding on one side only
]

# (N, H, W, C, O)
POINTWISE_CASES = [(1, 1, 1, 1, 1), (3, 5, 4, 3, 7), (2, 7, 3, 16, 5), (1, 2, 9, 5, 1)]

# (N, H, W, C, KH, KW, O, stride, pad, output_padding)
TRANSPOSE_CASES = [
    (1, 3, 3, 1, 3, 3, 1, (1, 1), (0, 0, 0, 0), (0, 0)),
    (3, 3, 4, 2, 4, 4, 3, (4, 4), (0, 0, 0, 0), (0, 0)),  # 4x upsampling, non-overlapping stamps
    (2, 3, 2, 2, 3, 3, 3, (4, 4), (0, 0, 0, 0), (1, 1)),  # 4x upsampling with gaps (bias only)
    (1, 4, 3, 3, 3, 3, 2, (2, 2), (1, 1, 1, 1), (1, 1)),  # the usual 2x: k3 s2 p1 op1
    (2, 2, 5, 2, 3, 2, 3, (2, 1), (1, 0, 0, 1), (1, 0)),  # asymmetric crop, mixed stride
    (1, 1, 1, 3, 2, 2, 4, (2, 2), (0, 0, 0, 0), (0, 0)),  # 1x1 spatial input
    (1, 3, 3, 2, 5, 5, 2, (2, 2), (2, 2, 2, 2), (1, 1)),  # 5x5
    (1, 4, 4, 2, 4, 4, 2, (4, 4), (1, 2, 0, 3), (0, 0)),  # crop the stamps unevenly
]


def _ids(cases):
    return [f"case{i}" for i in range(len(cases))]


def act_naive(v, name, alpha):
    """The activations from their textbook formulas (independent of activation.py)."""
    v = v.astype(np.float64)
    if name == "none":
        return v
    if name == "relu":
        return np.maximum(v, 0)
    if name == "relu6":
        return np.clip(v, 0, 6)
    if name == "elu":
        return np.where(v > 0, v, alpha * np.expm1(v))
    if name == "sigmoid":
        return 1 / (1 + np.exp(-v))
    if name == "hard_sigmoid":
        return np.clip(v + 3, 0, 6) / 6
    if name == "hard_swish":
        return v * np.clip(v + 3, 0, 6) / 6
    raise KeyError(name)


def _conv_inputs(rng, case, dtype=np.float32):
    n, h, w, c, kh, kw, o, stride, pad = case
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    wt = rng.standard_normal((kh, kw, c, o)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    return x, wt, b, stride, pad


def _transpose_inputs(rng, case, dtype=np.float32):
    n, h, w, c, kh, kw, o, stride, pad, op = case
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    wt = rng.standard_normal((kh, kw, c, o)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    return x, wt, b, stride, pad, op


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


# ----------------------------------------------------------------------------- forward vs twin


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES, ids=_ids(CONV_CASES))
def test_conv2d_forward_matches_twin(rng, case, with_bias):
    x, w, b, stride, pad = _conv_inputs(rng, case)
    b = b if with_bias else None
    y = conv2d_forward(x, w, b, stride=stride, pad=pad)
    ref = conv2d_naive(*_f64(x, w), None if b is None else b.astype(np.float64), stride, pad)
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CONV_CASES[:4], ids=_ids(CONV_CASES[:4]))
def test_conv2d_forward_float64(rng, case):
    x, w, b, stride, pad = _conv_inputs(rng, case, np.float64)
    y = conv2d_forward(x, w, b, stride=stride, pad=pad)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)


# alpha 1 puts ELU in the packed GEMM's float32 epilogue; any other alpha runs the float64 pass after it
@pytest.mark.parametrize("act,alpha", [(a, 0.7) for a in sorted(ACTIVATIONS)] + [("elu", 1.0)])
def test_conv2d_fused_activation(rng, act, alpha):
    x, w, b, stride, pad = _conv_inputs(rng, CONV_CASES[2])
    x *= 2  # spread pre-activations over every kink (-3, 0, 3, 6)
    y = conv2d_forward(x, w, b, stride=stride, pad=pad, act=ACTIVATIONS[act], alpha=alpha)
    ref = act_naive(conv2d_naive(*_f64(x, w, b), stride, pad), act, alpha)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", POINTWISE_CASES, ids=_ids(POINTWISE_CASES))
def test_pointwise_forward_matches_twin(rng, case, with_bias):
    n, h, w, c, o = case
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((c, o)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if with_bias else None
    y = pointwise_conv_forward(x, wt, b)
    ref = pointwise_naive(*_f64(x, wt), None if b is None else b.astype(np.float64))
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("act,alpha", [("relu6", 1.3), ("elu", 1.3), ("elu", 1.0), ("hard_swish", 1.3),
                                       ("sigmoid", 1.3)])
def test_pointwise_fused_activation(rng, act, alpha):
    x = 2 * rng.standard_normal((2, 5, 3, 6)).astype(np.float32)
    wt = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y = pointwise_conv_forward(x, wt, b, act=ACTIVATIONS[act], alpha=alpha)
    np.testing.assert_allclose(y, act_naive(pointwise_naive(*_f64(x, wt, b)), act, alpha), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_ids(TRANSPOSE_CASES))
def test_conv_transpose_forward_matches_twin(rng, case, with_bias):
    x, w, b, stride, pad, op = _transpose_inputs(rng, case)
    b = b if with_bias else None
    y = conv_transpose2d_forward(x, w, b, stride=stride, pad=pad, output_padding=op)
    ref = conv_transpose2d_naive(*_f64(x, w), None if b is None else b.astype(np.float64), stride, pad, op)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("act", ["relu6", "elu", "hard_swish"])
def test_conv_transpose_fused_activation(rng, act):
    x, w, b, stride, pad, op = _transpose_inputs(rng, TRANSPOSE_CASES[3])
    x *= 2
    y = conv_transpose2d_forward(x, w, b, stride, pad, op, act=ACTIVATIONS[act], alpha=0.5)
    ref = act_naive(conv_transpose2d_naive(*_f64(x, w, b), stride, pad, op), act, 0.5)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


def test_conv_transpose_into_out_with_kept_scratch(rng):
    """out= and scratch= (an inference plan's buffers, kept between calls) give the plain call's result; the
    stamp matrix is made once and reused; a wrong `out` is refused."""
    x, w, b, stride, pad, op = _transpose_inputs(rng, TRANSPOSE_CASES[3])
    expected = conv_transpose2d_forward(x, w, b, stride, pad, op, act=ACTIVATIONS["elu"])
    out, scratch = np.full(expected.shape, np.nan, np.float32), {}
    for _ in range(2):
        y = conv_transpose2d_forward(x, w, b, stride, pad, op, act=ACTIVATIONS["elu"], out=out, scratch=scratch)
        assert y is out
        np.testing.assert_array_equal(out, expected)
    cols = scratch["cols"]
    conv_transpose2d_forward(x, w, b, stride, pad, op, out=out, scratch=scratch)
    assert scratch["cols"] is cols
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        conv_transpose2d_forward(x, w, b, stride, pad, op, out=np.zeros(expected.shape[:3] + (1,), np.float32))


def test_chunked_equals_unchunked(rng, monkeypatch):
    """A one-image im2col buffer (the large-batch path) gives the same results."""
    x, w, b, stride, pad = _conv_inputs(rng, CONV_CASES[1])
    xt, wt, bt, st, pt, op = _transpose_inputs(rng, TRANSPOSE_CASES[1])
    dy = rng.standard_normal(conv2d_forward(x, w, b, stride, pad).shape).astype(np.float32)
    dyt = rng.standard_normal(conv_transpose2d_forward(xt, wt, bt, st, pt, op).shape).astype(np.float32)

    def run():
        return (
            conv2d_forward(x, w, b, stride, pad),
            *conv2d_backward(dy, x, w, stride, pad),
            conv_transpose2d_forward(xt, wt, bt, st, pt, op),
            *conv_transpose2d_backward(dyt, xt, wt, st, pt, op),
        )

    whole = run()
    monkeypatch.setattr(args_mod, "CHUNK_BYTES", 1)
    for a, c in zip(whole, run()):
        np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-6)


def test_inputs_are_not_modified(rng):
    x, w, b, stride, pad = _conv_inputs(rng, CONV_CASES[2])
    dy = rng.standard_normal(conv2d_forward(x, w, b, stride, pad).shape).astype(np.float32)
    copies = [a.copy() for a in (x, w, b, dy)]
    conv2d_forward(x, w, b, stride, pad, act=ACTIVATIONS["relu"])
    conv2d_backward(dy, x, w, stride, pad)
    for a, c in zip((x, w, b, dy), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: conv2d_forward(np.zeros((4, 4, 3), np.float32), np.zeros((3, 3, 3, 2), np.float32)), r"\(N,H,W,C\)"),
        (lambda: conv2d_forward(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 2, 2), np.float32)), "C = x"),
        (lambda: pointwise_conv_forward(np.zeros((1, 4, 4, 3), np.float32), np.zeros((2, 5), np.float32)), "C = x"),
        (
            lambda: conv_transpose2d_forward(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 4, 2), np.float32)),
            "C = x",
        ),
        (
            lambda: conv2d_forward(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 3, 2), np.float32), np.zeros(3)),
            r"\(O,\)",
        ),
        (lambda: conv2d_forward(np.zeros((1, 2, 2, 1), np.float32), np.zeros((3, 3, 1, 1), np.float32)), "does not fit"),
        (
            lambda: conv2d_backward(
                np.zeros((1, 3, 3, 2), np.float32), np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 3, 2), np.float32)
            ),
            "dy must be",
        ),
        (
            lambda: conv_transpose2d_forward(
                np.zeros((1, 2, 2, 1), np.float32), np.zeros((3, 3, 1, 1), np.float32), stride=2, output_padding=2
            ),
            "output_padding",
        ),
        (lambda: conv2d_forward(np.zeros((1, 4, 4, 1), np.int64), np.zeros((1, 1, 1, 1), np.float32)), "float32"),
        (lambda: conv2d_forward(np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 1, 1, 1), np.float32), act=9), "activation"),
    ],
)
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- gradients (float64)

GRAD_CONV_CASES = [CONV_CASES[i] for i in (1, 2, 4, 5, 7, 9, 11)]
GRAD_TRANSPOSE_CASES = [TRANSPOSE_CASES[i] for i in (1, 2, 3, 4, 5, 7)]


def _check_grads(forward, backward, params, g, names):
    """loss = sum(forward(*params) * g); analytic (dx, dw, db) from backward(g) vs central differences."""
    grads = backward(g)
    for grad, array, name in zip(grads, params, names):
        assert_gradient(grad, lambda: float(np.sum(forward(*params) * g)), array, name)


@pytest.mark.parametrize("case", GRAD_CONV_CASES, ids=_ids(GRAD_CONV_CASES))
def test_conv2d_backward_gradcheck(rng, case):
    x, w, b, stride, pad = _conv_inputs(rng, case, np.float64)
    g = rng.standard_normal(conv2d_forward(x, w, b, stride, pad).shape)
    _check_grads(
        lambda x, w, b: conv2d_forward(x, w, b, stride, pad),
        lambda g: conv2d_backward(g, x, w, stride, pad),
        (x, w, b),
        g,
        ("dx", "dw", "db"),
    )


@pytest.mark.parametrize("case", POINTWISE_CASES[:3], ids=_ids(POINTWISE_CASES[:3]))
def test_pointwise_backward_gradcheck(rng, case):
    n, h, w, c, o = case
    x = rng.standard_normal((n, h, w, c))
    wt = rng.standard_normal((c, o))
    b = rng.standard_normal(o)
    g = rng.standard_normal((n, h, w, o))
    _check_grads(pointwise_conv_forward, lambda g: pointwise_conv_backward(g, x, wt), (x, wt, b), g, ("dx", "dw", "db"))


@pytest.mark.parametrize("case", GRAD_TRANSPOSE_CASES, ids=_ids(GRAD_TRANSPOSE_CASES))
def test_conv_transpose_backward_gradcheck(rng, case):
    x, w, b, stride, pad, op = _transpose_inputs(rng, case, np.float64)
    g = rng.standard_normal(conv_transpose2d_forward(x, w, b, stride, pad, op).shape)
    _check_grads(
        lambda x, w, b: conv_transpose2d_forward(x, w, b, stride, pad, op),
        lambda g: conv_transpose2d_backward(g, x, w, stride, pad, op),
        (x, w, b),
        g,
        ("dx", "dw", "db"),
    )


# ----------------------------------------------------------------------------- PyTorch parity


def _rel(a, ref):
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _nchw(a):
    return a.transpose(0, 3, 1, 2)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


TORCH_CONV_CASES = [
    (2, 13, 11, 8, 3, 3, 16, (1, 1), (1, 1, 1, 1)),
    (2, 14, 12, 8, 3, 3, 16, (2, 2), (0, 1, 0, 1)),  # TF SAME
    (1, 17, 15, 6, 5, 5, 12, (2, 2), (2, 1, 1, 2)),
    (3, 9, 9, 16, 1, 1, 8, (1, 1), (0, 0, 0, 0)),  # 1x1 fast path
    (1, 224 // 8, 224 // 8, 3, 3, 3, 16, (2, 2), (1, 1, 1, 1)),  # stem-like, C = 3
]


@pytest.mark.parametrize("case", TORCH_CONV_CASES, ids=_ids(TORCH_CONV_CASES))
def test_conv2d_torch_parity(rng, case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b, stride, pad = _conv_inputs(rng, case)
    pt, pb, pl, pr = pad
    xt = torch.tensor(_nchw(x), requires_grad=True)
    wt = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)  # HWIO -> OIHW
    bt = torch.tensor(b, requires_grad=True)
    yt = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, bt, stride=stride)
    y = conv2d_forward(x, w, b, stride, pad)
    assert _rel(y, _nhwc(yt)) <= 1e-5

    g = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.tensor(_nchw(g)))
    dx, dw, db = conv2d_backward(g, x, w, stride, pad)
    assert _rel(dx, _nhwc(xt.grad)) <= 1e-4
    assert _rel(dw, wt.grad.numpy().transpose(2, 3, 1, 0)) <= 1e-4
    assert _rel(db, bt.grad.numpy()) <= 1e-4


def test_conv2d_fused_hard_swish_torch_parity(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b, stride, pad = _conv_inputs(rng, TORCH_CONV_CASES[0])
    yt = F.hardswish(F.conv2d(torch.tensor(_nchw(x)), torch.tensor(w.transpose(3, 2, 0, 1)), torch.tensor(b), padding=1))
    y = conv2d_forward(x, w, b, stride, pad, act=ACTIVATIONS["hard_swish"])
    assert _rel(y, _nhwc(yt)) <= 1e-5


def test_pointwise_torch_parity(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((2, 7, 5, 24)).astype(np.float32)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    xt = torch.tensor(_nchw(x), requires_grad=True)
    wt = torch.tensor(w.T[:, :, None, None].copy(), requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    yt = F.conv2d(xt, wt, bt)
    y = pointwise_conv_forward(x, w, b)
    assert _rel(y, _nhwc(yt)) <= 1e-5
    g = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.tensor(_nchw(g)))
    dx, dw, db = pointwise_conv_backward(g, x, w)
    assert _rel(dx, _nhwc(xt.grad)) <= 1e-4
    assert _rel(dw, wt.grad.numpy()[:, :, 0, 0].T) <= 1e-4
    assert _rel(db, bt.grad.numpy()) <= 1e-4


# (N, H, W, C, KH, KW, O, stride, pad, output_padding)
TORCH_TRANSPOSE_CASES = [
    (2, 7, 6, 8, 3, 3, 5, (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 13, 13, 10, 4, 4, 6, (4, 4), (0, 0, 0, 0), (0, 0)),  # SqueezeNet-style 4x upsampling
    (2, 5, 6, 4, 3, 3, 3, (4, 4), (0, 0, 0, 0), (1, 1)),  # 4x with k3 s4 op1
    (1, 6, 5, 4, 5, 3, 7, (3, 2), (2, 2, 1, 1), (2, 0)),
    (2, 5, 7, 4, 3, 4, 3, (2, 3), (1, 0, 2, 0), (1, 2)),  # asymmetric crop: torch pad 0, then slice
]


@pytest.mark.parametrize("case", TORCH_TRANSPOSE_CASES, ids=_ids(TORCH_TRANSPOSE_CASES))
def test_conv_transpose_torch_parity(rng, case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b, stride, pad, op = _transpose_inputs(rng, case)
    pt, pb, pl, pr = pad
    xt = torch.tensor(_nchw(x), requires_grad=True)
    wt = torch.tensor(w.transpose(2, 3, 0, 1), requires_grad=True)  # (KH,KW,Ci,Co) -> (Ci,Co,KH,KW)
    bt = torch.tensor(b, requires_grad=True)
    y = conv_transpose2d_forward(x, w, b, stride, pad, op)
    if pt == pb and pl == pr:
        yt = F.conv_transpose2d(xt, wt, bt, stride=stride, padding=(pt, pl), output_padding=op)
    else:
        full = F.conv_transpose2d(xt, wt, bt, stride=stride, output_padding=op)
        yt = full[:, :, pt : pt + y.shape[1], pl : pl + y.shape[2]]
    assert _rel(y, _nhwc(yt)) <= 1e-5

    g = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.tensor(_nchw(g)))
    dx, dw, db = conv_transpose2d_backward(g, x, w, stride, pad, op)
    assert _rel(dx, _nhwc(xt.grad)) <= 1e-4
    assert _rel(dw, wt.grad.numpy().transpose(2, 3, 0, 1)) <= 1e-4
    assert _rel(db, bt.grad.numpy()) <= 1e-4


# ----------------------------------------------------------------------------- threaded GEMMs, no input gradient


def test_split_gemms_match_float64_products_and_not_the_thread_count(rng):
    # Large enough to be split (bands of rows; chunks of the shared axis): against the float64 product,
    # and matmul_tn bit-identical on 1 and 2 threads (its chunks depend on M only).
    from lightcnn._jit import get_num_threads, set_num_threads
    from lightcnn.kernels import _split_blas as _gemm

    a = rng.standard_normal((20011, 64)).astype(np.float32)
    b = rng.standard_normal((64, 48)).astype(np.float32)
    d = rng.standard_normal((20011, 48)).astype(np.float32)
    assert 2.0 * 20011 * 64 * 48 > _gemm._SPLIT_FLOPS and 20011 // _gemm._TN_CHUNK_ROWS >= 2
    previous = get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            set_num_threads(threads)
            out = np.empty((20011, 48), np.float32)
            results[threads] = (_gemm.matmul(a, b, out).copy(), _gemm.matmul_tn(a, d), _gemm.matmul(d, b.T, np.empty(
                (20011, 64), np.float32)))
        with _gemm.gemm_caller_thread():  # the calling thread runs one band itself: the same numbers
            inside = (_gemm.matmul(a, b, np.empty((20011, 48), np.float32)), _gemm.matmul_tn(a, d))
    finally:
        set_num_threads(previous)
    np.testing.assert_array_equal(inside[0], results[2][0])
    np.testing.assert_array_equal(inside[1], results[2][1])
    a64, b64, d64 = a.astype(np.float64), b.astype(np.float64), d.astype(np.float64)
    for got, want in zip(results[2], (a64 @ b64, a64.T @ d64, d64 @ b64.T)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.sqrt(a.shape[0]))
    np.testing.assert_array_equal(results[1][1], results[2][1])


@pytest.mark.parametrize("k, n", [(300, 70), (70, 300)], ids=["rows", "columns"])
def test_split_weight_gradient_of_a_short_m_cuts_the_output(rng, k, n):
    # M too short for two chunks of the sum (a 13x13 layer at batch 32): the output is cut into row or
    # column pieces; against the float64 product, bit-identical on 1 and 2 threads and in the caller thread
    from lightcnn._jit import get_num_threads, set_num_threads
    from lightcnn.kernels import _split_blas as _gemm

    m = 5000
    a = rng.standard_normal((m, k)).astype(np.float32)
    d = rng.standard_normal((m, n)).astype(np.float32)
    assert 2.0 * m * k * n > _gemm._SPLIT_FLOPS and m // _gemm._TN_CHUNK_ROWS < 2
    assert max(k, n) // _gemm._TN_MIN_PIECE >= 2 and _gemm._TN_PIECES >= 2
    previous = get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            set_num_threads(threads)
            results[threads] = _gemm.matmul_tn(a, d)
        with _gemm.gemm_caller_thread():
            inside = _gemm.matmul_tn(a, d)
    finally:
        set_num_threads(previous)
    want = a.astype(np.float64).T @ d.astype(np.float64)
    assert results[2].shape == (k, n) and results[2].dtype == np.float32
    np.testing.assert_allclose(results[2], want, rtol=RTOL, atol=ATOL * np.sqrt(m))
    np.testing.assert_array_equal(results[1], results[2])
    np.testing.assert_array_equal(inside, results[2])


@pytest.mark.parametrize("case", CONV_CASES[:3] + [(2, 9, 9, 1, 3, 3, 4, (2, 2), (0, 0, 0, 0))], ids=_ids(
    CONV_CASES[:3] + [(2, 9, 9, 1, 3, 3, 4, (2, 2), (0, 0, 0, 0))]))
def test_conv2d_backward_without_dx_gives_the_same_weight_gradients(rng, case):
    # need_dx=False (a network's first layer): dw and db exactly as with dx, and no dx
    x, w, b, stride, pad = _conv_inputs(rng, case)
    g = rng.standard_normal(conv2d_forward(x, w, b, stride, pad).shape).astype(np.float32)
    dx, dw, db = conv2d_backward(g, x, w, stride, pad)
    none, dw2, db2 = conv2d_backward(g, x, w, stride, pad, need_dx=False)
    assert none is None and dx is not None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)
    wp = rng.standard_normal((g.shape[3], 2)).astype(np.float32)
    gp = rng.standard_normal(g.shape[:3] + (2,)).astype(np.float32)
    nonep, dwp, dbp = pointwise_conv_backward(gp, g, wp, need_dx=False)
    _, dwp_full, dbp_full = pointwise_conv_backward(gp, g, wp)
    assert nonep is None
    np.testing.assert_array_equal(dwp, dwp_full)
    np.testing.assert_array_equal(dbp, dbp_full)


@pytest.mark.parametrize("case", CONV_CASES[:3], ids=_ids(CONV_CASES[:3]))
def test_conv2d_backward_from_the_kept_im2col_matrix(rng, case):
    # training keeps forward's im2col matrix (built in one piece) for backward: the same y and, with and without
    # dx, the same gradients bit for bit as rebuilding it; a matrix of another shape is refused
    from lightcnn.kernels.conv import conv2d_forward_keeping_cols

    x, w, b, stride, pad = _conv_inputs(rng, case)
    # float64 (the gradient checks' dtype) takes the im2col route; float32 runs every conv on the packed GEMM
    x, w, b = (v.astype(np.float64) for v in (x, w, b))
    y, cols = conv2d_forward_keeping_cols(x, w, b, stride, pad, "elu")
    assert cols is not None and cols.shape == (int(np.prod(y.shape[:3])), int(np.prod(w.shape[:3])))
    np.testing.assert_array_equal(y, conv2d_forward(x, w, b, stride, pad, "elu"))
    assert conv2d_forward_keeping_cols(*(v.astype(np.float32) for v in (x, w, b)), stride, pad, "elu")[1] is None
    g = rng.standard_normal(y.shape)
    for need_dx in (True, False):
        want = conv2d_backward(g, x, w, stride, pad, need_dx)
        got = conv2d_backward(g, x, w, stride, pad, need_dx, cols=cols)
        for a, e in zip(got, want):
            assert (a is None) == (e is None) and (a is None or np.array_equal(a, e))
    with pytest.raises(ValueError, match="im2col"):
        conv2d_backward(g, x, w, stride, pad, cols=cols[1:])


@pytest.mark.parametrize("act", ["none", "relu", "elu"])
@pytest.mark.parametrize("case", [CONV_CASES[1], (2, 5, 4, 3, 1, 1, 4, (1, 1), (0, 0, 0, 0))], ids=["3x3", "1x1"])
def test_conv2d_forward_into_a_channel_slot(rng, case, act):
    # out=/col0=: the result lands in channels col0.. of a wider array (Fire's concatenation), the other
    # channels untouched, against the loop twin
    x, w, b, stride, pad = _conv_inputs(rng, case)
    ref = act_naive(conv2d_naive(*_f64(x, w, b), stride, pad), act, 0.7)
    out = np.full(ref.shape[:3] + (ref.shape[3] + 5,), 7.0, np.float32)
    view = conv2d_forward(x, w, b, stride, pad, ACTIVATIONS[act], 0.7, out=out, col0=2)
    assert view.base is out or view.base is out.base
    np.testing.assert_allclose(out[..., 2:2 + ref.shape[3]], ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out[..., :2], 7.0)
    np.testing.assert_array_equal(out[..., 2 + ref.shape[3]:], 7.0)
    with pytest.raises(ValueError, match="room for"):
        conv2d_forward(x, w, b, stride, pad, out=out, col0=out.shape[3] - ref.shape[3] + 1)


def test_split_gemms_follow_the_callers_errstate(rng):
    # the bands run on pool threads, but np.errstate is per thread: the caller's setting must hold there
    # (fit() silences overflow while it detects divergence; a warning from a pool thread would leak)
    import warnings

    from lightcnn.kernels import _split_blas as _gemm

    a = np.full((20011, 64), 3e38, np.float32)
    b = np.full((64, 48), 3e38, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="ignore", invalid="ignore"):
            out = _gemm.matmul(a, b, np.empty((20011, 48), np.float32))
            _gemm.matmul_tn(a, np.full((20011, 48), 3e38, np.float32))
    assert np.all(np.isinf(out))
    with pytest.raises(FloatingPointError), np.errstate(over="raise"):
        _gemm.matmul(a, b, np.empty((20011, 48), np.float32))


# ----------------------------------------------------------------------------- stride-1 input gradient as a conv

# (N, H, W, C, KH, KW, O, pad (top, bottom, left, right)), stride 1: conv2d_backward computes float32 dx as a
# convolution of dy with the flipped kernel on packed weights (conv._implicit_input_gradient)
IMPLICIT_DX_CASES = [
    (2, 9, 7, 5, 3, 3, 6, (1, 1, 1, 1)),  # "same" 3x3, SqueezeNet's expand
    (2, 9, 7, 2, 5, 5, 3, (2, 2, 2, 2)),  # 5x5
    (1, 6, 7, 3, 3, 2, 2, (0, 0, 1, 0)),  # non-square kernel, padding on one side
    (3, 3, 5, 1, 2, 3, 2, (1, 0, 0, 2)),  # even kernel height, right padding = KW - 1
    (1, 4, 4, 2, 4, 4, 3, (0, 0, 0, 0)),  # kernel covers the input: a 1x1 dy
    (1, 1, 1, 3, 3, 3, 4, (1, 1, 1, 1)),  # 1x1 spatial, all taps but one in padding
    (2, 6, 5, 37, 3, 3, 9, (1, 1, 1, 1)),  # C = 37: dx in a 32-wide and a 16-wide packed panel
    (1, 5, 6, 50, 3, 3, 7, (2, 1, 0, 2)),  # C = 50: the last panel 32 wide, zero-padded; asymmetric
]


def _spy_implicit(monkeypatch):
    import lightcnn.kernels.conv as conv_mod

    calls, real = [], conv_mod._implicit_input_gradient
    monkeypatch.setattr(conv_mod, "_implicit_input_gradient", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


@pytest.mark.parametrize("case", IMPLICIT_DX_CASES, ids=_ids(IMPLICIT_DX_CASES))
def test_conv2d_input_gradient_as_a_convolution(rng, case, monkeypatch):
    # the float32 dx of the implicit path against float64 central differences of the float64 forward (the im2col
    # GEMM path, itself checked against the loop twin above) and against torch autograd in float64
    torch = pytest.importorskip("torch")
    n, h, wd, c, kh, kw, o, pad = case
    x, w, b, stride, pad = _conv_inputs(rng, (n, h, wd, c, kh, kw, o, (1, 1), pad))
    g = rng.standard_normal(conv2d_forward(x, w, b, stride, pad).shape).astype(np.float32)
    calls = _spy_implicit(monkeypatch)
    dx, dw, db = conv2d_backward(g, x, w, stride, pad)
    assert calls == [True] and dx.dtype == np.float32
    x64, w64, b64, g64 = _f64(x, w, b, g)
    assert_gradient(dx, lambda: float(np.sum(conv2d_forward(x64, w64, b64, stride, pad) * g64)), x64, "dx", rtol=RTOL)
    F = torch.nn.functional
    pt, pb, pl, pr = pad
    xt = torch.tensor(_nchw(x64), requires_grad=True)
    yt = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), torch.tensor(w64.transpose(3, 2, 0, 1)))
    yt.backward(torch.tensor(_nchw(g64)))
    assert _rel(dx, _nhwc(xt.grad)) <= RTOL
    # dw and db are untouched by the shortcut: the same as without dx
    _, dw2, db2 = conv2d_backward(g, x, w, stride, pad, need_dx=False)
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(db, db2)


@pytest.mark.parametrize("case", [IMPLICIT_DX_CASES[0], IMPLICIT_DX_CASES[7]], ids=["3x3", "asymmetric"])
def test_conv2d_implicit_input_gradient_is_the_same_in_bands_and_on_any_thread_count(rng, case, monkeypatch):
    # every dx element is one FMA chain over (p, q, o) in order: one-row bands (each its own zero-bordered
    # buffer) and 1 or 2 threads give the same bits
    import lightcnn.kernels.conv as conv_mod
    from lightcnn._jit import get_num_threads, set_num_threads

    n, h, wd, c, kh, kw, o, pad = case
    x, w, b, stride, pad = _conv_inputs(rng, (n, h, wd, c, kh, kw, o, (1, 1), pad))
    g = rng.standard_normal(conv2d_forward(x, w, b, stride, pad).shape).astype(np.float32)
    previous = get_num_threads()
    try:
        results = []
        for threads, band_bytes in ((1, conv_mod._BAND_BYTES), (2, conv_mod._BAND_BYTES), (1, 1)):
            set_num_threads(threads)
            monkeypatch.setattr(conv_mod, "_BAND_BYTES", band_bytes)
            results.append(conv2d_backward(g, x, w, stride, pad)[0].copy())
    finally:
        set_num_threads(previous)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


@pytest.mark.parametrize("case", [
    (2, 5, 4, 3, 1, 1, 4, (1, 1), (1, 1, 1, 1)),  # padding as large as the kernel: the im2col route
    (2, 7, 5, 2, 3, 3, 4, (2, 1), (1, 1, 1, 1)),  # stride 2 along H
], ids=["pad-ge-kernel", "stride"])
def test_conv2d_input_gradient_falls_back_to_col2im(rng, case, monkeypatch):
    x, w, b, stride, pad = _conv_inputs(rng, case)
    g = rng.standard_normal(conv2d_forward(x, w, b, stride, pad).shape).astype(np.float32)
    calls = _spy_implicit(monkeypatch)
    dx = conv2d_backward(g, x, w, stride, pad)[0]
    assert calls == [False]
    x64, w64, b64, g64 = _f64(x, w, b, g)
    assert_gradient(dx, lambda: float(np.sum(conv2d_forward(x64, w64, b64, stride, pad) * g64)), x64, "dx", rtol=RTOL)


def test_float32_convs_run_on_the_packed_gemm(rng, monkeypatch):
    # float32 forward convs (pointwise and KxK) take the packed GEMM whatever the activation (ELU and the
    # sigmoids in a pass after it), and so does the pointwise input gradient on two or more threads; float64
    # and the one-thread input gradient the BLAS route, so the float64 gradient checks above cover that route
    # and the float32 twin and torch tests above cover this one
    from lightcnn._jit import get_num_threads, set_num_threads
    from lightcnn.kernels import fused

    seen = []
    for name in ("gemm_packed_bias_act", "conv_implicit_bias_act"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _real=real, _name=name: seen.append(_name) or _real(*a))
    x, w, b, stride, pad = _conv_inputs(rng, CONV_CASES[1])
    xp, wp = x[..., :2], rng.standard_normal((2, 3)).astype(np.float32)
    for act in ("none", "relu", "relu6", "elu", "hard_swish"):
        seen.clear()
        y = conv2d_forward(x, w, b, stride, pad, act)
        yp = pointwise_conv_forward(xp, wp, None, act)
        assert seen == ["conv_implicit_bias_act", "gemm_packed_bias_act"], act
        np.testing.assert_allclose(y, act_naive(conv2d_naive(*_f64(x, w, b), stride, pad), act, 1.0), rtol=RTOL,
                                   atol=ATOL)
        np.testing.assert_allclose(yp, act_naive(pointwise_naive(*_f64(xp, wp), None), act, 1.0), rtol=RTOL,
                                   atol=ATOL)
    threads = get_num_threads()
    try:
        gp = rng.standard_normal(xp.shape[:3] + (3,)).astype(np.float32)
        for n_threads, route in ((1, []), (2, ["gemm_packed_bias_act"])):
            set_num_threads(n_threads)
            seen.clear()
            dx = pointwise_conv_backward(gp, xp, wp)[0]
            assert seen == route, n_threads
            np.testing.assert_allclose(dx, gp.astype(np.float64) @ wp.T.astype(np.float64), rtol=RTOL, atol=ATOL)
    finally:
        set_num_threads(threads)
    seen.clear()
    conv2d_forward(*_f64(x, w, b), stride, pad, "relu")
    pointwise_conv_forward(*_f64(xp, wp), None, "relu")
    pointwise_conv_backward(np.ones(xp.shape[:3] + (3,)), *_f64(xp, wp))
    assert seen == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_empty_batch_gives_empty_results(dtype):
    # N = 0 (the packed routes split work per image: no division by the image count)
    x = np.zeros((0, 5, 5, 3), dtype)
    w = np.ones((3, 3, 3, 4), dtype)
    y = conv2d_forward(x, w, None, 1, 1, "relu")
    dx, dw, db = conv2d_backward(np.zeros((0, 5, 5, 4), dtype), x, w, 1, 1)
    assert y.shape == (0, 5, 5, 4) and dx.shape == x.shape
    np.testing.assert_array_equal(dw, 0.0)
    np.testing.assert_array_equal(db, 0.0)
    assert pointwise_conv_forward(x, np.ones((3, 2), dtype)).shape == (0, 5, 5, 2)
