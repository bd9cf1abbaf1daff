"""The packed-weight GEMM (lightcnn.kernels.gemm) against a float64 NumPy oracle.

The tile is LLVM IR with masked loads and stores at the panel edges, so the grid walks every edge:
rows around MR (1, MR - 1, MR, MR + 1, 49), columns around the 16/32-wide panels (1, 15, 16, 17,
24, 31, 33, 144), K = 1, residual and squeeze-excitation inputs, an output window inside a wider
buffer (nothing outside it may be written), and the activations the IR applies itself (none, ReLU,
ReLU6, hard-swish and ELU with alpha 1, both in float32) beside ELU with another alpha, which goes through the
Numba epilogue. The IR's ELU is held to 1 float32 ulp of math.expm1 on its own, NaN and the infinities included.

The implicit-GEMM convolution (fused.conv_implicit_bias_act over gemm.conv_rows) is checked against
tests/reference_conv.conv2d_naive, a scalar float64 loop: both of its paths (reading the image
itself when no window touches the padding; a zero-bordered band copy when one does), strides 1 and 2,
kernels 1, 3, 5, 7, asymmetric padding, bands of 0-1 rows up to the whole image, batch 1 and 3, and
row counts that leave tile remainders. The fused Fire module (fused.fire_band) is checked against the
same oracle composed: squeeze, expand 1x1 and expand 3x3 with their activations, concatenated; the
conv + max pool stem (fused.conv_max_pool) against conv2d_naive then reference_depthwise_pool's max_pool2d_naive.
"""

import math

import numpy as np
import pytest

from lightcnn.kernels import activation as act_k
from lightcnn.kernels import fused, gemm

from .reference_conv import conv2d_naive, pointwise_naive
from .reference_depthwise_pool import max_pool2d_naive

RTOL = 1e-5


def _oracle_act(z, act):
    if act == act_k.ACT_NONE:
        return z
    if act == act_k.ACT_RELU:
        return np.where(z < 0, 0.0, z)
    if act == act_k.ACT_RELU6:
        return np.where(z < 0, 0.0, np.where(z > 6, 6.0, z))
    if act == act_k.ACT_HARD_SWISH:
        return z * np.clip(z + 3.0, 0.0, 6.0) / 6.0
    if act == act_k.ACT_ELU:
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    raise ValueError(act)


def _oracle(x, w, b, act, res=None, scale=None, rows_per_image=1):
    x = x.astype(np.float64)
    if scale is not None:
        x = x * np.repeat(scale.astype(np.float64), rows_per_image, axis=0)[:x.shape[0]]
    y = _oracle_act(x @ w.astype(np.float64) + b, act)
    return y if res is None else y + res


