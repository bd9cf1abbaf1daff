"""Standard convolution (KHxKW, im2col + GEMM) and pointwise 1x1 convolution (one GEMM).

    y[n,i,j,o] = act( b[o] + sum_{p<KH, q<KW, c<C} xp[n, i*sh + p, j*sw + q, c] * w[p,q,c,o] )

where xp is x zero-padded by (top, bottom, left, right) = pad.  Output size per axis
(lightcnn.kernels.shapes.conv_output_size, floor mode):

    H' = (H + top + bottom - KH) // sh + 1          W' = (W + left + right - KW) // sw + 1

Cost: 2*KH*KW*C FLOPs per output element (2*C for pointwise). Float32 runs on the inference's packed-weight
GEMM (see "packed GEMMs" below); float64 (the gradient checks) in one BLAS GEMM per chunk of images (split
over threads by _split_blas.py, each thread's BLAS on one thread), as described next.

How: a Numba kernel (`im2col`) copies every receptive field into one row of a
preallocated matrix cols (N*H'*W', KH*KW*C), whose column order (p, q, c) is exactly
the row-major order of w (KH,KW,C,O) reshaped to (KH*KW*C, O); so the convolution is
cols @ w2d, written straight into y viewed as (N*H'*W', O).  Bias and activation are
applied in one fused pass over that output (`act_inplace` from activation.py).
Images are processed in chunks so cols stays under ~32 MB however large the batch.

Backward, for dy the gradient w.r.t. the *pre-activation* output (the caller applies
activation_backward first):

    db = sum_{n,i,j} dy          dw2d = cols^T @ dy2d          dx = col2im(dy2d @ w2d^T)

col2im is written as a gather (each input pixel sums the cols entries that read it)
rather than a scatter, so rows of dx are independent and the loop runs in parallel
without atomics.  For a stride-1 float32 conv, dx skips both: it is a convolution of dy
with the flipped kernel, run on the inference's packed implicit GEMM (`_implicit_input_gradient`).  cols is recomputed in backward rather than cached from forward when it is
large (im2col is a cheap copy, while caching would keep N*H'*W'*KH*KW*C numbers alive per layer);
when forward built it in one piece (<= ~32 MB), training keeps it for backward
(conv2d_forward_keeping_cols, conv2d_backward(cols=)), one copy pass fewer (float64 only: float32's forward
builds no im2col matrix).

Deliberately absent: dilation and groups (depthwise lives in depthwise.py; no supported
model uses dilation), Winograd/FFT, ceil-mode output sizes, and in-place outputs.

Shapes: conv2d_forward(x (N,H,W,C), w (KH,KW,C,O), b (O,)) -> y (N,H',W',O);
pointwise_conv_forward(x (N,H,W,C), w (C,O), b (O,)) -> y (N,H,W,O).
"""

import numpy as np

from lightcnn._jit import get_num_threads, kernel, prange
from lightcnn.kernels import _reuse, fused
from lightcnn.kernels._args import _act_code, _bias_or_zeros, _images_per_chunk, _like, _nhwc, _pad4, _pair
from lightcnn.kernels._split_blas import matmul, matmul_tn
from lightcnn.kernels.activation import ACT_CHUNK, ACT_ELU, ACT_NONE, ACT_RELU, ACT_RELU6, act_inplace
from lightcnn.kernels.gemm import pack_panels
from lightcnn.kernels.shapes import conv_output_size


# ----------------------------------------------------------------------------- loop bodies


@kernel(parallel=True)
def im2col(x, kh, kw, sh, sw, pt, pl, ho, wo, cols):
    """cols[(n*ho + i)*wo + j, (p*kw + q)*C + c] = x[n, i*sh - pt + p, j*sw - pl + q, c], 0 outside x.

    x (N,H,W,C), cols (N*ho*wo, kh*kw*C).  Reads past the bottom/right edge are zeros,
    so only the top/left padding needs passing; ho, wo fix the rest.
    """
    n_img, h_in, w_in, c_in = x.shape
    for r in prange(n_img * ho):
        n = r // ho
        i = r - n * ho
        for j in range(wo):
            row = r * wo + j
            for p in range(kh):
                h = i * sh - pt + p
                for q in range(kw):
                    w = j * sw - pl + q
                    base = (p * kw + q) * c_in
                    if h >= 0 and h < h_in and w >= 0 and w < w_in:
                        for c in range(c_in):
                            cols[row, base + c] = x[n, h, w, c]
                    else:
                        for c in range(c_in):
                            cols[row, base + c] = 0


