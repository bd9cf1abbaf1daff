"""ONNX export: ONNX Runtime on the exported graph reproduces lightcnn's own output.

Every registered architecture is exported with random weights (and, where the torchvision
fixtures exist, with converted real-architecture weights and realistic batch-norm
statistics) and run by ONNX Runtime on the same NHWC batch: max |ORT - lightcnn| <= 1e-4.
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lightcnn.models.base import randomise_batchnorm_statistics  # noqa: E402
from lightcnn.export_onnx import export_onnx  # noqa: E402
from lightcnn.layers.base import Sequential  # noqa: E402
from lightcnn.layers.basic import AvgPool2d, Conv2d, GlobalAvgPool  # noqa: E402
from lightcnn.models import BUILDERS, Model, build  # noqa: E402

TOL = 1e-4  # float32 accumulation-order noise across engines is ~1e-6 on logits of order 1
RANDOM_RTOL = 1e-3


def _close(a, b, rtol=RANDOM_RTOL):
    """|a - b| <= rtol relative to the output's scale. Random He-initialised networks without
    trained statistics produce logits of order 1e3 and amplify float32 rounding: in
    MobileNetV3-Large's SE blocks the float32 result of *either* engine is ~5e-6 (relative) off
    the float64 one, and the logits end up ~3e-4 apart. The fixture test below checks real-scale
    logits at 1e-4 absolute."""
    return np.abs(a - b).max() <= rtol * max(1.0, float(np.abs(b).max()))


def _run_ort(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]




@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_export_matches_lightcnn(arch, rng):
    model = build(arch)
    randomise_batchnorm_statistics(model, rng)
    h, w, c = model.input_shape
    x = rng.standard_normal((2, h, w, c)).astype(np.float32)
    y = model.forward(x)
    y_ort = _run_ort(export_onnx(model), x)
    assert y_ort.shape == y.shape
    assert _close(y_ort, y)


@pytest.mark.parametrize("arch,size", [("mobilenet_v2", 97), ("squeezenet1_1", 65)])
def test_export_other_input_size(arch, size, rng):
    model = build(arch, padding="tf") if arch == "mobilenet_v2" else build(arch)
    x = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    assert _close(_run_ort(export_onnx(model, input_size=size), x), model.forward(x))


def test_export_avgpool_flatten(rng):
    features = Sequential([("conv", Conv2d(3, 8, 3, 2, padding=(0, 1, 1, 0), rng=rng)),
                           ("pool", AvgPool2d(3, 2, padding=1, ceil_mode=False, count_include_pad=False))])
    features.out_ch = 8
    head = Sequential([("gap", GlobalAvgPool())])
    model = Model("toy", {}, features, head, (21, 19, 3))
    x = rng.standard_normal((3, 21, 19, 3)).astype(np.float32)
    assert _close(_run_ort(export_onnx(model), x), model.forward(x))


def test_export_fixture_weights(fixtures_dir):
    from lightcnn.checkpoint import load_state
    from lightcnn.weights import convert_file

    folder = fixtures_dir / "torchvision"
    if not (folder / "mobilenet_v3_small.pth").exists():
        pytest.skip(f"torchvision fixtures not found in {folder}")
    ck = convert_file(folder / "mobilenet_v3_small.pth", "mobilenet_v3_small")
    model = build("mobilenet_v3_small", **ck.config)
    load_state(model, ck.tensors)
    io = np.load(folder / "mobilenet_v3_small_io.npz")
    y_ort = _run_ort(export_onnx(model), io["input_nhwc"])
    assert np.abs(y_ort - io["logits"]).max() <= TOL


def test_export_saves_file(tmp_path):
    model = build("mobilenet_v3_small", num_classes=5)
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    loaded = onnx.load(str(path))
    assert loaded.graph.input[0].name == "input" and loaded.graph.output[0].name == "logits"
    dims = [d.dim_param or d.dim_value for d in loaded.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 224, 224, 3]  # NHWC, symbolic batch


# -- the command line ------------------------------------------------------------------------------------------


def _metadata(path):
    import json

    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def test_cli_model_name_exports_the_registered_weights_with_classes_and_preprocessing(tmp_path, capsys):
    """--model NAME is the registered weights as predict finds them, not a random network of that architecture."""
    import lightcnn
    from lightcnn.errors import CheckpointError
    from lightcnn.export_onnx import main
    from lightcnn.preprocess import Preprocessing
    from lightcnn.weights import find_weights

    try:
        weights = find_weights("mobilenet_v2")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "m.onnx"
    assert main(["--model", "mobilenet_v2", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    clf = lightcnn.load(str(weights), simulate_quantization=False)
    meta = _metadata(out)
    assert meta["arch"] == "mobilenet_v2" and meta["model"] == "mobilenet_v2"
    assert meta["class_names"] == clf.class_names and meta["class_names"][285] == "Egyptian cat"
    assert meta["class_ids"] == clf.class_ids
    assert Preprocessing.from_dict(meta["preprocessing"]) == clf.preprocessing
    assert meta["weights_sha256"] == clf.weights_sha256
    # the graph computes these weights' logits on an input preprocessed as the metadata says
    x = np.random.default_rng(0).integers(0, 256, (2, 300, 260, 3), dtype=np.uint8)
    batch = clf.preprocess(x)
    y_ort = _run_ort(onnx.load(str(out)), batch)
    np.testing.assert_allclose(y_ort, clf.logits(batch), rtol=0, atol=TOL * 10)


def test_cli_random_weights_only_when_asked(tmp_path, capsys, monkeypatch):
    from lightcnn.export_onnx import main

    monkeypatch.setenv("LIGHTCNN_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.setenv("LIGHTCNN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.onnx"
    assert main(["--model", "mobilenet_v2", "--out", str(out)]) == 1   # not built: refused, nothing random written
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not built" in err and "--random-weights" in err and not out.exists()
    assert main(["--model", "mobilenet_v2_dense", "--out", str(out)]) == 1
    assert "unknown model 'mobilenet_v2_dense'" in capsys.readouterr().err and not out.exists()

    assert main(["--model", "mobilenet_v2_dense", "--random-weights", "--size", "64", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out} (random weights)\n"
    assert _metadata(out) == {"arch": "mobilenet_v2_dense", "weights": "random"}
    with pytest.raises(SystemExit) as usage:
        main(["--weights", "x.h5", "--random-weights", "--out", str(out)])
    assert usage.value.code == 2


def test_cli_without_onnx_says_how_to_install_it_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import runpy, sys; sys.modules['onnx'] = None; "  # an interpreter where `import onnx` fails
            f"sys.argv = ['export_onnx', '--model', 'squeezenet1_1', '--random-weights', '--out', {str(tmp_path / 'x.onnx')!r}]; "
            "runpy.run_module('lightcnn.export_onnx', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ), timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert 'pip install "lightcnn[compare]"' in result.stderr
    assert not (tmp_path / "x.onnx").exists()
