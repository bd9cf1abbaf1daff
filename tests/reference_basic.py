"""Naive loop-only twins of the activation, norm, linear and combine kernels: the oracle.

Written from the formulas, element by element in float64 with Python's math module,
without calling any lightcnn kernel. Slow on purpose; use tiny shapes.
"""

import math

import numpy as np


# --------------------------------------------------------------------------- activations


def act_ref(v, name, alpha=1.0):
    """One activation of one Python float."""
    if name == "none":
        return v
    if name == "relu":
        return v if v > 0 else 0.0
    if name == "relu6":
        return 0.0 if v < 0 else (6.0 if v > 6 else v)
    if name == "elu":
        return v if v > 0 else alpha * (math.exp(v) - 1.0)
    if name == "sigmoid":
        if v >= 0:
            return 1.0 / (1.0 + math.exp(-v))
        return math.exp(v) / (1.0 + math.exp(v))
    if name == "hard_sigmoid":
        t = v + 3.0
        t = 0.0 if t < 0 else (6.0 if t > 6 else t)
        return t / 6.0
    if name == "hard_swish":
        t = v + 3.0
        t = 0.0 if t < 0 else (6.0 if t > 6 else t)
        return v * t / 6.0
    raise KeyError(name)


def activation_forward_ref(x, name, alpha=1.0):
    y = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        y[idx] = act_ref(float(x[idx]), name, alpha)
    return y


def act_grad_ref(v, name, alpha=1.0):
    """d act / dv at one Python float, with PyTorch's values at the kinks (relu'(0) = 0, relu6'(6) = 0)."""
    if name == "none":
        return 1.0
    if name == "relu":
        return 1.0 if v > 0 else 0.0
    if name == "relu6":
        return 1.0 if 0 < v < 6 else 0.0
    if name == "elu":
        return 1.0 if v > 0 else alpha * math.exp(v)
    raise KeyError(name)


def activation_backward_ref(dy, x, name, alpha=1.0):
    """dx = dy * act'(x) from the pre-activation x."""
    dx = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        dx[idx] = float(dy[idx]) * act_grad_ref(float(x[idx]), name, alpha)
    return dx


# --------------------------------------------------------------------------- batch norm


def batchnorm_inference_ref(x, gamma, beta, mean, var, eps, act="none", alpha=1.0):
    """Eval-mode BN straight from the four vectors (no folding), then the activation."""
    n, h, w, c = x.shape
    y = np.zeros(x.shape)
    for i in range(n):
        for r in range(h):
            for s in range(w):
                for k in range(c):
                    v = (float(x[i, r, s, k]) - mean[k]) / math.sqrt(var[k] + eps) * gamma[k] + beta[k]
                    y[i, r, s, k] = act_ref(v, act, alpha)
    return y


def batchnorm_train_ref(x, gamma, beta, eps):
    """Training BN: returns (y, batch_mean, biased batch_var)."""
    n, h, w, c = x.shape
    m = n * h * w
    mean = np.zeros(c)
    var = np.zeros(c)
    for k in range(c):
        total = 0.0
        for i in range(n):
            for r in range(h):
                for s in range(w):
                    total += float(x[i, r, s, k])
        mean[k] = total / m
        sq = 0.0
        for i in range(n):
            for r in range(h):
                for s in range(w):
                    sq += (float(x[i, r, s, k]) - mean[k]) ** 2
        var[k] = sq / m
    y = np.zeros(x.shape)
    for i in range(n):
        for r in range(h):
            for s in range(w):
                for k in range(c):
                    y[i, r, s, k] = (float(x[i, r, s, k]) - mean[k]) / math.sqrt(var[k] + eps) * gamma[k] + beta[k]
    return y, mean, var


def update_running_stats_ref(running_mean, running_var, batch_mean, batch_var, count, momentum):
    new_mean = np.zeros(len(running_mean))
    new_var = np.zeros(len(running_var))
    for k in range(len(running_mean)):
        new_mean[k] = (1 - momentum) * running_mean[k] + momentum * batch_mean[k]
        new_var[k] = (1 - momentum) * running_var[k] + momentum * batch_var[k] * count / (count - 1)
    return new_mean, new_var


