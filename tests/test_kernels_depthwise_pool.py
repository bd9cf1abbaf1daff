"""Depthwise conv and pooling kernels: vs naive twins, vs finite differences, vs PyTorch.

Tolerances: float32 forward vs the float64-accumulating twin rtol = atol = 1e-5; gradient
checks in float64 with tests/gradcheck.py defaults (1e-6 relative); PyTorch parity <= 1e-5
relative forward and <= 1e-4 relative backward (max abs error / max abs reference).
"""

import numpy as np
import pytest

from lightcnn.kernels.activation import ACTIVATIONS
from lightcnn.kernels.depthwise import depthwise_conv2d_backward, depthwise_conv2d_forward
from lightcnn.kernels.pool import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    global_avg_pool_backward,
    global_avg_pool_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)
from lightcnn.kernels.shapes import conv_output_size
from tests.gradcheck import assert_gradient
from tests.reference_depthwise_pool import (
    avg_pool2d_naive,
    depthwise_conv2d_naive,
    global_avg_pool_naive,
    max_pool2d_naive,
)

RTOL = ATOL = 1e-5

# (N, H, W, C, (KH, KW), stride, pad (top, bottom, left, right))
DEPTHWISE_CASES = [
    (1, 5, 7, 3, (3, 3), (1, 1), (1, 1, 1, 1)),      # H != W, PyTorch padding
    (3, 6, 5, 1, (3, 3), (2, 2), (0, 1, 0, 1)),      # C=1, TF SAME stride 2
    (1, 1, 1, 4, (3, 3), (1, 1), (1, 1, 1, 1)),      # 1x1 spatial: only the centre tap
    (2, 9, 8, 5, (5, 5), (2, 2), (2, 2, 2, 2)),      # 5x5 stride 2
    (1, 7, 9, 2, (5, 5), (1, 1), (2, 2, 2, 2)),      # 5x5 stride 1
    (3, 8, 8, 6, (3, 3), (2, 2), (1, 1, 1, 1)),      # MobileNet stride-2 block
    (1, 6, 7, 3, (3, 3), (1, 2), (0, 2, 1, 0)),      # asymmetric everything
    (1, 4, 5, 2, (1, 1), (1, 1), (0, 0, 0, 0)),      # 1x1 kernel (generic path)
    (2, 6, 8, 3, (3, 5), (1, 2), (1, 1, 2, 2)),      # non-square kernel
    (2, 10, 11, 17, (3, 3), (1, 1), (1, 1, 1, 1)),   # many interior pixels, odd C
    (1, 11, 10, 19, (5, 5), (1, 1), (2, 2, 2, 2)),   # 5x5 interior path, odd C
    (1, 3, 3, 2, (3, 3), (1, 1), (3, 0, 0, 3)),      # padding wider than the kernel: bias-only rows
    (1, 1, 1, 3, (5, 5), (2, 2), (2, 2, 2, 2)),      # 1x1 spatial, 5x5 stride 2
    (1, 9, 12, 40, (3, 3), (2, 2), (1, 1, 1, 1)),    # 3x3 row kernel: two 16-channel vectors + a masked 8
    (2, 5, 20, 32, (3, 3), (1, 1), (0, 0, 1, 1)),    # 3x3 row kernel: whole vectors, no top/bottom padding
    (1, 7, 7, 40, (5, 5), (1, 1), (2, 2, 2, 2)),     # MobileNetV3's 7x7 blocks: 4 of 7 pixels a row on a border
    (2, 14, 13, 24, (5, 5), (2, 2), (1, 2, 1, 2)),   # 5x5 row kernel, stride 2, asymmetric padding
    (1, 4, 3, 17, (5, 5), (1, 1), (2, 2, 2, 2)),     # map smaller than the kernel: no pixel is interior
]


