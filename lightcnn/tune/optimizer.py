"""The ask/tell core: initial design, GP fit, acquisition maximisation, constant-liar batches.

One step of Bayesian optimisation::

    x = opt.ask()          # initial design point, or argmax of the acquisition under the GP
    y = objective(x)       # the expensive part, run by the caller (maybe elsewhere)
    opt.tell(x, y)         # append; nothing else changes

Determinism. ``ask`` is a pure function of (seed, told points): every random stream is
derived from ``np.random.default_rng([seed, stream, n_told, j])`` instead of a generator
that advances with each call. Replaying the same ``tell`` calls therefore rebuilds exactly
the same state — which is all that resuming from a trial log needs — and asking twice
without telling returns the same suggestion.

Failed trials. ``tell(x, nan)`` (or ±inf) records the value as is, but the GP sees the
worst finite value observed so far: the region looks bad, the model stays well-defined.

Parallel trials (constant liar, Ginsbourger et al. 2010). ``ask(n_points=k)`` picks point
j, pretends it has been evaluated with a *lie* L (default: the best value so far, which
pushes the next points elsewhere), refits, and picks point j + 1. ``ask(pending=[...])`` does the same
for points still running when one result comes back (keeping P trials in flight, runner.minimize_parallel).
"""

import math
import warnings

import numpy as np
from scipy.optimize import OptimizeResult as _ScipyResult
from scipy.stats import qmc

from .acquisition import ACQUISITIONS, maximize_acquisition
from .gp import GaussianProcess
from .space import Space

__all__ = ["Optimizer", "OptimizeResult", "design_quantiles"]

DESIGNS = ("sobol", "lhs", "random")
LIARS = ("min", "mean", "max")
# Independent random streams, addressed by the first key after the seed.
_DESIGN, _GP, _ACQ, _FALLBACK = range(4)


class OptimizeResult(_ScipyResult):
    """Outcome of a tuning run, laid out as scikit-optimize users know it.

    x          best observed point (list, one value per dimension)
    fun        its observed objective value
    x_iters    every evaluated point, in order;  func_vals (n,) their values (NaN/inf = failed)
    space      the Space;  seed  the seed that reproduces the run
    x_estimated, fun_estimated, std_estimated
               the evaluated point with the lowest GP posterior mean, that mean and its posterior
               standard deviation — for noisy objectives a better guess than the luckiest draw
               (present when the result was built with ``estimate=True``).
    """


def _qmc_engine(cls, d, rng):
    try:
        return cls(d, scramble=True, rng=rng)
    except TypeError:  # SciPy < 1.15 spells the generator argument `seed`
        return cls(d, scramble=True, seed=rng)


def design_quantiles(kind, n, d, seed):
    """q (n, d) in [0, 1)^d: scrambled Sobol, Latin hypercube or plain uniform points."""
    rng = np.random.default_rng([seed, _DESIGN])
    if n == 0:
        return np.empty((0, d))
    if kind == "sobol":
        # Draw the next power of two and keep the first n: balance is exact only for 2^m
        # points, but a prefix of a scrambled Sobol sequence is still low-discrepancy.
        return _qmc_engine(qmc.Sobol, d, rng).random_base2(math.ceil(math.log2(n)))[:n]
    if kind == "lhs":
        return _qmc_engine(qmc.LatinHypercube, d, rng).random(n)
    if kind == "random":
        return rng.random((n, d))
    raise ValueError(f"unknown initial design {kind!r}; choose one of {DESIGNS}")


