"""The Keras 2 .h5 reader (lightcnn.convert.keras_h5) and its MobileNetV2 name map.

No Keras file exists offline and TensorFlow is not a dependency, so the files are written here with h5py in
Keras 2's layout (keras/saving/hdf5_format.py: root or model_weights/ attrs layer_names, per-layer attrs
weight_names, datasets <layer>/<weight name>) from a lightcnn model with random weights. The layer list below
is written out from keras.applications.mobilenet_v2 (weightless layers included, in Keras's order), not from
lightcnn's map, so a converted model reproducing the original's logits checks the names and the layouts
(including the depthwise (KH,KW,C,1) squeeze). Keras's own parameter count of MobileNetV2 (3,538,984 with the
1000-class top) and torch's conv2d on Keras's correct_pad padding are the independent facts.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from lightcnn.checkpoint import load_state, read_checkpoint
from lightcnn.convert.keras_h5 import read_keras_h5
from lightcnn.errors import CheckpointError
from lightcnn.models import build
from lightcnn.models.base import randomise_batchnorm_statistics
from lightcnn.weights import convert_file, recorded_metadata

h5py = pytest.importorskip("h5py")

KERAS_MOBILENET_V2_PARAMS = 3_538_984  # model.summary() of keras.applications.MobileNetV2() (top, 1000 classes)
STRIDE_2_BLOCKS = (1, 3, 6, 13)
BN_KEYS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))


def keras_layers(model):
    """[(Keras layer, Keras class, [(variable, array in Keras layout)])] as keras.applications builds them."""
    state = model.state_dict()

    def conv(name, ours, depthwise=False):
        w = state[f"{ours}.conv.weight"]
        return [(name, "DepthwiseConv2D" if depthwise else "Conv2D",
                 [("depthwise_kernel" if depthwise else "kernel", w[..., None] if depthwise else w)])]

    def bn(name, ours):
        return [(name, "BatchNormalization", [(k, state[f"{ours}.bn.{v}"]) for k, v in BN_KEYS])]

    def plain(name, cls="ReLU"):
        return [(name, cls, [])]

    out = plain("input_1", "InputLayer") + conv("Conv1", "features.stem") + bn("bn_Conv1", "features.stem")
    out += plain("Conv1_relu")
    for i in range(17):
        p, ours = ("expanded_conv_" if i == 0 else f"block_{i}_"), f"features.blocks.{i}"
        if i:
            out += conv(p + "expand", f"{ours}.expand") + bn(p + "expand_BN", f"{ours}.expand")
            out += plain(p + "expand_relu")
        if i in STRIDE_2_BLOCKS:
            out += plain(p + "pad", "ZeroPadding2D")
        out += conv(p + "depthwise", f"{ours}.dw", depthwise=True) + bn(p + "depthwise_BN", f"{ours}.dw")
        out += plain(p + "depthwise_relu")
        out += conv(p + "project", f"{ours}.project") + bn(p + "project_BN", f"{ours}.project")
        if i and i not in STRIDE_2_BLOCKS and i not in (10, 16):  # Keras adds where in == out channels, stride 1
            out += plain(p + "add", "Add")
    out += conv("Conv_1", "features.last") + bn("Conv_1_bn", "features.last") + plain("out_relu")
    return out


def keras_head(model, names):
    state = model.state_dict()
    paths = [p for p in ("head." + n for n in ("dense0", "dense1", "dense2", "dense3", "dense4", "classifier"))
             if f"{p}.weight" in state]
    assert len(paths) == len(names)
    return [(name, "Dense", [("kernel", state[f"{p}.weight"]), ("bias", state[f"{p}.bias"])])
            for name, p in zip(names, paths)]


def write_group(group, layers, prefix=""):
    """Keras's save_weights_to_hdf5_group: one group per layer, weight_names, datasets at <layer>/<name>:0."""
    group.attrs["layer_names"] = np.array([name.encode() for name, _, _ in layers])
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = b"2.9.0"
    for name, _, variables in layers:
        g = group.create_group(name)
        names = [f"{prefix}{name}/{key}:0".encode() for key, _ in variables]
        g.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array([], dtype="S1")
        for wn, (_, value) in zip(names, variables):
            g.create_dataset(wn.decode(), data=value)


