"""Export a lightcnn Model to an ONNX graph (inference only), using the `onnx` package.

    python -m lightcnn.export_onnx --model mobilenet_v2 --out mobilenet_v2.onnx     # registered weights
    python -m lightcnn.export_onnx --weights runs/ct/best.h5 --out ct.onnx          # any lightcnn .h5
    python -m lightcnn.export_onnx --model mobilenet_v2_dense --random-weights --out r.onnx   # architecture only

``--model NAME`` means the registered weights, found as predict finds them (lightcnn.weights.find_weights,
never downloaded); random weights only with ``--random-weights``. The exported network is the float one
(no simulated activation quantisation, see lightcnn.quantsim). Exit codes: 0 written, 1 the weights or
the onnx package are missing or the export failed, 2 usage error; failures are one line.

Metadata
--------
The graph carries what it takes to use it as ONNX ``metadata_props``, each value a JSON string: ``arch``,
and from a weight file ``model``, ``class_names``, ``class_ids`` (WordNet IDs or null), ``preprocessing``
(lightcnn.preprocess.Preprocessing.to_dict(): how an image becomes the ``input`` tensor) and ``weights_sha256``.

Graph layout
------------
The graph input ``input`` is NHWC (N, H, W, C) float32, exactly what ``Model.forward``
takes; the first node transposes it to NCHW, the layout ONNX operators are defined in,
and every layer after that is a standard NCHW operator.  The output ``logits`` is (N, K).
The batch axis is symbolic ("N"); H and W are fixed at export time because padding
rules such as TensorFlow "SAME" depend on the input size.

What each layer becomes (weights are transposed once, here):
  ConvBNAct / Conv2d     Conv (HWIO -> OIHW), batch norm folded into weight and bias,
                         then the activation node
  DepthwiseConv2d        Conv with group = C, weight (KH,KW,C) -> (C,1,KH,KW)
  ConvTranspose2d        ConvTranspose, weight (KH,KW,Ci,Co) -> (Ci,Co,KH,KW)
  Dense                  Gemm (B = weight (F,O)); inside squeeze-excitation a 1x1 Conv
  pools                  MaxPool / AveragePool / GlobalAveragePool (+ Flatten)
  blocks                 Add (residuals), Concat (Fire), Mul (squeeze-excitation)
  Dropout                nothing (inference)
Activations: Relu, Clip(0, 6), Elu, Sigmoid, HardSigmoid(1/6, 1/2), HardSwish (opset 14+).

Used by bench/compare_runtimes.py to run the very same weights in ONNX Runtime.  `onnx`
is an optional dependency (``pip install "lightcnn[compare]"``); importing this module
without it works, exporting raises ImportError naming the package (the CLI prints it as one line).
"""

import argparse
import json
import sys

import numpy as np

from lightcnn.kernels import activation as act_k
from lightcnn.kernels.shapes import conv_output_size, transpose_output_size
from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import (Activation, AvgPool2d, BatchNorm, Conv2d, ConvTranspose2d, Dense,
                                   DepthwiseConv2d, Dropout, Flatten, GlobalAvgPool, MaxPool2d, resolve_padding)
from lightcnn.layers.blocks import ConvBNAct, Fire, InvertedResidual, SqueezeExcite

OPSET = 17
IR_VERSION = 8  # the oldest IR that carries opset 17; accepted by every ONNX Runtime since 1.13


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the 'onnx' package: pip install \"lightcnn[compare]\" "
                          "(or pip install onnx)") from None
    import onnx

    return onnx


