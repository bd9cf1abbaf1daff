"""The one Numba configuration of lightcnn, and the reason numba is imported late.

Every kernel is decorated with `kernel` (or `kernel(parallel=True)`), never with
`numba.njit` directly, so the compile policy lives here:

- **Nothing happens at import.** `kernel` returns a `Kernel`: the plain Python function
  plus its options. numba (and LLVM, ~130 MB resident) is imported the first time a
  kernel is *called*, and only then is the function handed to ``numba.njit``. The NumPy
  inference engine (lightcnn.layers.plan_numpy) calls no kernel, so a NumPy-engine
  process never loads LLVM. ``python -m lightcnn.compile`` is the explicit, visible
  place where kernels get compiled.
- ``cache=True``: machine code is stored on disk and reused by later processes. Where:
  ``NUMBA_CACHE_DIR`` if set; else ``__pycache__`` beside the kernels (numba's own
  default) if it is writable; else a ``numba`` folder in the user cache directory
  (`lightcnn._paths.user_cache_dir`). With no writable place at all, kernels compile
  without a cache and `cache_dir()` is None, which the engine choice reads.
- **A cached kernel is as new as every kernel source.** Numba checks a cache entry against
  the function's own file only, but kernels inline callees from other files (fused.py's
  bottleneck calls gemm.py's tile): after an edit or an upgrade of gemm.py alone, the
  cached bottleneck would keep running the old tile. So each kernel's cache stamp also
  carries `kernel_source_hash()` (all of lightcnn/kernels/*.py and this file), and any
  change there recompiles every kernel once (`_kernel_cache_class`).
- **One cache entry per variant.** Numba keys its cache on the function's qualified
  name and ignores ``parallel``; a serial and a parallel compilation of one body would
  share an entry, and whichever compiled first would run for both. So a parallel
  compilation is a copy of the function named ``<name>__parallel``.
- **One specialisation per argument types.** A kernel called from another kernel with a
  constant (``gemm_rows(a, 0, ...)``) is compiled for the constant's type, not for the
  constant (`_widen_literal_arguments`), so every call site shares one compilation.
- ``fastmath`` is off unless a kernel asks for it *and* its parity tests pass with it on;
  the flag set below excludes ``nnan``/``ninf`` so NaN checks in training still work.
  ``fastmath="contract"`` allows only fused multiply-add (``a * b + c`` rounded once): no
  reordering, nothing assumed about NaN or Inf. A polynomial written in Horner form then runs
  on FMA instructions, as exact or more; an inlined callee keeps its own flags, so its callers
  need none (ELU's exponential: 75 -> 52 ms on 26 M float32 values, one core).
- ``parallel=True`` only where it pays on 2 cores; ``LIGHTCNN_NO_PARALLEL=1`` turns it off
  everywhere (useful when profiling or debugging); serial builds then have their own names.
- Kernels call each other (an activation inside an epilogue). Numba resolves a callee from
  the caller module's globals at compile time: a `Kernel` there is typed as its dispatcher
  (a ``typeof`` rule registered when numba loads), and the ``prange`` stand-in is replaced
  by ``numba.prange`` before the caller compiles, since Numba's loop parallelizer
  recognises that one object only (`_bind_prange`). LLVM inlines small callees when it links them;
  Numba-level ``inline="always"`` is not used (it re-optimises every caller: ~8 s more
  compile for MobileNetV2, no speed gained).
- The thread pool: Numba picks TBB when the ``tbb`` package is installed (the ``fast``
  extra) and GNU OpenMP otherwise. A batch-1 forward is ~60 parallel loops microseconds
  apart, so how idle workers wait decides batch-1 latency (numbers: bench/README.md).
  TBB's workers spin briefly and then yield. Under OpenMP lightcnn makes workers *sleep*
  (``OMP_WAIT_POLICY=PASSIVE`` while Numba loads its threading layer, unless the variable
  is already set): GNU OpenMP's default spin is worse on a shared 2-core VM, where a
  spinning worker uses up its scheduler share and every later parallel loop waits for it.

A test (tests/test_jit_policy.py) checks that no module hard-codes these.
"""

import os
import threading
import types

PARALLEL_ENABLED = os.environ.get("LIGHTCNN_NO_PARALLEL", "") not in ("1", "true", "yes")

