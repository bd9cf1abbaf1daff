"""Naive loop-only twins of the depthwise and pooling forward kernels: the oracle.

Written to be obviously right, not fast: explicit loops over every output element and every
window tap, padding checked tap by tap, float64 accumulation. Shapes as in the kernels:
x (N,H,W,C), depthwise w (KH,KW,C), pad (top, bottom, left, right).
"""

import math

import numpy as np


def _out_size(size, k, s, before, after, ceil_mode=False):
    # Spelled out independently of lightcnn.kernels.shapes, following PyTorch's pooling_output_shape.
    numerator = size + before + after - k + ((s - 1) if ceil_mode else 0)
    out = numerator // s + 1
    if ceil_mode and (out - 1) * s >= size + before:
        out -= 1
    return out


def activation_naive(v, act, alpha=1.0):
    """Scalar activation by name or ACT_* code (0 none, 1 relu, ..., 6 hard_swish)."""
    names = ["none", "relu", "relu6", "elu", "sigmoid", "hard_sigmoid", "hard_swish"]
    name = names[act] if isinstance(act, int) else act
    if name == "none":
        return v
    if name == "relu":
        return max(v, 0.0)
    if name == "relu6":
        return min(max(v, 0.0), 6.0)
    if name == "elu":
        return v if v > 0 else alpha * (math.exp(v) - 1.0)
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-v))
    if name == "hard_sigmoid":
        return min(max(v + 3.0, 0.0), 6.0) / 6.0
    if name == "hard_swish":
        return v * min(max(v + 3.0, 0.0), 6.0) / 6.0
    raise ValueError(act)


def depthwise_conv2d_naive(x, w, b=None, stride=(1, 1), pad=(0, 0, 0, 0), act=0, alpha=1.0):
    n_img, h, wd, c = x.shape
    kh, kw, _ = w.shape
    sh, sw = stride
    top, bottom, left, right = pad
    ho = _out_size(h, kh, sh, top, bottom)
    wo = _out_size(wd, kw, sw, left, right)
    y = np.zeros((n_img, ho, wo, c), dtype=x.dtype)
    for n in range(n_img):
        for oh in range(ho):
            for ow in range(wo):
                for ch in range(c):
                    total = 0.0 if b is None else float(b[ch])
                    for i in range(kh):
                        for j in range(kw):
                            ih = oh * sh + i - top
                            iw = ow * sw + j - left
                            if 0 <= ih < h and 0 <= iw < wd:
                                total += float(x[n, ih, iw, ch]) * float(w[i, j, ch])
                    y[n, oh, ow, ch] = activation_naive(total, act, alpha)
    return y


def max_pool2d_naive(x, kernel, stride, pad=(0, 0, 0, 0), ceil_mode=False):
    """-> (y, argmax) with argmax the flat h*W + w index of the first maximum in the window."""
    n_img, h, wd, c = x.shape
    kh, kw = kernel
    sh, sw = stride
    top, bottom, left, right = pad
    ho = _out_size(h, kh, sh, top, bottom, ceil_mode)
    wo = _out_size(wd, kw, sw, left, right, ceil_mode)
    y = np.zeros((n_img, ho, wo, c), dtype=x.dtype)
    argmax = np.zeros((n_img, ho, wo, c), dtype=np.int64)
    for n in range(n_img):
        for oh in range(ho):
            for ow in range(wo):
                for ch in range(c):
                    best, best_idx = -np.inf, None
                    for i in range(kh):
                        for j in range(kw):
                            ih = oh * sh + i - top
                            iw = ow * sw + j - left
                            if 0 <= ih < h and 0 <= iw < wd:
                                if best_idx is None:
                                    best_idx = ih * wd + iw
                                if x[n, ih, iw, ch] > best:
                                    best, best_idx = x[n, ih, iw, ch], ih * wd + iw
                    y[n, oh, ow, ch] = best
                    argmax[n, oh, ow, ch] = best_idx
    return y, argmax


def avg_pool2d_naive(x, kernel, stride, pad=(0, 0, 0, 0), ceil_mode=False, count_include_pad=True):
    n_img, h, wd, c = x.shape
    kh, kw = kernel
    sh, sw = stride
    top, bottom, left, right = pad
    ho = _out_size(h, kh, sh, top, bottom, ceil_mode)
    wo = _out_size(wd, kw, sw, left, right, ceil_mode)
    y = np.zeros((n_img, ho, wo, c), dtype=x.dtype)
    for n in range(n_img):
        for oh in range(ho):
            for ow in range(wo):
                for ch in range(c):
                    total, real, padded = 0.0, 0, 0
                    for i in range(kh):
                        for j in range(kw):
                            ih = oh * sh + i - top
                            iw = ow * sw + j - left
                            # Cells past the padded input (ceil-mode overhang) never count.
                            if -top <= ih < h + bottom and -left <= iw < wd + right:
                                padded += 1
                            if 0 <= ih < h and 0 <= iw < wd:
                                real += 1
                                total += float(x[n, ih, iw, ch])
                    y[n, oh, ow, ch] = total / (padded if count_include_pad else real)
    return y


def global_avg_pool_naive(x):
    n_img, h, wd, c = x.shape
    y = np.zeros((n_img, c), dtype=x.dtype)
    for n in range(n_img):
        for ch in range(c):
            total = 0.0
            for ih in range(h):
                for iw in range(wd):
                    total += float(x[n, ih, iw, ch])
            y[n, ch] = total / (h * wd)
    return y
