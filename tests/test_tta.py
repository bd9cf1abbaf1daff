"""Test-time augmentation (lightcnn.tta): `none` is the plain path bit for bit; `flip` and `ten-crop` equal an
oracle written here with plain NumPy/PIL (its own resize and crop arithmetic, one forward per view, the mean of
the softmax probabilities); the crop offsets follow torchvision's FiveCrop on an odd, non-square image; evaluate,
predict and the API carry the mode through to their outputs."""

import json

import numpy as np
import pytest
from PIL import Image

import lightcnn
from lightcnn.checkpoint import Checkpoint, save_checkpoint
from lightcnn.errors import ShapeError
from lightcnn.models import build
from lightcnn.preprocess import Preprocessing, five_crop_boxes, ten_crop_uint8

SIZE = 32  # the tiny models' input side; ten-crop resizes to round(32 / 0.875) = 37
RULES = {
    "shorter": Preprocessing(size=SIZE, resize="shorter", resize_size=36),  # torchvision-like, ImageNet mean/std
    "stretch": Preprocessing(size=SIZE, resize="stretch", resize_size=SIZE, channel_order="BGR", input_range=255.0,
                             mean=(104.0, 117.0, 123.0), std=(58.0, 57.0, 57.5)),
    "central_fraction": Preprocessing(size=SIZE, resize="central_fraction", crop_fraction=0.875, input_range=255.0,
                                      mean=(128.0, 128.0, 128.0), std=(128.0, 128.0, 128.0)),
    "square": Preprocessing(size=SIZE, resize="square", resize_size=36),
}


def _tiny(path, spec):
    model = build("mobilenet_v2", width_mult=0.35, num_classes=10, seed=0)
    save_checkpoint(path, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                                     class_names=[f"c{i}" for i in range(10)], preprocessing=spec.to_dict(),
                                     provenance={"source_file": "random init"}))
    return lightcnn.load(str(path), engine="numpy")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    return {rule: _tiny(root / f"{rule}.h5", spec) for rule, spec in RULES.items()}


