"""Transpose convolution ("deconvolution"): the adjoint of a strided conv, used for upsampling.

Every input pixel stamps its weighted kernel onto the output, stride apart:

    y[n, h*sh + p - top, v*sw + q - left, o] += x[n,h,v,c] * w[p,q,c,o]     then y = act(y + b)

(entries landing outside the output are dropped).  PyTorch semantics: `pad` crops the
full (H-1)*sh + KH output by (top, bottom, left, right), and `output_padding` adds rows/
columns at the bottom/right only, which receive just the bias where no kernel reaches
(lightcnn.kernels.shapes.transpose_output_size):

    H' = (H - 1)*sh - top - bottom + KH + output_padding_h        (likewise W')

so a 4x upsampling is KH = sh = 4, or KH = 3, sh = 4, output_padding 1 (gaps get the bias).

Cost: 2*C*KH*KW*O FLOPs per input pixel, i.e. about 2*C*KH*KW/(sh*sw) per output element;
all of it is one BLAS GEMM per chunk of images.

How: cols = x2d (N*H*W, C) @ wm (C, KH*KW*O), with wm = w transposed to (C,KH,KW,O), is
every pixel's stamp; then `col2im` (shared with conv.py, a race-free gather: each output
pixel sums the stamps that cover it) adds them up and applies the bias + activation
epilogue.  Backward reuses conv.py's `im2col` on dy, since the input gradient of a
transpose conv is a plain strided conv of dy:

    dcols = im2col(dy)   (N*H*W, KH*KW*O)     dx2d = dcols @ wm^T     dwm = x2d^T @ dcols     db = sum dy

Deliberately absent: dilation, groups, output_padding >= stride (PyTorch rejects it too).

Shapes: conv_transpose2d_forward(x (N,H,W,C), w (KH,KW,C,O), b (O,)) -> y (N,H',W',O).
"""

import numpy as np

from lightcnn.kernels import _reuse
from lightcnn.kernels.activation import ACT_NONE
from lightcnn.kernels._args import _act_code, _bias_or_zeros, _images_per_chunk, _like, _nhwc, _pad4, _pair
from lightcnn.kernels._split_blas import matmul, matmul_tn
from lightcnn.kernels.conv import col2im, im2col
from lightcnn.kernels.shapes import transpose_output_size


def _transpose_geometry(x, w, stride, pad, output_padding, fn):
    """Validate arguments; returns (x, wm (C, KH*KW*O), (sh, sw), (pt, pb, pl, pr), (Ho, Wo))."""
    x = _nhwc(x, fn)
    w = np.asarray(w)
    if w.ndim != 4 or w.shape[2] != x.shape[3]:
        raise ValueError(
            f"{fn}: w must be (KH,KW,C,O) with C = x.shape[3] = {x.shape[3]} for x (N,H,W,C) = {x.shape}, "
            f"got {w.shape}"
        )
    sh, sw = _pair(stride, "stride", fn, 1)
    pt, pb, pl, pr = _pad4(pad, fn)
    oph, opw = _pair(output_padding, "output_padding", fn, 0)
    if oph >= sh or opw >= sw:
        raise ValueError(f"{fn}: output_padding {(oph, opw)} must be smaller than stride {(sh, sw)}")
    kh, kw, c_in, n_out = w.shape
    ho = transpose_output_size(x.shape[1], kh, sh, pt, pb, oph)
    wo = transpose_output_size(x.shape[2], kw, sw, pl, pr, opw)
    if ho < 1 or wo < 1:
        raise ValueError(f"{fn}: pad {(pt, pb, pl, pr)} crops the whole output of x (N,H,W,C) = {x.shape}, w {w.shape}")
    # (KH,KW,C,O) -> (C,KH,KW,O): one row of wm is the stamp a unit input on channel c leaves.
    wm = np.ascontiguousarray(w.transpose(2, 0, 1, 3), dtype=x.dtype).reshape(c_in, kh * kw * n_out)
    return x, wm, (sh, sw), (pt, pb, pl, pr), (ho, wo)


