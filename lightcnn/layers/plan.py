"""Inference plan: a layer tree lowered, once per input shape, into a list of fused steps over reused buffers.

    plan = InferencePlan([("features", trunk), ("head", head)], (N, H, W, C), engine="numba")
    logits = plan.run(x)                # the same numbers as the layers' forward(x, training=False)

Why: the layer-by-layer path allocates every activation, validates every argument and
runs bias, activation, residual and concat as separate passes over memory. On a batch
of one image that overhead is most of the time. A plan does that work once:

  - every unit becomes one step naming an op and its resolved arguments (padding, output
    views, weights); conv + folded batch norm + activation (+ residual add) is one op;
    squeeze-excitation's channel scale is applied in place by the gate step (the project conv then
    reads the scaled tensor: no scaled copy of it per GEMM tile), and such a bottleneck's expand and
    depthwise convs are one `inverted_residual` step without a project conv (NAME.expand+dw);
    Fire's expand 1x1 and 3x3 write side by side into one buffer (no concat copy), and a Fire
    module whose 3x3 expand is stride 1, padded by 1 is one step (`fire`), whose parts are those three steps;
    a KxK conv read only by a max pool is one step with it (`conv_max_pool`), and so is a Fire (`fire_max_pool`);
    a pointwise conv read only by a global average pool is one step with it (`pointwise_gap`);
  - activations live in an arena of flat buffers planned here: a buffer returns to the
    free list when the last step that reads its tensor has been planned, so a network
    needs a handful of buffers, not one per layer, and they stay warm in cache.

Two engines execute the same step list. This module is the one place that knows the
layer types (the lowering); an engine only maps each op to code:

  numba   lightcnn.layers.plan_numba: fused Numba kernels (tiled GEMM epilogues, a whole
          bottleneck band by band); fastest once compiled (python -m lightcnn.compile).
  numpy   lightcnn.layers.plan_numpy: BLAS matmuls and strided NumPy passes; never imports
          numba, so the first result comes without any compilation.

The ops: copy, pointwise, pointwise_gap, conv, conv_max_pool, fire_max_pool, depthwise, inverted_residual, fire, se_gate, scale, gap, dense,
max_pool, transpose_conv, place (a tensor into a channel range of a wider one, cropped or
zero-padded at the bottom/right), fake_quant, add, and opaque (a layer the lowering does not know runs its own
forward; the numba engine only). A layer that simulates a quantised runtime (lightcnn.quantsim
sets `_fake_quant` on it) is lowered with `fake_quant` steps at the tensors the runtime rounds,
and without the fusions that would skip them.

What is never cached: weights. Each call asks the layer for them (ConvBNAct's folded
weights are cached by the layer itself and dropped by params_changed()), so a plan is
never stale after fine-tuning or loading a checkpoint. The one derived copy, the numba
engine's packed GEMM weights (Weights.packed), is redone when those arrays change or the
unit's params_changed() runs. Only float32 inputs use plans.

A plan owns mutable buffers, so it is used by one thread at a time; Model keeps one per
(thread, input shape, engine) and the result returned to the caller is always a fresh array.
"""

import time

import numpy as np

from lightcnn.kernels import activation as act_k
from lightcnn.kernels.gemm import aligned_empty, pack_panels
from lightcnn.kernels.shapes import conv_output_size
from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import (Conv2d, Dense, DepthwiseConv2d, Dropout, Flatten, GlobalAvgPool, MaxPool2d,
                                   resolve_padding)
from lightcnn.layers.blocks import ConvBNAct, Fire, InvertedResidual, SqueezeExcite

ENGINES = ("numba", "numpy")

