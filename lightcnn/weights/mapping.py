"""Map foreign checkpoints onto lightcnn parameter names, as data.

Four sources, four rules:

- torchvision ``.pth``: an explicit prefix map per architecture, generated from
  the same tables the models are built from (``features.3.conv.1.0`` ->
  ``features.blocks.2.dw.conv``). Every source tensor must be claimed by the
  map and every model tensor filled, else the conversion stops.
- TFLite: exporters name tensors differently (``MobilenetV2/expanded_conv_1/...``
  vs ``mobilenetv2_1.00_224/block_1_...``), but the graph lists its operators in
  forward order, which is the order of the model's conv units. The weights are
  paired in that order and every pair is checked for kind (conv / depthwise /
  dense), shape and stride, so a file of another architecture fails loudly.
- Deep-Compression SqueezeNet: the Caffe layer names map one to one.
- Keras 2 ``.h5``: keras.applications.MobileNetV2's layer names (``Conv1``, ``bn_Conv1``,
  ``expanded_conv_depthwise``, ``block_{i}_expand_BN``, ``Conv_1_bn``), generated from the
  same stage table, map one to one onto the trunk. The head's Dense layers have no fixed names
  (``predictions``, or ``dense``, ``dense_1``... from a session-wide counter), so the layers
  the trunk map does not claim are the head, in the file's layer order, each checked for shape
  (and, when the file has a model_config, for its activation).

Layout changes happen here, once: OIHW -> HWIO, (C,1,KH,KW) -> (KH,KW,C),
(O,F) -> (F,O); Keras is already HWIO and (F,O), and its depthwise (KH,KW,C,1) loses
the last axis. A 1001-class TF output drops its "background" row 0.
"""

import numpy as np

from lightcnn.errors import CheckpointError
from lightcnn.layers.basic import ConvTranspose2d, Dense, DepthwiseConv2d
from lightcnn.layers.blocks import ConvBNAct, SqueezeExcite
from lightcnn.models.mobilenet_v2 import INVERTED_RESIDUAL
from lightcnn.models.squeezenet import LAYOUT, POOL

# -- layout transforms ---------------------------------------------------------------


def oihw_to_hwio(w):
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def depthwise_to_hwc(w):
    """(C, 1, KH, KW) -> (KH, KW, C)."""
    return np.ascontiguousarray(np.transpose(w[:, 0], (1, 2, 0)))


def linear_to_fo(w):
    """(O, F) or (O, F, 1, 1) -> (F, O)."""
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


# -- torchvision ---------------------------------------------------------------------

CONV, DEPTHWISE, BN, DENSE = "conv", "depthwise", "bn", "dense"
_WEIGHT_NDIM = {CONV: (4,), DEPTHWISE: (4,), DENSE: (2, 4)}
_BN_KEYS = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}


def _unit_entries(torch_prefix, our_prefix, unit):
    """Prefix-map entries for one ConvBNAct in torchvision's Conv-BN-Act Sequential form (.0 conv, .1 bn)."""
    kind = DEPTHWISE if isinstance(unit.conv, DepthwiseConv2d) else CONV
    if unit.bn is None:
        return {torch_prefix: (f"{our_prefix}.conv", kind)}
    return {f"{torch_prefix}.0": (f"{our_prefix}.conv", kind), f"{torch_prefix}.1": (f"{our_prefix}.bn", BN)}