class _Graph:
    """Accumulates nodes and initializers; tensors get short unique names, prefixed with the lightcnn path
    of the unit that emits them ("features.blocks.3.project/conv_41"), so ONNX Runtime's profile can be
    matched to lightcnn's layers (bench/compare_layers.py)."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.inits, self._count = [], [], 0
        self.scope = ""

    def name(self, hint):
        self._count += 1
        return f"{self.scope}/{hint}_{self._count}" if self.scope else f"{hint}_{self._count}"

    def const(self, array, hint):
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


class _T:
    """A tensor in the graph: its name and lightcnn-side shape, (h, w, c) spatial or (f,) flat."""

    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)

    @property
    def spatial(self):
        return len(self.shape) == 3


def _act(g, t, code, alpha=1.0):
    if code == act_k.ACT_NONE:
        return t
    if code == act_k.ACT_RELU:
        return _T(g.op("Relu", [t.name]), t.shape)
    if code == act_k.ACT_RELU6:
        lo, hi = g.const(np.array(0, np.float32), "zero"), g.const(np.array(6, np.float32), "six")
        return _T(g.op("Clip", [t.name, lo, hi], "relu6"), t.shape)
    if code == act_k.ACT_ELU:
        return _T(g.op("Elu", [t.name], alpha=float(alpha)), t.shape)
    if code == act_k.ACT_SIGMOID:
        return _T(g.op("Sigmoid", [t.name]), t.shape)
    if code == act_k.ACT_HARD_SIGMOID:  # PyTorch's relu6(v + 3) / 6
        return _T(g.op("HardSigmoid", [t.name], alpha=1.0 / 6.0, beta=0.5), t.shape)
    if code == act_k.ACT_HARD_SWISH:
        return _T(g.op("HardSwish", [t.name]), t.shape)
    raise ValueError(f"export_onnx: no ONNX equivalent for activation code {code}")


def _onnx_pads(pads):
    top, bottom, left, right = pads
    return [top, left, bottom, right]  # ONNX: all begins, then all ends


def _conv(g, t, conv, weight, bias, act, alpha):
    """Conv2d or DepthwiseConv2d with explicit weight/bias (possibly BN-folded)."""
    h, w, c = t.shape
    pads = conv.pads(h, w)
    kh, kw = conv.kernel
    sh, sw = conv.stride
    ho = conv_output_size(h, kh, sh, pads[0], pads[1])
    wo = conv_output_size(w, kw, sw, pads[2], pads[3])
    weight = np.asarray(weight, np.float32)
    if isinstance(conv, DepthwiseConv2d):
        w_oihw, group = weight.transpose(2, 0, 1)[:, None, :, :], c
    else:
        w_oihw, group = weight.transpose(3, 2, 0, 1), 1
    inputs = [t.name, g.const(w_oihw, "w")]
    if bias is not None:
        inputs.append(g.const(np.asarray(bias, np.float32), "b"))
    y = g.op("Conv", inputs, "conv", kernel_shape=[kh, kw], strides=[sh, sw], pads=_onnx_pads(pads), group=group)
    return _act(g, _T(y, (ho, wo, conv.out_ch)), act, alpha)


def _flat(g, t):
    return t if not t.spatial else _T(g.op("Flatten", [t.name], axis=1), (int(np.prod(t.shape)),))


def _dense(g, t, layer, as_conv=False):
    w = np.asarray(layer.params["weight"], np.float32)
    b = layer.params.get("bias")
    if as_conv:  # on an (N,F,1,1) map: a 1x1 conv keeps the tensor 4-D for the SE's Mul
        inputs = [t.name, g.const(w.T[:, :, None, None], "w")]
        if b is not None:
            inputs.append(g.const(np.asarray(b, np.float32), "b"))
        y = _T(g.op("Conv", inputs, "fc", kernel_shape=[1, 1]), (1, 1, layer.out_features))
    else:
        t = _flat(g, t)
        bias = np.zeros(layer.out_features, np.float32) if b is None else np.asarray(b, np.float32)
        y = _T(g.op("Gemm", [t.name, g.const(w, "w"), g.const(bias, "b")], "dense"), (layer.out_features,))
    return _act(g, y, layer.act, 1.0)


def _window(t, layer):
    h, w, c = t.shape
    pads = resolve_padding(layer.padding, h, w, *layer.kernel, *layer.stride)
    ho = conv_output_size(h, layer.kernel[0], layer.stride[0], pads[0], pads[1], layer.ceil_mode)
    wo = conv_output_size(w, layer.kernel[1], layer.stride[1], pads[2], pads[3], layer.ceil_mode)
    attrs = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride), pads=_onnx_pads(pads),
                 ceil_mode=int(layer.ceil_mode))
    return attrs, (ho, wo, c)


def _emit(g, t, layer, path=None):
    """Append the nodes of `layer` (at lightcnn path `path`) applied to tensor t; returns the output tensor."""
    if path is None:
        return _emit_unit(g, t, layer)
    outer, g.scope = g.scope, path
    try:
        if isinstance(layer, Sequential):
            for name, child in layer.children():
                t = _emit(g, t, child, f"{path}.{name}")
            return t
        if isinstance(layer, InvertedResidual):
            y = t
            for name, child in layer.children():
                y = _emit(g, y, child, f"{path}.{name}")
            g.scope = path
            return _T(g.op("Add", [y.name, t.name], "residual"), y.shape) if layer.use_residual else y
        return _emit_unit(g, t, layer)
    finally:
        g.scope = outer


def _emit_unit(g, t, layer):
    if isinstance(layer, Sequential):
        for _, child in layer.children():
            t = _emit(g, t, child)
        return t
    if isinstance(layer, ConvBNAct):
        w, b = layer.folded_weights()
        return _conv(g, t, layer.conv, w, b, layer.act, layer.alpha)
    if isinstance(layer, (Conv2d, DepthwiseConv2d)):
        return _conv(g, t, layer, layer.params["weight"], layer.params.get("bias"), act_k.ACT_NONE, 1.0)
    if isinstance(layer, InvertedResidual):
        y = t
        for _, child in layer.children():
            y = _emit(g, y, child)
        return _T(g.op("Add", [y.name, t.name], "residual"), y.shape) if layer.use_residual else y
    if isinstance(layer, SqueezeExcite):
        pooled = _T(g.op("GlobalAveragePool", [t.name], "se_pool"), (1, 1, t.shape[2]))
        s = _dense(g, _dense(g, pooled, layer.fc1, as_conv=True), layer.fc2, as_conv=True)
        return _T(g.op("Mul", [t.name, s.name], "se_scale"), t.shape)
    if isinstance(layer, Fire):
        s = _emit(g, t, layer.squeeze)
        e1, e3 = _emit(g, s, layer.expand1x1), _emit(g, s, layer.expand3x3)
        y = _T(g.op("Concat", [e1.name, e3.name], "fire_cat", axis=1), e1.shape[:2] + (layer.out_ch,))
        return _T(g.op("Add", [y.name, t.name], "bypass"), y.shape) if layer.bypass else y
    if isinstance(layer, BatchNorm):
        scale, shift = layer.folded()
        c = t.shape[-1]
        sc = g.const(np.asarray(scale, np.float32).reshape(1, c, 1, 1), "bn_scale")
        sf = g.const(np.asarray(shift, np.float32).reshape(1, c, 1, 1), "bn_shift")
        return _T(g.op("Add", [g.op("Mul", [t.name, sc]), sf], "bn"), t.shape)
    if isinstance(layer, Activation):
        return _act(g, t, layer.code, layer.alpha)
    if isinstance(layer, Dense):
        return _dense(g, t, layer)
    if isinstance(layer, GlobalAvgPool):
        return _flat(g, _T(g.op("GlobalAveragePool", [t.name], "gap"), (1, 1, t.shape[2])))
    if isinstance(layer, MaxPool2d):
        attrs, shape = _window(t, layer)
        return _T(g.op("MaxPool", [t.name], "maxpool", **attrs), shape)
    if isinstance(layer, AvgPool2d):
        attrs, shape = _window(t, layer)
        return _T(g.op("AveragePool", [t.name], "avgpool", count_include_pad=int(layer.count_include_pad),
                       **attrs), shape)
    if isinstance(layer, Dropout):
        return t
    if isinstance(layer, Flatten):
        return _flat(g, t)
    if isinstance(layer, ConvTranspose2d):
        return _conv_transpose(g, t, layer)
    emitter = _CUSTOM.get(type(layer).__name__)
    if emitter is None:
        raise NotImplementedError(f"export_onnx: no ONNX translation for layer {type(layer).__name__}")
    return emitter(g, t, layer)


def _conv_transpose(g, t, layer):
    h, w, _ = t.shape
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    pt, pb, pl, pr = layer.padding
    oph, opw = layer.output_padding
    ho = transpose_output_size(h, kh, sh, pt, pb, oph)
    wo = transpose_output_size(w, kw, sw, pl, pr, opw)
    inputs = [t.name, g.const(np.asarray(layer.params["weight"], np.float32).transpose(2, 3, 0, 1), "w")]
    if "bias" in layer.params:
        inputs.append(g.const(np.asarray(layer.params["bias"], np.float32), "b"))
    y = g.op("ConvTranspose", inputs, "tconv", kernel_shape=[kh, kw], strides=[sh, sw],
             pads=_onnx_pads(layer.padding), output_padding=[oph, opw])
    return _T(y, (ho, wo, layer.out_ch))


def _fit_spatial(g, t, height, width):
    """Crop or zero-pad at the bottom/right to (height, width), like squeezenet._fit_spatial."""
    h, w, c = t.shape
    if (h, w) == (height, width):
        return t
    name = t.name
    if h > height or w > width:
        starts, ends = g.const(np.array([0, 0], np.int64), "st"), g.const(np.array([min(h, height), min(w, width)],
                                                                                   np.int64), "en")
        name = g.op("Slice", [name, starts, ends, g.const(np.array([2, 3], np.int64), "ax")], "crop")
    ph, pw = max(0, height - h), max(0, width - w)
    if ph or pw:
        name = g.op("Pad", [name, g.const(np.array([0, 0, 0, 0, 0, 0, ph, pw], np.int64), "pads")], "pad")
    return _T(name, (height, width, c))


def _covid_features(g, t, layer):
    skip = _emit(g, t, layer.early)
    up = _emit(g, _emit(g, skip, layer.late), layer.upsample)
    up = _fit_spatial(g, up, skip.shape[0], skip.shape[1])
    cat = _T(g.op("Concat", [up.name, skip.name], "cat", axis=1), skip.shape[:2] + (up.shape[2] + skip.shape[2],))
    return _emit(g, cat, layer.fuse)


def _transpose_act(g, t, layer):
    return _act(g, _conv_transpose(g, t, layer.tconv), layer.act.code, layer.act.alpha)


# Model-specific containers whose forward is more than "children in order".
_CUSTOM = {"CovidSqueezeFeatures": _covid_features, "_TransposeAct": _transpose_act}


def export_onnx(model, path=None, input_size=None, dynamic_batch=True, metadata=None):
    """Translate `model` (a lightcnn Model) into an onnx.ModelProto; also save it when `path` is given.

    input_size: (H, W) of the exported graph (default: the model's own input_shape).
    metadata: {key: JSON-serialisable value}, stored as metadata_props with each value JSON-encoded
    (see `checkpoint_metadata`); "arch" is always added.
    The graph input ``input`` is NHWC (N, H, W, C) and transposed to NCHW inside the
    graph, so ORT is fed exactly the array lightcnn's forward takes.
    """
    onnx = _require_onnx()
    from onnx import TensorProto, helper

    h, w, c = model.input_shape
    if input_size is not None:
        h, w = (input_size, input_size) if np.isscalar(input_size) else tuple(input_size)
    g = _Graph(onnx)
    nchw = g.op("Transpose", ["input"], "nchw", perm=[0, 3, 1, 2])
    t = _emit(g, _T(nchw, (h, w, c)), model.features_net, "features")
    t = _flat(g, _emit(g, t, model.head_net, "head")) if model.head_net is not None else t
    g.nodes.append(helper.make_node("Identity", [t.name], ["logits"], name="logits"))
    batch = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        g.nodes, f"lightcnn_{model.arch}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, h, w, c])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch] + list(t.shape))],
        initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lightcnn",
                              ir_version=IR_VERSION)
    proto.doc_string = f"lightcnn {model.arch}; input NHWC float32 (N,{h},{w},{c})"
    for key, value in {"arch": model.arch, **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, str(path))
    return proto


def checkpoint_metadata(ckpt, name=None):
    """What a graph exported from `ckpt` needs to be used on its own: classes, preprocessing, provenance."""
    from lightcnn.preprocess import Preprocessing

    preprocessing = ckpt.preprocessing or Preprocessing().to_dict()  # what lightcnn.load() uses for such files
    meta = {"class_names": list(ckpt.class_names),
            "class_ids": None if ckpt.class_ids is None else list(ckpt.class_ids),
            "preprocessing": preprocessing}
    if name:
        meta["model"] = name
    if ckpt.path:
        from lightcnn.weights import sha256_of

        meta["weights_sha256"] = sha256_of(ckpt.path)
    return meta


def _random_model(name):
    """A registered name's architecture and config, or a builder name, with random weights."""
    from lightcnn.errors import LightCNNError
    from lightcnn.models import BUILDERS, build
    from lightcnn.registry import REGISTRY

    if name in REGISTRY:
        return build(REGISTRY[name].arch, **REGISTRY[name].config)
    if name in BUILDERS:
        return build(name)
    from lightcnn._cli import did_you_mean

    hint = did_you_mean(name, [*REGISTRY, *BUILDERS])
    raise LightCNNError(f"unknown model {name!r}{hint}; registered weights: {', '.join(REGISTRY)}; architectures: "
                        f"{', '.join(sorted(BUILDERS))}")


def build_parser():
    from lightcnn._cli import add_common_options, positive_int

    parser = argparse.ArgumentParser(prog="python -m lightcnn.export_onnx", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="NAME", help="registered weights, found like predict finds them "
                        "(python -m lightcnn.weights list); with --random-weights, any architecture")
    source.add_argument("--weights", metavar="FILE.h5", help="a lightcnn .h5 checkpoint")
    parser.add_argument("--random-weights", action="store_true",
                        help="export --model's architecture with random weights (no classes, no preprocessing)")
    parser.add_argument("--size", type=positive_int, help="input height = width (default: the model's)")
    parser.add_argument("--out", required=True, help="output .onnx path")
    add_common_options(parser)
    return parser


def main(argv=None):
    from lightcnn._cli import set_verbosity

    parser = build_parser()
    args = parser.parse_args(argv)
    set_verbosity(args)
    if args.random_weights and not args.model:
        parser.error("--random-weights goes with --model NAME (a registered name or an architecture)")

    from lightcnn.errors import LightCNNError

    try:
        _require_onnx()  # before loading anything: say first what is missing
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.random_weights:
            model, metadata = _random_model(args.model), {"weights": "random"}
        else:
            from lightcnn.api import model_from_checkpoint
            from lightcnn.checkpoint import read_checkpoint
            from lightcnn.weights import find_weights

            try:
                ckpt = read_checkpoint(find_weights(args.weights or args.model))
            except LightCNNError as exc:
                hint = "; --random-weights exports an architecture without weights" if args.model else ""
                raise LightCNNError(f"{exc}{hint}") from None
            model = model_from_checkpoint(ckpt, simulate_quantization=False)
            metadata = checkpoint_metadata(ckpt, args.model or None)
        export_onnx(model, args.out, input_size=args.size, metadata=metadata)
    except BrokenPipeError:
        raise
    except (LightCNNError, ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}" + (" (random weights)" if args.random_weights else ""))
    return 0


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
