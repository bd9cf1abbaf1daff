"""MobileNetV3 Large and Small (Howard et al. 2019), torchvision's configuration.

Each row of a table is one bottleneck ("bneck"): depthwise kernel, expanded
channels, output channels, squeeze-excitation, activation (RE = ReLU,
HS = hard-swish) and stride. SE squeezes to make_divisible(expanded / 4, 8)
channels and gates with hard-sigmoid; batch norm uses eps 1e-3.

    stem   3x3 conv, 16, stride 2, hard-swish
    bnecks the table
    last   1x1 conv to 6 x the last bneck's width, hard-swish
    head   global average pool -> dense (1280 / 1024) + hard-swish -> dropout -> dense
"""

from typing import NamedTuple

import numpy as np

from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import Dense, Dropout, GlobalAvgPool
from lightcnn.layers.blocks import InvertedResidual, conv_bn_act, make_divisible
from lightcnn.models.base import Model


class Bneck(NamedTuple):
    kernel: int
    expanded: int
    out_ch: int
    se: bool
    act: str     # "RE" or "HS"
    stride: int


BNECK_LARGE = (
    #     k   exp  out   se     act  s        output at 224
    Bneck(3,  16,  16, False, "RE", 1),     # 112
    Bneck(3,  64,  24, False, "RE", 2),     # 56
    Bneck(3,  72,  24, False, "RE", 1),
    Bneck(5,  72,  40, True,  "RE", 2),     # 28
    Bneck(5, 120,  40, True,  "RE", 1),
    Bneck(5, 120,  40, True,  "RE", 1),
    Bneck(3, 240,  80, False, "HS", 2),     # 14
    Bneck(3, 200,  80, False, "HS", 1),
    Bneck(3, 184,  80, False, "HS", 1),
    Bneck(3, 184,  80, False, "HS", 1),
    Bneck(3, 480, 112, True,  "HS", 1),
    Bneck(3, 672, 112, True,  "HS", 1),
    Bneck(5, 672, 160, True,  "HS", 2),     # 7
    Bneck(5, 960, 160, True,  "HS", 1),
    Bneck(5, 960, 160, True,  "HS", 1),
)

BNECK_SMALL = (
    Bneck(3,  16,  16, True,  "RE", 2),     # 56
    Bneck(3,  72,  24, False, "RE", 2),     # 28
    Bneck(3,  88,  24, False, "RE", 1),
    Bneck(5,  96,  40, True,  "HS", 2),     # 14
    Bneck(5, 240,  40, True,  "HS", 1),
    Bneck(5, 240,  40, True,  "HS", 1),
    Bneck(5, 120,  48, True,  "HS", 1),
    Bneck(5, 144,  48, True,  "HS", 1),
    Bneck(5, 288,  96, True,  "HS", 2),     # 7
    Bneck(5, 576,  96, True,  "HS", 1),
    Bneck(5, 576,  96, True,  "HS", 1),
)

ACT = {"RE": "relu", "HS": "hard_swish"}


def _mobilenet_v3(arch, table, head_ch, num_classes, padding, bn, bn_eps, dropout, in_channels, seed):
    rng = np.random.default_rng(seed)
    pad = "same" if padding == "tf" else "torch"
    norm = dict(bn=bn, bn_eps=bn_eps, bn_momentum=0.01, rng=rng)
    features = Sequential()
    features.append("stem", conv_bn_act(in_channels, 16, 3, 2, pad, act="hard_swish", **norm))
    blocks = features.append("blocks", Sequential())
    in_ch = 16
    for row in table:
        se = make_divisible(row.expanded // 4, 8) if row.se else 0
        blocks.append(str(len(blocks)), InvertedResidual(in_ch, row.out_ch, row.expanded, row.kernel, row.stride,
                                                         ACT[row.act], se_channels=se, padding=pad, **norm))
        in_ch = row.out_ch
    last_ch = 6 * in_ch
    features.append("last", conv_bn_act(in_ch, last_ch, 1, act="hard_swish", **norm))
    features.out_ch = last_ch
    head = Sequential([("pool", GlobalAvgPool()),
                       ("hidden", Dense(last_ch, head_ch, act="hard_swish", rng=rng)),
                       ("dropout", Dropout(dropout, seed)),
                       ("classifier", Dense(head_ch, num_classes, rng=rng, init="glorot"))])
    config = dict(num_classes=num_classes, padding=padding, bn=bn, bn_eps=bn_eps, dropout=dropout,
                  in_channels=in_channels)
    return Model(arch, config, features, head, (224, 224, in_channels), cam_layer="features.last")


def mobilenet_v3_large(num_classes=1000, padding="torch", bn=True, bn_eps=1e-3, dropout=0.2, in_channels=3, seed=0):
    return _mobilenet_v3("mobilenet_v3_large", BNECK_LARGE, 1280, num_classes, padding, bn, bn_eps, dropout,
                         in_channels, seed)


def mobilenet_v3_small(num_classes=1000, padding="torch", bn=True, bn_eps=1e-3, dropout=0.2, in_channels=3, seed=0):
    return _mobilenet_v3("mobilenet_v3_small", BNECK_SMALL, 1024, num_classes, padding, bn, bn_eps, dropout,
                         in_channels, seed)