def torchvision_prefix_map(model):
    """{torchvision module prefix: (lightcnn prefix, kind)} for a model built by lightcnn.models."""
    arch = model.arch
    features = model.features_net
    out = {}
    if arch in ("mobilenet_v2", "mobilenet_v2_dense"):
        out.update(_unit_entries("features.0", "features.stem", features["stem"]))
        for i, (_, block) in enumerate(features["blocks"].layers):
            units = [("expand", block.expand), ("dw", block.dw)]
            units = [(n, u) for n, u in units if u is not None]
            for j, (name, unit) in enumerate(units):
                out.update(_unit_entries(f"features.{i + 1}.conv.{j}", f"features.blocks.{i}.{name}", unit))
            j = len(units)
            out[f"features.{i + 1}.conv.{j}"] = (f"features.blocks.{i}.project.conv", CONV)
            out[f"features.{i + 1}.conv.{j + 1}"] = (f"features.blocks.{i}.project.bn", BN)
        last = len(features["blocks"]) + 1
        out.update(_unit_entries(f"features.{last}", "features.last", features["last"]))
        out["classifier.1"] = ("head.classifier", DENSE)
    elif arch in ("mobilenet_v3_large", "mobilenet_v3_small"):
        out.update(_unit_entries("features.0", "features.stem", features["stem"]))
        for i, (_, block) in enumerate(features["blocks"].layers):
            for j, (name, unit) in enumerate(block.children()):
                prefix = f"features.{i + 1}.block.{j}"
                if isinstance(unit, SqueezeExcite):
                    out[f"{prefix}.fc1"] = (f"features.blocks.{i}.se.fc1", DENSE)
                    out[f"{prefix}.fc2"] = (f"features.blocks.{i}.se.fc2", DENSE)
                else:
                    out.update(_unit_entries(prefix, f"features.blocks.{i}.{name}", unit))
        last = len(features["blocks"]) + 1
        out.update(_unit_entries(f"features.{last}", "features.last", features["last"]))
        out["classifier.0"] = ("head.hidden", DENSE)
        out["classifier.3"] = ("head.classifier", DENSE)
    elif arch in ("squeezenet1_0", "squeezenet1_1"):
        out["features.0"] = ("features.conv1.conv", CONV)
        # torchvision: features.0 conv, features.1 ReLU, then one module per pool or Fire step
        for index, step in enumerate(LAYOUT[arch[len("squeezenet"):]][1], start=2):
            if step != POOL:
                for part in ("squeeze", "expand1x1", "expand3x3"):
                    out[f"features.{index}.{part}"] = (f"features.{step}.{part}.conv", CONV)
        out["classifier.1"] = ("head.classifier.conv", CONV)
    else:
        raise CheckpointError(f"no torchvision name map for architecture {arch!r}")
    return out


def _convert_tensor(kind, key, value):
    if kind == BN:
        return _BN_KEYS.get(key), value
    if key == "bias":
        return "bias", value
    if key != "weight":
        return None, value
    if kind == CONV:
        return "weight", oihw_to_hwio(value)
    if kind == DEPTHWISE:
        return "weight", depthwise_to_hwc(value)
    return "weight", linear_to_fo(value)


def map_torchvision(state, model, source):
    """torchvision state_dict -> lightcnn tensors (dotted names)."""
    prefixes = torchvision_prefix_map(model)
    tensors = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue  # a counter torch keeps for momentum=None; lightcnn uses a fixed momentum
        prefix, _, key = name.rpartition(".")
        if prefix not in prefixes:
            raise CheckpointError(f"{source}: tensor '{name}' has no place in {model.arch} "
                                  "(wrong --arch for this file?)")
        ours, kind = prefixes[prefix]
        value = np.asarray(value, np.float32)
        if key == "weight" and kind in _WEIGHT_NDIM and value.ndim not in _WEIGHT_NDIM[kind]:
            # checked before the layout transform, which would fail with NumPy's "axes don't match array"
            raise CheckpointError(f"{source}: tensor '{name}' has shape {value.shape}; a {kind} weight has "
                                  f"{' or '.join(map(str, _WEIGHT_NDIM[kind]))} dims")
        our_key, converted = _convert_tensor(kind, key, value)
        if our_key is None:
            raise CheckpointError(f"{source}: tensor '{name}' is not a known {kind} parameter")
        tensors[f"{ours}.{our_key}"] = converted
    return tensors


# -- TFLite --------------------------------------------------------------------------

_TFLITE_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def model_weight_units(model):
    """The model's weight-carrying units in forward order: (path, kind, layer)."""
    units = []
    for path, layer in model.named_layers():
        if isinstance(layer, ConvBNAct):
            kind = DEPTHWISE if isinstance(layer.conv, DepthwiseConv2d) else CONV
            units.append((f"{path}.conv", kind, layer.conv))
        elif isinstance(layer, Dense):
            units.append((path, DENSE, layer))
        elif isinstance(layer, ConvTranspose2d):
            units.append((path, "transpose", layer))
    return units


