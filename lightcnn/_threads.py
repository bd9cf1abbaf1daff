"""Run the tuner's many tiny linear-algebra calls with single-threaded BLAS.

Why: since SciPy 1.15, L-BFGS-B is C code calling LAPACK (DPOTRF, DTRTRS) on matrices of
a few rows. With a multithreaded OpenBLAS every such call wakes the thread pool; on a busy
2-core machine we measured 8-11 ms per L-BFGS-B iteration instead of 0.1 ms, turning a
one-second 30-trial run into half a minute (scipy/scipy#22438, #23191; Optuna and BoTorch
limit BLAS threads around their L-BFGS-B calls for the same reason).

``single_threaded_blas()`` limits BLAS to one thread for the duration of a ``with`` block and
restores the previous setting afterwards. It uses threadpoolctl when installed; otherwise it
looks for the OpenBLAS that NumPy/SciPy wheels bundle and calls its thread-count setter
(``openblas_set_num_threads_local`` affects only the calling thread, OpenBLAS ≥ 0.3.27).
Anything unexpected → it does nothing: results are identical either way, only speed changes.
"""

import contextlib
import ctypes
import glob
import os

__all__ = ["single_threaded_blas", "numpy_blas_threads", "pin_numpy_blas_threads"]

_SETTERS = None  # list of (set(n) -> previous n) callables, found once
_NUMPY_SETTERS = None  # the same for NumPy's own OpenBLAS only (no SciPy import)


def _find_setters(with_scipy=True):
    import numpy

    packages = [numpy]
    if with_scipy:
        import scipy

        packages.insert(0, scipy)
    setters = []
    for pkg in packages:
        root = os.path.dirname(os.path.dirname(pkg.__file__))
        name = pkg.__name__
        for path in sorted(glob.glob(os.path.join(root, f"{name}.libs", "*openblas*"))
                           + glob.glob(os.path.join(root, name, ".dylibs", "*openblas*"))):
            try:
                lib = ctypes.CDLL(path)  # already loaded by the package: same handle, no new copy
            except OSError:
                continue
            local = next((getattr(lib, s) for s in ("openblas_set_num_threads_local",
                                                     "scipy_openblas_set_num_threads_local")
                          if hasattr(lib, s)), None)
            if local is not None:
                local.restype, local.argtypes = ctypes.c_int, [ctypes.c_int]
                setters.append(local)
    return setters


@contextlib.contextmanager
def single_threaded_blas():
    """Context manager: BLAS uses one thread inside the block (see module docstring)."""
    global _SETTERS
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    if _SETTERS is None:
        try:
            _SETTERS = _find_setters()
        except Exception:  # never let a speed tweak break tuning
            _SETTERS = []
    previous = [s(1) for s in _SETTERS]
    try:
        yield
    finally:
        for s, n in zip(_SETTERS, previous):
            s(max(int(n), 1))


@contextlib.contextmanager
def numpy_blas_threads(n):
    """Context manager: NumPy's OpenBLAS uses `n` threads in the calling thread inside the block.

    For lightcnn's NumPy inference engine. Its matmuls are small at batch 1 (a 3136x24 @ 24x144
    GEMM), and on a busy 2-core machine OpenBLAS's second thread waits for a core: measured with
    another process running, MobileNetV2 batch 1 took 320 ms with 2 BLAS threads against 61 ms
    with 1 (and 25-28 ms either way when the machine was quiet). The per-thread setter costs
    microseconds; without one (an OpenBLAS older than 0.3.27, MKL) nothing changes.
    """
    setters = _numpy_setters()
    previous = [s(n) for s in setters]
    try:
        yield
    finally:
        for s, old in zip(setters, previous):
            s(max(int(old), 1))


def pin_numpy_blas_threads(n):
    """NumPy's OpenBLAS uses `n` threads in the calling thread from now on (no restore).

    For threads lightcnn owns (lightcnn.kernels._split_blas's pool): set once, so no call pays the setter
    (~2 ms on a busy machine, as OpenBLAS parks or wakes its workers). Returns False when no
    per-thread setter was found (nothing changed).
    """
    setters = _numpy_setters()
    for s in setters:
        s(n)
    return bool(setters)


def _numpy_setters():
    """NumPy's OpenBLAS per-thread thread-count setters, found once ([] when there are none)."""
    global _NUMPY_SETTERS
    if _NUMPY_SETTERS is None:
        try:
            _NUMPY_SETTERS = _find_setters(with_scipy=False)
        except Exception:  # never let a speed tweak break inference or training
            _NUMPY_SETTERS = []
    return _NUMPY_SETTERS
