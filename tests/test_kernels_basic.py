"""Activation, batch-norm, linear/loss and combine kernels.

Three kinds of check, each able to fail:
  1. forward vs the loop-only twins in tests/reference_basic.py over awkward shapes (float32);
  2. every backward vs float64 central differences (tests/gradcheck.py, tolerance stated there);
  3. parity with PyTorch (forward <= 1e-5, backward <= 1e-4, relative to the largest reference value).
"""

import numpy as np
import pytest

from lightcnn.kernels import activation as A
from lightcnn.kernels import combine as C
from lightcnn.kernels import linear as L
from lightcnn.kernels import norm as B
from tests import reference_basic as ref
from tests.gradcheck import assert_gradient

# N=1 and 3, C=1, H != W, odd sizes, 1x1 spatial.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 1), (1, 4, 3, 6), (3, 1, 1, 5), (2, 7, 5, 3)]
ACTS = ["none", "relu", "relu6", "elu", "sigmoid", "hard_sigmoid", "hard_swish"]
KINKS = {"relu": [0.0], "relu6": [0.0, 6.0], "elu": [0.0], "hard_sigmoid": [-3.0, 3.0], "hard_swish": [-3.0, 3.0]}

FWD_TOL = 1e-5  # float32 vs float64 twin, relative to the output's scale
TORCH_FWD = 1e-5
TORCH_BWD = 1e-4