@kernel(parallel=True)
def col2im(cols, kh, kw, sh, sw, pt, pl, hc, wc, bias, act, alpha, out):
    """The adjoint of im2col, as a gather, with a fused bias + activation epilogue.

    out[n,h,w,c] = act(bias[c] + sum cols[(n*hc + a)*wc + b, (p*kw + q)*C + c])
    over all (a, b, p, q) with a*sh - pt + p = h and b*sw - pl + q = w.
    cols (N*hc*wc, kh*kw*C), out (N,H,W,C).  Used for the conv input gradient
    (bias 0, act none) and for the transpose-conv forward.
    """
    n_img, h_out, w_out, c_out = out.shape
    for r in prange(n_img * h_out):
        n = r // h_out
        h = r - n * h_out
        for w in range(w_out):
            o = out[n, h, w]
            for c in range(c_out):
                o[c] = bias[c]
            for p in range(kh):
                t = h + pt - p
                if t < 0:
                    break  # t only decreases with p
                a = t // sh
                if a * sh != t or a >= hc:
                    continue
                for q in range(kw):
                    u = w + pl - q
                    if u < 0:
                        break
                    b = u // sw
                    if b * sw != u or b >= wc:
                        continue
                    row = (n * hc + a) * wc + b
                    base = (p * kw + q) * c_out
                    for c in range(c_out):
                        o[c] += cols[row, base + c]
            if act != 0:
                act_inplace(o, act, alpha)  # one test of `act` per pixel; the channel loop vectorises


