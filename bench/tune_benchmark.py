"""Benchmark lightcnn.tune against random search, Sobol search and scikit-optimize.

Not run in CI (several minutes). Usage::

    python bench/tune_benchmark.py                 # 20 seeds × 30 evaluations, all problems
    python bench/tune_benchmark.py --seeds 5 --problems branin camel

Problems (minimum in brackets): Branin on [-5,10]×[0,15] (0.397887); six-hump camel on
[-3,3]×[-2,2] (-1.031628); Hartmann-6 on [0,1]^6 (-3.322368); noisy Branin, Branin plus
N(0, 1) noise per evaluation. For the noisy problem every method is scored by the *true*
(noise-free) value at the point it would return — the best observed one — and lightcnn's GP
is also scored at ``x_estimated`` (lowest posterior mean among the evaluated points).

Methods: GP-EI (lightcnn.tune.minimize, 10 initial Sobol points), uniform random search,
scrambled Sobol search, and skopt.gp_minimize (10 initial points, its default acquisition)
when scikit-optimize is importable (``pip install scikit-optimize``; optional extra only).

Prints one markdown table: median and interquartile range of the best value over seeds, and
the median wall time of one run.

OPENBLAS_NUM_THREADS is set to 1 before NumPy loads, so that SciPy's L-BFGS-B (used by both
GP libraries) is not slowed down by BLAS threads and the wall times compare the algorithms.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import qmc  # noqa: E402

from lightcnn.tune import Real, Space, minimize  # noqa: E402


def branin(x):
    x1, x2 = x
    b, c, t = 5.1 / (4 * np.pi**2), 5 / np.pi, 1 / (8 * np.pi)
    return float((x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * np.cos(x1) + 10)


def camel(x):
    x1, x2 = x
    return float((4 - 2.1 * x1**2 + x1**4 / 3) * x1**2 + x1 * x2 + (-4 + 4 * x2**2) * x2**2)


_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                 [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
_H_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                        [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])


def hartmann6(x):
    x = np.asarray(x, dtype=np.float64)
    return float(-_H_ALPHA @ np.exp(-np.sum(_H_A * (x - _H_P) ** 2, axis=1)))


# name: (true function, bounds, noise sd, known minimum)
PROBLEMS = {
    "branin": (branin, [(-5.0, 10.0), (0.0, 15.0)], 0.0, 0.397887),
    "camel": (camel, [(-3.0, 3.0), (-2.0, 2.0)], 0.0, -1.031628),
    "hartmann6": (hartmann6, [(0.0, 1.0)] * 6, 0.0, -3.322368),
    "noisy_branin": (branin, [(-5.0, 10.0), (0.0, 15.0)], 1.0, 0.397887),
}


def noisy(f, sd, seed):
    """The objective the optimiser sees: f plus fresh N(0, sd²) noise at every call."""
    rng = np.random.default_rng([seed, 77])
    return (lambda x: f(x) + sd * rng.standard_normal()) if sd > 0 else f


def run_gp(f, bounds, sd, seed, calls):
    res = minimize(noisy(f, sd, seed), [Real(lo, hi) for lo, hi in bounds], n_calls=calls, n_initial=10, seed=seed)
    out = {"GP-EI (lightcnn)": f(res.x)}
    if sd > 0:
        out["GP-EI, x_estimated"] = f(res.x_estimated)
    return out


def run_points(f, sd, seed, points):
    obj = noisy(f, sd, seed)
    ys = [obj(p) for p in points]
    return f(points[int(np.argmin(ys))])


def run_random(f, bounds, sd, seed, calls):
    space = Space([Real(lo, hi) for lo, hi in bounds])
    return {"random": run_points(f, sd, seed, space.sample(calls, np.random.default_rng([seed, 1])))}


def run_sobol(f, bounds, sd, seed, calls):
    lo, hi = np.array(bounds).T
    try:
        engine = qmc.Sobol(len(bounds), scramble=True, rng=np.random.default_rng([seed, 2]))
    except TypeError:
        engine = qmc.Sobol(len(bounds), scramble=True, seed=np.random.default_rng([seed, 2]))
    q = engine.random_base2(int(np.ceil(np.log2(calls))))[:calls]
    return {"Sobol": run_points(f, sd, seed, list(lo + q * (hi - lo)))}


def run_skopt(f, bounds, sd, seed, calls):
    from skopt import gp_minimize

    res = gp_minimize(noisy(f, sd, seed), bounds, n_calls=calls, n_initial_points=10, random_state=seed)
    return {"skopt gp_minimize": f(res.x)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--no-skopt", action="store_true", help="skip scikit-optimize even if installed")
    args = ap.parse_args()

    runners = [run_gp, run_random, run_sobol]
    try:
        import skopt  # noqa: F401

        if not args.no_skopt:
            runners.append(run_skopt)
    except ImportError:
        print("scikit-optimize not importable: skipping it (pip install scikit-optimize)")

    print(f"{args.seeds} seeds × {args.calls} evaluations; best value found (true, noise-free)\n")
    print("| problem (minimum) | method | median best | IQR (q25 – q75) | median time / run |")
    print("|---|---|---:|---:|---:|")
    for name in args.problems:
        f, bounds, sd, fmin = PROBLEMS[name]
        best, times = {}, {}
        for runner in runners:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # skopt warns about repeated points
                    out = runner(f, bounds, sd, seed, args.calls)
                dt = time.perf_counter() - t0
                for method, value in out.items():
                    best.setdefault(method, []).append(value)
                    times.setdefault(method, []).append(dt)
        for method, values in best.items():
            q25, q50, q75 = np.percentile(values, [25, 50, 75])
            print(f"| {name} ({fmin:g}) | {method} | {q50:.4f} | {q25:.4f} – {q75:.4f} | "
                  f"{np.median(times[method]):.2f} s |", flush=True)


if __name__ == "__main__":
    main()