def conv_transpose2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: tuple[int,
                             ...] = (1, 1),
                             pad: tuple[int, ...] = (0, 0, 0, 0), output_padding: tuple[int, ...] = (0, 0),
                             act: int = ACT_NONE, alpha: float = 1.0, out: np.ndarray | None = None,
                             scratch: dict | None = None) -> np.ndarray:
    """y = act(conv_transpose(x, w) + b).  x (N,H,W,C), w (KH,KW,C,O), b (O,) or None -> y (N,H',W',O).

    stride and output_padding (h, w) or int; pad (top, bottom, left, right) crops the output.
    `out`: a C-contiguous (N,H',W',O) array of x's dtype to write y into (returned). `scratch`: a dict the
    caller keeps between calls (an inference plan's step) to hold the stamp matrix: a fresh 13 MB one every
    call costs its page faults (seed 001's upsampling at batch 8: 27 ms in the plan, 12 ms with both).
    """
    fn = "conv_transpose2d_forward"
    x, wm, (sh, sw), (pt, pb, pl, pr), (ho, wo) = _transpose_geometry(x, w, stride, pad, output_padding, fn)
    code = _act_code(act, fn)
    n_img, h_in, w_in, c_in = x.shape
    kh, kw, _, n_out = np.shape(w)
    bias = _bias_or_zeros(b, x, n_out, fn)
    x2d = x.reshape(-1, c_in)
    if out is None:
        y = _reuse.empty((n_img, ho, wo, n_out), x.dtype)
    elif out.shape != (n_img, ho, wo, n_out) or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"{fn}: out must be C-contiguous {(n_img, ho, wo, n_out)} {x.dtype}, got {out.shape} "
                         f"{out.dtype}")
    else:
        y = out
    hw = h_in * w_in
    step = _images_per_chunk(n_img, hw * wm.shape[1] * x.itemsize)
    shape = (step * hw, wm.shape[1])
    cols = None if scratch is None else scratch.get("cols")
    if cols is None or cols.shape != shape or cols.dtype != x.dtype:
        cols = _reuse.empty(shape, x.dtype)
        if scratch is not None:
            scratch["cols"] = cols
    for n0 in range(0, n_img, step):
        n1 = min(n0 + step, n_img)
        c = cols[: (n1 - n0) * hw]
        matmul(x2d[n0 * hw : n1 * hw], wm, c)
        col2im(c, kh, kw, sh, sw, pt, pl, h_in, w_in, bias, code, x.dtype.type(alpha), y[n0:n1])
    return y


def conv_transpose2d_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride: tuple[int, ...] = (1, 1),
                              pad: tuple[int, ...] = (0, 0, 0, 0), output_padding: tuple[int, ...] = (0, 0),
                              db: np.ndarray | None = None) -> tuple:
    """Gradients of conv_transpose2d_forward (without activation) given dy w.r.t. its pre-activation output.

    dy (N,H',W',O), x (N,H,W,C), w (KH,KW,C,O) -> dx (N,H,W,C), dw (KH,KW,C,O), db (O,); a given `db`
    (already summed with the activation's backward) is returned as it is.
    """
    fn = "conv_transpose2d_backward"
    x, wm, (sh, sw), (pt, pb, pl, pr), (ho, wo) = _transpose_geometry(x, w, stride, pad, output_padding, fn)
    n_img, h_in, w_in, c_in = x.shape
    kh, kw, _, n_out = np.shape(w)
    dy = _like(dy, x, (n_img, ho, wo, n_out), "dy", fn, "(N,H',W',O)")
    db = dy.reshape(-1, n_out).sum(axis=0) if db is None else db
    x2d = x.reshape(-1, c_in)
    dx = _reuse.empty_like(x)
    dx2d = dx.reshape(-1, c_in)
    dwm = np.zeros_like(wm)
    hw = h_in * w_in
    step = _images_per_chunk(n_img, hw * wm.shape[1] * x.itemsize)
    dcols = _reuse.empty((step * hw, wm.shape[1]), x.dtype)
    for n0 in range(0, n_img, step):
        n1 = min(n0 + step, n_img)
        rows = slice(n0 * hw, n1 * hw)
        dc = dcols[: (n1 - n0) * hw]
        # The transpose conv's input grid is the strided conv's output grid: (H, W).
        im2col(dy[n0:n1], kh, kw, sh, sw, pt, pl, h_in, w_in, dc)
        matmul(dc, wm.T, dx2d[rows])
        dwm += matmul_tn(x2d[rows], dc)
    dw = np.ascontiguousarray(dwm.reshape(c_in, kh, kw, n_out).transpose(1, 2, 0, 3))
    return dx, dw, db
