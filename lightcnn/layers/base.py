"""The Layer protocol: named parameters, a training-only cache, forward and backward.

A layer holds
  params   name -> array      trainable tensors (saved in checkpoints, updated by optimisers)
  buffers  name -> array      non-trainable state saved in checkpoints (batch-norm running statistics)
  grads    name -> array      filled by backward(), same keys as params (absent while frozen)
  cache                       what backward needs; set only by forward(training=True) and
                              cleared by the backward() that consumes it

Inference (training=False) stores nothing on the object, so one model can serve
several threads. `frozen` stops parameter gradients (and, for batch norm, pins
the running statistics) while still passing dx upstream, which is what
fine-tuning the top of a network needs.

Containers expose their children by name; the dotted path of a parameter is its
checkpoint name (``blocks.3.dw.conv.weight``), so loading is by name, never by order.
"""

import contextlib

import numpy as np

from lightcnn.errors import ShapeError


def check_nhwc(x, layer_name, channels=None):
    """Validate an activation batch: float32/float64, rank 4, NHWC with `channels` channels."""
    if not isinstance(x, np.ndarray):
        raise ShapeError(f"{layer_name}: expected a numpy array of shape (N, H, W, C), got {type(x).__name__}")
    if x.ndim != 4:
        raise ShapeError(f"{layer_name}: expected shape (N, H, W, C), got rank {x.ndim} shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ShapeError(f"{layer_name}: expected float32 (N, H, W, C), got dtype {x.dtype}")
    if channels is not None and x.shape[3] != channels:
        hint = " (is the batch NCHW? lightcnn uses NHWC)" if x.shape[1] == channels else ""
        raise ShapeError(
            f"{layer_name}: expected shape (N, H, W, {channels}), got {x.shape}{hint}"
        )
    return x


def check_rank2(x, layer_name, features=None):
    """Validate a (N, F) batch."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        shape = getattr(x, "shape", None)
        raise ShapeError(f"{layer_name}: expected shape (N, F), got {shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ShapeError(f"{layer_name}: expected float32 (N, F), got dtype {x.dtype}")
    if features is not None and x.shape[1] != features:
        raise ShapeError(f"{layer_name}: expected shape (N, {features}), got {x.shape}")
    return x


class Layer:
    """Base class: parameter bookkeeping shared by leaves and containers."""

    #: a "unit" is the smallest thing summaries and profiles report as one row
    is_unit = False
    #: a container whose input goes only to its first child, and whose input gradient is that
    #: child's (Sequential, a conv unit); not one with a skip connection (see `input_gradient_skipped`)
    first_child_takes_input = False

    def __init__(self):
        self._params = {}
        self._held = {}  # key -> (packed panels, shape) of params held only packed (hold_packed)
        self.buffers = {}
        self.grads = {}
        self.frozen = False
        self.cache = None
        self.name = type(self).__name__
        self.skip_input_grad = False  # backward() may return None: nothing upstream needs dx

    # -- parameters, and the predict-only packed form ----------------------------------
    @property
    def params(self):
        """name -> array, the trainable tensors. A weight held only as packed GEMM panels (hold_packed: a
        predict-only model on the numba engine) is unpacked back first, bit-identical, so whoever asks for
        params (training, export, summaries, Grad-CAM, the NumPy engine) sees the plain arrays."""
        if self.__dict__.get("_held"):
            self._unpack_held()
        return self._params

    @params.setter
    def params(self, value):
        self._params, self._held = value, {}

    def hold_packed(self, key, panels):
        """Keep params[key] only as `panels` = lightcnn.kernels.gemm.pack_panels(params[key] as (K, O)), the
        copy the numba kernels read: the plain array is dropped (a predict-only model then holds its GEMM
        weights once, not twice; MobileNetV2: 13 MB). The next access to `params` unpacks it back."""
        value = self._params[key]
        if value is None:  # held already (another thread's plan got there first)
            return
        self._held[key] = (panels, value.shape)
        self._params[key] = None  # the key keeps its place: state_dict and optimisers see the same order

    def held_panels(self, key):
        """The panels params[key] is held as (hold_packed), or None when it is a plain array."""
        entry = self.__dict__.get("_held", {}).get(key)
        return None if entry is None else entry[0]

    def peek_param(self, key):
        """params.get(key) without unpacking held weights (None for a held one): for the inference plan."""
        return self._params.get(key)

    def _unpack_held(self):
        from lightcnn.kernels.gemm import unpack_panels

        # each array is in place before the held entry goes: another thread never sees a None parameter
        for key, (panels, shape) in list(self._held.items()):
            self._params[key] = unpack_panels(panels, shape)
        self._held = {}

    # -- the protocol ---------------------------------------------------------------
    def forward(self, x, training=False):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def children(self):
        """(name, layer) pairs of direct sub-layers, in forward order."""
        return []

    # -- tree walking ---------------------------------------------------------------
    def named_layers(self, prefix=""):
        """Every layer in the tree with its dotted path, parents before children."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        for path, layer in self.named_layers(prefix):
            for key, value in layer.params.items():
                yield (f"{path}.{key}" if path else key), layer, key, value

    def state_dict(self):
        """All parameters and buffers by dotted name (the checkpoint's tensors)."""
        state = {}
        for path, layer in self.named_layers():
            for store in (layer.params, layer.buffers):
                for key, value in store.items():
                    state[f"{path}.{key}" if path else key] = value
        return state

    def set_frozen(self, frozen=True):
        """Freeze or unfreeze this layer and everything under it."""
        for _, layer in self.named_layers():
            layer.frozen = frozen
        return self

    def params_changed(self):
        """Drop derived inference state (folded batch-norm weights) after parameters change."""
        for _, layer in self.named_layers():
            layer._on_params_changed()

    def _on_params_changed(self):
        # counted so inference plans repack the weights they keep packed (lightcnn.layers.plan.Weights.packed)
        self.params_version = getattr(self, "params_version", 0) + 1

    def clear_cache(self):
        for _, layer in self.named_layers():
            layer.cache = None

    def zero_grads(self):
        for _, layer in self.named_layers():
            layer.grads = {}

    # -- summary support ------------------------------------------------------------
    def macs(self, in_shape, out_shape):
        """Multiply-accumulates of one forward pass for these shapes (leaves override)."""
        return 0

    def __repr__(self):
        return f"{type(self).__name__}()"


def input_layer(net):
    """The leaf that receives `net`'s input, reached through containers whose first child takes the
    input and gives the input gradient (``first_child_takes_input``); None when there is no such leaf."""
    layer = net
    if not isinstance(layer, Layer):
        return None
    while layer.children():
        if not layer.first_child_takes_input:
            return None
        layer = layer.children()[0][1]
    return layer


def skip_input_gradient(net, skip=True):
    """Whether `net`'s input layer computes the gradient w.r.t. the input; returns the previous setting.

    With skip=True net.backward returns None. For training: nothing upstream of the trained network
    needs dL/d(input) (the images, or cached boundary activations), and for a first convolution on a
    227x227 image that gradient is a GEMM and a col2im over the whole input. Conv2d honours the flag;
    any other input layer ignores it.
    """
    layer = input_layer(net)
    if layer is None:
        return False
    previous, layer.skip_input_grad = layer.skip_input_grad, bool(skip)
    return previous


@contextlib.contextmanager
def input_gradient_skipped(net):
    """`skip_input_gradient(net)` inside the block, the previous setting restored after it; yields the layer."""
    previous = skip_input_gradient(net, True)
    try:
        yield input_layer(net)
    finally:
        skip_input_gradient(net, previous)


class Sequential(Layer):
    """Children applied in order; backward runs them in reverse."""

    first_child_takes_input = True

    def __init__(self, layers=()):
        super().__init__()
        self.layers = []
        for item in layers:
            if isinstance(item, tuple):
                self.append(*item)
            else:
                self.append(str(len(self.layers)), item)

    def append(self, name, layer):
        self.layers.append((str(name), layer))
        return layer

    def children(self):
        return list(self.layers)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.layers[key][1]
        for name, layer in self.layers:
            if name == key:
                return layer
        raise KeyError(key)

    def __len__(self):
        return len(self.layers)

    def forward(self, x, training=False):
        for _, layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dy):
        for _, layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy  # None when the first layer skips its input gradient (input_gradient_skipped)
