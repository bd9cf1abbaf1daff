"""The one Numba configuration of lightcnn.

Every kernel is decorated with `kernel` (or `kernel(parallel=True)`), never
with `numba.njit` directly, so the compile policy lives here:

- ``cache=True``: compiled machine code is stored next to the source in
  ``__pycache__`` and reused by later processes; nothing compiles at import.
- ``fastmath`` is off unless a kernel asks for it *and* its parity tests pass
  with it on; the flag set below excludes ``nnan``/``ninf`` so NaN checks in
  training still work.
- ``parallel=True`` only where it pays on 2 cores; ``LIGHTCNN_NO_PARALLEL=1``
  turns it off everywhere (useful when profiling or debugging).
- Numba's OpenMP workers spin only briefly between parallel loops, then sleep
  (``GOMP_SPINCOUNT=10000`` while Numba loads its threading layer, unless the user set
  ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``). A forward pass is ~60 parallel loops a few
  microseconds apart: sleeping workers (``OMP_WAIT_POLICY=PASSIVE``) pay a futex wake-up
  per loop, ~2 ms of a 6 ms MobileNetV2 batch-1 forward on an idle 2-core machine
  (6.1 ms passive, 4.0 ms with the short spin; SqueezeNet 1.1: 4.3 -> 2.9 ms). GNU
  OpenMP's default spin (300,000 rounds) keeps idle workers burning a core long after the
  work is done; on a loaded machine that made p90 latency 4-6x the median. With the short
  spin the worker is asleep within a fraction of a millisecond. On a machine where another
  process keeps a core busy, 1 thread beats 2 whatever the policy (6.9 vs 7.7-13 ms).
A test (tests/test_jit_policy.py) checks that no module hard-codes these.
"""

import os

import numba

PARALLEL_ENABLED = os.environ.get("LIGHTCNN_NO_PARALLEL", "") not in ("1", "true", "yes")

if not PARALLEL_ENABLED and not os.environ.get("NUMBA_CACHE_DIR"):
    # Numba's cache key ignores the parallel flag: serial builds get their own cache
    # folder so they never load machine code compiled with parallel=True (or vice versa).
    import tempfile

    numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), "lightcnn-numba-serial")



# Busy-wait rounds of an idle OpenMP worker before it sleeps (libgomp's default: 300,000).
SPIN_COUNT = "10000"


def _load_threading_layer():
    """Load Numba's threading layer now, with a short OpenMP spin (see above) unless the user chose one.

    libgomp reads the variables once, when it is loaded; the environment is restored
    afterwards so child processes and other OpenMP runtimes (PyTorch bundles its own)
    keep their defaults. No effect if Numba already started its threads.
    """
    if not PARALLEL_ENABLED:
        return
    added = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    if added:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
    except Exception:  # pragma: no cover - an unusual Numba build: keep its defaults
        pass
    finally:
        if added:
            os.environ.pop("GOMP_SPINCOUNT", None)


_load_threading_layer()

# Reassociation and contraction let LLVM vectorise reductions and use FMA;
# no-NaN/no-Inf assumptions are deliberately absent.
FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "reassoc", "afn"})


def kernel(fn=None, *, parallel=False, fastmath=False):
    """Decorate a loop-only function as a cached Numba kernel.

    Use as ``@kernel`` or ``@kernel(parallel=True, fastmath=True)``.
    """
    options = dict(
        cache=True,
        nogil=True,
        error_model="numpy",
        parallel=bool(parallel and PARALLEL_ENABLED),
        fastmath=set(FASTMATH_FLAGS) if fastmath else False,
    )

    def wrap(f):
        return numba.njit(**options)(f)

    return wrap(fn) if fn is not None else wrap


def inline_scalar(fn):
    """A scalar helper inlined into the kernels that call it (e.g. an activation)."""
    return numba.njit(cache=True, inline="always", error_model="numpy")(fn)


def set_num_threads(n):
    """Set the number of threads Numba's parallel kernels use (1..cores)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


# numba.prange re-exported so kernels import everything JIT-related from here.
prange = numba.prange


def get_num_threads():
    """Threads Numba's parallel kernels currently use."""
    return numba.get_num_threads()
