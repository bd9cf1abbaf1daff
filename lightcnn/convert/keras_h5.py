"""Read a Keras 2 HDF5 weight file (``model.save_weights("x.h5")`` or ``model.save("x.h5")``) without TensorFlow.

The Keras 2 layout (keras/saving/hdf5_format.py, ``save_weights_to_hdf5_group``)
-------------------------------------------------------------------------------
``save_weights`` writes at the root, ``save`` under the group ``model_weights``:

    attrs  layer_names    array of bytes, one per layer in model order (b"Conv1", b"bn_Conv1", ...)
           backend        b"tensorflow";  keras_version  b"2.x"
    <layer>               one group per layer, weightless layers included
        attrs  weight_names   array of bytes, the layer's variables in its own order
                              (b"Conv1/kernel:0"; a nested model lists its sublayers' variables)
        <weight_name>         one float dataset per name, so usually nested: <layer>/<layer>/kernel:0

An attribute over HDF5's 64 KiB header limit is split into ``layer_names0``, ``layer_names1``, ...
``model.save`` also puts the architecture as JSON in the root attribute ``model_config``
(class_name "Functional"/"Model"/"Sequential", config.layers[] with class_name/config/name).
Arrays keep Keras's layouts: conv kernel (KH,KW,C,O), depthwise kernel (KH,KW,C,M), dense kernel (F,O),
batch norm gamma/beta/moving_mean/moving_variance (C,).

What comes out: `KerasH5` with ``weights`` = {layer name: {variable ("kernel", "gamma", ...): ndarray}} in
the file's layer order. For a nested model (a Functional base inside a Sequential, the usual transfer-learning
shape) the sublayers' own names, taken from the weight names, replace the wrapper's. Nothing is renamed or
transposed here; lightcnn.weights.mapping does that once.

Hostile input: only a regular file of at most ``MAX_FILE_BYTES`` is read (into memory, so the file cannot change
under the reader); only hard links are followed (an external link could open another file); a dataset's declared
shape, dtype and storage are checked before it is read (float, at most ``MAX_NDIM`` dims and
``MAX_TENSOR_ELEMENTS`` elements, no external or virtual storage), all datasets together may not read more than
``MAX_READ_RATIO`` times the file's size (+ 1 MiB: a compressed dataset cannot inflate a small file into
gigabytes), attributes are size-checked before they are read, and a NaN or Inf weight is refused by name.
Every failure is a `CheckpointError` with one line naming the file. No state is kept between files.
Keras 3's ``.weights.h5``/``.keras`` layout (``layers/<name>/vars/0``) is a different format and is refused.
"""

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np

from lightcnn._files import printable, read_regular_file
from lightcnn.errors import CheckpointError

__all__ = ["KerasH5", "read_keras_h5", "h5_kind"]

MAX_FILE_BYTES = 1 << 30        # Keras's MobileNetV2 ImageNet .h5 is 14 MB
MAX_TENSOR_ELEMENTS = 1 << 28   # same cap as the .pth and TFLite readers
MAX_NDIM = 4                    # conv kernels are the largest Keras weights lightcnn maps
MAX_READ_RATIO = 16             # bytes read out of datasets per byte of the file (+ READ_SLACK)
READ_SLACK = 1 << 20
MAX_ATTR_BYTES = 16 << 20       # layer_names / weight_names / model_config
MAX_LAYERS = 100_000

_INDEX_SUFFIX = re.compile(r":\d+$")
# layers that leave pixel values alone before the trunk (random augmentations are identities at inference)
_INERT_LAYERS = frozenset(
    "Functional Model Sequential InputLayer Conv2D DepthwiseConv2D BatchNormalization ReLU Activation ZeroPadding2D "
    "Add GlobalAveragePooling2D Dropout Dense Flatten RandomFlip RandomRotation RandomZoom RandomTranslation "
    "RandomContrast RandomBrightness".split())