# Reassociation and contraction let LLVM vectorise reductions and use FMA;
# no-NaN/no-Inf assumptions are deliberately absent.
FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "reassoc", "afn"})
_FASTMATH_CHOICES = {False: False, True: FASTMATH_FLAGS, "contract": frozenset({"contract"})}

_lock = threading.RLock()
_state = {"numba": None, "cache_dir": None, "threads": None}
# the library kind of lightcnn's cache entries: numba's "object" plus the names of the symbols it defines
KERNEL_CACHE_KIND = "object+symbols"


def prange(*args):
    """``range`` in plain Python; inside a compiled kernel it becomes ``numba.prange``."""
    return range(*args)


class Kernel:
    """A loop-only function that Numba compiles on its first call.

    ``kernel(*args)`` runs the compiled code; ``kernel.dispatcher`` is Numba's dispatcher
    (importing numba if needed), which hot loops bind once to skip this wrapper.
    """

    def __init__(self, py_func, parallel, fastmath):
        self.parallel = bool(parallel and PARALLEL_ENABLED)
        if fastmath not in _FASTMATH_CHOICES:
            raise ValueError(f"fastmath must be False, True or 'contract', got {fastmath!r}")
        self.fastmath = _FASTMATH_CHOICES[fastmath]  # False or the LLVM flag set
        if self.parallel:
            py_func = _renamed_copy(py_func, py_func.__name__ + "__parallel")
        self.py_func = py_func
        self.__name__, self.__qualname__ = py_func.__name__, py_func.__qualname__
        self.__module__, self.__doc__ = py_func.__module__, py_func.__doc__
        self._dispatcher = None

    @property
    def key(self):
        """'module.qualname': the name of this variant's cache entry."""
        return f"{self.__module__}.{self.__qualname__}"

    @property
    def dispatcher(self):
        d = self._dispatcher
        if d is None:
            with _lock:
                if self._dispatcher is None:
                    numba = _numba()
                    _bind_prange(self.py_func, numba)
                    options = dict(nogil=True, error_model="numpy", parallel=self.parallel,
                                   fastmath=set(self.fastmath) if self.fastmath else False)
                    dispatcher = numba.njit(**options)(self.py_func)
                    _widen_literal_arguments(dispatcher)
                    if _state["cache_dir"] is not None:
                        try:
                            dispatcher._cache = _kernel_cache_class()(self.py_func)  # what cache=True would set
                        except RuntimeError:  # defined where numba cannot cache (stdin, exec): compile, keep nothing
                            _before_compiling()
                    else:
                        _before_compiling()
                    self._dispatcher = dispatcher
                d = self._dispatcher
        return d

    @property
    def compiled(self):
        """True once numba has a dispatcher for this kernel (loaded from cache or compiled)."""
        return self._dispatcher is not None

    def __call__(self, *args):
        return self.dispatcher(*args)

    def __repr__(self):
        return f"<lightcnn kernel {self.key}{' (parallel)' if self.parallel else ''}>"


def kernel(fn=None, *, parallel=False, fastmath=False):
    """Decorate a loop-only function as a cached Numba kernel, compiled on first call.

    Use as ``@kernel`` or ``@kernel(parallel=True, fastmath=True)`` (or ``fastmath="contract"``: FMA
    only, see the module docstring); ``kernel(parallel=True)(body)``
    and ``kernel(body)`` give two variants of one body with separate cache entries.
    """
    def wrap(f):
        return Kernel(f, parallel, fastmath)

    return wrap(fn) if fn is not None else wrap


def _renamed_copy(f, name):
    g = types.FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__.rsplit(".", 1)[0] + "." + name if "." in f.__qualname__ else name
    g.__module__, g.__doc__ = f.__module__, f.__doc__
    return g


def _global_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def kernel_source_hash():
    """Hash (16 hex digits) of the files kernels compile from: lightcnn/kernels/*.py and this file."""
    if "source_hash" not in _state:
        import hashlib

        root = os.path.dirname(os.path.abspath(__file__))
        kernels = os.path.join(root, "kernels")
        h = hashlib.sha256()
        for path in sorted(os.path.join(kernels, f) for f in os.listdir(kernels) if f.endswith(".py")) + [
                os.path.join(root, "_jit.py")]:
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                h.update(f.read())
        _state["source_hash"] = h.hexdigest()[:16]
    return _state["source_hash"]