_F32 = np.float32
# A bottleneck is one inverted_residual step (the numba engine runs it band by band, never writing
# the expanded tensor) when that tensor is at least _FUSE_MIN_BYTES for the batch or
# _FUSE_MIN_IMAGE_BYTES for one image; smaller ones stay in cache anyway and parallelise better as
# GEMMs. The per-image rule only matters at batch 1-3: it fuses MobileNetV2's 56x56x144 blocks
# (arena 7.6 -> 3.0 MB, batch-1 forward ~4.5 -> ~3.9 ms in back-to-back runs, noisy) and, since it is
# 512 KB rather than 1 MB, MobileNetV2's 28x28x192 blocks and MobileNetV3-Large's 112x112x16 and
# 56x56x72 ones (batch 1, 2 threads, interleaved: MobileNetV2 4.82-4.89 -> 4.60-4.63 ms, MobileNetV3-Large
# 4.73-4.92 -> 4.50-4.57 ms; one thread the fused blocks take 0.72-0.89x their unfused time).
_FUSE_MIN_BYTES = 1 << 22
_FUSE_MIN_IMAGE_BYTES = 1 << 19

_KNOWN = (Sequential, Dropout, ConvBNAct, InvertedResidual, Fire, GlobalAvgPool, Dense, MaxPool2d, Flatten, Conv2d,
          DepthwiseConv2d, SqueezeExcite)


def _own_class(layer):
    """The class whose forward the layer runs: quantsim's rounding subclasses count as their original."""
    cls = type(layer)
    return getattr(cls, "_original_class", cls) if hasattr(layer, "_fake_quant") else cls


def _plain(layer):
    """True unless the layer is a subclass of a known layer that replaces its forward: the planner
    reproduces the known classes' forward, never an override it cannot see."""
    cls = _own_class(layer)
    for known in _KNOWN:
        if issubclass(cls, known):
            return cls.forward is known.forward
    return True


def _grids(layer):
    """(input grid, output grid) that a simulated quantised runtime rounds this layer's tensors to."""
    return getattr(layer, "_fake_quant", None) or (None, None)


def _any_rounding(layer):
    return any(hasattr(sub, "_fake_quant") for _, sub in layer.named_layers())


class Val:
    """A tensor of the plan: its shape, and either a slot in the arena or (dynamic) a runtime value."""

    __slots__ = ("shape", "buf", "array", "refs", "index")

    def __init__(self, shape, index):
        self.shape, self.index = tuple(shape), index
        self.buf, self.array, self.refs = None, None, 0


class Step:
    """One op of the plan: `op` names it, `vals` are its tensors (Val), `params` everything else."""

    __slots__ = ("op", "name", "vals", "params")

    def __init__(self, op, name, vals, params):
        self.op, self.name, self.vals, self.params = op, name, vals, params

    def __repr__(self):
        return f"Step({self.op!r}, {self.name!r})"


class _Arena:
    """Flat float32 buffers handed out best-fit and returned when their tensor dies."""

    def __init__(self):
        self.buffers, self.free = [], []

    def take(self, size):
        fits = [i for i in self.free if self.buffers[i].size >= size]
        if fits:
            best = min(fits, key=lambda i: self.buffers[i].size)
            self.free.remove(best)
            return best
        self.buffers.append(aligned_empty(max(size, 1)))  # on a cache line: the tiles' vector stores
        return len(self.buffers) - 1

    def give_back(self, index):
        self.free.append(index)

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers)