def conv2d_valid_ref(x, w, b):
    """Plain stride-1, unpadded conv for the BN-folding test.  x (N,H,W,C), w (KH,KW,C,O), b (O,)."""
    n, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    y = np.zeros((n, h - kh + 1, wd - kw + 1, o))
    for i in range(n):
        for r in range(h - kh + 1):
            for s in range(wd - kw + 1):
                for q in range(o):
                    acc = b[q]
                    for a in range(kh):
                        for bb in range(kw):
                            for k in range(c):
                                acc += float(x[i, r + a, s + bb, k]) * float(w[a, bb, k, q])
                    y[i, r, s, q] = acc
    return y


# --------------------------------------------------------------------------- linear


def dense_ref(x, w, b=None, act="none", alpha=1.0):
    n, f = x.shape
    o = w.shape[1]
    y = np.zeros((n, o))
    for i in range(n):
        for q in range(o):
            acc = 0.0 if b is None else float(b[q])
            for k in range(f):
                acc += float(x[i, k]) * float(w[k, q])
            y[i, q] = act_ref(acc, act, alpha)
    return y


def log_softmax_ref(z):
    n, k = z.shape
    out = np.zeros((n, k))
    for i in range(n):
        zmax = max(float(v) for v in z[i])
        total = 0.0
        for j in range(k):
            total += math.exp(float(z[i, j]) - zmax)
        for j in range(k):
            out[i, j] = float(z[i, j]) - zmax - math.log(total)
    return out


def softmax_ref(z):
    logp = log_softmax_ref(z)
    out = np.zeros(z.shape)
    for idx in np.ndindex(z.shape):
        out[idx] = math.exp(logp[idx])
    return out


def cross_entropy_ref(z, labels, class_weights=None, label_smoothing=0.0):
    """Per-sample smoothed target distribution, weighted; the mean divides by sum_n w[y_n]."""
    n, k = z.shape
    w = [1.0] * k if class_weights is None else [float(v) for v in class_weights]
    logp = log_softmax_ref(z)
    e = label_smoothing
    num = 0.0
    den = 0.0
    for i in range(n):
        y = int(labels[i])
        den += w[y]
        # torch: (1-e) * weighted NLL + (e/K) * sum_k w_k * (-logp_k), both over sum w[y_n]
        num += (1 - e) * w[y] * (-logp[i, y])
        for j in range(k):
            num += e / k * w[j] * (-logp[i, j])
    return num / den


def focal_loss_ref(z, labels, gamma=2.0, class_weights=None):
    n, k = z.shape
    w = [1.0] * k if class_weights is None else [float(v) for v in class_weights]
    logp = log_softmax_ref(z)
    num = 0.0
    den = 0.0
    for i in range(n):
        y = int(labels[i])
        p = math.exp(logp[i, y])
        num += -w[y] * (1 - p) ** gamma * logp[i, y]
        den += w[y]
    return num / den


def dropout_ref(x, mask):
    y = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        y[idx] = float(x[idx]) * float(mask[idx])
    return y


# --------------------------------------------------------------------------- combine


def concat_channels_ref(xs):
    n, h, w = xs[0].shape[:3]
    ctot = sum(x.shape[3] for x in xs)
    y = np.zeros((n, h, w, ctot))
    for i in range(n):
        for r in range(h):
            for s in range(w):
                k = 0
                for x in xs:
                    for j in range(x.shape[3]):
                        y[i, r, s, k] = x[i, r, s, j]
                        k += 1
    return y


def add_ref(a, b):
    y = np.zeros(a.shape)
    for idx in np.ndindex(a.shape):
        y[idx] = float(a[idx]) + float(b[idx])
    return y


def scale_channels_ref(x, s):
    y = np.zeros(x.shape)
    for i, r, q, c in np.ndindex(x.shape):
        y[i, r, q, c] = float(x[i, r, q, c]) * float(s[i, c])
    return y