def _widen_literal_arguments(dispatcher):
    """Compile `dispatcher` for the plain types of its arguments when another kernel calls it.

    Numba types a constant argument at a call site as a literal (``Literal[int](0)``,
    ``Literal[bool](False)``) and compiles the callee once per distinct mix of literals:
    MobileNetV2's plan compiled the packed GEMM's row loop 5 times over (~3 s of LLVM each,
    and again inside every caller that inlines it). Kernels branch on their arguments at run
    time, so a literal buys nothing but that copy; they are widened to their types here.
    """
    from numba.core import types

    get_call_template = dispatcher.get_call_template

    def widened(args, kws):
        return get_call_template(tuple(types.unliteral(a) for a in args),
                                 {k: types.unliteral(v) for k, v in kws.items()})

    dispatcher.get_call_template = widened


def _kernel_cache_class():
    """numba's FunctionCache, changed in three ways for lightcnn's kernels (built once, after numba loads).

    - **Stamped with every kernel source.** Numba stores a source stamp with each cache index and
      treats an index with another stamp as empty; the stamp is extended with `kernel_source_hash()`.
    - **Loading does not prepare for compiling.** Before it looks in the cache, numba refreshes its
      target context: that imports its whole lowering library and compiles its reference-counting
      runtime (NRT) with the LLVM optimiser, ~60 MB resident and ~0.35 s, none of which running
      machine code from the cache needs (the runtime's IR is already linked into each entry). Only
      the runtime's C functions must be known to the linker (`_nrt_symbols`). A kernel that is not
      in the cache gets compiled, and numba's compiler refreshes the context itself.
    - **An entry's LLVM IR is parsed only when needed.** Each entry holds its machine code and the
      LLVM IR of everything it contains, kept so that a kernel compiled later can inline it. Numba
      parses that IR when it loads the entry, to learn which symbols the machine code defines, and
      keeps it: ~20x the bytes of the machine code (~23 MB and ~0.15 s for MobileNetV2's kernels),
      for a compilation that a predict process never makes. Here the entry also stores those symbol
      names (written at save time), and the IR is parsed when a compilation links it (`_parse_on_demand`).
    """
    if "cache_class" in _state:
        return _state["cache_class"]
    from numba.core.caching import CompileResultCacheImpl, FunctionCache

    class KernelCacheImpl(CompileResultCacheImpl):
        # numba's entry is (library, ...) with library = (name, 'object', (machine code, IR bitcode));
        # lightcnn's adds the names of the symbols the machine code defines: (name, KIND, (code, IR, names)).
        KIND = KERNEL_CACHE_KIND

        def reduce(self, cres):
            payload = super().reduce(cres)
            name, kind, data = payload[0]
            engine = getattr(cres.library.codegen, "_engine", None)
            if kind != "object" or not hasattr(engine, "_defined_symbols"):
                return payload  # another numba: its own format
            module = cres.library._get_module_for_linking()
            names = tuple(sorted(g.name for group in (module.functions, module.global_variables) for g in group
                                 if not g.is_declaration))
            return ((name, self.KIND, data + (names,)),) + tuple(payload[1:])

        def rebuild(self, target_context, payload, read_again=None):
            """numba's rebuild, without parsing the entry's IR. read_again() -> the entry, read from its
            file again: then the IR (~2x the machine code: 1.3 MB for MobileNetV2's kernels) is not kept
            either, but read back if a compilation links the kernel."""
            name, kind, data = payload[0]
            if kind != self.KIND:
                return super().rebuild(target_context, payload)
            code, bitcode, names = data
            target_context.codegen()._engine._defined_symbols.update(names)  # what parsing the IR was for
            payload = ((name, "object", (code, _empty_bitcode())),) + tuple(payload[1:])
            cres = super().rebuild(target_context, payload)
            _parse_on_demand(cres.library, _kept(bitcode) if read_again is None else _bitcode_reader(read_again, name))
            return cres

    class KernelCache(FunctionCache):
        _impl_class = KernelCacheImpl

        def __init__(self, py_func):
            super().__init__(py_func)
            self._cache_file._source_stamp = (self._cache_file._source_stamp, kernel_source_hash())

        def load_overload(self, sig, target_context):
            _nrt_symbols()
            with self._guard_against_spurious_io_errors():
                cres = self._load_overload(sig, target_context)
            if cres is None:  # not cached: numba compiles it next
                _before_compiling()
            return cres

        def _load_overload(self, sig, target_context):
            # numba's, with a way for rebuild to read the entry again instead of keeping its IR
            if not self._enabled:
                return None
            key = self._index_key(sig, target_context.codegen())
            data = self._cache_file.load(key)
            if data is not None:
                data = self._impl.rebuild(target_context, data, lambda: self._cache_file.load(key))
            return data

    _state["cache_class"] = KernelCache
    return KernelCache


