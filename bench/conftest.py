"""Shared fixtures of the benchmark suite (pytest-benchmark).

    python -m pytest bench/ --benchmark-enable                 # everything (several minutes)
    python -m pytest bench/ --benchmark-enable -k pointwise    # one group

`python -m pytest` alone never collects this folder (pyproject: testpaths = ["tests"]), and
the project's addopts pass --benchmark-disable, so --benchmark-enable is required here
(without it each benchmark body runs once, untimed: a quick smoke test of the suite).
See bench/README.md for saving a baseline and comparing against it.

Every benchmark warms its function up explicitly before timing: the first call of a Numba
kernel compiles it (or loads it from the on-disk cache), which must never be timed.
"""

import contextlib

import numpy as np
import pytest

from lightcnn._jit import get_num_threads, set_num_threads


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@contextlib.contextmanager
def numba_threads(n):
    """Run the body with Numba's pool at n threads, restoring the previous count."""
    old = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(old)


def warm(fn, *args, times=2):
    """Call fn a few times so compilation / cache loading and first-touch page faults are not timed."""
    for _ in range(times):
        fn(*args)


def run(benchmark, fn, *args, rounds=None, warmup=2):
    """Warm fn up, then time it. pedantic mode with many short rounds; whole models pass rounds."""
    warm(fn, *args, times=warmup)
    if rounds is None:
        return benchmark(fn, *args)
    return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1)