def model_config(layers, eps, input_size=224, extra=()):
    """Keras 2's Functional config: layers with class_name/config/name; `extra` = (class, config) after the input."""
    cfg = []
    for name, cls, _ in layers:
        config = {"name": name, "trainable": True, "dtype": "float32",
                  "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}}}
        if cls == "BatchNormalization":
            config.update(epsilon=eps, momentum=0.999)
        if cls == "InputLayer":
            config["batch_input_shape"] = [None, input_size, input_size, 3]
        if cls == "Dense":
            config["activation"] = "softmax" if name == layers[-1][0] else "relu"
        cfg.append({"class_name": cls, "config": config, "name": name, "inbound_nodes": []})
    cfg[1:1] = [{"class_name": cls, "config": dict(config, name=f"extra_{i}"), "name": f"extra_{i}"}
                for i, (cls, config) in enumerate(extra)]
    return {"class_name": "Functional", "config": {"name": "mobilenetv2_1.00_224", "layers": cfg}}


def save_weights(path, layers):
    with h5py.File(path, "w") as f:
        write_group(f, layers)


def save_model(path, layers, eps, input_size=224, extra=()):
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(model_config(layers, eps, input_size, extra)).encode()
        f.attrs["keras_version"] = b"2.9.0"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["training_config"] = b"{}"
        write_group(f.create_group("model_weights"), layers)


def random_model(arch, rng, **config):
    model = build(arch, padding="tf", **config)
    randomise_batchnorm_statistics(model, rng)
    return model


def logits(model, x):
    return model.forward(x)


def converted(path, arch, **config):
    ck = convert_file(path, arch, config or None)
    model = build(ck.arch, **{k: v for k, v in ck.config.items() if k != "head"})
    if isinstance(ck.config.get("head"), dict):
        model.reset_head(ck.config["num_classes"], hidden=tuple(ck.config["head"]["hidden"]))
    load_state(model, ck.tensors)
    return ck, model


@pytest.fixture(scope="module")
def top_model():
    """A MobileNetV2 with Keras's batch-norm epsilon, random weights and statistics, 1000 classes."""
    return random_model("mobilenet_v2", np.random.default_rng(3), bn_eps=1e-3)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(4).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)


def test_layer_list_has_keras_parameter_count(top_model):
    layers = keras_layers(top_model) + keras_head(top_model, ["predictions"])
    assert sum(v.size for _, _, variables in layers for _, v in variables) == KERAS_MOBILENET_V2_PARAMS
    assert len(layers) == 156 - 1  # Keras: 156 layers with the GlobalAveragePooling2D, which holds no group here


@pytest.mark.parametrize("flavour", ["save_weights", "save"])
def test_round_trip_gives_the_same_logits(flavour, top_model, x, tmp_path):
    layers = keras_layers(top_model) + [("global_average_pooling2d", "GlobalAveragePooling2D", [])]
    layers += keras_head(top_model, ["predictions"])
    path = tmp_path / "mnv2.h5"
    (save_weights if flavour == "save_weights" else lambda p, ls: save_model(p, ls, 1e-3))(path, layers)
    ck, model = converted(path, "mobilenet_v2")
    assert ck.config["padding"] == "tf" and ck.config["bn"] and ck.config["bn_eps"] == 1e-3
    assert ck.provenance["converter"] == "keras"
    assert ck.provenance["bn_eps_from"] == ("model_config" if flavour == "save" else
                                            "Keras MobileNetV2 default (the file has no model_config)")
    np.testing.assert_allclose(logits(model, x), logits(top_model, x), rtol=1e-4, atol=1e-4)
    preprocessing, classes = recorded_metadata(path)
    assert classes == "imagenet"
    assert (preprocessing.size, preprocessing.mean, preprocessing.std, preprocessing.channel_order,
            preprocessing.input_range) == (224, (127.5,) * 3, (127.5,) * 3, "RGB", 255.0)


def test_bn_epsilon_comes_from_model_config(x, tmp_path):
    original = random_model("mobilenet_v2", np.random.default_rng(5), bn_eps=1e-5, num_classes=10)
    layers = keras_layers(original) + keras_head(original, ["predictions"])
    path = tmp_path / "eps.h5"
    save_model(path, layers, 1e-5, input_size=160)
    ck, model = converted(path, "mobilenet_v2")
    assert ck.config["bn_eps"] == 1e-5 and ck.config["num_classes"] == 10
    np.testing.assert_allclose(logits(model, x), logits(original, x), rtol=1e-4, atol=1e-4)
    preprocessing, classes = recorded_metadata(path)
    assert classes is None and (preprocessing.size, preprocessing.resize_size) == (160, 183)


