"""python -m lightcnn.weights: build from local originals, fetch with SHA-256 checks, refuse bad files cleanly."""

import hashlib
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
