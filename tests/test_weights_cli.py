"""python -m lightcnn.weights: build from local originals, fetch with SHA-256 checks, refuse bad files cleanly."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest

from lightcnn.errors import CheckpointError, LightCNNError
from lightcnn.weights import download, find_weights, locate_or_fetch


def run_cli(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "lightcnn.weights", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_build_info_and_list_from_local_sources(tmp_path, sources_dir):
    env = {"LIGHTCNN_SOURCES": str(sources_dir), "LIGHTCNN_WEIGHTS": str(tmp_path),
           "LIGHTCNN_CACHE": str(tmp_path / "cache")}
    built = run_cli("build", "mobilenet_v3_small", env=env)
    assert built.returncode == 0, built.stderr
    assert "[1/1] mobilenet_v3_small: wrote" in built.stderr
    info = run_cli("info", tmp_path / "mobilenet_v3_small.h5", env=env)
    assert '"arch": "mobilenet_v3_small"' in info.stdout and "da341cf06fa50127" in info.stdout
    assert '"classes": 1000' in info.stdout and '"tench"' in info.stdout
    listing = run_cli("list", env=env)
    row = next(line for line in listing.stdout.splitlines() if line.startswith("mobilenet_v3_small "))
    assert row.split()[3:5] == ["yes", "yes"]


def test_build_without_sources_says_what_to_do(tmp_path):
    env = {"LIGHTCNN_SOURCES": str(tmp_path / "nowhere"), "LIGHTCNN_WEIGHTS": str(tmp_path),
           "LIGHTCNN_CACHE": str(tmp_path / "cache")}
    result = run_cli("build", "mobilenet_v2", env=env)
    assert_one_line_error(result, "mobilenet_v2_1.0_224_quant.tflite", "LIGHTCNN_SOURCES", "fetch")


def test_download_checks_sha256_and_writes_atomically(tmp_path):
    payload = b"pretend checkpoint bytes"
    src = tmp_path / "model.tflite"
    src.write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    dest = download(src.as_uri(), tmp_path / "cache" / "model.tflite", good, "test model")
    assert dest.read_bytes() == payload
    with pytest.raises(CheckpointError, match="does not match the registry's"):
        download(src.as_uri(), tmp_path / "other" / "model.tflite", "0" * 64, "test model")
    assert not (tmp_path / "other" / "model.tflite").exists()


def test_unreachable_download_is_one_clear_line(tmp_path):
    with pytest.raises(LightCNNError, match="cannot download test model .*LIGHTCNN_SOURCES"):
        download("http://127.0.0.1:9/none.pth", tmp_path / "x.pth", "0" * 64, "test model")


def test_locate_prefers_local_file_with_matching_hash(tmp_path, monkeypatch):
    payload = b"abc"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.pth").write_bytes(payload)
    (tmp_path / "w.pth").write_bytes(b"same name, other bytes")
    monkeypatch.setenv("LIGHTCNN_SOURCES", str(tmp_path))
    monkeypatch.setenv("LIGHTCNN_CACHE", str(tmp_path / "cache"))
    found = locate_or_fetch("w.pth", hashlib.sha256(payload).hexdigest(), "http://127.0.0.1:9/w.pth", "w", False)
    assert found == tmp_path / "sub" / "w.pth"


def test_find_weights_explains_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCNN_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("LIGHTCNN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match=r"mobilenet_v2\.h5.*python -m lightcnn\.weights build mobilenet_v2"):
        find_weights("mobilenet_v2")
    with pytest.raises(CheckpointError, match="unknown model 'resnet50'"):
        find_weights("resnet50")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["legacy", "zip"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    payload = pickle.dumps({"features.0.weight": _Exploit(marker)}, protocol=2)
    if kind == "legacy":
        evil.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                         + pickle.dumps({}, protocol=2) + payload)
    else:
        with zipfile.ZipFile(evil, "w") as z:
            z.writestr("archive/data.pkl", payload)
    result = run_cli("convert", evil, "--arch", "squeezenet1_1", "-o", tmp_path / "out.h5")
    assert_one_line_error(result, "evil.pth", "system")
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("name,arch", [("mobilenet_v2.pth", "mobilenet_v2"), ("squeezenet1_1.pth", "squeezenet1_1")])
def test_truncated_and_garbled_pth(tmp_path, fixtures_dir, name, arch):
    data = (fixtures_dir / "torchvision" / name).read_bytes()
    for label, content in [("truncated", data[: len(data) // 3]), ("garbled", os.urandom(2048) + data[2048:])]:
        bad = tmp_path / f"{label}.pth"
        bad.write_bytes(content)
        assert_one_line_error(run_cli("convert", bad, "--arch", arch, "-o", tmp_path / "o.h5"), f"{label}.pth")


def test_truncated_tflite_and_net(tmp_path, sources_dir):
    tfl = next(sources_dir.rglob("v3-small_224_1.0_uint8.tflite")).read_bytes()
    net = next(sources_dir.rglob("compressed_SqueezeNet.net")).read_bytes()
    (tmp_path / "t.tflite").write_bytes(tfl[: len(tfl) // 2])
    (tmp_path / "t.net").write_bytes(net[:-100])
    assert_one_line_error(run_cli("convert", tmp_path / "t.tflite", "--arch", "mobilenet_v3_small", "-o",
                                  tmp_path / "o.h5"), "t.tflite")
    assert_one_line_error(run_cli("convert", tmp_path / "t.net", "--arch", "squeezenet1_0", "-o", tmp_path / "o.h5"),
                          "t.net", "truncated")


def test_wrong_architecture_for_file(tmp_path, fixtures_dir, sources_dir):
    result = run_cli("convert", fixtures_dir / "torchvision" / "squeezenet1_0.pth", "--arch", "mobilenet_v2",
                     "-o", tmp_path / "o.h5")
    assert_one_line_error(result, "squeezenet1_0.pth", "wrong --arch")
    tfl = next(sources_dir.rglob("v3-small_224_1.0_uint8.tflite"))
    result = run_cli("convert", tfl, "--arch", "mobilenet_v2", "-o", tmp_path / "o.h5")
    assert_one_line_error(result, "v3-small_224_1.0_uint8.tflite")
    assert not (tmp_path / "o.h5").exists()


def test_garbage_h5_info(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(os.urandom(1000))
    assert_one_line_error(run_cli("info", bad), "bad.h5", "HDF5")


def test_usage_error_exits_2():
    result = run_cli("convert")
    assert result.returncode == 2 and "Traceback" not in result.stderr


# -- what a converted file knows about its inputs and classes ---------------------------------------------------


def _predict_top1(weights, image):
    result = subprocess.run([sys.executable, "-m", "lightcnn.predict", "--weights", str(weights), str(image),
                             "--json", "--topk", "1"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["topk"][0]["label"]


def _refused_with_choices(result, *fragments):
    """Exit 2 and one line naming the missing options and their choices; nothing written."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not record" in lines[0], result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_tflite_converted_without_flags_takes_scaling_and_classes_from_the_file(tmp_path, sources_dir, data_dir):
    """The Coral MobileNetV2: uint8 input (scale 1/128, zero point 128) and 1001 outputs (ImageNet + background)
    give the registry's preprocessing and ImageNet classes; no class_285, no null preprocessing."""
    from lightcnn.checkpoint import read_checkpoint
    from lightcnn.registry import REGISTRY

    src = next(sources_dir.rglob("mobilenet_v2_quant_tflite/mobilenet_v2_1.0_224_quant.tflite"))
    out = tmp_path / "m.h5"
    result = run_cli("convert", src, "--arch", "mobilenet_v2", "-o", out)
    assert result.returncode == 0, result.stderr
    ckpt = read_checkpoint(out)
    assert ckpt.preprocessing == REGISTRY["mobilenet_v2"].preprocessing.to_dict()
    assert len(ckpt.class_names) == 1000 and ckpt.class_names[285] == "Egyptian cat" and ckpt.class_ids[0] == "n01440764"
    assert _predict_top1(out, data_dir / "smoke-test-images" / "cat.bmp") == "Egyptian cat"


