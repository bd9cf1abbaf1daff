"""The one JIT policy: nothing compiles at import, no kernel hard-codes Numba options."""

import os
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightcnn"


def test_no_module_calls_numba_jit_directly():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_jit.py":
            continue
        text = path.read_text()
        if re.search(r"numba\.(njit|jit)\b|from numba import .*\b(njit|jit)\b|@njit|@jit\b", text):
            offenders.append(str(path.relative_to(PACKAGE)))
        if re.search(r"cache\s*=\s*(True|False)|fastmath\s*=\s*(True|\{)", text) and "kernels" in path.parts:
            # options belong in _jit.kernel(...) arguments, e.g. @kernel(fastmath=True) is allowed
            if re.search(r"numba\.\w+\([^)]*(cache|fastmath)\s*=", text):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, f"use lightcnn._jit.kernel instead of numba.njit in: {offenders}"


def test_import_compiles_nothing():
    """Importing the package and every kernel module imports no numba and compiles no kernel."""
    code = r"""
import importlib, pkgutil, sys
import lightcnn, lightcnn.kernels, lightcnn.layers, lightcnn.models, lightcnn.api, lightcnn.predict
from lightcnn._jit import Kernel
kernels = []
for info in pkgutil.iter_modules(lightcnn.kernels.__path__):
    mod = importlib.import_module("lightcnn.kernels." + info.name)
    kernels += [obj for obj in vars(mod).values() if isinstance(obj, Kernel)]
print(len(kernels), sum(k.compiled for k in kernels), "numba" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 20, "kernel modules define their kernels with lightcnn._jit.kernel"
    assert out[1:] == ["0", "False"], f"compiled at import / numba imported: {out}"


def test_a_kernel_compiles_on_its_first_call_and_imports_numba_then():
    code = r"""
import sys, numpy as np
from lightcnn.kernels import activation as act_k
assert "numba" not in sys.modules
y = act_k.activation_forward(np.array([-1.0, 2.0], np.float32), act_k.ACT_RELU, 1.0)
print(y.tolist(), "numba" in sys.modules, act_k.act_forward_flat.compiled)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[0.0,", "2.0]", "True", "True"]


def test_import_lightcnn_is_light():
    """`import lightcnn` pulls in neither numba nor h5py nor PIL (they load when first used)."""
    code = "import sys, lightcnn; print(' '.join(m for m in ('numba', 'h5py', 'PIL', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import lightcnn loaded: {out}"


