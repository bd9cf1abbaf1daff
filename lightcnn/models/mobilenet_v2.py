"""MobileNetV2 (Sandler et al. 2018) as a table of inverted-residual stages.

    stem   3x3 conv, 32, stride 2            224 -> 112
    stages the table below (t = expansion, c = output channels, n = repeats, s = first stride)
    last   1x1 conv, 1280                    7x7 at 224
    head   global average pool -> dropout -> dense

Variants: ``activation="elu"`` is seed 000's chest-CT network (ELU instead of
ReLU6 in the bottlenecks); ``padding="tf"`` reproduces TensorFlow/Keras SAME
padding for their converted weights; ``bn=False`` holds weights whose batch norm
was folded into the convs (TFLite files). ``head="dense"`` is seed 003's
64-64-64-32-32 dense stack.
"""

from typing import NamedTuple

from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import Dense, Dropout, GlobalAvgPool
from lightcnn.layers.blocks import InvertedResidual, conv_bn_act, make_divisible
from lightcnn.models.base import Model


class Stage(NamedTuple):
    expand: int    # t: expansion factor of the first 1x1 conv
    out_ch: int    # c: output channels (before width multiplier)
    repeats: int   # n: blocks in the stage
    stride: int    # s: stride of the first block


INVERTED_RESIDUAL = (
    #     t,   c, n, s          output at 224
    Stage(1,  16, 1, 1),      # 112x112
    Stage(6,  24, 2, 2),      # 56x56
    Stage(6,  32, 3, 2),      # 28x28
    Stage(6,  64, 4, 2),      # 14x14
    Stage(6,  96, 3, 1),      # 14x14
    Stage(6, 160, 3, 2),      # 7x7
    Stage(6, 320, 1, 1),      # 7x7
)

DENSE_STACK = (64, 64, 64, 32, 32)  # seed 003's head


def mobilenet_v2(num_classes=1000, width_mult=1.0, activation="relu6", padding="torch", bn=True, bn_eps=1e-5,
                 dropout=0.2, in_channels=3, head="linear", seed=0):
    """Build MobileNetV2. Parameter names: features.stem, features.blocks.<i>.{expand,dw,project}, features.last,
    head.classifier."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pad = "same" if padding == "tf" else "torch"
    norm = dict(bn=bn, bn_eps=bn_eps, rng=rng)
    stem_ch = make_divisible(32 * width_mult)
    last_ch = make_divisible(1280 * max(1.0, width_mult))

    features = Sequential()
    features.append("stem", conv_bn_act(in_channels, stem_ch, 3, 2, pad, act=activation, **norm))
    blocks = features.append("blocks", Sequential())
    in_ch = stem_ch
    for stage in INVERTED_RESIDUAL:
        out_ch = make_divisible(stage.out_ch * width_mult)
        for i in range(stage.repeats):
            blocks.append(str(len(blocks)), InvertedResidual(
                in_ch, out_ch, in_ch * stage.expand, 3, stage.stride if i == 0 else 1, activation,
                padding=pad, **norm))
            in_ch = out_ch
    features.append("last", conv_bn_act(in_ch, last_ch, 1, act=activation, **norm))
    features.out_ch = last_ch

    config = dict(num_classes=num_classes, width_mult=width_mult, activation=activation, padding=padding, bn=bn,
                  bn_eps=bn_eps, dropout=dropout, in_channels=in_channels, head=head)
    if head == "dense":
        head_net = None
    else:
        head_net = Sequential([("pool", GlobalAvgPool()), ("dropout", Dropout(dropout, seed)),
                               ("classifier", Dense(last_ch, num_classes, rng=rng, init="glorot"))])
    model = Model("mobilenet_v2", config, features, head_net, (224, 224, in_channels), cam_layer="features.last")
    if head == "dense":
        model.reset_head(num_classes, hidden=DENSE_STACK, dropout=dropout, hidden_dropout=dropout, seed=seed)
        model.config.pop("head")
        model.config["head"] = "dense"
    return model


def mobilenet_v2_dense(num_classes=2, dropout=0.2, head="dense", **kwargs):
    """Seed 003: MobileNetV2 features, GAP, dropout, dense 64-64-64-32-32 (ReLU), dropout, dense softmax.

    `head` is accepted only as "dense", the value its own config records, so build(arch, **config) rebuilds it.
    """
    if head != "dense":
        raise ValueError(f"mobilenet_v2_dense: head is always 'dense', got {head!r}")
    model = mobilenet_v2(num_classes=num_classes, dropout=dropout, head="dense", **kwargs)
    model.arch = "mobilenet_v2_dense"
    return model
