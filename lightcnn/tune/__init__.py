"""Bayesian optimisation of hyperparameters with a Gaussian process, on NumPy and SciPy only.

::

    from lightcnn.tune import Real, Integer, Categorical, minimize, NoImprovement

    space = [Real(1e-5, 1e-1, log=True, name="lr"), Real(0.5, 0.99, name="momentum"),
             Categorical([16, 32, 64], name="batch")]
    res = minimize(lambda x: validation_loss(*x), space, n_calls=30, seed=0,
                   log_path="tune.jsonl", resume=True, callback=NoImprovement(10))
    res.x, res.fun, res.x_estimated, res.fun_estimated

How it works, one module each:

- space.py        dimensions and their encoding into the unit cube; ``describe_space`` parser
- gp.py           GP regression: Matérn-5/2 ARD kernel, log marginal likelihood and its
                  gradient (GPML eq. 2.30, 5.9), posterior by GPML Algorithm 2.1
- acquisition.py  EI (in log space), PI, LCB; candidates + L-BFGS-B maximisation
- optimizer.py    ``Optimizer.ask()/tell()``: initial design (Sobol/LHS), constant-liar batches
- trial_log.py    append-only JSON Lines log, crash-tolerant
- runner.py       ``minimize`` loop, ``minimize_parallel`` (P trials in flight), resume, callbacks ``NoImprovement`` and ``TimeBudget``,
                  the median stopping rule ``MedianStopping`` for trials with learning curves
- lightcnn/_threads.py: single-threaded BLAS around L-BFGS-B (SciPy ≥ 1.15 slowdown, see there)
"""

from .optimizer import OptimizeResult, Optimizer
from .runner import MedianStopping, NoImprovement, StopTrial, TimeBudget, minimize, minimize_parallel, timed
from .space import Categorical, Integer, Real, Space, describe_space
from .trial_log import TuneLogError

__all__ = ["Real", "Integer", "Categorical", "Space", "describe_space", "Optimizer", "OptimizeResult",
           "minimize", "minimize_parallel", "timed", "NoImprovement", "TimeBudget", "MedianStopping", "StopTrial",
           "TuneLogError"]