def _close(a, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(a - ref).max() <= RTOL * scale, np.abs(a - ref).max() / scale


@pytest.mark.parametrize("n_out", [1, 15, 16, 17, 24, 31, 32, 33, 48, 144])
def test_pack_panels_layout(n_out, rng):
    k = 5
    w = rng.standard_normal((k, n_out)).astype(np.float32)
    wp = gemm.pack_panels(w)
    n_panels = gemm.panel_count(n_out)
    for p in range(n_panels):
        c0 = p * gemm.NR
        width = gemm.NR if p < n_panels - 1 else (16 if n_out - c0 <= 16 else gemm.NR)
        panel = wp[c0 * k:c0 * k + k * width].reshape(k, width)
        valid = min(width, n_out - c0)
        np.testing.assert_array_equal(panel[:, :valid], w[:, c0:c0 + valid])
        assert not panel[:, valid:].any()  # zero padding
    assert wp.size == k * (gemm.NR * (n_panels - 1) + width)


@pytest.mark.parametrize("m", [1, gemm.MR - 1, gemm.MR, gemm.MR + 1, 49])
# k around the tile loop's 4-step passes (gemm.K_UNROLL, for tiles of >= 8 rows): none, one, one plus the rest
@pytest.mark.parametrize("k,n_out", [(1, 17), (24, 144), (7, 1), (33, 16), (16, 24), (40, 33), (3, 40), (4, 33), (5, 32)])
@pytest.mark.parametrize("act", [act_k.ACT_NONE, act_k.ACT_RELU, act_k.ACT_RELU6, act_k.ACT_HARD_SWISH,
                                 act_k.ACT_ELU])
def test_packed_gemm_matches_oracle(m, k, n_out, act, rng):
    x = rng.standard_normal((m, k)).astype(np.float32) * 2
    w = rng.standard_normal((k, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    y = np.full((m, n_out + 5), np.nan, np.float32)  # a wider buffer: columns 2 .. 2+O are the output
    dummy = np.zeros((1, 1), np.float32)
    wp = gemm.pack_panels(w)
    for kern, tile, groups in [(fused.gemm_packed_bias_act_serial, m, 1), (fused.gemm_packed_bias_act, 5, 1),
                               (fused.gemm_packed_bias_act, m, 2), (fused.gemm_packed_bias_act, 13, 3)]:
        y[:] = np.nan
        kern(x, wp, n_out, b, dummy, False, dummy, 1, False, act, np.float32(1.0), tile, groups, y, 2)
        _close(y[:, 2:2 + n_out], _oracle(x, w, b, act))
        assert np.isnan(y[:, :2]).all() and np.isnan(y[:, 2 + n_out:]).all()


@pytest.mark.parametrize("act", [act_k.ACT_RELU, act_k.ACT_HARD_SWISH])
def test_packed_gemm_residual_and_se_scale(act, rng):
    n, hw, k, n_out = 3, 10, 20, 37
    x = rng.standard_normal((n * hw, k)).astype(np.float32)
    w = rng.standard_normal((k, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    res = rng.standard_normal((n * hw, n_out + 4)).astype(np.float32)
    s = rng.uniform(0, 1, (n, k)).astype(np.float32)
    y = np.full((n * hw, n_out + 4), np.nan, np.float32)
    fused.gemm_packed_bias_act(x, gemm.pack_panels(w), n_out, b, res, True, s, hw, True, act, np.float32(1.0), 7, 1,
                               y, 4)
    # the skip joins after the activation (Fire's bypass), read from the same columns as written
    _close(y[:, 4:], _oracle(x, w, b, act, res=res[:, 4:], scale=s, rows_per_image=hw))
    assert np.isnan(y[:, :4]).all()


@pytest.mark.parametrize("act", [act_k.ACT_RELU6, act_k.ACT_ELU])
def test_packed_gemm_spans_several_row_chunks(act, rng):
    """Inputs larger than GEMM_CHUNK_BYTES go panel by panel per chunk of rows: chunk edges that fall inside a
    thread's row range and off the MR grid, a residual, every panel and row written once."""
    k, n_out = 300, 70
    chunk = gemm.GEMM_CHUNK_BYTES // (4 * k) // gemm.MR * gemm.MR
    m = 2 * chunk + gemm.MR + 5  # three chunks, the last one not a whole number of tiles
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n_out)) * 0.1).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    res = rng.standard_normal((m, n_out + 3)).astype(np.float32)
    dummy = np.zeros((1, 1), np.float32)
    wp = gemm.pack_panels(w)
    ref = _oracle(x, w, b, act, res=res[:, 3:])
    for kern, tile, groups in [(fused.gemm_packed_bias_act_serial, m, 1), (fused.gemm_packed_bias_act, chunk + 7, 1),
                               (fused.gemm_packed_bias_act, m, 2)]:
        y = np.full((m, n_out + 3), np.nan, np.float32)
        kern(x, wp, n_out, b, res, True, dummy, 1, False, act, np.float32(1.0), tile, groups, y, 3)
        _close(y[:, 3:], ref)
        assert np.isnan(y[:, :3]).all()


def test_gemm_and_conv_above_the_prefetch_size_match_the_oracles(rng):
    """Arrays of PREFETCH_MIN_BYTES and more take the branches that prefetch the next tiles' lines (to be read,
    for K <= PREFETCH_READ_MAX_K, and to be written): every tile is still computed once, and nothing past the
    output window is written."""
    k, n_out = 64, 48
    m = gemm.PREFETCH_MIN_BYTES // (4 * n_out) + 3 * gemm.MR + 5
    assert k <= gemm.PREFETCH_READ_MAX_K and min(m * k, m * (n_out + 3)) * 4 >= gemm.PREFETCH_MIN_BYTES
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n_out)) * 0.1).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    dummy = np.zeros((1, 1), np.float32)
    y = np.full((m, n_out + 3), np.nan, np.float32)
    fused.gemm_packed_bias_act_serial(x, gemm.pack_panels(w), n_out, b, dummy, False, dummy, 1, False,
                                      act_k.ACT_RELU, np.float32(1.0), m, 1, y, 3)
    _close(y[:, 3:], _oracle(x, w, b, act_k.ACT_RELU))
    assert np.isnan(y[:, :3]).all()

    img = rng.standard_normal((1, 130, 130, 8)).astype(np.float32)  # 3x3 conv, 128 x 128 x 37 outputs: 2.4 MB
    wc = rng.standard_normal((3, 3, 8, 37)).astype(np.float32)
    bc = rng.standard_normal(37).astype(np.float32)
    # conv2d_naive's scalar loop takes ~10 s at this size: the same sum as nine shifted float64 matmuls
    img64, wc64 = img.astype(np.float64), wc.astype(np.float64)
    ref = sum(img64[:, p:p + 128, q:q + 128, :] @ wc64[p, q] for p in range(3) for q in range(3)) + bc
    yc = np.full((128 * 128, 37 + 3), np.nan, np.float32)
    assert yc.size * 4 >= gemm.PREFETCH_MIN_BYTES
    fused.conv_implicit_bias_act(img, gemm.pack_panels(wc.reshape(-1, 37)), 37, 3, 3, 1, 1, 0, 0, 128, 128, bc,
                                 dummy, False, act_k.ACT_NONE, np.float32(1.0), 4, yc, 3)
    _close(yc[:, 3:], ref.reshape(-1, 37))
    assert np.isnan(yc[:, :3]).all()


