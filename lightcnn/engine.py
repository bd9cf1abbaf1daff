"""Which inference engine runs a model: "numba", "numpy", or "auto" (the default), decided without importing numba.

    LIGHTCNN_ENGINE=auto|numba|numpy      (or --engine on predict/evaluate/summary, engine= on lightcnn.load)

auto   the numba engine when every kernel the model's plan calls is already compiled and
       cached for this numba version, Python and CPU (`python -m lightcnn.compile` does that
       once, visibly); otherwise the numpy engine. auto never compiles behind your back.
       A command that will predict at most SMALL_JOB images stays on numpy (engine_for_job):
       loading compiled kernels costs more than they save on so few.
numba  fused Numba kernels: the fastest once compiled; compiles what is missing on first use
       (about 25 s of CPU for MobileNetV2, once per machine).
numpy  no JIT and no LLVM: the first result in well under a second, about half the speed.

How auto knows: Numba's own cache index can only be read by numba itself (importing it costs
~0.4 s and ~65 MB), so `record_compiled()` writes a small stamp beside the cache after a
compile: the numba version, Python version, CPU identity, a hash of the kernel sources, and
for every compiled kernel the path of Numba's index file. `kernels_ready(kernels)` checks the
stamp against this process and that each needed kernel's index file still exists; a stale or
missing stamp means "not compiled", which only ever costs speed, never a wrong result.
"""

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

ENGINE_ENV = "LIGHTCNN_ENGINE"
CHOICES = ("auto", "numba", "numpy")
# A process that will run only this many images stays on NumPy under "auto" even when the kernels are
# compiled: importing numba and loading cached kernels costs ~0.3 s (most of it the import of numba and LLVM),
# which a handful of images never earns back (~35 ms saved per image at batch 1).
SMALL_JOB = 4

_memo = {}


def check_engine(name):
    """Validate an engine name; returns it."""
    if name not in CHOICES:
        raise ValueError(f"unknown engine {name!r}: use one of {', '.join(CHOICES)}")
    return name


def engine_for_job(requested, images):
    """The engine a command-line job of `images` images should ask for: "auto" becomes "numpy" for a
    small job in a fresh process (see SMALL_JOB); anything else is returned unchanged."""
    from lightcnn._jit import numba_loaded

    if requested == "auto" and images <= SMALL_JOB and not numba_loaded():
        return "numpy"
    return requested


def default_engine():
    """$LIGHTCNN_ENGINE, or "auto"."""
    value = os.environ.get(ENGINE_ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENGINE_ENV}={value!r}: use one of {', '.join(CHOICES)}")
    return value


# ------------------------------------------------------------------------------------ the stamp


def _numba_version():
    try:
        from importlib.metadata import version

        return version("numba")
    except Exception:  # not installed, or no metadata
        return None


def _cpu_identity():
    """A string that changes when the CPU model or its feature flags change (Numba keys its cache on both)."""
    text = platform.machine() + "|" + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        text += "|" + "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _source_hash():
    """Hash of the files whose code the kernels compile from (lightcnn._jit.kernel_source_hash)."""
    from lightcnn._jit import kernel_source_hash

    return kernel_source_hash()


def _environment():
    if "env" not in _memo:
        from lightcnn._jit import PARALLEL_ENABLED

        _memo["env"] = {"numba": _numba_version(), "python": "%d.%d" % sys.version_info[:2], "cpu": _cpu_identity(),
                        "source": _source_hash(), "parallel": PARALLEL_ENABLED}
    return _memo["env"]


def stamp_path():
    """The stamp file beside the kernel cache, or None when there is no cache."""
    from lightcnn._jit import cache_dir

    where = cache_dir()
    if where is None:
        return None
    install = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:8]
    return os.path.join(where, f"lightcnn-kernels-{install}.json")


def _read_stamp():
    path = stamp_path()
    if path is None:
        return None
    try:
        with open(path) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("environment") != _environment():
        return None
    kernels = stamp.get("kernels")
    return kernels if isinstance(kernels, dict) else None


def kernels_ready(kernels):
    """True when each lightcnn._jit.Kernel in `kernels` can run without compiling: already compiled in
    this process, or recorded in the stamp with its Numba cache index still on disk."""
    if all(k.compiled and k.dispatcher.signatures for k in kernels):
        return True
    recorded = _read_stamp()
    if recorded is None:
        return False
    for k in kernels:
        index = recorded.get(k.key)
        if not (isinstance(index, str) and os.path.exists(index)):
            return False
    return True


def record_compiled(kernels):
    """Add the compiled `kernels` (with signatures) to the stamp; returns the stamp's path or None."""
    path = stamp_path()
    if path is None:
        return None
    recorded = _read_stamp() or {}
    for k in kernels:
        if not k.compiled or not k.dispatcher.signatures:
            continue
        index = _index_file(k.dispatcher)
        if index is not None and os.path.exists(index):
            recorded[k.key] = index
    from lightcnn.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps({"environment": _environment(), "kernels": recorded}, indent=1, sort_keys=True))
    return path


def _index_file(dispatcher):
    """Path of Numba's cache index for a dispatcher (numba's private layout, checked by a test)."""
    try:
        cache_file = dispatcher._cache._cache_file
        return os.path.join(cache_file._cache_path, cache_file._index_name)
    except AttributeError:
        return None


def compile_hint(name):
    """The one line that tells a user on the numpy engine how to get the faster one."""
    from lightcnn._jit import cache_unavailable_reason

    reason = cache_unavailable_reason()
    if reason:
        return f"running on the NumPy engine: Numba is off ({reason})"
    return (f"running on the NumPy engine because the Numba kernels are not compiled yet; "
            f"'python -m lightcnn.compile {name}' (once, ~30 s) makes runs like this about 2x faster")
