"""Simulate a quantised runtime's 8-bit activations in the float engine (opt-in, for converted TFLite models).

Quantisation-aware training (QAT) in one paragraph
--------------------------------------------------
An 8-bit runtime stores every activation tensor as integers q with real = scale * (q - zero_point);
q is uint8 (0..255) or int8 (-128..127), and (scale, zero_point) are fixed per tensor in the file.
QAT trains the float network with a *fake-quant* node after every op whose output the runtime
will store:

    fq(y) = (clip(round(y / scale) + zero_point, q_min, q_max) - zero_point) * scale

so the weights learn to work with activations rounded to a grid of 256 values and clipped to
[scale * (q_min - zero_point), scale * (q_max - zero_point)]. Backward treats the rounding as
the identity (the "straight-through estimator"). The network the file describes is therefore
not the float network: it is the float network *with those roundings*.

Why a float engine differs from the integer runtime
---------------------------------------------------
lightcnn dequantises the weights and runs in float32: the network without its fake-quant nodes.
Fed the runtime's own input, each op lands within half a step of the runtime's integer; but the
runtime rounds every output and the float engine does not, and those differences feed forward.
For MobileNetV2 this hardly matters (top-1 agrees with the runtime on ~98% of images whether or
not the rounding is simulated). MobileNetV3-Small was trained for the rounding: without it, its
top-1 agrees with the runtime on 82.5% of the ImageNet sample and top-1 accuracy drops from the
runtime's 76.1% to 73.9%; simulating it gives 87.7% agreement and 76.7% top-1. The gain is
statistical: it comes from the rounding (clipping alone changes nothing), and on one image the
simulated activations are not closer to the runtime's, layer by layer, than rounded float ones.

What is simulated
-----------------
`activation_table(tfl, model)` pairs the TFLite graph with a lightcnn model and reads the
(scale, zero_point) of every runtime tensor that a lightcnn layer output corresponds to:

    ConvBNAct            the conv's output, or the HARD_SWISH after it
    InvertedResidual     the residual ADD (only blocks with a residual)
    SqueezeExcite        fc1 (ReLU) output; fc2 + hard-sigmoid <-> the ADD(3) -> MUL(1/6) output;
                         the block output <-> the broadcast MUL; and the average pool inside the
                         block, as the *input* of fc1 (the pool is not a layer of its own)
    head                 the global average pool, each Dense (hidden after HARD_SWISH, logits)

`simulate_activation_quantization(model, table)` then rounds those layers' outputs (and fc1's
input) with fq(). The network input needs nothing: 8-bit pixels are already on its grid.

What is not simulated
---------------------
- Tensors inside a fused lightcnn unit: the conv output *before* HARD_SWISH, fc2's output before
  the hard-sigmoid and the ADD(3) inside it. The runtime rounds them too, so those units match
  it to ~2 steps instead of 1. (Rounding them as well, by splitting the units, moved agreement by
  under one point on the sample and was left out.)
- The integer arithmetic: exact int32 sums, the fixed-point requantisation multiplier, rounding
  half away from zero (NumPy rounds half to even). These flip an occasional value by one step.
So the result is closer to the runtime, not bit-exact. Inference is the use. In training mode the
same rounding runs forward and backward passes gradients straight through (the STE above), so
Grad-CAM works on a simulated model; `lightcnn.api.model_from_checkpoint` builds models for
training and export without simulation unless asked.

Mechanism
---------
Each listed layer's class is swapped for a cached subclass (``FakeQuantConvBNAct`` for
``ConvBNAct``, ...) whose forward calls the original and rounds; the layer keeps its parameters,
name, path and isinstance() checks. The model itself becomes ``FakeQuantModel``. Its inference
plan (lightcnn.layers.plan) sees each layer's ``_fake_quant`` grids and adds rounding steps
at those tensors, leaving out the fusions that would skip them, so both engines run it.
`remove_activation_quantization(model)` puts every original class back. A class, not an instance
attribute, is swapped so that tools which temporarily replace and then delete an instance's
``forward`` (``Model.trace``, Grad-CAM) leave the simulation in place. A simulated model does not
pickle; remove the simulation first.
"""

