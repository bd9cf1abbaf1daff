"""JIT compile time, its own group (``jit``): a fresh process with an empty Numba cache.

Each round runs ``python -c "<build mobilenet_v2, one forward>"`` in a subprocess whose
NUMBA_CACHE_DIR is a new temporary folder, so every kernel the inference plan needs is
compiled from scratch (what a first-ever run pays); the warm-cache row is the same process
with the default, already-filled cache (what every later run pays). Slow: about a minute per
cold round on 2 shared cores, hence 2 rounds.
"""

import os
import subprocess
import sys
import tempfile

import pytest

SCRIPT = ("import numpy as np; from lightcnn.models import build; m = build('{arch}'); "
          "m.forward(np.zeros((1, 224, 224, 3), np.float32))")


def _run(arch, cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    subprocess.run([sys.executable, "-c", SCRIPT.format(arch=arch)], env=env, check=True)


@pytest.mark.benchmark(group="jit")
@pytest.mark.parametrize("arch", ["mobilenet_v2"])
def test_cold_cache_first_forward(benchmark, arch, tmp_path):
    dirs = iter(tempfile.mkdtemp(dir=tmp_path) for _ in range(10))
    benchmark.pedantic(lambda: _run(arch, next(dirs)), rounds=2, iterations=1)


@pytest.mark.benchmark(group="jit")
@pytest.mark.parametrize("arch", ["mobilenet_v2"])
def test_warm_cache_first_forward(benchmark, arch):
    _run(arch)  # fill the default cache
    benchmark.pedantic(lambda: _run(arch), rounds=3, iterations=1)