@pytest.mark.parametrize("arch", ["mobilenet_v2_dense", "mobilenet_v2"])
@pytest.mark.parametrize("nested", [False, True])
def test_seed_003_dense_head(arch, nested, x, tmp_path):
    """Keras MobileNetV2 (include_top=False) + GAP + dense 64-64-64-32-32 + softmax, as a flat Functional model
    or with the base nested as one layer (Sequential([base, ...]), the usual transfer-learning shape)."""
    original = random_model("mobilenet_v2_dense", np.random.default_rng(6), bn_eps=1e-3, num_classes=3)
    trunk = keras_layers(original)
    head = [("global_average_pooling2d", "GlobalAveragePooling2D", []), ("dropout", "Dropout", [])]
    head += keras_head(original, ["dense", "dense_1", "dense_2", "dense_3", "dense_4", "dense_5"])
    path = tmp_path / "seed003.h5"
    with h5py.File(path, "w") as f:
        if not nested:
            write_group(f, trunk + head)
        else:  # the base model's group lists its sublayers' variables; datasets at <base>/<sublayer>/<var>:0
            base = [("mobilenetv2_1.00_224", "Functional", [(f"{n}/{k}", v) for n, _, vs in trunk for k, v in vs])]
            f.attrs["layer_names"] = np.array([n.encode() for n, _, _ in base + head])
            f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.9.0"
            g = f.create_group("mobilenetv2_1.00_224")
            g.attrs["weight_names"] = np.array([f"{k}:0".encode() for k, _ in base[0][2]])
            for k, v in base[0][2]:
                g.create_dataset(f"{k}:0", data=v)
            for name, _, variables in head:
                hg = f.create_group(name)
                hg.attrs["weight_names"] = np.array([f"{name}/{k}:0".encode() for k, _ in variables], dtype="S")
                for k, v in variables:
                    hg.create_dataset(f"{name}/{k}:0", data=v)
    ck, model = converted(path, arch)
    assert ck.config["num_classes"] == 3
    np.testing.assert_allclose(logits(model, x), logits(original, x), rtol=1e-4, atol=1e-4)
    if not nested:  # the written file loads like any other lightcnn .h5
        from lightcnn.api import load
        from lightcnn.checkpoint import save_checkpoint

        save_checkpoint(tmp_path / "out.h5", ck)
        np.testing.assert_allclose(load(str(tmp_path / "out.h5")).model.forward(x), logits(original, x),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra,mean,std", [
    ((), 127.5, 127.5),                                                      # preprocess_input outside the graph
    ((("Rescaling", {"scale": 1 / 127.5, "offset": -1.0}),), 127.5, 127.5),  # the same, in the graph
    ((("Rescaling", {"scale": 1 / 255, "offset": 0.0}),), 0.0, 255.0),       # the trunk was trained on [0, 1]
    ((("RandomFlip", {"mode": "horizontal"}),), 127.5, 127.5),               # an identity at inference
    ((("TFOpLambda", {"function": "math.truediv"}),), None, None),           # in-graph arithmetic: cannot tell
    ((("Normalization", {"axis": -1}),), None, None),
])
def test_preprocessing_follows_in_graph_rescaling(extra, mean, std, top_model, tmp_path):
    path = tmp_path / "pre.h5"
    save_model(path, keras_layers(top_model) + keras_head(top_model, ["predictions"]), 1e-3, extra=extra)
    preprocessing, classes = recorded_metadata(path)
    assert classes == "imagenet"
    if mean is None:
        assert preprocessing is None
    else:
        assert (preprocessing.mean, preprocessing.std, preprocessing.input_range) == ((mean,) * 3, (std,) * 3, 255.0)


def test_chunked_layer_names_attribute(top_model, x, tmp_path):
    """Keras splits an attribute over HDF5's 64 KiB header limit into layer_names0, layer_names1, ..."""
    layers = keras_layers(top_model) + keras_head(top_model, ["predictions"])
    path = tmp_path / "chunked.h5"
    save_weights(path, layers)
    with h5py.File(path, "a") as f:
        names = f.attrs["layer_names"]
        del f.attrs["layer_names"]
        f.attrs["layer_names0"], f.attrs["layer_names1"] = names[:100], names[100:]
    _, model = converted(path, "mobilenet_v2")
    np.testing.assert_allclose(logits(model, x), logits(top_model, x), rtol=1e-4, atol=1e-4)