@kernel(parallel=True)
def bias_act_epilogue(bias, act, alpha, out):
    """out[r, o] = act(out[r, o] + bias[o]) in place on a GEMM result out (M, O).

    In blocks of ~ACT_CHUNK elements: the bias is added row by row, then `act_inplace` runs over
    the flat block, testing `act` once per block so the element loop vectorises (a per-element
    act_scalar(..., act, alpha) with a runtime code does not vectorise; see activation.py).
    """
    m, n_out = out.shape
    flat = out.reshape(-1)
    rows = max(1, ACT_CHUNK // n_out)
    for k in prange((m + rows - 1) // rows):
        r0 = k * rows
        r1 = min(m, r0 + rows)
        for r in range(r0, r1):
            for o in range(n_out):
                out[r, o] += bias[o]
        if act != ACT_NONE:
            act_inplace(flat[r0 * n_out:r1 * n_out], act, alpha)


@kernel(parallel=True)
def bias_act_into(z, bias, act, alpha, out, col0):
    """out[r, col0 + o] = act(z[r, o] + bias[o]): a GEMM result z (M, O) written into channels
    col0..col0+O of out (M, C_total), both C-contiguous (a concatenation's slot); `act` tested per row."""
    m, n_out = z.shape
    for r in prange(m):
        row = out[r, col0:col0 + n_out]
        for o in range(n_out):
            row[o] = z[r, o] + bias[o]
        if act != ACT_NONE:
            act_inplace(row, act, alpha)


def _check_slot(out, col0, shape3, n_out, dtype, fn):
    if (not isinstance(out, np.ndarray) or out.ndim != 4 or out.shape[:3] != tuple(shape3) or out.dtype != dtype
            or not out.flags.c_contiguous or not 0 <= col0 <= out.shape[3] - n_out):
        raise ValueError(f"{fn}: out must be a C-contiguous {dtype} (N,H',W',C_total) with (N,H',W') = "
                         f"{tuple(shape3)} and room for {n_out} channels from col0 = {col0}, "
                         f"got {getattr(out, 'shape', None)}")


def _epilogue(y, b, code, alpha, out, col0, fn):
    """Bias + activation on a GEMM result y (N,H',W',O): in place, or into channels col0.. of `out`
    (N,H',W',C_total) when given; returns y or that slot of out (a view)."""
    n_out = y.shape[3]
    if out is None:
        if b is not None or code != ACT_NONE:
            bias_act_epilogue(_bias_or_zeros(b, y, n_out, fn), code, y.dtype.type(alpha), y.reshape(-1, n_out))
        return y
    _check_slot(out, col0, y.shape[:3], n_out, y.dtype, fn)
    bias_act_into(y.reshape(-1, n_out), _bias_or_zeros(b, y, n_out, fn), code, y.dtype.type(alpha),
                  out.reshape(-1, out.shape[3]), int(col0))
    return out[..., col0:col0 + n_out]


# ----------------------------------------------------------------------------- geometry


def _conv_geometry(x, w, stride, pad, fn):
    """Validate conv arguments; returns (x, w, (sh, sw), (pt, pb, pl, pr), (Ho, Wo))."""
    x = _nhwc(x, fn)
    w = np.asarray(w)
    if w.ndim != 4 or w.shape[2] != x.shape[3]:
        raise ValueError(
            f"{fn}: w must be (KH,KW,C,O) with C = x.shape[3] = {x.shape[3]} for x (N,H,W,C) = {x.shape}, "
            f"got {w.shape}"
        )
    w = np.ascontiguousarray(w, dtype=x.dtype)
    sh, sw = _pair(stride, "stride", fn, 1)
    pt, pb, pl, pr = _pad4(pad, fn)
    kh, kw = w.shape[:2]
    try:
        ho = conv_output_size(x.shape[1], kh, sh, pt, pb)
        wo = conv_output_size(x.shape[2], kw, sw, pl, pr)
    except ValueError as e:
        raise ValueError(f"{fn}: x (N,H,W,C) = {x.shape}, w {w.shape}: {e}") from None
    return x, w, (sh, sw), (pt, pb, pl, pr), (ho, wo)


def _is_plain_1x1(w, stride, pad):
    return w.shape[0] == 1 and w.shape[1] == 1 and stride == (1, 1) and pad == (0, 0, 0, 0)


# ----------------------------------------------------------------------------- conv2d


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: tuple[int, ...] = (1, 1),
                   pad: tuple[int, ...] = (0, 0, 0, 0), act: int = ACT_NONE, alpha: float = 1.0,
                   out: np.ndarray | None = None, col0: int = 0) -> np.ndarray:
    """y = act(conv(x, w) + b).  x (N,H,W,C), w (KH,KW,C,O), b (O,) or None -> y (N,H',W',O).

    stride (sh, sw) or int; pad (top, bottom, left, right) or int; act an ACT_* code or name;
    alpha is ELU's.  y has x's dtype.  With `out` (N,H',W',C_total) the result goes into its
    channels col0..col0+O (a channel concatenation without a copy) and that view is returned.
    """
    return conv2d_forward_keeping_cols(x, w, b, stride, pad, act, alpha, out, col0)[0]


def conv2d_forward_keeping_cols(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                                stride: tuple[int, ...] = (1, 1), pad: tuple[int, ...] = (0, 0, 0, 0),
                                act: int = ACT_NONE, alpha: float = 1.0, out: np.ndarray | None = None,
                                col0: int = 0) -> tuple:
    """conv2d_forward for training: (y, cols), cols (N*H'*W', KH*KW*C) the im2col matrix when it was built
    in one piece (at most _images_per_chunk's budget, ~32 MB), else None (and None for a plain 1x1 conv, and
    for float32, which runs on the packed GEMM: that path builds no im2col matrix).

    conv2d_backward(cols=cols) then skips rebuilding it for the weight gradient: a layer keeps it from
    forward to backward only when it is that small (SqueezeNet's 13x13 expand: 12 MB, 1.7 ms a rebuild).
    """
    fn = "conv2d_forward"
    x, w, (sh, sw), (pt, pb, pl, pr), (ho, wo) = _conv_geometry(x, w, stride, pad, fn)
    code = _act_code(act, fn)
    if _is_plain_1x1(w, (sh, sw), (pt, pb, pl, pr)):
        return pointwise_conv_forward(x, w[0, 0], b, act=code, alpha=alpha, out=out, col0=col0), None
    n_img, _, _, c_in = x.shape
    kh, kw, _, n_out = w.shape
    k = kh * kw * c_in
    w2d = w.reshape(k, n_out)
    if x.dtype == np.float32:
        y = _packed_conv(x, w, b, (sh, sw), (pt, pl), (ho, wo), code if _packed(x, code, alpha) else ACT_NONE, out,
                         col0, fn)
        return _act_after_packed(y, code, alpha, out, col0), None
    y = _reuse.empty((n_img, ho, wo, n_out), x.dtype)
    y2d = y.reshape(-1, n_out)
    step = _images_per_chunk(n_img, ho * wo * k * x.itemsize)
    cols = _reuse.empty((step * ho * wo, k), x.dtype)
    for n0 in range(0, n_img, step):
        n1 = min(n0 + step, n_img)
        c = cols[: (n1 - n0) * ho * wo]
        im2col(x[n0:n1], kh, kw, sh, sw, pt, pl, ho, wo, c)
        matmul(c, w2d, y2d[n0 * ho * wo : n1 * ho * wo])
    return _epilogue(y, b, code, alpha, out, col0, fn), (cols if step >= n_img else None)


def conv2d_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride: tuple[int, ...] = (1, 1),
                    pad: tuple[int, ...] = (0, 0, 0, 0), need_dx: bool = True, db: np.ndarray | None = None,
                    cols: np.ndarray | None = None) -> tuple:
    """Gradients of conv2d_forward (without activation) given dy = dL/d(conv output + b).

    dy (N,H',W',O), x (N,H,W,C), w (KH,KW,C,O) -> dx (N,H,W,C), dw (KH,KW,C,O), db (O,);
    dx is None with need_dx=False (a network's first layer: no GEMM, no col2im). A given `db`
    (already summed, e.g. by activation_backward_from_output_and_sum) is returned as it is.
    `cols`: x's whole im2col matrix (N*H'*W', KH*KW*C) from conv2d_forward_keeping_cols, used as it is.
    """
    fn = "conv2d_backward"
    x, w, (sh, sw), (pt, pb, pl, pr), (ho, wo) = _conv_geometry(x, w, stride, pad, fn)
    n_img, h_in, w_in, c_in = x.shape
    kh, kw, _, n_out = w.shape
    dy = _like(dy, x, (n_img, ho, wo, n_out), "dy", fn, "(N,H',W',O)")
    dy2d = dy.reshape(-1, n_out)
    db = dy2d.sum(axis=0) if db is None else db
    if _is_plain_1x1(w, (sh, sw), (pt, pb, pl, pr)):
        dx, dw, _ = pointwise_conv_backward(dy, x, w[0, 0], need_dx, db)
        return dx, dw.reshape(w.shape), db
    k = kh * kw * c_in
    w2d = w.reshape(k, n_out)
    dx = _reuse.empty_like(x) if need_dx else None
    dw2d = np.zeros((k, n_out), dtype=x.dtype)
    zero_bias = np.zeros(c_in, dtype=x.dtype)
    step = _images_per_chunk(n_img, ho * wo * k * x.itemsize)
    kept = cols is not None
    if kept and (not isinstance(cols, np.ndarray) or cols.shape != (n_img * ho * wo, k) or cols.dtype != x.dtype
                 or not cols.flags.c_contiguous):
        raise ValueError(f"{fn}: cols must be x's C-contiguous {x.dtype} im2col matrix of shape "
                         f"{(n_img * ho * wo, k)}, got {getattr(cols, 'shape', None)}")
    step = n_img if kept else step
    buf = cols if cols is not None else _reuse.empty((step * ho * wo, k), x.dtype)
    # dx written here (stride 1, float32) leaves the loop below the weight gradient only
    dx_cols = None if dx is None or _implicit_input_gradient(dy, w, (sh, sw), (pt, pl), dx) else dx
    dcols = _reuse.empty((step * ho * wo if dx_cols is not None else 0, k), x.dtype)
    for n0 in range(0, n_img, step):
        n1 = min(n0 + step, n_img)
        rows = slice(n0 * ho * wo, n1 * ho * wo)
        c = buf[: (n1 - n0) * ho * wo]
        if not kept:
            im2col(x[n0:n1], kh, kw, sh, sw, pt, pl, ho, wo, c)
        dw2d += matmul_tn(c, dy2d[rows])
        if dx_cols is not None:
            dc = dcols[: (n1 - n0) * ho * wo]
            matmul(dy2d[rows], w2d.T, dc)
            col2im(dc, kh, kw, sh, sw, pt, pl, ho, wo, zero_bias, ACT_NONE, x.dtype.type(0), dx_cols[n0:n1])
    return dx, dw2d.reshape(w.shape), db



