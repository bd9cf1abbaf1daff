"""The numpy engine: each op of an InferencePlan (lightcnn.layers.plan) in plain NumPy. numba is never imported.

Why it exists: a Numba kernel costs seconds to compile the first time, and loading the LLVM
library behind it costs ~130 MB and ~0.4 s in every process. This engine gives the first
result of a fresh install in well under a second, at about half the plan's speed.

How each op runs (x NHWC float32; the (N*H*W, C) view of x is free):
  pointwise   one BLAS matmul on the (M, C) view, then bias, activation and residual in place
              (squeeze-excitation's scale multiplies the input rows first);
  conv        im2col by KH*KW strided copies into (N, Ho, Wo, KH, KW, C) -- the column
              order of HWIO weights -- then one matmul;
  depthwise   one einsum over a strided (N, Ho, Wo, KH, KW, C) window view of a zero-padded copy:
              the taps are summed in NumPy's inner loop, no temporary per tap;
  inverted_residual  expand, depthwise, project band by band of output rows, so the expanded
              tensor is never written whole (as the numba engine's fused kernel);
  fire, conv_max_pool, fire_max_pool, pointwise_gap  their parts (squeeze, expand 1x1, expand 3x3; conv, max pool) as the ops here;
  se_gate, gap, dense, max_pool, scale, add, fake_quant, copy: a few NumPy calls each.
Work buffers (padded copies, im2col columns, expanded tensors) are shared by all steps of a plan
(`Scratch`), since steps run one after another: a few MB instead of one set per layer.
Activations follow lightcnn.kernels.activation's definitions (NaN passes through unchanged).
Results equal the numba engine's up to float32 summation order (tests: <= 1e-5 of the logit range).
"""

import numpy as np

from lightcnn.kernels import activation as act_k
from lightcnn.kernels.quant import fake_quant

_F32 = np.float32


def run_context(plan):
    """NumPy's BLAS at one thread around each run (see lightcnn._threads.numpy_blas_threads for the numbers),
    or at the count asked for explicitly (lightcnn._jit.set_num_threads, --threads)."""
    from lightcnn import _jit
    from lightcnn._threads import numpy_blas_threads

    threads = _jit._state["threads"] or 1
    return lambda: numpy_blas_threads(threads)


def bind(step, plan):
    return _BINDERS[step.op](step, plan)


def activate(a, act, alpha):
    """a = act(a) in place for an ACT_* code; a float32 array. NaN stays NaN, as in the kernels."""
    if act == act_k.ACT_NONE:
        return a
    if act == act_k.ACT_RELU:
        np.maximum(a, 0, out=a)  # NaN propagates through np.maximum
    elif act == act_k.ACT_RELU6:
        np.clip(a, 0, 6, out=a)
    elif act == act_k.ACT_HARD_SWISH:
        t = np.add(a, 3, dtype=_F32)
        np.clip(t, 0, 6, out=t)
        t *= _F32(1 / 6)
        a *= t
    elif act == act_k.ACT_HARD_SIGMOID:
        a += 3
        np.clip(a, 0, 6, out=a)
        a *= _F32(1 / 6)
    elif act == act_k.ACT_ELU:
        negative = np.expm1(np.minimum(a, 0)) * _F32(alpha)
        np.copyto(a, negative, where=~(a > 0))
    elif act == act_k.ACT_SIGMOID:
        e = np.exp(-np.abs(a))
        s = 1 / (1 + e)
        np.copyto(a, np.where(a >= 0, s, e * s), casting="same_kind")
    else:
        raise ValueError(f"unknown activation code {act}")
    return a


def _source(plan, v, shape=None):
    """fn(vals) -> the array of value v (viewed as `shape`)."""
    array, index = plan.arg(v, shape)
    if array is not None:
        return lambda vals: array
    if shape is None:
        return lambda vals: vals[index]
    return lambda vals: vals[index].reshape(shape)


def _store(acc, y, col0, width):
    """acc (M, O) into y (M, width) at columns col0..col0+O (y's buffer; the copy is skipped when acc is y)."""
    if acc is not y:
        y[:, col0:col0 + acc.shape[1]] = acc


