"""lightcnn.quantsim: rounding activations to a quantised TFLite file's 8-bit grids.

The reference runtime's own activations for one image (shared/data/reference-activations) check
that the table pairs each layer with the right tensor: fed the runtime's input, a simulated layer
must land on the runtime's grid and reproduce its integers to within 1 step (3 for hard-swish
units, whose pre-activation rounding is not simulated). Whether the simulation brings the whole
network closer to the runtime is a statistical question, answered on the 1000-image sample
(slow test).
"""

import json

import numpy as np
import pytest

from lightcnn import quantsim
from lightcnn.api import model_from_checkpoint
from lightcnn.checkpoint import read_checkpoint
from lightcnn.convert.tflite import read_tflite
from lightcnn.errors import CheckpointError
from lightcnn.layers.basic import Dense
from lightcnn.layers.blocks import ConvBNAct, InvertedResidual, SqueezeExcite
from lightcnn.models import build
from lightcnn.registry import get_spec

# registry name -> prefix of its files in shared/data/reference-activations
MODELS = {"mobilenet_v3_small": "mobilenet_v3_small_quant_tflite", "mobilenet_v2": "mobilenet_v2_quant_tflite"}


def _built(name, sources_dir, tmp_path, monkeypatch):
    from lightcnn.weights import build_one, find_source

    monkeypatch.setenv("LIGHTCNN_SOURCES", str(sources_dir))
    spec = get_spec(name)
    ckpt = read_checkpoint(build_one(spec, out_dir=tmp_path))
    return ckpt, read_tflite(find_source(spec.filename, spec.sha256))


class _Reference:
    """The runtime's tensors for the cat image, dequantised."""

    def __init__(self, tfl, path):
        self.tfl, self.npz = tfl, np.load(path)

    def has(self, t):
        return f"t{t:03d}" in self.npz.files

    def __call__(self, t):
        tensor = self.tfl.tensors[t]
        q = self.npz[f"t{t:03d}"].astype(np.float32)
        return (q - np.float32(tensor.zero_point[0])) * np.float32(tensor.scale[0])


def _steps(y, ref, tensor):
    """(|y - ref| in quantisation steps, whether y lies on the tensor's grid, mask of ref != 0)."""
    s, z = float(tensor.scale[0]), int(tensor.zero_point[0])
    y = y.reshape(-1)
    ref = np.broadcast_to(ref, y.shape) if np.size(ref) == 1 else ref.reshape(-1)
    if ref.size == y.size + 1:  # TF's background class
        ref = ref[1:]
    q = y / s
    on_grid = np.abs(q - np.round(q)).max() < 1e-3 and q.min() + z >= -1e-3
    return np.abs(y - ref) / s, on_grid, np.abs(ref) > s / 2