from collections import defaultdict

import numpy as np

from lightcnn.errors import CheckpointError
from lightcnn.kernels.quant import fake_quant
from lightcnn.layers.basic import Dense, GlobalAvgPool
from lightcnn.layers.blocks import ConvBNAct, InvertedResidual, SqueezeExcite

__all__ = ["QRANGE", "fake_quant", "has_quantized_activations", "activation_table", "activation_tensors",
           "simulate_activation_quantization", "remove_activation_quantization", "is_simulating"]

QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_POOL_OPS = ("AVERAGE_POOL_2D", "MEAN")
_IN = "@input"  # table key suffix: round this layer's input, not its output


# -- reading the table from a TFLite graph -----------------------------------------------------------


class _Graph:
    """Producer/consumer lookups over a TFLiteModel's operators."""

    def __init__(self, tfl, source):
        self.tfl, self.source = tfl, source
        self.producer = {t: op for op in tfl.operators for t in op.outputs}
        self.consumers = defaultdict(list)
        for op in tfl.operators:
            for t in op.inputs:
                if t >= 0:
                    self.consumers[t].append(op)

    def fail(self, message):
        raise CheckpointError(f"{self.source}: activation quantisation table: {message}")

    def tensor(self, t):
        return self.tfl.tensors[t]

    def only_consumer(self, t, opcode, what):
        ops = self.consumers.get(t, [])
        if len(ops) != 1 or ops[0].opcode != opcode:
            found = ", ".join(op.opcode for op in ops) or "nothing"
            self.fail(f"{what}: expected tensor {t} ({self.tensor(t).name}) to feed one {opcode}, found {found}")
        return ops[0]

    def constant_operand(self, op, t_in, expected, what):
        """The other input of a binary op must be a scalar constant close to `expected`."""
        other = [t for t in op.inputs if t != t_in]
        if len(other) != 1 or not self.tensor(other[0]).is_constant:
            self.fail(f"{what}: {op.opcode} #{op.index} should combine with a constant")
        value = self.tfl.tensor_value(other[0]).reshape(-1)
        step = float(self.tensor(other[0]).scale[0]) if self.tensor(other[0]).is_quantized else 0.0
        if value.size != 1 or abs(float(value[0]) - expected) > step + 1e-6:
            self.fail(f"{what}: {op.opcode} #{op.index} uses {value[:3]} where hard-sigmoid needs {expected:g}")

    def check_activation(self, t, channels, what):
        tensor = self.tensor(t)
        if tensor.type_name not in ("UINT8", "INT8") or tensor.scale.size != 1:
            self.fail(f"{what}: tensor {t} ({tensor.name}) is {tensor.type_name} with {tensor.scale.size} scales, "
                      "not a per-tensor 8-bit activation")
        if tensor.shape[-1] not in (channels, channels + 1):  # + 1: TF's background class
            self.fail(f"{what}: tensor {t} ({tensor.name}) has shape {tensor.shape}, the layer has {channels} "
                      "channels (wrong --arch for this file?)")


def has_quantized_activations(tfl):
    """Whether the graph's conv/dense ops write 8-bit tensors (a quantised model, not a float one)."""
    ops = [op for op in tfl.operators if op.opcode in _WEIGHT_OPS]
    return bool(ops) and tfl.tensors[ops[0].outputs[0]].type_name in ("UINT8", "INT8")


def _weight_units(model):
    """(path, layer) of ConvBNAct and Dense layers in forward order: the order of the graph's weight ops."""
    return [(p, layer) for p, layer in model.named_layers() if isinstance(layer, (ConvBNAct, Dense))]