def _epilogue(acc, b, act, alpha, res, col0):
    acc += b
    activate(acc, act, alpha)
    if res is not None:
        acc += res[:, col0:col0 + acc.shape[1]]
    return acc


def _copy(step, plan):
    x, ya = _source(plan, step.vals["x"]), plan.arg(step.vals["y"])[0]

    def run(vals):
        np.copyto(ya, x(vals))
    return run


def _pointwise(step, plan):
    p, v = step.params, step.vals
    m, width, k = p["rows"], p["width"], p["weights"].shape[0]
    n_out = p["weights"].shape[1]
    x = _source(plan, v["x"], (m, k))
    ya = plan.arg(v["y"], (m, width))[0]
    res = plan.arg(v["res"], (m, width))[0]
    scale = plan.arg(v["scale"])[0]
    weights, act, alpha, col0, hw = p["weights"], p["act"], p["alpha"], p["col0"], p["rows_per_image"]
    direct = col0 == 0 and width == n_out  # matmul straight into y

    def run(vals):
        w, b = weights()
        xs = x(vals)
        if scale is not None:
            xs = (xs.reshape(-1, hw, k) * scale[:, None, :]).reshape(m, k)
        acc = np.matmul(xs, w, out=ya if direct else None)
        _store(_epilogue(acc, b, act, alpha, res, col0), ya, col0, width)
    return run


class Scratch:
    """Flat float32 work buffers shared by all steps of one plan (steps run one after another), by slot name.

    A view must be taken again on every run: a buffer is replaced when a later step needs it larger.
    """

    def __init__(self):
        self.buffers = {}

    def take(self, slot, shape):
        size = int(np.prod(shape))
        buf = self.buffers.get(slot)
        if buf is None or buf.size < size:
            buf = self.buffers[slot] = np.empty(size, _F32)
        return buf[:size].reshape(shape)


def _scratch(plan):
    return plan.__dict__.setdefault("_numpy_scratch", Scratch())


class Padded:
    """x copied into a padded scratch buffer, and the strided view of it that each window tap reads.

    fill: the value the padding holds (0 for convolutions, -inf for max pooling).
    """

    def __init__(self, scratch, slot, x_shape, kernel, stride, top, left, out_hw, fill=0.0):
        n, h, w, c = x_shape
        (kh, kw), (self.sh, self.sw), (self.ho, self.wo) = kernel, stride, out_hw
        hp = max(h + top, (self.ho - 1) * self.sh + kh)
        wp = max(w + left, (self.wo - 1) * self.sw + kw)
        self.scratch, self.slot, self.shape, self.fill = scratch, slot, (n, hp, wp, c), _F32(fill)
        self.rows, self.cols = (top, top + h), (left, left + w)

    def load(self, x):
        """The padded copy of x (N, Hp, Wp, C); only the border is written besides x."""
        buf = self.scratch.take(self.slot, self.shape)
        (r0, r1), (c0, c1) = self.rows, self.cols
        buf[:, :r0] = self.fill
        buf[:, r1:] = self.fill
        buf[:, r0:r1, :c0] = self.fill
        buf[:, r0:r1, c1:] = self.fill
        buf[:, r0:r1, c0:c1] = x
        return buf

    def tap(self, buf, p, q, r0=0, r1=None):
        """The (N, r1 - r0, Wo, C) view of buf that window position (p, q) reads for output rows r0..r1-1."""
        r1 = self.ho if r1 is None else r1
        return buf[:, p + r0 * self.sh:p + (r1 - 1) * self.sh + 1:self.sh, q:q + (self.wo - 1) * self.sw + 1:self.sw]