def test_packed_gemm_nan_passes_the_clamps(rng):
    """ReLU/ReLU6/ELU in the IR epilogue let NaN through, as relu_scalar does (training's NaN check must see it)."""
    x = rng.standard_normal((5, 8)).astype(np.float32)
    x[2, 3] = np.nan
    w = rng.standard_normal((8, 20)).astype(np.float32)
    b = np.zeros(20, np.float32)
    dummy = np.zeros((1, 1), np.float32)
    for act in (act_k.ACT_RELU, act_k.ACT_RELU6, act_k.ACT_ELU):
        y = np.zeros((5, 20), np.float32)
        fused.gemm_packed_bias_act_serial(x, gemm.pack_panels(w), 20, b, dummy, False, dummy, 1, False, act,
                                          np.float32(1.0), 5, 1, y, 0)
        assert np.isnan(y[2]).all() and not np.isnan(np.delete(y, 2, axis=0)).any()


def _elu_inputs(rng):
    """float32 values across ELU's whole negative range and its edges, as an (M, 1) column."""
    u = np.concatenate([-np.abs(rng.standard_normal(60_000) * 4), -np.exp(rng.uniform(-30, 4.5, 60_000)),
                        np.linspace(-20, 0, 20_001), rng.standard_normal(5_000)]).astype(np.float32)
    edges = [np.nan, 0.0, -0.0, np.inf, -np.inf, -40.0, -41.0, -17.5, -1e-30, -1e-40, -88.0, -np.log(2) / 2, 3.0]
    return np.concatenate([np.array(edges, np.float32), u]).reshape(-1, 1)


def _elu_exact(u):
    """ELU (alpha 1) of float32 values, from math.expm1 in float64, rounded once to float32."""
    exact = [v if not v < 0 else math.expm1(v) for v in u.astype(np.float64).ravel()]
    return np.array(exact, np.float64).astype(np.float32).reshape(u.shape)