def activation_table(tfl, model, source=None):
    """{"dtype": "uint8"|"int8", "layers": {path: [scale, zero_point]}} for a model converted from `tfl`.

    The quantisation parameters of the tensors activation_tensors() pairs with the model's layers.
    """
    tensors = activation_tensors(tfl, model, source)
    dtypes = {tfl.tensors[t].type_name.lower() for t in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{source or tfl.path}: activation quantisation table: mixed activation types "
                              f"{sorted(dtypes)}")
    return {"dtype": dtypes.pop(),
            "layers": {key: [float(tfl.tensors[t].scale[0]), int(tfl.tensors[t].zero_point[0])]
                       for key, t in tensors.items()}}


def activation_tensors(tfl, model, source=None):
    """{layer path: index of the TFLite tensor that layer's output corresponds to} (see activation_table).

    A path ending in "@input" means "round this layer's input" (fc1 of a squeeze-excite block,
    whose input is the block's average pool). The graph's conv/dense ops are paired with the
    model's units in forward order (as lightcnn.weights.mapping does for the weights) and every
    step is checked: op kind, channel counts, the activation op that must follow (HARD_SWISH,
    ADD 3 + MUL 1/6), the residual ADD, the squeeze-excite MUL and the pools. Anything that does
    not line up raises CheckpointError.
    """
    g = _Graph(tfl, source or tfl.path)
    layers_by_path = dict(model.named_layers())
    ops = [op for op in tfl.operators if op.opcode in _WEIGHT_OPS]
    units = _weight_units(model)
    if len(ops) != len(units):
        g.fail(f"the graph has {len(ops)} conv/dense ops, {model.arch} has {len(units)} conv/dense units")
    head_first = next((p for p, _ in units if p.startswith("head.")), None)
    found, block_input = {}, {}

    def put(key, t, channels, what):
        g.check_activation(t, channels, what)
        found[key] = t

    for op, (path, layer) in zip(ops, units):
        parent_path, _, name = path.rpartition(".")
        parent = layers_by_path.get(parent_path)
        is_dense = isinstance(layer, Dense)
        channels = layer.out_features if is_dense else layer.out_ch
        what = f"{path} <-> {op.opcode} #{op.index}"
        out_rank = len(g.tensor(op.outputs[0]).shape)
        if not is_dense and (op.opcode == "FULLY_CONNECTED" or out_rank != 4):
            g.fail(f"{what}: a conv unit needs a 4-D conv output")
        t = op.outputs[0]
        if layer.act_name == "hard_swish":
            t = g.only_consumer(t, "HARD_SWISH", what).outputs[0]
        elif layer.act_name == "hard_sigmoid":  # relu6(v + 3) / 6 as two ops
            add = g.only_consumer(t, "ADD", what)
            g.constant_operand(add, t, 3.0, what)
            mul = g.only_consumer(add.outputs[0], "MUL", what)
            g.constant_operand(mul, add.outputs[0], 1.0 / 6.0, what)
            t = mul.outputs[0]
        elif layer.act_name in ("relu", "relu6"):  # fused, or implied by the grid starting at 0
            tensor = g.tensor(t)
            bottom = QRANGE.get(tensor.type_name.lower(), (None,))[0]
            if tensor.zero_point.size and tensor.zero_point[0] != bottom:
                g.fail(f"{what}: a {layer.act_name} output should have its zero point at the bottom of the range")
        elif layer.act_name != "none":
            g.fail(f"{what}: no rule for activation {layer.act_name!r}")
        put(path, t, channels, what)

        if isinstance(parent, SqueezeExcite) and name == "fc1":
            pool = g.producer.get(op.inputs[0])
            if pool is None or pool.opcode not in _POOL_OPS:
                g.fail(f"{what}: the squeeze-excite input should come from an average pool")
            put(path + _IN, op.inputs[0], layer.in_features, what)
        if isinstance(parent, SqueezeExcite) and name == "fc2":
            mul = g.only_consumer(t, "MUL", what)
            other = [i for i in mul.inputs if i != t]
            if len(other) != 1 or len(g.tensor(other[0]).shape) != 4:
                g.fail(f"{what}: the gate should multiply a 4-D feature map")
            put(parent_path, mul.outputs[0], parent.channels, what)
        if isinstance(parent, InvertedResidual):
            block_input.setdefault(parent_path, op.inputs[0])  # the block's first op reads the block input
        if isinstance(parent, InvertedResidual) and name == "project":
            skip = block_input[parent_path]
            adds = [c for c in g.consumers.get(t, []) if c.opcode == "ADD" and sorted(c.inputs) == sorted((t, skip))]
            if parent.use_residual != bool(adds):
                g.fail(f"{what}: {parent_path} {'has' if parent.use_residual else 'has no'} residual, the graph "
                       f"{'adds one' if adds else 'does not'}")
            if adds:
                put(parent_path, adds[0].outputs[0], parent.out_ch, what)
        if path == head_first:
            pool_path = next((p for p, lay in model.named_layers() if p.startswith("head.")
                              and isinstance(lay, GlobalAvgPool)), None)
            pool = g.producer.get(op.inputs[0])
            if pool_path is not None:
                if pool is None or pool.opcode not in _POOL_OPS:
                    g.fail(f"{what}: the head's first dense layer should read the global average pool")
                put(pool_path, op.inputs[0], layer.in_features, what)
    return found