def _conv(step, plan):
    p, v = step.params, step.vals
    m, width = p["rows"], p["width"]
    (kh, kw), (ho, wo) = p["kernel"], p["out_hw"]
    x = _source(plan, v["x"])
    n, h, w, c = v["x"].shape
    ya = plan.arg(v["y"], (m, width))[0]
    res = plan.arg(v["res"], (m, width))[0]
    scratch = _scratch(plan)
    padded = Padded(scratch, "pad", v["x"].shape, p["kernel"], p["stride"], p["top"], p["left"], p["out_hw"])
    weights, act, alpha, col0 = p["weights"], p["act"], p["alpha"], p["col0"]
    direct = col0 == 0 and width == p["weights"].shape[1]

    def run(vals):
        w2d, b = weights()
        buf = padded.load(x(vals))
        cols = scratch.take("cols", (n, ho, wo, kh, kw, c))
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, i, j, :] = padded.tap(buf, i, j)
        acc = np.matmul(cols.reshape(m, kh * kw * c), w2d, out=ya if direct else None)
        _store(_epilogue(acc, b, act, alpha, res, col0), ya, col0, width)
    return run


# A bottleneck's band holds the expanded rows its output rows read: large enough that each band's matmuls
# have a few hundred rows (MobileNetV2's 112x112x96 block: 12 bands of 5 output rows), small enough for L2.
_FUSED_BAND_BYTES = 1 << 19


def depthwise_windows(buf, kernel, stride, out_hw):
    """The (N, Ho, Wo, KH, KW, C) strided view of a padded buffer buf (N, Hp, Wp, C): window (i, j) of output
    pixel (h, w) without copying anything."""
    n, _, _, c = buf.shape
    sn, sh_, sw_, sc = buf.strides
    return np.lib.stride_tricks.as_strided(buf, (n, out_hw[0], out_hw[1], kernel[0], kernel[1], c),
                                           (sn, sh_ * stride[0], sw_ * stride[1], sh_, sw_, sc), writeable=False)


def depthwise_runner(scratch, x_shape, y_shape, kernel, stride, top, left):
    """fn(x, w, b, act, alpha, y): y = act(depthwise(x, w) + b), work buffers from `scratch`.

    One einsum over the windows view: NumPy sums the KH*KW taps per output element in its inner loop, with no
    temporary per tap (measured 1.6-3x faster than KH*KW multiply-and-add passes on MobileNetV2's layers).
    """
    n, ho, wo, c = y_shape
    padded = Padded(scratch, "pad", x_shape, kernel, stride, top, left, (ho, wo))

    def run(x, w, b, act, alpha, y):
        np.einsum("nhwijc,ijc->nhwc", depthwise_windows(padded.load(x), kernel, stride, (ho, wo)), w, out=y)
        y += b
        activate(y, act, alpha)
    return run


def _depthwise(step, plan):
    p, v = step.params, step.vals
    x, ya = _source(plan, v["x"]), plan.arg(v["y"])[0]
    kernel = p["weights"].shape[:2]
    runner = depthwise_runner(_scratch(plan), v["x"].shape, v["y"].shape, kernel, p["stride"], p["top"], p["left"])
    weights, act, alpha = p["weights"], p["act"], p["alpha"]

    def run(vals):
        w, b = weights()
        runner(x(vals), w, b, act, alpha, ya)
    return run


