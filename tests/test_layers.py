"""Layers and blocks: backward against finite differences, caches, frozen flags, fusion, input checks.

Gradient checks run whole layers in float64 (parameters cast to float64, the
kernels specialise on dtype) with a loss L = sum(forward(x) * g) for a fixed
random g, so dL/dx = backward(g).
"""

import numpy as np
import pytest

from lightcnn.errors import ShapeError
from lightcnn.layers import (Activation, BatchNorm, Conv2d, ConvTranspose2d, Dense, DepthwiseConv2d, Fire,
                             GlobalAvgPool, InvertedResidual, MaxPool2d, SqueezeExcite, conv_bn_act)
from lightcnn.models.squeezenet import CovidSqueezeFeatures
from tests.gradcheck import assert_gradient, assert_gradient_sampled


def to_float64(layer, rng, randomise_bn=True):
    """Cast every parameter/buffer to float64 and give batch norms non-trivial statistics.

    Biases are randomised too: zero biases put ReLU inputs exactly on the kink
    wherever the layer's input is all zero, where finite differences see 1/2.
    """
    for _, sub in layer.named_layers():
        for store in (sub.params, sub.buffers):
            for key, value in store.items():
                store[key] = value.astype(np.float64)
        if "bias" in sub.params and not isinstance(sub, BatchNorm):
            sub.params["bias"] = rng.normal(0, 0.3, sub.params["bias"].shape)
        if randomise_bn and isinstance(sub, BatchNorm):
            c = sub.channels
            sub.params["weight"] = rng.uniform(0.5, 1.5, c)
            sub.params["bias"] = rng.normal(0, 0.2, c)
            sub.buffers["running_mean"] = rng.normal(0, 0.2, c)
            sub.buffers["running_var"] = rng.uniform(0.5, 1.5, c)
    layer.params_changed()
    return layer


def check_layer_gradients(layer, x, rng, sampled=False, through_bn_stats=False):
    """dx and every parameter gradient of `layer` against central differences."""
    out = layer.forward(x, training=True)
    g = rng.standard_normal(out.shape)
    dx = layer.backward(g)
    grads = {name: sub.grads.get(key) for name, sub, key, _ in layer.named_parameters()}
    snapshot = {k: v.copy() for k, v in layer.state_dict().items()}

    def loss():
        # restore running stats so training-mode BN sees identical state on every evaluation
        for name, value in layer.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                value[...] = snapshot[name]
        y = layer.forward(x, training=True)
        layer.clear_cache()
        return float(np.sum(y * g))

    check = (lambda a, arr, name: assert_gradient_sampled(a, loss, arr, rng, name=name)) if sampled else \
        (lambda a, arr, name: assert_gradient(a, loss, arr, name=name))
    check(dx, x, "dx")
    for name, sub, key, value in layer.named_parameters():
        if sub.frozen:
            assert key not in sub.grads, f"{name}: frozen layer stored a gradient"
            continue
        check(grads[name], value, name)


@pytest.mark.parametrize("bn_frozen", [False, True])
@pytest.mark.parametrize("act", ["relu6", "elu", "hard_swish"])
def test_conv_bn_act_gradients(rng, act, bn_frozen):
    unit = to_float64(conv_bn_act(3, 4, 3, 2, (0, 1, 1, 0), act=act, rng=rng), rng)
    unit.bn.frozen = bn_frozen
    x = rng.standard_normal((2, 7, 6, 3))
    check_layer_gradients(unit, x, rng)


@pytest.mark.parametrize("act", ["relu6", "elu", "hard_swish"])
def test_conv_act_without_bn_gradients(rng, act):
    # relu6/elu: the activation runs in the conv's epilogue and backward takes it from the output;
    # hard_swish keeps the pre-activation path. Both against central differences.
    unit = to_float64(conv_bn_act(3, 4, 3, 2, (0, 1, 1, 0), act=act, bn=False, rng=rng), rng)
    x = rng.standard_normal((2, 7, 6, 3))
    check_layer_gradients(unit, x, rng)
    assert unit.cache is None
    dw = to_float64(conv_bn_act(3, 3, 3, 1, "same", act=act, bn=False, depthwise=True, rng=rng), rng)
    check_layer_gradients(dw, x, rng)  # the depthwise conv's epilogue too (a converted MobileNet's units)


def test_depthwise_unit_gradients(rng):
    unit = to_float64(conv_bn_act(5, 5, 5, 1, "same", act="relu", depthwise=True, rng=rng), rng)
    check_layer_gradients(unit, rng.standard_normal((2, 6, 5, 5)), rng)


@pytest.mark.parametrize("stride,se", [(1, 0), (2, 0), (1, 8)])
def test_inverted_residual_gradients(rng, stride, se):
    block = InvertedResidual(6, 6, 18, 3, stride, "hard_swish", se_channels=se, rng=rng)
    to_float64(block, rng)
    block.set_frozen(False)
    for _, sub in block.named_layers():  # frozen BN: fine-tuning keeps batch norm in inference mode
        if isinstance(sub, BatchNorm):
            sub.frozen = True
    check_layer_gradients(block, rng.standard_normal((2, 5, 6, 6)), rng)