def _ulps(a, b):
    """Distance in float32 units in the last place between same-signed finite arrays a and b."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_ir_elu_is_within_one_ulp_of_expm1(rng):
    """The tiles' float32 ELU (gemm.py's elu, alpha 1) on its own: K = 1, weight 1, bias 0 make the GEMM exact,
    so each output is ELU(x) as the epilogue computes it; through the pointwise tile and the implicit conv's."""
    x = _elu_inputs(rng)
    exact = _elu_exact(x)
    one, no_bias, dummy = np.ones((1, 1), np.float32), np.zeros(1, np.float32), np.zeros((1, 1), np.float32)
    outputs = []
    y = np.empty_like(x)
    fused.gemm_packed_bias_act_serial(x, gemm.pack_panels(one), 1, no_bias, dummy, False, dummy, 1, False,
                                      np.int64(act_k.ACT_ELU), np.float32(1.0), x.shape[0], 1, y, 0)
    outputs.append(y)
    y = np.empty_like(x)
    fused.conv_implicit_bias_act(x.reshape(1, 1, -1, 1), gemm.pack_panels(one), 1, 1, 1, 1, 1, 0, 0, 1, x.shape[0],
                                 no_bias, dummy, False, np.int64(act_k.ACT_ELU), np.float32(1.0), 2, y, 0)
    outputs.append(y)
    for y in outputs:
        assert np.isnan(y[0, 0]) and y[3, 0] == np.inf and y[4, 0] == -1.0  # NaN, +inf, -inf
        finite = np.isfinite(exact) & (exact != 0)
        assert _ulps(y[finite], exact[finite]).max() <= 1
        assert not y[1:3].any()  # +-0 -> 0 (the bias add makes -0 + 0 = +0 before the activation)
        assert y[9, 0] == exact[9, 0] and y[9, 0] < 0  # a denormal input keeps its value


def test_elu_with_another_alpha_takes_the_numba_epilogue(rng):
    """The IR takes no alpha: ELU with alpha != 1 runs the float64 elu_scalar, which rounds as math.expm1 does."""
    x = _elu_inputs(rng)[13:]
    alpha = np.float32(0.7)
    one, no_bias, dummy = np.ones((1, 1), np.float32), np.zeros(1, np.float32), np.zeros((1, 1), np.float32)
    y = np.empty_like(x)
    fused.gemm_packed_bias_act_serial(x, gemm.pack_panels(one), 1, no_bias, dummy, False, dummy, 1, False,
                                      np.int64(act_k.ACT_ELU), alpha, x.shape[0], 1, y, 0)
    u = np.minimum(x, 0).astype(np.float64)
    np.testing.assert_array_equal(y, np.where(x > 0, x, float(alpha) * np.expm1(u)).astype(np.float32))
    assert gemm.epilogue_in_ir(np.int64(act_k.ACT_ELU), np.float32(1.0))
    assert not gemm.epilogue_in_ir(np.int64(act_k.ACT_ELU), alpha)


def test_lowlevel_stand_in_refuses_python_calls():
    from lightcnn._jit import lowlevel

    @lowlevel
    def tile(numba):
        return None

    with pytest.raises(TypeError, match="LLVM IR"):
        tile(1, 2)


# (x shape, kernel, stride, pad (top, bottom, left, right), bands per image)
CONV_CASES = [
    ((1, 7, 9, 3), 3, 2, (1, 1, 1, 1), 2),      # MobileNet stem geometry, padded
    ((3, 6, 5, 4), 3, 1, (0, 1, 0, 1), 4),      # bottom/right padding only (TF SAME), batch 3
    ((1, 13, 13, 2), 7, 2, (0, 0, 0, 0), 3),    # SqueezeNet 1.0 stem geometry: no padding, reads x itself
    ((2, 15, 15, 3), 3, 2, (0, 0, 0, 0), 1),    # SqueezeNet 1.1 stem geometry, one band per image
    ((1, 4, 4, 5), 1, 1, (1, 1, 1, 1), 4),      # 1x1 with padding: the border outputs are bias only
    ((2, 9, 11, 16), 3, 1, (1, 1, 1, 1), 3),    # a Fire expand: 99 rows per image (tile remainders)
    ((1, 5, 6, 7), 5, 1, (2, 2, 2, 2), 9),      # more bands than output rows: empty items
    ((1, 8, 7, 3), 3, 1, (0, 0, 0, 0), 2),      # unpadded stride 1
]


