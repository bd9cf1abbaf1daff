"""Acquisition functions for minimisation, and their maximisation over the search space.

Given the GP posterior μ(x), σ(x) and the best value observed so far y*, with a margin
ξ ≥ 0 that asks for a real improvement, let

    z = (y* - ξ - μ) / σ,    φ = standard normal pdf,    Φ = its cdf.

=========================  =====================================  =============================
acquisition                formula                                score maximised here
=========================  =====================================  =============================
expected improvement (EI)  E[max(y* - ξ - f, 0)] = σ h(z),        ln EI = ln σ + ln h(z)
                           h(z) = z Φ(z) + φ(z)
probability of impr. (PI)  P[f < y* - ξ] = Φ(z)                   ln Φ(z)
lower confidence bound     LCB = μ - κ σ                          -LCB
=========================  =====================================  =============================

EI underflows to 0 a few σ away from the incumbent (h(-40) ≈ 1e-350), which leaves an
optimiser with nothing to climb; we therefore work with ln h(z) (Ament et al., 2023,
"Unexpected improvements to expected improvement"):

- z > -1:        ln h(z) directly;
- -100 ≤ z ≤ -1: h = φ(z) (1 + z M(z)) with the Mills ratio M(z) = Φ(z)/φ(z) = √(π/2) erfcx(-z/√2),
                 so ln h = ln φ(z) + log1p(z M(z)) (relative rounding ≤ 1e-16 z² ≤ 1e-12);
- z < -100:      1 + z M(z) = z⁻² - 3 z⁻⁴ + 15 z⁻⁶ - 105 z⁻⁸ + … (asymptotic series, error < 1e-15).

Derivatives used by L-BFGS-B: d ln h/dz = Φ(z)/h(z) (since h'(z) = Φ(z)), d ln Φ/dz = φ/Φ,
dz/dμ = -1/σ, dz/dσ = -z/σ.

``maximize_acquisition`` scores many random candidates (cheap, vectorised, covers the
discrete dimensions), then refines the best few by L-BFGS-B over the Real feature columns
only, with analytic gradients through the GP posterior; discrete columns stay fixed.
"""

import numpy as np
from scipy.optimize import minimize as _scipy_minimize
from scipy.special import erfcx, log_ndtr, ndtr

from lightcnn._threads import single_threaded_blas

__all__ = ["expected_improvement", "log_expected_improvement", "probability_of_improvement",
           "log_probability_of_improvement", "lower_confidence_bound", "acquisition_score",
           "maximize_acquisition", "ACQUISITIONS"]

ACQUISITIONS = ("ei", "pi", "lcb")
_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def _log_phi(z):
    return -0.5 * z * z - _LOG_SQRT_2PI


def log_h(z):
    """ln(z Φ(z) + φ(z)) for z (m,), finite for every finite z, and d ln h / dz (m,)."""
    z = np.asarray(z, dtype=np.float64)
    out, dout = np.empty_like(z), np.empty_like(z)
    mid, tail = (z <= -1) & (z >= -100), z < -100
    top = ~(mid | tail)
    zt = z[top]
    ht = zt * ndtr(zt) + np.exp(_log_phi(zt))
    out[top], dout[top] = np.log(ht), ndtr(zt) / ht
    zm = z[mid]
    mills = np.sqrt(np.pi / 2.0) * erfcx(-zm / np.sqrt(2.0))
    w = 1.0 + zm * mills
    out[mid], dout[mid] = _log_phi(zm) + np.log1p(zm * mills), mills / w
    zt = z[tail]
    inv2 = 1.0 / (zt * zt)
    w = inv2 * (1.0 - 3.0 * inv2 + 15.0 * inv2**2 - 105.0 * inv2**3)
    mills = np.sqrt(np.pi / 2.0) * erfcx(-zt / np.sqrt(2.0))
    out[tail], dout[tail] = _log_phi(zt) + np.log(w), mills / w
    return out, dout


def expected_improvement(mu, sigma, y_best, xi=0.0):
    """EI (m,) = σ h(z); underflows to 0 far from y* — use log_expected_improvement there."""
    z = (y_best - xi - mu) / sigma
    return sigma * (z * ndtr(z) + np.exp(_log_phi(z)))


def log_expected_improvement(mu, sigma, y_best, xi=0.0):
    """ln EI (m,) = ln σ + ln h(z), finite where EI itself underflows."""
    z = (y_best - xi - np.asarray(mu, dtype=np.float64)) / sigma
    return np.log(sigma) + log_h(z)[0]


