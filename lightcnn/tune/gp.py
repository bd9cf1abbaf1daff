"""Gaussian-process regression: constant × Matérn-5/2 (ARD) + noise, on standardised targets.

Model (Rasmussen & Williams, *Gaussian Processes for Machine Learning*, 2006 — "GPML")
    f ~ GP(0, k),   y_i = f(x_i) + ε_i,   ε_i ~ N(0, σ_n²)
on targets standardised to zero mean and unit variance, y ← (y - ȳ) / s_y, so that
one set of hyperparameter bounds fits every objective.

Kernel, for points x, x' (D,) in the unit cube
    r² = Σ_d (x_d - x'_d)² / ℓ_d²                          (one length-scale per dimension: ARD)
    k(x, x') = σ_f² (1 + √5 r + 5r²/3) exp(-√5 r)          (GPML eq. 4.17, ν = 5/2)
Matérn-5/2 gives twice-differentiable sample paths: smooth enough for gradients, rough
enough for real objectives (the squared exponential is unrealistically smooth).

Hyperparameters are optimised in log space, θ = (ln σ_f², ln ℓ_1 … ln ℓ_D, ln σ_n²),
P = D + 2 numbers, by maximising the log marginal likelihood (GPML eq. 2.30)
    log p(y | X, θ) = -½ yᵀ K_y⁻¹ y - ½ ln |K_y| - (n/2) ln 2π,     K_y = K + σ_n² I
whose gradient is (GPML eq. 5.9)
    ∂ log p / ∂θ_j = ½ tr((α αᵀ - K_y⁻¹) ∂K_y/∂θ_j),              α = K_y⁻¹ y
with, writing e = exp(-√5 r) and Δ_d = x_d - x'_d,
    ∂K/∂ln σ_f² = K_f                                  (the signal part of K_y)
    ∂K/∂ln ℓ_d  = σ_f² (5/3) (1 + √5 r) e (Δ_d/ℓ_d)²
    ∂K/∂ln σ_n² = σ_n² I.
L-BFGS-B runs from a default start plus a few random ones; the best optimum wins.

Prediction follows GPML Algorithm 2.1:
    L = cholesky(K_y);  α = Lᵀ \\ (L \\ y);  μ* = k*ᵀ α;  v = L \\ k*;  V[f*] = k(x*, x*) - vᵀ v.
The input gradients used by the acquisition optimiser are
    ∂k(x*, x_i)/∂x*_d = -σ_f² (5/3) (1 + √5 r) e (x*_d - x_id)/ℓ_d²,
    ∂μ*/∂x* = Σ_i α_i ∂k_i/∂x*,      ∂V/∂x* = -2 Σ_i (K_y⁻¹ k*)_i ∂k_i/∂x*.

Duplicate inputs make K singular; the noise term (≥ 1e-8) and ``cholesky_jitter``
(adds escalating diagonal jitter when the factorisation fails) keep it positive definite.
Cost: O(n³ + n² D) per likelihood evaluation; n ≤ a few hundred trials is the design range.
"""

import numpy as np
from scipy.linalg import LinAlgError, cholesky, lapack
from scipy.optimize import minimize as _scipy_minimize

from lightcnn._threads import single_threaded_blas

__all__ = ["matern52", "kernel_with_gradient", "cholesky_jitter", "inverse_factor", "log_marginal_likelihood",
           "GaussianProcess"]

SQRT5 = np.sqrt(5.0)
# Bounds in natural units; the targets are standardised and the inputs live in [0, 1].
SIGNAL_VAR_BOUNDS = (1e-2, 1e2)
LENGTH_SCALE_BOUNDS = (1e-2, 1e2)
NOISE_VAR_BOUNDS = (1e-8, 1.0)


def _scaled_diff(X1, X2, length_scales):
    """Δ/ℓ for every pair: X1 (n1, D), X2 (n2, D) → (n1, n2, D), and r (n1, n2)."""
    d = (X1[:, None, :] - X2[None, :, :]) / length_scales
    return d, np.sqrt(np.sum(d * d, axis=-1))


def matern52(X1, X2, signal_var, length_scales):
    """k(X1, X2): X1 (n1, D), X2 (n2, D) → (n1, n2), the constant × Matérn-5/2 ARD kernel."""
    _, r = _scaled_diff(X1, X2, length_scales)
    return signal_var * (1.0 + SQRT5 * r + 5.0 / 3.0 * r * r) * np.exp(-SQRT5 * r)


