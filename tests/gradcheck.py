"""Float64 central-difference gradient checks that assert.

Usage: build a scalar loss L(params) = sum(forward(...) * g) with a fixed random
upstream gradient g; the analytic gradient from the backward kernel must equal
the numeric one. Kernels are called on float64 arrays (Numba specialises on
dtype), so the check is not drowned in float32 rounding.

Tolerance: max |analytic - numeric| <= ATOL + RTOL * max |numeric|, with
eps = 1e-6 the central-difference error is O(eps^2) ~ 1e-12 and rounding
O(1e-16 / eps) ~ 1e-10, so 1e-6 relative is tight yet never flaky.
"""

import numpy as np

EPS = 1e-6
RTOL = 1e-6
ATOL = 1e-8


def numeric_gradient(loss_fn, array, eps=EPS):
    """d loss_fn() / d array by central differences, perturbing `array` in place."""
    grad = np.zeros_like(array, dtype=np.float64)
    flat = array.reshape(-1)
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = loss_fn()
        flat[i] = old - eps
        minus = loss_fn()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def assert_gradient(analytic, loss_fn, array, name="", rtol=RTOL, atol=ATOL):
    """Assert that `analytic` equals the numeric gradient of loss_fn w.r.t. `array`."""
    numeric = numeric_gradient(loss_fn, array)
    analytic = np.asarray(analytic, dtype=np.float64)
    assert analytic.shape == numeric.shape, f"{name}: gradient shape {analytic.shape} != {numeric.shape}"
    err = np.max(np.abs(analytic - numeric)) if numeric.size else 0.0
    scale = np.max(np.abs(numeric)) if numeric.size else 0.0
    assert err <= atol + rtol * scale, f"{name}: max abs error {err:.3e} (gradient scale {scale:.3e})"
    return err / max(scale, 1e-30)


def assert_gradient_sampled(analytic, loss_fn, array, rng, samples=12, name="", rtol=1e-5, atol=1e-8, eps=EPS):
    """Like assert_gradient, on `samples` random entries of a large array (whole-network checks)."""
    flat = array.reshape(-1)
    idx = rng.choice(flat.size, size=min(samples, flat.size), replace=False)
    analytic = np.asarray(analytic, dtype=np.float64).reshape(-1)
    numeric = np.empty(idx.size)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        plus = loss_fn()
        flat[i] = old - eps
        minus = loss_fn()
        flat[i] = old
        numeric[j] = (plus - minus) / (2 * eps)
    err = np.max(np.abs(analytic[idx] - numeric))
    scale = max(np.max(np.abs(numeric)), np.max(np.abs(analytic[idx])))
    assert err <= atol + rtol * scale, f"{name}: max abs error {err:.3e} (gradient scale {scale:.3e})"
    return err / max(scale, 1e-30)
