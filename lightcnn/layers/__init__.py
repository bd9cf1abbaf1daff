"""Layers: objects holding named parameters and a training-only cache; they call kernels."""

from lightcnn.layers.base import Layer, Sequential, check_nhwc
from lightcnn.layers.basic import (Activation, AvgPool2d, BatchNorm, Conv2d, ConvTranspose2d, Dense, DepthwiseConv2d,
                                   Dropout, Flatten, GlobalAvgPool, MaxPool2d)
from lightcnn.layers.blocks import ConvBNAct, Fire, InvertedResidual, SqueezeExcite, conv_bn_act, make_divisible

__all__ = ["Layer", "Sequential", "check_nhwc", "Activation", "AvgPool2d", "BatchNorm", "Conv2d", "ConvTranspose2d",
           "Dense", "DepthwiseConv2d", "Dropout", "Flatten", "GlobalAvgPool", "MaxPool2d", "ConvBNAct", "Fire",
           "InvertedResidual", "SqueezeExcite", "conv_bn_act", "make_divisible"]