def _env_after_jit_import(extra_env):
    code = ("import os, lightcnn._jit\n"
            "numba = lightcnn._jit._numba()\n"
            "numba.set_num_threads(1)\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


def test_openmp_wait_policy_never_leaks_into_the_environment():
    # PASSIVE is for Numba's own OpenMP pool only: children and other runtimes (PyTorch bundles its
    # own libgomp) see the environment the user started with.
    assert _env_after_jit_import({}) == "None"


def test_user_openmp_wait_policy_is_kept():
    assert _env_after_jit_import({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_a_kernel_defined_where_numba_cannot_cache_still_compiles():
    """A student's kernel typed at the interpreter (no source file to cache beside) runs uncached, not an error."""
    code = ("import numpy as np\n"
            "from lightcnn._jit import kernel\n"
            "@kernel\n"
            "def twice(x):\n"
            "    return 2 * x\n"
            "print(twice(np.float32(3.5)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "7.0"


_STAMP_SCRIPT = """
import sys
import lightcnn._jit as jit
jit._state["source_hash"] = sys.argv[1]  # what kernel_source_hash() would give after an edit of a kernel file
import kmod
assert kmod.add_one(1.0) == 2.0
stats = kmod.add_one.dispatcher.stats
print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""


def test_a_cached_kernel_is_recompiled_when_any_kernel_source_changes(tmp_path):
    """Numba checks a cache entry against the function's own file only; lightcnn also stamps it with the hash of
    every kernel source, because kernels inline callees from other files (an edit of gemm.py must reach the
    cached bottleneck of fused.py). Same hash: loaded from the cache; another hash: compiled again, then cached."""
    (tmp_path / "kmod.py").write_text("from lightcnn._jit import kernel\n\n\n@kernel\ndef add_one(x):\n"
                                      "    return x + 1.0\n")
    (tmp_path / "run.py").write_text(_STAMP_SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]))

    def hits_misses(source_hash):
        out = subprocess.run([sys.executable, str(tmp_path / "run.py"), source_hash], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    assert hits_misses("a" * 16) == (0, 1)
    assert hits_misses("a" * 16) == (1, 0)
    assert hits_misses("b" * 16) == (0, 1)
    assert hits_misses("b" * 16) == (1, 0)


_LOAD_MODULE = """from lightcnn._jit import kernel
import numpy as np


@kernel
def add_one(x):
    return x + 1.0


@kernel
def filled(n):
    out = np.empty(n, np.float32)  # allocates through numba's runtime (NRT)
    for i in range(n):
        out[i] = add_one(np.float32(i))
    return out


@kernel
def twice_plus_one(x):
    return add_one(x) * 2.0
"""

_LOAD_SCRIPT = """
import sys
import kmod
print(kmod.add_one(1.0), kmod.filled(3).tolist())
# imported only when numba prepares to compile (its target context's refresh)
print("numba.np.polynomial.polynomial_core" in sys.modules)
if sys.argv[1] == "link":
    print(kmod.twice_plus_one(1.0))  # compiled now, with the cached add_one inlined into it
print(sum(kmod.add_one.dispatcher.stats.cache_hits.values()), sum(kmod.filled.dispatcher.stats.cache_hits.values()))
"""


def test_a_cached_kernel_loads_without_preparing_the_compiler_and_still_links(tmp_path):
    """Loading from the cache skips numba's compile preparation (its lowering library, ~60 MB resident in a
    predict), and a kernel compiled after it in the same process still inlines the loaded callee (its IR is
    parsed again on demand)."""
    (tmp_path / "kmod.py").write_text(_LOAD_MODULE)
    (tmp_path / "run.py").write_text(_LOAD_SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]))

    def run(mode):
        return subprocess.run([sys.executable, str(tmp_path / "run.py"), mode], env=env, cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.split("\n")[:-1]

    assert run("load") == ["2.0 [1.0, 2.0, 3.0]", "True", "0 0"]  # compiled
    assert run("load") == ["2.0 [1.0, 2.0, 3.0]", "False", "1 1"]  # loaded, nothing prepared
    assert run("link") == ["2.0 [1.0, 2.0, 3.0]", "False", "4.0", "1 1"]


_LITERAL_SCRIPT = """
import numpy as np
from lightcnn._jit import kernel


@kernel
def scaled(x, start, flag):
    return x * 2.0 + start if flag else x


@kernel
def with_constants(x):
    return scaled(x, 0, False) + scaled(x, 1, True)


@kernel
def with_variables(x, start, flag):
    return scaled(x, start, flag)


print(with_constants(1.5), with_variables(1.5, np.int64(3), True))
print(len(scaled.dispatcher.signatures), scaled.dispatcher.signatures[0])
"""


def test_a_kernel_called_with_constants_is_compiled_once_for_their_types(tmp_path):
    """Numba would compile `scaled` three times (for Literal[int](0)/Literal[bool](False), for 1/True, and for
    int64/bool); lightcnn widens constants at call sites so every caller shares one compilation."""
    (tmp_path / "run.py").write_text(_LITERAL_SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]))
    out = subprocess.run([sys.executable, str(tmp_path / "run.py")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[0] == "5.5 6.0"
    assert out[1] == "1 (float64, int64, bool)"


def test_fastmath_contract_fuses_multiply_add_and_nothing_else():
    """fastmath="contract" rounds a * b + c once (an FMA), where plain kernels round the product first; any other
    value is refused. a * b = 1 - 2**-60 exactly, which rounds to 1.0 before the add: 0.0 without FMA, -2**-60
    with it. NaN still propagates (no nnan assumption)."""
    code = ("import math\n"
            "from lightcnn._jit import kernel\n"
            "def mad(a, b, c):\n"
            "    return a * b + c\n"
            "fused, plain = kernel(fastmath='contract')(mad), kernel(mad)\n"
            "a, b = 1.0 + 2.0 ** -30, 1.0 - 2.0 ** -30\n"
            "print(fused(a, b, -1.0) == -2.0 ** -60, plain(a, b, -1.0) == 0.0, math.isnan(fused(math.nan, b, -1.0)))\n"
            "try:\n"
            "    kernel(fastmath='fast')(mad)\n"
            "except ValueError as exc:\n"
            "    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "True True True", out
    assert out[1].startswith("refused: fastmath must be False, True or 'contract'"), out
