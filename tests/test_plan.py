"""The inference plan (lightcnn.layers.plan) and its fused kernels (lightcnn.kernels.fused).

The plan must compute what the layer-by-layer path computes (<= 1e-5 relative to the output
scale: only float32 GEMM summation order differs), for every registered architecture, at
awkward shapes, and must never serve stale weights after fine-tuning changes them.
"""

import copy
import pickle

import numpy as np
import pytest

from lightcnn.models.base import randomise_batchnorm_statistics
from lightcnn.kernels import activation as act_k
from lightcnn.kernels import conv as conv_k
from lightcnn.kernels import fused, gemm
from lightcnn.models import BUILDERS, build

RTOL = 1e-5


def _close(a, b, rtol=RTOL):
    assert a.shape == b.shape
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


def _layer_path(model, x):
    """The layer-by-layer forward (never a plan): the reference the plan must reproduce."""
    return model.head_net.forward(model.features_net.forward(x))




# --------------------------------------------------------------------------- fused kernels vs conv.py


@pytest.mark.parametrize("m,k,o,tile", [(1, 1, 1, 1), (37, 5, 7, 8), (100, 16, 24, 100), (49, 96, 13, 25)])
@pytest.mark.parametrize("act", [act_k.ACT_NONE, act_k.ACT_RELU6, act_k.ACT_HARD_SWISH, act_k.ACT_ELU])
def test_gemm_bias_act_matches_pointwise(m, k, o, tile, act, rng):
    x = rng.standard_normal((1, 1, m, k)).astype(np.float32)
    w = rng.standard_normal((k, o)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    ref = conv_k.pointwise_conv_forward(x, w, b, act, 1.0).reshape(m, o)
    y = np.full((m, o + 3), np.nan, np.float32)  # a wider buffer: columns 2 .. 2+o written
    dummy = np.zeros((1, 1), np.float32)
    fused.gemm_bias_act(x.reshape(m, k), w, b, dummy, False, dummy, m, False, act, np.float32(1.0), tile, y, 2)
    _close(y[:, 2:2 + o], ref)
    assert np.isnan(y[:, :2]).all() and np.isnan(y[:, 2 + o:]).all()


def test_gemm_residual_and_se_scale(rng):
    n, hw, k, o = 3, 10, 6, 6
    x = rng.standard_normal((n * hw, k)).astype(np.float32)
    w = rng.standard_normal((k, o)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    res = rng.standard_normal((n * hw, o)).astype(np.float32)
    s = rng.uniform(0, 1, (n, k)).astype(np.float32)
    xs = (x.reshape(n, hw, k) * s[:, None, :]).reshape(-1, k)
    ref = np.maximum(xs @ w + b, 0) + res  # the skip joins after the activation (Fire's bypass)
    y = np.empty((n * hw, o), np.float32)
    fused.gemm_bias_act(x, w, b, res, True, s, hw, True, act_k.ACT_RELU, np.float32(1.0), 7, y, 0)
    _close(y, ref)


@pytest.mark.parametrize("shape,k,stride,pad", [((1, 7, 9, 3), 3, 2, (1, 1, 1, 1)), ((2, 6, 5, 4), 3, 1, (0, 1, 0, 1)),
                                                ((1, 13, 13, 2), 7, 2, (0, 0, 0, 0)), ((1, 4, 4, 5), 1, 1, (1, 1, 1, 1))])
def test_conv_im2col_bias_act_matches_conv2d(shape, k, stride, pad, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, k, shape[3], 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    ref = conv_k.conv2d_forward(x, w, b, stride, pad, act_k.ACT_RELU)
    n, ho, wo, o = ref.shape
    y = np.empty((n * ho * wo, o), np.float32)
    dummy = np.zeros((1, 1), np.float32)
    fused.conv_im2col_bias_act(x, gemm.pack_panels(w.reshape(-1, 8)), 8, k, k, stride, stride, pad[0], pad[2], ho, wo,
                               b, dummy, False, act_k.ACT_RELU, np.float32(1.0), 5, y, 0)
    _close(y.reshape(ref.shape), ref)


def test_dense_and_max_pool(rng):
    from lightcnn.kernels import linear as linear_k
    from lightcnn.kernels import pool as pool_k

    x = rng.standard_normal((3, 37)).astype(np.float32)
    w = rng.standard_normal((37, 11)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    y = np.empty((3, 11), np.float32)
    # the plan runs a dense layer as a one-tile GEMM on packed weights with the activation epilogue
    dummy = np.zeros((1, 1), np.float32)
    fused.gemm_bias_act_serial(x, w, b, dummy, False, dummy, 1, False, act_k.ACT_HARD_SWISH, np.float32(1.0), 3, y, 0)
    _close(y, linear_k.dense_forward(x, w, b, act_k.ACT_HARD_SWISH))
    y[...] = np.nan
    fused.gemm_packed_bias_act_serial(x, gemm.pack_panels(w), 11, b, dummy, False, dummy, 1, False,
                                      act_k.ACT_HARD_SWISH, np.float32(1.0), 3, 1, y, 0)
    _close(y, linear_k.dense_forward(x, w, b, act_k.ACT_HARD_SWISH))
    xp = rng.standard_normal((2, 11, 12, 5)).astype(np.float32)
    xp[0, 3, 4, 2] = np.nan
    ref, _ = pool_k.max_pool2d_forward(xp, 3, 2, (1, 1, 1, 1), ceil_mode=True)
    yp = np.empty_like(ref)
    fused.max_pool_inference(xp, 3, 3, 2, 2, 1, 1, yp)
    np.testing.assert_array_equal(yp, ref)  # a max is exact; NaN propagates the same way


# --------------------------------------------------------------------------- the plan vs the layer path


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_plan_matches_layer_path(arch, rng):
    """Unit by unit at 1e-5; whole random networks at 1e-3, because a He-initialised network with
    no trained statistics amplifies float32 rounding (logits of order 1e3; the torchvision
    fixtures below check whole models at 1e-5 absolute)."""
    model = build(arch)
    randomise_batchnorm_statistics(model, rng)
    h, w, c = model.input_shape
    x = rng.standard_normal((3, h, w, c)).astype(np.float32)
    ref = _layer_path(model, x)
    assert model.inference_plan(x) is not None
    y = model.forward(x)
    _close(y, ref, rtol=1e-3)
    _close(model.forward(x[:1]), ref[:1], rtol=1e-3)  # another shape: its own plan
    from lightcnn.layers.base import Sequential
    from lightcnn.layers.plan import InferencePlan

    if not isinstance(model.features_net, Sequential):
        return  # covid_squeezenet's trunk is not a chain; its whole-model check above suffices
    f = x
    for name, unit in model.features_net.children():
        children = unit.children() if isinstance(unit, Sequential) else [(name, unit)]
        for child_name, child in children:
            ref_unit = child.forward(f)
            _close(InferencePlan([(child_name, child)], f.shape).run(f), ref_unit)
            f = ref_unit


def test_plan_tensors_start_on_a_cache_line(rng):
    """Every tensor the plan keeps in its arena starts on a cache line (the tiles store 16-float vectors)."""
    from lightcnn.kernels.gemm import ALIGN_BYTES

    model = build("squeezenet1_1")
    x = rng.standard_normal((1, 64, 64, 3)).astype(np.float32)
    plan = model.inference_plan(x)
    model.forward(x)
    assert plan._arena.buffers
    for buf in plan._arena.buffers:
        assert buf.ctypes.data % ALIGN_BYTES == 0


@pytest.mark.parametrize("shape", [(2, 7, 7, 960), (3, 1, 1, 5), (8, 13, 13, 17)])
def test_global_avg_pool_kernel_equals_numpy_and_the_mean(shape, rng):
    """fused.global_avg_pool (the numba engine's global pool at batch > 1): the float64 mean within float32
    rounding, and NumPy's np.add.reduce + np.divide (what runs at batch 1, and on the numpy engine) bit for bit."""
    x = rng.standard_normal(shape).astype(np.float32) * 100
    n, h, w, c = shape
    y = np.full((n, c), np.nan, np.float32)
    fused.global_avg_pool(x.reshape(n, h * w, c), y)
    _close(y, x.astype(np.float64).mean(axis=(1, 2)))
    ref = np.add.reduce(x.reshape(n, h * w, c), axis=1)
    np.testing.assert_array_equal(y, np.divide(ref, h * w))


@pytest.mark.parametrize("h,k,stride,items,sub_rows", [(9, 3, 1, 1, 2), (12, 5, 2, 2, 1), (7, 5, 1, 3, 3), (10, 3, 2, 1, 5)])
def test_inverted_residual_band_without_project_matches_oracle(h, k, stride, items, sub_rows, rng):
    """inverted_residual_band without its project conv (a bottleneck with squeeze-excitation, whose gate reads the
    depthwise output whole): y = act2(depthwise(act1(x @ w1 + b1)) + bd), against float64 naive references, over
    bands that share input rows (sub_rows < band) and several items per image."""
    from tests.reference_conv import pointwise_naive
    from tests.reference_depthwise_pool import depthwise_conv2d_naive

    n, c, e = 2, 5, 37
    x = rng.standard_normal((n, h, h + 1, c)).astype(np.float32)
    w1 = (rng.standard_normal((c, e)) / np.sqrt(c)).astype(np.float32)
    b1 = rng.standard_normal(e).astype(np.float32)
    wd = rng.standard_normal((k, k, e)).astype(np.float32)
    bd = rng.standard_normal(e).astype(np.float32)
    pad = k // 2
    expanded = np.clip(pointwise_naive(x.astype(np.float64), w1.astype(np.float64), b1), 0.0, 6.0)  # ReLU6
    ref = depthwise_conv2d_naive(expanded, wd.astype(np.float64), bd.astype(np.float64), (stride, stride),
                                 (pad, pad, pad, pad), act=int(act_k.ACT_HARD_SWISH))
    y = np.full(ref.shape, np.nan, np.float32)
    dummy = np.zeros(1, np.float32)
    fused.inverted_residual_band(x, True, gemm.pack_panels(w1), b1, act_k.ACT_RELU6, wd, bd, stride, stride, pad, pad,
                                 act_k.ACT_HARD_SWISH, False, dummy, dummy, act_k.ACT_NONE, False, np.float32(1.0),
                                 items, sub_rows, y)
    _close(y, ref)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_se_bottlenecks_fuse_expand_and_depthwise(arch, engine, rng, monkeypatch):
    """A bottleneck with squeeze-excitation runs its expand and depthwise convs as one step (NAME.expand+dw), and
    its output equals the two steps', at batch 1 and 3, on 1 and 2 threads: bit for bit on the numba engine (the
    same FMA chains), within float32 rounding on the numpy one (BLAS sums a band's rows in another order)."""
    from lightcnn.layers import plan as plan_mod
    from lightcnn.layers.plan import InferencePlan

    model = build(arch)
    randomise_batchnorm_statistics(model, rng)
    layers = list(model.features_net.children())
    blocks = dict(model.features_net.children())["blocks"]
    with_expand = [f"blocks.{name}" for name, b in blocks.children() if b.se is not None and b.expand is not None]
    fuse = plan_mod.InferencePlan._inverted_residual_fused

    def only_without_se(self, block, x, name, project=True):
        return fuse(self, block, x, name, project) if project else None

    for n in (1, 3):
        x = rng.standard_normal((n,) + tuple(model.input_shape)).astype(np.float32)
        for threads in (1, 2):
            plan = InferencePlan(layers, x.shape, engine=engine, threads=threads)
            fused_steps = [s.name for s in plan.steps if s.name.endswith(".expand+dw")]
            if threads == 1:  # every one; on 2 threads not those whose bands would leave a thread idle
                assert fused_steps == [f"{b}.expand+dw" for b in with_expand]
            assert fused_steps
            monkeypatch.setattr(plan_mod.InferencePlan, "_inverted_residual_fused", only_without_se)
            unfused = InferencePlan(layers, x.shape, engine=engine, threads=threads)
            monkeypatch.undo()
            assert not any(s.name.endswith(".expand+dw") for s in unfused.steps)
            if engine == "numba":
                np.testing.assert_array_equal(plan.run(x), unfused.run(x))
            else:
                _close(plan.run(x), unfused.run(x))


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_plan_two_threads_equals_one(arch, rng):
    """Work split between two threads (GEMM rows or panels, depthwise rows, squeeze-excitation gates by
    channel groups) gives the one-thread plan's logits bit for bit, at batch 1 and 3."""
    from lightcnn.layers import plan_numba
    from lightcnn.kernels import fused
    from lightcnn.layers.plan import InferencePlan

    model = build(arch)
    randomise_batchnorm_statistics(model, rng)
    layers = list(model.features_net.children())
    for n in (1, 3):
        x = rng.standard_normal((n,) + tuple(model.input_shape)).astype(np.float32)
        one, two = InferencePlan(layers, x.shape, threads=1), InferencePlan(layers, x.shape, threads=2)
        gates = [s for s in two.steps if s.op == "se_gate"]
        assert any(plan_numba.kernels_for(s, two) == [fused.se_gate_split] for s in gates)
        assert all(plan_numba.kernels_for(s, one) == [fused.se_gate] for s in gates)
        np.testing.assert_array_equal(two.run(x), one.run(x))


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "squeezenet1_0",
                                  "squeezenet1_1"])
def test_plan_torchvision_fixture_logits(arch, fixtures_dir):
    from tests.conftest import torchvision_model

    model, io = torchvision_model(arch, fixtures_dir)
    assert model.inference_plan(io["input_nhwc"]) is not None
    assert np.abs(model.forward(io["input_nhwc"]) - io["logits"]).max() <= 1e-4


@pytest.mark.parametrize("arch,size,kwargs", [("mobilenet_v2", 97, dict(padding="tf")),
                                              ("mobilenet_v3_small", 65, {}),
                                              ("squeezenet1_0", 99, dict(variant="caffe")),
                                              ("squeezenet1_1", 61, dict(fire="bn_elu", bypass="simple"))])
def test_plan_odd_sizes_and_variants(arch, size, kwargs, rng):
    model = build(arch, **kwargs)
    randomise_batchnorm_statistics(model, rng)
    x = rng.standard_normal((2, size, size + 2, model.input_shape[2])).astype(np.float32)
    _close(model.forward(x), _layer_path(model, x))


def test_plan_sees_parameter_changes(rng):
    model = build("mobilenet_v3_small", num_classes=7)
    x = rng.standard_normal((1, 64, 64, 3)).astype(np.float32)
    y0 = model.forward(x)
    # in place, as an optimiser does, then params_changed() (BN folding is cached by the layer)
    model.features_net["blocks"][3].project.bn.params["weight"] *= 2.0
    model.head_net["classifier"].params["weight"] *= 0.5
    model.params_changed()
    y1 = model.forward(x)
    assert not np.allclose(y0, y1)
    _close(y1, _layer_path(model, x))
    # the squeeze-excitation gate's dense layers, which the numba engine packs into GEMM panels
    model.features_net["blocks"][3].se.fc2.params["weight"] *= -1.0
    model.params_changed()
    y2 = model.forward(x)
    assert not np.allclose(y1, y2)
    _close(y2, _layer_path(model, x))
    model.reset_head(3)  # a new head object: the plan is rebuilt
    _close(model.forward(x), _layer_path(model, x))


def test_plan_output_is_fresh_and_input_untouched(rng):
    model = build("squeezenet1_1", num_classes=5)
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    x0 = x.copy()
    y1 = model.forward(x)
    y2 = model.forward(x * 0.5)
    assert not np.shares_memory(y1, y2)
    np.testing.assert_array_equal(x, x0)
    _close(y1, _layer_path(model, x))


def test_non_float32_and_bad_shapes_use_the_layer_path(rng):
    from lightcnn.errors import ShapeError

    model = build("mobilenet_v3_small", num_classes=4)
    x = rng.standard_normal((1, 32, 32, 3))
    assert model.inference_plan(x) is None  # float64: the layer path (gradient checks use it)
    assert model.forward(x).dtype == np.float64
    with pytest.raises(ShapeError, match="NCHW"):
        model.forward(np.zeros((1, 3, 32, 32), np.float32))


def test_models_copy_and_pickle_without_plans(rng):
    model = build("mobilenet_v3_small", num_classes=4)
    x = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
    y = model.forward(x)
    clone = copy.deepcopy(model)
    assert clone._plans == {}
    clone.head_net["classifier"].params["weight"][:] = 0.0
    clone.params_changed()
    _close(model.forward(x), y)  # the original is unaffected by the clone's change
    assert np.allclose(clone.forward(x), clone.head_net["classifier"].params["bias"])
    assert pickle.loads(pickle.dumps(model))._plans == {}


def test_profile_rows_use_plan_times(rng):
    model = build("mobilenet_v2", num_classes=10)
    rows = model.trace(np.zeros((1, 64, 64, 3), np.float32), profile=True, repeats=2)
    assert [r["name"] for r in rows][:3] == ["features.stem", "features.blocks.0.dw", "features.blocks.0.project"]
    assert all(r["ms"] >= 0 for r in rows) and sum(r["ms"] for r in rows) > 0


def test_profile_gives_a_fused_expand_and_depthwise_step_to_the_expand_row():
    """A step named NAME.expand+dw (a bottleneck with squeeze-excitation) is timed as one: its time goes to the
    expand row and the depthwise row says where it went; the gate and project rows keep their own."""
    from lightcnn.models.base import _attribute_plan_times

    names = ["f.blocks.3.expand", "f.blocks.3.dw", "f.blocks.3.se", "f.blocks.3.project", "f.blocks.4.expand"]
    rows = [dict(name=name) for name in names]
    _attribute_plan_times(rows, {"f.blocks.3.expand+dw": 0.5, "f.blocks.3.se": 0.125, "f.blocks.3.project": 0.25,
                                 "f.blocks.4.expand": 1.0})
    assert [r["ms"] for r in rows] == [0.5, 0.0, 0.125, 0.25, 1.0]
    assert [r.get("fused_into") for r in rows] == [None, "f.blocks.3.expand", None, None, None]


def test_weights_packed_only_releases_and_restores(rng):
    """A predict-only model (Model.weights_packed_only) keeps its GEMM weights only as the numba engine's
    packed panels; its logits do not change, and whatever asks for params gets the arrays back bit-identical
    (after which training runs exactly as on a model that never released them)."""
    from lightcnn.kernels.linear import cross_entropy
    from lightcnn.optim import SGD

    model = build("mobilenet_v2", width_mult=0.35, num_classes=10, bn=False, seed=0)
    model.engine = "numba"
    twin = copy.deepcopy(model)
    saved = {name: value.copy() for name, value in model.state_dict().items()}
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    ref = twin.forward(x)

    model.weights_packed_only = True
    np.testing.assert_array_equal(model.forward(x), ref)
    held = [name for name, layer in model.named_layers() if layer.held_panels("weight") is not None]
    assert "head.classifier" in held and "features.blocks.3.project.conv" in held and len(held) > 30
    classifier = model.head_net["classifier"]
    assert classifier.peek_param("weight") is None  # the plain array is gone, not merely shadowed
    np.testing.assert_array_equal(model.forward(x[:1]), ref[:1])  # a second plan reads the same panels
    assert classifier.peek_param("weight") is None

    state = model.state_dict()  # asking for params unpacks them
    assert not any(layer.held_panels("weight") is not None for _, layer in model.named_layers())
    assert list(state) == list(saved)  # same names in the same order
    for name, value in saved.items():
        assert state[name].dtype == value.dtype and state[name].shape == value.shape
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    np.testing.assert_array_equal(model.forward(x), ref)

    model2 = build("mobilenet_v2", width_mult=0.35, num_classes=10, bn=False, seed=0)
    model2.engine, model2.weights_packed_only = "numba", True
    model2.forward(x)  # released, then trained: the optimiser's named_parameters() brings them back
    labels = np.array([3, 7])
    for net in (model2, twin):
        opt = SGD(net, lr=0.01, momentum=0.9)
        net.backward(cross_entropy(net.forward(x, training=True), labels)[1])
        opt.step()
    for (name, _, _, a), (_, _, _, b) in zip(model2.named_parameters(), twin.named_parameters()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(model2.forward(x), twin.forward(x))
