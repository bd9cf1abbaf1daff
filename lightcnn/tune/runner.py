"""``minimize``: the sequential tuning loop on top of ask/tell, with a resumable trial log.

::

    for each trial until n_calls:
        x = opt.ask();  y = objective(x);  opt.tell(x, y);  log.append(x, y)
        stop if any callback(result) returns True

Resume: with ``log_path`` and ``resume=True`` the trials already in the log are told to a
fresh optimiser with the logged settings (never re-evaluated); because ``ask`` depends only
on the seed and the told data, the run continues with exactly the suggestions an
uninterrupted run would have made.

A hook for command lines: ``describe_space`` (space.py) turns "lr=1e-5:1e-1:log, ..." into
dimensions, and ``minimize(..., log_path=..., resume=...)`` does the rest.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Sequence

from .optimizer import OptimizeResult, Optimizer
from .space import Dimension, Space
from .trial_log import TrialLog, TuneLogError

__all__ = ["minimize", "minimize_parallel", "timed", "NoImprovement", "TimeBudget", "MedianStopping", "StopTrial"]


class NoImprovement:
    """Callback: stop once the best value has not improved for ``n`` consecutive trials.

    An improvement must beat the previous best by more than ``tol`` (absolute).
    """

    def __init__(self, n, tol=0.0):
        if n < 1:
            raise ValueError(f"NoImprovement: n must be at least 1, got {n}")
        self.n, self.tol = int(n), float(tol)

    def __call__(self, res):
        best, since = math.inf, 0
        for y in res.func_vals:
            if math.isfinite(y) and y < best - self.tol:
                best, since = y, 0
            else:
                since += 1
        return since >= self.n


class TimeBudget:
    """Callback: stop once ``seconds`` of wall time have passed since this object was created."""

    def __init__(self, seconds):
        self.seconds, self.start = float(seconds), time.monotonic()

    def __call__(self, res):
        return time.monotonic() - self.start >= self.seconds


class StopTrial(Exception):
    """Raised from inside a trial (e.g. its epoch callback) to end it early; the trial keeps its best so far."""


class MedianStopping:
    """The median stopping rule (Golovin et al. 2017, "Google Vizier", section 3.2.2) on learning curves.

    A running trial whose best value up to epoch e is worse than the median of the earlier trials' best values
    up to epoch e stops there, once it has run ``min_epochs`` epochs and at least ``min_trials`` earlier trials
    reached epoch e (a stopped trial counts for the epochs it ran). ``higher_is_better`` for accuracies.

    The decision depends only on the running trial's curve and the earlier curves, in trial order; a tuning run
    that logs each trial's curve (``add``) and replays the log before continuing makes the same decisions as one
    that never stopped.
    """

    def __init__(self, min_epochs=1, min_trials=3, higher_is_better=True):
        if min_epochs < 1 or min_trials < 1:
            raise ValueError(f"MedianStopping: min_epochs and min_trials must be >= 1, got {min_epochs}, {min_trials}")
        self.min_epochs, self.min_trials, self.higher = int(min_epochs), int(min_trials), bool(higher_is_better)
        self.curves: list[list[float]] = []

    def add(self, curve):
        """Record a finished (or stopped, or failed) trial's per-epoch values."""
        self.curves.append([float(v) for v in curve])

    def _best_to(self, curve, e):
        finite = [v for v in curve[:e + 1] if math.isfinite(v)]
        if not finite:
            return -math.inf if self.higher else math.inf
        return max(finite) if self.higher else min(finite)

    def median_at(self, e):
        """Median of the earlier trials' best values up to 0-based epoch e (None: fewer than min_trials)."""
        values = sorted(self._best_to(c, e) for c in self.curves if len(c) > e)
        if len(values) < self.min_trials:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def should_stop(self, curve):
        """True when the running trial with per-epoch values `curve` (so far) should stop now."""
        e = len(curve) - 1
        if e + 1 < self.min_epochs:
            return False
        median = self.median_at(e)
        if median is None:
            return False
        best = self._best_to(curve, e)
        return best < median if self.higher else best > median


def minimize(objective: Callable[[list], float], space: Sequence[Dimension] | Space, n_calls: int = 30,
             n_initial: int = 10, initial_design: str = "sobol", acquisition: str = "ei", seed: int | None = None,
             callback: Callable[[OptimizeResult], Any] | Sequence[Callable[[OptimizeResult], Any]] | None = None,
             log_path: str | os.PathLike | None = None, resume: bool = False, xi: float = 0.001,
             kappa: float = 1.96, log_extra: Callable[[int, list, float], dict | None] | None = None
             ) -> OptimizeResult:
    """Minimise ``objective(x) -> float`` over ``space`` with GP Bayesian optimisation.

    objective  called with a list of values, one per dimension; may return NaN/inf for a
               failed trial (recorded, and seen by the GP as the worst value so far)
    space      list of Real / Integer / Categorical (or a Space)
    n_calls    total number of trials, counting those replayed from the log
    n_initial  trials taken from the initial design before the GP guides the search
    seed       int for reproducible runs; on resume, None adopts the logged seed
    callback   callable or list of callables ``f(result) -> bool``; True stops the run
    log_path   JSON Lines trial log (see trial_log.py); resume=True continues it, otherwise
               an existing file is an error (it is never overwritten)
    log_extra  log_extra(index, x, y) -> dict of more fields for that trial's log line (a learning curve,
               why it stopped), or None
    initial_design, acquisition, xi, kappa   as for Optimizer

    Returns an OptimizeResult: x, fun, x_iters, func_vals, x_estimated, fun_estimated, ...
    """
    opt, log, callbacks = _start(space, n_initial, initial_design, acquisition, seed, callback, log_path, resume,
                                 xi, kappa)
    while len(opt.x_iters) < n_calls:
        x = opt.ask()
        t0 = time.perf_counter()
        y = float(objective(list(x)))
        seconds = time.perf_counter() - t0
        opt.tell(x, y)
        if log is not None:
            index = len(opt.x_iters) - 1
            log.append(index, x, y, seconds, log_extra(index, x, y) if log_extra else None)
        if callbacks:
            res = opt.result(estimate=False)
            if any([bool(cb(res)) for cb in callbacks]):  # a list: every callback sees every trial
                break
    return opt.result()


