"""Fused inference kernels: every conv is a tiled BLAS GEMM whose epilogue does the rest.

    y[r, col0 + o] = act( sum_k xs[r, k] * w2d[k, o] + b[o]  (+ res[r, col0 + o]) )

r runs over the M = N*H'*W' output pixels (NHWC rows), o over the O output channels.
xs is
  - x itself for a pointwise (1x1) conv: x (N,H,W,K) viewed as (M, K);
  - x * s[n] for a pointwise conv after squeeze-excitation: s (N, K) scales the input
    channels of image n, which is the SE block's multiply folded into the next GEMM;
  - the im2col rows of x for a KxK conv (K = KH*KW*C, column order (p, q, c) = w's).
col0 lets two convs write side by side into one (M, O1 + O2) buffer: Fire's concat
costs nothing. res is a residual (MobileNet's skip, Fire's bypass) added before act.

How (why it is shaped like this):
  - the rows are cut into tiles of `tile` rows and the tiles are spread over Numba's
    threads (prange); each tile is one BLAS call, np.dot, on one thread (lightcnn._blas
    sets SciPy's OpenBLAS, which Numba's np.dot calls, to one thread: one pool, never two
    fighting over 2 cores);
  - the GEMM writes the tile into a small scratch block that is still in L1/L2 when the
    epilogue adds bias and residual and applies the activation, so y is written once
    and never re-read: conv + folded batch norm + activation + residual in one pass;
  - the activation is dispatched once per row by act_forward_flat (a test on `act`
    inside the element loop would stop LLVM from vectorising it).
Cost: 2*K FLOPs per output element in BLAS; the epilogue is 2-4 FLOPs per element.

Also here, for the same inference plan (lightcnn.layers.plan): a squeeze-excitation gate
(global average -> dense+ReLU -> dense+hard-sigmoid), a dense layer split over its input
features, and a max pool that does not record the argmax that only training needs.

Deliberately absent: backward passes (training uses conv.py and friends), float16/int8,
and Winograd. Results equal conv2d_forward/pointwise_conv_forward up to float32 GEMM
summation order (the tests compare them at 1e-5).
"""

import numpy as np

from lightcnn._jit import kernel, prange
from lightcnn.kernels.activation import ACT_RELU, act_forward_flat

__all__ = ["gemm_bias_act", "conv_im2col_bias_act", "se_gate", "dense_bias_act", "max_pool_inference",
           "choose_tile"]

# Bytes of one tile's scratch (GEMM output + input rows); small enough to sit in L2 next to the weights.
_TILE_BYTES = 1 << 17
_MIN_TILE = 16


