"""Bayesian optimiser: GP against textbook formulas, gradients against finite differences,
acquisitions against closed forms, spaces, trial logs and resume, and one quality check.

Tolerances are stated at each check. Finite differences use tests/gradcheck.py
(central, eps = 1e-6, float64: error ~1e-10 relative).
"""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import integrate, stats

from lightcnn.tune import (Categorical, Integer, NoImprovement, Optimizer, Real, Space, TimeBudget,
                           TuneLogError, describe_space, minimize)
from lightcnn.tune.acquisition import (acquisition_score, expected_improvement, log_expected_improvement,
                                       log_h, log_probability_of_improvement, lower_confidence_bound,
                                       probability_of_improvement)
from lightcnn.tune.gp import (GaussianProcess, cholesky_jitter, kernel_with_gradient, log_marginal_likelihood,
                              matern52)

from .gradcheck import assert_gradient


def branin(x):
    """Branin-Hoo on [-5, 10] × [0, 15]; global minimum 0.397887 at three points."""
    x1, x2 = x
    b, c, t = 5.1 / (4 * np.pi**2), 5 / np.pi, 1 / (8 * np.pi)
    return float((x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * np.cos(x1) + 10)


BRANIN_SPACE = [Real(-5.0, 10.0), Real(0.0, 15.0)]


def matern52_naive(x, xp, signal_var, ls):
    """Loop-only twin of the kernel, written from the formula."""
    r = math.sqrt(sum(((a - b) / l) ** 2 for a, b, l in zip(x, xp, ls)))
    return signal_var * (1 + math.sqrt(5) * r + 5 * r * r / 3) * math.exp(-math.sqrt(5) * r)


@pytest.fixture
def data(rng):
    X = rng.random((7, 3))
    y = np.sin(3 * X[:, 0]) + X[:, 1] ** 2 - X[:, 2]
    theta = np.log([1.7, 0.4, 0.9, 0.25, 1e-3])  # σ_f², ℓ_1..3, σ_n²
    return X, y, theta


# -- Gaussian process ------------------------------------------------------------------------

def test_kernel_matches_naive_twin(data, rng):
    X, _, theta = data
    Xs = rng.random((4, 3))
    K = matern52(Xs, X, np.exp(theta[0]), np.exp(theta[1:-1]))
    ref = [[matern52_naive(a, b, np.exp(theta[0]), np.exp(theta[1:-1])) for b in X] for a in Xs]
    np.testing.assert_allclose(K, ref, rtol=1e-13)


def test_posterior_matches_textbook_inverse(data, rng):
    """μ* = K*ᵀ K_y⁻¹ y and V* = k** - K*ᵀ K_y⁻¹ K* with np.linalg.inv (rtol 1e-9)."""
    X, y, theta = data
    Xs = np.vstack([rng.random((5, 3)), X[:2]])  # include training points: variance ≈ noise-level
    gp = GaussianProcess(theta=theta, optimize=False).fit(X, y)
    mu, sd = gp.predict(Xs)

    sf2, ls, sn2 = np.exp(theta[0]), np.exp(theta[1:-1]), np.exp(theta[-1])
    z = (y - y.mean()) / y.std()
    Kinv = np.linalg.inv(matern52(X, X, sf2, ls) + sn2 * np.eye(len(X)))
    Ks = matern52(Xs, X, sf2, ls)
    mu_ref = Ks @ Kinv @ z * y.std() + y.mean()
    var_ref = (sf2 - np.einsum("mi,ij,mj->m", Ks, Kinv, Ks)) * y.var()
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sd**2, var_ref, rtol=1e-7, atol=1e-12)


def test_log_marginal_likelihood_is_gaussian_logpdf(data):
    X, y, theta = data
    Ky, _ = kernel_with_gradient(X, theta)
    ref = stats.multivariate_normal(np.zeros(len(y)), Ky).logpdf(y)
    assert log_marginal_likelihood(theta, X, y) == pytest.approx(ref, rel=1e-10)


