"""SqueezeNet 1.0 / 1.1 (Iandola et al. 2016) and seed 001's variants, as Fire tables.

A layout is a sequence of steps: the stem conv, max-pools (3x3, stride 2,
ceil mode as Caffe and torchvision use) and Fire modules
(squeeze, expand 1x1, expand 3x3). Sizes at 224 (227 for Caffe/seed 001):

    1.0: conv1 7x7/2 96 -> pool -> fire2 fire3 fire4 -> pool -> fire5..fire8 -> pool -> fire9     (13x13)
    1.1: conv1 3x3/2 64 -> pool -> fire2 fire3 -> pool -> fire4 fire5 -> pool -> fire6..fire9     (13x13 / 14x14)

Head (classic): dropout -> 1x1 conv to the classes + ReLU -> global average pool.
The Caffe release of 1.0 (Deep Compression) pads that last conv by 1, so it
averages a 15x15 map whose border is ReLU(bias): ``variant="caffe"``.

Seed 001 options: ``fire="bn_elu"`` (batch norm after the squeeze conv, ELU
everywhere), ``bypass="simple"`` (identity skips around fire3, fire5, fire7, fire9),
and `covid_squeezenet`, the paper's proposed network.
"""

from typing import NamedTuple

import numpy as np

from lightcnn.kernels import activation as act_k
from lightcnn.kernels import combine as combine_k
from lightcnn.layers.base import Layer, Sequential
from lightcnn.layers.basic import ConvTranspose2d, Dense, Dropout, GlobalAvgPool, MaxPool2d
from lightcnn.layers.blocks import Fire, conv_bn_act
from lightcnn.models.base import Model


class FireSpec(NamedTuple):
    squeeze: int
    expand1x1: int
    expand3x3: int


POOL = "pool"
FIRE = {  # (squeeze, expand 1x1, expand 3x3), the same in 1.0 and 1.1
    "fire2": FireSpec(16, 64, 64),
    "fire3": FireSpec(16, 64, 64),
    "fire4": FireSpec(32, 128, 128),
    "fire5": FireSpec(32, 128, 128),
    "fire6": FireSpec(48, 192, 192),
    "fire7": FireSpec(48, 192, 192),
    "fire8": FireSpec(64, 256, 256),
    "fire9": FireSpec(64, 256, 256),
}
LAYOUT = {
    #        stem (filters, kernel), then the steps in order
    "1_0": ((96, 7), ("pool", "fire2", "fire3", "fire4", "pool", "fire5", "fire6", "fire7", "fire8", "pool", "fire9")),
    "1_1": ((64, 3), ("pool", "fire2", "fire3", "pool", "fire4", "fire5", "pool", "fire6", "fire7", "fire8", "fire9")),
}
SIMPLE_BYPASS = ("fire3", "fire5", "fire7", "fire9")


def _trunk(version, in_channels, fire, bypass, rng):
    (stem_ch, stem_k), steps = LAYOUT[version]
    act = "elu" if fire == "bn_elu" else "relu"
    features = Sequential()
    features.append("conv1", conv_bn_act(in_channels, stem_ch, stem_k, 2, "valid", act=act, bn=False, rng=rng))
    in_ch, pools = stem_ch, 0
    for step in steps:
        if step == POOL:
            pools += 1
            features.append(f"pool{pools}", MaxPool2d(3, 2, 0, ceil_mode=True))
            continue
        spec = FIRE[step]
        features.append(step, Fire(in_ch, spec.squeeze, spec.expand1x1, spec.expand3x3, act=act,
                                   bn=(fire == "bn_elu"), bypass=(bypass == "simple" and step in SIMPLE_BYPASS),
                                   rng=rng))
        in_ch = spec.expand1x1 + spec.expand3x3
    features.out_ch = in_ch
    return features


