"""CAM and Grad-CAM (lightcnn.explain): equal where theory says so, right where the evidence is, and the
gradient they use checked against central differences through real blocks.

Tolerances are stated next to each check.
"""

import numpy as np
import pytest

from lightcnn.models.base import randomise_batchnorm_statistics
from lightcnn import explain as E
from lightcnn.errors import CheckpointError
from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import Dense, Dropout, GlobalAvgPool, MaxPool2d
from lightcnn.layers.blocks import Fire, InvertedResidual, conv_bn_act
from lightcnn.models import build
from lightcnn.models.base import Model
from tests.conftest import require_path, shared_path
from tests.gradcheck import numeric_gradient




def _normalised(maps):
    return np.stack([E.normalise_map(m) for m in maps])


# -- Grad-CAM at the last conv of a GAP + linear head = CAM up to scale ---------------------------------------------


@pytest.fixture(scope="module")
def small_v2():
    """MobileNetV2 (width 0.35, 10 classes, dropout 0.2 in the head), random weights and BN statistics, float64.

    Float64 because Grad-CAM's forward runs conv and batch norm separately while inference folds them: in
    float32 the two differ by rounding (~1e-4 relative after 17 random blocks), which is not what is tested."""
    model = build("mobilenet_v2", num_classes=10, width_mult=0.35, seed=3)
    return _to_float64(randomise_batchnorm_statistics(model, np.random.default_rng(7)))


def test_gradcam_equals_cam_on_gap_linear_head(small_v2, rng):
    x = rng.standard_normal((2, 128, 128, 3))
    cam = E.class_activation_map(small_v2, x)
    assert E.cam_head_kind(small_v2) == "dense"
    assert cam.layer == small_v2.cam_layer == "features.last"
    grad = E.grad_cam(small_v2, x, cam.class_index)           # default layer = model.cam_layer
    h, w = cam.maps.shape[1:]
    assert (h, w) == (4, 4)
    assert np.array_equal(grad.class_index, cam.class_index)
    assert np.all(cam.maps.max(axis=(1, 2)) > 0), "degenerate test: CAM has no positive evidence"
    # Same map up to a positive scale (after ReLU): normalised maps agree to (float32 map storage) rounding.
    np.testing.assert_allclose(_normalised(grad.maps), _normalised(cam.maps), rtol=0, atol=1e-6)
    # ... and the scale is exactly 1/(h w) (the GAP's): dropout off, batch norm on running statistics.
    # (Active dropout would rescale channels by 1/(1-p) or zero them; batch statistics would change A.)
    np.testing.assert_allclose(grad.maps, np.maximum(cam.maps, 0) / (h * w), rtol=1e-6, atol=1e-9)
    # The same at the container "features" (its output is features.last's).
    at_features = E.grad_cam(small_v2, x, cam.class_index, layer="features")
    np.testing.assert_allclose(at_features.maps, grad.maps, rtol=1e-6, atol=1e-7)


def test_cam_maps_average_to_the_logit(small_v2, rng):
    """Dense head: mean_ij M_c + b_c = y_c.  Conv head (SqueezeNet): mean_ij M_c = y_c.  rtol 1e-5 (float32)."""
    x = rng.standard_normal((2, 128, 128, 3))
    cam = E.class_activation_map(small_v2, x, class_index=[3, 7])
    logits = small_v2.forward(x)
    bias = small_v2.head_net["classifier"].params["bias"]
    np.testing.assert_allclose(cam.maps.mean(axis=(1, 2)) + bias[[3, 7]], logits[[0, 1], [3, 7]], rtol=1e-5,
                               atol=1e-5)

    sq = build("squeezenet1_1", num_classes=10, seed=2)
    assert E.cam_head_kind(sq) == "conv"
    xs = rng.standard_normal((2, 96, 96, 3)).astype(np.float32)
    cam = E.class_activation_map(sq, xs)
    logits = sq.forward(xs)
    assert np.array_equal(cam.class_index, logits.argmax(axis=1))
    np.testing.assert_allclose(cam.maps.mean(axis=(1, 2)), logits[[0, 1], cam.class_index], rtol=1e-5, atol=1e-6)
    assert cam.maps.shape == (2, 5, 5) and cam.layer == "head.classifier"


