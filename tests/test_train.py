"""Training: a small CNN learns, unfrozen-block gradients are right, resume is exact, the feature cache works."""

import json

import numpy as np
import pytest
from PIL import Image

from lightcnn.checkpoint import read_checkpoint
from lightcnn.errors import TrainingError
from lightcnn.kernels.pool import global_avg_pool_forward
from lightcnn.layers import BatchNorm, Dense, GlobalAvgPool, MaxPool2d, Sequential, conv_bn_act
from lightcnn.models import Model, covid_squeezenet, mobilenet_v2, mobilenet_v3_small, squeezenet1_0
from lightcnn.preprocess import Preprocessing, preprocess_image
from lightcnn.train import (TrainConfig, apply_head_params, build_head, extract_features, finetune, fit,
                            predict_logits, split_backbone, train_head, trainable_net)
from lightcnn.train.loop import class_weights_for, restore
from tests.gradcheck import assert_gradient_sampled


def to_float64(model, rng):
    """Every parameter/buffer in float64 (kernels specialise on dtype), random biases (no ReLU kinks at 0) and
    non-trivial batch-norm statistics, so the central differences below are exact to ~1e-9."""
    for _, layer in model.named_layers():
        for store in (layer.params, layer.buffers):
            for key, value in store.items():
                store[key] = value.astype(np.float64)
        if isinstance(layer, BatchNorm):
            c = layer.channels
            layer.params["weight"], layer.params["bias"] = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c)
            layer.buffers["running_mean"] = rng.normal(0, 0.2, c)
            layer.buffers["running_var"] = rng.uniform(0.5, 1.5, c)
        elif "bias" in layer.params:
            layer.params["bias"] = rng.normal(0, 0.3, layer.params["bias"].shape)
    model.params_changed()
    return model


# --------------------------------------------------------------------------------------------- synthetic data