def test_tflite_with_1000_outputs_needs_classes_and_its_input_scaling_is_read(tmp_path, sources_dir, data_dir):
    """The Keras int8 export has 1000 outputs (which could be any 1000 classes): refused without --classes; with
    them, its input quantisation (scale 1/127.5, zero point 127) is the scaling."""
    from lightcnn.checkpoint import read_checkpoint

    src = next(sources_dir.rglob("mobilenet_v2_keras_int8_tflite/mobilenet_v2_1.0_224_quant.tflite"))
    out = tmp_path / "k.h5"
    _refused_with_choices(run_cli("convert", src, "--arch", "mobilenet_v2", "-o", out), "--classes", "imagenet")
    assert not out.exists()
    result = run_cli("convert", src, "--arch", "mobilenet_v2", "--classes", "imagenet", "-o", out)
    assert result.returncode == 0, result.stderr
    prep = read_checkpoint(out).preprocessing
    assert (prep["mean"], prep["std"], prep["input_range"], prep["size"]) == ([127.0] * 3, [127.5] * 3, 255.0, 224)
    assert _predict_top1(out, data_dir / "smoke-test-images" / "cat.bmp") == "Egyptian cat"


def test_deep_compression_file_is_caffe_with_imagenet_classes(tmp_path, sources_dir):
    from lightcnn.checkpoint import read_checkpoint
    from lightcnn.registry import REGISTRY

    src = next(sources_dir.rglob("compressed_SqueezeNet.net"))
    out = tmp_path / "s.h5"
    result = run_cli("convert", src, "--arch", "squeezenet1_0", "-o", out)
    assert result.returncode == 0, result.stderr
    ckpt = read_checkpoint(out)
    assert ckpt.preprocessing == REGISTRY["squeezenet1_0_caffe"].preprocessing.to_dict()
    assert ckpt.preprocessing["channel_order"] == "BGR" and ckpt.class_names[285] == "Egyptian cat"


