"""The BLAS that lightcnn's fused inference kernels call, and how it is set up.

Numba compiles ``np.dot`` inside a kernel into a call to SciPy's BLAS
(``scipy.linalg.cython_blas``; in SciPy wheels that is SciPy's own bundled OpenBLAS,
a different library from NumPy's).  The inference kernels (kernels/gemm.py) call it
from inside their parallel loops, one tile of rows per call, so that each thread's
GEMM result is still in its cache when the bias/activation/residual epilogue reads it,
and so that only one thread pool (Numba's) is ever running.

Two settings make that fast, and both can only be chosen when the library loads:

- One BLAS thread.  Numba already runs one GEMM per core; an OpenBLAS pool on top
  would oversubscribe the cores (and its workers spin after every call, starving
  Numba's threads: on 2 cores that alone made MobileNetV2 ~20x slower).
- The AVX-512 kernels.  OpenBLAS 0.3.x maps AMD Zen 4/5 to its Haswell (AVX2)
  kernels; ``OPENBLAS_CORETYPE=SkylakeX`` selects the AVX-512 SGEMM, ~1.8x faster
  here, and is only requested when /proc/cpuinfo lists avx512f, avx512bw, avx512dq
  and avx512vl (every CPU with those runs the SkylakeX kernels).

`prepare()` sets both variables, loads SciPy's BLAS, and restores the environment,
so NumPy's BLAS and child processes are untouched.  The core type is lightcnn's
choice for this one library, even over an inherited ``OPENBLAS_CORETYPE`` (some
machines pin ``Haswell`` for NumPy); ``LIGHTCNN_BLAS_CORETYPE`` overrides it:
``auto`` (default, as above), ``default`` (whatever OpenBLAS/``OPENBLAS_CORETYPE``
picks) or an OpenBLAS core name.  If SciPy's BLAS was already loaded by the time lightcnn first runs a
model, its core type cannot change any more; its thread count is still set to 1
through ``scipy_openblas_set_num_threads``.  Either way this is a process-wide
setting of SciPy's BLAS (documented in bench/README.md); results differ from the
default kernels only by float32 rounding (the parity tests run with it on).
"""

import ctypes
import os
import sys

_state = {"ready": False, "coretype": None, "threads": None}


def _cpu_has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    except OSError:
        pass
    return False


def _loaded_scipy_openblas():
    """Path of SciPy's OpenBLAS if it is mapped into this process (Linux), else None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.count(" ") >= 5 else ""
                if "scipy" in path and "openblas" in path and "numpy" not in path:
                    return path
    except OSError:
        pass
    return None


def _import_cython_blas():
    """Import scipy.linalg.cython_blas, the module Numba's np.dot takes its BLAS from.

    `import scipy.linalg.cython_blas` first runs scipy.linalg's __init__, ~0.25 s of
    imports that lightcnn never uses (a quarter of a one-image predict). The extension
    module itself needs none of it, so it is loaded directly from its file and registered
    under its own name, where Numba (and a later `import scipy.linalg`) find it.
    """
    name = "scipy.linalg.cython_blas"
    if name in sys.modules:
        return
    try:
        import glob
        import importlib.util

        scipy_spec = importlib.util.find_spec("scipy")
        folder = os.path.join(scipy_spec.submodule_search_locations[0], "linalg")
        path = sorted(glob.glob(os.path.join(folder, "cython_blas*" + _ext_suffix())))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
        if "scipy.linalg" in sys.modules:
            sys.modules["scipy.linalg"].cython_blas = module
        else:
            sys.meta_path.insert(0, _AttachToParent(module))
    except Exception:  # any surprise: the ordinary (slower) import
        sys.modules.pop(name, None)
        import scipy.linalg.cython_blas  # noqa: F401


class _AttachToParent:
    """Meta-path hook: when scipy.linalg is imported later, make cython_blas its attribute again.

    (An import normally sets a submodule as an attribute of its package when it loads it;
    the submodule loaded above skipped that step.)
    """

    def __init__(self, module):
        self.module = module

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "scipy.linalg":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _AttachingLoader(spec.loader, self.module)
        return spec


class _AttachingLoader:
    def __init__(self, loader, module):
        self.loader, self.module = loader, module

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, package):
        self.loader.exec_module(package)
        package.cython_blas = self.module

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _ext_suffix():
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def prepare():
    """Load SciPy's BLAS for the Numba kernels with one thread and (on AVX-512 CPUs) SkylakeX kernels."""
    if _state["ready"]:
        return _state
    _state["ready"] = True
    saved = {}
    if _loaded_scipy_openblas() is None and "scipy.linalg" not in sys.modules:
        wanted = {"OPENBLAS_NUM_THREADS": "1"}  # no idle BLAS pool at all (set to 1 below anyway)
        choice = os.environ.get("LIGHTCNN_BLAS_CORETYPE", "auto")
        if choice == "auto" and _cpu_has_avx512():
            wanted["OPENBLAS_CORETYPE"] = "SkylakeX"
        elif choice not in ("auto", "default"):
            wanted["OPENBLAS_CORETYPE"] = choice
        for key, value in wanted.items():
            saved[key] = os.environ.get(key)
            os.environ[key] = value
    try:
        _import_cython_blas()
    finally:
        for key, value in saved.items():  # the environment is exactly as it was: NumPy, children unaffected
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    path = _loaded_scipy_openblas()
    if path is not None:
        try:
            lib = ctypes.CDLL(path)
            for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
                if hasattr(lib, name):
                    getattr(lib, name)(1)
                    break
            for name in ("scipy_openblas_get_corename", "openblas_get_corename"):
                if hasattr(lib, name):
                    fn = getattr(lib, name)
                    fn.restype = ctypes.c_char_p
                    _state["coretype"] = fn().decode()
                    break
            for name in ("scipy_openblas_get_num_threads", "openblas_get_num_threads"):
                if hasattr(lib, name):
                    _state["threads"] = int(getattr(lib, name)())
                    break
        except OSError:
            pass
    return _state


def info():
    """{'coretype': ..., 'threads': ...} of the BLAS the kernels use (after prepare())."""
    return dict(prepare())