@pytest.mark.parametrize("shape,k,stride,pad,bands", CONV_CASES)
@pytest.mark.parametrize("act", [act_k.ACT_NONE, act_k.ACT_RELU, act_k.ACT_RELU6, act_k.ACT_HARD_SWISH,
                                 act_k.ACT_ELU])
def test_implicit_conv_matches_naive_conv(shape, k, stride, pad, bands, act, rng):
    x = rng.standard_normal(shape).astype(np.float32) * 2
    n_out = 37  # a 32-wide panel and a 16-wide one with 5 columns used
    w = rng.standard_normal((k, k, shape[3], n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    ref = _oracle_act(conv2d_naive(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                   (stride, stride), pad), act)
    n, ho, wo, _ = ref.shape
    y = np.full((n * ho * wo, n_out + 5), np.nan, np.float32)  # columns 2 .. 2+O are the output
    dummy = np.zeros((1, 1), np.float32)
    fused.conv_implicit_bias_act(x, gemm.pack_panels(w.reshape(-1, n_out)), n_out, k, k, stride, stride, pad[0],
                                 pad[2], ho, wo, b, dummy, False, act, np.float32(1.0), bands, y, 2)
    _close(y[:, 2:2 + n_out], ref.reshape(-1, n_out))
    assert np.isnan(y[:, :2]).all() and np.isnan(y[:, 2 + n_out:]).all()


@pytest.mark.parametrize("act", [act_k.ACT_RELU, act_k.ACT_ELU])
def test_implicit_conv_residual(act, rng):
    """Fire's bypass: the skip joins after the activation, read from the output's own columns."""
    x = rng.standard_normal((2, 7, 6, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 20)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    ref = _oracle_act(conv2d_naive(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), (1, 1),
                                   (1, 1, 1, 1)), act).reshape(-1, 20)
    res = rng.standard_normal((2 * 7 * 6, 24)).astype(np.float32)
    y = np.full((2 * 7 * 6, 24), np.nan, np.float32)
    fused.conv_implicit_bias_act(x, gemm.pack_panels(w.reshape(-1, 20)), 20, 3, 3, 1, 1, 1, 1, 7, 6, b, res, True,
                                 act, np.float32(1.0), 2, y, 4)
    _close(y[:, 4:], ref + res[:, 4:])
    assert np.isnan(y[:, :4]).all()


# (N, H, W, C, squeeze, e1, e3, bands per image, bypass)
FIRE_CASES = [
    (1, 13, 13, 32, 16, 24, 40, 2, False),   # a 13x13 SqueezeNet map at batch 1: two bands of 7 and 6 rows
    (2, 7, 9, 64, 20, 32, 32, 3, True),      # the bypass (in_ch = e1 + e3), batch 2
    (1, 3, 4, 5, 3, 17, 7, 5, False),        # more bands than rows; 17 and 7 columns: panel remainders
    (3, 1, 1, 4, 2, 3, 5, 1, False),         # a 1x1 map: the 3x3 reads only padding around its centre
]


@pytest.mark.parametrize("n,h,w,c,s_ch,e1,e3,bands,bypass", FIRE_CASES)
@pytest.mark.parametrize("act", [act_k.ACT_RELU, act_k.ACT_RELU6, act_k.ACT_ELU])
def test_fire_band_matches_naive_fire(n, h, w, c, s_ch, e1, e3, bands, bypass, act, rng):
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    ws, bs = rng.standard_normal((c, s_ch)).astype(np.float32), rng.standard_normal(s_ch).astype(np.float32)
    w1, b1 = rng.standard_normal((s_ch, e1)).astype(np.float32), rng.standard_normal(e1).astype(np.float32)
    w3, b3 = rng.standard_normal((3, 3, s_ch, e3)).astype(np.float32), rng.standard_normal(e3).astype(np.float32)
    f64 = [a.astype(np.float64) for a in (x, ws, bs, w1, b1, w3, b3)]
    sq = _oracle_act(pointwise_naive(f64[0], f64[1], f64[2]), act)
    ref = np.concatenate([_oracle_act(pointwise_naive(sq, f64[3], f64[4]), act),
                          _oracle_act(conv2d_naive(sq, f64[5], f64[6], (1, 1), (1, 1, 1, 1)), act)], axis=-1)
    ref = ref.reshape(-1, e1 + e3)
    if bypass:
        ref = ref + f64[0].reshape(-1, c)
    res = x.reshape(-1, c) if bypass else np.zeros((1, 1), np.float32)
    y = np.full((n * h * w, e1 + e3), np.nan, np.float32)
    pack = gemm.pack_panels
    fused.fire_band(x, pack(ws), bs, act, pack(w1), b1, act, pack(w3.reshape(-1, e3)), b3, act, res, bypass,
                    np.float32(1.0), bands, y)
    _close(y, ref)


# (x shape, conv kernel, conv stride, conv pad, pool kernel, pool stride, pool pad, ceil mode, bands per image)
CONV_POOL_CASES = [
    ((1, 23, 23, 3), 3, 2, (0, 0, 0, 0), 3, 2, (0, 0, 0, 0), True, 2),   # SqueezeNet 1.1's stem, ceil mode
    ((2, 25, 21, 3), 7, 2, (0, 0, 0, 0), 3, 2, (0, 0, 0, 0), True, 3),   # SqueezeNet 1.0's, batch 2
    ((1, 12, 12, 4), 3, 1, (1, 1, 1, 1), 3, 2, (1, 1, 1, 1), False, 4),  # padded conv and padded pool
    ((1, 9, 10, 2), 3, 1, (1, 1, 1, 1), 2, 2, (0, 0, 0, 0), False, 9),   # 2x2 pool, more bands than rows
]


@pytest.mark.parametrize("shape,k,stride,pad,pk,ps,ppad,ceil,bands", CONV_POOL_CASES)
# ReLU, ReLU6 and ELU commute with the max and run on the pooled values; hard-swish does not (it dips below 0
# and rises again) and must stay in the conv's epilogue: its oracle pools the activated conv output.
@pytest.mark.parametrize("act", [act_k.ACT_NONE, act_k.ACT_RELU, act_k.ACT_RELU6, act_k.ACT_ELU, act_k.ACT_HARD_SWISH])
def test_conv_max_pool_matches_naive(shape, k, stride, pad, pk, ps, ppad, ceil, bands, act, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    n_out = 20
    w = rng.standard_normal((k, k, shape[3], n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    conv = _oracle_act(conv2d_naive(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                    (stride, stride), pad), act)
    ref, _ = max_pool2d_naive(conv, (pk, pk), (ps, ps), ppad, ceil_mode=ceil)
    _, ho, wo, _ = conv.shape
    y = np.full(ref.shape, np.nan, np.float32)
    fused.conv_max_pool(x, gemm.pack_panels(w.reshape(-1, n_out)), n_out, k, k, stride, stride, pad[0], pad[2], ho, wo,
                        b, act, np.float32(1.0), pk, pk, ps, ps, ppad[0], ppad[2], bands, y)
    _close(y, ref)


@pytest.mark.parametrize("n,h,w,c,s_ch", [(1, 7, 7, 960, 240), (3, 5, 4, 37, 13), (13, 1, 1, 16, 8), (2, 14, 14, 72, 24)])
@pytest.mark.parametrize("gate", [act_k.ACT_HARD_SIGMOID, act_k.ACT_SIGMOID])
def test_se_gate_matches_oracle(n, h, w, c, s_ch, gate, rng):
    """fused.se_gate (mean, two dense layers on packed panels, the optional in-place multiply): rows 1..13
    (over MR), channels off the 32-wide panels, a gate the IR epilogue does not apply (the Numba one does)."""
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    w1 = (rng.standard_normal((c, s_ch)) / np.sqrt(c)).astype(np.float32)
    w2 = (rng.standard_normal((s_ch, c)) / np.sqrt(s_ch)).astype(np.float32)
    b1 = rng.standard_normal(s_ch).astype(np.float32)
    b2 = rng.standard_normal(c).astype(np.float32)
    hidden = np.maximum(x.astype(np.float64).mean(axis=(1, 2)) @ w1 + b1, 0.0)
    z = hidden @ w2 + b2
    ref = np.clip(z + 3.0, 0.0, 6.0) / 6.0 if gate == act_k.ACT_HARD_SIGMOID else 1.0 / (1.0 + np.exp(-z))
    x0 = x.copy()
    for in_place in (False, True):
        s = np.full((n, c), np.nan, np.float32)
        fused.se_gate(x, gemm.pack_panels(w1), b1, gemm.pack_panels(w2), b2, gate, np.float32(1.0), in_place, s, 1)
        _close(s, ref)
        # in place: x times its image's gate, the float32 products the layer path's multiply makes
        np.testing.assert_array_equal(x, x0 * s[:, None, None, :] if in_place else x0)
        # the parallel build (images shared out for the pooling and, at batch > 1, the multiply; w2's panels
        # split in `groups`): the same numbers, whatever the number of groups
        for parts in (1, 2, 3):
            xs, ss = x0.copy(), np.full((n, c), np.nan, np.float32)
            fused.se_gate_split(xs, gemm.pack_panels(w1), b1, gemm.pack_panels(w2), b2, gate, np.float32(1.0), in_place,
                                ss, parts)
            np.testing.assert_array_equal(ss, s)
            np.testing.assert_array_equal(xs, x)
        x[...] = x0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_aligned_arrays_start_on_a_cache_line_and_hold_what_is_written(dtype):
    """aligned_empty (NumPy side) and scratch (inside kernels) start on an ALIGN_BYTES boundary for sizes that
    NumPy / Numba alone would place 16 or 32 bytes past one, and every element is the caller's: filling all n with
    distinct values reads them back (no overlap with the alignment slack, no short array)."""
    for n in [1, 15, 16, 17, 1000, 300_001]:
        host = gemm.aligned_empty((n,), dtype)
        inner = gemm.scratch(n, np.zeros(1, dtype))
        for a in (host, inner):
            assert a.shape == (n,) and a.dtype == dtype and a.flags.c_contiguous
            assert a.ctypes.data % gemm.ALIGN_BYTES == 0
            a[:] = np.arange(n, dtype=dtype)
            np.testing.assert_array_equal(a, np.arange(n, dtype=dtype))
    two_d = gemm.aligned_empty((7, 33))
    assert two_d.shape == (7, 33) and two_d.ctypes.data % gemm.ALIGN_BYTES == 0


def test_packed_panels_start_on_a_cache_line(rng):
    """Each panel is k x 32 floats, so with the first on a line every 16-float weight vector the tile loads is."""
    for k, n_out in [(3, 17), (27, 64), (576, 1000)]:
        wp = gemm.pack_panels(rng.standard_normal((k, n_out)).astype(np.float32))
        assert wp.ctypes.data % gemm.ALIGN_BYTES == 0


@pytest.mark.parametrize("shape", [(5, 1), (5, 16), (5, 17), (3, 33), (1, 1, 24, 144), (3, 3, 4, 40)])
def test_unpack_panels_inverts_pack_panels(shape, rng):
    """A predict-only model's weights come back from their panels (Layer.hold_packed) bit for bit."""
    w = rng.standard_normal(shape).astype(np.float32)
    back = gemm.unpack_panels(gemm.pack_panels(w.reshape(-1, shape[-1])), shape)
    assert back.dtype == np.float32 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, w)


@pytest.mark.parametrize("n,h,w,c,s_ch,e1,e3,pool,bands,chunk", [
    (2, 11, 9, 20, 6, 10, 12, (3, 2, 0, True), 1, 2),    # SqueezeNet's ceil-mode 3x3/2 pool, chunks of 2 rows
    (1, 13, 13, 40, 16, 32, 32, (3, 2, 0, True), 3, 1),  # bands of uneven height, one pooled row at a time
    (3, 8, 7, 9, 5, 7, 33, (2, 2, 1, False), 2, 100),    # padded pool, whole bands, E3 over a 32-wide panel
])
def test_fire_max_pool_matches_naive(n, h, w, c, s_ch, e1, e3, pool, bands, chunk, rng):
    """fused.fire_max_pool: fire_band's output, max-pooled, chunk by chunk of pooled rows, against the float64
    Fire (squeeze, expand 1x1, expand 3x3 pad 1, ReLU) then max_pool2d_naive."""
    pk, ps, ppad, ceil = pool
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    ws, bs = (rng.standard_normal((c, s_ch)) * 0.3).astype(np.float32), rng.standard_normal(s_ch).astype(np.float32)
    w1, b1 = (rng.standard_normal((s_ch, e1)) * 0.3).astype(np.float32), rng.standard_normal(e1).astype(np.float32)
    w3 = (rng.standard_normal((3, 3, s_ch, e3)) * 0.2).astype(np.float32)
    b3 = rng.standard_normal(e3).astype(np.float32)
    relu = act_k.ACT_RELU
    f64 = np.float64
    sq = np.maximum(x.astype(f64) @ ws + bs, 0.0)
    fire = np.concatenate([np.maximum(sq @ w1 + b1, 0.0),
                           _oracle_act(conv2d_naive(sq, w3.astype(f64), b3.astype(f64), (1, 1), (1, 1, 1, 1)), relu)],
                          axis=-1)
    ref, _ = max_pool2d_naive(fire, (pk, pk), (ps, ps), (ppad,) * 4, ceil_mode=ceil)
    y = np.full(ref.shape, np.nan, np.float32)
    pack = gemm.pack_panels
    fused.fire_max_pool(x, pack(ws), bs, relu, pack(w1), b1, relu, pack(w3.reshape(-1, e3)), b3, relu, np.float32(1.0),
                        pk, pk, ps, ps, ppad, ppad, bands, chunk, y)
    _close(y, ref)


@pytest.mark.parametrize("n,hw,k,n_out,groups", [(3, 13, 40, 1000, 1), (1, 7, 64, 100, 2), (2, 5, 9, 33, 3)])
@pytest.mark.parametrize("act", [act_k.ACT_RELU, act_k.ACT_NONE, act_k.ACT_ELU])
def test_gemm_bias_act_mean_matches_oracle_and_the_two_steps(n, hw, k, n_out, groups, act, rng):
    """fused.gemm_bias_act_mean (a pointwise conv and the global average pool after it) against float64, and bit
    for bit against the two steps it replaces: gemm_packed_bias_act, then np.add.reduce over the pixels / H*W."""
    x = rng.standard_normal((n * hw * hw, k)).astype(np.float32)
    w = (rng.standard_normal((k, n_out)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    ref = _oracle(x, w, b, act).reshape(n, hw * hw, n_out).mean(axis=1)
    wp, dummy = gemm.pack_panels(w), np.zeros((1, 1), np.float32)
    y = np.full((n, n_out), np.nan, np.float32)
    fused.gemm_bias_act_mean(x, wp, n_out, b, act, np.float32(1.0), hw * hw, groups, y)
    _close(y, ref)
    conv = np.empty((n * hw * hw, n_out), np.float32)
    fused.gemm_packed_bias_act(x, wp, n_out, b, dummy, False, dummy, 1, False, act, np.float32(1.0), 37, 1, conv, 0)
    pooled = np.add.reduce(conv.reshape(n, hw * hw, n_out), axis=1)
    np.testing.assert_array_equal(y, np.divide(pooled, hw * hw))
