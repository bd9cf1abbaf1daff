"""Start-up cost, its own group (``jit``): fresh processes, one forward of MobileNetV2.

  numba engine, empty cache   NUMBA_CACHE_DIR is a new temporary folder: every kernel the plan needs
                              compiles from scratch (what `python -m lightcnn.compile` pays once)
  numba engine, warm cache    the same with the default, already-filled cache: import numba, load kernels
  numpy engine                no JIT at all: what a fresh install's first predict pays

Slow: tens of seconds per cold round on 2 shared cores, hence 2 rounds.
"""

import os
import subprocess
import sys
import tempfile

import pytest

SCRIPT = ("import numpy as np; from lightcnn.models import build; m = build('{arch}'); "
          "m.forward(np.zeros((1, 224, 224, 3), np.float32)); assert m.last_engine == '{engine}'")


def _run(arch, engine, cache_dir=None):
    env = dict(os.environ, LIGHTCNN_ENGINE=engine)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    subprocess.run([sys.executable, "-c", SCRIPT.format(arch=arch, engine=engine)], env=env, check=True)


@pytest.mark.benchmark(group="jit")
@pytest.mark.parametrize("arch", ["mobilenet_v2"])
def test_cold_cache_first_forward_numba(benchmark, arch, tmp_path):
    dirs = iter(tempfile.mkdtemp(dir=tmp_path) for _ in range(10))
    benchmark.pedantic(lambda: _run(arch, "numba", next(dirs)), rounds=2, iterations=1)


@pytest.mark.benchmark(group="jit")
@pytest.mark.parametrize("arch", ["mobilenet_v2"])
def test_warm_cache_first_forward_numba(benchmark, arch):
    _run(arch, "numba")  # fill the default cache
    benchmark.pedantic(lambda: _run(arch, "numba"), rounds=3, iterations=1)


@pytest.mark.benchmark(group="jit")
@pytest.mark.parametrize("arch", ["mobilenet_v2"])
def test_first_forward_numpy(benchmark, arch, tmp_path):
    benchmark.pedantic(lambda: _run(arch, "numpy", str(tmp_path)), rounds=3, iterations=1)