def test_kernel_gradient_vs_finite_differences(data):
    """∂K_y/∂θ_j for every log-hyperparameter; rtol 1e-6 (gradcheck defaults)."""
    X, _, theta = data
    theta = theta.copy()
    _, dK = kernel_with_gradient(X, theta)
    g = np.random.default_rng(1).standard_normal((len(X), len(X)))  # fixed upstream gradient
    analytic = np.einsum("ab,jab->j", g, dK)
    assert_gradient(analytic, lambda: np.sum(kernel_with_gradient(X, theta)[0] * g), theta, "dK/dθ")


@pytest.mark.parametrize("theta", [np.log([1.7, 0.4, 0.9, 0.25, 1e-3]),
                                   np.log([0.3, 2.0, 0.05, 1.0, 0.2]),
                                   np.log([5.0, 0.1, 0.1, 0.1, 1e-6])])
def test_lml_gradient_vs_finite_differences(data, theta):
    """GPML eq. 5.9 against central differences; rtol 1e-6, atol 1e-6 (LML is O(10))."""
    X, y, _ = data
    theta = theta.copy()
    _, grad = log_marginal_likelihood(theta, X, y, eval_gradient=True)
    assert_gradient(grad, lambda: log_marginal_likelihood(theta, X, y), theta, "dLML/dθ", atol=1e-6)


def test_predict_input_gradient_vs_finite_differences(data, rng):
    X, y, theta = data
    gp = GaussianProcess(theta=theta, optimize=False).fit(X, y)
    x = rng.random((1, 3))
    _, _, dmu, dsd = gp.predict(x, return_grad=True)
    assert_gradient(dmu, lambda: gp.predict(x)[0][0], x, "dμ/dx")
    assert_gradient(dsd, lambda: gp.predict(x)[1][0], x, "dσ/dx")


def test_fit_improves_marginal_likelihood(data):
    X, y, theta = data
    gp = GaussianProcess(n_restarts=2).fit(X, y, np.random.default_rng(0))
    z = (y - y.mean()) / y.std()
    assert gp.log_marginal_likelihood_ >= log_marginal_likelihood(theta, X, z) - 1e-9
    assert gp.log_marginal_likelihood_ >= log_marginal_likelihood(gp.theta_ * 0 + np.log(0.5), X, z) - 1e-9


def test_duplicate_inputs_do_not_break_cholesky(rng):
    X = np.repeat(rng.random((4, 2)), 3, axis=0)              # every point three times
    y = np.repeat([0.1, 0.5, -0.2, 0.3], 3) + np.tile([0.0, 0.0, 1e-3], 4)
    gp = GaussianProcess(theta=np.log([1.0, 0.5, 0.5, 1e-8]), optimize=False).fit(X, y)
    mu, sd = gp.predict(X)
    assert np.all(np.isfinite(mu)) and np.all(np.isfinite(sd))
    np.testing.assert_allclose(mu, y, atol=2e-3)              # interpolates the duplicate means
    gp = GaussianProcess().fit(X, y, np.random.default_rng(0))  # and the optimised fit survives too
    assert np.isfinite(gp.log_marginal_likelihood_)
    L, jitter = cholesky_jitter(np.ones((3, 3)))               # exactly singular: needs jitter
    assert jitter > 0 and np.all(np.isfinite(L))


# -- acquisition functions -------------------------------------------------------------------

def _ei_by_quadrature(mu, sigma, y_best, xi):
    f = lambda t: max(y_best - xi - t, 0.0) * stats.norm.pdf(t, mu, sigma)
    return integrate.quad(f, mu - 12 * sigma, y_best - xi, epsabs=1e-13, limit=200)[0]


@pytest.mark.parametrize("mu, sigma, y_best, xi", [(0.0, 1.0, 0.0, 0.0), (1.3, 0.4, 0.9, 0.05),
                                                   (-0.5, 2.0, 0.7, 0.0), (2.0, 0.3, 0.0, 0.01)])