def _tflite_weights(tfl, op):
    """(weight in lightcnn layout, bias or None, stride) of one TFLite weight op."""
    w = tfl.tensor_value(op.inputs[1])
    b = tfl.tensor_value(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    stride = (op.options.get("stride_h", 1), op.options.get("stride_w", 1))
    if op.opcode == "CONV_2D":            # (O, KH, KW, I)
        return np.ascontiguousarray(np.transpose(w, (1, 2, 3, 0))), b, stride
    if op.opcode == "DEPTHWISE_CONV_2D":  # (1, KH, KW, C)
        return np.ascontiguousarray(w[0]), b, stride
    return np.ascontiguousarray(w.T), b, stride  # FULLY_CONNECTED (O, I)


def map_tflite(tfl, model, source):
    """Pair the TFLite graph's weight ops with the model's units in forward order, checking each pair."""
    ops = [op for op in tfl.operators if op.opcode in _TFLITE_WEIGHT_OPS]
    units = model_weight_units(model)
    if len(ops) != len(units):
        raise CheckpointError(f"{source}: the graph has {len(ops)} conv/dense ops, {model.arch} has {len(units)} "
                              "(wrong --arch for this file?)")
    tensors = {}
    for op, (path, kind, layer) in zip(ops, units):
        w, b, stride = _tflite_weights(tfl, op)
        name = tfl.tensors[op.inputs[1]].name
        if kind == DENSE and w.ndim == 4:
            if w.shape[:2] != (1, 1):
                raise CheckpointError(f"{source}: '{name}' is a {w.shape[0]}x{w.shape[1]} conv where {model.arch} "
                                      f"has the dense layer {path}")
            w = w.reshape(w.shape[2], w.shape[3])
        expected = layer.params["weight"].shape
        if kind == DENSE and w.shape[1] == expected[1] + 1:
            w, b = w[:, 1:], (None if b is None else b[1:])  # drop TF's "background" class 0
        op_kind = {"CONV_2D": CONV, "DEPTHWISE_CONV_2D": DEPTHWISE}.get(op.opcode, DENSE)
        if op_kind != kind and not (kind == DENSE and op_kind == CONV):
            raise CheckpointError(f"{source}: '{name}' is a {op.opcode} where {model.arch} has a {kind} layer {path}")
        if w.shape != expected:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {w.shape} (in lightcnn layout), "
                                  f"{model.arch} expects {expected} for {path}.weight")
        if kind != DENSE and tuple(stride) != tuple(layer.stride):
            raise CheckpointError(f"{source}: '{name}' has stride {stride}, {model.arch} has {layer.stride} at {path}")
        tensors[f"{path}.weight"] = w
        if "bias" in layer.params:
            if b is None:
                raise CheckpointError(f"{source}: '{name}' has no bias but {path} needs one")
            tensors[f"{path}.bias"] = b.astype(np.float32)
    return tensors


# -- Deep-Compression SqueezeNet (Caffe names) -----------------------------------------


def deep_compression_name(caffe_name):
    """'fire3/conv3x3_2' -> 'features.fire3.expand3x3.conv'."""
    if caffe_name == "conv1":
        return "features.conv1.conv"
    if caffe_name == "conv_final":
        return "head.classifier.conv"
    fire, _, part = caffe_name.partition("/")
    parts = {"conv1x1_1": "squeeze", "conv1x1_2": "expand1x1", "conv3x3_2": "expand3x3"}
    if part not in parts:
        raise CheckpointError(f"unknown Deep-Compression layer {caffe_name!r}")
    return f"features.{fire}.{parts[part]}.conv"


def map_deep_compression(layers):
    tensors = {}
    for caffe_name, (weight, bias) in layers.items():
        ours = deep_compression_name(caffe_name)
        tensors[f"{ours}.weight"] = oihw_to_hwio(weight)
        tensors[f"{ours}.bias"] = np.asarray(bias, np.float32)
    return tensors


# -- Keras 2 .h5 (keras.applications names) ------------------------------------------

_KERAS_KEYS = {CONV: {"kernel": "weight", "bias": "bias"},
               DEPTHWISE: {"depthwise_kernel": "weight", "bias": "bias"},
               BN: {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                    "moving_variance": "running_var"},
               DENSE: {"kernel": "weight", "bias": "bias"}}
_KERAS_ARCHS = ("mobilenet_v2", "mobilenet_v2_dense")


def keras_mobilenet_v2_map():
    """{Keras layer name: (lightcnn prefix, kind)} for keras.applications.MobileNetV2's trunk (Conv1 .. Conv_1_bn).

    Keras numbers its blocks 0..16 like lightcnn's features.blocks, calls block 0 (no expansion) "expanded_conv"
    and every other "block_<i>"; a conv is followed by its BatchNormalization "<conv>_BN" ("bn_Conv1" and
    "Conv_1_bn" at the ends).
    """
    out = {"Conv1": ("features.stem.conv", CONV), "bn_Conv1": ("features.stem.bn", BN)}
    i = 0
    for stage in INVERTED_RESIDUAL:
        for _ in range(stage.repeats):
            keras, ours = ("expanded_conv_" if i == 0 else f"block_{i}_"), f"features.blocks.{i}"
            units = ([("expand", "expand", CONV)] if stage.expand != 1 else []) + \
                [("depthwise", "dw", DEPTHWISE), ("project", "project", CONV)]
            for keras_unit, our_unit, kind in units:
                out[f"{keras}{keras_unit}"] = (f"{ours}.{our_unit}.conv", kind)
                out[f"{keras}{keras_unit}_BN"] = (f"{ours}.{our_unit}.bn", BN)
            i += 1
    out["Conv_1"] = ("features.last.conv", CONV)
    out["Conv_1_bn"] = ("features.last.bn", BN)
    return out