# ----------------------------------------------------------------------------- pointwise (1x1)


def _pointwise_args(x, w, fn):
    x = _nhwc(x, fn)
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] != x.shape[3]:
        raise ValueError(
            f"{fn}: w must be (C,O) with C = x.shape[3] = {x.shape[3]} for x (N,H,W,C) = {x.shape}, got {w.shape}"
        )
    return x, np.ascontiguousarray(w, dtype=x.dtype)


def pointwise_conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, act: int = ACT_NONE,
                           alpha: float = 1.0, out: np.ndarray | None = None, col0: int = 0) -> np.ndarray:
    """y = act(x @ w + b) over the channel axis.  x (N,H,W,C), w (C,O), b (O,) or None -> y (N,H,W,O);
    `out`, col0 as conv2d_forward's."""
    fn = "pointwise_conv_forward"
    x, w = _pointwise_args(x, w, fn)
    code = _act_code(act, fn)
    n_img, h, wd, c_in = x.shape
    n_out = w.shape[1]
    if x.dtype == np.float32:
        y = _packed_pointwise(x, w, b, code if _packed(x, code, alpha) else ACT_NONE, out, col0, fn)
        return _act_after_packed(y, code, alpha, out, col0)
    y = _reuse.empty((n_img, h, wd, n_out), x.dtype)
    y2d = y.reshape(-1, n_out)
    matmul(x.reshape(-1, c_in), w, y2d)
    return _epilogue(y, b, code, alpha, out, col0, fn)