def test_gradcam_leaves_the_model_as_it_was(small_v2, rng):
    x = rng.standard_normal((1, 128, 128, 3))
    before = small_v2.forward(x)
    small_v2.features_net["stem"].set_frozen(True)              # a caller's own frozen flag must survive
    try:
        E.grad_cam(small_v2, x, 1, layer="features.blocks.5")
        flags = {name: layer.frozen for name, layer in small_v2.named_layers()}
        assert flags["features.stem"] and flags["features.stem.conv"]
        assert not any(v for k, v in flags.items() if not k.startswith("features.stem"))
    finally:
        small_v2.features_net["stem"].set_frozen(False)
    assert small_v2.head_net["dropout"].p == pytest.approx(0.2)
    assert all(layer.cache is None for _, layer in small_v2.named_layers())
    assert all(not layer.grads for _, layer in small_v2.named_layers()), "frozen backward must not fill grads"
    assert "forward" not in vars(small_v2.features_net["blocks"][5])
    np.testing.assert_array_equal(small_v2.forward(x), before)


def test_converted_mobilenet_v2_gradcam_equals_cam():
    """The same identity on the real converted weights and a real photo (skipped when not built)."""
    import lightcnn

    try:
        clf = lightcnn.load("mobilenet_v2")
    except CheckpointError as exc:
        pytest.skip(f"converted weights absent: {exc}")
    image = require_path(shared_path("LIGHTCNN_DATA", "data") / "smoke-test-images" / "cat.bmp", "cat.bmp")
    cam = clf.cam(image)
    grad = clf.cam(image, class_index=cam.class_index, method="gradcam")
    assert cam.method == "cam" and grad.method == "gradcam"
    assert clf.class_names[int(cam.class_index[0])] == "Egyptian cat"
    np.testing.assert_allclose(_normalised(grad.maps), _normalised(cam.maps), rtol=0, atol=1e-5)


# -- the map peaks where the evidence is ---------------------------------------------------------------------------


def _corner_model():
    """32x32 grey input; class 1 = "something bright", class 0 = "something dark". Weights set by hand.

    conv1 (3x3/2, BN, ReLU): ch0 = mean brightness - 0.3, ch1 = 0.3 - mean brightness        -> 16x16x2
    conv2 (3x3/2, ReLU):     ch0 <- ch0, ch1 <- ch1, ch2 = ch3 = 0                              -> 8x8x4
    head:  GAP -> dropout(0.5) -> dense: y1 = 5 * mean(ch0), y0 = mean(ch1)
    """
    conv1 = conv_bn_act(1, 2, 3, 2, "torch", act="relu", bn=True)
    conv1.conv.params["weight"] = np.stack([np.full((3, 3, 1), 1 / 9), np.full((3, 3, 1), -1 / 9)],
                                           axis=-1).astype(np.float32)
    conv1.bn.buffers["running_mean"] = np.array([0.3, -0.3], np.float32)
    conv2 = conv_bn_act(2, 4, 3, 2, "torch", act="relu", bn=False)
    w2 = np.zeros((3, 3, 2, 4), np.float32)
    w2[:, :, 0, 0] = w2[:, :, 1, 1] = 1 / 9
    conv2.conv.params["weight"] = w2
    features = Sequential([("conv1", conv1), ("conv2", conv2)])
    features.out_ch = 4
    dense = Dense(4, 2)
    dense.params["weight"] = np.array([[0, 5], [1, 0], [0, 0], [0, 0]], np.float32)
    head = Sequential([("pool", GlobalAvgPool()), ("dropout", Dropout(0.5)), ("classifier", dense)])
    model = Model("corner", {}, features, head, (32, 32, 1), cam_layer="features.conv2")
    model.params_changed()
    return model


def _corner_image(rng):
    """Dim noise everywhere, one bright 6x6 patch inside the top-left quadrant."""
    img = rng.uniform(0.0, 0.15, (1, 32, 32, 1)).astype(np.float32)
    img[0, 3:9, 4:10, 0] = 1.0
    return img