def _start(space, n_initial, initial_design, acquisition, seed, callback, log_path, resume, xi, kappa):
    """(Optimizer with the logged trials told, TrialLog or None, list of callbacks) for minimize*."""
    space = Space(space)
    callbacks: list[Callable[[OptimizeResult], Any]]
    if callback is None:
        callbacks = []
    elif isinstance(callback, (list, tuple)):
        callbacks = list(callback)
    else:
        callbacks = [callback]  # type: ignore[list-item]  # one callable
    log = TrialLog(log_path) if log_path is not None else None
    trials = []
    if log is not None and log.exists():
        if not resume:
            raise TuneLogError(f"{log.path}: trial log already exists; pass resume=True to continue it")
        logged, trials = log.read()
        if seed is None:
            seed = logged.get("seed")
    # n_initial is not capped by n_calls: a short run extended later must replay the same design.
    opt = Optimizer(space, n_initial=n_initial, initial_design=initial_design,
                    acquisition=acquisition, xi=xi, kappa=kappa, seed=seed)
    if log is not None:
        settings = json.loads(json.dumps(opt.settings()))  # compare in JSON form (tuples → lists)
        if trials or log.exists():
            diff = [k for k in settings.keys() | logged.keys() if settings.get(k) != logged.get(k)]
            if diff:
                raise TuneLogError(f"{log.path}: logged settings differ in {sorted(diff)}; "
                                   "resume needs the same space and options (or start a new log)")
            for lineno, (x, y, _) in enumerate(trials, start=2):
                try:
                    opt.tell(x, y)
                except ValueError as e:
                    raise TuneLogError(f"{log.path}:{lineno}: {e}") from None
        else:
            log.create(settings)
    return opt, log, callbacks


def timed(objective, x):
    """(objective(x), seconds): what a parallel trial returns (run wherever the executor runs it)."""
    t0 = time.perf_counter()
    return float(objective(list(x))), time.perf_counter() - t0


def minimize_parallel(submit: Callable[[list], Any], space: Sequence[Dimension] | Space, n_calls: int = 30,
                      n_parallel: int = 2, wait: Callable | None = None, n_initial: int = 10,
                      initial_design: str = "sobol", acquisition: str = "ei", seed: int | None = None,
                      callback: Callable[[OptimizeResult], Any] | Sequence[Callable[[OptimizeResult], Any]] | None
                      = None, log_path: str | os.PathLike | None = None, resume: bool = False, xi: float = 0.001,
                      kappa: float = 1.96, on_trial: Callable[[int, list, tuple], Any] | None = None
                      ) -> OptimizeResult:
    """``minimize`` with up to ``n_parallel`` trials in flight (asynchronous constant liar).

    submit     x -> a future whose result() is (y, seconds, ...), e.g.
               ``lambda x: pool.submit(timed, objective, x)`` (concurrent.futures) or a Dask client.submit
    wait       wait(futures, return_when="FIRST_COMPLETED") -> (done, not_done): concurrent.futures.wait
               (default) or distributed.wait
    on_trial   called as on_trial(index, x, result) for each result, in the order results arrive

    Each time a result comes back it is told and logged at once (the log's trial numbers follow arrival), and
    the next point is asked with the points still running as ``pending``: they count at the liar's value (the
    best so far), which pushes the new point away from them. The first n_initial points are the same design
    points as in a sequential run; after that the suggestions differ from a sequential run's (the GP has seen
    fewer real results at each step, and arrival order depends on timing, so a run is not bit-reproducible).
    Resuming replays the logged trials; trials that were running when the run stopped are asked again.
    Other arguments as for ``minimize``.
    """
    import concurrent.futures

    wait = wait or concurrent.futures.wait
    opt, log, callbacks = _start(space, n_initial, initial_design, acquisition, seed, callback, log_path, resume,
                                 xi, kappa)
    running: dict[Any, list] = {}
    stop = False
    while running or (not stop and len(opt.x_iters) < n_calls):
        while not stop and len(running) < n_parallel and len(opt.x_iters) + len(running) < n_calls:
            x = opt.ask(pending=list(running.values()))
            running[submit(list(x))] = x
        done, _ = wait(list(running), return_when="FIRST_COMPLETED")
        # several at once: tell them in the order they were asked (dict order), not in set order
        for future in [f for f in list(running) if f in done]:
            x = running.pop(future)
            result = future.result()
            y, seconds = result[0], result[1]
            opt.tell(x, float(y))
            index = len(opt.x_iters) - 1
            if log is not None:
                log.append(index, x, y, seconds)
            if on_trial is not None:
                on_trial(index, x, result)
            if callbacks and not stop:
                res = opt.result(estimate=False)
                stop = any([bool(cb(res)) for cb in callbacks])
        if stop:
            for future in running:
                future.cancel()
            running.clear()
    return opt.result()