def pointwise_conv_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, need_dx: bool = True,
                            db: np.ndarray | None = None) -> tuple:
    """dy (N,H,W,O), x (N,H,W,C), w (C,O) -> dx (N,H,W,C) (None with need_dx=False), dw (C,O), db (O,);
    dy is pre-activation; a given `db` is returned as it is."""
    fn = "pointwise_conv_backward"
    x, w = _pointwise_args(x, w, fn)
    n_img, h, wd, c_in = x.shape
    n_out = w.shape[1]
    dy = _like(dy, x, (n_img, h, wd, n_out), "dy", fn, "(N,H,W,O)")
    dy2d = dy.reshape(-1, n_out)
    x2d = x.reshape(-1, c_in)
    dx = None
    if need_dx:
        dx = _reuse.empty_like(x)
        if x.dtype == np.float32 and get_num_threads() >= 2:
            # On two threads the packed GEMM (rows split evenly, no pool hand-off) beat OpenBLAS on every
            # input-gradient shape measured (0.54-0.98x, bench/README "Session 11"); on one it lost at two to
            # three of ten, by up to 1.28x (MobileNetV2's 14x14 project 576 <- 96: 1.20x), so one keeps BLAS.
            rows = dx.reshape(-1, c_in)
            fused.gemm_packed_bias_act(dy2d, pack_panels(w.T), c_in, np.zeros(c_in, np.float32), rows, fused.NO,
                                       rows, 1, fused.NO, np.int64(ACT_NONE), np.float32(1.0),
                                       fused.choose_tile(rows.shape[0], get_num_threads()), 1, rows, fused.ZERO)
        else:
            matmul(dy2d, w.T, dx.reshape(-1, c_in))
    dw = matmul_tn(x2d, dy2d)
    return dx, dw, (dy2d.sum(axis=0) if db is None else db)