def _squeezenet(version, num_classes, variant, fire, bypass, dropout, in_channels, seed):
    if fire not in ("classic", "bn_elu"):
        raise ValueError(f"fire must be 'classic' or 'bn_elu', got {fire!r}")
    if bypass not in (None, "simple"):
        raise ValueError(f"bypass must be None or 'simple', got {bypass!r}")
    rng = np.random.default_rng(seed)
    features = _trunk(version, in_channels, fire, bypass, rng)
    act = "elu" if fire == "bn_elu" else "relu"
    final_pad = 1 if variant == "caffe" else 0
    head = Sequential([("dropout", Dropout(dropout, seed)),
                       ("classifier", conv_bn_act(features.out_ch, num_classes, 1, 1, final_pad, act=act, bn=False,
                                                  rng=rng)),
                       ("pool", GlobalAvgPool())])
    head.out_features = num_classes
    size = 227 if variant == "caffe" else 224
    config = dict(num_classes=num_classes, variant=variant, fire=fire, bypass=bypass, dropout=dropout,
                  in_channels=in_channels)
    arch = f"squeezenet{version}"
    return Model(arch, config, features, head, (size, size, in_channels), cam_layer="features")


def squeezenet1_0(num_classes=1000, variant="torchvision", fire="classic", bypass=None, dropout=0.5, in_channels=3,
                  seed=0):
    """SqueezeNet 1.0; ``variant="caffe"`` pads the final 1x1 conv by 1 (the Deep-Compression release)."""
    return _squeezenet("1_0", num_classes, variant, fire, bypass, dropout, in_channels, seed)


def squeezenet1_1(num_classes=1000, variant="torchvision", fire="classic", bypass=None, dropout=0.5, in_channels=3,
                  seed=0):
    """SqueezeNet 1.1: 2.4x less computation than 1.0 at the same accuracy."""
    return _squeezenet("1_1", num_classes, variant, fire, bypass, dropout, in_channels, seed)


class CovidSqueezeFeatures(Layer):
    """Seed 001's trunk: SqueezeNet 1.1 (BN+ELU Fire, no bypass) plus a 4x transpose-conv skip.

        x (N,227,227,1) -> fire2 (N,56,56,128) ... fire9 (N,14,14,512)
        up   = ELU(transpose conv 4x4 stride 4 (fire9))          (N,56,56,128)
        cat  = concat(up, fire2)                                 (N,56,56,256)
        y    = ELU(1x1 conv 128 (cat))  "weighted sum of channels" (N,56,56,128)

    When rounding makes the upsampled map differ from fire2's size (inputs
    other than 227), `up` is cropped at the bottom/right or zero-padded there to
    fire2's size; the gradient follows the same crop/pad.
    """

    first_child_takes_input = True  # x reaches `early` only; the skip joins after it

    def __init__(self, in_channels, rng):
        super().__init__()
        trunk = _trunk("1_1", in_channels, "bn_elu", None, rng)
        names = [n for n, _ in trunk.layers]
        split = names.index("fire2") + 1
        self.early = Sequential(trunk.layers[:split])
        self.late = Sequential(trunk.layers[split:])
        self.upsample = _TransposeAct(512, 128, rng)
        self.fuse = conv_bn_act(256, 128, 1, act="elu", bn=False, rng=rng)
        self.out_ch = 128

    def children(self):
        return [("early", self.early), ("late", self.late), ("upsample", self.upsample), ("fuse", self.fuse)]

    def forward(self, x, training=False):
        skip = self.early.forward(x, training)
        up = self.upsample.forward(self.late.forward(skip, training), training)
        cat = combine_k.concat_fitted(up, skip)  # up cropped or zero-padded to the skip's H x W
        if training:  # cat holds `up` itself when no crop/pad was needed: its backward reads it there
            self.cache = (up.shape, skip.shape[3], cat if up.shape[1:3] == skip.shape[1:3] else None)
        return self.fuse.forward(cat, training)

    def lower_inference(self, plan, x, name):
        """The same graph for an inference plan (lightcnn.layers.plan): concat by writing both parts into one buffer."""
        skip = plan.lower(self.early, x, f"{name}.early")
        plan.hold(skip)  # read again after the upsampling branch
        up = plan.lower(self.upsample, plan.lower(self.late, skip, f"{name}.late"), f"{name}.upsample")
        n, h, w, skip_ch = skip.shape
        cat = plan.new((n, h, w, up.shape[3] + skip_ch))
        plan.step("place", f"{name}.concat", dict(x=up, y=cat), col0=0)
        plan.step("place", f"{name}.concat", dict(x=skip, y=cat), col0=up.shape[3])
        plan.release(up)
        plan.release(skip)
        return plan.lower(self.fuse, cat, f"{name}.fuse")

    def backward(self, dy):
        (up_shape, skip_ch, cat), self.cache = self.cache, None
        dcat = self.fuse.backward(dy)
        up_ch = dcat.shape[3] - skip_ch
        if cat is not None:  # the upsampling's gradient straight from its slot of dcat and cat: no split copies
            dlate = self.upsample.backward_from_slot(dcat, cat, 0)
        else:
            dlate = self.upsample.backward(combine_k.concat_fitted_grad_a(dcat, up_shape))
        return self.early.backward(combine_k.concat_fitted_grad_b(dcat, up_ch, self.late.backward(dlate)))