def _inverted_residual(step, plan):
    """A whole bottleneck band by band of output rows, as the numba engine's fused kernel does: each band
    expands only the input rows its depthwise windows read (plus their halo, recomputed by the next band),
    so the expanded tensor, E/C times larger than x, is never written whole and every pass stays in L2."""
    p, v = step.params, step.vals
    xa, ya = plan.arg(v["x"])[0], plan.arg(v["y"])[0]
    n, h, w, c = v["x"].shape
    _, ho, wo, c_out = v["y"].shape
    w_expand, w_dw, w_project = p["expand"], p["depthwise"], p["project"]
    (kh, kw), e = w_dw.shape[:2], w_dw.shape[2]
    (sh, sw), top, left = p["stride"], p["top"], p["left"]
    act1, act2, act3 = p["acts"]
    alpha, use_res = p["alpha"], p["use_res"]
    scratch = _scratch(plan)
    wp = max(w + left, (wo - 1) * sw + kw)  # padded width
    # Per image and per band: every matmul has the same rows whatever the batch size, so an image's result
    # does not depend on the batch it came in (BLAS sums in a different order for a different M).
    rows_out = max(1, min(ho, (_FUSED_BAND_BYTES // (wp * e * 4) - kh) // sh + 1))

    def run(vals):
        w1, b1 = w_expand() if w_expand is not None else (None, None)
        wd, bd = w_dw()
        w3, b3 = w_project() if w_project is not None else (None, None)
        for i in range(n):
            xi, yi = xa[i:i + 1], ya[i:i + 1]
            for r0 in range(0, ho, rows_out):
                r1 = min(ho, r0 + rows_out)
                lo, hi = r0 * sh - top, (r1 - 1) * sh - top + kh  # the padded input rows this band reads
                a, b = max(lo, 0), min(hi, h)                      # ... and the real ones among them
                band = scratch.take("band", (1, hi - lo, wp, e))
                band[:, :a - lo] = 0
                band[:, b - lo:] = 0
                band[:, :, :left] = 0
                band[:, :, left + w:] = 0
                if w_expand is not None:
                    expanded = scratch.take("expanded", (1, b - a, w, e))
                    flat = expanded.reshape(-1, e)
                    np.matmul(xi[:, a:b].reshape(-1, c), w1, out=flat)
                    flat += b1
                    activate(flat, act1, alpha)
                    band[:, a - lo:b - lo, left:left + w] = expanded
                else:
                    band[:, a - lo:b - lo, left:left + w] = xi[:, a:b]
                rows = r1 - r0
                out = scratch.take("dw_out", (1, rows, wo, e)) if w_project is not None else yi[:, r0:r1]
                np.einsum("nhwijc,ijc->nhwc", depthwise_windows(band, (kh, kw), (sh, sw), (rows, wo)), wd, out=out)
                out += bd
                activate(out, act2, alpha)
                if w_project is None:  # squeeze-excitation's gate reads the depthwise output whole
                    continue
                projected = np.matmul(out.reshape(-1, e), w3).reshape(1, rows, wo, c_out)
                projected += b3
                activate(projected, act3, alpha)
                if use_res:
                    projected += xi[:, r0:r1]
                yi[:, r0:r1] = projected
    return run


def _se_gate(step, plan):
    p, v = step.params, step.vals
    x, sa = _source(plan, v["x"]), plan.arg(v["s"])[0]
    fc1, fc2, gate, in_place = p["fc1"], p["fc2"], p["gate"], p.get("in_place", False)
    q_pooled, q_hidden, q_gate = p["grids"] or (None, None, None)

    def run(vals):
        (w1, b1), (w2, b2) = fc1(), fc2()
        xv = x(vals)
        pooled = np.mean(xv, axis=(1, 2), dtype=_F32)
        if q_pooled is not None:
            fake_quant(pooled, *q_pooled, out=pooled)
        hidden = activate(pooled @ w1 + b1, act_k.ACT_RELU, 1.0)
        if q_hidden is not None:
            fake_quant(hidden, *q_hidden, out=hidden)
        s = activate(hidden @ w2 + b2, gate, 1.0)
        if q_gate is not None:
            fake_quant(s, *q_gate, out=s)
        sa[...] = s
        if in_place:
            np.multiply(xv, sa[:, None, None, :], out=xv)
    return run


def _scale(step, plan):
    v = step.vals
    x, sa, ya = _source(plan, v["x"]), plan.arg(v["s"])[0], plan.arg(v["y"])[0]

    def run(vals):
        np.multiply(x(vals), sa[:, None, None, :], out=ya)
    return run


def _gap(step, plan):
    x, ya = _source(plan, step.vals["x"]), plan.arg(step.vals["y"])[0]
    n, h, w, c = step.vals["x"].shape

    def run(vals):
        # np.mean's sum and division, in the same order (a sequential sum over the pixels, then / H*W), on
        # (N, H*W, C): ~2x faster than np.mean over axes (1, 2) for MobileNetV3's (1, 7, 7, 960) head
        np.add.reduce(x(vals).reshape(n, h * w, c), axis=1, out=ya)
        np.divide(ya, h * w, out=ya)
    return run


def _dense(step, plan):
    p, v = step.params, step.vals
    x, ya = _source(plan, v["x"]), plan.arg(v["y"])[0]
    weights, act, alpha = p["weights"], p["act"], p["alpha"]

    def run(vals):
        w, b = weights()
        out = np.matmul(np.asarray(x(vals), _F32), w, out=ya)
        out += b
        activate(out, act, alpha)
    return run


def _max_pool(step, plan):
    p, v = step.params, step.vals
    x, ya = _source(plan, v["x"]), plan.arg(v["y"])[0]
    (kh, kw), (sh, sw), top, left = p["kernel"], p["stride"], p["top"], p["left"]
    n, h, w, c = v["x"].shape
    _, ho, wo, _ = v["y"].shape
    padded = Padded(_scratch(plan), "pad", v["x"].shape, (kh, kw), (sh, sw), top, left, (ho, wo), fill=-np.inf)

    def run(vals):  # padding never wins a max; NaN propagates through np.maximum
        buf = padded.load(x(vals))
        np.copyto(ya, padded.tap(buf, 0, 0))
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    np.maximum(ya, padded.tap(buf, i, j), out=ya)
    return run


def _transpose_conv(step, plan):
    """Every input pixel stamps w (KH,KW,C,O) stride apart onto a full-size output, then the crop."""
    p, v = step.params, step.vals
    x, ya = _source(plan, v["x"]), plan.arg(v["y"])[0]
    n, h, w, c = v["x"].shape
    _, ho, wo, n_out = v["y"].shape
    (sh, sw), (top, _, left, _) = p["stride"], p["pads"]
    weights, act, alpha = p["weights"], p["act"], p["alpha"]
    scratch = _scratch(plan)

    def run(vals):
        wt, b = weights()
        kh, kw = wt.shape[:2]
        stamps = np.matmul(x(vals).reshape(-1, c), wt.transpose(2, 0, 1, 3).reshape(c, -1)).reshape(n, h, w, kh, kw,
                                                                                                    n_out)
        full = scratch.take("full", (n, max((h - 1) * sh + kh, top + ho), max((w - 1) * sw + kw, left + wo), n_out))
        full[...] = 0
        for i in range(kh):
            for j in range(kw):
                full[:, i:i + (h - 1) * sh + 1:sh, j:j + (w - 1) * sw + 1:sw] += stamps[:, :, :, i, j]
        np.copyto(ya, full[:, top:top + ho, left:left + wo])
        if b is not None:
            ya[...] += b
        activate(ya, act, alpha)
    return run


def _place(step, plan):
    """y[..., col0:col0+C] = x cropped or zero-padded at the bottom/right to y's height and width."""
    v, col0 = step.vals, step.params["col0"]
    x, ya = _source(plan, v["x"]), plan.arg(v["y"])[0]
    _, h, w, c = v["x"].shape
    _, ho, wo, _ = v["y"].shape
    hh, ww = min(h, ho), min(w, wo)

    def run(vals):
        target = ya[..., col0:col0 + c]
        if hh < ho or ww < wo:
            target[...] = 0
        target[:, :hh, :ww] = x(vals)[:, :hh, :ww]
    return run


def _add(step, plan):
    v = step.vals
    a, b, ya = _source(plan, v["a"]), _source(plan, v["b"]), plan.arg(v["y"])[0]

    def run(vals):
        np.add(a(vals), b(vals), out=ya)
    return run


def _fake_quant(step, plan):
    v, grid = step.vals, step.params["grid"]
    x, ya = _source(plan, v["x"]), plan.arg(v["y"])[0]

    def run(vals):
        fake_quant(x(vals), *grid, out=ya)
    return run


def _parts(step, plan):
    """A fused step's parts one after another: a Fire module (squeeze, expand 1x1, expand 3x3), a conv and
    the max pool it feeds."""
    runs = [bind(part, plan) for part in step.params["parts"]]

    def run(vals):
        for part in runs:
            part(vals)
    return run


_BINDERS = dict(copy=_copy, pointwise=_pointwise, conv=_conv, depthwise=_depthwise,
                inverted_residual=_inverted_residual, fire=_parts, conv_max_pool=_parts, fire_max_pool=_parts, pointwise_gap=_parts, se_gate=_se_gate, scale=_scale, gap=_gap, dense=_dense,
                max_pool=_max_pool, transpose_conv=_transpose_conv, place=_place, add=_add, fake_quant=_fake_quant)