class Optimizer:
    """Bayesian optimiser with an ask/tell interface (minimises).

    space          list of Real / Integer / Categorical, or a Space
    n_initial      points from the initial design before the GP takes over
    initial_design 'sobol' (scrambled), 'lhs' (Latin hypercube) or 'random'
    acquisition    'ei' (expected improvement, via ln EI), 'pi', or 'lcb'
    xi             EI/PI margin, in units of the observed standard deviation of y (0.01 did worse
                   than 0.001 on all four problems of bench/tune_benchmark.py)
    kappa          LCB exploration weight
    seed           non-negative int; None draws one (kept in ``self.seed`` and in results)
    liar           constant-liar value for batches: 'min', 'mean' or 'max' of the observed values
    n_candidates, n_restarts   random candidates scored, and how many L-BFGS-B refines
    gp_restarts    random restarts of the marginal-likelihood optimisation
    """

    def __init__(self, space, n_initial=10, initial_design="sobol", acquisition="ei", xi=0.001,
                 kappa=1.96, seed=None, liar="min", n_candidates=1000, n_restarts=5, gp_restarts=3):
        self.space = Space(space)
        if acquisition not in ACQUISITIONS:
            raise ValueError(f"unknown acquisition {acquisition!r}; choose one of {ACQUISITIONS}")
        if initial_design not in DESIGNS:
            raise ValueError(f"unknown initial design {initial_design!r}; choose one of {DESIGNS}")
        if liar not in LIARS:
            raise ValueError(f"unknown liar {liar!r}; choose one of {LIARS}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if int(n_initial) < 1:
            raise ValueError(f"n_initial must be at least 1, got {n_initial}")
        self.seed, self.n_initial = int(seed), int(n_initial)
        self.initial_design, self.acquisition, self.liar = initial_design, acquisition, liar
        self.xi, self.kappa = float(xi), float(kappa)
        self.n_candidates, self.n_restarts, self.gp_restarts = int(n_candidates), int(n_restarts), int(gp_restarts)
        q = design_quantiles(initial_design, self.n_initial, len(self.space), self.seed)
        self._design = self.space.from_quantiles(q)
        self.x_iters, self.func_vals = [], []
        self._cached_gp = None  # (n_told, GaussianProcess) for the told data, reused by ask and result

    def settings(self):
        """Everything that determines the suggestions, as JSON-able values (for trial logs)."""
        return {"seed": self.seed, "space": self.space.to_dicts(), "n_initial": self.n_initial,
                "initial_design": self.initial_design, "acquisition": self.acquisition, "xi": self.xi,
                "kappa": self.kappa, "liar": self.liar, "n_candidates": self.n_candidates,
                "n_restarts": self.n_restarts, "gp_restarts": self.gp_restarts}

    # -- tell ---------------------------------------------------------------------------------
    def tell(self, x, y):
        """Record one result, or several: tell([x1, x2], [y1, y2]). Returns nothing."""
        if np.ndim(y) == 1:
            if len(x) != len(y):
                raise ValueError(f"tell: {len(x)} points but {len(y)} values")
            for point, value in zip(x, y):
                self.tell(point, value)
            return
        point = [v.item() if isinstance(v, np.generic) else v for v in x]
        self.space.validate(point)
        self.x_iters.append(point)
        self.func_vals.append(float(y))

    # -- ask ----------------------------------------------------------------------------------
    def ask(self, n_points=None, pending=None):
        """Next point to evaluate (a list), or a list of ``n_points`` points for parallel trials.

        pending  points handed out earlier whose results are not back yet (asynchronous parallel trials):
                 each gets the liar's value before anything is chosen, and the initial design hands out its
                 first points that are neither told nor pending. With pending=None (the sequential and batch
                 case) the design goes by position, so replaying a log gives the same suggestions.
        """
        k = 1 if n_points is None else int(n_points)
        xs, ys = list(self.x_iters), list(self.func_vals)
        n_told = len(xs)
        for point in pending or ():
            xs.append(list(point))
            ys.append(self._lie(ys))
        offset = len(xs) - n_told
        out = []
        for j in range(k):
            if pending is None:
                i = n_told + j
                point = list(self._design[i]) if i < self.n_initial else None  # a copy: callers may mutate it
            else:
                point = next((list(p) for p in self._design if list(p) not in xs), None)
            if point is None:
                point = self._suggest(xs, ys, n_told, offset + j)
            out.append(point)
            xs.append(point)
            ys.append(self._lie(ys))
        return out[0] if n_points is None else out

    def _lie(self, ys):
        finite = [v for v in ys if math.isfinite(v)]
        if not finite:
            return math.nan
        return {"min": min, "max": max, "mean": lambda v: sum(v) / len(v)}[self.liar](finite)

    def _suggest(self, xs, ys, n_told, j):
        y_gp = _fill_failures(ys)
        if y_gp is None:  # nothing but failures: the GP has nothing to learn from
            return self.space.sample(1, np.random.default_rng([self.seed, _FALLBACK, n_told, j]))[0]
        gp = self._fit(xs, y_gp, n_told, j)
        X = self.space.encode(xs)
        # ξ is given in standardised units so one default suits every objective scale.
        feat, _ = maximize_acquisition(
            gp, self.space, np.random.default_rng([self.seed, _ACQ, n_told, j]), self.acquisition,
            float(np.min(y_gp)), self.xi * gp.y_std_, self.kappa, self.n_candidates, self.n_restarts, exclude=X,
            around=X[np.argsort(y_gp, kind="stable")[:3]])  # local candidates near the 3 best points
        return self.space.decode(feat[None])[0]

    def _fit(self, xs, y_gp, n_told, j):
        if j == 0 and self._cached_gp is not None and self._cached_gp[0] == n_told:
            return self._cached_gp[1]
        gp = GaussianProcess(n_restarts=self.gp_restarts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow probes at extreme θ are expected
            gp.fit(self.space.encode(xs), y_gp, np.random.default_rng([self.seed, _GP, n_told, j]))
        if j == 0:
            self._cached_gp = (n_told, gp)
        return gp

    # -- results ------------------------------------------------------------------------------
    def result(self, estimate=True):
        """OptimizeResult of everything told so far; ``estimate`` adds the GP's best guess."""
        vals = np.array(self.func_vals, dtype=np.float64)
        finite = np.isfinite(vals)
        res = OptimizeResult(x_iters=[list(p) for p in self.x_iters], func_vals=vals, space=self.space,
                             seed=self.seed, n_failed=int(np.sum(~finite)))
        if finite.any():
            best = int(np.flatnonzero(finite)[np.argmin(vals[finite])])
            res.x, res.fun = list(self.x_iters[best]), float(vals[best])
        else:
            res.x, res.fun = None, math.nan
        if estimate and finite.any():
            gp = self._fit(self.x_iters, _fill_failures(self.func_vals), len(self.x_iters), 0)
            mu, sd = gp.predict(self.space.encode(self.x_iters))
            mu = np.where(finite, mu, np.inf)  # never recommend a point that failed
            i = int(np.argmin(mu))
            res.x_estimated, res.fun_estimated, res.std_estimated = list(self.x_iters[i]), float(mu[i]), float(sd[i])
        return res


def _fill_failures(ys):
    """Replace NaN/±inf by the worst finite value; None when no value is finite."""
    ys = np.asarray(ys, dtype=np.float64)
    finite = np.isfinite(ys)
    if not finite.any():
        return None
    return np.where(finite, ys, np.max(ys[finite]))