@pytest.mark.parametrize("method,layer", [("cam", None), ("gradcam", None), ("gradcam", "features.conv1"),
                                          ("gradcam", "features")])
def test_map_peaks_in_the_corner_that_carries_the_evidence(rng, method, layer):
    model = _corner_model()
    x = _corner_image(rng)
    ex = E.explain(model, x, class_index=1, layer=layer, method=method)
    m = ex.maps[0]
    h, w = m.shape
    i, j = np.unravel_index(np.argmax(m), m.shape)
    assert i < h // 2 and j < w // 2, f"{method} at {ex.layer}: peak at {(i, j)} of {m.shape}, not top-left"
    positive = np.maximum(m, 0)
    quadrant = positive[: h // 2, : w // 2].sum()
    assert quadrant > 0.9 * positive.sum(), f"{method} at {ex.layer}: only {quadrant / positive.sum():.2f} in corner"
    # Moving the patch to the bottom-right moves the peak there: the map follows the evidence, not a fixed spot.
    flipped = E.explain(model, x[:, ::-1, ::-1, :].copy(), class_index=1, layer=layer, method=method).maps[0]
    i2, j2 = np.unravel_index(np.argmax(flipped), flipped.shape)
    assert i2 >= h // 2 and j2 >= w // 2


def test_overlay_colours_follow_the_map():
    """Jet palette: the peak is drawn red, zero evidence blue, blended over the image (alpha 0.5)."""
    grey = np.full((32, 32, 3), 128, np.uint8)
    m = np.zeros((4, 4), np.float32)
    m[0, 0] = 2.0
    m[3, 3] = -5.0                                           # negative evidence is clipped, drawn like zero
    out = np.asarray(E.overlay(grey, m), dtype=np.int32)
    assert out.shape == (32, 32, 3)
    r, g, b = out[0, 0]
    assert r > b + 30 and r > g, out[0, 0]
    r, g, b = out[31, 31]
    assert b > r + 30 and b > g, out[31, 31]
    np.testing.assert_array_equal(out[31, 31], out[16, 31])   # clipped negative == zero
    pal = np.array(E.jet_palette()).reshape(256, 3)
    assert tuple(pal[0]) == (0, 0, 128) and tuple(pal[255]) == (128, 0, 0) and tuple(pal[128])[1] == 255


def test_upsample_is_pillow_bilinear_with_centres_aligned():
    m = np.array([[0.0, 1.0]], np.float32)
    up = E.upsample_map(m, (1, 4))
    # pixel centres at 0.5..3.5 in the output map to -0.25, 0.25, 0.75, 1.25 in the input (edge-clamped).
    np.testing.assert_allclose(up[0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_save_explanation_writes_png_and_raw_map(tmp_path):
    from PIL import Image

    m = np.arange(9, dtype=np.float32).reshape(3, 3) - 2
    png, npy = E.save_explanation(tmp_path / "x", np.zeros((30, 30, 3), np.uint8), m)
    np.testing.assert_array_equal(np.load(npy), m)
    with Image.open(png) as img:
        assert img.mode == "RGB" and img.size == (30, 30)
        px = np.asarray(img)
    assert px[29, 29, 0] > px[0, 0, 0]                     # the maximum (bottom-right) is the reddest


def test_explain_errors_are_clear(small_v2, rng):
    x = rng.standard_normal((1, 64, 64, 3))
    with pytest.raises(ValueError, match="no layer named 'features.nope'"):
        E.grad_cam(small_v2, x, 0, layer="features.nope")
    with pytest.raises(ValueError, match="Grad-CAM needs a spatial"):
        E.grad_cam(small_v2, x, 0, layer="head.classifier")
    with pytest.raises(ValueError, match="out of range"):
        E.class_activation_map(small_v2, x, class_index=10)
    v3 = build("mobilenet_v3_small", num_classes=5)
    assert E.cam_head_kind(v3) is None                      # GAP -> dense + hard-swish -> dense: not linear
    x32 = x.astype(np.float32)
    with pytest.raises(ValueError, match="use Grad-CAM"):
        E.class_activation_map(v3, x32)
    assert E.explain(v3, x32).method == "gradcam"
    assert all(layer.cache is None for _, layer in small_v2.named_layers())


# -- the gradient Grad-CAM uses, against central differences through blocks ----------------------------------------


def _to_float64(model):
    for _, layer in model.named_layers():
        layer.params = {k: v.astype(np.float64) for k, v in layer.params.items()}
        layer.buffers = {k: v.astype(np.float64) for k, v in layer.buffers.items()}
    model.params_changed()
    return model


def _block_model():
    """stem -> IR(SE, hard-swish, residual) -> IR(stride 2, ReLU6) -> Fire(BN, ELU) -> max-pool -> 1x1
    -> GAP/dropout/dense, with batch norm (random running statistics), in float64."""
    rng = np.random.default_rng(11)
    features = Sequential([
        ("stem", conv_bn_act(3, 8, 3, 2, "torch", act="relu6", rng=rng)),
        ("blocks", Sequential([
            ("0", InvertedResidual(8, 8, 16, 3, 1, "hard_swish", se_channels=8, rng=rng)),
            ("1", InvertedResidual(8, 12, 24, 3, 2, "relu6", rng=rng)),
            # ELU, not ReLU: exact zeros tie inside the max-pool windows, where a central difference sees
            # half a gradient (a kink, not an error).
            ("2", Fire(12, 4, 8, 8, act="elu", bn=True, rng=rng)),
            ("3", MaxPool2d(3, 2, 0, ceil_mode=True)),
        ])),
        ("last", conv_bn_act(16, 16, 1, act="relu", rng=rng)),
    ])
    features.out_ch = 16
    head = Sequential([("pool", GlobalAvgPool()), ("dropout", Dropout(0.5)),
                       ("classifier", Dense(16, 3, rng=rng, init="glorot"))])
    model = Model("blocks", {}, features, head, (20, 20, 3), cam_layer="features.last")
    return _to_float64(randomise_batchnorm_statistics(model, rng))


@pytest.fixture(scope="module")
def block_model():
    return _block_model()


@pytest.mark.parametrize("layer", ["features.stem", "features.blocks.0", "features.blocks.1", "features.blocks.2"])
def test_gradient_at_layer_matches_central_differences(block_model, layer):
    """d logit_c / d A at `layer`, float64, eps 1e-6: max error <= 1e-6 * max|gradient| + 1e-9 (tests/gradcheck.py).

    Checked on 12 random entries and along one random direction over all entries (<dA, V>), for two images
    explaining different classes (the per-image gradients must not mix)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 20, 20, 3))
    classes = np.array([2, 0])
    a, da, _, idx = E.activation_and_gradient(block_model, x, classes, layer)
    assert a.dtype == np.float64 and da.shape == a.shape and np.array_equal(idx, classes)
    assert np.abs(da).max() > 0

    delta = np.zeros_like(a)

    def logit_sum():
        _, _, logits, _ = E.activation_and_gradient(block_model, x, classes, layer, perturb=lambda t: t + delta)
        return logits[0, 2] + logits[1, 0]

    flat = delta.reshape(-1)
    picks = rng.choice(flat.size, 12, replace=False)
    numeric = []
    for p in picks:
        probe = np.zeros(1)

        def one():
            flat[p] = probe[0]
            value = logit_sum()
            flat[p] = 0.0
            return value

        numeric.append(numeric_gradient(one, probe)[0])
    analytic = da.reshape(-1)[picks]
    scale = np.abs(da).max()
    assert np.max(np.abs(analytic - np.array(numeric))) <= 1e-9 + 1e-6 * scale, (analytic, numeric)

    # Small steps (|t V| ~ 3e-8): saturated ELU outputs come within ~1e-6 of each other inside a max-pool window,
    # and a step that swaps the winner measures a kink instead of the gradient.
    direction = 0.01 * rng.standard_normal(a.shape)
    t = np.zeros(1)

    def along():
        delta[...] = t[0] * direction
        value = logit_sum()
        delta[...] = 0.0
        return value

    numeric_dir = numeric_gradient(along, t)[0]
    analytic_dir = float(np.sum(da * direction))
    assert abs(analytic_dir - numeric_dir) <= 1e-9 + 1e-6 * max(abs(numeric_dir), scale), (analytic_dir, numeric_dir)