def test_ei_pi_lcb_closed_forms(mu, sigma, y_best, xi):
    """EI = E[max(y* - ξ - f, 0)] by quadrature (atol 1e-10); PI = P[f < y* - ξ]; LCB = μ - κσ."""
    ei = expected_improvement(np.array([mu]), np.array([sigma]), y_best, xi)[0]
    assert ei == pytest.approx(_ei_by_quadrature(mu, sigma, y_best, xi), abs=1e-10)
    assert math.exp(log_expected_improvement(np.array([mu]), sigma, y_best, xi)[0]) == pytest.approx(ei, rel=1e-12)
    pi = probability_of_improvement(np.array([mu]), sigma, y_best, xi)[0]
    assert pi == pytest.approx(stats.norm.cdf(y_best - xi, mu, sigma), rel=1e-12)
    assert lower_confidence_bound(mu, sigma, 2.5) == pytest.approx(mu - 2.5 * sigma)


def test_acquisitions_at_known_points():
    # μ = y*: z = 0, EI = σ φ(0) = σ/√(2π), PI = 1/2.
    assert expected_improvement(np.array([1.0]), 2.0, 1.0)[0] == pytest.approx(2.0 / math.sqrt(2 * math.pi))
    assert probability_of_improvement(np.array([1.0]), 2.0, 1.0)[0] == 0.5
    # One σ below y*: z = 1, EI = σ (Φ(1) + φ(1)).
    assert expected_improvement(np.array([0.0]), 1.0, 1.0)[0] == pytest.approx(0.8413447460685429 + 0.24197072451914337)


def test_log_ei_in_the_far_tail_is_finite_and_accurate():
    z = np.array([-5.0, -20.0, -30.0, -39.0, -60.0, -100.0, -100.5, -1e3, -1e5, -1e8, -1e150])
    lh, dlh = log_h(z)
    assert np.all(np.isfinite(lh)) and np.all(np.isfinite(dlh))
    assert np.all(np.diff(lh) < 0)                                  # h is increasing in z
    # Where h is a normal float, compare with the direct formula (rel 1e-9; cancellation ~1e-16 z²).
    direct = np.log(z[:3] * stats.norm.cdf(z[:3]) + stats.norm.pdf(z[:3]))
    np.testing.assert_allclose(lh[:3], direct, rtol=1e-9)
    # EI itself underflows here, ln EI does not:
    assert expected_improvement(np.array([40.0]), 1.0, 0.0)[0] == 0.0
    assert np.isfinite(log_expected_improvement(np.array([40.0]), 1.0, 0.0)[0])
    # Far tail: h(z) = φ(z)/z² (1 - 3/z² + ...), so ln h = -z²/2 - ln√(2π) - 2 ln|z| up to -3/z² (+ rounding).
    far = z[7:]
    limit = -far**2 / 2 - 0.5 * np.log(2 * np.pi) - 2 * np.log(-far)
    assert np.all(np.abs(lh[7:] - limit) <= 3.5 / far**2 + 1e-15 * np.abs(limit))
    # The gradient d ln h/dz = Φ/h → |z| in the tail.
    np.testing.assert_allclose(dlh[7:], -far, rtol=1e-5)


@pytest.mark.parametrize("z0", [-1.0, -100.0])
def test_log_h_is_continuous_across_branches(z0):
    """No jump where the formula switches: the step equals slope × 2e-9 to 1e-10 (slope ≤ 100)."""
    (lo, hi), (g, _) = log_h(np.array([z0 - 1e-9, z0 + 1e-9]))
    assert abs((hi - lo) - g * 2e-9) < 1e-10


@pytest.mark.parametrize("kind", ["ei", "pi", "lcb"])
@pytest.mark.parametrize("mu", [0.3, 4.0, 30.0])  # z = 0.35, -1.5, -11.5: all three log_h branches near
def test_acquisition_score_partials_vs_finite_differences(kind, mu):
    m, s = np.array([mu]), np.array([2.5])
    _, dm, ds = acquisition_score(kind, m, s, 1.0, 0.1, 1.5)
    assert_gradient(dm, lambda: acquisition_score(kind, m, s, 1.0, 0.1, 1.5)[0][0], m, f"{kind} d/dμ")
    assert_gradient(ds, lambda: acquisition_score(kind, m, s, 1.0, 0.1, 1.5)[0][0], s, f"{kind} d/dσ")


