"""Composite blocks of the lightweight networks.

ConvBNAct        conv (standard, pointwise or depthwise) -> batch norm -> activation.
                 At inference the batch norm is folded into the conv weights and the
                 activation is fused into the kernel's epilogue: one kernel call.
SqueezeExcite    GAP -> 1x1 (reduce) -> ReLU -> 1x1 (expand) -> hard-sigmoid -> scale
InvertedResidual MobileNetV2/V3 bottleneck:  pw expand -> dw -> [SE] -> pw project (+ x)
Fire             SqueezeNet:  squeeze 1x1 -> [expand 1x1 | expand 3x3] concatenated (+ x)
"""

import numpy as np

from lightcnn.kernels import _reuse
from lightcnn.kernels import activation as act_k
from lightcnn.kernels import combine as combine_k
from lightcnn.kernels import norm as norm_k
from lightcnn.kernels import pool as pool_k
from lightcnn.layers.base import Layer, check_nhwc
from lightcnn.layers.basic import BatchNorm, Conv2d, Dense, DepthwiseConv2d


class ConvBNAct(Layer):
    """A conv unit: ``conv`` (Conv2d or DepthwiseConv2d), optional ``bn``, activation.

    x (N,H,W,C) -> y (N,H',W',O). With ``bn=None`` the conv carries the bias
    (networks converted from files whose batch norm is already folded).
    """

    is_unit = True
    first_child_takes_input = True

    def __init__(self, conv, bn=None, act="none", alpha=1.0):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.act_name, self.act, self.alpha = act, act_k.ACTIVATIONS[act], float(alpha)
        self.in_ch, self.out_ch = conv.in_ch, conv.out_ch
        self._folded = None  # (weight, bias) with BN folded; derived, rebuilt after parameter changes
        self.params_version = 0  # counts params_changed(): inference plans repack their weights when it moves

    def children(self):
        return [("conv", self.conv)] + ([("bn", self.bn)] if self.bn is not None else [])

    def _on_params_changed(self):
        self._folded = None
        self.params_version = getattr(self, "params_version", 0) + 1

    def folded_weights(self):
        """Conv weight and bias with the batch norm's running statistics folded in."""
        if self.bn is None:
            return self.conv.params["weight"], self.conv.params.get("bias")
        if self._folded is None:
            scale, shift = self.bn.folded()
            self._folded = norm_k.fold_batchnorm_into_conv(self.conv.params["weight"], self.conv.params.get("bias"),
                                                           scale, shift)
        return self._folded

    def forward(self, x, training=False, out=None, col0=0):
        """y (N,H',W',O). With `out` (N,H',W',C_total): y goes into out's channels col0..col0+O (a channel
        concatenation the caller owns, Fire's) and that view is returned; backward() then takes the
        gradient of the whole of `out`."""
        if not training:
            w, b = self.folded_weights()
            if x.dtype != w.dtype:
                w, b = w.astype(x.dtype), (None if b is None else b.astype(x.dtype))
            if out is not None and isinstance(self.conv, Conv2d):  # straight into the slot
                return self.conv.forward(x, False, weight=w, bias=b, act=self.act, alpha=self.alpha, out=out,
                                         col0=col0)
            y = self.conv.forward(x, False, weight=w, bias=b, act=self.act, alpha=self.alpha)
            return y if out is None else _into(out, col0, y)
        self._folded = None  # training may move BN statistics and weights
        slot = None if out is None else int(col0)
        from_output = act_k.grad_from_output(self.act, self.alpha)
        slot_args = {} if out is None else {"out": out, "col0": col0}
        frozen_bn = self.bn is not None and self.bn.frozen and self.bn.track is None
        epilogue_ok = self.act == act_k.ACT_NONE or from_output
        if frozen_bn and epilogue_ok and (out is None or isinstance(self.conv, Conv2d)):
            # Fine-tuning with batch norm frozen: the BN is a fixed per-channel affine map, so it folds into
            # the conv as at inference (w * scale, shift as the bias) and the activation goes in the epilogue:
            # one pass instead of three. backward() scales the folded weight's gradient back by `scale`.
            scale, shift = (v.astype(x.dtype) for v in self.bn.folded())
            y = self.conv.forward(x, True, weight=self.conv.params["weight"] * scale, bias=shift, act=self.act,
                                  alpha=self.alpha, **slot_args)
            self.cache = ("folded", y if out is None else out, slot, True, scale)
            return y
        if self.bn is not None and self.bn.trains_statistics(True) and epilogue_ok:
            # Batch statistics (training from scratch, --bn train): normalisation and activation in one pass,
            # written straight into the slot; BN's backward takes the activation's derivative from the output.
            y = self.bn.forward(self.conv.forward(x, True), True, act=self.act, alpha=self.alpha, **slot_args)
            self.cache = ("bn", None, slot, True, None)
            return y
        if (self.act != act_k.ACT_NONE and self.bn is None and from_output
                and (out is None or isinstance(self.conv, Conv2d))):
            # the activation in the conv's epilogue (one pass fewer), written straight into the slot
            y = self.conv.forward(x, True, act=self.act, alpha=self.alpha, **slot_args)
            self.cache = ("output", y if out is None else out, slot, True, None)
            return y
        z = self.conv.forward(x, True)
        if self.bn is not None:
            z = self.bn.forward(z, True)
        if self.act == act_k.ACT_NONE:
            y, self.cache = z, ("none", None, slot, False, None)
        else:
            y = act_k.activation_forward(z, self.act, self.alpha)
            self.cache = ("output", y, slot, False, None) if from_output else ("input", z, slot, False, None)
        return y if out is None else _into(out, col0, y)

    def backward(self, dy):
        (kind, t, slot, whole, scale), self.cache = self.cache, None
        if kind == "bn":
            return self.conv.backward(self.bn.backward(dy))
        if kind == "folded":
            if self.act != act_k.ACT_NONE:
                dz = act_k.activation_backward_from_output_channels(dy, t, slot or 0, self.out_ch, self.act,
                                                                    self.alpha)
            else:
                dz = dy if slot is None else np.ascontiguousarray(dy[..., slot:slot + self.out_ch])
            dx = self.conv.backward(dz)
            if "weight" in self.conv.grads and not self.conv.frozen:
                self.conv.grads["weight"] = self.conv.grads["weight"] * scale  # d(w * scale)/dw
            return dx
        if kind == "output" and self.bn is None and "bias" in self.conv.params and isinstance(self.conv, Conv2d):
            # the activation's derivative and the bias gradient in one pass (t: y, or the concatenation
            # holding y in channels slot..; the slot read in place)
            if whole or slot is None:
                dz, db = act_k.activation_backward_from_output_and_sum(dy, t, self.act, self.alpha, slot or 0,
                                                                       self.out_ch)
            else:
                dz, db = act_k.activation_backward_from_output_and_sum(
                    np.ascontiguousarray(dy[..., slot:slot + self.out_ch]), t, self.act, self.alpha)
            return self.conv.backward(dz, db)
        if whole and slot is not None:  # t is the whole concatenation: the slot's gradient in one pass
            dy = act_k.activation_backward_from_output_channels(dy, t, slot, self.out_ch, self.act, self.alpha)
        else:
            if slot is not None:
                dy = np.ascontiguousarray(dy[..., slot:slot + self.out_ch])
            if kind == "output":  # y is the next layer's input: kept anyway, and no exponential here
                dy = act_k.activation_backward_from_output(dy, t, self.act, self.alpha)
            elif kind == "input":
                dy = act_k.activation_backward(dy, t, self.act, self.alpha)
        if self.bn is not None:
            dy = self.bn.backward(dy)
        return self.conv.backward(dy)

    def output_shape(self, in_shape):
        return self.conv.output_shape(in_shape)

    def macs(self, in_shape, out_shape):
        return self.conv.macs(in_shape, out_shape)

    def __repr__(self):
        bn = "+BN" if self.bn is not None else ""
        return f"ConvBNAct({self.conv!r}{bn}, act={self.act_name!r})"


