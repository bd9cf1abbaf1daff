"""The model zoo, parametrised over the registry and the torchvision fixtures.

- parameter counts equal torchvision's; MACs equal the published figures;
- converted torchvision checkpoints reproduce the reference logits and pooled features;
- real ImageNet weights reach the issue's top-1 floors on the 1000-image sample (slow);
- builders, summaries, features/head split and head reset behave.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lightcnn.checkpoint import load_state
from lightcnn.models import BUILDERS, build
from lightcnn.registry import REGISTRY

TORCHVISION = ["mobilenet_v2", "squeezenet1_0", "squeezenet1_1", "mobilenet_v3_large", "mobilenet_v3_small"]

# torchvision's own counts (also in shared/fixtures/torchvision/MANIFEST.json, checked below)
TORCHVISION_PARAMS = {"mobilenet_v2": 3_504_872, "squeezenet1_0": 1_248_424, "squeezenet1_1": 1_235_496,
                      "mobilenet_v3_large": 5_483_032, "mobilenet_v3_small": 2_542_856}
# multiply-accumulates at 224x224 for one image (torchvision's model cards: 0.30, 0.82, 0.35, 0.22, 0.06 GFLOPS)
PUBLISHED_MACS = {"mobilenet_v2": 300.8e6, "squeezenet1_0": 819e6, "squeezenet1_1": 349e6,
                  "mobilenet_v3_large": 217e6, "mobilenet_v3_small": 56.5e6}


@pytest.mark.parametrize("arch", TORCHVISION)
def test_parameter_count_equals_torchvision(arch):
    assert build(arch).count_params() == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize("arch", TORCHVISION)
def test_parameter_count_equals_fixture_manifest(arch, fixtures_dir):
    manifest = json.loads((fixtures_dir / "torchvision" / "MANIFEST.json").read_text())
    assert build(arch).count_params() == manifest[arch]["num_params"]


@pytest.mark.parametrize("arch", TORCHVISION)
def test_macs_equal_published(arch):
    macs = build(arch).count_macs(224)
    assert abs(macs - PUBLISHED_MACS[arch]) / PUBLISHED_MACS[arch] < 0.005, f"{arch}: {macs / 1e6:.2f}M MACs"


def test_mobilenet_v2_macs_exactly():
    # conv + dense multiply-accumulates of torchvision's MobileNetV2 at 224: 300,774,272
    assert build("mobilenet_v2").count_macs(224) == 300_774_272


@pytest.fixture(scope="module")
def converted(fixtures_dir):
    from lightcnn.weights import convert_file

    cache = {}

    def get(arch):
        if arch not in cache:
            ckpt = convert_file(fixtures_dir / "torchvision" / f"{arch}.pth", arch)
            model = load_state(build(arch, **ckpt.config), ckpt.tensors)
            io = np.load(fixtures_dir / "torchvision" / f"{arch}_io.npz")
            cache[arch] = (model, io)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_fixture_logits(arch, converted):
    """Converted without torch, the engine reproduces torchvision's logits within 1e-4 absolute."""
    model, io = converted(arch)
    logits = model.forward(io["input_nhwc"])
    assert np.max(np.abs(logits - io["logits"])) <= 1e-4
    assert list(np.argmax(logits, 1)) == list(np.argmax(io["logits"], 1))


@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_fixture_pooled_features(arch, converted):
    model, io = converted(arch)
    pooled = model.features(io["input_nhwc"]).mean(axis=(1, 2))
    assert np.max(np.abs(pooled - io["features_pooled"].reshape(pooled.shape))) <= 1e-4


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_builder_runs_and_reports(arch):
    model = build(arch)
    h, w, c = model.input_shape
    x = np.random.default_rng(0).standard_normal((2, h, w, c)).astype(np.float32)
    logits = model.forward(x)
    assert logits.shape == (2, model.config["num_classes"]) and np.all(np.isfinite(logits))
    # features -> head is the same computation as forward
    np.testing.assert_allclose(model.head(model.features(x)), logits, rtol=1e-5, atol=1e-5)
    text = model.summary()
    assert f"{model.count_params():,d}" in text
    cam_paths = dict(model.named_layers())
    assert model.cam_layer in cam_paths, f"default CAM layer {model.cam_layer} is not a layer"


def test_summary_rows_sum_to_totals():
    model = build("mobilenet_v3_small")
    rows = model.trace(np.zeros((1, 224, 224, 3), np.float32))
    assert sum(r["params"] for r in rows) == model.count_params()
    assert rows[0]["name"] == "features.stem" and rows[0]["out_shape"] == (1, 112, 112, 16)


def test_covid_squeezenet_shapes_follow_the_paper():
    """Seed 001, Fig. 3: 227x227x1 input, [56,56,128] after fire2, 4x upsampling of fire9 (14 -> 56)."""
    model = build("covid_squeezenet")
    rows = {r["name"]: r["out_shape"] for r in model.trace(np.zeros((1, 227, 227, 1), np.float32))}
    assert rows["features.early.fire2.expand3x3"][1:3] == (56, 56)
    assert rows["features.late.fire9.expand3x3"][1:3] == (14, 14)
    assert rows["features.upsample"] == (1, 56, 56, 128)
    assert rows["features.fuse"] == (1, 56, 56, 128)