class Weights:
    """Live weights of a unit, reshaped for its kernel; the reshape is redone only when the array changes."""

    def __init__(self, fetch, shape, unit=None):
        self.fetch, self.shape, self.unit = fetch, shape, unit
        # the layer whose params["weight"] packed weights copy (ConvBNAct's conv, a Dense itself): when fetch
        # returns that very array (no BN to fold, float32) a predict-only model may hold it only packed
        self.owner = None if unit is None else getattr(unit, "conv", unit)
        self.src, self.b_src, self.w, self.b, self.wp, self.wp_version = None, None, None, None, None, None

    def __call__(self):
        w, b = self.fetch()
        if w is not self.src or b is not self.b_src:
            self.src, self.b_src = w, b
            self.w = np.ascontiguousarray(w, dtype=_F32).reshape(self.shape)
            self.wp = None
            n_out = self.shape[-1]
            self.b = np.zeros(n_out, _F32) if b is None else np.ascontiguousarray(b, dtype=_F32)
            if w.dtype != _F32 or (b is not None and b.dtype != _F32):
                self.src = None  # a cast copy would miss in-place updates: redo it every call
        return self.w, self.b

    def packed(self):
        """(wp, b): the weights as (K, O) packed into lightcnn.kernels.gemm's panels.

        A copy, so it is redone whenever the unit's arrays are new ones (BN folding, a cast) or
        the unit's params_changed() ran: in-place updates count once params_changed() says so,
        as every optimiser and checkpoint load in lightcnn does.
        """
        held = None if self.owner is None else self.owner.held_panels("weight")
        if held is not None:  # the panels are the weight (hold_packed): its plain array is not asked for
            b = self.owner.peek_param("bias")
            if self.b is None or b is not self.b_src:
                self.b_src = b
                self.b = np.zeros(self.shape[-1], _F32) if b is None else np.ascontiguousarray(b, dtype=_F32)
            return held, self.b
        w, b = self()
        version = getattr(self.unit, "params_version", 0)
        if self.wp is None or self.src is None or version != self.wp_version:
            self.wp, self.wp_version = pack_panels(w.reshape(-1, self.shape[-1])), version
        return self.wp, b

    def hold_packed(self):
        """Pack now, and let the owner layer keep its weight only as these panels (Layer.hold_packed) when
        they are a copy of that very parameter (not of BN-folded or cast weights, which could not be
        unpacked back into it)."""
        if self.owner is None or self.owner.held_panels("weight") is not None:
            return
        wp, _ = self.packed()
        if self.src is not None and self.src is self.owner.peek_param("weight"):
            self.owner.hold_packed("weight", wp)
            self.src = self.w = None  # nor does this object keep the plain array alive


def _dense_weights(layer):
    """A Dense layer's (in, out) weights (packed ones are redone when the layer's params_changed() runs)."""
    return Weights(lambda: (layer.params["weight"], layer.params.get("bias")), (layer.in_features, layer.out_features),
                   layer)