def test_log_pi_far_tail_finite():
    lp = log_probability_of_improvement(np.array([1e3]), 1.0, 0.0)
    assert np.isfinite(lp[0]) and lp[0] < -4e5


# -- search space ----------------------------------------------------------------------------

def test_space_round_trip_and_snap():
    space = Space([Real(1e-5, 1e-1, log=True), Integer(1, 1000, log=True), Integer(-3, 3),
                   Categorical(["sgd", "adam", "rmsprop"]), Real(0.5, 0.99)])
    points = [[1e-5, 1, -3, "sgd", 0.5], [1e-1, 1000, 3, "rmsprop", 0.99], [3.3e-3, 37, 0, "adam", 0.7]]
    F = space.encode(points)
    assert F.shape == (3, 1 + 1 + 1 + 3 + 1)
    assert np.all((F >= 0) & (F <= 1))
    back = space.decode(F)
    for p, b in zip(points, back):
        assert b[1:4] == p[1:4]
        np.testing.assert_allclose([b[0], b[4]], [p[0], p[4]], rtol=1e-12)
    np.testing.assert_allclose(F[2, 0], (np.log(3.3e-3) - np.log(1e-5)) / (np.log(1e-1) - np.log(1e-5)))
    # Snapping: a perturbed feature vector lands on a valid point, and snap is idempotent.
    G = np.clip(F + np.random.default_rng(0).normal(0, 0.05, F.shape), 0, 1)
    S = space.snap(G)
    np.testing.assert_array_equal(space.snap(S), S)
    assert set(S[:, 3:6].ravel()) <= {0.0, 1.0} and np.all(S[:, 3:6].sum(axis=1) == 1)
    assert all(float(v).is_integer() for v in space.decode(S)[0][1:3])


def test_space_sampling_reaches_every_value():
    space = Space([Integer(2, 5), Integer(1, 64, log=True), Categorical([16, 32, 64])])
    pts = space.sample(2000, np.random.default_rng(0))
    assert {p[0] for p in pts} == {2, 3, 4, 5}
    assert {p[2] for p in pts} == {16, 32, 64}
    assert min(p[1] for p in pts) == 1 and max(p[1] for p in pts) == 64


def test_describe_space():
    names, dims = describe_space("lr=1e-5:1e-1:log, momentum=0.5:0.99, batch=16|32|64|100, l2=1e-12:1e-3:log,"
                                 " epochs=5:50, opt=sgd|adam")
    assert names == ["lr", "momentum", "batch", "l2", "epochs", "opt"]
    assert isinstance(dims[0], Real) and dims[0].log and dims[0].low == 1e-5
    assert isinstance(dims[1], Real) and not dims[1].log
    assert isinstance(dims[2], Categorical) and dims[2].choices == [16, 32, 64, 100]
    assert isinstance(dims[4], Integer) and (dims[4].low, dims[4].high) == (5, 50)
    assert dims[5].choices == ["sgd", "adam"]


@pytest.mark.parametrize("text, message", [
    ("", "empty description"), ("lr=1e-5:1e-1:log,", "stray comma"), ("lr", "expected name="),
    ("lr=0.1:0.01", "low < high"), ("lr=0:1e-1:log", "log scale needs low > 0"), ("lr=1e-5:x", "not a number"),
    ("lr=1e-5:1e-1:ln", "scale must be"), ("a=1|2, a=3|4", "duplicate name"), ("b=16", "expected a range"),
    ("b=16|", "empty choice"), ("b=16|16", "distinct"), ("2x=1:2", "identifier"), ("lr=1:2:3:4", "low:high"),
])
def test_describe_space_errors(text, message):
    with pytest.raises(ValueError, match=message):
        describe_space(text)


# -- ask / tell, batches, failures, callbacks --------------------------------------------------

MIXED_SPACE = [Real(1e-4, 1.0, log=True, name="lr"), Integer(1, 64, log=True, name="width"),
               Categorical(["a", "b", "c"], name="kind"), Real(-1.0, 1.0, name="shift")]