class _TransposeAct(Layer):
    """Transpose conv (k=4, s=4) followed by ELU; a unit in summaries."""

    is_unit = True

    def __init__(self, in_ch, out_ch, rng):
        super().__init__()
        from lightcnn.layers.basic import Activation

        self.tconv = ConvTranspose2d(in_ch, out_ch, 4, 4, rng=rng)
        self.act = Activation("elu")
        self.in_ch, self.out_ch = in_ch, out_ch

    def children(self):
        return [("tconv", self.tconv)]

    def forward(self, x, training=False):
        """The ELU in the transpose conv's epilogue; backward takes its derivative from the output."""
        y = self.tconv.forward(x, training, act=self.act.code, alpha=self.act.alpha)
        if training:
            self.cache = y
        return y

    def lower_inference(self, plan, x, name):
        """One transpose_conv step of an inference plan, the ELU in its epilogue."""
        t = self.tconv
        n, h, w, _ = x.shape
        (kh, kw), (sh, sw) = t.kernel, t.stride
        top, bottom, left, right = t.padding
        ho = (h - 1) * sh - top - bottom + kh + t.output_padding[0]
        wo = (w - 1) * sw - left - right + kw + t.output_padding[1]
        y = plan.new((n, ho, wo, t.out_ch))
        plan.step("transpose_conv", name, dict(x=x, y=y),
                  weights=lambda: (t.params["weight"], t.params.get("bias")), stride=(sh, sw), pads=t.padding,
                  output_padding=t.output_padding, act=int(self.act.code), alpha=np.float32(self.act.alpha))
        plan.release(x)
        return y

    def backward(self, dy):
        y, self.cache = self.cache, None
        return self.backward_from_slot(dy, y, 0)

    def backward_from_slot(self, dcat, cat, col0):
        """backward() given a channel concatenation `cat` (N,H,W,C_total) whose channels col0.. hold this
        unit's output, and its gradient dcat: the slot is read in place, not copied out first, and the
        bias gradient is summed in the same pass."""
        self.cache = None
        dz, db = act_k.activation_backward_from_output_and_sum(dcat, cat, self.act.code, self.act.alpha, col0,
                                                               self.out_ch)
        return self.tconv.backward(dz, db if "bias" in self.tconv.params else None)

    def macs(self, in_shape, out_shape):
        return self.tconv.macs(in_shape, out_shape)


def covid_squeezenet(num_classes=2, in_channels=1, dropout=0.0, seed=0):
    """Seed 001's proposed network: BN+ELU SqueezeNet 1.1 trunk, 4x transpose-conv skip, GAP, dense softmax."""
    rng = np.random.default_rng(seed)
    features = CovidSqueezeFeatures(in_channels, rng)
    layers = [("pool", GlobalAvgPool())]
    if dropout:
        layers.append(("dropout", Dropout(dropout, seed)))
    layers.append(("classifier", Dense(128, num_classes, rng=rng, init="glorot")))
    config = dict(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
    return Model("covid_squeezenet", config, features, Sequential(layers), (227, 227, in_channels),
                 cam_layer="features.fuse")
