"""Two engines, one model: the numpy and numba engines run the same lowered plan and agree.

Also: numba is imported only when a Numba kernel runs; "auto" picks Numba only when the plan's
kernels are compiled and cached (python -m lightcnn.compile), never compiling behind the
user's back; serial and parallel kernel variants have their own machine code; an install with no
writable cache still works. Each test pins the engine it tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import torchvision_model
from lightcnn.kernels import activation as act_k
from lightcnn.layers.plan_numpy import activate
from lightcnn.models import BUILDERS, build
from lightcnn.models.base import randomise_batchnorm_statistics

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-5  # relative to the logit range: float32 summation order is all that differs


def _agree(a, b, rtol=RTOL):
    scale = max(float(np.ptp(b)), 1e-6)
    err = float(np.abs(a - b).max()) / scale
    assert err <= rtol, f"engines differ by {err:.2e} of the logit range (allowed {rtol:.0e})"


def _run(model, engine, x):
    model.engine = engine
    y = model.forward(x)
    assert model.last_engine == engine
    return y


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "squeezenet1_0",
                                  "squeezenet1_1"])
@pytest.mark.parametrize("batch", [1, 8])
def test_engines_agree_on_real_weights(arch, batch, fixtures_dir, rng):
    model, io = torchvision_model(arch, fixtures_dir)
    inputs = io["input_nhwc"]
    x = np.ascontiguousarray(np.resize(inputs, (batch,) + inputs.shape[1:]), np.float32)
    numpy_logits = _run(model, "numpy", x)
    _agree(numpy_logits, _run(model, "numba", x))
    # and against PyTorch's own logits, recorded in the fixture
    n = min(batch, len(io["logits"]))
    assert np.abs(numpy_logits[:n] - io["logits"][:n]).max() <= 1e-4


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("batch", [1, 8])
def test_engines_agree_on_every_architecture(arch, batch, rng):
    """Registered architectures without a torchvision fixture (seed 001's network, seed 003's head) too.
    Random He-initialised networks amplify float32 rounding, so the weights are scaled down to keep
    activations of order 1 (a trained network's regime), where 1e-5 of the logit range is meaningful."""
    model = build(arch)
    randomise_batchnorm_statistics(model, rng)
    for _, layer in model.named_layers():
        if "weight" in layer.params and layer.params["weight"].ndim >= 2:
            layer.params["weight"] = layer.params["weight"] * np.float32(0.7)
    model.params_changed()
    x = rng.standard_normal((batch,) + tuple(model.input_shape)).astype(np.float32)
    _agree(_run(model, "numpy", x), _run(model, "numba", x))


def test_engines_agree_with_simulated_quantisation(sources_dir, tmp_path, monkeypatch, rng):
    """MobileNetV3-Small from its quantised TFLite file, activations rounded to the file's 8-bit grids:
    both engines lower the rounding as fake_quant steps; the layer path is the reference."""
    from lightcnn import quantsim
    from lightcnn.api import model_from_checkpoint
    from lightcnn.checkpoint import read_checkpoint
    from lightcnn.weights import find_weights

    try:
        ckpt = read_checkpoint(find_weights("mobilenet_v3_small"))
    except Exception as exc:  # noqa: BLE001 - the session build skipped it
        pytest.skip(f"mobilenet_v3_small weights not built: {exc}")
    model = model_from_checkpoint(ckpt, simulate_quantization=True)
    assert quantsim.is_simulating(model)
    x = (rng.uniform(0, 255, (2,) + tuple(model.input_shape)).astype(np.float32) - 128) / 128
    layer_path = model.head_net.forward(model.features_net.forward(x))
    numpy_logits, numba_logits = _run(model, "numpy", x), _run(model, "numba", x)
    # A value within rounding error of a grid boundary may land one step apart; the argmax and all
    # but a sliver of the logits agree.
    for y in (numpy_logits, numba_logits):
        assert (y.argmax(1) == layer_path.argmax(1)).all()
        assert np.median(np.abs(y - layer_path)) <= 1e-5 * np.ptp(layer_path)
    assert not np.allclose(numpy_logits, model_from_checkpoint(ckpt, simulate_quantization=False).forward(x))


@pytest.mark.parametrize("act", sorted(act_k.ACTIVATIONS))
def test_numpy_activations_match_the_kernels(act, rng):
    code = act_k.ACTIVATIONS[act]
    x = np.concatenate([rng.standard_normal(999) * 5, [0.0, -3.0, 3.0, 6.0, np.nan, 1e4, -1e4]]).astype(np.float32)
    expected = act_k.activation_forward(x, code, 1.0)
    got = activate(x.copy(), code, 1.0)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7, equal_nan=True)