def _image(rng, width=70, height=45):
    """A smooth colour image (so a one-pixel shift changes little but not nothing) plus noise, odd-sized."""
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([128 + 90 * np.sin(xx / 5.0 + c) * np.cos(yy / 7.0 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- the oracle


def _oracle_resize(img, spec, side):
    """PIL image resized by the rule of `spec` to `side` (our own arithmetic, not lightcnn's)."""
    w, h = img.size
    if spec.resize == "shorter":
        new = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)  # torchvision's Resize(int)
        return img.resize(new, Image.Resampling.BILINEAR)
    if spec.resize == "central_fraction":
        top, left = int((h - h * spec.crop_fraction) / 2), int((w - w * spec.crop_fraction) / 2)
        img = img.crop((left, top, w - left, h - top))
    return img.resize((side, side), Image.Resampling.BILINEAR)


def _oracle_plain(img, spec):
    """The plain view's uint8 RGB pixels: resize + centre crop as each family's reference code does."""
    if spec.resize in ("shorter", "square"):
        r = _oracle_resize(img, spec, spec.resize_size) if spec.resize == "shorter" else img.resize(
            (spec.resize_size, spec.resize_size), Image.Resampling.BILINEAR)
        a = np.asarray(r)
        h, w = a.shape[:2]
        if spec.resize == "shorter":
            top, left = int(round((h - SIZE) / 2.0)), int(round((w - SIZE) / 2.0))
        else:
            top, left = (h - SIZE) // 2, (w - SIZE) // 2
        return a[top:top + SIZE, left:left + SIZE]
    return np.asarray(_oracle_resize(img, spec, SIZE))


def _oracle_ten_crop(img, spec):
    """Ten uint8 RGB views: resize to 37 by the rule, four corners + centre (FiveCrop), then the same five of the
    mirrored image (TenCrop)."""
    a = np.asarray(_oracle_resize(img, spec, int(round(SIZE / 0.875))))
    h, w = a.shape[:2]
    ct, cl = int(round((h - SIZE) / 2.0)), int(round((w - SIZE) / 2.0))

    def five(b):
        return [b[:SIZE, :SIZE], b[:SIZE, w - SIZE:], b[h - SIZE:, :SIZE], b[h - SIZE:, w - SIZE:],
                b[ct:ct + SIZE, cl:cl + SIZE]]
    return five(a) + five(a[:, ::-1])


def _oracle_normalise(rgb, spec):
    x = np.asarray(rgb, np.float64)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    x = x / 255.0 * spec.input_range
    return ((x - np.array(spec.mean)) / np.array(spec.std)).astype(np.float32)


def _oracle_views(img, spec, tta):
    if tta == "flip":
        x = _oracle_normalise(_oracle_plain(img, spec), spec)
        return [x, x[:, ::-1]]
    return [_oracle_normalise(v, spec) for v in _oracle_ten_crop(img, spec)]


def _oracle_probs(clf, images, tta):
    """Each view through the network on its own, softmax in float64, the mean over the views."""
    out = []
    for img in images:
        probs = []
        for view in _oracle_views(Image.fromarray(img), clf.preprocessing, tta):
            z = clf.model.forward(np.ascontiguousarray(view[None], np.float32))[0].astype(np.float64)
            e = np.exp(z - z.max())
            probs.append(e / e.sum())
        out.append(np.mean(probs, axis=0))
    return np.array(out)


# --------------------------------------------------------------------------------------------- tests


def test_five_crop_boxes_follow_torchvision_on_an_odd_non_square_image():
    # 57 x 37 (what shorter-side 37 makes of a 70 x 45 image): the centre offsets are (57-32)/2 = 12.5 and
    # (37-32)/2 = 2.5, which torchvision's CenterCrop rounds half to even: 12 and 2, not 13 and 3.
    assert five_crop_boxes(57, 37, 32) == [(0, 0, 32, 32), (25, 0, 57, 32), (0, 5, 32, 37), (25, 5, 57, 37),
                                           (12, 2, 44, 34)]
    assert five_crop_boxes(256, 256, 224)[4] == (16, 16, 240, 240)
    assert five_crop_boxes(59, 39, 32)[4] == (14, 4, 46, 36)  # 13.5 -> 14 and 3.5 -> 4 (half to even)
    with pytest.raises(ValueError, match="does not fit"):
        five_crop_boxes(31, 40, 32)


def test_ten_crop_pixels_equal_torchvision_where_installed(rng):
    """torchvision's ten_crop, view for view, on margins of 5 (odd on both axes: the mirrored image's centre crop
    then differs by a pixel from the mirror of the first centre crop)."""
    torch = pytest.importorskip("torch")
    try:
        import torchvision.transforms.functional as tvf
    except Exception as exc:  # not installed, or (RuntimeError) a wheel built for another torch than this one
        pytest.skip(f"torchvision unusable here: {type(exc).__name__}: {str(exc).splitlines()[-1][:120]}")
    spec = Preprocessing(size=SIZE, resize="stretch", resize_size=SIZE)
    img = Image.fromarray(_image(rng))
    resized = np.asarray(img.resize((37, 37), Image.Resampling.BILINEAR))
    tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    ours = ten_crop_uint8(img, spec).transpose(0, 3, 1, 2)
    for i, crop in enumerate(tvf.ten_crop(tensor, [SIZE, SIZE])):
        np.testing.assert_array_equal(ours[i], crop.numpy())


def test_ten_crop_mirrored_centre_is_cut_from_the_mirrored_image(rng):
    """With an odd margin (37 - 32 = 5: the centre offset rounds 2.5 to 2) the mirrored image's centre crop starts
    at column 2 of the mirror, i.e. column 3 of the image: not the mirror of the first centre crop."""
    spec = Preprocessing(size=SIZE, resize="stretch", resize_size=SIZE)
    img = Image.fromarray(_image(rng))
    a = np.asarray(img.resize((37, 37), Image.Resampling.BILINEAR))
    views = ten_crop_uint8(img, spec)
    np.testing.assert_array_equal(views[4], a[2:34, 2:34])
    np.testing.assert_array_equal(views[9], a[2:34, 3:35][:, ::-1])
    assert not np.array_equal(views[9], views[4][:, ::-1])


@pytest.mark.parametrize("rule", list(RULES))
def test_ten_crop_views_equal_the_oracle_views(models, rng, rule):
    clf = models[rule]
    img = _image(rng)
    ours = clf.views(img, "ten-crop")
    assert ours.shape == (10, SIZE, SIZE, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, np.stack(_oracle_views(Image.fromarray(img), clf.preprocessing, "ten-crop")),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("tta", ["flip", "ten-crop"])
@pytest.mark.parametrize("rule", list(RULES))
def test_tta_probabilities_equal_the_oracle(models, rng, rule, tta):
    clf = models[rule]
    images = [_image(rng), _image(rng, 45, 70), _image(rng, 33, 33)]
    expected = _oracle_probs(clf, images, tta)
    got = clf.predict(images, batch_size=4, tta=tta)  # 4 views per forward pass: views of images mix in a chunk
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # and the averaging matters: the views disagree, so the plain prediction is not the same
    assert np.abs(got - clf.predict(images)).max() > 1e-4


def test_none_is_the_plain_path_bit_for_bit(models, rng):
    from lightcnn.postprocess import softmax

    clf = models["shorter"]
    images = [_image(rng), _image(rng, 45, 70)]
    plain = softmax(clf.model.forward(clf.preprocess(images)))
    assert np.array_equal(clf.predict(images, tta="none"), plain)
    assert np.array_equal(clf.predict(images), plain)
    assert np.array_equal(clf.views(images, "none"), clf.batch(images))
    # flip's first view is the plain view exactly, its second the NHWC mirror x[:, :, ::-1, :]
    flipped = clf.views(images, "flip")
    assert np.array_equal(flipped[0::2], clf.batch(images))
    assert np.array_equal(flipped[1::2], clf.batch(images)[:, :, ::-1, :])


def test_api_refuses_what_it_cannot_do(models, rng):
    clf = models["shorter"]
    batch = clf.batch([_image(rng)])
    assert clf.predict(batch, tta="flip").shape == (1, 10)  # flip works on a preprocessed batch
    with pytest.raises(ShapeError, match="ten-crop' needs the images"):
        clf.predict(batch, tta="ten-crop")
    with pytest.raises(ValueError, match="tta must be one of none, flip, ten-crop"):
        clf.predict(batch, tta="five-crop")
    top = clf.topk(_image(rng), k=2, tta="ten-crop")[0]
    assert len(top) == 2 and top[0].score >= top[1].score


@pytest.fixture(scope="module")
def folder(tmp_path_factory, models):
    """DATA/c0, DATA/c1 with 5 odd-sized images each, and the shorter-rule tiny model saved beside it."""
    root = tmp_path_factory.mktemp("tta-data")
    rng = np.random.default_rng(7)
    for c in ("c0", "c1"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(_image(rng, 60 + 3 * i, 41 + 2 * i)).save(root / "data" / c / f"{i}.png")
    _tiny(root / "tiny.h5", RULES["shorter"])
    return root


def test_evaluate_flip_reports_the_averaged_probabilities(folder, models, tmp_path, capsys):
    from lightcnn.evaluate import main as evaluate_main
    from lightcnn.metrics import classification_report, report_curves

    clf = models["shorter"]
    files = sorted((folder / "data").glob("c*/*.png"))
    y = np.array([int(p.parent.name[1]) for p in files])
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    expected = _oracle_probs(clf, images, "flip")
    out = tmp_path / "eval"
    assert evaluate_main([str(folder / "tiny.h5"), str(folder / "data"), "--split", "all", "--tta", "flip",
                          "--positive", "c1", "--threshold", "0.1", "--bootstrap", "0", "--batch-size", "3",
                          "--out", str(out), "--engine", "numpy", "-q"]) == 0
    assert "test-time augmentation flip (2 views per image)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["tta"] == "flip" and report["images"] == 10
    want = classification_report(y, expected, clf.class_names, positive="c1", n_bootstrap=0, seed=0)
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        assert report[key] == pytest.approx(want[key], abs=1e-9), key
    assert report["confusion_matrix"] == want["confusion_matrix"]
    curves = report_curves(y, expected, clf.class_names, "c1")
    np.testing.assert_allclose(report["curves"]["c1"]["thresholds"][1:], curves["c1"]["thresholds"][1:], rtol=1e-5)
    at = classification_report(y, expected, clf.class_names, positive="c1", n_bootstrap=0, seed=0, threshold=0.1)
    assert report["at_operating_point"]["confusion_matrix"] == at["confusion_matrix"]
    assert "test-time augmentation" in (out / "report.html").read_text()

    # --tta none (the default) gives today's report, and it is a different one
    plain = tmp_path / "plain"
    assert evaluate_main([str(folder / "tiny.h5"), str(folder / "data"), "--split", "all", "--positive", "c1",
                          "--bootstrap", "0", "--out", str(plain), "--engine", "numpy", "-q"]) == 0
    base = json.loads((plain / "report.json").read_text())
    assert base["tta"] == "none"
    plain_probs = clf.predict(images)
    assert base["curves"] == report_curves(y, plain_probs, clf.class_names, "c1")  # bit for bit
    assert base["curves"]["c1"]["thresholds"] != report["curves"]["c1"]["thresholds"]


def test_predict_cli_tta_scores_and_records(folder, models, tmp_path, capsys):
    from lightcnn.predict import main as predict_main

    clf = models["shorter"]
    files = sorted((folder / "data").glob("c*/*.png"))
    common = [*map(str, files), "--weights", str(folder / "tiny.h5"), "--json", "--topk", "10", "--engine", "numpy"]

    def scores(lines):
        return np.array([[p["score"] for p in sorted(json.loads(line)["topk"], key=lambda p: p["index"])]
                         for line in lines])

    def untimed(lines):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_ms")} for line in lines]

    assert predict_main(common) == 0
    plain = capsys.readouterr().out.splitlines()
    assert predict_main([*common, "--tta", "none"]) == 0
    assert untimed(capsys.readouterr().out.splitlines()) == untimed(plain)  # none: the same records, no "tta"
    assert all("tta" not in record for record in untimed(plain))
    for tta in ("flip", "ten-crop"):
        assert predict_main([*common, "--tta", tta]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert all(json.loads(line)["tta"] == tta for line in lines)
        images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
        np.testing.assert_allclose(scores(lines), _oracle_probs(clf, images, tta), rtol=0, atol=1e-6)  # 6 decimals
        # the chunked path (--out DIR, no Dask) gives the same records
        out = tmp_path / f"parts-{tta}"
        assert predict_main([*common, "--tta", tta, "--out", str(out), "--chunk-size", "4"]) == 0
        parts = [line for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
        np.testing.assert_allclose(scores(parts), scores(lines), rtol=1e-6, atol=1e-9)
        assert json.loads((out / "job.json").read_text())["tta"] == tta
    # resuming a chunked run with another mode is refused
    capsys.readouterr()
    assert predict_main([*common, "--out", str(tmp_path / "parts-flip"), "--resume"]) == 1
    assert "tta" in capsys.readouterr().err