def _dw_inputs(rng, case, dtype=np.float32):
    n, h, w, c, (kh, kw), stride, pad = case
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    wt = rng.standard_normal((kh, kw, c)).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return x, wt, b, stride, pad


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_depthwise_forward_matches_naive(rng, case):
    x, w, b, stride, pad = _dw_inputs(rng, case)
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    y = depthwise_conv2d_forward(x, w, b, stride, pad, act="relu6")
    ref = depthwise_conv2d_naive(x, w, b, stride, pad, act="relu6")
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    # Kernels never write into their inputs.
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS), ids=str)
@pytest.mark.parametrize("case", [DEPTHWISE_CASES[0], DEPTHWISE_CASES[9], DEPTHWISE_CASES[10], DEPTHWISE_CASES[15],
                                  DEPTHWISE_CASES[16]], ids=str)
def test_depthwise_fused_activation(rng, case, act):
    x, w, b, stride, pad = _dw_inputs(rng, case)
    y = depthwise_conv2d_forward(x, w, b, stride, pad, act=ACTIVATIONS[act], alpha=0.7)
    ref = depthwise_conv2d_naive(x, w, b, stride, pad, act=act, alpha=0.7)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


def test_depthwise_without_bias_and_float64(rng):
    x, w, _, stride, pad = _dw_inputs(rng, DEPTHWISE_CASES[9], np.float64)
    y = depthwise_conv2d_forward(x, w, None, stride, pad)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, depthwise_conv2d_naive(x, w, None, stride, pad), rtol=1e-12, atol=1e-12)