@pytest.mark.parametrize("name", list(MODELS))
def test_simulated_layers_reproduce_the_runtime_given_its_inputs(name, sources_dir, data_dir, tmp_path, monkeypatch):
    ref_path = data_dir / "reference-activations" / f"{MODELS[name]}__cat.npz"
    if not ref_path.exists():
        pytest.skip(f"no reference activations at {ref_path}")
    ckpt, tfl = _built(name, sources_dir, tmp_path, monkeypatch)
    ref = _Reference(tfl, ref_path)
    tensors = quantsim.activation_tensors(tfl, model_from_checkpoint(ckpt))
    assert tensors.keys() == ckpt.extra["activation_quantization"]["layers"].keys()
    sim = model_from_checkpoint(ckpt, simulate_quantization=True)
    flt = model_from_checkpoint(ckpt)  # the float network (the default for this function)
    layers, float_layers = dict(sim.named_layers()), dict(flt.named_layers())
    producer = {t: op for op in tfl.operators for t in op.outputs}
    weight_ops = [op for op in tfl.operators if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    units = [p for p, layer in sim.named_layers() if isinstance(layer, (ConvBNAct, Dense))]
    inputs = {p: op.inputs[0] for p, op in zip(units, weight_ops)}  # the pairing the converter checked

    def block_input(path):
        first = next(p for p in units if p.startswith(path + "."))
        return inputs[first]

    table = ckpt.extra["activation_quantization"]
    qrange = quantsim.QRANGE[table["dtype"]]
    checked = []
    for key, t in tensors.items():
        path = key.split("@")[0]
        layer = layers[path]
        if key.endswith("@input") or (path.endswith(".project") and layers[path.rpartition(".")[0]].use_residual):
            # fc1's input is checked through the SE block; a project conv that feeds a residual ADD is not
            # kept by the runtime (its buffer is reused: the ADD's inputs in the dump do not sum to its output)
            continue
        approximate = getattr(layer, "act_name", "") in ("hard_swish", "hard_sigmoid")  # pre-activation not rounded
        limit, min_exact = (3, 0.2) if approximate else (1, 0.75)
        if isinstance(layer, InvertedResidual):
            # the residual ADD, from the runtime's skip input and the block's project conv fed the runtime's input
            project = producer[[i for i in producer[t].inputs if i != block_input(path)][0]]
            x_t, project_in = block_input(path), project.inputs[0]
            if not (ref.has(x_t) and ref.has(project_in) and ref.has(t)):
                continue
            total = layers[path + ".project"].forward(ref(project_in)) + ref(x_t)
            y, y_float = quantsim.fake_quant(total, *table["layers"][key], *qrange), total
            limit = 2  # one step of the project conv's grid, then the ADD's rounding
        else:
            if isinstance(layer, SqueezeExcite):  # pool, fc1, fc2 (approximate) and the channel scale
                x_t = next(i for i in producer[t].inputs if len(tfl.tensors[i].shape) == 4)
                limit, min_exact = 6, 0.8
            elif path == "head.pool":
                x_t = producer[t].inputs[0]
            else:
                x_t = inputs[path]
            if not (ref.has(x_t) and ref.has(t)):
                continue
            x = ref(x_t).reshape(1, -1) if isinstance(layer, Dense) else ref(x_t)
            y, y_float = layer.forward(x), float_layers[path].forward(x)
        steps, on_grid, nonzero = _steps(y, ref(t), tfl.tensors[t])
        float_steps, float_on_grid, _ = _steps(y_float, ref(t), tfl.tensors[t])
        exact, float_exact = np.mean(steps[nonzero] < 1e-3), np.mean(float_steps[nonzero] < 1e-3)  # 0 is exact anyway
        assert on_grid, f"{name} {key}: simulated output is not on the runtime's grid"
        assert steps.max() <= limit + 1e-3, f"{name} {key}: {steps.max():.2f} steps from the runtime (limit {limit})"
        assert exact >= min_exact, f"{name} {key}: only {exact:.0%} of the runtime's non-zero integers reproduced"
        assert not float_on_grid and float_exact < 0.05  # float lands between the grid points
        checked.append(key)
    kinds = {type(float_layers[k]).__name__ for k in checked}
    assert len(checked) >= 0.6 * len(tensors), (len(checked), len(tensors))
    assert {"ConvBNAct", "Dense", "GlobalAvgPool"} <= kinds
    if name == "mobilenet_v3_small":
        assert {"SqueezeExcite", "InvertedResidual"} <= kinds

    # through the public path (Model.forward, no inference plan): the logits sit on the classifier's grid
    x = (np.load(data_dir / "reference-activations" / "cat_input_224_uint8.npy").astype(np.float32) - 128.0)
    x /= np.float32(get_spec(name).preprocessing.std[0])
    logits = sim.forward(np.ascontiguousarray(x, np.float32))
    classifier = tfl.tensors[tensors["head.classifier"]]
    assert _steps(logits, np.zeros(1), classifier)[1]
    assert not _steps(flt.forward(np.ascontiguousarray(x, np.float32)), np.zeros(1), classifier)[1]


def test_install_and_remove_are_reversible(sources_dir, tmp_path, monkeypatch, rng):
    ckpt, _ = _built("mobilenet_v3_small", sources_dir, tmp_path, monkeypatch)
    model = model_from_checkpoint(ckpt)
    x = rng.standard_normal((2, 96, 96, 3)).astype(np.float32)
    plain = model.forward(x)
    names = [p for p, _ in model.named_layers()]
    quantsim.simulate_activation_quantization(model, ckpt.extra["activation_quantization"])
    assert quantsim.is_simulating(model)
    assert [p for p, _ in model.named_layers()] == names and model.state_dict().keys() == ckpt.tensors.keys()
    assert isinstance(model.features_net["stem"], ConvBNAct)
    simulated = model.forward(x)
    assert not np.allclose(simulated, plain)
    model.summary()  # Model.trace wraps and then deletes instance forwards: the simulation must survive it
    np.testing.assert_array_equal(model.forward(x), simulated)
    quantsim.remove_activation_quantization(model)
    assert not quantsim.is_simulating(model) and type(model.features_net["stem"]) is ConvBNAct
    np.testing.assert_array_equal(model.forward(x), plain)
    # training mode rounds forward and passes gradients straight through (Grad-CAM keeps working)
    quantsim.simulate_activation_quantization(model, ckpt.extra["activation_quantization"])
    model.set_frozen(True)
    y = model.forward(x, training=True)
    assert model.backward(np.ones_like(y)).shape == x.shape
    model.clear_cache()


def test_defaults_come_from_the_registry(sources_dir, tmp_path, monkeypatch):
    import lightcnn

    for name in MODELS:
        _built(name, sources_dir, tmp_path, monkeypatch)
    monkeypatch.setenv("LIGHTCNN_WEIGHTS", str(tmp_path))
    assert quantsim.is_simulating(lightcnn.load("mobilenet_v3_small").model)
    assert not quantsim.is_simulating(lightcnn.load("mobilenet_v3_small", simulate_quantization=False).model)
    assert not quantsim.is_simulating(lightcnn.load("mobilenet_v2").model)
    assert quantsim.is_simulating(lightcnn.load("mobilenet_v2", simulate_quantization=True).model)
    ckpt = read_checkpoint(tmp_path / "mobilenet_v3_small.h5")
    assert not quantsim.is_simulating(model_from_checkpoint(ckpt))  # training, export: the float network
    assert quantsim.is_simulating(model_from_checkpoint(ckpt, simulate_quantization=None))


def test_a_file_without_a_table_cannot_be_simulated():
    from lightcnn.checkpoint import Checkpoint

    model = build("squeezenet1_1", num_classes=3)
    ckpt = Checkpoint(arch="squeezenet1_1", config=model.config, tensors=model.state_dict(), class_names=list("abc"))
    assert not quantsim.is_simulating(model_from_checkpoint(ckpt, simulate_quantization=None))
    with pytest.raises(CheckpointError, match="no activation quantisation table"):
        model_from_checkpoint(ckpt, simulate_quantization=True)


def test_pairing_fails_loudly_for_the_wrong_architecture(sources_dir, monkeypatch):
    from lightcnn.weights import find_source

    monkeypatch.setenv("LIGHTCNN_SOURCES", str(sources_dir))
    v3, v2 = get_spec("mobilenet_v3_small"), get_spec("mobilenet_v2")
    v3_graph = read_tflite(find_source(v3.filename, v3.sha256))
    v2_graph = read_tflite(find_source(v2.filename, v2.sha256))
    config = dict(padding="tf", bn=False, num_classes=1000)
    with pytest.raises(CheckpointError, match="conv/dense"):
        quantsim.activation_table(v3_graph, build("mobilenet_v2", **config))
    with pytest.raises(CheckpointError, match="channels"):  # same graph shape, other widths
        quantsim.activation_table(v2_graph, build("mobilenet_v2", width_mult=0.75, **config))
    model = build("mobilenet_v3_small", **config)
    model.features_net["stem"].act_name = "relu"  # the graph has a HARD_SWISH after the stem, not a ReLU grid
    with pytest.raises(CheckpointError, match="zero point"):
        quantsim.activation_table(v3_graph, model)
    model = build("mobilenet_v3_small", **config)
    model.features_net["blocks"][2].use_residual = False
    with pytest.raises(CheckpointError, match="residual"):
        quantsim.activation_table(v3_graph, model)
    model = build("mobilenet_v3_small", **config)
    model.features_net["blocks"][3].expand.act_name = "relu6"  # ReLU6 unit where the graph has HARD_SWISH
    with pytest.raises(CheckpointError, match="zero point"):
        quantsim.activation_table(v3_graph, model)
    table = quantsim.activation_table(v3_graph, build("mobilenet_v3_small", **config))
    with pytest.raises(CheckpointError, match="does not have"):
        quantsim.simulate_activation_quantization(build("mobilenet_v2", **config), table)


@pytest.mark.slow
def test_mobilenet_v3_small_sample_top1_with_the_default(sources_dir, data_dir, fixtures_dir, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from imagenet_accuracy import evaluate

    _built("mobilenet_v3_small", sources_dir, tmp_path, monkeypatch)
    monkeypatch.setenv("LIGHTCNN_WEIGHTS", str(tmp_path))
    sample = data_dir / "imagenet-sample"
    top1, _, idx, _ = evaluate("mobilenet_v3_small", sample, limit=None, progress=False)
    assert top1 >= 0.751, top1
    ref_file = fixtures_dir / "reference" / "imagenet_sample_reference.json"
    ref = np.array([r[0] for r in json.load(open(ref_file))["mobilenet_v3_small_quant_tflite"]["top5_idx"]])
    _, _, float_idx, _ = evaluate("mobilenet_v3_small", sample, limit=None, progress=False, simulate_quantization=False)
    agree, float_agree = np.mean(idx[:, 0] == ref), np.mean(float_idx[:, 0] == ref)
    assert agree >= float_agree + 0.03, (agree, float_agree)  # measured 0.877 vs 0.825
