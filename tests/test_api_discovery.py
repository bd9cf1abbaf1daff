"""Finding models and weights (list_models, weights tags, meta, did-you-mean) and the embedding API on the
public Classifier (features, pooled, reset_head), with the real mobilenet_v2 weights the session builds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import lightcnn
from lightcnn.errors import CheckpointError
from lightcnn.models import BUILDERS
from lightcnn.registry import REGISTRY, WEIGHTS
from lightcnn.weights import META_FIELDS, sha256_of
from tests.conftest import require_path, shared_path


@pytest.fixture(scope="module")
def v2():
    try:
        return lightcnn.load("mobilenet_v2", engine="numpy")
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def images():
    root = require_path(shared_path("LIGHTCNN_DATA", "data") / "smoke-test-images", "smoke-test images")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in (".bmp", ".jpg", ".jpeg", ".png"))[:3]
    assert len(paths) >= 2
    return paths


# -- discovery -----------------------------------------------------------------------------------------------

def test_list_models_splits_architectures_by_registered_weights():
    everything = lightcnn.list_models()
    assert everything == sorted(BUILDERS)
    pretrained, untrained = lightcnn.list_models(pretrained=True), lightcnn.list_models(pretrained=False)
    assert sorted(pretrained + untrained) == everything and not set(pretrained) & set(untrained)
    assert set(pretrained) == {spec.arch for spec in WEIGHTS}
    assert "covid_squeezenet" in untrained and "mobilenet_v2" in pretrained
    assert lightcnn.list_weights("mobilenet_v2") == ["mobilenet_v2", "mobilenet_v2_keras", "mobilenet_v2_torchvision"]


@pytest.mark.parametrize("spec", WEIGHTS, ids=lambda s: s.name)
def test_every_registry_name_has_an_arch_and_tag_form(spec):
    from lightcnn.registry import resolve_name

    assert spec.tag and resolve_name(spec.arch, spec.tag) == spec.name == resolve_name(f"{spec.arch}.{spec.tag}")
    assert resolve_name(spec.name) == spec.name  # today's names stay aliases


def test_tags_resolve_and_mistakes_are_named(monkeypatch, tmp_path):
    from lightcnn.registry import resolve_name

    assert resolve_name("mobilenet_v2", "keras") == "mobilenet_v2_keras"
    assert resolve_name("squeezenet1_0", "default") == "squeezenet1_0"
    assert resolve_name("mobilenet_v3_small", "default") == "mobilenet_v3_small"
    monkeypatch.setenv("LIGHTCNN_WEIGHTS", str(tmp_path))  # nothing built: the names must fail on the name
    with pytest.raises(CheckpointError, match=r"did you mean 'keras'"):
        lightcnn.load("mobilenet_v2", weights="kears")
    with pytest.raises(CheckpointError, match=r"did you mean 'mobilenet_v2'"):
        lightcnn.load("mobilenet_v22")
    with pytest.raises(CheckpointError, match=r"did you mean 'mobilenet_v3_small'"):
        lightcnn.load("mobilenet_v3_smal", weights="default")
    with pytest.raises(CheckpointError, match="no registered weights"):
        lightcnn.load("covid_squeezenet", weights="default")


def test_cli_error_line_suggests_the_name(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lightcnn.predict", "--model", "mobilenet_v2_kera", "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "did you mean 'mobilenet_v2_keras'" in done.stderr


def test_load_by_architecture_and_tag_is_the_registered_file(v2):
    keras_spec = REGISTRY["mobilenet_v2_keras"]
    try:
        by_tag = lightcnn.load("mobilenet_v2", weights="keras", engine="numpy")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    assert by_tag.name == "mobilenet_v2_keras" == lightcnn.load("mobilenet_v2.keras").name
    assert by_tag.preprocessing.mean == keras_spec.preprocessing.mean != v2.preprocessing.mean
    assert lightcnn.load("mobilenet_v2", weights="default").weights_path == v2.weights_path


def test_meta_describes_the_model_and_its_file(v2):
    meta = v2.meta
    assert tuple(meta) == META_FIELDS
    spec = REGISTRY["mobilenet_v2"]
    assert meta["name"] == "mobilenet_v2" and meta["arch"] == "mobilenet_v2" and meta["tag"] == "tfslim"
    # batch norm folded into the convolutions (TFLite): the file's tensors are exactly the parameters
    assert meta["parameters"] == v2.model.count_params() == sum(t.size for t in v2.checkpoint.tensors.values())
    assert meta["macs"] == v2.model.count_macs(224) and 290e6 < meta["macs"] < 310e6
    assert meta["file_size"] == os.path.getsize(v2.weights_path)
    assert meta["weights_sha256"] == sha256_of(v2.weights_path) == v2.weights_sha256
    assert (meta["published_top1"], meta["measured_top1"]) == (spec.published_top1, spec.sample_top1)
    assert meta["licence"] == spec.licence and meta["source"] == spec.source
    assert meta["source_sha256"] == spec.sha256 and meta["num_classes"] == 1000


def test_weights_list_json_prints_the_same_fields(v2):
    done = subprocess.run([sys.executable, "-m", "lightcnn.weights", "list", "--json"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["name"] for r in rows] == [s.name for s in WEIGHTS]
    assert all(tuple(r) == META_FIELDS for r in rows)
    mine = next(r for r in rows if r["name"] == "mobilenet_v2")
    assert mine == {**v2.meta, "file": str(v2.weights_path)}


# -- embeddings and a new head on the public object ----------------------------------------------------------

def test_features_and_pooled_agree_for_every_kind_of_input(v2, images):
    batch = v2.batch([str(p) for p in images])
    maps = v2.features(batch)
    assert maps.shape == (len(images), 7, 7, 1280) and maps.dtype == np.float32
    np.testing.assert_allclose(v2.pooled(batch), maps.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    # pooled features are what the classifier sees: logits = pooled @ W + b
    dense = v2.model.head_net.layers[-1][1]
    np.testing.assert_allclose(v2.pooled(batch) @ dense.params["weight"] + dense.params["bias"], v2.logits(batch),
                               rtol=1e-4, atol=1e-4)
    # paths, PIL images and uint8 arrays give the same embeddings as the preprocessed batch
    pil = [Image.open(p).convert("RGB") for p in images]
    np.testing.assert_allclose(v2.pooled([str(p) for p in images]), v2.pooled(batch), atol=1e-6)
    np.testing.assert_allclose(v2.pooled(pil), v2.pooled(batch), atol=1e-6)
    np.testing.assert_allclose(v2.pooled(np.asarray(pil[0]))[0], v2.pooled(batch)[0], atol=1e-6)
    np.testing.assert_allclose(v2.features(batch, batch_size=1), maps, atol=1e-6)  # chunking changes nothing
    assert not np.allclose(v2.pooled(batch)[0], v2.pooled(batch)[1])


def test_reset_head_changes_the_classes_and_logits_follow_the_new_head(images):
    try:
        clf = lightcnn.load("mobilenet_v2", engine="numpy")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    batch = clf.batch([str(p) for p in images])
    pooled_before = clf.pooled(batch)
    assert clf.reset_head(3, ["cat", "dog", "other"], seed=1) is clf
    assert clf.class_names == ["cat", "dog", "other"] and clf.predict(batch).shape == (len(images), 3)
    dense = clf.model.head_net.layers[-1][1]
    assert dense.params["weight"].shape == (1280, 3)
    np.testing.assert_allclose(clf.pooled(batch), pooled_before, atol=1e-6)  # the trunk is untouched
    np.testing.assert_allclose(clf.logits(batch), pooled_before @ dense.params["weight"] + dense.params["bias"],
                               rtol=1e-4, atol=1e-5)
    assert clf.topk(batch, k=1)[0][0].label in clf.class_names
    assert clf.meta["num_classes"] == 3 and clf.meta["parameters"] == clf.model.count_params()
    assert clf.meta["published_top1"] is None  # the registry's accuracy no longer describes this model
    with pytest.raises(ValueError, match="2 class names for 3"):
        clf.reset_head(3, ["a", "b"])
