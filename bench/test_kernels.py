"""Per-kernel latency at the real layer shapes of MobileNetV2, MobileNetV3 and SqueezeNet (batch 1, 224x224).

Groups (``--benchmark-group-by=group``, the default here):
  pointwise         1x1 conv as one GEMM: public kernel (layer path), the OpenBLAS tile kernel (`fused`) and the
                    packed-weight GEMM the plan runs (`packed`, lightcnn.kernels.gemm)
  depthwise-3x3-s1, depthwise-3x3-s2, depthwise-5x5
  conv-3x3          the stems (3 -> 32 / 16 / 64 channels, stride 2) and a Fire expand 3x3: public kernel, im2col +
                    packed GEMM (`fused`), implicit GEMM (`implicit`, what the plan runs)
  fire              a whole Fire module: layer path vs inference plan
  inverted-residual a whole MobileNetV2 bottleneck: layer path vs inference plan (fused band kernel)
  transpose-conv    covid_squeezenet's 4x4 stride-4 upsampling
Threads: whatever Numba's pool is set to (default: all cores); see test_models.py for 1 vs 2.
"""

import numpy as np
import pytest

from lightcnn.kernels import activation as act_k
from lightcnn.kernels import conv as conv_k
from lightcnn.kernels import depthwise as dw_k
from lightcnn.kernels import fused, gemm
from lightcnn.kernels import transpose as tconv_k

from conftest import run

RELU6 = act_k.ACT_RELU6

# (name, H=W, C_in, C_out): MobileNetV2 expand/project/last, MobileNetV3 and SqueezeNet 1x1 convs
POINTWISE = [
    ("mnv2-b1-expand-112x16-96", 112, 16, 96),
    ("mnv2-b2-project-56x144-24", 56, 144, 24),
    ("mnv2-b11-expand-14x96-576", 14, 96, 576),
    ("mnv2-b16-project-7x960-320", 7, 960, 320),
    ("mnv2-last-7x320-1280", 7, 320, 1280),
    ("sqz-fire2-squeeze-55x96-16", 55, 96, 16),
    ("sqz-classifier-13x512-1000", 13, 512, 1000),
]
# (name, H=W, C, stride)
DEPTHWISE_3_S1 = [("mnv2-b0-112x32", 112, 32, 1), ("mnv2-b2-56x144", 56, 144, 1), ("mnv2-b11-14x576", 14, 576, 1)]
DEPTHWISE_3_S2 = [("mnv2-b1-112x96", 112, 96, 2), ("mnv2-b3-56x144", 56, 144, 2), ("mnv2-b13-14x576", 14, 576, 2)]
DEPTHWISE_5 = [("mnv3-b3-56x72-s2", 56, 72, 2), ("mnv3-b4-28x120-s1", 28, 120, 1), ("mnv3-b13-7x960-s1", 7, 960, 1)]
# (name, H=W, C_in, C_out, kernel, stride, pad)
CONV = [
    ("mnv2-stem-224x3-32", 224, 3, 32, 3, 2, 1), ("mnv3-stem-224x3-16", 224, 3, 16, 3, 2, 1),
    ("sqz11-conv1-224x3-64", 224, 3, 64, 3, 2, 0), ("sqz-fire2-expand3x3-55x16-64", 55, 16, 64, 3, 1, 1),
]


def _x(rng, n, h, c):
    return rng.standard_normal((n, h, h, c)).astype(np.float32)


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


@pytest.mark.benchmark(group="pointwise")
@pytest.mark.parametrize("path", ["kernel", "fused", "packed"])
@pytest.mark.parametrize("name,h,c,o", POINTWISE, ids=[p[0] for p in POINTWISE])
def test_pointwise(benchmark, rng, name, h, c, o, path):
    x, w, b = _x(rng, 1, h, c), _w(rng, c, o), _w(rng, o)
    if path == "kernel":
        run(benchmark, conv_k.pointwise_conv_forward, x, w, b, RELU6)
        return
    from lightcnn._jit import get_num_threads
    from lightcnn.layers.plan_numba import gemm_split

    m = h * h
    y = np.empty((m, o), np.float32)
    dummy = np.zeros((1, 1), np.float32)
    if path == "fused":
        tile = fused.choose_tile(m, get_num_threads())
        run(benchmark, fused.gemm_bias_act, x.reshape(m, c), w, b, dummy, False, dummy, m, False, RELU6,
            np.float32(1.0), tile, y, 0)
        return
    tile, groups = gemm_split(m, get_num_threads())
    run(benchmark, fused.gemm_packed_bias_act, x.reshape(m, c), gemm.pack_panels(w), o, b, dummy, False, dummy, m,
        False, RELU6, np.float32(1.0), tile, groups, y, 0)


def _depthwise(benchmark, rng, h, c, stride, k):
    x, w, b = _x(rng, 1, h, c), _w(rng, k, k, c), _w(rng, c)
    p = k // 2
    run(benchmark, dw_k.depthwise_conv2d_forward, x, w, b, stride, (p, p, p, p), RELU6)