def test_squeeze_excite_gradients(rng):
    se = to_float64(SqueezeExcite(6, 4, rng=rng), rng)
    check_layer_gradients(se, rng.standard_normal((2, 3, 4, 6)), rng)


@pytest.mark.parametrize("bn,bypass", [(False, False), (True, True)])
def test_fire_gradients(rng, bn, bypass):
    fire = to_float64(Fire(8, 3, 4, 4, act="elu" if bn else "relu", bn=bn, bypass=bypass, rng=rng), rng)
    check_layer_gradients(fire, rng.standard_normal((2, 5, 4, 8)), rng)


@pytest.mark.parametrize("size", [35, 43])  # upsampled map fits the skip exactly (35); needs zero-padding (43)
def test_covid_squeezenet_features_gradients(rng, size):
    """The whole seed-001 trunk (transpose-conv skip, concat, fuse), sampled entries."""
    features = to_float64(CovidSqueezeFeatures(1, rng), rng)
    for _, sub in features.named_layers():
        if isinstance(sub, BatchNorm):
            sub.frozen = True
    x = rng.standard_normal((1, size, size, 1))
    check_layer_gradients(features, x, rng, sampled=True)


def test_dense_and_pool_layers_gradients(rng):
    for layer, shape in [(to_float64(Dense(5, 3, act="relu", rng=rng), rng), (4, 5)),
                         (GlobalAvgPool(), (2, 3, 4, 5)),
                         (MaxPool2d(3, 2, 0, ceil_mode=True), (1, 6, 7, 2)),
                         (Activation("elu", alpha=0.7), (2, 3, 3, 2)),
                         (to_float64(ConvTranspose2d(3, 2, 4, 4, rng=rng), rng), (1, 2, 3, 3))]:
        check_layer_gradients(layer, rng.standard_normal(shape), rng)


def test_inference_stores_nothing_and_backward_clears_cache(rng):
    block = InvertedResidual(4, 4, 8, 3, 1, "relu6", se_channels=4, rng=rng)
    x = rng.standard_normal((1, 5, 5, 4)).astype(np.float32)
    block.forward(x)
    assert all(sub.cache is None for _, sub in block.named_layers()), "inference left a cache behind"
    block.forward(x, training=True)
    assert any(sub.cache is not None for _, sub in block.named_layers())
    block.backward(np.ones((1, 5, 5, 4), np.float32))
    assert all(sub.cache is None for _, sub in block.named_layers()), "backward did not release its cache"


def test_inputs_are_never_written(rng):
    block = Fire(4, 2, 3, 3, bn=True, act="elu", rng=rng)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    g = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
    x0, g0 = x.copy(), g.copy()
    block.forward(x, training=True)
    block.backward(g)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(g, g0)


def test_frozen_layer_passes_gradient_but_stores_none(rng):
    unit = to_float64(conv_bn_act(3, 4, 3, act="relu", rng=rng), rng)
    x = rng.standard_normal((1, 5, 5, 3))
    unit.forward(x, training=True)
    g = rng.standard_normal((1, 5, 5, 4))
    dx_live = unit.backward(g)
    assert "weight" in unit.conv.grads
    unit.zero_grads()
    unit.set_frozen(True)
    unit.forward(x, training=True)
    # frozen BN switches to running statistics, so compare with the inference-mode function instead
    dx_frozen = unit.backward(g)
    assert unit.conv.grads == {} and unit.bn.grads == {}, "a frozen layer stored gradients"
    assert not np.allclose(dx_frozen, dx_live), "frozen BN should use running, not batch, statistics"

    def loss():
        return float(np.sum(unit.forward(x, training=False) * g))

    assert_gradient(dx_frozen, loss, x, name="frozen dx")


def test_fused_inference_equals_unfused_path(rng):
    """conv + folded BN + fused activation in one kernel call == conv, then BN, then activation."""
    unit = conv_bn_act(8, 16, 3, 2, "same", act="hard_swish", rng=rng)
    to_float64(unit, rng)
    for store in (unit.conv.params, unit.bn.params, unit.bn.buffers):
        for k in store:
            store[k] = store[k].astype(np.float32)
    unit.params_changed()
    x = rng.standard_normal((2, 9, 10, 8)).astype(np.float32)
    fused = unit.forward(x)
    z = unit.conv.forward(x)
    z = unit.bn.forward(z)
    expected = Activation("hard_swish").forward(z)
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)


def test_folded_weights_refresh_after_parameter_change(rng):
    unit = conv_bn_act(2, 2, 1, act="none", rng=rng)
    x = rng.standard_normal((1, 3, 3, 2)).astype(np.float32)
    before = unit.forward(x)
    unit.bn.params["bias"] += 1.0
    unit.params_changed()
    np.testing.assert_allclose(unit.forward(x), before + 1.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((1, 3, 4, 4), np.float32),
                                 np.zeros((1, 4, 4, 3), np.int32), [[1.0]]])