def stripes_vs_blobs(n, rng, size=16):
    """(n, size, size, 1) float32 images and labels: 0 = oriented stripes, 1 = Gaussian blobs (balanced).

    Stripes: a sinusoid of random orientation, period 3-6 px and phase. Blobs: 1-3 Gaussian spots of random
    position and width. Both get pixel noise and a random brightness offset, so the mean intensity alone
    does not separate them.
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    x = np.empty((n, size, size, 1), np.float32)
    labels = np.arange(n) % 2
    for i in range(n):
        if labels[i] == 0:
            theta = rng.uniform(0, np.pi)
            period = rng.uniform(3, 6)
            img = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi))
        else:
            img = np.zeros((size, size))
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(2, size - 2, 2)
                s = rng.uniform(1.5, 3.0)
                img += 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            img -= 0.5
        x[i, :, :, 0] = img + rng.normal(0, 0.3, (size, size)) + rng.uniform(-0.3, 0.3)
    return x, labels


def small_cnn(seed=0):
    rng = np.random.default_rng(seed)
    features = Sequential([("conv1", conv_bn_act(1, 8, 3, act="relu", rng=rng)),
                           ("pool1", MaxPool2d(2, 2)),
                           ("conv2", conv_bn_act(8, 16, 3, act="relu", rng=rng))])
    features.out_ch = 16
    head = Sequential([("pool", GlobalAvgPool()), ("classifier", Dense(16, 2, rng=rng, init="glorot"))])
    return Model("small_cnn", {}, features, head, (16, 16, 1))


def test_small_cnn_learns_stripes_vs_blobs():
    """The core engine's learning test: full backprop through conv / BN (training mode) / max-pool / GAP / dense
    with Adam reaches >= 95 % on held-out images, and training moves the BN running statistics."""
    data_rng = np.random.default_rng(7)
    x_train, y_train = stripes_vs_blobs(320, data_rng)
    x_val, y_val = stripes_vs_blobs(64, data_rng)
    x_test, y_test = stripes_vs_blobs(200, data_rng)
    model = small_cnn()
    before = model.state_dict()["features.conv1.bn.running_var"].copy()
    chance = np.mean(predict_logits(model, x_test).argmax(1) == y_test)
    config = TrainConfig(epochs=6, batch_size=32, optimizer="adam", lr=0.01, seed=0)
    result = fit(model, x_train[None], y_train, x_val, y_val, config, num_classes=2)
    acc = np.mean(predict_logits(model, x_test).argmax(1) == y_test)
    assert acc >= 0.95, f"held-out accuracy {acc:.3f} (before training {chance:.3f}); history {result.history}"
    assert not np.array_equal(before, model.state_dict()["features.conv1.bn.running_var"])
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# --------------------------------------------------------------------------------------------- backbone split


def test_split_backbone_names_the_last_k_blocks():
    m = mobilenet_v2(width_mult=0.35, num_classes=3)
    prefix, suffix = split_backbone(m, 2)
    assert [n for n, _ in suffix.children()] == ["blocks.15", "blocks.16", "last"]
    assert [n for n, _ in prefix.children()][:2] == ["stem", "blocks.0"]
    assert len(prefix) + len(suffix) == 1 + 17 + 1
    assert split_backbone(m, 0)[1].children() == [] and split_backbone(m, "all")[0].children() == []
    cs = covid_squeezenet()
    assert split_backbone(cs, "all")[1] is cs.features_net  # a trunk with a skip is trained as one piece
    sq = squeezenet1_0(num_classes=3)
    assert [n for n, _ in split_backbone(sq, 2)[1].children()] == ["fire8", "pool3", "fire9"]
    with pytest.raises(ValueError, match="8 Fire modules"):
        split_backbone(sq, 9)
    with pytest.raises(ValueError, match="17 blocks"):
        split_backbone(m, 18)


def _unfrozen_gradcheck(model, unfreeze, x, rng, samples=4):
    """Sampled central differences for every trainable tensor of the suffix + head and for the suffix input."""
    model.reset_head(3, dropout=0.0, seed=1)
    to_float64(model, rng)
    net = trainable_net(model, unfreeze)
    prefix, _ = split_backbone(model, unfreeze)
    f = prefix.forward(x, False)
    logits = net.forward(f, True)
    g = rng.standard_normal(logits.shape)
    df = net.backward(g)

    def loss():
        out = net.forward(f, True)
        net.clear_cache()
        return float(np.sum(out * g))

    checked = 0
    for name, layer, key, value in model.named_parameters():
        is_trainable = any(layer is sub for _, sub in net.named_layers()) and not layer.frozen
        if not is_trainable:
            assert key not in layer.grads, f"{name}: frozen tensor received a gradient"
            continue
        assert_gradient_sampled(layer.grads[key], loss, value, rng, samples=samples, name=name, rtol=1e-5)
        checked += 1
    assert_gradient_sampled(df, loss, f, rng, samples=8, name="d prefix output", rtol=1e-5)
    for _, layer in model.named_layers():
        if isinstance(layer, BatchNorm):
            assert layer.frozen and not layer.grads, "batch norm must stay frozen in last-k fine-tuning"
    return checked


def test_last_k_gradients_mobilenet_v2_with_frozen_bn(rng):
    """Backprop through the last 2 inverted-residual blocks + last conv + new head, batch norm frozen (float64)."""
    model = mobilenet_v2(width_mult=0.35, num_classes=3, bn=True, seed=3)
    x = rng.standard_normal((2, 32, 32, 3))
    checked = _unfrozen_gradcheck(model, 2, x, rng)
    assert checked == 2 * 3 + 1 + 2  # 3 convs per block, the last conv, classifier weight + bias


def test_last_k_gradients_mobilenet_v3_small_se_hard_swish(rng):
    model = mobilenet_v3_small(num_classes=3, seed=4)
    x = rng.standard_normal((2, 32, 32, 3))
    assert _unfrozen_gradcheck(model, 1, x, rng) >= 5  # expand, dw, SE fc1/fc2 (+ biases), project, last, head


def test_last_k_gradients_squeezenet_fire_and_pool(rng):
    """The last 2 Fire modules with the max-pool between them (SqueezeNet 1.0, Caffe-style conv biases)."""
    model = squeezenet1_0(num_classes=3, seed=5)
    x = rng.standard_normal((1, 35, 35, 3))
    assert _unfrozen_gradcheck(model, 2, x, rng, samples=3) == 2 * 6 + 2


# --------------------------------------------------------------------------------------------- head training


def test_train_head_matches_the_model_head_and_reports_best_epoch(rng):
    y_train, y_val = np.arange(60) % 2, np.arange(30) % 2
    f_train = rng.standard_normal((3, 60, 20)).astype(np.float32)  # 3 views of 60 samples
    f_train[:, :, 0] += np.where(y_train, 1.5, -1.5)[None]
    f_val = rng.standard_normal((30, 20)).astype(np.float32)
    f_val[:, 0] += np.where(y_val, 1.5, -1.5)
    config = dict(epochs=15, lr=0.01, head="dense", hidden=[8], dropout=0.1, seed=2)
    params, history, best = train_head(f_train, y_train, f_val, y_val, config)
    assert len(history) == 15 and best == min(h["val_loss"] for h in history)
    assert set(params) == {"dense0.weight", "dense0.bias", "classifier.weight", "classifier.bias"}
    # the parameters drop into a full model whose reset_head used the same head settings
    model = Model("stub", {}, Sequential(), Sequential(), (1, 1, 20))
    model.features_net.out_ch = 20
    model.reset_head(2, hidden=(8,), dropout=0.1, seed=2)
    apply_head_params(model, params)
    head = build_head(20, 2, hidden=(8,), dropout=0.1, seed=2)
    restore(head, params)
    np.testing.assert_array_equal(predict_logits(model.head_after_pool(), f_val), predict_logits(head, f_val))
    assert np.mean(predict_logits(head, f_val).argmax(1) == y_val) >= 0.8


def test_loss_options_and_l2_term(rng):
    x = rng.standard_normal((1, 40, 6)).astype(np.float32)
    y = (np.arange(40) < 10).astype(np.int64)  # imbalanced 30 / 10
    np.testing.assert_allclose(class_weights_for(y, 2), [40 / 60, 40 / 20])
    for loss in ("ce", "weighted-ce", "focal"):
        head = build_head(6, 2, dropout=0.0, seed=0)
        r = fit(head, x, y, None, None, TrainConfig(epochs=2, loss=loss, label_smoothing=0.1 if loss == "ce" else 0),
                num_classes=2)
        assert np.isfinite(r.history[-1]["loss"])
    # with a huge lambda the reported loss is dominated by lambda * sum(w^2)
    head = build_head(6, 2, dropout=0.0, seed=0)
    r = fit(head, x, y, None, None, TrainConfig(epochs=1, l2=10.0, lr=1e-6, optimizer="sgd"), num_classes=2)
    w = head.state_dict()["classifier.weight"]
    assert r.history[0]["loss"] == pytest.approx(10.0 * np.sum(w.astype(np.float64) ** 2), rel=0.05)


def test_nan_loss_raises_training_error(rng):
    x = rng.standard_normal((1, 32, 6)).astype(np.float32) * 100
    y = np.arange(32) % 2
    head = build_head(6, 2, dropout=0.0, seed=0)
    with pytest.raises(TrainingError, match="became (nan|inf|non-finite) at epoch 1"):
        fit(head, x, y, None, None, TrainConfig(epochs=5, optimizer="sgd", lr=1e38, momentum=0.0), num_classes=2)


# --------------------------------------------------------------------------------------------- feature cache


def _image_folder(root, n_per_class=4, size=24, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 120 + 100 * c, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return sorted(root.glob("*/*.png"))


def test_feature_cache_hits_and_invalidation(tmp_path, monkeypatch):
    paths = _image_folder(tmp_path / "data")
    model = mobilenet_v2(width_mult=0.35, num_classes=10, seed=0)
    prep = Preprocessing(size=32, resize="shorter", resize_size=36)
    cache = tmp_path / "cache"
    stats = {}
    f1 = extract_features(model, paths, prep, cache, augment_views=2, augment="light", seed=1, stats=stats)
    assert f1.shape == (3, len(paths), model.feature_channels) and stats["computed"] == 3 * len(paths)
    direct = global_avg_pool_forward(model.features(np.stack([preprocess_image(p, prep) for p in paths])))
    np.testing.assert_allclose(f1[0], direct, rtol=1e-4, atol=1e-5)  # float32, other batch blocking
    assert not np.allclose(f1[1], f1[0]) and not np.allclose(f1[1], f1[2])  # views differ from each other

    calls = []
    original = model.features_net.forward
    monkeypatch.setattr(model.features_net, "forward", lambda x, training=False: calls.append(1) or original(x))
    f2 = extract_features(model, paths, prep, cache, augment_views=2, augment="light", seed=1, stats=stats)
    assert calls == [] and stats == dict(stats, computed=0, cached=3 * len(paths))
    np.testing.assert_array_equal(f1, f2)

    # a different preprocessing, augmentation seed, or a changed file is computed afresh
    extract_features(model, paths, Preprocessing(size=32, resize="shorter", resize_size=36, blur_sigma=1.3), cache,
                     stats=stats)
    assert stats["computed"] == len(paths)
    extract_features(model, paths, prep, cache, augment_views=2, augment="light", seed=2, stats=stats)
    assert stats["computed"] == 2 * len(paths)  # view 0 is shared; the augmented views depend on the seed
    Image.fromarray(np.zeros((24, 28, 3), np.uint8)).save(paths[0])
    extract_features(model, paths, prep, cache, stats=stats)
    assert stats["computed"] == 1
    # changed weights -> new key
    model.features_net["stem"].conv.params["weight"] *= 1.01
    model.params_changed()
    extract_features(model, paths, prep, cache, stats=stats)
    assert stats["computed"] == len(paths)


# --------------------------------------------------------------------------------------------- resume


def _tiny_weights(tmp_path):
    from lightcnn.checkpoint import Checkpoint, save_checkpoint

    m = mobilenet_v2(width_mult=0.35, num_classes=10, seed=0)
    path = tmp_path / "tiny.h5"
    save_checkpoint(path, Checkpoint(arch=m.arch, config=m.config, tensors=m.state_dict(),
                                     class_names=[f"c{i}" for i in range(10)],
                                     preprocessing=Preprocessing(size=32, resize="shorter",
                                                                 resize_size=36).to_dict()))
    return path


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    """last-k run (SGD momentum, dropout, augmented views, oversampling, step decay) stopped after epoch 2 and
    resumed from RUN_DIR/last.h5 ends bit-identical to an uninterrupted run."""
    _image_folder(tmp_path / "data", n_per_class=10)
    weights = _tiny_weights(tmp_path)
    train = dict(epochs=5, batch_size=4, optimizer="sgd", lr=0.005, momentum=0.9, dropout=0.3, oversample=True,
                 lr_decay=0.5, lr_decay_every=2, seed=3, l2=1e-4)
    base = dict(data=str(tmp_path / "data"), weights=str(weights), mode="last-k", unfreeze=2, augment="light",
                views=2, fractions=[0.6, 0.2, 0.2], n_bootstrap=0, cache_dir=str(tmp_path / "cache"), train=train)
    full = finetune(dict(base, out=str(tmp_path / "full")), progress=None)

    def stop_after_two(state, row):
        if state.epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(dict(base, out=str(tmp_path / "cut")), progress=None, on_epoch_end=stop_after_two)
    assert read_checkpoint(tmp_path / "cut" / "last.h5").extra["state"]["epoch"] == 2
    resumed = finetune(dict(base, out=str(tmp_path / "cut")), resume=True, progress=None)

    a, b = read_checkpoint(full.best_path).tensors, read_checkpoint(resumed.best_path).tensors
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    la, lb = (read_checkpoint(tmp_path / d / "last.h5") for d in ("full", "cut"))
    for name in la.tensors:
        assert np.array_equal(la.tensors[name], lb.tensors[name]), name
    def strip(history):
        return json.dumps([{k: v for k, v in row.items() if k != "seconds"} for row in history], sort_keys=True)

    assert strip(full.history) == strip(resumed.history)
    # the trained suffix really changed, the frozen prefix did not
    base_tensors = read_checkpoint(weights).tensors
    assert not np.array_equal(a["features.blocks.16.project.conv.weight"],
                              base_tensors["features.blocks.16.project.conv.weight"])
    assert np.array_equal(a["features.blocks.14.project.conv.weight"],
                          base_tensors["features.blocks.14.project.conv.weight"])


def test_reused_arrays_give_the_same_training_steps(monkeypatch):
    # lightcnn.kernels._reuse with no size floor, so every array of the step goes through the pool: three SGD
    # steps of seed 001's network (training-mode BN with ELU into Fire's slots, max pool, transpose conv, the
    # concatenation) give the same weights and logits, bit for bit, as with fresh arrays; buffers are reused,
    # and never one whose array (or a view of it) is still referenced
    from lightcnn.kernels import _reuse
    from lightcnn.kernels.linear import cross_entropy
    from lightcnn.optim import SGD

    monkeypatch.setattr(_reuse, "_MIN_BYTES", 0)
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 1)).astype(np.float32)
    labels = np.array([0, 1])

    def three_steps():
        model = covid_squeezenet(seed=0)
        net = Sequential([("features", model.features_net), ("head", model.head_net)])
        opt = SGD(net, lr=0.01, momentum=0.9)
        for _ in range(3):
            logits = net.forward(x, training=True)
            _, dlogits = cross_entropy(logits, labels)
            net.backward(dlogits)
            opt.step()
        return logits, {name: value.copy() for name, _, _, value in net.named_parameters()}

    fresh_logits, fresh = three_steps()
    calls = []
    pooled_empty = _reuse.empty
    monkeypatch.setattr(_reuse, "empty", lambda *a: calls.append(1) or pooled_empty(*a))
    with _reuse.reusing_arrays():
        pooled_logits, pooled = three_steps()
        buffers = len(_reuse._local.pool)
        kept = _reuse.empty((5, 7), np.float32)
        view = kept[1:]
        del kept
        again = _reuse.empty((5, 7), np.float32)
        assert not np.shares_memory(again, view)  # the view keeps its buffer taken
    assert _reuse._local.pool is None  # dropped with the block
    with _reuse.reusing_arrays():  # a free buffer serves a request up to _SLACK times smaller, not more
        big = _reuse.empty((1000,), np.float32)
        where = big.__array_interface__["data"][0]
        del big
        smaller = _reuse.empty((900,), np.float32)
        assert smaller.__array_interface__["data"][0] == where and smaller.shape == (900,)
        del smaller
        assert not np.shares_memory(_reuse.empty((500,), np.float32), _reuse.empty((1000,), np.float32))
        assert len(_reuse._local.pool) == 2
    assert len(calls) > 2 * buffers > 0  # most arrays came back from the pool
    np.testing.assert_array_equal(pooled_logits, fresh_logits)
    for name, value in fresh.items():
        np.testing.assert_array_equal(pooled[name], value, err_msg=name)