def test_pth_without_preprocessing_or_classes_is_refused_with_the_choices(tmp_path, fixtures_dir):
    """A state dict records neither; torchvision's convention is likely but not knowable from the file."""
    src = fixtures_dir / "torchvision" / "squeezenet1_1.pth"
    out = tmp_path / "o.h5"
    _refused_with_choices(run_cli("convert", src, "--arch", "squeezenet1_1", "-o", out),
                          "preprocessing or classes", "--preprocessing {caffe,grayscale_227,keras,tf_slim,torchvision}",
                          "--classes {imagenet,FILE")
    _refused_with_choices(run_cli("convert", src, "--arch", "squeezenet1_1", "--classes", "imagenet", "-o", out),
                          "its preprocessing;", "torchvision")
    assert not out.exists()
    result = run_cli("convert", src, "--arch", "squeezenet1_1", "--classes", "imagenet", "--preprocessing",
                     "torchvision", "-o", out)
    assert result.returncode == 0, result.stderr


def test_recorded_metadata_reproduces_the_registry(monkeypatch, sources_dir):
    """What the files record equals what the registry states for them, except the Keras file: its zero point is
    127 (the runtime computes (q - 127) / 127.5) where the registry keeps Keras's (x - 127.5) / 127.5."""
    from lightcnn.registry import WEIGHTS
    from lightcnn.weights import find_source, recorded_metadata

    monkeypatch.setenv("LIGHTCNN_SOURCES", str(sources_dir))
    checked = 0
    for spec in WEIGHTS:
        src = find_source(spec.filename, spec.sha256)
        if src is None:
            continue
        preprocessing, classes = recorded_metadata(src, spec.converter)
        if spec.name == "mobilenet_v2_keras":
            assert classes is None and preprocessing == spec.preprocessing.__class__(
                **{**spec.preprocessing.to_dict(), "mean": (127.0,) * 3})
        else:
            assert (preprocessing, classes) == (spec.preprocessing, spec.classes), spec.name
        checked += 1
    assert checked >= 3