# ----------------------------------------------------------------------------- packed GEMMs (float32)
#
# Training's float32 GEMMs with fixed weights run on the inference's packed-weight GEMM (lightcnn.kernels.gemm,
# driven by fused.gemm_packed_bias_act / fused.conv_implicit_bias_act): the weights are packed once per call
# (they change every step; packing is a copy of K*O floats), the bias and activation go in the tile's epilogue,
# straight into a channel slot of `out`, and a KxK conv reads its input in place instead of an im2col matrix.
# Measured in one process, one thread, SqueezeNet's last Fire at batch 32: OpenBLAS + a separate epilogue pass
# 14.1 ms (3x3 expand: im2col 0.6, GEMM 12.2, epilogue into the slot 1.3) against 12.1 ms. Each output element
# is one FMA chain over k in order, so the result does not depend on the thread count or the tiling.
# Float64 (the gradient checks) keeps the BLAS route. ELU with alpha 1 is in the epilogue, in float32 (gemm.py's
# elu: seed 001's step 840 -> 700-730 ms back to back). An activation outside it (the sigmoids, and hard-swish,
# whose layers keep the pre-activation for backward) runs in a pass after the packed GEMM (_act_after_packed):
# seed 001's stem is K = 9, where OpenBLAS reached 22 GFLOP/s. The pointwise input gradient dy @ w^T runs packed
# on two or more threads (0.54-0.98x OpenBLAS's time over ten shapes, session 11) and on BLAS on one, where the
# packed GEMM lost up to 28% where the output is wide and K short (MobileNetV2's 14x14 project, 576 <- 96).

_PACKED_ACTS = (ACT_NONE, ACT_RELU, ACT_RELU6, ACT_ELU)
# A KxK conv's work item copies its band of input rows, zero-bordered, into a buffer: bands of at most this much
# buffer, so it stays in L2 (a whole 13x13x256 image is 230 KB: one band; thinner bands re-copy the KH-1 rows
# they share: 13 one-row bands took 16.2 ms there instead of 11.7 for an input gradient).
_BAND_BYTES = 512 * 1024


def _packed(x, code, alpha):
    """True when a float32 GEMM of x runs on the packed GEMM with activation `code` in its epilogue."""
    return x.dtype == np.float32 and code in _PACKED_ACTS and (code != ACT_ELU or alpha == 1.0)


@kernel(parallel=True)
def act_slot_inplace(rows, col0, n_out, act, alpha):
    """rows[r, col0:col0+n_out] = act(rows[r, col0:col0+n_out]) in place; rows (M, C_total)."""
    for r in prange(rows.shape[0]):
        act_inplace(rows[r, col0:col0 + n_out], act, alpha)


def _act_after_packed(y, code, alpha, out, col0):
    """An activation the packed GEMM's epilogue lacks (ELU, the sigmoids, hard-swish), applied in place to its
    output y (N,H',W',O) or out's slot: the GEMM itself still runs packed (seed 001's ELU convs: the
    im2col + OpenBLAS route took its stem 21.5 ms at batch 32, K = 9, 22 GFLOP/s)."""
    if _packed(y, code, alpha):
        return y
    n_out = y.shape[3]
    rows = y.reshape(-1, n_out) if out is None else out.reshape(-1, out.shape[3])
    act_slot_inplace(rows, 0 if out is None else int(col0), n_out, np.int64(code), np.float32(alpha))
    return y


