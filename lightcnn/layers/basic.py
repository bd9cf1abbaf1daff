"""Leaf layers: thin objects around the kernels.

Each layer validates its input, resolves padding for the actual input size,
calls one kernel, and (only when training) keeps what its backward needs.
Weights use the layouts of the package legend: conv HWIO (KH,KW,C,O),
depthwise (KH,KW,C), dense (F,O).

Padding specs accepted by the windowed layers:
  "torch"            symmetric kernel//2 (PyTorch's usual choice)
  "same" / "tf"      TensorFlow SAME: output = ceil(in/stride), extra pixel bottom/right
  "valid"            no padding
  int p              p on every side
  (t, b, l, r)       explicit
"""

import contextlib
import threading

import numpy as np

from lightcnn.kernels import activation as act_k
from lightcnn.kernels import conv as conv_k
from lightcnn.kernels import depthwise as dw_k
from lightcnn.kernels import linear as linear_k
from lightcnn.kernels import norm as norm_k
from lightcnn.kernels import pool as pool_k
from lightcnn.kernels import transpose as tconv_k
from lightcnn.kernels.shapes import same_padding
from lightcnn.layers.base import Layer, check_nhwc, check_rank2


def resolve_padding(spec, height, width, kernel_h, kernel_w, stride_h, stride_w):
    """Turn a padding spec into (top, bottom, left, right) for this input size."""
    if isinstance(spec, str):
        if spec in ("same", "tf"):
            return same_padding(height, width, kernel_h, kernel_w, stride_h, stride_w)
        if spec == "torch":
            return (kernel_h // 2, kernel_h // 2, kernel_w // 2, kernel_w // 2)
        if spec == "valid":
            return (0, 0, 0, 0)
        raise ValueError(f"unknown padding {spec!r}: use 'torch', 'same'/'tf', 'valid', an int or (t, b, l, r)")
    if isinstance(spec, (int, np.integer)):
        p = int(spec)
        return (p, p, p, p)
    pads = tuple(int(p) for p in spec)
    if len(pads) != 4:
        raise ValueError(f"padding must be (top, bottom, left, right), got {spec!r}")
    return pads


def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


_SKIP_INIT = threading.local()


@contextlib.contextmanager
def skip_initialisation():
    """Inside this block new layers get all-zero weights instead of random ones.

    For building a model whose every tensor a checkpoint is about to replace: np.zeros
    memory is never touched, so the unused initial weights cost neither the random draws
    nor resident memory (14 MB of MobileNetV2, 26 MB at the peak with the float64 draws).
    """
    previous = getattr(_SKIP_INIT, "on", False)
    _SKIP_INIT.on = True
    try:
        yield
    finally:
        _SKIP_INIT.on = previous


def he_normal(rng, shape, fan_in, dtype=np.float32):
    """Kaiming-normal initialisation, std = sqrt(2 / fan_in): keeps ReLU activations at unit scale."""
    if getattr(_SKIP_INIT, "on", False):
        return np.zeros(shape, dtype)
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


def _default_rng(rng) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(0)


def _check_training_act(name, act, alpha):
    """A conv's fused activation in training: only one whose derivative its output gives.

    backward() then takes dy w.r.t. the pre-activation, which the caller (ConvBNAct) computes
    from the output with activation_backward_from_output; the conv keeps no pre-activation.
    """
    if act != act_k.ACT_NONE and not act_k.grad_from_output(act, alpha):
        raise ValueError(f"{name}: a fused activation in training must have its derivative in terms of its output "
                         f"(relu, relu6, elu with alpha >= 0), got code {act}")


class Conv2d(Layer):
    """KxK convolution. weight (KH,KW,C,O), bias (O,) or absent.

    x (N,H,W,C) -> y (N,H',W',O). A 1x1 stride-1 unpadded conv takes the
    pointwise path: one GEMM on the (N*H*W, C) view.
    """

    is_unit = True

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | str | tuple[int, ...] = "torch", bias: bool = True,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.in_ch, self.out_ch = int(in_ch), int(out_ch)
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding = padding
        kh, kw = self.kernel
        self.params["weight"] = he_normal(_default_rng(rng), (kh, kw, in_ch, out_ch), kh * kw * in_ch)
        if bias:
            self.params["bias"] = np.zeros(out_ch, np.float32)

    def pads(self, h, w):
        return resolve_padding(self.padding, h, w, *self.kernel, *self.stride)

    def _is_pointwise(self, pads):
        return self.kernel == (1, 1) and self.stride == (1, 1) and pads == (0, 0, 0, 0)

    def forward(self, x: np.ndarray, training: bool = False, weight: np.ndarray | None = None,
                bias: np.ndarray | None = None, act: int = act_k.ACT_NONE, alpha: float = 1.0,
                out: np.ndarray | None = None, col0: int = 0) -> np.ndarray:
        """`weight`/`bias` override the stored ones (ConvBNAct's inference path, folded batch norm);
        `act` is fused into the output. In training, backward() still wants dy w.r.t. the
        pre-activation: the caller computes it from the output (see _check_training_act).
        `out`/`col0`: write into channels col0.. of out (see conv2d_forward) and return that view."""
        check_nhwc(x, self.name, self.in_ch)
        w = self.params["weight"] if weight is None else weight
        b = self.params.get("bias") if bias is None else bias
        pads = self.pads(x.shape[1], x.shape[2])
        cols = None
        if self._is_pointwise(pads):
            y = conv_k.pointwise_conv_forward(x, w.reshape(self.in_ch, self.out_ch), b, act, alpha, out, col0)
        elif training:  # backward reuses the im2col matrix when it is small enough to keep
            y, cols = conv_k.conv2d_forward_keeping_cols(x, w, b, self.stride, pads, act, alpha, out, col0)
        else:
            y = conv_k.conv2d_forward(x, w, b, self.stride, pads, act, alpha, out, col0)
        if training:
            _check_training_act(self.name, act, alpha)
            self.cache = (x, pads, w, cols)
        return y

    def backward(self, dy: np.ndarray, db: np.ndarray | None = None) -> np.ndarray:
        """dy w.r.t. the pre-activation output; `db`, when the caller already summed dy (the activation's
        backward did, in the same pass), is taken as the bias gradient."""
        x, pads, w, cols = self.cache
        self.cache = None
        need_dx = not self.skip_input_grad
        if self._is_pointwise(pads):
            dx, dw, db = conv_k.pointwise_conv_backward(dy, x, w.reshape(self.in_ch, self.out_ch), need_dx, db)
            dw = dw.reshape(w.shape)
        else:
            dx, dw, db = conv_k.conv2d_backward(dy, x, w, self.stride, pads, need_dx, db, cols)
        if not self.frozen:
            self.grads["weight"] = dw
            if "bias" in self.params:
                self.grads["bias"] = db
        return dx

    def output_shape(self, in_shape):
        from lightcnn.kernels.shapes import conv_output_size

        n, h, w, _ = in_shape
        t, b, l, r = self.pads(h, w)
        return (n, conv_output_size(h, self.kernel[0], self.stride[0], t, b),
                conv_output_size(w, self.kernel[1], self.stride[1], l, r), self.out_ch)

    def macs(self, in_shape, out_shape):
        return int(np.prod(out_shape[1:3])) * self.kernel[0] * self.kernel[1] * self.in_ch * self.out_ch

    def __repr__(self):
        return f"Conv2d({self.in_ch}, {self.out_ch}, k={self.kernel}, s={self.stride}, pad={self.padding!r})"


class DepthwiseConv2d(Layer):
    """One KHxKW filter per channel. weight (KH,KW,C). x (N,H,W,C) -> y (N,H',W',C)."""

    is_unit = True

    def __init__(self, channels: int, kernel: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | str | tuple[int, ...] = "torch", bias: bool = True,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.in_ch = self.out_ch = int(channels)
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding = padding
        kh, kw = self.kernel
        self.params["weight"] = he_normal(_default_rng(rng), (kh, kw, channels), kh * kw)
        if bias:
            self.params["bias"] = np.zeros(channels, np.float32)

    def pads(self, h, w):
        return resolve_padding(self.padding, h, w, *self.kernel, *self.stride)

    def forward(self, x: np.ndarray, training: bool = False, weight: np.ndarray | None = None,
                bias: np.ndarray | None = None, act: int = act_k.ACT_NONE, alpha: float = 1.0) -> np.ndarray:
        check_nhwc(x, self.name, self.in_ch)
        w = self.params["weight"] if weight is None else weight
        b = self.params.get("bias") if bias is None else bias
        pads = self.pads(x.shape[1], x.shape[2])
        y = dw_k.depthwise_conv2d_forward(x, w, b, self.stride, pads, act, alpha)
        if training:
            _check_training_act(self.name, act, alpha)
            self.cache = (x, pads, w)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x, pads, w = self.cache
        self.cache = None
        dx, dw, db = dw_k.depthwise_conv2d_backward(dy, x, w, self.stride, pads)
        if not self.frozen:
            self.grads["weight"] = dw
            if "bias" in self.params:
                self.grads["bias"] = db
        return dx

    output_shape = Conv2d.output_shape

    def macs(self, in_shape, out_shape):
        return int(np.prod(out_shape[1:3])) * self.kernel[0] * self.kernel[1] * self.in_ch

    def __repr__(self):
        return f"DepthwiseConv2d({self.in_ch}, k={self.kernel}, s={self.stride}, pad={self.padding!r})"


class ConvTranspose2d(Layer):
    """Transpose convolution (learned upsampling). weight (KH,KW,C,O).

    x (N,H,W,C) -> y (N, (H-1)*s - pt - pb + KH + op, ..., O)
    """

    is_unit = True

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], stride: int | tuple[int, int],
                 padding: int | str | tuple[int, ...] = 0, output_padding: int | tuple[int, int] = 0,
                 bias: bool = True, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.in_ch, self.out_ch = int(in_ch), int(out_ch)
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding = resolve_padding(padding, 0, 0, 1, 1, 1, 1)
        self.output_padding = _pair(output_padding)
        kh, kw = self.kernel
        self.params["weight"] = he_normal(_default_rng(rng), (kh, kw, in_ch, out_ch), in_ch)
        if bias:
            self.params["bias"] = np.zeros(out_ch, np.float32)

    def forward(self, x: np.ndarray, training: bool = False, act: int = act_k.ACT_NONE,
                alpha: float = 1.0) -> np.ndarray:
        """`act` fused into the output; in training as Conv2d's (backward wants dy w.r.t. the pre-activation)."""
        check_nhwc(x, self.name, self.in_ch)
        y = tconv_k.conv_transpose2d_forward(x, self.params["weight"], self.params.get("bias"), self.stride,
                                             self.padding, self.output_padding, act, alpha)
        if training:
            _check_training_act(self.name, act, alpha)
            self.cache = x
        return y

    def backward(self, dy: np.ndarray, db: np.ndarray | None = None) -> np.ndarray:
        """As Conv2d.backward (`db`: the bias gradient when the caller already summed dy)."""
        x, self.cache = self.cache, None
        dx, dw, db = tconv_k.conv_transpose2d_backward(dy, x, self.params["weight"], self.stride, self.padding,
                                                       self.output_padding, db)
        if not self.frozen:
            self.grads["weight"] = dw
            if "bias" in self.params:
                self.grads["bias"] = db
        return dx

    def macs(self, in_shape, out_shape):
        return int(np.prod(in_shape[1:3])) * self.kernel[0] * self.kernel[1] * self.in_ch * self.out_ch


class BatchNorm(Layer):
    """Batch normalisation over N,H,W per channel.

    params weight (gamma), bias (beta); buffers running_mean, running_var.
    Training uses batch statistics and updates the running ones (PyTorch momentum
    convention); frozen or inference uses the running statistics as a folded
    scale/shift.

    ``track`` (never saved) is for re-estimating the running statistics in a
    training-mode pass (lightcnn.train.bn), whatever ``frozen`` says:
      "cumulative"  normalise with batch statistics; the running ones become the
                    equal-weight average over the batches seen (PyTorch's momentum=None)
      "measure"     normalise with the running statistics (the output does not
                    change); the batch statistics are averaged into ``measured``
    """

    def __init__(self, channels: int, eps: float = 1e-05, momentum: float = 0.1) -> None:
        super().__init__()
        self.channels, self.eps, self.momentum = int(channels), float(eps), float(momentum)
        self.params["weight"] = np.ones(channels, np.float32)
        self.params["bias"] = np.zeros(channels, np.float32)
        self.buffers["running_mean"] = np.zeros(channels, np.float32)
        self.buffers["running_var"] = np.ones(channels, np.float32)
        self.track = None
        self.tracked_batches = 0
        self.measured = None  # (mean (C,), unbiased var (C,)) averaged over batches by track="measure"

    def _track(self, x):
        """One batch of a statistics pass (see `track`); returns the output."""
        count = x.size // x.shape[-1]
        self.tracked_batches += 1
        factor = 1.0 / self.tracked_batches
        if self.track == "cumulative":
            y, _, mean, var = norm_k.batchnorm_train_forward(x, self.params["weight"], self.params["bias"], self.eps)
            self.buffers["running_mean"], self.buffers["running_var"] = norm_k.update_running_stats(
                self.buffers["running_mean"], self.buffers["running_var"], mean, var, count, factor)
            return y
        if self.track != "measure":
            raise ValueError(f"{self.name}: track must be None, 'cumulative' or 'measure', got {self.track!r}")
        # the parallel float64 channel sums of training mode: rows.astype(float64).var(0) made unfolding MobileNetV2's
        # BN on 425 images take 31 s
        mean, var = norm_k.batch_statistics(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
        previous = self.measured or (np.zeros_like(mean), np.ones_like(var))
        self.measured = norm_k.update_running_stats(previous[0], previous[1], mean, var, count, factor)
        scale, shift = self.folded()
        return norm_k.batchnorm_inference_forward(x, scale.astype(x.dtype), shift.astype(x.dtype))

    def folded(self):
        """(scale, shift) with y = x * scale + shift, from the running statistics."""
        return norm_k.fold_batchnorm(self.params["weight"], self.params["bias"], self.buffers["running_mean"],
                                     self.buffers["running_var"], self.eps)

    def trains_statistics(self, training: bool) -> bool:
        """Whether forward(x, training) normalises with the batch's statistics and updates the running ones
        (the mode in which it takes a fused activation and an output slot)."""
        return training and self.track is None and not self.frozen

    def forward(self, x: np.ndarray, training: bool = False, act: int = act_k.ACT_NONE, alpha: float = 1.0,
                out: np.ndarray | None = None, col0: int = 0) -> np.ndarray:
        """`act` (relu, relu6, ELU) and `out`/`col0` (write into channels col0.. of a concatenation) only
        where trains_statistics(training): ConvBNAct's one pass for BN + activation."""
        check_nhwc(x, self.name, self.channels)
        if (act != act_k.ACT_NONE or out is not None) and not self.trains_statistics(training):
            raise ValueError(f"{self.name}: a fused activation or output slot needs training-mode statistics")
        if training and self.track is not None:
            return self._track(x)
        if training and not self.frozen:
            y, cache, mean, var = norm_k.batchnorm_train_forward(x, self.params["weight"], self.params["bias"],
                                                                  self.eps, act, alpha, out, col0)
            count = x.size // x.shape[-1]
            new_mean, new_var = norm_k.update_running_stats(self.buffers["running_mean"], self.buffers["running_var"],
                                                            mean, var, count, self.momentum)
            self.buffers["running_mean"], self.buffers["running_var"] = new_mean, new_var
            # backward takes dy w.r.t. the activation's output: it needs that output (the whole slot array)
            self.cache = ("train", cache, y if out is None else out, act, alpha, 0 if out is None else int(col0))
            return y
        scale, shift = self.folded()
        y = norm_k.batchnorm_inference_forward(x, scale.astype(x.dtype), shift.astype(x.dtype))
        if training:
            self.cache = ("frozen", scale.astype(x.dtype))
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy w.r.t. forward's output (after the fused activation, the whole slot array with `out`)."""
        mode, cache, *fused = self.cache
        self.cache = None
        if mode == "frozen":
            return norm_k.batchnorm_inference_backward(dy, cache)
        y, act, alpha, col0 = fused
        dx, dgamma, dbeta = norm_k.batchnorm_train_backward(dy, cache, self.params["weight"].astype(cache.xhat.dtype),
                                                            y, act, alpha, col0)
        self.grads["weight"], self.grads["bias"] = dgamma, dbeta
        return dx


class Activation(Layer):
    """Elementwise nonlinearity by name (relu, relu6, elu, sigmoid, hard_sigmoid, hard_swish)."""

    def __init__(self, kind: str, alpha: float = 1.0) -> None:
        super().__init__()
        self.kind, self.code, self.alpha = kind, act_k.ACTIVATIONS[kind], float(alpha)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        y = act_k.activation_forward(x, self.code, self.alpha)
        if training:  # the output when it gives the derivative (no exponential in backward), else the input
            self.cache = ("output", y) if act_k.grad_from_output(self.code, self.alpha) else ("input", x)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (kind, t), self.cache = self.cache, None
        if kind == "output":
            return act_k.activation_backward_from_output(dy, t, self.code, self.alpha)
        return act_k.activation_backward(dy, t, self.code, self.alpha)

    def __repr__(self):
        return f"Activation({self.kind!r})"


class Dense(Layer):
    """Fully connected: x (N,F) @ weight (F,O) + bias (O,) -> (N,O)."""

    is_unit = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "none",
                 rng: np.random.Generator | None = None, init: str = "he") -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.act, self.act_name = act_k.ACTIVATIONS[act], act
        rng = _default_rng(rng)
        if init == "he" or getattr(_SKIP_INIT, "on", False):
            w = he_normal(rng, (in_features, out_features), in_features)
        else:  # "glorot": the usual choice for a softmax output layer
            limit = np.sqrt(6.0 / (in_features + out_features))
            w = rng.uniform(-limit, limit, (in_features, out_features)).astype(np.float32)
        self.params["weight"] = w
        if bias:
            self.params["bias"] = np.zeros(out_features, np.float32)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        check_rank2(x, self.name, self.in_features)
        if training:
            y_pre = linear_k.dense_forward(x, self.params["weight"], self.params.get("bias"))
            self.cache = (x, y_pre)
            return y_pre if self.act == act_k.ACT_NONE else act_k.activation_forward(y_pre, self.act, 1.0)
        return linear_k.dense_forward(x, self.params["weight"], self.params.get("bias"), self.act, 1.0)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x, y_pre = self.cache
        self.cache = None
        if self.act != act_k.ACT_NONE:
            dy = act_k.activation_backward(dy, y_pre, self.act, 1.0)
        dx, dw, db = linear_k.dense_backward(dy, x, self.params["weight"])
        if not self.frozen:
            self.grads["weight"] = dw
            if "bias" in self.params:
                self.grads["bias"] = db
        return dx

    def macs(self, in_shape, out_shape):
        return self.in_features * self.out_features

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features}, act={self.act_name!r})"