def test_bad_input_names_expected_layout(bad):
    layer = Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)|\(N, H, W, C\)"):
        layer.forward(bad)
    assert issubclass(ShapeError, ValueError)


def test_depthwise_rejects_channel_mismatch():
    with pytest.raises(ShapeError, match=r"\(N, H, W, 8\)"):
        DepthwiseConv2d(8, 3).forward(np.zeros((1, 5, 5, 4), np.float32))


def test_batchnorm_training_updates_running_stats(rng):
    bn = BatchNorm(3, momentum=0.1)
    x = (rng.standard_normal((4, 5, 5, 3)) * 2 + 1).astype(np.float32)
    bn.forward(x, training=True)
    bn.clear_cache()
    mean = x.reshape(-1, 3).mean(0)
    var_unbiased = x.reshape(-1, 3).var(0, ddof=1)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.buffers["running_var"], 0.9 + 0.1 * var_unbiased, rtol=1e-5)
    bn.frozen = True
    before = bn.buffers["running_mean"].copy()
    bn.forward(x, training=True)
    np.testing.assert_array_equal(bn.buffers["running_mean"], before)


def test_batchnorm_measure_track_averages_the_batch_statistics(rng):
    """track="measure": the output is the running-statistics BN's, and `measured` is the equal-weight average of
    the batches' means and unbiased variances (float64, computed plainly here)."""
    bn = BatchNorm(3)
    bn.buffers["running_mean"] = np.array([1.0, -2.0, 0.5], np.float32)
    batches = [(rng.standard_normal((2, 4, 5, 3)) * s + 7).astype(np.float32) for s in (1.0, 3.0)]
    expect = [bn.forward(x) for x in batches]
    bn.track = "measure"
    for x, y in zip(batches, expect):
        np.testing.assert_array_equal(bn.forward(x, training=True), y)
    bn.track = None
    rows = [x.reshape(-1, 3).astype(np.float64) for x in batches]
    np.testing.assert_allclose(bn.measured[0], np.mean([r.mean(0) for r in rows], 0), rtol=1e-12)
    np.testing.assert_allclose(bn.measured[1], np.mean([r.var(0, ddof=1) for r in rows], 0), rtol=1e-12)


def test_skip_initialisation_gives_zero_weights_only_inside_the_block():
    from lightcnn.layers.basic import skip_initialisation

    with skip_initialisation():
        conv, dense = Conv2d(3, 4, 3), Dense(5, 2, init="glorot")
        with skip_initialisation():
            pass
        dw = DepthwiseConv2d(4, 3)  # still inside the outer block after the nested one ends
    assert not conv.params["weight"].any() and not dense.params["weight"].any() and not dw.params["weight"].any()
    assert conv.params["weight"].dtype == np.float32 and dense.params["weight"].shape == (5, 2)
    after = Conv2d(3, 4, 3)
    assert after.params["weight"].std() > 0.1  # random (He) initialisation again outside


def test_input_gradient_skipped_keeps_parameter_gradients(rng):
    # the first conv of a network computes no dx inside the block; every parameter gradient is the
    # one a full backward gives, and the flag is restored afterwards
    from lightcnn.layers.base import Sequential, input_gradient_skipped, input_layer

    net = Sequential([("conv1", conv_bn_act(1, 4, 3, 2, "valid", act="elu", bn=False, rng=rng)),
                      ("fire", Fire(4, 2, 3, 3, act="elu", bn=True, rng=rng))])
    x = rng.standard_normal((2, 9, 8, 1)).astype(np.float32)
    g = rng.standard_normal((2, 4, 3, 6)).astype(np.float32)
    net.forward(x, True)
    dx = net.backward(g)
    full = {name: sub.grads[key].copy() for name, sub, key, _ in net.named_parameters()}
    net.zero_grads()
    with input_gradient_skipped(net) as first:
        assert first is net["conv1"].conv and first.skip_input_grad
        net.forward(x, True)
        assert net.backward(g) is None
    assert dx is not None and not first.skip_input_grad
    for name, sub, key, _ in net.named_parameters():
        np.testing.assert_array_equal(sub.grads[key], full[name], err_msg=name)
    # a block with a skip connection passes its input on twice: its input gradient is never skipped
    assert input_layer(Sequential([("fire", Fire(6, 2, 3, 3, bypass=True, rng=rng))])) is None
    # without the bypass the squeeze conv is the Fire's input layer: SqueezeNet's last-Fire fine-tune skips its dx
    fire = Fire(6, 2, 3, 3, rng=rng)
    assert input_layer(Sequential([("fire", fire)])) is fire.squeeze.conv
    xf = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
    gf = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
    fire.forward(xf, True)
    assert fire.backward(gf) is not None
    full = {name: sub.grads[key].copy() for name, sub, key, _ in fire.named_parameters()}
    with input_gradient_skipped(fire):
        fire.forward(xf, True)
        assert fire.backward(gf) is None
    for name, sub, key, _ in fire.named_parameters():
        np.testing.assert_array_equal(sub.grads[key], full[name], err_msg=name)