# -- installing it -----------------------------------------------------------------------------------


class _FakeQuantMixin:
    """Forward of the wrapped class, with the listed input/output rounded (see the module docstring)."""

    def forward(self, x, training=False):
        qin, qout = self._fake_quant
        if qin is not None:
            x = fake_quant(x, *qin)
        y = super().forward(x, training)
        return y if qout is None else fake_quant(y, *qout)


class _LayerByLayerMixin:
    """Marks the model as simulating; its inference plan reads each layer's `_fake_quant` and adds
    the rounding steps (lightcnn.layers.plan), so it keeps the plan's speed."""


_SUBCLASSES = {}  # (mixin, class) -> the subclass, made once


def _swap_class(obj, mixin):
    cls = type(obj)
    if (mixin, cls) not in _SUBCLASSES:
        name = f"FakeQuant{cls.__name__}"
        _SUBCLASSES[mixin, cls] = type(name, (mixin, cls), {"__module__": __name__, "_original_class": cls})
    obj.__class__ = _SUBCLASSES[mixin, cls]


def simulate_activation_quantization(model, table):
    """Round the outputs of the layers named in `table` (activation_table's dict) to their 8-bit grids.

    Replaces any simulation already installed. Returns the model.
    """
    remove_activation_quantization(model)
    qmin, qmax = QRANGE[table["dtype"]]
    layers = dict(model.named_layers())
    rounding = defaultdict(lambda: [None, None])  # path -> [input grid, output grid]
    for key, (scale, zero_point) in table["layers"].items():
        path = key[:-len(_IN)] if key.endswith(_IN) else key
        if path not in layers or not path:
            raise CheckpointError(f"activation quantisation table names {path!r}, which "
                                  f"{getattr(model, 'arch', type(model).__name__)} does not have")
        rounding[path][0 if key.endswith(_IN) else 1] = (float(scale), int(zero_point), qmin, qmax)
    for path, (qin, qout) in rounding.items():
        layers[path]._fake_quant = (qin, qout)
        _swap_class(layers[path], _FakeQuantMixin)
    _swap_class(model, _LayerByLayerMixin)
    model._activation_quantization = table
    model.__dict__["_plans"] = {}  # plans are lowered with or without the rounding steps
    return model


def remove_activation_quantization(model):
    """Undo simulate_activation_quantization: every layer gets its own class back. Returns the model."""
    for _, layer in model.named_layers():
        if isinstance(layer, (_FakeQuantMixin, _LayerByLayerMixin)):
            layer.__class__ = layer._original_class
            layer.__dict__.pop("_fake_quant", None)
    model.__dict__.pop("_activation_quantization", None)
    model.__dict__["_plans"] = {}
    return model


def is_simulating(model):
    """Whether simulate_activation_quantization is installed on `model`."""
    return "_activation_quantization" in model.__dict__