def test_squeezenet_variants():
    caffe = build("squeezenet1_0", variant="caffe")
    rows = {r["name"]: r["out_shape"] for r in caffe.trace(np.zeros((1, 227, 227, 3), np.float32))}
    assert rows["head.classifier"][1:3] == (15, 15), "Caffe's conv_final pads by 1: 13x13 -> 15x15"
    bypass = build("squeezenet1_1", fire="bn_elu", bypass="simple")
    assert [n for n, l in bypass.features_net.layers if getattr(l, "bypass", False)] == \
        ["fire3", "fire5", "fire7", "fire9"]
    with pytest.raises(ValueError):
        build("squeezenet1_0", fire="fancy")


def test_mobilenet_v2_elu_and_tf_padding_variants():
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    torch_pad = build("mobilenet_v2", seed=3)
    tf_pad = build("mobilenet_v2", padding="tf", seed=3)
    elu = build("mobilenet_v2", activation="elu", seed=3)
    assert torch_pad.features_net["stem"].conv.pads(224, 224) == (1, 1, 1, 1)
    assert tf_pad.features_net["stem"].conv.pads(224, 224) == (0, 1, 0, 1)
    assert elu.features_net["blocks"][3].dw.act_name == "elu"
    assert not np.allclose(torch_pad.forward(x), tf_pad.forward(x))


def test_dense_head_of_seed_003():
    model = build("mobilenet_v2_dense", num_classes=2)
    widths = [layer.out_features for _, layer in model.head_net.layers if hasattr(layer, "out_features")]
    assert widths == [64, 64, 64, 32, 32, 2]


def test_reset_head_keeps_features_and_changes_classes():
    model = build("mobilenet_v3_small")
    before = model.features_net["stem"].conv.params["weight"].copy()
    model.reset_head(3)
    x = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    assert model.forward(x).shape == (1, 3)
    np.testing.assert_array_equal(model.features_net["stem"].conv.params["weight"], before)
    np.testing.assert_allclose(model.head_after_pool().forward(model.pooled(x)), model.forward(x), rtol=1e-5)


# -- real ImageNet weights on the 1000-image sample ----------------------------------------

TOP1_FLOORS = {"mobilenet_v2": 0.863, "mobilenet_v2_keras": 0.868, "mobilenet_v3_small": 0.751,
               "squeezenet1_0_caffe": 0.620}


@pytest.fixture(scope="module")
def built_weights(tmp_path_factory, sources_dir):
    """Build the real checkpoints into a temporary weights folder (never the user's)."""
    import os

    from lightcnn.registry import get_spec
    from lightcnn.weights import build_one

    out = tmp_path_factory.mktemp("weights")
    old = {k: os.environ.get(k) for k in ("LIGHTCNN_SOURCES", "LIGHTCNN_WEIGHTS")}
    os.environ["LIGHTCNN_SOURCES"], os.environ["LIGHTCNN_WEIGHTS"] = str(sources_dir), str(out)
    try:
        for name in TOP1_FLOORS:
            build_one(get_spec(name), out_dir=out)
        yield out
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TOP1_FLOORS))
def test_real_weights_top1_on_imagenet_sample(name, built_weights, data_dir):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from imagenet_accuracy import evaluate
    finally:
        sys.path.pop(0)
    top1, top5, _, _ = evaluate(name, data_dir / "imagenet-sample", progress=False)
    assert top1 >= TOP1_FLOORS[name], f"{name}: top-1 {top1:.3f} below {TOP1_FLOORS[name]}"


def test_registry_entries_are_complete():
    for name, spec in REGISTRY.items():
        assert spec.arch in BUILDERS, name
        assert spec.url.startswith("https://") and len(spec.sha256) >= 8, name
        assert spec.url.endswith(spec.filename) or spec.filename in spec.url, name


@pytest.mark.slow
def test_squeezenet_caffe_matches_reference_runtime_image_by_image(built_weights, data_dir, fixtures_dir):
    """Same float maths as the reference (PyTorch functional ops on the Caffe network): with the reference's
    preprocessing (shorter side 256, centre 227) the per-image top-1 agrees on >= 97% of the sample and the
    accuracy lands within half a point of its 62.3%. The registry's default, Caffe's own 256x256 resize, scores
    higher (65.8%, as the shared SOURCES.md measured with an independent decoder)."""
    import csv
    import dataclasses

    import lightcnn
    from lightcnn.preprocess import preprocess_batch

    reference = json.loads((fixtures_dir / "reference" / "imagenet_sample_reference.json").read_text())
    ref_top1 = [row[0] for row in reference["squeezenet_v1.0_deep_compression"]["top5_idx"]]
    clf = lightcnn.load(str(built_weights / "squeezenet1_0_caffe.h5"))
    spec = dataclasses.replace(clf.preprocessing, resize="shorter")
    folder = data_dir / "imagenet-sample"
    rows = list(csv.DictReader(open(folder / "labels.csv", encoding="utf-8")))
    ours = []
    for i in range(0, len(rows), 50):
        batch = preprocess_batch([folder / "images" / r["file"] for r in rows[i:i + 50]], spec)
        ours.extend(np.argmax(clf.model.forward(batch), axis=1))
    ours = np.array(ours)
    agreement = np.mean(ours == np.array(ref_top1))
    top1 = np.mean(ours == np.array([int(r["class_index"]) for r in rows]))
    assert agreement >= 0.97, f"agreement with the reference runtime {agreement:.3f}"
    assert abs(top1 - reference["squeezenet_v1.0_deep_compression"]["top1"]) <= 0.005