# --------------------------------------------------------------------------- processes: what gets imported and compiled


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("LIGHTCNN_ENGINE", "NUMBA_CACHE_DIR")}
    full.update({k: str(v) for k, v in env.items()})
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


_FORWARD = r"""
import sys, json, numpy as np
from lightcnn.models import build
model = build("squeezenet1_1")
x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
y = model.forward(x)
print(json.dumps({"engine": model.last_engine, "numba": "numba" in sys.modules, "llvmlite": "llvmlite" in sys.modules,
                  "sum": float(y.sum())}))
"""


def test_numpy_engine_never_imports_numba(tmp_path):
    out = json.loads(_python(_FORWARD, LIGHTCNN_ENGINE="numpy", NUMBA_CACHE_DIR=tmp_path).stdout)
    assert out == {"engine": "numpy", "numba": False, "llvmlite": False, "sum": out["sum"]}


def test_auto_picks_numpy_until_compile_then_numba(tmp_path):
    """An empty kernel cache: auto runs NumPy and compiles nothing; after `lightcnn.compile` it runs Numba."""
    cache = tmp_path / "numba-cache"
    before = json.loads(_python(_FORWARD, LIGHTCNN_ENGINE="auto", NUMBA_CACHE_DIR=cache).stdout)
    assert before["engine"] == "numpy" and not before["numba"]
    assert not list(cache.rglob("*.nbi")), "auto compiled something"
    compiled = _python("from lightcnn.compile import main; raise SystemExit(main(['squeezenet1_1', '--batch', '1']))",
                       NUMBA_CACHE_DIR=cache)
    assert "compiled lightcnn.kernels.fused" in compiled.stderr and "ready" in compiled.stderr
    after = json.loads(_python(_FORWARD, LIGHTCNN_ENGINE="auto", NUMBA_CACHE_DIR=cache).stdout)
    assert after["engine"] == "numba" and after["numba"]
    assert abs(after["sum"] - before["sum"]) <= 1e-4 * max(1.0, abs(before["sum"]))
    # a cache folder deleted behind the stamp's back: auto goes back to NumPy instead of compiling
    for index in cache.rglob("*.nbi"):
        index.unlink()
    again = json.loads(_python(_FORWARD, LIGHTCNN_ENGINE="auto", NUMBA_CACHE_DIR=cache).stdout)
    assert again["engine"] == "numpy" and not again["numba"]