def _before_compiling():
    """Run before numba's compiler does: its first run imports SciPy's BLAS (numba.np.arraymath checks for it),
    which must load with lightcnn's settings (lightcnn._blas: one thread, else an idle OpenBLAS pool and its
    buffers, +12 MB in `lightcnn.compile`). A process that only loads cached kernels never loads that BLAS."""
    from lightcnn import _blas

    _blas.prepare()


def _nrt_symbols():
    """Tell LLVM's linker where NRT's C functions are (the part of numba's rtsys.initialize that cached code needs)."""
    if not _state.get("nrt_symbols"):
        from llvmlite import binding as llvm
        from numba.core.runtime import _nrt_python

        for name, address in _nrt_python.c_helpers.items():
            llvm.add_symbol(name if name.startswith("_") else "NRT_" + name, address)
        _state["nrt_symbols"] = True


def _empty_bitcode():
    """An LLVM module with nothing in it, as bitcode: what a cached library's IR is while unparsed."""
    if "empty_bitcode" not in _state:
        from llvmlite import binding as llvm

        _state["empty_bitcode"] = llvm.parse_assembly("").as_bitcode()
    return _state["empty_bitcode"]


def _kept(bitcode):
    """The IR source of an entry held in memory."""
    return lambda: bitcode


def _bitcode_reader(read_again, name):
    """The IR source of an entry read back from its cache file (read_again() -> the entry as KernelCacheImpl wrote
    it, or None)."""

    def bitcode():
        entry = read_again()
        library = entry[0] if entry is not None else None
        if library is None or library[1] != KERNEL_CACHE_KIND:
            raise RuntimeError(f"{name}: its kernel cache entry disappeared after it was loaded; run again "
                               "(it is compiled anew)")
        return library[2][1]
    return bitcode


def _parse_on_demand(library, bitcode):
    """Give a loaded library its IR (`bitcode()` -> its bitcode) when a compilation links the library in, not before."""
    from llvmlite import binding as llvm

    def module_for_linking():
        if library._shared_module is None:
            library._shared_module = llvm.parse_bitcode(bitcode())
        return library._shared_module

    library._shared_module = None
    library._get_module_for_linking = module_for_linking


class LowLevel:
    """A Numba intrinsic (LLVM IR written with llvmlite) that is built when numba loads.

    ``build(numba)`` returns the ``numba.extending.intrinsic``; until then the module holds this
    stand-in, and `_bind_prange` swaps it for the built intrinsic in a kernel's module before
    the kernel compiles (as it does with ``prange``). Not callable from Python.
    """

    def __init__(self, build):
        self.build, self.built = build, None
        self.__name__, self.__doc__ = build.__name__, build.__doc__

    def resolve(self, numba):
        with _lock:
            if self.built is None:
                self.built = self.build(numba)
        return self.built

    def __call__(self, *args):
        raise TypeError(f"{self.__name__} is LLVM IR for compiled kernels; it cannot run in Python")


def lowlevel(build):
    """Decorate ``build(numba) -> intrinsic``: the intrinsic is made when numba loads (see LowLevel)."""
    return LowLevel(build)


def _bind_prange(py_func, numba):
    """Point the `prange` that `py_func` reads in its module at numba.prange, and its LowLevel
    stand-ins at their built intrinsics."""
    namespace = py_func.__globals__
    for name in _global_names(py_func.__code__):
        value = namespace.get(name)
        if value is prange:
            namespace[name] = numba.prange
        elif isinstance(value, LowLevel):
            namespace[name] = value.resolve(numba)


