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
- The thread pool: Numba picks TBB when the ``tbb`` package is installed (the ``fast``
  extra) and GNU OpenMP otherwise. A batch-1 forward is ~60 parallel loops microseconds
  apart, so how idle workers wait decides batch-1 latency (numbers: bench/README.md).
  TBB's workers spin briefly and then yield: MobileNetV2 batch 1 on 2 threads, 3.8 ms.
  Under OpenMP lightcnn makes workers *sleep* (``OMP_WAIT_POLICY=PASSIVE`` while Numba
  loads its threading layer, unless the variable is already set): 8 ms, one futex
  wake-up per loop. GNU OpenMP's default spin is worse on a shared 2-core VM: a spinning
  worker uses up its scheduler share, and when it is preempted every later parallel loop
  waits for it a full time slice (12 ms median / 50 ms p90 measured); a short spin
  (``GOMP_SPINCOUNT=10000``) is fast back to back but 2-3x slower than sleeping on the
  first call after 30 ms idle.

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



def _load_threading_layer():
    """Load Numba's threading layer now, with OMP_WAIT_POLICY=PASSIVE unless set (see above).

    libgomp reads the variable once, when it is loaded; the environment is restored
    afterwards so child processes and other OpenMP runtimes (PyTorch bundles its own)
    keep their defaults. No effect if Numba already started its threads.
    """
    if not PARALLEL_ENABLED:
        return
    added = "OMP_WAIT_POLICY" not in os.environ
    if added:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
    except Exception:  # pragma: no cover - an unusual Numba build: keep its defaults
        pass
    finally:
        if added:
            os.environ.pop("OMP_WAIT_POLICY", None)


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