def unpack(theta):
    """θ (P,) → (σ_f², ℓ (D,), σ_n²)."""
    theta = np.asarray(theta, dtype=np.float64)
    return np.exp(theta[0]), np.exp(theta[1:-1]), np.exp(theta[-1])


def kernel_with_gradient(X, theta):
    """K_y = K + σ_n² I (n, n) and dK (P, n, n) = ∂K_y/∂θ_j for θ in log space (see module doc)."""
    signal_var, ls, noise_var = unpack(theta)
    d, r = _scaled_diff(X, X, ls)
    e = np.exp(-SQRT5 * r)
    K = signal_var * (1.0 + SQRT5 * r + 5.0 / 3.0 * r * r) * e
    n = X.shape[0]
    dK = np.empty((len(theta), n, n))
    dK[0] = K
    # (5/3)(1 + √5 r) e (Δ_d/ℓ_d)²: no division by r, so duplicates (r = 0) are safe.
    dK[1:-1] = np.moveaxis(signal_var * 5.0 / 3.0 * ((1.0 + SQRT5 * r) * e)[:, :, None] * d * d, -1, 0)
    dK[-1] = noise_var * np.eye(n)
    return K + noise_var * np.eye(n), dK


def cholesky_jitter(A, max_tries=8):
    """Lower Cholesky factor of A (n, n); on failure add jitter 1e-10·mean(diag), ×10 per retry.

    Returns (L, jitter). Raises LinAlgError when even the largest jitter fails.
    """
    try:
        return cholesky(A, lower=True, check_finite=False), 0.0
    except LinAlgError:
        pass
    base = 1e-10 * max(np.mean(np.diag(A)), 1e-300)
    for k in range(max_tries):
        jitter = base * 10.0**k
        try:
            return cholesky(A + jitter * np.eye(len(A)), lower=True, check_finite=False), jitter
        except LinAlgError:
            continue
    raise LinAlgError(f"covariance not positive definite even with jitter {jitter:.1e}")


def inverse_factor(L):
    """L⁻¹ (n, n) of a lower-triangular L, so that K_y⁻¹ = L⁻ᵀ L⁻¹.

    Why an explicit inverse and einsum instead of triangular solves with many right-hand
    sides: OpenBLAS multithreads level-3 calls from tiny sizes on, and on a busy machine its
    spinning threads made every later small call 10-100× slower. Triangular inversion
    (LAPACK trtri) plus einsum/gemv keeps the hot path single-threaded and predictable.
    """
    Linv, info = lapack.dtrtri(L, lower=1)
    if info != 0:
        raise LinAlgError(f"triangular inverse failed (info={info})")
    return Linv


def log_marginal_likelihood(theta, X, y, eval_gradient=False):
    """log p(y | X, θ) (GPML eq. 2.30) and, if asked, its gradient (P,) by GPML eq. 5.9."""
    Ky, dK = kernel_with_gradient(X, theta)
    L, _ = cholesky_jitter(Ky)
    Linv = inverse_factor(L)
    alpha = Linv.T @ (Linv @ y)
    lml = -0.5 * y @ alpha - np.sum(np.log(np.diag(L))) - 0.5 * len(y) * np.log(2.0 * np.pi)
    if not eval_gradient:
        return lml
    W = np.outer(alpha, alpha) - np.einsum("ki,kj->ij", Linv, Linv)  # α αᵀ - K_y⁻¹
    # ½ tr(W dK_j) = ½ Σ_ab W_ab dK_j,ba and both are symmetric.
    return lml, 0.5 * np.einsum("ab,jab->j", W, dK)


def default_bounds(n_dims):
    """L-BFGS-B bounds (P, 2) on θ = (ln σ_f², ln ℓ_1..D, ln σ_n²)."""
    rows = [SIGNAL_VAR_BOUNDS] + [LENGTH_SCALE_BOUNDS] * n_dims + [NOISE_VAR_BOUNDS]
    return np.log(np.array(rows, dtype=np.float64))