def test_no_writable_cache_still_predicts_on_numpy(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = _FORWARD + r"""
from lightcnn._jit import cache_dir, cache_unavailable_reason
from lightcnn.engine import compile_hint
print(cache_dir(), "|", compile_hint("squeezenet1_1"))
"""
    out = _python(code, LIGHTCNN_ENGINE="auto", NUMBA_CACHE_DIR=blocker / "cache").stdout.splitlines()
    assert json.loads(out[0])["engine"] == "numpy"
    assert out[1].startswith("None |") and "Numba is off" in out[1] and "not writable" in out[1]


def test_cache_dir_falls_back_to_the_user_cache(monkeypatch, tmp_path):
    from lightcnn import _jit, _paths

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    in_tree = str(Path(_jit.__file__).parent / "kernels" / "__pycache__")
    real = _paths.writable_dir
    monkeypatch.setattr(_paths, "writable_dir", lambda path: path != in_tree and real(path))
    where, reason = _jit._resolve_cache_dir()
    if sys.platform.startswith("linux"):
        assert where == str(tmp_path / "lightcnn" / "numba") and reason is None
    monkeypatch.setattr(_paths, "writable_dir", lambda path: False)
    where, reason = _jit._resolve_cache_dir()
    assert where is None and "read-only" in reason and "NUMBA_CACHE_DIR" in reason


# --------------------------------------------------------------------------- compiled variants


def test_serial_and_parallel_variants_have_their_own_machine_code(rng):
    """Numba's cache key ignores `parallel`: one function compiled both ways would share an entry and
    whichever compiled first would run for both. The variants are distinct functions, each compiled
    with its own flag into its own cache index file."""
    from lightcnn.engine import _index_file
    from lightcnn.kernels import depthwise, fused

    x = rng.standard_normal((64, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    dummy = np.zeros((1, 1), np.float32)
    args = (x, w, np.zeros(4, np.float32), dummy, False, dummy, 64, False, 0, np.float32(1), 16,
            np.empty((64, 4), np.float32), 0)
    xd = rng.standard_normal((1, 8, 8, 3)).astype(np.float32)
    dargs = (xd, rng.standard_normal((3, 3, 3)).astype(np.float32), np.zeros(3, np.float32), 1, 1, 1, 1, 0,
             np.float32(1), np.empty((1, 8, 8, 3), np.float32))
    for parallel, serial, call_args in [(fused.gemm_bias_act, fused.gemm_bias_act_serial, args),
                                        (depthwise.dw_forward, depthwise.dw_forward_serial, dargs)]:
        outputs = []
        for kern in (parallel, serial):
            out = call_args[-2 if kern.py_func.__name__.startswith("_gemm") else -1]
            kern(*call_args)
            outputs.append(out.copy())
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
        assert parallel.parallel and not serial.parallel and parallel.key != serial.key
        assert parallel.dispatcher.targetoptions["parallel"] and not serial.dispatcher.targetoptions["parallel"]
        indexes = [_index_file(k.dispatcher) for k in (parallel, serial)]
        assert indexes[0] != indexes[1] and all(os.path.exists(i) for i in indexes), indexes


def test_one_specialisation_per_kernel_for_a_forward(rng):
    """float32 scalars and int64 integers everywhere: a forward on both engines' plans compiles each
    inference kernel once (the numba engine used to compile 14 functions 22 times), and each kernel that
    kernels call once too, whatever constants its callers pass (gemm_rows was compiled 5 times). The
    callees are checked only when this process compiled their callers (an empty or stale kernel cache)."""
    from lightcnn.kernels import depthwise, fused, gemm

    model = build("mobilenet_v2")
    model.engine = "numba"
    for batch in (1, 2):
        model.forward(rng.standard_normal((batch, 96, 96, 3)).astype(np.float32))
    for kern in (fused.gemm_packed_bias_act, fused.gemm_packed_bias_act_serial, fused.conv_implicit_bias_act,
                 fused.inverted_residual_band, depthwise.dw_forward, depthwise.dw_forward_serial, gemm.gemm_rows,
                 gemm.conv_rows, gemm._epilogue_row, depthwise.dw_output_row):
        if kern.compiled:  # (other tests may compile float64 variants: one per dtype is the rule)
            float32 = [sig for sig in kern.dispatcher.signatures if "float32" in str(sig[0])]
            assert len(float32) <= 1, (kern.key, float32)


def test_two_compiles_at_once_share_the_work(tmp_path):
    """Two `python -m lightcnn.compile` started together on one empty cache: the lock makes one wait, and it then
    finds every kernel cached, so exactly one process compiles anything; both succeed."""
    env = {k: v for k, v in os.environ.items() if k != "LIGHTCNN_ENGINE"}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "lightcnn.compile", "squeezenet1_1", "--batch", "1"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    compiling = [err.count("compiled lightcnn.") for _, err in outputs]
    assert sorted(compiling)[0] == 0 and sorted(compiling)[1] > 0, compiling