def _into(out, col0, y):
    """Copy y (N,H,W,O) into channels col0.. of out (N,H,W,C_total); returns that view."""
    view = out[..., col0:col0 + y.shape[3]]
    view[...] = y
    return view


def conv_bn_act(in_ch, out_ch, kernel, stride=1, padding="torch", act="none", bn=True, bn_eps=1e-5,
                bn_momentum=0.1, depthwise=False, alpha=1.0, rng=None):
    """Build a ConvBNAct; with ``bn=False`` the conv has a bias instead of a batch norm."""
    if depthwise:
        if in_ch != out_ch:
            raise ValueError(f"depthwise conv needs in_ch == out_ch, got {in_ch} and {out_ch}")
        conv = DepthwiseConv2d(in_ch, kernel, stride, padding, bias=not bn, rng=rng)
    else:
        conv = Conv2d(in_ch, out_ch, kernel, stride, padding, bias=not bn, rng=rng)
    norm = BatchNorm(out_ch, eps=bn_eps, momentum=bn_momentum) if bn else None
    return ConvBNAct(conv, norm, act, alpha)


class SqueezeExcite(Layer):
    """Channel attention (MobileNetV3): s = hsigmoid(W2 relu(W1 mean_hw(x) + b1) + b2); y = x * s.

    fc1 weight (C,S), fc2 weight (S,C) — 1x1 convs on a 1x1 map are dense layers.
    x (N,H,W,C) -> y (N,H,W,C)
    """

    is_unit = True

    def __init__(self, channels, squeeze_channels, gate="hard_sigmoid", rng=None):
        super().__init__()
        self.channels, self.squeeze_channels = int(channels), int(squeeze_channels)
        self.fc1 = Dense(channels, squeeze_channels, act="relu", rng=rng)
        self.fc2 = Dense(squeeze_channels, channels, act=gate, rng=rng)

    def children(self):
        return [("fc1", self.fc1), ("fc2", self.fc2)]

    def forward(self, x, training=False):
        check_nhwc(x, self.name, self.channels)
        pooled = pool_k.global_avg_pool_forward(x)
        s = self.fc2.forward(self.fc1.forward(pooled, training), training)
        if training:
            self.cache = (x, s)
        return combine_k.scale_channels_forward(x, s)

    def backward(self, dy):
        (x, s), self.cache = self.cache, None
        dx, ds = combine_k.scale_channels_backward(dy, x, s)
        dpooled = self.fc1.backward(self.fc2.backward(ds))
        return dx + pool_k.global_avg_pool_backward(dpooled, x.shape)

    def macs(self, in_shape, out_shape):
        return 2 * self.channels * self.squeeze_channels