class GaussianProcess:
    """GP regressor: ``fit(X, y, rng)`` picks θ by maximum marginal likelihood, ``predict`` is Alg. 2.1.

    X (n, D) features in [0, 1]; y (n,) finite targets. Pass ``theta`` and ``optimize=False``
    to use fixed hyperparameters (as the tests do). Attributes after fit: ``theta_``,
    ``log_marginal_likelihood_``, ``y_mean_``, ``y_std_``, ``jitter_``.
    """

    def __init__(self, theta=None, optimize=True, n_restarts=3):
        self.theta, self.optimize, self.n_restarts = theta, optimize, n_restarts

    def fit(self, X, y, rng=None):
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],) or not np.all(np.isfinite(y)):
            raise ValueError(f"GaussianProcess.fit: need X (n, D) and finite y (n,), got {X.shape}, {y.shape}")
        self.X_ = X
        self.y_mean_ = float(np.mean(y))
        std = float(np.std(y))
        self.y_std_ = std if std > 0 else 1.0  # one point, or all equal: nothing to scale
        z = (y - self.y_mean_) / self.y_std_
        bounds = default_bounds(X.shape[1])
        theta0 = np.array([0.0] + [np.log(0.3)] * X.shape[1] + [np.log(1e-4)]) if self.theta is None \
            else np.asarray(self.theta, dtype=np.float64)
        if self.optimize:
            theta0 = self._optimize(X, z, theta0, bounds, np.random.default_rng(0) if rng is None else rng)
        self.theta_ = theta0
        Ky, _ = kernel_with_gradient(X, theta0)
        self.L_, self.jitter_ = cholesky_jitter(Ky)
        self.Linv_ = inverse_factor(self.L_)
        self.alpha_ = self.Linv_.T @ (self.Linv_ @ z)
        self.log_marginal_likelihood_ = float(log_marginal_likelihood(theta0, X, z))
        return self

    def _optimize(self, X, z, theta0, bounds, rng):
        def neg_lml(theta):
            try:
                lml, grad = log_marginal_likelihood(theta, X, z, eval_gradient=True)
            except LinAlgError:
                return 1e25, np.zeros_like(theta)  # steer L-BFGS-B away, don't crash the run
            return -lml, -grad

        # Random restarts from a plausible sub-box: bounds-wide starts waste iterations
        # in flat regions (ℓ = 100 means "this dimension does not matter").
        starts = [theta0]
        for _ in range(self.n_restarts):
            starts.append(np.concatenate([
                rng.uniform(np.log(0.3), np.log(3.0), 1),
                rng.uniform(np.log(0.05), np.log(2.0), X.shape[1]),
                rng.uniform(np.log(1e-6), np.log(1e-1), 1)]))
        best_theta, best_val = theta0, np.inf
        with single_threaded_blas():  # L-BFGS-B's tiny LAPACK calls: see lightcnn/_threads.py
            for start in starts:
                res = _scipy_minimize(neg_lml, np.clip(start, bounds[:, 0], bounds[:, 1]), jac=True,
                                      method="L-BFGS-B", bounds=bounds, options={"maxiter": 200})
                if np.isfinite(res.fun) and res.fun < best_val:
                    best_theta, best_val = res.x, res.fun
        return best_theta

    def predict(self, Xs, return_std=True, return_grad=False):
        """Posterior of the latent f at Xs (m, D), in the original units of y.

        Returns mu (m,) [, std (m,)] [, dmu (m, D), dstd (m, D)] — gradients w.r.t. Xs.
        """
        Xs = np.atleast_2d(np.asarray(Xs, dtype=np.float64))
        signal_var, ls, _ = unpack(self.theta_)
        d, r = _scaled_diff(Xs, self.X_, ls)
        e = np.exp(-SQRT5 * r)
        Ks = signal_var * (1.0 + SQRT5 * r + 5.0 / 3.0 * r * r) * e          # (m, n)
        mu = Ks @ self.alpha_
        out = [mu * self.y_std_ + self.y_mean_]
        if not (return_std or return_grad):
            return out[0]
        v = np.einsum("ij,mj->mi", self.Linv_, Ks)                           # (m, n) = (L⁻¹ k*)ᵀ
        raw_var = signal_var - np.sum(v * v, axis=1)
        var = np.maximum(raw_var, 1e-12)  # rounding can push the variance at a data point below 0
        std = np.sqrt(var)
        out.append(std * self.y_std_)
        if return_grad:
            # dk/dx* (m, n, D) = -σ_f² (5/3)(1 + √5 r) e (x* - x_i)/ℓ²
            dKs = -signal_var * 5.0 / 3.0 * ((1.0 + SQRT5 * r) * e)[:, :, None] * d / ls
            dmu = np.einsum("mnd,n->md", dKs, self.alpha_)
            Kinv_ks = np.einsum("ji,mj->mi", self.Linv_, v)                       # (m, n) = K_y⁻¹ k*
            dvar = -2.0 * np.einsum("mnd,mn->md", dKs, Kinv_ks)
            dstd = np.where((raw_var > 1e-12)[:, None], dvar / (2.0 * std[:, None]), 0.0)
            out += [dmu * self.y_std_, dstd * self.y_std_]
        return tuple(out)