def _bands(n_img, h_out, sh, kh, row_bytes):
    """Bands per image of an implicit conv with h_out output rows: buffers of at most _BAND_BYTES (input rows
    of row_bytes, (band - 1)*sh + kh per band), and at least two work items per thread."""
    band_rows = max(1, (_BAND_BYTES // max(row_bytes, 1) - kh) // sh + 1)
    per_image = -(-2 * get_num_threads() // max(n_img, 1))  # an empty batch (N = 0) runs no item at all
    return min(h_out, max(-(-h_out // band_rows), per_image))


def _rows_of(shape3, n_out, out, col0, fn):
    """Where a packed GEMM writes: (result (N,H',W',O) or out's slot, the (M, C_total) row view, col0)."""
    if out is None:
        y = _reuse.empty(tuple(shape3) + (n_out,), np.float32)
        return y, y.reshape(-1, n_out), 0
    _check_slot(out, col0, shape3, n_out, np.float32, fn)
    return out[..., col0:col0 + n_out], out.reshape(-1, out.shape[3]), int(col0)


def _packed_pointwise(x, w, b, code, out, col0, fn):
    """act(x @ w + b) on the packed GEMM: x (N,H,W,C) float32, w (C,O) (any strides) -> (N,H,W,O) or out's slot."""
    n_out = w.shape[1]
    y, rows, col0 = _rows_of(x.shape[:3], n_out, out, col0, fn)
    m = rows.shape[0]
    fused.gemm_packed_bias_act(x.reshape(m, x.shape[3]), pack_panels(w), n_out, _bias_or_zeros(b, x, n_out, fn),
                               rows, fused.NO, rows, 1, fused.NO, np.int64(code), np.float32(1.0),
                               fused.choose_tile(m, get_num_threads()), 1, rows, np.int64(col0))
    return y


def _packed_conv(x, w, b, stride, top_left, out_hw, code, out, col0, fn):
    """act(conv(x, w) + b) as an implicit GEMM: x (N,H,W,C) float32, w (KH,KW,C,O) -> (N,H',W',O) or out's slot."""
    kh, kw, c_in, n_out = w.shape
    (sh, sw), (pt, pl), (ho, wo) = stride, top_left, out_hw
    y, rows, col0 = _rows_of((x.shape[0], ho, wo), n_out, out, col0, fn)
    bands = _bands(x.shape[0], ho, sh, kh, ((wo - 1) * sw + kw) * c_in * x.itemsize)
    fused.conv_implicit_bias_act(x, pack_panels(w.reshape(-1, n_out)), n_out, kh, kw, sh, sw, pt, pl, ho, wo,
                                 _bias_or_zeros(b, x, n_out, fn), rows, fused.NO, np.int64(code), np.float32(1.0),
                                 bands, rows, np.int64(col0))
    return y


def _implicit_input_gradient(dy, w, stride, top_left, dx):
    """dx = the input gradient of a stride-1 float32 conv, as a convolution of dy on packed weights; True when
    written, False (nothing written) when the shortcut does not apply (another stride or dtype, padding >= the kernel).

    dy (N,H',W',O), w (KH,KW,C,O), dx (N,H,W,C) written. With stride 1,
        dx[n,h,v,c] = sum_{p,q,o} dy[n, h + pt - p, v + pl - q, o] * w[p,q,c,o]
    is a KHxKW convolution of dy (zero outside it) with w flipped in both spatial axes and its channel axes
    swapped, wf[p',q',o,c] = w[KH-1-p', KW-1-q', c, o], padded by KH-1-pt on top and KW-1-pl on the left;
    the output size H, W implies the bottom and right. Why: the im2col route's GEMM (dy2d @ w2d^T, into an
    (N*H'*W', KH*KW*C) matrix that col2im then sums) cost SqueezeNet's last 3x3 expand 13.9 + 0.75 ms on one
    core at batch 32; the implicit GEMM (fused.conv_implicit_bias_act, the inference kernel, reading dy in
    place through a zero-bordered band buffer) does it in ~11.7 ms, and no 12 MB dcols is written and re-read.
    Every dx element is one FMA chain over (p', q', o) in order, whatever the thread count.
    """
    kh, kw, c_in, n_out = w.shape
    (sh, sw), (pt, pl) = stride, top_left
    if dy.dtype != np.float32 or (sh, sw) != (1, 1) or not (0 <= pt < kh and 0 <= pl < kw):
        return False
    n_img, h_in, w_in, _ = dx.shape
    flipped = pack_panels(w[::-1, ::-1].transpose(0, 1, 3, 2).reshape(kh * kw * n_out, c_in))
    dx2d = dx.reshape(-1, c_in)
    bands = _bands(n_img, h_in, 1, kh, (w_in + kw - 1) * n_out * dy.itemsize)
    fused.conv_implicit_bias_act(dy, flipped, c_in, kh, kw, 1, 1, kh - 1 - pt, kw - 1 - pl, h_in, w_in,
                                 np.zeros(c_in, np.float32), dx2d, fused.NO, ACT_NONE, np.float32(1.0), bands, dx2d,
                                 fused.ZERO)
    return True