class InferencePlan:
    """Lower `layers` [(name, layer), ...] (applied in order) for float32 inputs of `in_shape` (N,H,W,C),
    to be run by `engine` ("numba" or "numpy")."""

    def __init__(self, layers, in_shape, engine="numba", threads=None):
        if engine not in ENGINES + ("auto",):
            raise ValueError(f"unknown engine {engine!r}: use one of auto, {', '.join(ENGINES)}")
        self.engine = engine
        self.in_shape = tuple(int(s) for s in in_shape)
        if threads is None:
            from lightcnn._jit import get_num_threads

            threads = get_num_threads()
        self.threads = threads
        self.steps = []          # Step, in order
        self._values = []        # every Val, by index
        self._arena = _Arena()
        x = self._new(self.in_shape, dynamic=True)
        self.input_index = x.index
        out = x
        for name, layer in layers:
            out = self._lower(layer, out, name)
        self.output_index = out.index
        self.output_shape = out.shape
        self.steps = _fuse_conv_max_pool(self.steps)
        for v in self._values:
            if v.buf is not None:
                v.array = self._arena.buffers[v.buf][:int(np.prod(v.shape))].reshape(v.shape)
        self.vals = [v.array for v in self._values]  # the runtime table: arrays by Val.index
        if engine == "auto":  # numba only if every kernel this plan calls is compiled and cached already
            from lightcnn.engine import kernels_ready

            engine = self.engine = "numba" if kernels_ready(self.numba_kernels()) else "numpy"
            if engine == "numpy" and any(s.op == "opaque" for s in self.steps):
                engine = self.engine = "numba"  # the layer path compiles anyway: better the fast engine
        if engine == "numba":
            from lightcnn.layers import plan_numba as backend
        else:
            from lightcnn.layers import plan_numpy as backend
        self._fns = [backend.bind(step, self) for step in self.steps]
        self._context = backend.run_context(self)

    def hold_weights_packed(self):
        """Let every layer whose weight the numba engine reads as packed GEMM panels keep only those panels
        (Weights.hold_packed): a predict-only model (Model.weights_packed_only) then holds its pointwise and
        dense weights once (MobileNetV2: 13 MB less). Anything that asks a layer for its params afterwards
        gets them unpacked back, bit-identical."""
        if self.engine != "numba":
            return
        def leaves(step):  # a fused step's parts, and theirs (fire_max_pool's Fire has its three convs)
            parts = step.params.get("parts")
            return [leaf for part in parts for leaf in leaves(part)] if parts else [step]

        for step in self.steps:
            for part in leaves(step):
                for value in part.params.values():
                    if isinstance(value, Weights):
                        value.hold_packed()

    def numba_kernels(self):
        """The lightcnn._jit.Kernel objects the numba engine would call for this plan."""
        from lightcnn.layers.plan_numba import kernels_for

        seen = {}
        for step in self.steps:
            for k in kernels_for(step, self):
                seen[k.key] = k
        return list(seen.values())

    # ---------------------------------------------------------------- values and buffers
    def _new(self, shape, dynamic=False):
        v = Val(shape, len(self._values))
        self._values.append(v)
        if not dynamic:
            v.buf = self._arena.take(int(np.prod(shape)))
        v.refs = 1
        return v

    def _hold(self, v):
        v.refs += 1

    def _release(self, v):
        v.refs -= 1
        if v.refs == 0 and v.buf is not None:
            self._arena.give_back(v.buf)

    @property
    def arena_bytes(self):
        return self._arena.nbytes

    def arg(self, v, shape=None):
        """(static array or None, index): engines read static arrays directly, dynamic ones via vals[index]."""
        if v is None:
            return None, None
        if v.array is None:
            return None, v.index
        return (v.array if shape is None else v.array.reshape(shape)), v.index

    def _step(self, op, name, vals, **params):
        self.steps.append(Step(op, name, vals, params))

    # The lowering API for a layer that describes its own inference graph: a layer class with a
    # method lower_inference(plan, x, name) -> Val is lowered by calling it (seed 001's trunk does).
    def lower(self, layer, x, name):
        """Lower `layer` applied to x (a Val); returns its output Val and releases x."""
        return self._lower(layer, x, name)

    def new(self, shape):
        """A new tensor of `shape` in the arena, held once."""
        return self._new(shape)

    def hold(self, v):
        """One more reader of v: v's buffer stays reserved until release() is called once more."""
        self._hold(v)

    def release(self, v):
        self._release(v)

    def step(self, op, name, vals, **params):
        """Append a step (see the op list in the module docstring)."""
        self._step(op, name, vals, **params)

    # ---------------------------------------------------------------- lowering
    def _lower(self, layer, x, name):
        """Plan `layer` applied to value x; returns the output value. Releases x."""
        qin, qout = _grids(layer)
        if qin is not None:
            x = self._fake_quant(x, qin, name, copy=True)
        y = self._lower_layer(layer, x, name)
        if qout is not None and not isinstance(layer, ConvBNAct):  # a conv unit rounds its own output
            y = self._fake_quant(y, qout, name)
        return y

    def _lower_layer(self, layer, x, name):
        own_lowering = getattr(_own_class(layer), "lower_inference", None)
        if own_lowering is not None:
            return own_lowering(layer, self, x, name)
        if not _plain(layer):  # a subclass with its own forward: run that forward
            return self._opaque(layer, x, name)
        if isinstance(layer, Sequential):
            for child_name, child in layer.children():
                x = self._lower(child, x, f"{name}.{child_name}" if name else child_name)
            return x
        if isinstance(layer, Dropout):
            return x
        in_ch = getattr(layer, "in_ch", None)
        if in_ch is not None and (len(x.shape) != 4 or x.shape[3] != in_ch):
            raise Unsupported(f"{name}: expects {in_ch} channels, gets {x.shape}")  # the layer path explains
        if isinstance(layer, ConvBNAct):
            return self._conv_unit(layer, x, name)
        if isinstance(layer, InvertedResidual):
            return self._inverted_residual(layer, x, name)
        if isinstance(layer, Fire):
            return self._fire(layer, x, name)
        if isinstance(layer, SqueezeExcite) and len(x.shape) == 4:
            x = self._materialise(x, name)
            s = self._se_gate(layer, x, name)
            y = self._new(x.shape)
            self._step("scale", name, dict(x=x, s=s, y=y))
            self._release(s)
            self._release(x)
            return y
        if isinstance(layer, GlobalAvgPool) and len(x.shape) == 4:
            y = self._new((x.shape[0], x.shape[3]))
            self._step("gap", name, dict(x=x, y=y))
            self._release(x)
            return y
        if isinstance(layer, Dense) and len(x.shape) == 2 and x.shape[1] == layer.in_features:
            y = self._new((x.shape[0], layer.out_features))
            self._step("dense", name, dict(x=x, y=y), weights=_dense_weights(layer), act=layer.act, alpha=_F32(1.0))
            self._release(x)
            return y
        if isinstance(layer, MaxPool2d) and len(x.shape) == 4:
            return self._max_pool(layer, x, name)
        if isinstance(layer, Flatten) and len(x.shape) == 4 and x.shape[1:3] == (1, 1) and x.buf is not None:
            y = Val((x.shape[0], x.shape[3]), len(self._values))  # a view of x's buffer; takes over x's reference
            self._values.append(y)
            y.buf, y.refs = x.buf, x.refs
            return y
        return self._opaque(layer, x, name)

    def _opaque(self, layer, x, name):
        """Any other layer: its own forward(x, training=False), output a fresh array per call."""
        if self.engine == "numpy":  # that forward runs Numba kernels
            raise Unsupported(f"the numpy engine cannot run {name} ({type(layer).__name__}, a layer it does not know)")
        forward = type(layer).forward  # the class's: tools may wrap the instance's (Model.trace)
        probe = forward(layer, np.zeros(x.shape, _F32), False)
        y = self._new(probe.shape, dynamic=True)
        self._step("opaque", name, dict(x=x, y=y), layer=layer, forward=forward)
        self._release(x)
        return y

    def _fake_quant(self, x, grid, name, copy=False):
        """Round x to a quantised runtime's grid: in place, or (copy, for a layer's input that
        other steps may still read) into a new tensor."""
        if x.buf is None or copy:
            y = self._new(x.shape)
            self._step("fake_quant", f"{name}.fake_quant", dict(x=x, y=y), grid=grid)
            self._release(x)
            return y
        self._step("fake_quant", f"{name}.fake_quant", dict(x=x, y=x), grid=grid)
        return x

    # ---- convolution units
    def _conv_unit(self, unit, x, name, res=None, scale=None, out=None, col0=0):
        """ConvBNAct with its folded weights; optional residual `res` (value), SE `scale` (value),
        and output `out` (value of a wider buffer, written at column col0)."""
        conv = unit.conv
        n, h, w, c = x.shape
        pads = conv.pads(h, w)
        kh, kw = conv.kernel
        sh, sw = conv.stride
        ho = conv_output_size(h, kh, sh, pads[0], pads[1])
        wo = conv_output_size(w, kw, sw, pads[2], pads[3])
        for v in (res, scale):
            if v is not None and v.buf is None:
                raise Unsupported(f"{name}: residual/scale from a dynamic tensor")
        qout = _grids(unit)[1]
        if qout is not None and (res is not None or out is not None):
            raise Unsupported(f"{name}: a rounded output cannot share its epilogue")
        y = out if out is not None else self._new((n, ho, wo, unit.out_ch))
        act, alpha = int(unit.act), _F32(unit.alpha)
        if isinstance(conv, DepthwiseConv2d):
            assert res is None and scale is None and out is None
            self._step("depthwise", name, dict(x=x, y=y), weights=Weights(unit.folded_weights, (kh, kw, c)),
                       stride=(sh, sw), top=pads[0], left=pads[2], act=act, alpha=alpha, rows=n * ho * wo)
        elif isinstance(conv, Conv2d):
            pointwise = conv._is_pointwise(pads)
            k = c if pointwise else kh * kw * c
            common = dict(weights=Weights(unit.folded_weights, (k, unit.out_ch), unit), act=act, alpha=alpha, col0=col0,
                          rows=n * ho * wo, width=y.shape[-1])
            if pointwise:
                self._step("pointwise", name, dict(x=x, y=y, res=res, scale=scale), rows_per_image=ho * wo,
                           **common)
            else:
                assert scale is None
                self._step("conv", name, dict(x=x, y=y, res=res), kernel=(kh, kw), stride=(sh, sw), top=pads[0],
                           left=pads[2], out_hw=(ho, wo), **common)
        else:
            return self._opaque(unit, x, name)
        self._release(x)
        if qout is not None:
            self._fake_quant(y, qout, name)
        return y

    def _materialise(self, x, name):
        """A copy of a dynamic tensor (the caller's input) in the arena, for steps that read it late."""
        if x.buf is not None:
            return x
        y = self._new(x.shape)
        self._step("copy", name, dict(x=x, y=y))
        self._release(x)
        return y

    def _inverted_residual(self, block, x, name):
        if block.use_residual:
            x = self._materialise(x, name)
        rounding = _any_rounding(block)
        if not rounding:
            fused_y = self._inverted_residual_fused(block, x, name)
            if fused_y is not None:
                return fused_y
        self._hold(x)  # the residual reads x after the last conv
        y = None if rounding or block.se is None else self._inverted_residual_fused(block, x, name, project=False)
        if y is None:
            y = x
            if block.expand is not None:
                y = self._lower(block.expand, y, f"{name}.expand")
            y = self._lower(block.dw, y, f"{name}.dw")
        if block.se is not None:
            if rounding:  # the runtime rounds x * s: its own step
                y = self._lower(block.se, y, f"{name}.se")
            else:  # the gate step scales y in place: y is read by the project conv only
                self._release(self._se_gate(block.se, y, f"{name}.se", in_place=True))
        if block.use_residual and _grids(block.project)[1] is not None:
            y = self._lower(block.project, y, f"{name}.project")  # rounded before the residual joins
            out = self._new(y.shape)
            self._step("add", f"{name}.add", dict(a=y, b=x, y=out))
            self._release(y)
            y = out
        else:
            res = x if block.use_residual else None
            y = self._conv_unit(block.project, y, f"{name}.project", res=res)
        self._release(x)
        return y

    def _inverted_residual_fused(self, block, x, name, project=True):
        """The whole block as one step, if it has no SE and a large expanded tensor; else None.

        project=False, for a block with SE and an expand conv: its expand and depthwise convs as one step
        (named NAME.expand+dw) whose output, the depthwise conv's, the gate and the project conv then read;
        x stays alive for them (the residual)."""
        dw, pw = block.dw, block.project if project else None
        units = [u for u in (block.expand, dw, pw) if u is not None]
        if (block.se is None) != project or not isinstance(dw.conv, DepthwiseConv2d) or x.buf is None:
            return None
        if not project and block.expand is None:  # a depthwise conv alone: nothing to fuse
            return None
        if not all(isinstance(u.conv, Conv2d) and u.conv._is_pointwise(u.conv.pads(1, 1)) and
                   u.conv.kernel == (1, 1) for u in units if u is not dw):
            return None
        n, h, w, c = x.shape
        e = dw.in_ch
        # Without the project conv (a block with squeeze-excitation) whatever the size: interleaved A/B of
        # MobileNetV3-Large, 2 threads, sustained medians, batch 1 0.94x and batch 8 0.97x the unfused plan's time
        # (a 1 MB threshold: batch 8 0.94-0.95x; the thresholds below, which fuse only its 56x56x72 and 14x14x672
        # blocks: batch 1 0.98-0.99x, batch 8 0.99-1.01x); one thread 0.91x and 0.98x. The expanded tensor of its
        # 56x56x72 block (7 MB at batch 8) was written, then read by the depthwise conv.
        if project and n * h * w * e * 4 < _FUSE_MIN_BYTES and h * w * e * 4 < _FUSE_MIN_IMAGE_BYTES:
            return None
        pads = dw.conv.pads(h, w)
        (kh, kw), (sh, sw) = dw.conv.kernel, dw.conv.stride
        ho = conv_output_size(h, kh, sh, pads[0], pads[1])
        wo = conv_output_size(w, kw, sw, pads[2], pads[3])
        if not project and n * max(1, ho // 4) < (self.threads or 1):
            return None  # the band kernel would leave a thread idle (bands of >= 4 rows) where two steps do not
        y = self._new((n, ho, wo, pw.out_ch if project else e))
        has_expand = block.expand is not None
        self._step("inverted_residual", name if project else f"{name}.expand+dw", dict(x=x, y=y),
                   expand=Weights(block.expand.folded_weights, (c, e), block.expand) if has_expand else None,
                   depthwise=Weights(dw.folded_weights, (kh, kw, e)),
                   project=Weights(pw.folded_weights, (e, pw.out_ch), pw) if project else None,
                   acts=(int(block.expand.act) if has_expand else 0, int(dw.act), int(pw.act) if project else 0),
                   alpha=_F32(dw.alpha), stride=(sh, sw), top=pads[0], left=pads[2],
                   use_res=bool(block.use_residual) and project)
        if project:
            self._release(x)
        return y

    def _se_gate(self, se, x, name, in_place=False):
        """s (N,C) = the SE gate of x; x stays alive, and is scaled by s in place when `in_place` (else a later
        step scales it)."""
        fc1, fc2 = se.fc1, se.fc2
        if fc1.peek_param("bias") is None or fc2.peek_param("bias") is None or fc1.act != act_k.ACT_RELU:
            raise Unsupported(f"{name}: squeeze-excitation without biases or ReLU")
        if not (_plain(fc1) and _plain(fc2)):
            raise Unsupported(f"{name}: squeeze-excitation with an overridden layer")
        s = self._new((x.shape[0], x.shape[3]))
        fc1_in, fc1_out = _grids(fc1)
        grids = (fc1_in, fc1_out, _grids(fc2)[1])
        self._step("se_gate", name, dict(x=x, s=s), fc1=_dense_weights(fc1), fc2=_dense_weights(fc2),
                   gate=int(fc2.act), grids=None if grids == (None, None, None) else grids, in_place=in_place)
        return s

    def _fire(self, fire, x, name):
        if _any_rounding(fire):
            raise Unsupported(f"{name}: rounding inside a Fire module")
        if fire.bypass:
            x = self._materialise(x, name)
        self._hold(x)  # read by the squeeze conv and (bypass) by both expand epilogues
        first = len(self.steps)
        s = self._conv_unit(fire.squeeze, x, f"{name}.squeeze")
        n, h, w, _ = s.shape
        y = self._new((n, h, w, fire.out_ch))
        res = x if fire.bypass else None
        self._hold(s)
        self._conv_unit(fire.expand1x1, s, f"{name}.expand1x1", res=res, out=y, col0=0)
        self._conv_unit(fire.expand3x3, s, f"{name}.expand3x3", res=res, out=y, col0=fire.expand1x1.out_ch)
        parts = self.steps[first:]
        if _fusable_fire(parts, (h, w)):
            # One step: the numba engine runs the module band by band (fused.fire_band); the numpy
            # engine runs the parts, so the squeezed tensor s keeps its buffer.
            del self.steps[first:]
            self._step("fire", name, dict(x=x, y=y, res=res), parts=parts)
        self._release(x)
        return y

    def _max_pool(self, layer, x, name):
        from lightcnn.kernels.pool import _window_args

        n, h, w, c = x.shape
        pads = resolve_padding(layer.padding, h, w, *layer.kernel, *layer.stride)
        kh, kw, sh, sw, pads, ho, wo = _window_args(x.shape, layer.kernel, layer.stride, pads, layer.ceil_mode)
        y = self._new((n, ho, wo, c))
        self._step("max_pool", name, dict(x=x, y=y), kernel=(kh, kw), stride=(sh, sw), top=pads[0], left=pads[2])
        self._release(x)
        return y

    # ---------------------------------------------------------------- running
    def run(self, x):
        """y = the layers applied to x (N,H,W,C) float32 C-contiguous; y is a fresh array."""
        vals = self.vals
        vals[self.input_index] = x
        try:
            with self._context():
                for fn in self._fns:
                    fn(vals)
            return np.array(vals[self.output_index], copy=True)
        finally:
            vals[self.input_index] = None

    def profile(self, x, repeats=5):
        """{step name: median milliseconds} over `repeats` runs (steps of one name are summed)."""
        vals = self.vals
        names = [s.name for s in self.steps]
        times = {name: [] for name in names}
        for _ in range(repeats):
            vals[self.input_index] = x
            per = {}
            with self._context():
                for name, fn in zip(names, self._fns):
                    t0 = time.perf_counter()
                    fn(vals)
                    per[name] = per.get(name, 0.0) + time.perf_counter() - t0
            for name, t in per.items():
                times[name].append(t)
        vals[self.input_index] = None
        return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def _fusable_fire(parts, hw):
    """Whether a Fire module's three steps are the squeeze 1x1, the expand 1x1 and a 3x3 stride-1 expand padded
    by one pixel on every side (what fused.fire_band computes)."""
    if [step.op for step in parts] != ["pointwise", "pointwise", "conv"] or len({p.params["alpha"] for p in parts}) != 1:
        return False
    squeeze, expand3 = parts[0], parts[2]
    return (squeeze.vals["res"] is None and squeeze.vals["scale"] is None and squeeze.params["col0"] == 0
            and squeeze.params["width"] == squeeze.params["weights"].shape[-1] and parts[1].vals["scale"] is None
            and expand3.params["kernel"] == (3, 3) and expand3.params["stride"] == (1, 1)
            and (expand3.params["top"], expand3.params["left"]) == (1, 1) and expand3.params["out_hw"] == hw)


def _fuse_conv_max_pool(steps):
    """Steps with each KxK conv that feeds only a max pool merged with it into one `conv_max_pool` step
    (SqueezeNet's stem), each Fire without bypass that does into one `fire_max_pool` step, and a pointwise
    conv read only by a global average pool (SqueezeNet's classifier) into one `pointwise_gap` step, whose
    parts are the two steps: the numba engine pools the conv or Fire output while it is in cache
    (fused.conv_max_pool, fused.fire_max_pool, fused.gemm_bias_act_mean); the numpy engine runs the parts."""
    readers = {}
    for step in steps:
        for v in step.vals.values():
            if v is not None:
                readers[v.index] = readers.get(v.index, 0) + 1
    out = []
    for step in steps:
        prev = out[-1] if out else None
        if (step.op == "max_pool" and prev is not None and prev.op == "conv" and prev.vals["y"] is step.vals["x"]
                and readers[step.vals["x"].index] == 2 and prev.vals["res"] is None and prev.params["col0"] == 0
                and prev.params["width"] == prev.params["weights"].shape[-1]):
            out[-1] = Step("conv_max_pool", prev.name, dict(x=prev.vals["x"], y=step.vals["y"]), dict(parts=[prev, step]))
        elif (step.op == "max_pool" and prev is not None and prev.op == "fire" and prev.vals["y"] is step.vals["x"]
              and readers[step.vals["x"].index] == 2 and prev.vals["res"] is None):
            out[-1] = Step("fire_max_pool", prev.name, dict(x=prev.vals["x"], y=step.vals["y"]), dict(parts=[prev, step]))
        elif (step.op == "gap" and prev is not None and prev.op == "pointwise" and prev.vals["y"] is step.vals["x"]
              and readers[step.vals["x"].index] == 2 and prev.vals["res"] is None and prev.vals["scale"] is None
              and prev.params["col0"] == 0 and prev.params["width"] == prev.params["weights"].shape[-1]):
            out[-1] = Step("pointwise_gap", prev.name, dict(x=prev.vals["x"], y=step.vals["y"]), dict(parts=[prev, step]))
        else:
            out.append(step)
    return out


class Unsupported(ValueError):
    """Raised while lowering when the model needs the generic layer-by-layer path."""