def test_depthwise_rejects_bad_arguments(rng):
    x = np.zeros((1, 4, 4, 3), np.float32)
    w = np.zeros((3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(N,H,W,C\)"):
        depthwise_conv2d_forward(x[0], w)
    with pytest.raises(ValueError, match=r"\(KH,KW,C\)"):
        depthwise_conv2d_forward(x, np.zeros((3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="pad"):
        depthwise_conv2d_forward(x, w, pad=(1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        depthwise_conv2d_forward(np.zeros((1, 2, 2, 3), np.float32), w)
    with pytest.raises(ValueError, match="activation"):
        depthwise_conv2d_forward(x, w, act="gelu")
    with pytest.raises(ValueError, match=r"\(N,Ho,Wo,C\)"):
        depthwise_conv2d_backward(np.zeros((1, 4, 4, 3), np.float32), x, w)


# --------------------------------------------------------------------------- pooling grids

# (N, H, W, C, kernel, stride, pad, ceil_mode)
POOL_CASES = [
    (1, 7, 9, 3, (3, 3), (2, 2), (0, 0, 0, 0), True),    # SqueezeNet MaxPool2d(3, 2, ceil_mode=True)
    (1, 13, 13, 5, (3, 3), (2, 2), (0, 0, 0, 0), True),
    (3, 8, 6, 1, (2, 2), (2, 2), (0, 0, 0, 0), False),   # C=1
    (1, 1, 1, 2, (1, 1), (1, 1), (0, 0, 0, 0), False),   # 1x1 spatial
    (1, 1, 1, 3, (3, 3), (2, 2), (1, 1, 1, 1), True),    # 1x1 spatial, all-padding window edges
    (2, 5, 5, 3, (3, 3), (2, 2), (1, 1, 1, 1), True),
    (1, 5, 5, 2, (2, 2), (2, 2), (1, 1, 1, 1), True),    # ceil window that would start in padding is dropped
    (1, 6, 6, 4, (3, 3), (2, 2), (0, 1, 0, 1), False),   # TF SAME
    (1, 6, 6, 4, (3, 3), (2, 2), (0, 1, 0, 1), True),
    (1, 6, 7, 2, (3, 2), (2, 1), (1, 0, 1, 1), True),    # asymmetric window, stride and padding
    (3, 9, 4, 3, (3, 3), (1, 1), (1, 1, 1, 1), False),   # overlapping stride-1 windows
    (1, 6, 8, 3, (3, 3), (2, 2), (0, 0, 0, 0), True),    # ceil-mode last window hangs past the input
    (2, 6, 6, 2, (3, 3), (2, 2), (1, 1, 1, 1), True),    # ... and past the padding
]


def _distinct(rng, shape, dtype=np.float64):
    """Values with no ties (a permutation), so max pooling's argmax is unambiguous."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) / 7.0 - 3.0).astype(dtype)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_forward_matches_naive(rng, case):
    n, h, w, c, kernel, stride, pad, ceil_mode = case
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    y, argmax = max_pool2d_forward(x, kernel, stride, pad, ceil_mode)
    ref, ref_arg = max_pool2d_naive(x, kernel, stride, pad, ceil_mode)
    assert y.shape == ref.shape and argmax.dtype == np.int64
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(argmax, ref_arg)


def test_max_pool_ties_pick_first_and_nan_propagates():
    x = np.zeros((1, 2, 2, 2), np.float32)
    x[0, 1, 1, 1] = np.nan
    y, argmax = max_pool2d_forward(x, 2, 2)
    assert y[0, 0, 0, 0] == 0 and argmax[0, 0, 0, 0] == 0
    assert np.isnan(y[0, 0, 0, 1]) and argmax[0, 0, 0, 1] == 3


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_avg_pool_forward_matches_naive(rng, case, count_include_pad):
    n, h, w, c, kernel, stride, pad, ceil_mode = case
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    y = avg_pool2d_forward(x, kernel, stride, pad, ceil_mode, count_include_pad)
    ref = avg_pool2d_naive(x, kernel, stride, pad, ceil_mode, count_include_pad)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (3, 7, 5, 1), (2, 4, 6, 9)], ids=str)
def test_global_avg_pool_forward_matches_naive(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(global_avg_pool_forward(x), global_avg_pool_naive(x), rtol=RTOL, atol=ATOL)


def test_pool_rejects_bad_arguments():
    x = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(N,H,W,C\)"):
        max_pool2d_forward(x[0], 2)
    with pytest.raises(ValueError, match="smaller than the window"):
        avg_pool2d_forward(x, 2, 2, (2, 2, 0, 0))
    with pytest.raises(ValueError, match=r"\(N,Ho,Wo,C\)"):
        avg_pool2d_backward(np.zeros((1, 3, 3, 3), np.float32), x.shape, 2, 2)
    with pytest.raises(ValueError, match=r"\(N,C\)"):
        global_avg_pool_backward(np.zeros((2, 3), np.float32), x.shape)


def test_max_pool_backward_rejects_argmax_outside_the_plane():
    dy = np.ones((2, 2, 2, 3), np.float32)
    for bad in (-1, 16):  # the 4x4 plane's indices are 0..15
        argmax = np.zeros(dy.shape, np.int64)
        argmax[1, 1, 0, 2] = bad
        with pytest.raises(ValueError, match="outside the 4x4 input plane"):
            max_pool2d_backward(dy, argmax, (2, 4, 4, 3))


def test_max_pool_backward_zeroes_a_reused_buffer(rng):
    # Inside training's reusing_arrays() dx comes from a freed buffer holding old values: the kernel zeroes it.
    from lightcnn.kernels import _reuse

    x = _distinct(rng, (2, 40, 40, 400)).astype(np.float32)  # dx 5 MB, above the pool's 4 MiB threshold
    y, argmax = max_pool2d_forward(x, 3, 2)
    g = rng.standard_normal(y.shape).astype(np.float32)
    expected = np.zeros(x.shape, np.float32)  # the scatter written plainly
    n, _, _, c = np.indices(argmax.shape)
    np.add.at(expected, (n, argmax // x.shape[2], argmax % x.shape[2], c), g)
    with _reuse.reusing_arrays():
        _reuse.empty(x.shape, np.float32).fill(np.nan)  # freed at once, handed out again below
        dx = max_pool2d_backward(g, argmax, x.shape)
    np.testing.assert_array_equal(dx, expected)


# --------------------------------------------------------------------------- gradient checks (float64)

GRAD_DW_CASES = [
    (2, 5, 4, 3, (3, 3), (1, 1), (1, 1, 1, 1)),
    (1, 6, 6, 2, (3, 3), (2, 2), (0, 1, 0, 1)),
    (1, 7, 6, 2, (5, 5), (2, 2), (2, 2, 2, 2)),
    (1, 6, 7, 1, (5, 5), (1, 1), (2, 2, 2, 2)),      # interior 5x5 path
    (2, 4, 5, 2, (3, 2), (1, 2), (0, 2, 1, 0)),
    (1, 1, 1, 2, (3, 3), (1, 1), (1, 1, 1, 1)),
]


@pytest.mark.parametrize("case", GRAD_DW_CASES, ids=str)
def test_depthwise_backward_gradcheck(rng, case):
    x, w, b, stride, pad = _dw_inputs(rng, case, np.float64)
    y = depthwise_conv2d_forward(x, w, b, stride, pad)
    g = rng.standard_normal(y.shape)
    dx, dw, db = depthwise_conv2d_backward(g, x, w, stride, pad)

    def loss():
        return float(np.sum(depthwise_conv2d_forward(x, w, b, stride, pad) * g))

    assert_gradient(dx, loss, x, "depthwise dx")
    assert_gradient(dw, loss, w, "depthwise dw")
    assert_gradient(db, loss, b, "depthwise db")


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_backward_gradcheck(rng, case):
    n, h, w, c, kernel, stride, pad, ceil_mode = case
    x = _distinct(rng, (n, h, w, c))
    y, argmax = max_pool2d_forward(x, kernel, stride, pad, ceil_mode)
    g = rng.standard_normal(y.shape)
    dx = max_pool2d_backward(g, argmax, x.shape)
    assert_gradient(dx, lambda: float(np.sum(max_pool2d_forward(x, kernel, stride, pad, ceil_mode)[0] * g)),
                    x, "max pool dx")


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_avg_pool_backward_gradcheck(rng, case, count_include_pad):
    n, h, w, c, kernel, stride, pad, ceil_mode = case
    args = (kernel, stride, pad, ceil_mode, count_include_pad)
    x = rng.standard_normal((n, h, w, c))
    g = rng.standard_normal(avg_pool2d_forward(x, *args).shape)
    dx = avg_pool2d_backward(g, x.shape, *args)
    assert_gradient(dx, lambda: float(np.sum(avg_pool2d_forward(x, *args) * g)), x, "avg pool dx")


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (3, 4, 5, 2)], ids=str)
def test_global_avg_pool_backward_gradcheck(rng, shape):
    x = rng.standard_normal(shape)
    g = rng.standard_normal((shape[0], shape[3]))
    dx = global_avg_pool_backward(g, x.shape)
    assert_gradient(dx, lambda: float(np.sum(global_avg_pool_forward(x) * g)), x, "global avg pool dx")


# --------------------------------------------------------------------------- PyTorch parity


def _rel(a, b):
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def _nchw(torch, x, grad=True):
    return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=grad)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


TORCH_ACTS = {
    "none": lambda F, t: t,
    "relu6": lambda F, t: F.relu6(t),
    "hard_swish": lambda F, t: F.hardswish(t),
    "elu": lambda F, t: F.elu(t, alpha=0.7),
}


@pytest.mark.parametrize("act", sorted(TORCH_ACTS))
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_depthwise_matches_torch(rng, case, act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b, stride, pad = _dw_inputs(rng, case)
    top, bottom, left, right = pad
    xt = _nchw(torch, x)
    wt = torch.tensor(np.ascontiguousarray(w.transpose(2, 0, 1)[:, None]), requires_grad=True)  # (C,1,KH,KW)
    bt = torch.tensor(b, requires_grad=True)
    # F.pad takes (left, right, top, bottom): asymmetric padding done explicitly, conv unpadded.
    pre = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, bt, stride=stride, groups=x.shape[3])
    yt = TORCH_ACTS[act](F, pre)
    y = depthwise_conv2d_forward(x, w, b, stride, pad, act=act, alpha=0.7)
    assert _rel(y, _nhwc(yt)) <= 1e-5

    g = rng.standard_normal(pre.shape).astype(np.float32)  # NCHW upstream gradient of the pre-activation
    pre.backward(torch.tensor(g))
    dx, dw, db = depthwise_conv2d_backward(g.transpose(0, 2, 3, 1), x, w, stride, pad)
    assert _rel(dx, _nhwc(xt.grad)) <= 1e-4
    assert _rel(dw, wt.grad.numpy()[:, 0].transpose(1, 2, 0)) <= 1e-4
    assert _rel(db, bt.grad.numpy()) <= 1e-4


# PyTorch pooling takes symmetric padding only, at most half the window.
TORCH_POOL_CASES = [case for case in POOL_CASES if case[6][0] == case[6][1] and case[6][2] == case[6][3]]


@pytest.mark.parametrize("case", TORCH_POOL_CASES, ids=str)
def test_max_pool_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    n, h, w, c, kernel, stride, pad, ceil_mode = case
    x = _distinct(rng, (n, h, w, c), np.float32)
    xt = _nchw(torch, x)
    yt, idx = torch.nn.functional.max_pool2d(xt, kernel, stride, (pad[0], pad[2]), ceil_mode=ceil_mode,
                                             return_indices=True)
    y, argmax = max_pool2d_forward(x, kernel, stride, pad, ceil_mode)
    assert y.shape == _nhwc(yt).shape
    assert _rel(y, _nhwc(yt)) <= 1e-5
    np.testing.assert_array_equal(argmax, _nhwc(idx))
    g = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(g))
    dx = max_pool2d_backward(g.transpose(0, 2, 3, 1), argmax, x.shape)
    assert _rel(dx, _nhwc(xt.grad)) <= 1e-4


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", TORCH_POOL_CASES, ids=str)
def test_avg_pool_matches_torch(rng, case, count_include_pad):
    torch = pytest.importorskip("torch")
    n, h, w, c, kernel, stride, pad, ceil_mode = case
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    xt = _nchw(torch, x)
    yt = torch.nn.functional.avg_pool2d(xt, kernel, stride, (pad[0], pad[2]), ceil_mode=ceil_mode,
                                        count_include_pad=count_include_pad)
    args = (kernel, stride, pad, ceil_mode, count_include_pad)
    y = avg_pool2d_forward(x, *args)
    assert y.shape == _nhwc(yt).shape
    assert _rel(y, _nhwc(yt)) <= 1e-5
    g = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(g))
    dx = avg_pool2d_backward(g.transpose(0, 2, 3, 1), x.shape, *args)
    assert _rel(dx, _nhwc(xt.grad)) <= 1e-4


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (3, 7, 5, 1), (2, 7, 7, 16)], ids=str)
def test_global_avg_pool_matches_torch(rng, shape):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal(shape).astype(np.float32)
    xt = _nchw(torch, x)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, 1)[:, :, 0, 0]
    assert _rel(global_avg_pool_forward(x), yt.detach().numpy()) <= 1e-5
    g = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(g))
    assert _rel(global_avg_pool_backward(g, x.shape), _nhwc(xt.grad)) <= 1e-4


def test_output_size_rule_matches_torch():
    """shapes.conv_output_size (floor and ceil mode) against PyTorch's pooling output shapes."""
    torch = pytest.importorskip("torch")
    for size in range(1, 12):
        for k in range(1, 5):
            for s in range(1, 4):
                for p in range(0, k // 2 + 1):
                    if size + 2 * p < k:
                        continue
                    for ceil_mode in (False, True):
                        t = torch.nn.functional.max_pool2d(torch.zeros(1, 1, size, 1), (k, 1), (s, 1), (p, 0),
                                                           ceil_mode=ceil_mode)
                        assert conv_output_size(size, k, s, p, p, ceil_mode) == t.shape[2], (size, k, s, p, ceil_mode)