class GlobalAvgPool(Layer):
    """(N,H,W,C) -> (N,C): the mean over all positions."""

    is_unit = True

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        check_nhwc(x, self.name)
        if training:
            self.cache = x.shape
        return pool_k.global_avg_pool_forward(x)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        shape, self.cache = self.cache, None
        return pool_k.global_avg_pool_backward(dy, shape)


class MaxPool2d(Layer):
    """Max pooling; ceil_mode as Caffe/torchvision SqueezeNet use it."""

    is_unit = True

    def __init__(self, kernel: int | tuple[int, int], stride: int | tuple[int, int],
                 padding: int | str | tuple[int, ...] = 0, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding, self.ceil_mode = padding, bool(ceil_mode)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        check_nhwc(x, self.name)
        pads = resolve_padding(self.padding, x.shape[1], x.shape[2], *self.kernel, *self.stride)
        y, argmax = pool_k.max_pool2d_forward(x, self.kernel, self.stride, pads, self.ceil_mode)
        if training:
            self.cache = (argmax, x.shape)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (argmax, shape), self.cache = self.cache, None
        return pool_k.max_pool2d_backward(dy, argmax, shape)


class AvgPool2d(Layer):
    """Average pooling over KHxKW windows."""

    is_unit = True

    def __init__(self, kernel: int | tuple[int, int], stride: int | tuple[int, int],
                 padding: int | str | tuple[int, ...] = 0, ceil_mode: bool = False,
                 count_include_pad: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding, self.ceil_mode, self.count_include_pad = padding, bool(ceil_mode), bool(count_include_pad)

    def _args(self, shape):
        pads = resolve_padding(self.padding, shape[1], shape[2], *self.kernel, *self.stride)
        return self.kernel, self.stride, pads, self.ceil_mode, self.count_include_pad

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        check_nhwc(x, self.name)
        if training:
            self.cache = x.shape
        return pool_k.avg_pool2d_forward(x, *self._args(x.shape))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        shape, self.cache = self.cache, None
        return pool_k.avg_pool2d_backward(dy, shape, *self._args(shape))


class Dropout(Layer):
    """Inverted dropout during training only; the generator is explicit and seeded."""

    def __init__(self, p: float, seed: int = 0) -> None:
        super().__init__()
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if not training or self.p == 0.0:
            if training:
                self.cache = None
            return x
        y, mask = linear_k.dropout_forward(x, self.p, self.rng)
        self.cache = mask
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        mask, self.cache = self.cache, None
        return dy if mask is None else linear_k.dropout_backward(dy, mask)

    def __repr__(self):
        return f"Dropout({self.p})"


class Flatten(Layer):
    """(N,1,1,C) -> (N,C); anything else is a shape error (use GlobalAvgPool)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if x.ndim != 4 or x.shape[1:3] != (1, 1):
            raise ValueError(f"{self.name}: expected shape (N, 1, 1, C), got {x.shape}")
        return x.reshape(x.shape[0], x.shape[3])

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy.reshape(dy.shape[0], 1, 1, dy.shape[1])