@pytest.mark.benchmark(group="depthwise-3x3-s1")
@pytest.mark.parametrize("name,h,c,s", DEPTHWISE_3_S1, ids=[d[0] for d in DEPTHWISE_3_S1])
def test_depthwise_3x3_s1(benchmark, rng, name, h, c, s):
    _depthwise(benchmark, rng, h, c, s, 3)


@pytest.mark.benchmark(group="depthwise-3x3-s2")
@pytest.mark.parametrize("name,h,c,s", DEPTHWISE_3_S2, ids=[d[0] for d in DEPTHWISE_3_S2])
def test_depthwise_3x3_s2(benchmark, rng, name, h, c, s):
    _depthwise(benchmark, rng, h, c, s, 3)


@pytest.mark.benchmark(group="depthwise-5x5")
@pytest.mark.parametrize("name,h,c,s", DEPTHWISE_5, ids=[d[0] for d in DEPTHWISE_5])
def test_depthwise_5x5(benchmark, rng, name, h, c, s):
    _depthwise(benchmark, rng, h, c, s, 5)


@pytest.mark.benchmark(group="conv-3x3")
@pytest.mark.parametrize("path", ["kernel", "fused", "implicit"])
@pytest.mark.parametrize("name,h,c,o,k,s,p", CONV, ids=[c[0] for c in CONV])
def test_conv(benchmark, rng, name, h, c, o, k, s, p, path):
    x, w, b = _x(rng, 1, h, c), _w(rng, k, k, c, o), _w(rng, o)
    pads = (p, p, p, p)
    if path == "kernel":
        run(benchmark, conv_k.conv2d_forward, x, w, b, s, pads, RELU6)
        return
    from lightcnn._jit import get_num_threads

    ho = (h + 2 * p - k) // s + 1
    y = np.empty((ho * ho, o), np.float32)
    dummy = np.zeros((1, 1), np.float32)
    if path == "implicit":  # what the plan runs
        from lightcnn.layers.plan_numba import conv_bands

        run(benchmark, fused.conv_implicit_bias_act, x, gemm.pack_panels(w.reshape(-1, o)), o, k, k, s, s, p, p, ho, ho,
            b, dummy, False, RELU6, np.float32(1.0), conv_bands(1, ho, ho, get_num_threads()), y, 0)
        return
    tile = fused.choose_tile(ho * ho, get_num_threads())
    run(benchmark, fused.conv_im2col_bias_act, x, gemm.pack_panels(w.reshape(-1, o)), o, k, k, s, s, p, p, ho, ho, b,
        dummy, False, RELU6, np.float32(1.0), tile, y, 0)


def _block_paths(block, x):
    from lightcnn.layers.plan import InferencePlan

    plan = InferencePlan([("block", block)], x.shape)
    return {"layers": lambda: block.forward(x), "plan": lambda: plan.run(x)}


@pytest.mark.benchmark(group="fire")
@pytest.mark.parametrize("path", ["layers", "plan"])
@pytest.mark.parametrize("name,h,c,s,e", [("fire2-55x96", 55, 96, 16, 64), ("fire9-13x512", 13, 512, 64, 256)],
                         ids=["fire2-55x96", "fire9-13x512"])
def test_fire(benchmark, rng, name, h, c, s, e, path):
    from lightcnn.layers.blocks import Fire

    block = Fire(c, s, e, e, rng=rng)
    run(benchmark, _block_paths(block, _x(rng, 1, h, c))[path])


@pytest.mark.benchmark(group="inverted-residual")
@pytest.mark.parametrize("path", ["layers", "plan"])
@pytest.mark.parametrize("name,h,c,o,s", [("mnv2-b1-112x16-24-s2", 112, 16, 24, 2), ("mnv2-b2-56x24-24-s1", 56, 24, 24, 1),
                                          ("mnv2-b11-14x96-96-s1", 14, 96, 96, 1)],
                         ids=["mnv2-b1-112x16-24-s2", "mnv2-b2-56x24-24-s1", "mnv2-b11-14x96-96-s1"])
def test_inverted_residual(benchmark, rng, name, h, c, o, s, path):
    from lightcnn.layers.blocks import InvertedResidual

    block = InvertedResidual(c, o, 6 * c, 3, s, "relu6", rng=rng)
    run(benchmark, _block_paths(block, _x(rng, 1, h, c))[path])


@pytest.mark.benchmark(group="transpose-conv")
def test_transpose_conv(benchmark, rng):
    x, w, b = _x(rng, 1, 14, 512), _w(rng, 4, 4, 512, 128), _w(rng, 128)
    run(benchmark, tconv_k.conv_transpose2d_forward, x, w, b, 4, (0, 0, 0, 0), 0, act_k.ACT_ELU)