def mixed_objective(x):
    lr, width, kind, shift = x
    return (math.log10(lr) + 2) ** 2 + (math.log2(width) - 3) ** 2 / 4 + {"a": 0.5, "b": 0.0, "c": 1.0}[kind] + shift**2


def test_ask_is_pure_and_batches_are_distinct():
    opt = Optimizer(MIXED_SPACE, n_initial=4, seed=5)
    for x in opt.ask(4):
        opt.tell(x, mixed_objective(x))
    a, b = opt.ask(), opt.ask()
    assert a == b                                      # asking does not advance any state
    batch = opt.ask(n_points=3)
    assert batch[0] == a                               # first batch point = the single suggestion
    F = opt.space.encode(batch + opt.x_iters)
    assert len({tuple(r) for r in F}) == len(F)        # constant liar spreads the batch out


@pytest.mark.parametrize("acquisition, design", [("ei", "sobol"), ("pi", "lhs"), ("lcb", "random")])
def test_every_acquisition_and_design_runs_deterministically(acquisition, design):
    kw = dict(n_calls=12, n_initial=5, acquisition=acquisition, initial_design=design, seed=3)
    a, b = minimize(mixed_objective, MIXED_SPACE, **kw), minimize(mixed_objective, MIXED_SPACE, **kw)
    assert a.x_iters == b.x_iters
    assert len({tuple(map(str, p)) for p in a.x_iters}) == 12  # no point suggested twice
    assert a.fun < min(a.func_vals[:5])                        # the model phase improved on the design


def test_tell_validates_points():
    opt = Optimizer(MIXED_SPACE, seed=0)
    with pytest.raises(ValueError, match="'kind'"):
        opt.tell([0.1, 4, "z", 0.0], 1.0)
    with pytest.raises(ValueError, match="'width'"):
        opt.tell([0.1, 100, "a", 0.0], 1.0)


def test_failed_trials_are_recorded_and_skipped_around():
    def objective(x):
        return math.nan if x[0] > 5 else branin(x)   # half of the domain "crashes"
    res = minimize(objective, BRANIN_SPACE, n_calls=15, n_initial=6, seed=1)
    assert len(res.func_vals) == 15 and res.n_failed >= 1
    assert math.isfinite(res.fun) and res.x[0] <= 5
    assert math.isfinite(res.fun_estimated) and res.x_estimated[0] <= 5


def test_callbacks_stop_early():
    res = minimize(lambda x: 1.0, BRANIN_SPACE, n_calls=30, n_initial=5, seed=0, callback=NoImprovement(4))
    assert len(res.func_vals) == 5                      # best set at trial 1, then 4 without improvement
    res = minimize(branin, BRANIN_SPACE, n_calls=30, seed=0, callback=[TimeBudget(0.0)])
    assert len(res.func_vals) == 1


# -- trial log and resume --------------------------------------------------------------------

