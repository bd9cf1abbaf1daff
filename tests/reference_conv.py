"""Naive loop-only twins of lightcnn.kernels.conv and .transpose: the oracle.

Written straight from the defining sums, one scalar multiply-add at a time, accumulated
in Python floats (float64); slow on purpose, so keep shapes tiny.  No activation and
no im2col/GEMM, so they share no code path with the kernels under test.
"""

import numpy as np


def conv2d_naive(x, w, b=None, stride=(1, 1), pad=(0, 0, 0, 0)):
    """x (N,H,W,C), w (KH,KW,C,O) -> y (N,H',W',O); zero padding (top, bottom, left, right)."""
    n_img, h_in, w_in, c_in = x.shape
    kh, kw, _, n_out = w.shape
    sh, sw = stride
    pt, pb, pl, pr = pad
    ho = (h_in + pt + pb - kh) // sh + 1
    wo = (w_in + pl + pr - kw) // sw + 1
    y = np.zeros((n_img, ho, wo, n_out), dtype=x.dtype)
    for n in range(n_img):
        for i in range(ho):
            for j in range(wo):
                for o in range(n_out):
                    acc = 0.0 if b is None else float(b[o])
                    for p in range(kh):
                        for q in range(kw):
                            h = i * sh - pt + p
                            v = j * sw - pl + q
                            if 0 <= h < h_in and 0 <= v < w_in:
                                for c in range(c_in):
                                    acc += float(x[n, h, v, c]) * float(w[p, q, c, o])
                    y[n, i, j, o] = acc
    return y


def pointwise_naive(x, w, b=None):
    """x (N,H,W,C), w (C,O) -> y (N,H,W,O)."""
    n_img, h_in, w_in, c_in = x.shape
    n_out = w.shape[1]
    y = np.zeros((n_img, h_in, w_in, n_out), dtype=x.dtype)
    for n in range(n_img):
        for h in range(h_in):
            for v in range(w_in):
                for o in range(n_out):
                    acc = 0.0 if b is None else float(b[o])
                    for c in range(c_in):
                        acc += float(x[n, h, v, c]) * float(w[c, o])
                    y[n, h, v, o] = acc
    return y


def conv_transpose2d_naive(x, w, b=None, stride=(1, 1), pad=(0, 0, 0, 0), output_padding=(0, 0)):
    """x (N,H,W,C), w (KH,KW,C,O) -> y (N,H',W',O), by scattering each input pixel's stamp.

    PyTorch semantics: the full (H-1)*sh + KH output is cropped by pad and extended
    by output_padding at the bottom/right.
    """
    n_img, h_in, w_in, c_in = x.shape
    kh, kw, _, n_out = w.shape
    sh, sw = stride
    pt, pb, pl, pr = pad
    oph, opw = output_padding
    ho = (h_in - 1) * sh - pt - pb + kh + oph
    wo = (w_in - 1) * sw - pl - pr + kw + opw
    acc = np.zeros((n_img, ho, wo, n_out), dtype=np.float64)
    for n in range(n_img):
        for h in range(h_in):
            for v in range(w_in):
                for p in range(kh):
                    for q in range(kw):
                        i = h * sh + p - pt
                        j = v * sw + q - pl
                        if 0 <= i < ho and 0 <= j < wo:
                            for c in range(c_in):
                                for o in range(n_out):
                                    acc[n, i, j, o] += float(x[n, h, v, c]) * float(w[p, q, c, o])
    if b is not None:
        for o in range(n_out):
            acc[..., o] += float(b[o])
    return acc.astype(x.dtype)
