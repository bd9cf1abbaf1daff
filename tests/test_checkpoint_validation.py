"""One validation pass on every weight file (issue 13): each finding of the fuzzing run, as a named case.

Every damaged file must give CheckpointError naming the file and the attribute or tensor, before a model is
built; the CLIs print that one line and exit 1. A file whose weights overflow float32 predicts no NaN.
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lightcnn.api import load, model_from_checkpoint
from lightcnn.checkpoint import (FORMAT_VERSION, Checkpoint, metadata_digest, read_checkpoint, save_checkpoint,
                                 tensor_digest)
from lightcnn.errors import CheckpointError
from lightcnn.models import BUILDERS, CONFIG_RULES, build, builder_keywords
from lightcnn.preprocess import Preprocessing
from tests.conftest import REPO

SMALL = Preprocessing(size=32, resize_size=36).to_dict()
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)


@pytest.fixture
def good(tmp_path):
    model = build("squeezenet1_1", num_classes=3, seed=2)
    ckpt = Checkpoint(arch=model.arch, config=dict(model.config), tensors=model.state_dict(),
                      class_names=["a", "b", "c"], preprocessing=dict(SMALL))
    return save_checkpoint(tmp_path / "good.h5", ckpt), ckpt


def rewrite(path, ckpt, name="bad.h5", **changes):
    """Save a changed copy through save_checkpoint: valid digests, so the checks behind them must catch it."""
    fields = dict(arch=ckpt.arch, config=dict(ckpt.config), tensors=dict(ckpt.tensors),
                  class_names=list(ckpt.class_names), preprocessing=dict(ckpt.preprocessing))
    fields.update(changes)
    return save_checkpoint(path.parent / name, Checkpoint(**fields))


def resign(path):
    with h5py.File(path, "a") as f:
        raw = {k: (int(v) if isinstance(v, np.integer) else v) for k, v in f.attrs.items()}
        tensors = {}
        f["tensors"].visititems(lambda n, o: tensors.__setitem__(n.replace("/", "."), tensor_digest(
            n.replace("/", "."), o[()])) if isinstance(o, h5py.Dataset) else None)
        f.attrs["digests"] = json.dumps({"algorithm": "sha256", "metadata": metadata_digest(raw), "tensors": tensors})


def refused(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(read_checkpoint(path), simulate_quantization=None)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_every_builder_keyword_has_a_rule():
    for arch in BUILDERS:
        assert set(builder_keywords(arch)) <= set(CONFIG_RULES), arch


def test_a_config_that_is_a_list_or_null_class_names_are_refused(good):
    path, _ = good
    refused(_edit(path, lambda f: f.attrs.__setitem__("config", "[1, 2]")), "attribute 'config' must be an object")
    refused(_edit(path, lambda f: f.attrs.__setitem__("config", "{}")
                  or f.attrs.__setitem__("class_names", "null")), "attribute 'class_names' must be a list")


@pytest.mark.parametrize("config, fragment", [
    ({"num_classes": 10**9}, "'num_classes' must be an int in [1, 100000]"),
    ({"num_classes": 3.0}, "'num_classes'"),
    ({"num_classes": 3, "head": {"hidden": [10**7]}}, "'head'"),
    ({"num_classes": 3, "widht_mult": 1.0}, "'widht_mult' is not an option of squeezenet1_1"),
    ({"num_classes": 3, "fire": "bn_elu!"}, "'fire' must be one of"),
    ({"num_classes": 3, "dropout": float("nan")}, "'dropout'"),
    ({"num_classes": 3, "in_channels": 1}, "channel_order 'RGB' gives 3 channels"),
    ({"num_classes": 3, "in_channels": True}, "'in_channels' must be one of 1, 3"),  # True == 1 (found by Hypothesis)
    ({"num_classes": 4}, "3 names for a model with 4 outputs"),
])
def test_bad_configs_are_refused_before_building(good, config, fragment):
    path, ckpt = good
    bad = rewrite(path, ckpt, config=config)
    refused(bad, fragment)


@pytest.mark.parametrize("changes, fragment", [
    (dict(arch="resnet50"), "attribute arch: unknown architecture 'resnet50'"),
    (dict(arch="squeezenet1_2"), "did you mean 'squeezenet1_1'"),
    (dict(preprocessing=dict(SMALL, size=16, resize_size=16)), "size 16 is outside [32, 4096]"),
    (dict(preprocessing=dict(SMALL, size=1, resize_size=1)), "size 1 is outside"),
    (dict(preprocessing=dict(SMALL, resize_size=10**6)), "resize_size 1000000 is over 8192"),
    (dict(preprocessing=dict(SMALL, mean=[0.5])), "Preprocessing.mean"),
    (dict(preprocessing=[1, 2]), "attribute 'preprocessing' must be an object or null"),
    (dict(class_names=[]), "list of 1 to 100000 names"),
    (dict(class_names=["a", 2, "c"]), "holds 2, not a string"),
])
def test_bad_metadata_is_refused(good, changes, fragment):
    path, ckpt = good
    refused(rewrite(path, ckpt, **changes), fragment)


@pytest.mark.parametrize("table, fragment", [
    ({"dtype": "uint8", "layers": {}}, "'layers' must be a non-empty object"),
    ({"dtype": "uint8", "layers": {"features.conv1": [0.0, 0]}}, "scale 0.0 is not a finite number"),
    ({"dtype": "uint8", "layers": {"features.conv1": [1e300, 0]}}, "scale 1e+300"),
    ({"dtype": "uint8", "layers": {"features.conv1": [0.1, 0.5]}}, "zero point 0.5 is not an integer"),
    ({"dtype": "int8", "layers": {"features.conv1": [0.1, 200]}}, "in [-128, 127]"),
    ({"dtype": "int4", "layers": {"features.conv1": [0.1, 0]}}, "dtype must be 'uint8' or 'int8'"),
    ({"dtype": "uint8", "layers": {"features.nowhere": [0.1, 0]}}, "'features.nowhere', which squeezenet1_1"),
    ([1, 2], "expected an object with exactly 'dtype' and 'layers'"),
])
def test_broken_quantisation_tables_are_refused(good, table, fragment):
    path, ckpt = good
    bad = save_checkpoint(path.parent / "bad.h5", Checkpoint(
        arch=ckpt.arch, config=ckpt.config, tensors=ckpt.tensors, class_names=ckpt.class_names,
        preprocessing=ckpt.preprocessing,
        extra={"activation_quantization": table, "simulate_activation_quantization": True}))
    refused(bad, fragment)


def _edit(path, fn, sign=True):
    with h5py.File(path, "a") as f:
        fn(f)
    if sign:
        resign(path)
    return path


def _tensors_as_dataset(f):
    del f["tensors"]
    f["tensors"] = np.zeros(3, np.float32)


def _big_dataset(f):
    del f["tensors/head/classifier/conv/bias"]
    f.create_dataset("tensors/head/classifier/conv/bias", shape=(1 << 20, 1 << 20), dtype="float32",
                     chunks=(16, 16), compression="gzip")


def _int_dataset(f):
    del f["tensors/head/classifier/conv/bias"]
    f["tensors/head/classifier/conv/bias"] = np.zeros(3, np.int32)


def _nan_dataset(f):
    f["tensors/head/classifier/conv/bias"][0] = np.nan


def _external(f):
    del f["tensors/head/classifier/conv/bias"]
    f["tensors/head/classifier/conv/bias"] = h5py.ExternalLink("/dev/zero", "/x")


@pytest.mark.parametrize("edit, fragment", [
    (lambda f: f.attrs.__setitem__("format_version", np.array([2, 2])), "attribute 'format_version' must be an integer"),
    (lambda f: f.attrs.__setitem__("format_version", "2"), "attribute 'format_version' must be an integer"),
    (lambda f: f.attrs.__setitem__("format_version", 0), "format_version 0 is not a version"),
    (lambda f: f.attrs.__setitem__("config", np.bytes_(b"\xff\xfe")), "attribute 'config' is not UTF-8"),
    (lambda f: f.attrs.__setitem__("config", np.arange(4)), "attribute 'config' must be a string"),
    (_tensors_as_dataset, "'tensors' is a Dataset, expected a group"),
    (_big_dataset, "declares shape (1048576, 1048576)"),
    (_int_dataset, "tensor 'head.classifier.conv.bias' has dtype int32"),
    (_nan_dataset, "tensor 'head.classifier.conv.bias' contains NaN or Inf"),
    (_external, "'head.classifier.conv.bias' is listed in the digests but missing"),
])
def test_bad_structure_is_refused_before_reading(good, edit, fragment):
    path, _ = good
    refused(_edit(path, edit, sign=edit not in (_tensors_as_dataset, _external, _big_dataset)), fragment)


def test_negative_batch_norm_variances_are_refused(tmp_path):
    model = build("mobilenet_v3_small", num_classes=2)
    tensors = model.state_dict()
    tensors["features.stem.bn.running_var"] = -np.ones_like(tensors["features.stem.bn.running_var"])
    path = save_checkpoint(tmp_path / "v3.h5", Checkpoint(arch=model.arch, config=model.config, tensors=tensors,
                                                          class_names=["a", "b"], preprocessing=dict(SMALL)))
    refused(path, "tensor 'features.stem.bn.running_var' holds negative variances")


def test_a_flipped_byte_in_a_tensor_is_caught_by_its_digest(good):
    path, ckpt = good
    with h5py.File(path) as f:
        offset = f["tensors/features/fire5/expand3x3/conv/weight"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 1001] ^= 0x10
    path.write_bytes(bytes(data))
    refused(path, "tensor 'features.fire5.expand3x3.conv.weight' does not match its SHA-256 digest")


def test_edited_metadata_and_deleted_or_added_tensors_are_caught(good):
    path, _ = good
    _edit(path, lambda f: f.attrs.__setitem__("class_names", json.dumps(["x", "b", "c"])), sign=False)
    refused(path, "metadata does not match its SHA-256 digest")
    path, _ = good
    with h5py.File(path, "a") as f:
        f.attrs["class_names"] = json.dumps(["a", "b", "c"])
        del f["tensors/features/conv1/conv/bias"]
    refused(path, "tensor 'features.conv1.conv.bias' is listed in the digests but missing")


def test_version_1_files_without_digests_still_load(good):
    path, _ = good
    with h5py.File(path, "a") as f:
        del f.attrs["digests"]
        f.attrs["format_version"] = 1
    clf = load(str(path), engine="numpy")
    assert np.isfinite(clf.predict(IMAGE)).all()
    with h5py.File(path, "a") as f:  # version 2 must carry its digests
        f.attrs["format_version"] = FORMAT_VERSION
    refused(path, "missing attribute 'digests'")


@pytest.fixture
def overflowing(good):
    """Signed, finite weights whose logits overflow float32: loads, then every score is non-finite."""
    path, ckpt = good
    tensors = dict(ckpt.tensors)
    tensors["head.classifier.conv.bias"] = np.array([3e38, -3e38, 3e38], np.float32)
    tensors["head.classifier.conv.weight"] = np.full_like(tensors["head.classifier.conv.weight"], 3e38)
    return rewrite(path, ckpt, name="overflow.h5", tensors=tensors)


def test_non_finite_scores_are_an_error_in_the_api(overflowing):
    clf = load(str(overflowing), engine="numpy")
    with pytest.raises(CheckpointError, match=r"overflow\.h5: the network produced non-finite scores for 1 of 1"):
        clf.predict(IMAGE)


def _cli(module, *args):
    env = dict(os.environ, LIGHTCNN_ENGINE="numpy")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_predict_prints_no_nan_and_exits_1(overflowing, tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(IMAGE).save(image)
    result = _cli("lightcnn.predict", "--weights", overflowing, "--json", image)
    assert result.returncode == 1 and "NaN" not in result.stdout and result.stdout.strip() == ""
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "non-finite scores" in line]


@pytest.mark.parametrize("cli", [("lightcnn.weights", "info"), ("lightcnn.predict", "--weights")])
def test_clis_give_one_line_for_a_bad_file(good, tmp_path, cli):
    path, _ = good
    bad = _edit(path.parent / path.name, lambda f: f.attrs.__setitem__("config", "[1, 2]"))
    bad = bad.rename(bad.parent / "bad.h5")
    args = [*cli, bad] + (["--json", tmp_path / "none.png"] if cli[0] == "lightcnn.predict" else [])
    result = _cli(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "bad.h5" in line]
    assert errors and "attribute 'config' must be an object" in errors[0]