@dataclass
class KerasH5:
    """A Keras 2 HDF5 file's weights, in Keras's names and layouts (see the module docstring)."""

    weights: dict                       # {layer name: {variable: ndarray}}, file order, weightless layers omitted
    model_config: dict | None = None    # the architecture JSON of model.save(), None for save_weights files
    keras_version: str | None = None
    backend: str | None = None
    names: dict = field(default_factory=dict)  # {(layer, variable): the weight name as stored}, for messages

    def layer_configs(self):
        """{layer name: (class_name, config)} from model_config, nested models included ({} without one)."""
        return _layer_configs(self.model_config)

    def bn_epsilons(self):
        """The distinct BatchNormalization epsilons model_config states (empty without a model_config)."""
        return sorted({float(cfg["epsilon"]) for kind, cfg in self.layer_configs().values()
                       if kind == "BatchNormalization" and isinstance(cfg.get("epsilon"), (int, float))})

    def input_scaling(self):
        """How the graph itself rescales its input: (scale, offset) of its one Rescaling layer, "none" when
        model_config has no layer that could touch pixel values, None when it has one this cannot read
        (Normalization, Lambda, TFOpLambda such as an in-graph preprocess_input, ...). Without a model_config:
        "none" (save_weights files do not say).
        """
        kinds = [(kind, cfg) for kind, cfg in self.layer_configs().values()]
        unknown = [kind for kind, _ in kinds if kind not in _INERT_LAYERS and kind != "Rescaling"]
        rescaling = [cfg for kind, cfg in kinds if kind == "Rescaling"]
        if unknown or len(rescaling) > 1:
            return None
        if not rescaling:
            return "none"
        scale, offset = rescaling[0].get("scale"), rescaling[0].get("offset", 0.0)
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in (scale, offset)) or scale <= 0:
            return None
        return float(scale), float(offset)

    def input_size(self):
        """H of the first square (N, H, H, 3) InputLayer in model_config, or None."""
        for kind, cfg in self.layer_configs().values():
            shape = cfg.get("batch_input_shape", cfg.get("batch_shape")) if kind == "InputLayer" else None
            if (isinstance(shape, list) and len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0
                    and shape[1] == shape[2]):
                return shape[1]
        return None


def _layer_configs(model_config, max_depth=16):
    """{layer name: (class_name, config)} of every layer model_config lists, nested models' layers included."""
    out = {}

    def walk(config, depth):  # a model's config: {"layers": [...]} (a bare list in Keras 2.0's Sequential)
        if depth > max_depth:
            raise ValueError(f"model_config nests models more than {max_depth} deep")
        layers = config.get("layers") if isinstance(config, dict) else config
        for layer in layers if isinstance(layers, list) else ():
            if isinstance(layer, dict) and isinstance(layer.get("class_name"), str) and \
                    isinstance(layer.get("config"), dict):
                name = layer.get("name", layer["config"].get("name"))
                if isinstance(name, str):
                    out.setdefault(name, (layer["class_name"], layer["config"]))
                walk(layer["config"], depth + 1)  # a nested model lists its own layers

    if isinstance(model_config, dict):
        walk(model_config.get("config"), 0)
    return out


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.bytes_):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _attr(obj, key, name):
    """An attribute's value after checking its stored size, or None when absent."""
    if key not in obj.attrs:
        return None
    aid = obj.attrs.get_id(key)  # attributes are stored uncompressed in the file, but say so before reading
    size = int(np.prod(aid.shape or (), dtype=np.int64)) * aid.dtype.itemsize
    if size > MAX_ATTR_BYTES:
        raise CheckpointError(f"{name}: attribute '{printable(key)}' is {size} bytes, over the "
                              f"{MAX_ATTR_BYTES}-byte limit")
    return obj.attrs[key]


def _names_attr(obj, key, name):
    """A list-of-strings attribute, joined from Keras's chunks key0, key1, ... when it was split; None if absent."""
    value = _attr(obj, key, name)
    if value is None:
        chunks, i = [], 0
        while f"{key}{i}" in obj.attrs and i <= MAX_LAYERS:
            chunks.append(_attr(obj, f"{key}{i}", name))
            i += 1
        if not chunks:
            return None
        value = np.concatenate([np.atleast_1d(c) for c in chunks])
    value = np.atleast_1d(value)
    if value.ndim != 1 or value.size > MAX_LAYERS:
        raise CheckpointError(f"{name}: attribute '{key}' has shape {value.shape}, expected a list of names")
    return [_text(v) for v in value]


def _hard_child(group, key, name, where):
    """group[key] following hard links only (an external or soft link could reach outside the file)."""
    import h5py

    node = group
    for part in [p for p in key.split("/") if p]:
        link = node.get(part, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            raise CheckpointError(f"{name}: '{printable(where)}' is a {type(link).__name__}; only data stored in "
                                  "the file itself is read")
        node = node[part]
    return node


def _read_dataset(ds, name, where, budget):
    """The dataset's values as float32 after checking what it declares; returns (array, bytes read)."""
    import h5py

    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{name}: '{printable(where)}' is a group, expected a weight array")
    shape = tuple(int(d) for d in ds.shape) if ds.shape is not None else None
    if shape is None or len(shape) > MAX_NDIM:
        raise CheckpointError(f"{name}: weight '{printable(where)}' has shape {shape}; at most {MAX_NDIM} dims")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{name}: weight '{printable(where)}' declares {count} elements, over the "
                              f"{MAX_TENSOR_ELEMENTS} limit")
    if ds.dtype.kind != "f" or ds.dtype.itemsize not in (2, 4, 8):
        raise CheckpointError(f"{name}: weight '{printable(where)}' has dtype {ds.dtype}, expected float")
    if ds.external or ds.is_virtual:
        raise CheckpointError(f"{name}: weight '{printable(where)}' is stored outside the file; refused")
    nbytes = count * ds.dtype.itemsize
    if nbytes > budget:
        raise CheckpointError(f"{name}: weight '{printable(where)}' would read {nbytes} bytes, over what a file of "
                              f"this size may hold ({MAX_READ_RATIO}x + 1 MiB; compressed padding?)")
    value = np.asarray(ds[()], dtype=np.float32)
    if not np.all(np.isfinite(value)):
        raise CheckpointError(f"{name}: weight '{printable(where)}' contains NaN or Inf")
    return value, nbytes