class InvertedResidual(Layer):
    """MobileNetV2/V3 bottleneck: expand (1x1) -> depthwise (KxK, stride) -> [SE] -> project (1x1, linear).

    The residual is added when stride is 1 and the channel count is unchanged.
    x (N,H,W,C_in) -> y (N,H',W',C_out)
    """

    def __init__(self, in_ch, out_ch, expanded, kernel, stride, act, se_channels=0, padding="torch",
                 bn=True, bn_eps=1e-5, bn_momentum=0.1, alpha=1.0, rng=None):
        super().__init__()
        norm = dict(bn=bn, bn_eps=bn_eps, bn_momentum=bn_momentum, rng=rng)
        self.in_ch, self.out_ch = in_ch, out_ch
        self.expand = (conv_bn_act(in_ch, expanded, 1, act=act, alpha=alpha, **norm)
                       if expanded != in_ch else None)
        self.dw = conv_bn_act(expanded, expanded, kernel, stride, padding, act=act, alpha=alpha, depthwise=True, **norm)
        self.se = SqueezeExcite(expanded, se_channels, rng=rng) if se_channels else None
        self.project = conv_bn_act(expanded, out_ch, 1, act="none", **norm)
        self.use_residual = stride == 1 and in_ch == out_ch

    def children(self):
        names = [("expand", self.expand), ("dw", self.dw), ("se", self.se), ("project", self.project)]
        return [(n, layer) for n, layer in names if layer is not None]

    def forward(self, x, training=False):
        y = x
        for _, layer in self.children():
            y = layer.forward(y, training)
        return y + x if self.use_residual else y

    def backward(self, dy):
        dx = dy
        for _, layer in reversed(self.children()):
            dx = layer.backward(dx)
        return dx + dy if self.use_residual else dx


class Fire(Layer):
    """SqueezeNet Fire module: squeeze 1x1 -> concat(expand 1x1, expand 3x3).

    Options from seed 001: ``bn=True`` puts batch norm after the squeeze conv,
    ``act="elu"`` replaces ReLU; ``bypass=True`` adds the identity skip (needs
    in_ch == e1 + e3). x (N,H,W,C) -> y (N,H,W,e1+e3)
    """

    def __init__(self, in_ch, squeeze, e1, e3, act="relu", bn=False, bypass=False, alpha=1.0, padding="torch",
                 rng=None):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, e1 + e3
        if bypass and in_ch != e1 + e3:
            raise ValueError(f"a simple bypass needs in_ch == e1 + e3, got {in_ch} and {e1 + e3}")
        self.squeeze = conv_bn_act(in_ch, squeeze, 1, act=act, bn=bn, alpha=alpha, rng=rng)
        self.expand1x1 = conv_bn_act(squeeze, e1, 1, act=act, bn=False, alpha=alpha, rng=rng)
        self.expand3x3 = conv_bn_act(squeeze, e3, 3, 1, padding, act=act, bn=False, alpha=alpha, rng=rng)
        self.bypass = bypass
        # Without the bypass x reaches the squeeze conv only, so a Fire that starts the trained part (SqueezeNet's
        # last-Fire fine-tune) can skip the squeeze's input gradient (a GEMM nobody reads); with it, never.
        self.first_child_takes_input = not bypass

    def children(self):
        return [("squeeze", self.squeeze), ("expand1x1", self.expand1x1), ("expand3x3", self.expand3x3)]

    def forward(self, x, training=False):
        s = self.squeeze.forward(x, training)
        # Both expand units write their slot of one output: no concatenation pass (a serial NumPy copy of the
        # whole output: 0.2 s of seed 001's 1.7 s validation pass), and backward reads each slot's gradient
        # straight from dy (no split copies).
        y = _reuse.empty(s.shape[:3] + (self.out_ch,), s.dtype)
        self.expand1x1.forward(s, training, out=y, col0=0)
        self.expand3x3.forward(s, training, out=y, col0=self.expand1x1.out_ch)
        return y + x if self.bypass else y

    def backward(self, dy):
        dy = np.ascontiguousarray(dy)
        ds = self.expand1x1.backward(dy) + self.expand3x3.backward(dy)  # each takes the whole output's gradient
        dx = self.squeeze.backward(ds)
        return dx + dy if self.bypass else dx


def make_divisible(value, divisor=8, min_value=None):
    """Round channels to a multiple of `divisor`, never dropping more than 10% (MobileNet's rule)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


__all__ = ["ConvBNAct", "conv_bn_act", "SqueezeExcite", "InvertedResidual", "Fire", "make_divisible"]
