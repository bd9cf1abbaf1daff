"""The numba engine: each op of an InferencePlan (lightcnn.layers.plan) bound to a fused Numba kernel.

`bind(step, plan)` returns fn(vals) that runs the step; `kernels_for(step, plan)` names the
kernels that fn will call, which is how `lightcnn.engine` tells, without importing numba,
whether a model's kernels are already compiled and cached.

Every kernel gets one argument signature per dtype: float32 arrays, int64 integers, bool
flags and float32 alpha, whichever op calls it, so each compiles (or loads) once.
Calls go to the kernel's Numba dispatcher directly, bound when the plan is built.
"""

import contextlib

import numpy as np

from lightcnn.kernels import combine as combine_k
from lightcnn.kernels import conv as conv_k
from lightcnn.kernels import depthwise as dw_k
from lightcnn.kernels import transpose as tconv_k
from lightcnn.kernels import fused
from lightcnn.kernels import gemm

_F32 = np.float32
_DUMMY2 = np.zeros((1, 1), _F32)  # stands in for "no residual" / "no SE scale" (typed arguments)
# Small layers run on one thread: GEMMs of fewer multiply-accumulates than SERIAL_MAX_MACS (~6 us of work,
# where waking a second thread costs about what the split saves) and depthwise layers of fewer than
# SERIAL_MAX_DW_MACS (by output rows: 14x14 and 7x7 maps with many channels, 40-80 us each in
# MobileNetV3-Large, are split, the 14x14x184 ones are not). SERIAL_MAX_MACS was 4 M, which kept
# MobileNetV3-Large's 28x28 and 14x14 pointwise convs at batch 1 (1.4-3.7 M each, 30-70 us) on one thread:
# at 1 M its batch-1 forward on 2 threads went 4.50-4.57 -> 4.29-4.39 ms (interleaved with ORT; 250 k and
# 500 k measured the same as 1 M within the noise).
SERIAL_MAX_MACS = 1_000_000
SERIAL_MAX_DW_MACS = 400_000
# Squeeze-excitation gates run on the threads (fused.se_gate_split) at batch > 1, the images shared out for
# the pooling and the multiply (serially they were 12% of MobileNetV3-Large's batch-8 forward on 2 threads),
# and at batch 1 when their two dense layers hold at least SPLIT_MIN_SE_WEIGHTS weights, which are then
# split by w2's panels: MobileNetV3-Large's 14x14 and 7x7 gates (480-960 channels, 0.5-1.8 MB). Smaller
# ones (its 28x28 gates, 120 channels, 30 KB) take ~15 us serially, about what a split costs.
SPLIT_MIN_SE_WEIGHTS = 64 * 1024


def _pointwise_kernel(step):
    p = step.params
    k = p["weights"].shape[0]
    return fused.gemm_packed_bias_act_serial if p["rows"] * k * p["weights"].shape[1] < SERIAL_MAX_MACS \
        else fused.gemm_packed_bias_act