def test_depthwise_kernel_is_squeezed_not_reshaped(top_model, tmp_path):
    layers = keras_layers(top_model) + keras_head(top_model, ["predictions"])
    save_weights(tmp_path / "m.h5", layers)
    ck = convert_file(tmp_path / "m.h5", "mobilenet_v2")
    dw = dict((n, vs) for n, _, vs in layers)["block_5_depthwise"][0][1]
    assert dw.shape == (3, 3, 192, 1)
    np.testing.assert_array_equal(ck.tensors["features.blocks.5.dw.conv.weight"], dw[..., 0])


# -- the layout itself, against torch --------------------------------------------------------------------------


def correct_pad(h, w, k=3):
    """keras.applications' imagenet_utils.correct_pad: ((top, bottom), (left, right)) before a VALID conv."""
    adjust = (1 - h % 2, 1 - w % 2)
    c = (k // 2, k // 2)
    return (c[0] - adjust[0], c[0]), (c[1] - adjust[1], c[1])


@pytest.mark.parametrize("h,w", [(7, 8), (8, 8), (7, 7), (9, 6)])
def test_keras_stride_2_conv_matches_torch(h, w, rng):
    """A Keras-layout conv (HWIO kernel, depthwise (KH,KW,C,1)), ZeroPadding2D(correct_pad) + VALID stride 2 in
    torch, equals lightcnn's padding="tf" conv on the same numbers with the kernels as the reader maps them."""
    torch = pytest.importorskip("torch")
    from lightcnn.layers.basic import Conv2d, DepthwiseConv2d

    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)     # Keras Conv2D kernel (KH,KW,C,O)
    depthwise = rng.normal(size=(3, 3, 3, 1)).astype(np.float32)  # Keras DepthwiseConv2D (KH,KW,C,1)
    (top, bottom), (left, right) = correct_pad(h, w)
    xt = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom))
    ref = torch.nn.functional.conv2d(xt, torch.from_numpy(kernel).permute(3, 2, 0, 1), stride=2)
    ref_dw = torch.nn.functional.conv2d(xt, torch.from_numpy(depthwise).permute(2, 3, 0, 1), stride=2, groups=3)
    conv = Conv2d(3, 4, 3, 2, padding="tf", bias=False)
    conv.params["weight"] = kernel
    dw = DepthwiseConv2d(3, 3, 2, padding="tf", bias=False)
    dw.params["weight"] = depthwise[..., 0]
    np.testing.assert_allclose(conv.forward(x), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw.forward(x), ref_dw.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


# -- broken files: one line each -------------------------------------------------------------------------------


@pytest.fixture
def keras_file(top_model, tmp_path):
    """Write a Keras file after `edit(layers)`; returns its path."""
    def write(edit=None, name="k.h5"):
        layers = keras_layers(top_model) + keras_head(top_model, ["predictions"])
        layers = [(n, c, list(vs)) for n, c, vs in layers]
        if edit:
            edit(layers)
        save_weights(tmp_path / name, layers)
        return tmp_path / name
    return write


def _one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def _layer(layers, name):
    return next(vs for n, _, vs in layers if n == name)


def test_missing_tensor(keras_file):
    path = keras_file(lambda ls: _layer(ls, "block_7_expand_BN").pop(2))  # moving_mean
    with pytest.raises(CheckpointError) as e:
        convert_file(path, "mobilenet_v2")
    _one_line(e, str(path), "block_7_expand_BN/moving_mean", "missing")


def test_wrong_shape(keras_file):
    def edit(ls):
        vs = _layer(ls, "block_2_depthwise")
        vs[0] = ("depthwise_kernel", np.zeros((3, 3, 144, 2), np.float32))  # depth multiplier 2
    path = keras_file(edit)
    with pytest.raises(CheckpointError) as e:
        convert_file(path, "mobilenet_v2")
    _one_line(e, str(path), "block_2_depthwise/depthwise_kernel", "(3, 3, 144, 2)", "(3, 3, 144, 1)",
              "features.blocks.2.dw.conv.weight")


def test_extra_tensor_and_extra_layer(keras_file):
    path = keras_file(lambda ls: _layer(ls, "Conv1").append(("bias", np.zeros(32, np.float32))), "a.h5")
    with pytest.raises(CheckpointError) as e:
        convert_file(path, "mobilenet_v2")
    _one_line(e, str(path), "unexpected tensor 'Conv1/bias'")
    extra = [(k, np.ones(1000, np.float32)) for k in ("gamma", "beta", "moving_mean", "moving_variance")]
    path = keras_file(lambda ls: ls.append(("batch_normalization", "BatchNormalization", extra)), "b.h5")
    with pytest.raises(CheckpointError) as e:
        convert_file(path, "mobilenet_v2")
    _one_line(e, str(path), "unexpected layer 'batch_normalization'")


def test_non_finite_weight(keras_file):
    def edit(ls):
        vs = _layer(ls, "block_4_project")
        w = vs[0][1].copy()
        w[0, 0, 0, 0] = np.nan
        vs[0] = ("kernel", w)
    path = keras_file(edit)
    with pytest.raises(CheckpointError) as e:
        read_keras_h5(path)
    _one_line(e, str(path), "block_4_project/block_4_project/kernel:0", "NaN")


def test_truncated_and_non_hdf5_files(keras_file, tmp_path):
    path = keras_file()
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file\n")
    for bad in (truncated, text):
        with pytest.raises(CheckpointError) as e:
            convert_file(bad, "mobilenet_v2")
        _one_line(e, str(bad))


def test_declared_shape_is_checked_before_reading(tmp_path):
    """A gzip dataset declaring 2^28 zeros is a few KB on disk; it is refused from its declared size."""
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"Conv1"])
        g = f.create_group("Conv1")
        g.attrs["weight_names"] = np.array([b"Conv1/kernel:0"])
        g.create_dataset("Conv1/kernel:0", shape=(1 << 14, 1 << 14), dtype="f4", compression="gzip",
                         chunks=(1024, 1024))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError) as e:
        read_keras_h5(path)
    _one_line(e, str(path), "Conv1/Conv1/kernel:0", "would read")