def _register_kernel_type(numba):
    """Let numba type a Kernel found in a caller's globals as the Kernel's own dispatcher."""
    from numba.extending import typeof_impl

    @typeof_impl.register(Kernel)
    def _typeof_kernel(value, context):
        return typeof_impl(value.dispatcher, context)


# ------------------------------------------------------------------------------------ numba itself


def numba_loaded():
    """Whether numba has been imported by lightcnn (a kernel ran or was compiled)."""
    return _state["numba"] is not None


def cache_dir():
    """Where compiled kernels are cached (a path), or None when nothing writable was found.

    Decided without importing numba, in this order: NUMBA_CACHE_DIR; the kernels'
    __pycache__ (numba's own default); the user cache directory.
    """
    with _lock:
        if "resolved" not in _state:
            _state["cache_dir"], _state["cache_reason"] = _resolve_cache_dir()
            _state["resolved"] = True
        return _state["cache_dir"]


def cache_unavailable_reason():
    """One line saying why there is no kernel cache (None when there is one)."""
    cache_dir()
    return _state.get("cache_reason")


def _resolve_cache_dir():
    from lightcnn._paths import user_cache_dir, writable_dir

    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        if writable_dir(env):
            return os.path.abspath(env), None
        return None, f"NUMBA_CACHE_DIR={env!r} is not writable"
    in_tree = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "__pycache__")
    if writable_dir(in_tree):
        return in_tree, None
    user = os.path.join(user_cache_dir(), "numba")
    if writable_dir(user):
        return user, None
    return None, (f"no writable place for compiled kernels ({in_tree} and {user} are read-only; "
                  "set NUMBA_CACHE_DIR to a writable folder)")


def _numba():
    """Import numba once, with lightcnn's cache folder and thread settings applied."""
    if _state["numba"] is not None:
        return _state["numba"]
    with _lock:
        if _state["numba"] is None:
            where = cache_dir()
            import numba

            in_tree = where is not None and where.endswith(os.path.join("kernels", "__pycache__"))
            if where is not None and not in_tree and not os.environ.get("NUMBA_CACHE_DIR"):
                numba.config.CACHE_DIR = where  # the user cache dir: numba's read-only fallback
            _register_kernel_type(numba)
            _skip_codegen_of_the_empty_module()
            _load_threading_layer(numba)
            if _state["threads"] is not None:
                numba.set_num_threads(max(1, min(_state["threads"], numba.config.NUMBA_NUM_THREADS)))
            _state["numba"] = numba
    return _state["numba"]


def _skip_codegen_of_the_empty_module():
    """Take numba's empty placeholder module out of its JIT engine before anything is compiled or loaded.

    Numba creates its engine with one empty module in it, and LLVM's JIT generates machine code for
    every module it holds the first time it finalises any: the first kernel loaded from the cache
    then sets up LLVM's whole code generator for that empty module alone (6 MB resident, 13 ms).
    Only done when this call creates numba's target context: once something has been compiled,
    the module has machine code and stays. Numba uses the module for nothing else (its target triple).
    """
    from numba.core.registry import cpu_target

    if "_toplevel_target_context" in vars(cpu_target):
        return  # numba was in use before lightcnn loaded it
    try:
        codegen = cpu_target.target_context.codegen()
        codegen._engine._ee.remove_module(codegen._llvm_module)
    except AttributeError:  # pragma: no cover - another numba: keep its engine as it is
        pass


def _load_threading_layer(numba):
    """Load Numba's threading layer now, with OMP_WAIT_POLICY=PASSIVE unless set (see above).

    libgomp reads the variable once, when it is loaded; the environment is restored
    afterwards so child processes and other OpenMP runtimes (PyTorch bundles its own)
    keep their defaults.
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


def _default_threads():
    env = os.environ.get("NUMBA_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n):
    """Set the number of threads the parallel kernels use (1..cores); kept until numba loads."""
    n = max(1, min(int(n), _default_threads()))
    _state["threads"] = n
    if _state["numba"] is not None:
        _state["numba"].set_num_threads(n)


def get_num_threads():
    """Threads the parallel kernels use (or will use once numba loads)."""
    if _state["numba"] is not None:
        return _state["numba"].get_num_threads()
    return _state["threads"] or _default_threads()