def keras_head_layers(keras):
    """[(Keras layer name, kernel shape)] of the layers the trunk map does not claim, in the file's order."""
    trunk = keras_mobilenet_v2_map()
    return [(name, tuple(np.shape(variables.get("kernel", ())))) for name, variables in keras.weights.items()
            if name not in trunk]


def _keras_activation_fits(keras_act, our_act, is_classifier):
    if keras_act in (None, "linear"):
        return our_act == "none"
    if keras_act == "softmax":  # lightcnn's logits; postprocess applies the softmax
        return is_classifier and our_act == "none"
    return keras_act == our_act


def map_keras(keras, model, source):
    """Keras 2 .h5 weights (lightcnn.convert.keras_h5.KerasH5) -> lightcnn tensors (dotted names).

    Strict: a trunk tensor missing, a variable or layer the model has no place for, a kernel of the wrong shape
    (compared in Keras's layout, so the message shows the file's own shape) each stop with one line.
    """
    if model.arch not in _KERAS_ARCHS:
        raise CheckpointError(f"{source}: no Keras name map for architecture {model.arch!r} "
                              f"(Keras .h5 files convert to {' or '.join(_KERAS_ARCHS)})")
    layers = dict(model.named_layers())
    heads = [path for path, layer in model.named_layers() if path.startswith("head.") and isinstance(layer, Dense)]
    head_names = [name for name, _ in keras_head_layers(keras)]
    if len(head_names) > len(heads):
        extra = head_names[len(heads)] if heads else head_names[0]
        raise CheckpointError(f"{source}: unexpected layer '{extra}' with weights for {model.arch}, whose head has "
                              f"{len(heads)} dense layer(s) after the trunk (wrong --arch for this file?)")
    if len(head_names) < len(heads):
        raise CheckpointError(f"{source}: {len(head_names)} dense layer(s) after the trunk, {model.arch} has "
                              f"{len(heads)} ({', '.join(heads)}); tensor '{heads[len(head_names)]}.weight' missing")
    table = dict(keras_mobilenet_v2_map())
    table.update({name: (path, DENSE) for name, path in zip(head_names, heads)})
    configs = keras.layer_configs()
    tensors, missing = {}, []
    for keras_layer, (ours, kind) in table.items():
        variables = keras.weights.get(keras_layer, {})
        layer = layers[ours]
        for keras_key, our_key in _KERAS_KEYS[kind].items():
            shown = keras.names.get((keras_layer, keras_key), f"{keras_layer}/{keras_key}")
            if our_key not in layer.params and our_key not in layer.buffers:
                if keras_key in variables:
                    raise CheckpointError(f"{source}: unexpected tensor '{shown}': {model.arch} has no "
                                          f"{ours}.{our_key}")
                continue
            if keras_key not in variables:
                missing.append(f"{keras_layer}/{keras_key}")
                continue
            value = variables[keras_key]
            expected = (layer.params.get(our_key) if our_key in layer.params else layer.buffers[our_key]).shape
            keras_expected = expected + (1,) if kind == DEPTHWISE and our_key == "weight" else expected
            if value.shape != keras_expected:
                raise CheckpointError(f"{source}: tensor '{shown}' has shape {value.shape}, {model.arch} expects "
                                      f"{keras_expected} for {ours}.{our_key}")
            tensors[f"{ours}.{our_key}"] = value[..., 0] if value.shape != expected else value
        unknown = sorted(set(variables) - set(_KERAS_KEYS[kind]))
        if unknown:
            shown = keras.names.get((keras_layer, unknown[0]), f"{keras_layer}/{unknown[0]}")
            raise CheckpointError(f"{source}: unexpected tensor '{shown}' in a {kind} layer of {model.arch}")
        if kind == DENSE and keras_layer in configs:
            keras_act = configs[keras_layer][1].get("activation")
            if not _keras_activation_fits(keras_act, layer.act_name, ours == heads[-1]):
                raise CheckpointError(f"{source}: dense layer '{keras_layer}' has activation {keras_act!r} where "
                                      f"{model.arch}'s {ours} applies {layer.act_name!r}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: tensor '{missing[0]}' missing{more}; does the file hold a "
                              f"Keras MobileNetV2?")
    return tensors