def test_external_link_is_not_followed(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("kernel:0", data=np.ones((3, 3, 3, 32), np.float32))
    path = tmp_path / "link.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"Conv1"])
        g = f.create_group("Conv1")
        g.attrs["weight_names"] = np.array([b"Conv1/kernel:0"])
        g.create_group("Conv1")["kernel:0"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "kernel:0")
    with pytest.raises(CheckpointError) as e:
        read_keras_h5(path)
    _one_line(e, str(path), "ExternalLink")


def test_lightcnn_and_other_hdf5_files_are_told_apart(keras_file, tmp_path):
    from lightcnn.checkpoint import save_checkpoint

    ck = convert_file(keras_file(), "mobilenet_v2")
    ours = tmp_path / "ours.h5"
    save_checkpoint(ours, ck)
    assert read_checkpoint(ours).arch == "mobilenet_v2"
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    for path, words in ((ours, "already a lightcnn weight file"), (other, "neither Keras's")):
        with pytest.raises(CheckpointError) as e:
            convert_file(path, "mobilenet_v2")
        _one_line(e, str(path), words)


def test_reader_imports_neither_tensorflow_nor_torch():
    code = ("import sys, lightcnn.convert.keras_h5, lightcnn.weights.mapping; "
            "sys.exit(any(m in sys.modules for m in ('tensorflow', 'keras', 'torch')))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- the CLI ---------------------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lightcnn.weights", "-q", *map(str, args)], capture_output=True,
                          text=True)


def test_cli_converts_keras_h5_and_refuses_without_classes(tmp_path):
    original = random_model("mobilenet_v2", np.random.default_rng(7), bn_eps=1e-3, num_classes=4)
    path = tmp_path / "four.h5"
    save_weights(path, keras_layers(original) + keras_head(original, ["predictions"]))
    out = tmp_path / "out.h5"
    run = _cli("convert", path, "--arch", "mobilenet_v2", "-o", out)
    assert run.returncode == 2 and not out.exists()
    assert run.stderr.count("\n") == 1 and "--classes {imagenet," in run.stderr, run.stderr
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\nc\nd\n")
    run = _cli("convert", path, "--arch", "mobilenet_v2", "--classes", classes, "-o", out)
    assert run.returncode == 0, run.stderr
    ck = read_checkpoint(out)
    assert ck.class_names == ["a", "b", "c", "d"] and ck.preprocessing["mean"] == [127.5] * 3
    assert ck.provenance["converter"] == "keras" and ck.config["bn_eps"] == 1e-3