def h5_kind(path):
    """"keras" for a Keras 2 weight file, "lightcnn" for lightcnn's own format, None for another HDF5 file.

    Told apart by attributes: lightcnn writes format="lightcnn"; Keras writes layer_names (at the root for
    save_weights, in model_weights/ for save). Raises CheckpointError for a file that is not HDF5.
    """
    import h5py

    name = printable(path)
    data = read_regular_file(path, MAX_FILE_BYTES, CheckpointError, "an HDF5 weight file", name)
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            if _text(f.attrs.get("format", "")) == "lightcnn":
                return "lightcnn"
            for group in (f, _hard_child(f, "model_weights", name, "model_weights")):
                if group is not None and ("layer_names" in group.attrs or "layer_names0" in group.attrs):
                    return "keras"
            return None
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{name}: not a readable HDF5 file ({_reason(exc)})") from None


def _reason(exc):
    text = str(exc).split(";")[0].split("(")[0].strip() or type(exc).__name__
    return " ".join(text.split())


def read_keras_h5(path):
    """Read a Keras 2 ``.h5`` weight file into `KerasH5` (see the module docstring), or raise CheckpointError."""
    import h5py

    name = printable(path)
    data = read_regular_file(path, MAX_FILE_BYTES, CheckpointError, "a Keras .h5 weight file", name)
    budget = MAX_READ_RATIO * len(data) + READ_SLACK
    try:
        f = h5py.File(io.BytesIO(data), "r")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{name}: not a readable HDF5 file ({_reason(exc)})") from None
    try:
        with f:
            return _read(f, name, budget)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:  # h5py's errors on damaged content
        raise CheckpointError(f"{name}: corrupt HDF5 content ({type(exc).__name__}: {_reason(exc)})") from None


def _read(f, name, budget):
    import h5py

    if _text(f.attrs.get("format", "")) == "lightcnn":
        raise CheckpointError(f"{name}: already a lightcnn weight file; nothing to convert")
    root = f
    layer_names = _names_attr(f, "layer_names", name)
    if layer_names is None:
        root = _hard_child(f, "model_weights", name, "model_weights")
        layer_names = None if root is None else _names_attr(root, "layer_names", name)
    if layer_names is None:
        keras3 = _hard_child(f, "layers", name, "layers") is not None
        raise CheckpointError(f"{name}: no 'layer_names' attribute: not a Keras 2 .h5 weight file"
                              + (" (Keras 3 .weights.h5 layout; save with keras 2 or model.save('x.h5'))"
                                 if keras3 else ""))
    config = _attr(f, "model_config", name)
    model_config = None
    if config is not None:
        try:
            model_config = json.loads(_text(config))
            _layer_configs(model_config)  # fails here, not later, on a pathological one
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{name}: attribute 'model_config' is not usable JSON ({_reason(exc)})") from None
    weights, names = {}, {}
    for layer in layer_names:
        group = _hard_child(root, layer, name, layer)
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"{name}: layer '{printable(layer)}' is listed in layer_names but has no group")
        weight_names = _names_attr(group, "weight_names", name) or []
        parts = [_INDEX_SUFFIX.sub("", w).split("/") for w in weight_names]
        owners = {p[-2] if len(p) > 1 else layer for p in parts}
        for weight_name, part in zip(weight_names, parts):
            # a plain layer lists only its own variables (whatever scope prefix they carry): file them under the
            # layer's name; a nested model lists its sublayers': file each under the sublayer it names
            owner = layer if len(owners) == 1 or len(part) < 2 else part[-2]
            where = f"{layer}/{weight_name}"
            dataset = _hard_child(group, weight_name, name, where)
            if dataset is None:
                raise CheckpointError(f"{name}: weight '{printable(where)}' is listed in weight_names but missing")
            value, nbytes = _read_dataset(dataset, name, where, budget)
            budget -= nbytes
            variables = weights.setdefault(owner, {})
            if part[-1] in variables:
                raise CheckpointError(f"{name}: layer '{printable(owner)}' has two '{printable(part[-1])}' weights")
            variables[part[-1]] = value
            names[(owner, part[-1])] = _INDEX_SUFFIX.sub("", weight_name) if len(part) > 1 else f"{owner}/{part[-1]}"
    version, backend = _attr(root, "keras_version", name), _attr(root, "backend", name)
    return KerasH5(weights=weights, model_config=model_config, names=names,
                   keras_version=None if version is None else _text(version),
                   backend=None if backend is None else _text(backend))