def gemm_split(m, threads):
    """(tile rows, panel groups) for an M-row packed GEMM on `threads` threads: row tiles (a multiple
    of gemm.MR rows) when there are rows enough for a tile of at least 4*MR per thread, else one row
    tile whose column panels are shared out (49 rows at batch 1: each thread does half the panels)."""
    if threads <= 1:
        return max(1, m), 1
    if m >= threads * 4 * gemm.MR:
        tile = fused.choose_tile(m, threads)
        return -(-tile // gemm.MR) * gemm.MR, 1
    return max(1, m), threads


def conv_bands(n_img, ho, wo, threads, pixels=256):
    """Bands per image for fused.conv_implicit_bias_act: about `pixels` output pixels per work item
    and, in all, a multiple of `threads` items (so the threads get equal shares; bands of one
    image differ by at most one row)."""
    items = max(1, threads) * max(1, round(n_img * ho * wo / (max(1, threads) * pixels)))
    return int(min(ho, max(1, -(-items // n_img))))


def fire_bands(n_img, h, w, s_ch, threads, buffer_bytes=1 << 19):
    """Bands per image for fused.fire_band: as few as give every thread an item, since each band squeezes
    its two halo rows again (measured on one core, SqueezeNet 1.1, whole forward: batch 8 49.0 ms with
    these bands, 51.1 ms with ~256-pixel ones), but enough that a band's squeezed rows
    ((rows + 2) x (W + 2) x S floats) fit in `buffer_bytes`."""
    want = -(-max(1, threads) // n_img)
    rows_fit = max(1, buffer_bytes // ((w + 2) * s_ch * 4) - 2)
    return int(min(h, max(want, -(-h // rows_fit))))


def kernels_for(step, plan):
    """The Kernel objects bind(step, plan) calls (numba is not imported)."""
    op = step.op
    if op == "pointwise":
        return [_pointwise_kernel(step)]
    if op == "conv":
        return [fused.conv_implicit_bias_act]
    if op == "depthwise":
        w = step.params["weights"]
        macs = step.params["rows"] * w.shape[0] * w.shape[1] * w.shape[2]
        return [dw_k.dw_forward_serial if macs < SERIAL_MAX_DW_MACS or plan.threads <= 1 else dw_k.dw_forward]
    if op == "inverted_residual":
        return [fused.inverted_residual_band]
    if op == "fire":
        return [fused.fire_band]
    if op == "conv_max_pool":
        return [fused.conv_max_pool]
    if op == "fire_max_pool":
        return [fused.fire_max_pool]
    if op == "pointwise_gap":
        return [fused.gemm_bias_act_mean]
    if op == "se_gate":
        return [] if step.params["grids"] else [_se_gate_kernel(step, plan)]
    if op == "dense":
        return [fused.gemm_packed_bias_act_serial if plan.threads <= 1 else fused.gemm_packed_bias_act]
    if op == "max_pool":
        return [fused.max_pool_inference]
    if op == "transpose_conv":
        return [conv_k.col2im]
    if op == "place":
        return [combine_k.place_fitted]
    if op == "gap" and step.vals["x"].shape[0] > 1:
        return [fused.global_avg_pool]
    return []  # copy, gap at batch 1, scale, add, fake_quant: NumPy; opaque: the layer's own path


def run_context(plan):
    """Nothing to set around a run: no kernel of this engine calls BLAS (they run the packed GEMM, kernels/gemm.py)."""
    return contextlib.nullcontext


def bind(step, plan):
    # No lightcnn._blas.prepare() here: no kernel above calls BLAS since the packed GEMM replaced OpenBLAS
    # tiles, and loading SciPy's BLAS for nothing cost the warm predict process 1.6 MB. (numba's compiler loads
    # it when it runs: lightcnn._jit prepares it then.)
    return _BINDERS[step.op](step, plan)


def _dispatch(kern):
    return kern.dispatcher  # skips the lazy wrapper on every call of the hot loop


def _copy(step, plan):
    xi, ya = step.vals["x"].index, plan.arg(step.vals["y"])[0]

    def run(vals):
        np.copyto(ya, vals[xi])
    return run


def _pointwise(step, plan):
    p, v = step.params, step.vals
    m, width, k = p["rows"], p["width"], p["weights"].shape[0]
    xa, xi = plan.arg(v["x"], (m, k))
    ya = plan.arg(v["y"], (m, width))[0]
    use_res, use_scale = v["res"] is not None, v["scale"] is not None
    ra = plan.arg(v["res"], (m, width))[0] if use_res else _DUMMY2
    sa = plan.arg(v["scale"])[0] if use_scale else _DUMMY2
    kern = _pointwise_kernel(step)
    tile, groups = gemm_split(m, 1 if kern is fused.gemm_packed_bias_act_serial else plan.threads)
    kern, weights, rows_per_image = _dispatch(kern), p["weights"], p["rows_per_image"]
    act, alpha, col0, shape2d, n_out = p["act"], p["alpha"], p["col0"], (m, k), p["weights"].shape[-1]

    def run(vals):
        wp, b = weights.packed()
        xv = xa if xa is not None else vals[xi].reshape(shape2d)
        kern(xv, wp, n_out, b, ra, use_res, sa, rows_per_image, use_scale, act, alpha, tile, groups, ya, col0)
    return run


def _conv(step, plan):
    p, v = step.params, step.vals
    m, width = p["rows"], p["width"]
    xa, xi = plan.arg(v["x"])
    ya = plan.arg(v["y"], (m, width))[0]
    use_res = v["res"] is not None
    ra = plan.arg(v["res"], (m, width))[0] if use_res else _DUMMY2
    (kh, kw), (sh, sw), (ho, wo) = p["kernel"], p["stride"], p["out_hw"]
    top, left, act, alpha, col0 = p["top"], p["left"], p["act"], p["alpha"], p["col0"]
    bands = conv_bands(v["x"].shape[0], ho, wo, plan.threads)
    kern, weights, n_out = _dispatch(fused.conv_implicit_bias_act), p["weights"], p["weights"].shape[-1]

    def run(vals):
        wp, b = weights.packed()
        xv = xa if xa is not None else vals[xi]
        kern(xv, wp, n_out, kh, kw, sh, sw, top, left, ho, wo, b, ra, use_res, act, alpha, bands, ya, col0)
    return run


# Pooled pixels per conv_max_pool work item: each item recomputes the conv rows its pool windows share with
# the next item's (one of every ~2 * 9 for SqueezeNet's 3x3/2 pool at this size), and its conv rows
# (~0.5 MB for SqueezeNet 1.1's 111x111x64 stem) stay in L2.
CONV_POOL_PIXELS = 512


def _conv_max_pool(step, plan):
    conv, pool = (part.params for part in step.params["parts"])
    v = step.vals
    xa, xi = plan.arg(v["x"])
    ya = plan.arg(v["y"])[0]
    n, p_out, q_out, _ = v["y"].shape
    (kh, kw), (sh, sw), (ho, wo) = conv["kernel"], conv["stride"], conv["out_hw"]
    (pkh, pkw), (psh, psw) = pool["kernel"], pool["stride"]
    top, left, act, alpha, ptop, pleft = conv["top"], conv["left"], conv["act"], conv["alpha"], pool["top"], pool["left"]
    bands = conv_bands(n, p_out, q_out, plan.threads, CONV_POOL_PIXELS)
    kern, weights, n_out = _dispatch(fused.conv_max_pool), conv["weights"], conv["weights"].shape[-1]

    def run(vals):
        wp, b = weights.packed()
        kern(xa if xa is not None else vals[xi], wp, n_out, kh, kw, sh, sw, top, left, ho, wo, b, act, alpha, pkh, pkw,
             psh, psw, ptop, pleft, bands, ya)
    return run


def _depthwise(step, plan):
    p, v = step.params, step.vals
    xa, xi = plan.arg(v["x"])
    ya = plan.arg(v["y"])[0]
    kern, weights = _dispatch(kernels_for(step, plan)[0]), p["weights"]
    (sh, sw), top, left, act, alpha = p["stride"], p["top"], p["left"], p["act"], p["alpha"]

    def run(vals):
        wt, b = weights()
        kern(vals[xi] if xa is None else xa, wt, b, sh, sw, top, left, act, alpha, ya)
    return run


def _inverted_residual(step, plan):
    p, v = step.params, step.vals
    xa, ya = plan.arg(v["x"])[0], plan.arg(v["y"])[0]
    n, h, w, _ = v["x"].shape
    w_expand, w_dw, w_project = p["expand"], p["depthwise"], p["project"]
    kh = w_dw.shape[0]
    (sh, sw), top, left = p["stride"], p["top"], p["left"]
    items, sub_rows = fused.band_layout(n, v["y"].shape[1], w, w_dw.shape[2], kh, sh, plan.threads)
    has_expand = w_expand is not None
    act1, act2, act3 = p["acts"]
    alpha, use_res = p["alpha"], p["use_res"]
    has_project = w_project is not None
    dummy_w, dummy_b = np.zeros(1, _F32), np.zeros(1, _F32)
    kern = _dispatch(fused.inverted_residual_band)

    def run(vals):
        w1, b1 = w_expand.packed() if has_expand else (dummy_w, dummy_b)
        wd, bd = w_dw()
        w3, b3 = w_project.packed() if has_project else (dummy_w, dummy_b)
        kern(xa, has_expand, w1, b1, act1, wd, bd, sh, sw, top, left, act2, has_project, w3, b3, act3, use_res, alpha,
             items, sub_rows, ya)
    return run


def _fire_parts(fire):
    """A fire step's squeeze params, and the (act, alpha, Weights) its kernels take for its three convs."""
    squeeze, expand1, expand3 = (part.params for part in fire.params["parts"])
    return squeeze, [q["act"] for q in (squeeze, expand1, expand3)], squeeze["alpha"], [
        q["weights"] for q in (squeeze, expand1, expand3)]


def _fire(step, plan):
    v = step.vals
    squeeze, acts, alpha, weights = _fire_parts(step)
    xa, xi = plan.arg(v["x"])
    n, h, w, c = v["x"].shape
    width = v["y"].shape[-1]
    ya = plan.arg(v["y"], (n * h * w, width))[0]
    use_res = v["res"] is not None
    ra = plan.arg(v["res"], (n * h * w, width))[0] if use_res else _DUMMY2
    bands = fire_bands(n, h, w, squeeze["weights"].shape[-1], plan.threads)
    kern = _dispatch(fused.fire_band)

    def run(vals):
        (ws, bs), (w1, b1), (w3, b3) = (wt.packed() for wt in weights)
        kern(xa if xa is not None else vals[xi], ws, bs, acts[0], w1, b1, acts[1], w3, b3, acts[2], ra, use_res, alpha,
             bands, ya)
    return run


# fire_max_pool: the Fire rows one chunk of pooled rows reads, at most this many bytes (a part of L2).
FIRE_POOL_BUFFER_BYTES = 1 << 20


def _fire_max_pool(step, plan):
    fire, pool = step.params["parts"]
    _, acts, alpha, weights = _fire_parts(fire)
    v = step.vals
    xa, xi = plan.arg(v["x"])
    ya = plan.arg(v["y"])[0]
    n, h, w, _ = v["x"].shape
    p_out, width = v["y"].shape[1], v["y"].shape[3]
    p = pool.params
    (pkh, pkw), (psh, psw), ptop, pleft = p["kernel"], p["stride"], p["top"], p["left"]
    bands = int(min(p_out, -(-max(1, plan.threads) // n)))  # as few as give every thread an item (fire_bands)
    fire_rows_fit = max(pkh, FIRE_POOL_BUFFER_BYTES // (w * width * 4))
    chunk = int(max(1, (fire_rows_fit - pkh) // psh + 1))
    kern = _dispatch(fused.fire_max_pool)

    def run(vals):
        (ws, bs), (w1, b1), (w3, b3) = (wt.packed() for wt in weights)
        kern(xa if xa is not None else vals[xi], ws, bs, acts[0], w1, b1, acts[1], w3, b3, acts[2], alpha, pkh, pkw,
             psh, psw, ptop, pleft, bands, chunk, ya)
    return run


def _pointwise_gap(step, plan):
    conv = step.params["parts"][0].params
    v = step.vals
    n, h, w, k = v["x"].shape
    xa, xi = plan.arg(v["x"], (n * h * w, k))
    ya = plan.arg(v["y"])[0]
    weights, act, alpha = conv["weights"], conv["act"], conv["alpha"]
    n_out = weights.shape[-1]
    # each thread takes a share of the panels (the weights are most of the work and, at 2 MB, more than L2 holds)
    groups = int(min(gemm.panel_count(n_out), max(1, plan.threads)))
    kern, rows_per_image = _dispatch(fused.gemm_bias_act_mean), h * w

    def run(vals):
        wp, b = weights.packed()
        xv = xa if xa is not None else np.ascontiguousarray(vals[xi], dtype=_F32).reshape(n * h * w, k)
        kern(xv, wp, n_out, b, act, alpha, rows_per_image, groups, ya)
    return run


def _se_gate_groups(step, plan):
    """Work items for the gate's dense layers: the threads when its weights are worth splitting, else 1."""
    w1 = step.params["fc1"].shape
    return plan.threads if plan.threads > 1 and 2 * w1[0] * w1[1] >= SPLIT_MIN_SE_WEIGHTS else 1


def _se_gate_kernel(step, plan):
    split = plan.threads > 1 and (step.vals["x"].shape[0] > 1 or _se_gate_groups(step, plan) > 1)
    return fused.se_gate_split if split else fused.se_gate


def _se_gate(step, plan):
    p, v = step.params, step.vals
    if p["grids"]:  # a simulated quantised runtime rounds inside the gate: the NumPy op does that
        from lightcnn.layers import plan_numpy

        return plan_numpy.bind(step, plan)
    (xa, xi), sa = plan.arg(v["x"]), plan.arg(v["s"])[0]
    kern, groups = _se_gate_kernel(step, plan), _se_gate_groups(step, plan)
    kern, fc1, fc2, gate, alpha = _dispatch(kern), p["fc1"], p["fc2"], p["gate"], _F32(1.0)
    in_place = bool(p["in_place"])

    def run(vals):
        (w1, b1), (w2, b2) = fc1.packed(), fc2.packed()
        kern(xa if xa is not None else vals[xi], w1, b1, w2, b2, gate, alpha, in_place, sa, groups)
    return run


def _dense(step, plan):
    """On packed panels, one row per image: OpenBLAS repacked the (F, O) weights on every call, which at batch 8
    cost MobileNetV3-Large's 960 -> 1280 -> 1000 head ~1.6 ms on one core (ORT ~1.1)."""
    p, v = step.params, step.vals
    (xa, xi), ya = plan.arg(v["x"]), plan.arg(v["y"])[0]
    rows = v["x"].shape[0]
    kern = kernels_for(step, plan)[0]
    # the weights are the work (a GEMV at batch 1, 4.9 MB for 960 -> 1280): on 2 threads each streams half the panels
    tile, groups = gemm_split(rows, 1 if kern is fused.gemm_packed_bias_act_serial else plan.threads)
    kern, weights, act, alpha = _dispatch(kern), p["weights"], p["act"], p["alpha"]
    n_out = ya.shape[1]

    def run(vals):
        wp, b = weights.packed()
        xv = xa if xa is not None else np.ascontiguousarray(vals[xi], dtype=_F32)
        kern(xv, wp, n_out, b, _DUMMY2, False, _DUMMY2, 1, False, act, alpha, tile, groups, ya, 0)
    return run


def _max_pool(step, plan):
    p, v = step.params, step.vals
    (xa, xi), ya = plan.arg(v["x"]), plan.arg(v["y"])[0]
    (kh, kw), (sh, sw), top, left = p["kernel"], p["stride"], p["top"], p["left"]
    kern = _dispatch(fused.max_pool_inference)

    def run(vals):
        kern(xa if xa is not None else vals[xi], kh, kw, sh, sw, top, left, ya)
    return run


def _transpose_conv(step, plan):
    p, v = step.params, step.vals
    x, ya = plan.arg(v["x"]), plan.arg(v["y"])[0]
    weights, stride, pads, op, act, alpha = (p["weights"], p["stride"], p["pads"], p["output_padding"], p["act"],
                                            p["alpha"])

    scratch = {}  # the stamp matrix, kept by the plan's step

    def run(vals):
        w, b = weights()
        xv = x[0] if x[0] is not None else vals[x[1]]
        tconv_k.conv_transpose2d_forward(xv, w, b, stride, pads, op, act, alpha, out=ya, scratch=scratch)
    return run


def _place(step, plan):
    """A tensor into a channel slot of a wider one (cropped or zero-padded), in parallel rows."""
    x, ya = plan.arg(step.vals["x"]), plan.arg(step.vals["y"])[0]
    kern, col0 = _dispatch(combine_k.place_fitted), int(step.params["col0"])

    def run(vals):
        kern(x[0] if x[0] is not None else np.ascontiguousarray(vals[x[1]], dtype=_F32), ya, col0)
    return run


def _opaque(step, plan):
    layer, forward = step.params["layer"], step.params["forward"]
    xi, yi = step.vals["x"].index, step.vals["y"].index

    def run(vals):
        vals[yi] = forward(layer, vals[xi], False)
    return run


def _gap(step, plan):
    """At batch 1 NumPy's reduction (~5-30 us for MobileNets' 7x7 maps); at larger batches a kernel that shares the
    images out: NumPy's was serial and ~0.2-0.6 ms of MobileNetV3-Large's batch-8 forward on 2 threads (ORT 0.04)."""
    if step.vals["x"].shape[0] == 1:
        return _numpy_op(step, plan)
    n, h, w, c = step.vals["x"].shape
    (xa, xi), ya = plan.arg(step.vals["x"], (n, h * w, c)), plan.arg(step.vals["y"])[0]
    kern = _dispatch(fused.global_avg_pool)

    def run(vals):
        kern(xa if xa is not None else np.ascontiguousarray(vals[xi], dtype=_F32).reshape(n, h * w, c), ya)
    return run


def _numpy_op(step, plan):
    """The tail and the bookkeeping ops are microseconds of NumPy at batch 1; a compiled kernel
    of their own would cost ~2 MB resident and ~10 ms to load in a one-image predict."""
    from lightcnn.layers import plan_numpy

    return plan_numpy.bind(step, plan)


_BINDERS = dict(copy=_copy, pointwise=_pointwise, conv=_conv, conv_max_pool=_conv_max_pool, depthwise=_depthwise,
                inverted_residual=_inverted_residual, fire=_fire, fire_max_pool=_fire_max_pool, pointwise_gap=_pointwise_gap, se_gate=_se_gate, dense=_dense, max_pool=_max_pool,
                opaque=_opaque, transpose_conv=_transpose_conv, place=_place, gap=_gap, scale=_numpy_op, add=_numpy_op, fake_quant=_numpy_op)

__all__ = ["bind", "kernels_for"]