def choose_tile(m, k, o, threads, itemsize=4):
    """Rows per tile for an (M, K) @ (K, O) GEMM on `threads` threads.

    At least one tile per thread (two when M is large, for balance), each small enough
    that its scratch stays in L2, and never so small that BLAS runs at a fraction of its speed.
    """
    by_cache = max(_MIN_TILE, _TILE_BYTES // (itemsize * max(k + o, 1)))
    per_thread = -(-m // max(1, threads))
    tile = min(by_cache, per_thread)
    if m > 2 * threads * _MIN_TILE * 4:  # large M: at least two tiles per thread
        tile = min(tile, -(-m // (2 * threads)))
    return int(max(1, min(m, tile)))


# --------------------------------------------------------------------------- GEMM tiles


@kernel
def _epilogue_tile(acc, b, res, use_res, act, alpha, y, r0, col0):
    """y[r0 + r, col0:col0 + O] = act(acc[r] + b (+ res[r0 + r, col0:col0 + O])) for each row r of acc."""
    n_out = acc.shape[1]
    for r in range(acc.shape[0]):
        a = acc[r]
        if use_res:
            rr = res[r0 + r, col0:col0 + n_out]
            for c in range(n_out):
                a[c] = a[c] + b[c] + rr[c]  # same rounding order as conv-then-add
        else:
            for c in range(n_out):
                a[c] = a[c] + b[c]
        act_forward_flat(a, act, alpha, y[r0 + r, col0:col0 + n_out])


@kernel(parallel=True)
def gemm_bias_act(x2d, w2d, b, res, use_res, scale, rows_per_image, use_scale, act, alpha, tile, y, col0):
    """Pointwise conv tile by tile: y[:, col0:col0+O] = act(xs @ w2d + b (+ res)).

    x2d (M, K) C-contiguous; w2d (K, O); b (O,); res (M, >= col0+O) or a dummy when not use_res;
    scale (N, K) (squeeze-excitation, rows_per_image = H*W) or a dummy when not use_scale;
    y (M, >= col0 + O).
    """
    m, k = x2d.shape
    n_out = w2d.shape[1]
    n_tiles = (m + tile - 1) // tile
    for t in prange(n_tiles):
        r0 = t * tile
        r1 = min(m, r0 + tile)
        acc = np.empty((r1 - r0, n_out), dtype=y.dtype)
        if use_scale:
            # (x * s) @ w: scale the tile's input rows into scratch (one image per row range).
            xs = np.empty((r1 - r0, k), dtype=x2d.dtype)
            for r in range(r0, r1):
                s = scale[r // rows_per_image]
                xr = x2d[r]
                xo = xs[r - r0]
                for c in range(k):
                    xo[c] = xr[c] * s[c]
            np.dot(xs, w2d, acc)
        else:
            np.dot(x2d[r0:r1], w2d, acc)
        _epilogue_tile(acc, b, res, use_res, act, alpha, y, r0, col0)


@kernel
def _im2col_tile(x, kh, kw, sh, sw, pt, pl, ho, wo, r0, cols):
    """cols[r, (p*kw + q)*C + c] = x[n, i*sh - pt + p, j*sw - pl + q, c] for output rows r0 + r = (n*ho + i)*wo + j."""
    _, h_in, w_in, c_in = x.shape
    for r in range(cols.shape[0]):
        row = r0 + r
        j = row % wo
        t = row // wo
        i = t % ho
        n = t // ho
        out = cols[r]
        for p in range(kh):
            h = i * sh - pt + p
            for q in range(kw):
                w = j * sw - pl + q
                base = (p * kw + q) * c_in
                if 0 <= h < h_in and 0 <= w < w_in:
                    xi = x[n, h, w]
                    for c in range(c_in):
                        out[base + c] = xi[c]
                else:
                    for c in range(c_in):
                        out[base + c] = 0.0


@kernel(parallel=True)
def conv_im2col_bias_act(x, w2d, kh, kw, sh, sw, pt, pl, ho, wo, b, res, use_res, act, alpha, tile, y, col0):
    """KxK conv tile by tile: im2col of `tile` output rows into scratch, one GEMM, fused epilogue.

    x (N,H,W,C); w2d (KH*KW*C, O) (HWIO reshaped); y (N*Ho*Wo, >= col0 + O) as rows.
    Only the top/left padding is passed: Ho and Wo imply the rest (reads outside x are zeros).
    """
    m = y.shape[0]
    k, n_out = w2d.shape
    n_tiles = (m + tile - 1) // tile
    for t in prange(n_tiles):
        r0 = t * tile
        r1 = min(m, r0 + tile)
        cols = np.empty((r1 - r0, k), dtype=x.dtype)
        _im2col_tile(x, kh, kw, sh, sw, pt, pl, ho, wo, r0, cols)
        acc = np.empty((r1 - r0, n_out), dtype=y.dtype)
        np.dot(cols, w2d, acc)
        _epilogue_tile(acc, b, res, use_res, act, alpha, y, r0, col0)


# --------------------------------------------------------------------------- squeeze-excitation, dense


@kernel
def se_gate(x, w1, b1, w2, b2, gate, alpha, s):
    """s[n] = gate(relu(mean_hw(x[n]) @ w1 + b1) @ w2 + b2).  x (N,H,W,C), w1 (C,S), w2 (S,C), s (N,C).

    Tiny (2*C*S MACs per image): serial, float32, bias added after the sum as the layer path does.
    """
    n_img, h, w, c_in = x.shape
    sq = w1.shape[1]
    inv = 1.0 / (h * w)
    pooled = np.empty(c_in, dtype=x.dtype)
    hidden = np.empty(sq, dtype=x.dtype)
    for n in range(n_img):
        pooled[:] = 0.0
        for i in range(h):
            for j in range(w):
                xi = x[n, i, j]
                for c in range(c_in):
                    pooled[c] += xi[c]
        for c in range(c_in):
            pooled[c] *= inv
        hidden[:] = 0.0
        for c in range(c_in):
            v = pooled[c]
            wr = w1[c]
            for o in range(sq):
                hidden[o] += v * wr[o]
        for o in range(sq):
            hidden[o] += b1[o]
        act_forward_flat(hidden, ACT_RELU, alpha, hidden)
        sn = s[n]
        sn[:] = 0.0
        for o in range(sq):
            v = hidden[o]
            wr = w2[o]
            for c in range(c_in):
                sn[c] += v * wr[c]
        for c in range(c_in):
            sn[c] += b2[c]
        act_forward_flat(sn, gate, alpha, sn)


@kernel(parallel=True)
def dense_bias_act(x, w, b, act, alpha, partial, y):
    """y = act(x @ w + b) with the F input features split into partial.shape[0] chunks.

    x (N,F), w (F,O), partial (P, N, O) scratch, y (N,O). A classifier is a matrix-vector
    product bound by reading w (5 MB for 1280x1000): splitting F gives each thread a
    contiguous block of w's rows. P is fixed by the caller, not by the thread count, so
    the summation order and hence the result do not depend on threads.
    """
    n_img, f = x.shape
    n_parts = partial.shape[0]
    for p in prange(n_parts):
        k0 = p * f // n_parts
        k1 = (p + 1) * f // n_parts
        xs = np.empty((n_img, k1 - k0), dtype=x.dtype)
        for n in range(n_img):
            for k in range(k0, k1):
                xs[n, k - k0] = x[n, k]
        np.dot(xs, w[k0:k1], partial[p])
    n_out = w.shape[1]
    acc = np.empty(n_out, dtype=y.dtype)
    for n in range(n_img):
        for o in range(n_out):
            acc[o] = partial[0, n, o]
        for p in range(1, n_parts):
            for o in range(n_out):
                acc[o] += partial[p, n, o]
        for o in range(n_out):
            acc[o] += b[o]
        act_forward_flat(acc, act, alpha, y[n])


@kernel(parallel=True)
def max_pool_inference(x, kh, kw, sh, sw, top, left, y):
    """Max pool without the argmax: y[n,oh,ow,c] = max over the window clipped to x (padding = -inf).

    x (N,H,W,C), y (N,Ho,Wo,C). A NaN wins and propagates, as in max_pool2d_forward.
    """
    n_img, h_in, w_in, n_ch = x.shape
    _, h_out, w_out, _ = y.shape
    for row in prange(n_img * h_out):
        n = row // h_out
        oh = row - n * h_out
        h0 = max(oh * sh - top, 0)
        h1 = min(oh * sh - top + kh, h_in)
        for ow in range(w_out):
            w0 = max(ow * sw - left, 0)
            w1 = min(ow * sw - left + kw, w_in)
            yo = y[n, oh, ow]
            first = x[n, h0, w0]
            for c in range(n_ch):
                yo[c] = first[c]
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    xi = x[n, ih, iw]
                    for c in range(n_ch):
                        v = xi[c]
                        m = yo[c]
                        # select, not branch: keeps the channel loop vectorised; m != m keeps a NaN
                        yo[c] = v if (v > m or v != v) and m == m else m