def probability_of_improvement(mu, sigma, y_best, xi=0.0):
    """PI (m,) = Φ(z)."""
    return ndtr((y_best - xi - mu) / sigma)


def log_probability_of_improvement(mu, sigma, y_best, xi=0.0):
    """ln PI (m,) = ln Φ(z), via scipy.special.log_ndtr (finite in the far tail)."""
    return log_ndtr((y_best - xi - mu) / sigma)


def lower_confidence_bound(mu, sigma, kappa=1.96):
    """LCB (m,) = μ - κ σ: optimistic value of the objective; smaller is more promising."""
    return mu - kappa * sigma


def acquisition_score(kind, mu, sigma, y_best, xi=0.0, kappa=1.96):
    """Score to *maximise* (m,) and its partials d/dμ (m,), d/dσ (m,).

    kind 'ei' → ln EI, 'pi' → ln PI, 'lcb' → -LCB (see the module table).
    """
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if kind == "lcb":
        return -(mu - kappa * sigma), -np.ones_like(mu), np.full_like(mu, kappa)
    z = (y_best - xi - mu) / sigma
    if kind == "ei":
        lh, g = log_h(z)
        return np.log(sigma) + lh, -g / sigma, 1.0 / sigma - g * z / sigma
    if kind == "pi":
        lp = log_ndtr(z)
        g = np.exp(_log_phi(z) - lp)
        return lp, -g / sigma, -g * z / sigma
    raise ValueError(f"unknown acquisition {kind!r}; choose one of {ACQUISITIONS}")


def maximize_acquisition(gp, space, rng, kind, y_best, xi=0.0, kappa=1.96,
                         n_candidates=1000, n_restarts=5, exclude=None, around=None):
    """Best feature vector (D,) for the next trial, and its score.

    gp: a fitted GaussianProcess; space: the Space; rng: np.random.Generator;
    exclude: features (k, D) of points already evaluated or pending, never returned again
    (a repeated point teaches a noise-free GP nothing);
    around: features (b, D) of the best points so far — a quarter of the candidates are
    drawn near them (N(0, 0.05²) steps in the Real columns), where EI's peaks usually are.
    """
    cand = space.encode(space.sample(n_candidates, rng))                    # (m, D), snapped
    if around is not None and len(around) and space.continuous.any():
        local = around[rng.integers(len(around), size=n_candidates // 4)]
        local[:, space.continuous] += rng.normal(0.0, 0.05, (len(local), int(space.continuous.sum())))
        cand = np.vstack([cand, space.snap(np.clip(local, 0.0, 1.0))])
    mu, sd = gp.predict(cand)
    score = acquisition_score(kind, mu, sd, y_best, xi, kappa)[0]
    cont = np.flatnonzero(space.continuous)
    order = np.argsort(-score, kind="stable")
    results = [(score[i], cand[i]) for i in order[: 4 * n_restarts]]
    if cont.size:
        for i in order[:n_restarts]:
            x0 = cand[i].copy()

            def negative(u, x0=x0):
                x = x0.copy()
                x[cont] = u
                m, s, dm, ds = gp.predict(x[None], return_grad=True)
                val, dval_dm, dval_ds = acquisition_score(kind, m, s, y_best, xi, kappa)
                grad = dval_dm[:, None] * dm + dval_ds[:, None] * ds
                return -val[0], -grad[0, cont]

            with single_threaded_blas():  # L-BFGS-B's tiny LAPACK calls: see lightcnn/_threads.py
                res = _scipy_minimize(negative, x0[cont], jac=True, method="L-BFGS-B",
                                      bounds=[(0.0, 1.0)] * cont.size, options={"maxiter": 100})
            x = x0.copy()
            x[cont] = res.x
            x = space.snap(x[None])[0]
            results.append((-float(negative(x[cont])[0]), x))
    results.sort(key=lambda t: -t[0])
    for s, x in results:
        if exclude is None or len(exclude) == 0 or np.min(np.max(np.abs(exclude - x), axis=1)) > 1e-9:
            return x, s
    # Every good candidate is taken (a small, fully discrete space): fall back to an unseen random one.
    for i in order:
        if np.min(np.max(np.abs(exclude - cand[i]), axis=1)) > 1e-9:
            return cand[i], score[i]
    return cand[order[0]], score[order[0]]