def assert_close(actual, expected, rtol, name=""):
    """max |actual - expected| <= rtol * max(1, max |expected|): relative for large outputs, absolute for small."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= rtol * scale, f"{name}: max abs error {err:.3e} exceeds {rtol:.0e} * {scale:.3e}"


def spread(rng, shape, lo=-8.0, hi=9.0, dtype=np.float32):
    """Values covering every region of every activation, including exact kinks."""
    x = rng.uniform(lo, hi, size=shape)
    kinks = np.array([-3.0, 0.0, 3.0, 6.0])
    flat = x.reshape(-1)
    flat[: min(flat.size, 4)] = kinks[: min(flat.size, 4)]
    return x.astype(dtype)


def away_from_kinks(rng, shape, act, margin=0.05):
    """float64 samples at least `margin` from every kink of `act` (finite differences need smoothness)."""
    x = rng.uniform(-6.0, 8.0, size=shape)
    for k in KINKS.get(act, []):
        close = np.abs(x - k) < margin
        x[close] = k + np.where(x[close] >= k, margin, -margin) * 2
    return x


# =========================================================================== 1. forward vs twins


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_activation_forward_matches_twin(rng, act, shape):
    x = spread(rng, shape)
    x0 = x.copy()
    y = A.activation_forward(x, act, alpha=0.7)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert_close(y, ref.activation_forward_ref(x, act, 0.7), FWD_TOL, act)
    np.testing.assert_array_equal(x, x0)  # input untouched


@pytest.mark.parametrize("act", ACTS[1:])
def test_activation_forward_parallel_path_and_codes(rng, act):
    # the chunked parallel path, the code passed as an integer, float64
    x = spread(rng, (2, 47, 41, 37), dtype=np.float64)
    assert x.size >= A._PARALLEL_MIN_SIZE
    y = A.activation_forward(x, A.ACTIVATIONS[act], alpha=1.3)
    assert y.dtype == np.float64
    assert_close(y, ref.activation_forward_ref(x, act, 1.3), 1e-12, act)
    g = rng.standard_normal(x.shape)
    small = A.activation_backward(g[:1, :3], x[:1, :3], act, 1.3)  # serial path
    assert_close(A.activation_backward(g, x, act, 1.3)[:1, :3], small, 0.0, "parallel == serial")


@pytest.mark.parametrize("act", ACTS)
def test_act_forward_flat_in_place(rng, act):
    # the building block other kernels use to fuse an activation into a block they own
    x = spread(rng, (50,), dtype=np.float32)
    y = x.copy()
    A.act_forward_flat(y, A.ACTIVATIONS[act], np.float32(0.7), y)
    assert_close(y, ref.activation_forward_ref(x, act, 0.7), FWD_TOL, act)


def test_activation_sigmoid_extreme_and_nan():
    x = np.array([-1000.0, -88.0, 0.0, 88.0, 1000.0, np.nan], dtype=np.float32)
    with np.errstate(all="raise"):
        y = A.activation_forward(x, "sigmoid")
    assert np.all(np.isfinite(y[:5]))
    np.testing.assert_allclose(y[:5], [0.0, 1.0 / (1 + np.exp(88.0)), 0.5, 1.0, 1.0], rtol=1e-6, atol=0)
    assert np.isnan(y[5])
    for act in ACTS:  # NaN propagates through every activation (training's NaN check relies on it)
        assert np.isnan(A.activation_forward(np.array([np.nan]), act)[0]), act


def test_activation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        A.activation_forward(np.zeros(3, np.float32), "gelu")
    with pytest.raises(ValueError, match="unknown activation code"):
        A.activation_forward(np.zeros(3, np.float32), 9)
    with pytest.raises(ValueError, match="float32 or float64"):
        A.activation_forward(np.zeros(3, np.int32), "relu")
    with pytest.raises(ValueError, match="shape"):
        A.activation_backward(np.zeros(4), np.zeros(3), "relu")


def test_expm1_nonpositive_matches_math_expm1():
    # ELU's exponential (a polynomial and doublings, no libm call) against math.expm1 in float64:
    # relative error <= 1e-15 from -1e-300 to -1000 (6.6e-16 measured on 4 M values, with its FMAs), and the
    # special values pass through.
    import math

    u = -np.concatenate([np.logspace(-300, 3, 20001), np.linspace(0, 45, 20001)])
    ours = np.array([A.expm1_nonpositive(float(v)) for v in u[::7]])
    exact = np.array([math.expm1(v) for v in u[::7]])
    rel = np.abs(ours - exact) / np.maximum(np.abs(exact), 1e-300)
    assert rel.max() <= 1e-15, f"max relative error {rel.max():.3e} at u = {u[::7][rel.argmax()]}"
    assert A.expm1_nonpositive(0.0) == 0.0 and A.expm1_nonpositive(-np.inf) == -1.0
    assert np.isnan(A.expm1_nonpositive(np.nan))


def test_elu_float32_equals_libm_expm1_rounded(rng):
    # float32 ELU: the fast exponential rounds to the same float32 as math.expm1 (the float64 twin).
    x = (rng.standard_normal(200_000) * 4).astype(np.float32)
    alpha = float(np.float32(0.7))  # the kernel multiplies by alpha in x's dtype
    expected = np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0).astype(np.float64))).astype(np.float32)
    np.testing.assert_array_equal(A.activation_forward(x, "elu", alpha=0.7), expected)


OUTPUT_GRAD = ["none", "relu", "relu6", "elu"]


@pytest.mark.parametrize("act", OUTPUT_GRAD)
@pytest.mark.parametrize("shape", SHAPES + [(2, 47, 41, 37)])  # the last takes the parallel path
def test_backward_from_output_equals_backward_from_input(rng, act, shape):
    # dy * act'(x) from y = act(x) is the pre-activation form (the oracle), kinks included
    x = spread(rng, shape)
    g = rng.standard_normal(shape).astype(np.float32)
    y = A.activation_forward(x, act, 0.7)
    dx = A.activation_backward_from_output(g, y, act, 0.7)
    assert dx.dtype == np.float32 and dx.shape == x.shape
    expected = ref.activation_backward_ref(g, x, act, 0.7)
    assert_close(dx, expected, 1e-6, act)
    np.testing.assert_array_equal(dx == 0, expected == 0)  # the same zero pattern at the kinks


@pytest.mark.parametrize("act", OUTPUT_GRAD)
def test_backward_from_output_gradcheck(rng, act):
    x = away_from_kinks(rng, (2, 3, 4, 3), act)
    g = rng.standard_normal(x.shape)
    dx = A.activation_backward_from_output(g, A.activation_forward(x, act, 1.3), act, 1.3)
    assert_gradient(dx, lambda: float(np.sum(A.activation_forward(x, act, 1.3) * g)), x, act)


@pytest.mark.parametrize("act", ["relu", "relu6", "elu"])
def test_backward_from_output_torch_parity(rng, act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = spread(rng, (3, 5, 7, 4))
    g = rng.standard_normal(x.shape).astype(np.float32)
    t = torch.tensor(x, requires_grad=True)
    out = TORCH_ACTS[act](F, t)
    out.backward(torch.tensor(g))
    y = A.activation_forward(x, act, 0.7)
    assert_close(A.activation_backward_from_output(g, y, act, 0.7), t.grad.numpy(), TORCH_BWD, "backward")
    if act == "elu":  # PyTorch's own from-output formula (the in-place ELU's backward)
        theirs = torch.ops.aten.elu_backward(torch.tensor(g), 0.7, 1, 1, True, out.detach())
        assert_close(A.activation_backward_from_output(g, y, act, 0.7), theirs.numpy(), TORCH_BWD, "is_result")


@pytest.mark.parametrize("act", OUTPUT_GRAD)
def test_backward_from_output_channels_of_a_concatenation(rng, act):
    # one slot (channels 3..8 of 11) of a concatenation's value and gradient, against the pre-activation oracle
    x = spread(rng, (2, 5, 3, 11))
    g = rng.standard_normal(x.shape).astype(np.float32)
    y = A.activation_forward(x, act, 0.7)
    dx = A.activation_backward_from_output_channels(g, y, 3, 5, act, 0.7)
    assert dx.shape == (2, 5, 3, 5) and dx.flags.c_contiguous
    assert_close(dx, ref.activation_backward_ref(g[..., 3:8], x[..., 3:8], act, 0.7), 1e-6, act)
    with pytest.raises(ValueError, match="channels"):
        A.activation_backward_from_output_channels(g, y, 8, 5, act, 0.7)


@pytest.mark.parametrize("act", OUTPUT_GRAD)
@pytest.mark.parametrize("shape, col0, width", [((2, 5, 3, 11), 3, 5), ((1, 4, 4, 6), 0, None),
                                                ((3, 17, 13, 7), 2, 5)])  # 663 rows: two sum blocks
def test_backward_from_output_and_bias_sum(rng, act, shape, col0, width):
    # the derivative from the output and, in the same pass, its sum over N,H,W (a bias's gradient), against the
    # pre-activation oracle and a float64 sum of it
    x = spread(rng, shape)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y = A.activation_forward(x, act, 0.7)
    dx, db = A.activation_backward_from_output_and_sum(g, y, act, 0.7, col0, width)
    hi = shape[3] if width is None else col0 + width
    expected = ref.activation_backward_ref(g[..., col0:hi], x[..., col0:hi], act, 0.7)
    assert dx.shape == shape[:3] + (hi - col0,) and db.dtype == np.float32
    assert_close(dx, expected, 1e-6, act)
    np.testing.assert_allclose(db, np.asarray(expected, np.float64).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        A.activation_backward_from_output_and_sum(g, y, act, 0.7, shape[3] - 1, 5)


def test_backward_from_output_refuses_what_the_output_does_not_determine():
    y = np.zeros(3, np.float32)
    for act, alpha in [("sigmoid", 1.0), ("hard_sigmoid", 1.0), ("hard_swish", 1.0), ("elu", -0.5)]:
        assert not A.grad_from_output(act, alpha)
        with pytest.raises(ValueError, match="in terms of its output"):
            A.activation_backward_from_output(y, y, act, alpha)
    assert A.grad_from_output("elu", 0.0) and A.grad_from_output(A.ACT_RELU6)
    with pytest.raises(ValueError, match="shape"):
        A.activation_backward_from_output(np.zeros(4, np.float32), y, "relu")


@pytest.mark.parametrize("act", ["none", "relu6", "hard_swish"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 45, 41, 37)])  # the last takes the parallel path
def test_batchnorm_inference_forward_matches_twin(rng, shape, act):
    c = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32) * 3
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c), rng.uniform(0.1, 3.0, c)
    scale, shift = B.fold_batchnorm(gamma.astype(np.float32), beta, mean, var, 1e-3)
    assert scale.dtype == np.float32
    y = B.batchnorm_inference_forward(x, scale, shift, act)
    assert_close(y, ref.batchnorm_inference_ref(x, gamma, beta, mean, var, 1e-3, act), FWD_TOL, "bn eval")


@pytest.mark.parametrize("shape", SHAPES + [(4, 40, 41, 3)])  # the last spans several reduction chunks
def test_batchnorm_train_forward_matches_twin(rng, shape):
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 5).astype(np.float32)  # offset mean tests the two-pass variance
    x0 = x.copy()
    gamma = rng.standard_normal(c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    y, cache, mean, var = B.batchnorm_train_forward(x, gamma, beta, 1e-5)
    y_ref, mean_ref, var_ref = ref.batchnorm_train_ref(x, gamma, beta, 1e-5)
    # 1x1 spatial with N=1 has zero variance: y = beta, xhat = 0
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(mean, mean_ref, FWD_TOL, "mean")
    assert_close(var, var_ref, FWD_TOL, "var")
    assert_close(cache.inv_std, 1 / np.sqrt(var_ref + 1e-5), 2e-5 * max(1.0, 1 / np.sqrt(1e-5)), "inv_std")
    assert cache.xhat.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("m", [1, 7, 2048, 5000])  # 5000 rows: three reduction chunks, the last partial
def test_batch_statistics_against_float64(rng, m):
    """The float64 channel mean and biased variance of float32 rows, written plainly; an offset of 300 makes
    a one-pass E[x^2] - E[x]^2 in float32 lose every digit of the variance."""
    rows = (rng.standard_normal((m, 6)) * np.array([1, 0.01, 2, 3, 0.5, 1]) + 300).astype(np.float32)
    mean, var = B.batch_statistics(rows)
    x = rows.astype(np.float64)
    expect_mean = x.sum(0) / m
    expect_var = ((x - expect_mean) ** 2).sum(0) / m
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_allclose(mean, expect_mean, rtol=1e-13)
    np.testing.assert_allclose(var, expect_var, rtol=1e-12)


def test_update_running_stats_matches_twin(rng):
    c = 5
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    bm, bv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    new_mean, new_var = B.update_running_stats(rm, rv, bm, bv, 12, 0.3)
    em, ev = ref.update_running_stats_ref(rm, rv, bm, bv, 12, 0.3)
    assert_close(new_mean, em, 1e-6, "mean")
    assert_close(new_var, ev, 1e-6, "var")
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    with pytest.raises(ValueError, match="count >= 2"):
        B.update_running_stats(rm, rv, bm, bv, 1, 0.1)


def test_batchnorm_rejects_bad_shapes():
    x = np.zeros((2, 3, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(C,\) = \(4,\)"):
        B.batchnorm_train_forward(x, np.ones(3, np.float32), np.zeros(4, np.float32), 1e-5)
    with pytest.raises(ValueError, match="scale"):
        B.batchnorm_inference_forward(x, np.ones(5, np.float32), np.zeros(4, np.float32))


@pytest.mark.parametrize("layout", ["hwio", "pointwise", "dense"])
def test_fold_batchnorm_into_conv(rng, layout):
    """conv(x, w', b') == BN(conv(x, w, b)), with a plain loop conv/dense from the twins."""
    c, o = 3, 4
    if layout == "hwio":
        x, w = rng.standard_normal((2, 6, 5, c)), rng.standard_normal((3, 2, c, o)).astype(np.float32)
        layer = ref.conv2d_valid_ref
    elif layout == "pointwise":
        x, w = rng.standard_normal((2, 4, 3, c)), rng.standard_normal((c, o)).astype(np.float32)
        layer = lambda inp, wt, bias: ref.conv2d_valid_ref(inp, wt[None, None], bias)  # noqa: E731
    else:
        x, w = rng.standard_normal((5, 7)), rng.standard_normal((7, o)).astype(np.float32)
        layer = lambda inp, wt, bias: ref.dense_ref(inp, wt, bias)[:, None, None, :]  # noqa: E731
    b = rng.standard_normal(o)
    gamma, beta = rng.standard_normal(o), rng.standard_normal(o)
    mean, var = rng.standard_normal(o), rng.uniform(0.2, 2.0, o)
    conv_then_bn = ref.batchnorm_inference_ref(layer(x, w, b), gamma, beta, mean, var, 1e-5)

    scale, shift = B.fold_batchnorm(gamma, beta, mean, var, 1e-5)
    wf, bf = B.fold_batchnorm_into_conv(w, b, scale, shift)
    assert wf.shape == w.shape and wf.dtype == w.dtype and bf.shape == (o,)
    assert_close(layer(x, wf, bf), conv_then_bn, 1e-5, "folded")
    # b=None is a zero bias
    _, bf0 = B.fold_batchnorm_into_conv(w, None, scale, shift)
    assert_close(bf0, shift, 1e-7, "bias from None")


@pytest.mark.parametrize("act", ["none", "relu", "elu", "hard_swish"])
@pytest.mark.parametrize("n,f,o", [(1, 1, 1), (3, 7, 5), (1, 16, 3), (4, 5, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_forward_matches_twin(rng, n, f, o, act, bias):
    x = rng.standard_normal((n, f)).astype(np.float32)
    w = rng.standard_normal((f, o)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    y = L.dense_forward(x, w, b, act, alpha=0.5)
    assert y.dtype == np.float32
    assert_close(y, ref.dense_ref(x, w, b, act, 0.5), FWD_TOL, "dense")


def test_dense_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(F,O\) with F = 4"):
        L.dense_forward(np.zeros((2, 4), np.float32), np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(O,\) = \(5,\)"):
        L.dense_forward(np.zeros((2, 4), np.float32), np.zeros((4, 5), np.float32), np.zeros(4))


# (40, 1000) is above SOFTMAX_SERIAL_MAX: the parallel compilation; the others run the serial one.
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (1, 1000), (5, 2), (40, 1000)])
def test_softmax_and_log_softmax_match_twin(rng, shape):
    assert (np.prod(shape) >= L.SOFTMAX_SERIAL_MAX) == (shape == (40, 1000))
    z = (rng.standard_normal(shape) * 5).astype(np.float32)
    p = L.softmax(z)
    assert_close(p, ref.softmax_ref(z), 1e-6, "softmax")
    assert_close(L.log_softmax(z), ref.log_softmax_ref(z), FWD_TOL, "log_softmax")
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [-5e4, -5e4, -5e4]], dtype=np.float32)
    with np.errstate(all="raise"):
        p = L.softmax(z)
        logp = L.log_softmax(z)
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6, atol=0)
    np.testing.assert_allclose(logp[0], [0, -1000, -2000], rtol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("n,k", [(1, 1), (1, 4), (6, 5), (3, 10)])
def test_cross_entropy_matches_twin(rng, n, k, weighted, smoothing):
    z = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    y = rng.integers(0, k, n)
    w = rng.uniform(0.2, 3.0, k) if weighted else None
    loss, grad = L.cross_entropy(z, y, w, smoothing)
    assert isinstance(loss, float) and grad.dtype == np.float32 and grad.shape == z.shape
    np.testing.assert_allclose(loss, ref.cross_entropy_ref(z, y, w, smoothing), rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_matches_twin(rng, gamma, weighted):
    z = (rng.standard_normal((7, 4)) * 2).astype(np.float32)
    y = rng.integers(0, 4, 7)
    w = rng.uniform(0.2, 3.0, 4) if weighted else None
    loss, _ = L.focal_loss(z, y, gamma, w)
    np.testing.assert_allclose(loss, ref.focal_loss_ref(z, y, gamma, w), rtol=1e-6)
    if gamma == 0.0:  # gamma = 0 is cross entropy
        np.testing.assert_allclose(loss, L.cross_entropy(z, y, w)[0], rtol=1e-12)


def test_focal_loss_confident_sample_has_finite_zero_gradient():
    z = np.array([[300.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    for gamma in (0.0, 0.5, 2.0):
        loss, grad = L.focal_loss(z, np.array([0, 1]), gamma)
        assert np.all(np.isfinite(grad)) and np.isfinite(loss)
        np.testing.assert_allclose(grad[0], 0.0, atol=1e-12)


def test_losses_reject_bad_labels():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"\[0, K\) = \[0, 3\)"):
        L.cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"\(N,\) = \(2,\)"):
        L.focal_loss(z, np.array([0]))
    with pytest.raises(ValueError, match=r"\(K,\) = \(3,\)"):
        L.cross_entropy(z, np.array([0, 1]), class_weights=np.ones(2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5])
def test_dropout_forward(rng, shape, p):
    x = rng.standard_normal(shape).astype(np.float32)
    x0 = x.copy()
    y, mask = L.dropout_forward(x, p, np.random.default_rng(7))
    assert y.dtype == mask.dtype == np.float32
    assert_close(y, ref.dropout_ref(x, mask), 1e-7, "dropout")
    assert set(np.unique(mask)).issubset({0.0, np.float32(1 / (1 - p))})
    y2, mask2 = L.dropout_forward(x, p, np.random.default_rng(7))  # same generator state, same mask
    np.testing.assert_array_equal(mask, mask2)
    if p == 0.0:
        np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(x, x0)


def test_dropout_keeps_the_expected_fraction_and_mean():
    x = np.ones((64, 32, 32, 4), np.float32)
    y, mask = L.dropout_forward(x, 0.3, np.random.default_rng(0))
    assert abs((mask > 0).mean() - 0.7) < 0.005
    assert abs(y.mean() - 1.0) < 0.01  # inverted dropout preserves the expectation
    assert np.all(L.dropout_forward(x[:2], 1.0, np.random.default_rng(0))[0] == 0)
    with pytest.raises(ValueError, match="Generator"):
        L.dropout_forward(x, 0.5, 0)


@pytest.mark.parametrize("sizes", [[1], [1, 1], [3, 1, 4], [2, 5]])
@pytest.mark.parametrize("nhw", [(1, 1, 1), (3, 5, 2), (1, 4, 7)])
def test_concat_channels_matches_twin(rng, sizes, nhw):
    xs = [rng.standard_normal(nhw + (c,)).astype(np.float32) for c in sizes]
    y = C.concat_channels(xs)
    np.testing.assert_array_equal(y, ref.concat_channels_ref(xs))
    parts = C.concat_channels_backward(y, sizes)
    for part, x in zip(parts, xs):
        np.testing.assert_array_equal(part, x)
        assert part.flags.c_contiguous


def _fitted_ref(a, h, w):
    """a (N,Ha,Wa,C) cropped or zero-padded at the bottom/right to (N,h,w,C), written plainly."""
    out = np.zeros((a.shape[0], h, w, a.shape[3]), a.dtype)
    hh, ww = min(h, a.shape[1]), min(w, a.shape[2])
    out[:, :hh, :ww] = a[:, :hh, :ww]
    return out


@pytest.mark.parametrize("a_hw", [(4, 5), (6, 7), (3, 9), (1, 1)])  # equal, padded, cropped, mixed, tiny
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_concat_fitted_and_its_gradients_match_twin(rng, a_hw, dtype):
    a = rng.standard_normal((3,) + a_hw + (5,)).astype(dtype)
    b = rng.standard_normal((3, 4, 5, 2)).astype(dtype)
    y = C.concat_fitted(a, b)
    np.testing.assert_array_equal(y, np.concatenate([_fitted_ref(a, 4, 5), b], axis=-1))
    dy = rng.standard_normal(y.shape).astype(dtype)
    g = rng.standard_normal(b.shape).astype(dtype)
    np.testing.assert_array_equal(C.concat_fitted_grad_a(dy, a.shape), _fitted_ref(dy[..., :5], *a_hw))
    np.testing.assert_array_equal(C.concat_fitted_grad_b(dy, 5), dy[..., 5:])
    np.testing.assert_array_equal(C.concat_fitted_grad_b(dy, 5, g), dy[..., 5:] + g)


@pytest.mark.parametrize("x_hw", [(4, 5), (6, 7), (3, 9)])
def test_place_fitted_writes_only_its_slot(rng, x_hw):
    x = rng.standard_normal((2,) + x_hw + (3,)).astype(np.float32)
    y = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    expected = y.copy()
    expected[..., 2:5] = _fitted_ref(x, 4, 5)
    C.place_fitted(x, y, 2)
    np.testing.assert_array_equal(y, expected)


def test_concat_fitted_gradient(rng):
    a, b = rng.standard_normal((2, 3, 6, 2)), rng.standard_normal((2, 4, 4, 3))
    g = rng.standard_normal((2, 4, 4, 5))
    assert_gradient(C.concat_fitted_grad_a(g, a.shape), lambda: float(np.sum(C.concat_fitted(a, b) * g)), a, "da")
    assert_gradient(C.concat_fitted_grad_b(g, 2), lambda: float(np.sum(C.concat_fitted(a, b) * g)), b, "db")


def test_concat_fitted_rejects_mismatch():
    with pytest.raises(ValueError, match="equal N"):
        C.concat_fitted(np.zeros((1, 2, 2, 3), np.float32), np.zeros((2, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="a_shape"):
        C.concat_fitted_grad_a(np.zeros((1, 2, 2, 3), np.float32), (1, 2, 2, 4))
    with pytest.raises(ValueError, match="g must have shape"):
        C.concat_fitted_grad_b(np.zeros((1, 2, 2, 3), np.float32), 1, np.zeros((1, 2, 2, 1), np.float32))


def test_concat_rejects_mismatch():
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        C.concat_channels([np.zeros((1, 2, 2, 3), np.float32), np.zeros((1, 2, 3, 3), np.float32)])
    with pytest.raises(ValueError, match="sum to"):
        C.concat_channels_backward(np.zeros((1, 2, 2, 3), np.float32), [1, 1])


@pytest.mark.parametrize("shape", SHAPES)
def test_add_and_scale_channels_match_twin(rng, shape):
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    assert_close(C.add_forward(a, b), ref.add_ref(a, b), 1e-7, "add")
    s = rng.uniform(0, 1, (shape[0], shape[3])).astype(np.float32)
    assert_close(C.scale_channels_forward(a, s), ref.scale_channels_ref(a, s), 1e-7, "scale")
    da, db = C.add_backward(b)
    np.testing.assert_array_equal(da, b)
    np.testing.assert_array_equal(db, b)
    with pytest.raises(ValueError):  # read-only: in-place accumulation into one branch would corrupt the other
        da += 1
    with pytest.raises(ValueError, match=r"\(N,C\)"):
        C.scale_channels_forward(a, s[:, :1] if shape[3] > 1 else np.zeros((shape[0], 2)))


# =========================================================================== 2. gradient checks (float64)


@pytest.mark.parametrize("act", ACTS)
def test_activation_gradient(rng, act):
    x = away_from_kinks(rng, (2, 3, 4, 3), act)
    g = rng.standard_normal(x.shape)
    dx = A.activation_backward(g, x, act, alpha=0.7)
    assert_gradient(dx, lambda: float(np.sum(A.activation_forward(x, act, alpha=0.7) * g)), x, act)


@pytest.mark.parametrize("act", ["relu", "relu6", "hard_sigmoid", "hard_swish", "elu"])
def test_activation_gradient_at_kinks_follows_torch(act):
    x = np.array([-3.0, 0.0, 3.0, 6.0])
    expected = {
        "relu": [0, 0, 1, 1],
        "relu6": [0, 0, 1, 0],
        "hard_sigmoid": [0, 1 / 6, 0, 0],
        "hard_swish": [0, 0.5, 1, 1],
        "elu": [0.7 * np.exp(-3.0), 0.7, 1, 1],
    }[act]
    np.testing.assert_allclose(A.activation_backward(np.ones(4), x, act, 0.7), expected, rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 1, 1, 2), (3, 2, 1, 1)])
def test_batchnorm_train_gradient(rng, shape):
    c = shape[-1]
    x = rng.standard_normal(shape) * 2 + 1
    gamma = rng.standard_normal(c)
    beta = rng.standard_normal(c)
    g = rng.standard_normal(shape)
    eps = 1e-3
    _, cache, _, _ = B.batchnorm_train_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = B.batchnorm_train_backward(g, cache, gamma)

    def loss():
        return float(np.sum(B.batchnorm_train_forward(x, gamma, beta, eps)[0] * g))

    assert_gradient(dx, loss, x, "dx")
    assert_gradient(dgamma, loss, gamma, "dgamma")
    assert_gradient(dbeta, loss, beta, "dbeta")


@pytest.mark.parametrize("act", ["relu", "relu6", "elu"])
@pytest.mark.parametrize("slot", [False, True])
def test_batchnorm_train_fused_activation(rng, act, slot):
    # BN + activation in one pass, optionally into channels 2..5 of a wider array: forward against the twin
    # followed by the activation's oracle, backward (dy w.r.t. the activation's output) against the oracle's
    # derivative followed by the unfused BN backward; and in float64 against central differences
    shape, c = (3, 9, 7, 4), 4
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    out = np.full(shape[:3] + (9,), 7.0, np.float32) if slot else None
    col0 = 2 if slot else 0
    y, cache, _, _ = B.batchnorm_train_forward(x, gamma, beta, 1e-5, act, 0.8, out, col0)
    z_ref, _, _ = ref.batchnorm_train_ref(x, gamma, beta, 1e-5)
    assert_close(y, ref.activation_forward_ref(z_ref, act, 0.8), 2e-5, "y")
    if slot:  # the other channels are untouched, and y is the slot's view
        assert np.all(out[..., :2] == 7.0) and np.all(out[..., 6:] == 7.0) and np.shares_memory(y, out)
    g = rng.standard_normal(out.shape if slot else shape).astype(np.float32)
    dx, dgamma, dbeta = B.batchnorm_train_backward(g, cache, gamma, out if slot else y, act, 0.8, col0)
    g_slot = g[..., col0:col0 + c]
    dz = ref.activation_backward_ref(g_slot, z_ref, act, 0.8)
    dx_ref, dgamma_ref, dbeta_ref = B.batchnorm_train_backward(dz.astype(np.float32), cache, gamma)
    assert_close(dx, dx_ref, 1e-4, "dx")
    assert_close(dgamma, dgamma_ref, 1e-4, "dgamma")
    assert_close(dbeta, dbeta_ref, 1e-4, "dbeta")

    x64, gamma64, beta64, g64 = (a.astype(np.float64) for a in (x[:1, :3], gamma, beta, g[:1, :3]))
    target = np.zeros(g64.shape) if slot else None
    y64, cache64, _, _ = B.batchnorm_train_forward(x64, gamma64, beta64, 1e-3, act, 0.8, target, col0)
    dx64, dgamma64, _ = B.batchnorm_train_backward(g64, cache64, gamma64, target if slot else y64, act, 0.8, col0)

    def loss():
        t = np.zeros(g64.shape) if slot else None
        return float(np.sum(B.batchnorm_train_forward(x64, gamma64, beta64, 1e-3, act, 0.8, t, col0)[0]
                            * g64[..., col0:col0 + c]))

    assert_gradient(dx64, loss, x64, "dx")
    assert_gradient(dgamma64, loss, gamma64, "dgamma")
    with pytest.raises(ValueError, match="derivative in terms of its output"):
        B.batchnorm_train_forward(x, gamma, beta, 1e-5, "hard_swish")


@pytest.mark.parametrize("act", ["relu", "elu"])
def test_batchnorm_train_fused_activation_over_many_blocks(rng, act):
    # 6000 rows: three reduction chunks and three blocks of rows (the last ones partial) in the flat path the
    # backward takes outside a concatenation; against the row-by-row path of the same values in a slot, and
    # against torch autograd of act(batch_norm(x))
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    shape, c = (5, 40, 30, 6), 6
    assert shape[0] * shape[1] * shape[2] > 2 * max(B._ROWS_PER_CHUNK, B.ACT_CHUNK // c)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    y, cache, _, _ = B.batchnorm_train_forward(x, gamma, beta, 1e-5, act, 0.8)
    dx, dgamma, dbeta = B.batchnorm_train_backward(g, cache, gamma, y, act, 0.8)

    wide, g_wide = np.zeros(shape[:3] + (c + 3,), np.float32), np.zeros(shape[:3] + (c + 3,), np.float32)
    _, cache_slot, _, _ = B.batchnorm_train_forward(x, gamma, beta, 1e-5, act, 0.8, wide, 1)
    g_wide[..., 1:1 + c] = g
    dx_slot, dgamma_slot, dbeta_slot = B.batchnorm_train_backward(g_wide, cache_slot, gamma, wide, act, 0.8, 1)
    np.testing.assert_array_equal(dx, dx_slot)
    np.testing.assert_array_equal(dgamma, dgamma_slot)
    np.testing.assert_array_equal(dbeta, dbeta_slot)

    xt, gt, bt = _nchw(torch, x), torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    z = F.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
    (F.relu(z) if act == "relu" else F.elu(z, 0.8)).backward(_nchw(torch, g, grad=False))
    assert_close(dx, _nhwc(xt.grad), TORCH_BWD, "dx")
    assert_close(dgamma, gt.grad.numpy(), TORCH_BWD, "dgamma")
    assert_close(dbeta, bt.grad.numpy(), TORCH_BWD, "dbeta")


def test_batchnorm_inference_gradient(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    scale, shift = rng.standard_normal(5), rng.standard_normal(5)
    g = rng.standard_normal(x.shape)
    dx = B.batchnorm_inference_backward(g, scale)
    assert_gradient(dx, lambda: float(np.sum(B.batchnorm_inference_forward(x, scale, shift) * g)), x, "dx")


@pytest.mark.parametrize("n,f,o", [(1, 1, 1), (3, 4, 5), (2, 6, 1)])
def test_dense_gradient(rng, n, f, o):
    x, w, b = rng.standard_normal((n, f)), rng.standard_normal((f, o)), rng.standard_normal(o)
    g = rng.standard_normal((n, o))
    dx, dw, db = L.dense_backward(g, x, w)

    def loss():
        return float(np.sum(L.dense_forward(x, w, b) * g))

    assert_gradient(dx, loss, x, "dx")
    assert_gradient(dw, loss, w, "dw")
    assert_gradient(db, loss, b, "db")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_gradient(rng, weighted, smoothing):
    z = rng.standard_normal((5, 4)) * 2
    y = np.array([0, 3, 3, 1, 2])
    w = rng.uniform(0.2, 3.0, 4) if weighted else None
    _, grad = L.cross_entropy(z, y, w, smoothing)
    assert_gradient(grad, lambda: L.cross_entropy(z, y, w, smoothing)[0], z, "dlogits")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_gradient(rng, gamma, weighted):
    z = rng.standard_normal((5, 3)) * 2
    z[0, 1] = 6.0  # one confident, correctly classified sample
    y = np.array([1, 0, 2, 2, 1])
    w = rng.uniform(0.2, 3.0, 3) if weighted else None
    _, grad = L.focal_loss(z, y, gamma, w)
    assert_gradient(grad, lambda: L.focal_loss(z, y, gamma, w)[0], z, "dlogits")


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 2, 4)])
def test_scale_channels_gradient(rng, shape):
    x = rng.standard_normal(shape)
    s = rng.uniform(0, 1, (shape[0], shape[3]))
    g = rng.standard_normal(shape)
    dx, ds = C.scale_channels_backward(g, x, s)

    def loss():
        return float(np.sum(C.scale_channels_forward(x, s) * g))

    assert_gradient(dx, loss, x, "dx")
    assert_gradient(ds, loss, s, "ds")


def test_concat_and_add_gradient(rng):
    xs = [rng.standard_normal((2, 3, 2, c)) for c in (1, 3, 2)]
    g = rng.standard_normal((2, 3, 2, 6))
    grads = C.concat_channels_backward(g, [1, 3, 2])
    for i, x in enumerate(xs):
        assert_gradient(grads[i], lambda: float(np.sum(C.concat_channels(xs) * g)), x, f"dx{i}")
    a, b = xs[1], rng.standard_normal(xs[1].shape)
    g2 = rng.standard_normal(a.shape)
    da, db = C.add_backward(g2)
    assert_gradient(da, lambda: float(np.sum(C.add_forward(a, b) * g2)), a, "da")
    assert_gradient(db, lambda: float(np.sum(C.add_forward(a, b) * g2)), b, "db")


def test_dropout_gradient_with_fixed_mask(rng):
    x = rng.standard_normal((2, 3, 3, 2))
    g = rng.standard_normal(x.shape)
    _, mask = L.dropout_forward(x, 0.4, np.random.default_rng(11))
    dx = L.dropout_backward(g, mask)
    # A fresh generator with the same seed per evaluation keeps the mask fixed.
    assert_gradient(dx, lambda: float(np.sum(L.dropout_forward(x, 0.4, np.random.default_rng(11))[0] * g)), x, "dx")
    assert np.any(dx == 0) and np.any(dx != 0)


# =========================================================================== 3. torch parity


TORCH_ACTS = {
    "relu": lambda F, t: F.relu(t),
    "relu6": lambda F, t: F.relu6(t),
    "elu": lambda F, t: F.elu(t, alpha=0.7),
    "sigmoid": lambda F, t: F.sigmoid(t),
    "hard_sigmoid": lambda F, t: F.hardsigmoid(t),
    "hard_swish": lambda F, t: F.hardswish(t),
}


def _nchw(torch, x, grad=True):
    return torch.tensor(np.transpose(x, (0, 3, 1, 2)).copy(), requires_grad=grad)


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("act", sorted(TORCH_ACTS))
def test_activation_torch_parity(rng, act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = spread(rng, (3, 5, 7, 4))  # includes the kinks: the zero pattern must match too
    g = rng.standard_normal(x.shape).astype(np.float32)
    t = torch.tensor(x, requires_grad=True)
    out = TORCH_ACTS[act](F, t)
    out.backward(torch.tensor(g))
    assert_close(A.activation_forward(x, act, 0.7), out.detach().numpy(), TORCH_FWD, "forward")
    assert_close(A.activation_backward(g, x, act, 0.7), t.grad.numpy(), TORCH_BWD, "backward")


@pytest.mark.parametrize("momentum", [0.1, 0.3])
@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (1, 2, 3, 1), (4, 1, 1, 6)])
def test_batchnorm_train_torch_parity(rng, shape, momentum):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)

    xt, gt, bt = _nchw(torch, x), torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    rmt, rvt = torch.tensor(rm), torch.tensor(rv)
    yt = F.batch_norm(xt, rmt, rvt, gt, bt, training=True, momentum=momentum, eps=1e-5)
    yt.backward(_nchw(torch, g, grad=False))

    y, cache, bm, bv = B.batchnorm_train_forward(x, gamma, beta, 1e-5)
    assert_close(y, _nhwc(yt), TORCH_FWD, "y")
    dx, dgamma, dbeta = B.batchnorm_train_backward(g, cache, gamma)
    assert_close(dx, _nhwc(xt.grad), TORCH_BWD, "dx")
    assert_close(dgamma, gt.grad.numpy(), TORCH_BWD, "dgamma")
    assert_close(dbeta, bt.grad.numpy(), TORCH_BWD, "dbeta")
    m = shape[0] * shape[1] * shape[2]
    new_mean, new_var = B.update_running_stats(rm, rv, bm, bv, m, momentum)
    assert_close(new_mean, rmt.numpy(), TORCH_FWD, "running_mean")
    assert_close(new_var, rvt.numpy(), TORCH_FWD, "running_var")


@pytest.mark.parametrize("act", ["none", "relu6", "hard_swish"])
def test_batchnorm_eval_torch_parity(rng, act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c = 6
    x = rng.standard_normal((2, 5, 3, c)).astype(np.float32) * 2
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    xt = _nchw(torch, x)
    pre = F.batch_norm(xt, torch.tensor(rm), torch.tensor(rv), torch.tensor(gamma), torch.tensor(beta),
                       training=False, eps=1e-3)
    out = {"none": lambda t: t, "relu6": F.relu6, "hard_swish": F.hardswish}[act](pre)
    pre.retain_grad()
    out.backward(_nchw(torch, g, grad=False))
    scale, shift = B.fold_batchnorm(gamma, beta, rm, rv, 1e-3)
    assert_close(B.batchnorm_inference_forward(x, scale, shift, act), _nhwc(out), TORCH_FWD, "y")
    # the BN backward takes the gradient w.r.t. its pre-activation output
    dx = B.batchnorm_inference_backward(_nhwc(pre.grad), scale)
    assert_close(dx, _nhwc(xt.grad), TORCH_BWD, "dx")


@pytest.mark.parametrize("act", ["none", "relu", "hard_swish"])
def test_dense_torch_parity(rng, act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((4, 13)).astype(np.float32)
    w = rng.standard_normal((13, 7)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    g = rng.standard_normal((4, 7)).astype(np.float32)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w.T.copy(), b))
    pre = F.linear(xt, wt, bt)
    pre.retain_grad()
    out = {"none": lambda t: t, "relu": F.relu, "hard_swish": F.hardswish}[act](pre)
    out.backward(torch.tensor(g))
    assert_close(L.dense_forward(x, w, b, act), out.detach().numpy(), TORCH_FWD, "y")
    dx, dw, db = L.dense_backward(pre.grad.numpy(), x, w)
    assert_close(dx, xt.grad.numpy(), TORCH_BWD, "dx")
    assert_close(dw, wt.grad.numpy().T, TORCH_BWD, "dw")
    assert_close(db, bt.grad.numpy(), TORCH_BWD, "db")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.15, 1.0])
def test_cross_entropy_torch_parity(rng, weighted, smoothing):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    z = (rng.standard_normal((8, 6)) * 3).astype(np.float32)
    y = rng.integers(0, 6, 8)
    w = rng.uniform(0.1, 4.0, 6).astype(np.float32) if weighted else None
    zt = torch.tensor(z, requires_grad=True)
    lt = F.cross_entropy(zt, torch.tensor(y), weight=None if w is None else torch.tensor(w),
                         label_smoothing=smoothing, reduction="mean")
    lt.backward()
    loss, grad = L.cross_entropy(z, y, w, smoothing)
    assert abs(loss - lt.item()) <= TORCH_FWD * abs(lt.item())
    assert_close(grad, zt.grad.numpy(), TORCH_BWD, "dlogits")


def test_softmax_torch_parity(rng):
    torch = pytest.importorskip("torch")
    z = (rng.standard_normal((5, 1000)) * 4).astype(np.float32)
    assert_close(L.softmax(z), torch.softmax(torch.tensor(z), dim=1).numpy(), TORCH_FWD, "softmax")
    assert_close(L.log_softmax(z), torch.log_softmax(torch.tensor(z), dim=1).numpy(), TORCH_FWD, "log_softmax")


def test_focal_loss_torch_autograd_parity(rng):
    torch = pytest.importorskip("torch")
    z = (rng.standard_normal((6, 5)) * 2).astype(np.float64)
    y = rng.integers(0, 5, 6)
    w = rng.uniform(0.5, 2.0, 5)
    zt = torch.tensor(z, requires_grad=True)
    logp = torch.log_softmax(zt, dim=1)[torch.arange(6), torch.tensor(y)]
    wy = torch.tensor(w)[torch.tensor(y)]
    lt = (-wy * (1 - logp.exp()) ** 2 * logp).sum() / wy.sum()
    lt.backward()
    loss, grad = L.focal_loss(z, y, 2.0, w)
    assert abs(loss - lt.item()) <= 1e-12 * abs(lt.item())
    assert_close(grad, zt.grad.numpy(), 1e-10, "dlogits")