def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Interrupt after k = 9 trials, resume: same remaining suggestions, nothing re-evaluated."""
    full = minimize(mixed_objective, MIXED_SPACE, n_calls=16, n_initial=6, seed=11)

    log = tmp_path / "trials.jsonl"
    calls = []

    def crashing(x):
        if len(calls) == 9:
            raise KeyboardInterrupt  # the process dies during trial 10
        calls.append(x)
        return mixed_objective(x)

    with pytest.raises(KeyboardInterrupt):
        minimize(crashing, MIXED_SPACE, n_calls=16, n_initial=6, seed=11, log_path=log)
    assert len(log.read_text().splitlines()) == 1 + 9  # header + 9 finished trials

    calls.clear()
    resumed = minimize(lambda x: calls.append(x) or mixed_objective(x), MIXED_SPACE, n_calls=16, n_initial=6,
                       log_path=log, resume=True)  # seed=None: adopted from the log
    assert len(calls) == 16 - 9                      # no trial evaluated twice
    assert calls == full.x_iters[9:]                 # exactly the remaining suggestions
    assert resumed.x_iters == full.x_iters
    np.testing.assert_array_equal(resumed.func_vals, full.func_vals)
    assert resumed.fun == full.fun and resumed.fun_estimated == full.fun_estimated


def test_a_finished_short_run_can_be_extended(tmp_path):
    """Run 4 trials (fewer than n_initial), then ask for 10 in total: same as 10 in one go."""
    log = tmp_path / "t.jsonl"
    minimize(branin, BRANIN_SPACE, n_calls=4, n_initial=6, seed=8, log_path=log)
    extended = minimize(branin, BRANIN_SPACE, n_calls=10, n_initial=6, log_path=log, resume=True)
    assert extended.x_iters == minimize(branin, BRANIN_SPACE, n_calls=10, n_initial=6, seed=8).x_iters


def test_log_records_failures_and_is_plain_json(tmp_path):
    log = tmp_path / "t.jsonl"
    minimize(lambda x: math.inf if x[0] < 0 else branin(x), BRANIN_SPACE, n_calls=6, n_initial=6, seed=2,
             log_path=log)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["format"] == "lightcnn.tune.log/1" and records[0]["settings"]["seed"] == 2
    assert [r["trial"] for r in records[1:]] == list(range(6))
    assert any(r["y"] == "inf" for r in records[1:])


def test_truncated_last_line_is_reported_and_repaired(tmp_path):
    log = tmp_path / "t.jsonl"
    minimize(branin, BRANIN_SPACE, n_calls=5, n_initial=3, seed=4, log_path=log)
    with open(log, "a") as f:
        f.write('{"trial": 5, "x": [1.0, ')           # a crash in the middle of a write
    with pytest.warns(RuntimeWarning, match=r"t\.jsonl:7: ignoring incomplete last record"):
        res = minimize(branin, BRANIN_SPACE, n_calls=7, n_initial=3, seed=4, log_path=log, resume=True)
    assert len(res.func_vals) == 7
    lines = log.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line) for line in lines)


def test_damaged_or_foreign_logs_are_refused(tmp_path):
    log = tmp_path / "t.jsonl"
    minimize(branin, BRANIN_SPACE, n_calls=4, n_initial=3, seed=4, log_path=log)
    with pytest.raises(TuneLogError, match="already exists"):
        minimize(branin, BRANIN_SPACE, n_calls=5, seed=4, log_path=log)
    with pytest.raises(TuneLogError, match=r"differ in \['seed'\]"):
        minimize(branin, BRANIN_SPACE, n_calls=5, n_initial=3, seed=5, log_path=log, resume=True)
    with pytest.raises(TuneLogError, match="differ in.*space"):
        minimize(branin, [Real(-5.0, 10.0), Real(0.0, 16.0)], n_calls=5, n_initial=3, seed=4, log_path=log,
                 resume=True)
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:-3]                           # damage a record that is not the last one
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(TuneLogError, match=r"t\.jsonl:3: not a valid JSON record"):
        minimize(branin, BRANIN_SPACE, n_calls=5, n_initial=3, seed=4, log_path=log, resume=True)


# -- optimisation quality --------------------------------------------------------------------

def test_beats_random_search_on_branin():
    """5 seeds × 25 evaluations: GP-EI median best must be < 0.6 (optimum 0.398) and less than
    half of random search's median best. (Measured at seeds 0-4: GP 0.413, random 1.65.)"""
    gp_best, random_best = [], []
    for seed in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the run itself must be warning-free
            res = minimize(branin, BRANIN_SPACE, n_calls=25, n_initial=8, seed=seed)
        gp_best.append(res.fun)
        rng = np.random.default_rng(1000 + seed)
        random_best.append(min(branin(p) for p in Space(BRANIN_SPACE).sample(25, rng)))
    gp_med, rnd_med = np.median(gp_best), np.median(random_best)
    assert gp_med < 0.6, f"GP median best {gp_med:.3f} (all: {np.round(gp_best, 3)})"
    assert gp_med < 0.5 * rnd_med, f"GP median {gp_med:.3f} vs random median {rnd_med:.3f}"
