"""Inference plan: a layer tree compiled, once per input shape, into fused kernel calls over reused buffers.

    plan = InferencePlan([("features", trunk), ("head", head)], (N, H, W, C))
    logits = plan.run(x)                # the same numbers as the layers' forward(x, training=False)

Why: the layer-by-layer path allocates every activation, validates every argument and
runs bias, activation, residual and concat as separate passes over memory. On a batch
of one image that overhead is most of the time. A plan does that work once:

  - every unit becomes one kernel call (lightcnn.kernels.fused / depthwise / pool) with
    its arguments resolved (padding, tile size, output views);
  - conv + folded batch norm + activation (+ residual add) is one fused GEMM epilogue;
    squeeze-excitation's channel scale is folded into the next pointwise GEMM's input;
    Fire's expand 1x1 and 3x3 write side by side into one buffer (no concat copy);
  - activations live in an arena of flat buffers planned here: a buffer returns to the
    free list when the last step that reads its tensor has been planned, so a network
    needs a handful of buffers, not one per layer, and they stay warm in cache.

What is never cached: weights. Each call asks the layer for them (ConvBNAct's folded
weights are cached by the layer itself and dropped by params_changed()), so a plan is
never stale after fine-tuning or loading a checkpoint. Only float32 inputs use plans;
layers the planner does not know run through their own forward() as one opaque step.

A plan owns mutable buffers, so it is used by one thread at a time; Model keeps one per
(thread, input shape) and the result returned to the caller is always a fresh array.
"""

import time

import numpy as np

from lightcnn import _blas
from lightcnn._jit import get_num_threads
from lightcnn.kernels import activation as act_k
from lightcnn.kernels import depthwise as dw_k
from lightcnn.kernels import fused
from lightcnn.kernels import pool as pool_k
from lightcnn.kernels.shapes import conv_output_size
from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import Conv2d, Dense, DepthwiseConv2d, Dropout, Flatten, GlobalAvgPool, MaxPool2d
from lightcnn.layers.blocks import ConvBNAct, Fire, InvertedResidual, SqueezeExcite

_F32 = np.float32
_DUMMY2 = np.zeros((1, 1), _F32)  # stands in for "no residual" / "no SE scale" (typed arguments)
# A bottleneck runs as one band-by-band kernel (fused.inverted_residual_band) when its expanded
# tensor is at least _FUSE_MIN_BYTES for the batch or _FUSE_MIN_IMAGE_BYTES for one image; smaller
# ones stay in cache anyway and parallelise better as GEMMs. The per-image rule only matters at
# batch 1-3: it fuses MobileNetV2's 56x56x144 blocks, which never writes their expanded tensors
# (arena 7.6 -> 3.0 MB, batch-1 forward ~4.5 -> ~3.9 ms in back-to-back runs, noisy).
_FUSE_MIN_BYTES = 1 << 22
_FUSE_MIN_IMAGE_BYTES = 1 << 20
# Small layers run on one thread: GEMMs of fewer multiply-accumulates than SERIAL_MAX_MACS (the 1x1
# convs of Fire modules and MobileNet blocks on 7x7 maps at batch 1: ~30 us of work, where waking a
# second thread and packing the weights twice cost about what the split saves) and depthwise
# layers with fewer output pixels than SERIAL_MAX_ROWS.
SERIAL_MAX_MACS = 4_000_000
SERIAL_MAX_ROWS = 256


_KNOWN = (Sequential, Dropout, ConvBNAct, InvertedResidual, Fire, GlobalAvgPool, Dense, MaxPool2d, Flatten, Conv2d,
          DepthwiseConv2d, SqueezeExcite)


def _plain(layer):
    """True unless the layer is a subclass of a known layer that replaces its forward: the planner
    reproduces the known classes' forward, never an override it cannot see."""
    for cls in _KNOWN:
        if isinstance(layer, cls):
            return type(layer).forward is cls.forward
    return True


class _Val:
    """A tensor of the plan: its shape, and either a slot in the arena or (dynamic) a runtime value."""

    __slots__ = ("shape", "buf", "array", "refs", "index")

    def __init__(self, shape, index):
        self.shape, self.index = tuple(shape), index
        self.buf, self.array, self.refs = None, None, 0


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
        self.buffers.append(np.empty(max(size, 1), _F32))
        return len(self.buffers) - 1

    def give_back(self, index):
        self.free.append(index)

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers)


class _Weights:
    """Live weights of a unit, reshaped for its kernel; the reshape is redone only when the array changes."""

    def __init__(self, fetch, shape):
        self.fetch, self.shape = fetch, shape
        self.src, self.b_src, self.w, self.b = None, None, None, None

    def __call__(self):
        w, b = self.fetch()
        if w is not self.src or b is not self.b_src:
            self.src, self.b_src = w, b
            self.w = np.ascontiguousarray(w, dtype=_F32).reshape(self.shape)
            n_out = self.shape[-1]
            self.b = np.zeros(n_out, _F32) if b is None else np.ascontiguousarray(b, dtype=_F32)
            if w.dtype != _F32 or (b is not None and b.dtype != _F32):
                self.src = None  # a cast copy would miss in-place updates: redo it every call
        return self.w, self.b


class InferencePlan:
    """Compile `layers` [(name, layer), ...] (applied in order) for float32 inputs of `in_shape` (N,H,W,C)."""

    def __init__(self, layers, in_shape, threads=None):
        _blas.prepare()  # before any kernel that calls BLAS runs (picks SciPy's BLAS settings)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.threads = threads or get_num_threads()
        self.steps = []          # (unit name, callable(vals))
        self.vals = []           # runtime table: arrays by _Val.index
        self._arena = _Arena()
        x = self._new(self.in_shape, dynamic=True)
        self.input_index = x.index
        out = x
        for name, layer in layers:
            out = self._compile(layer, out, name)
        self.output_index = out.index
        self.output_shape = out.shape
        for v in self._all:
            if v.buf is not None:
                v.array = self._arena.buffers[v.buf][:int(np.prod(v.shape))].reshape(v.shape)
        self.vals = [v.array for v in self._all]
        self._bind()

    # ---------------------------------------------------------------- values and buffers
    @property
    def _all(self):
        return self.__dict__.setdefault("_values", [])

    def _new(self, shape, dynamic=False):
        v = _Val(shape, len(self._all))
        self._all.append(v)
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

    # ---------------------------------------------------------------- compilation
    def _step(self, name, make):
        """Register a step; `make()` is called after buffer planning and returns fn(vals)."""
        self.steps.append((name, make))

    def _bind(self):
        self.steps = [(name, make()) for name, make in self.steps]
        self._fns = [fn for _, fn in self.steps]

    def _compile(self, layer, x, name):
        """Plan `layer` applied to value x; returns the output value. Releases x."""
        if not _plain(layer):  # a subclass with its own forward (e.g. quantsim's): run that forward
            return self._opaque(layer, x, name)
        if isinstance(layer, Sequential):
            for child_name, child in layer.children():
                x = self._compile(child, x, f"{name}.{child_name}" if name else child_name)
            return x
        if isinstance(layer, Dropout):
            return x
        in_ch = getattr(layer, "in_ch", None)
        if in_ch is not None and (len(x.shape) != 4 or x.shape[3] != in_ch):
            raise _Unsupported(f"{name}: expects {in_ch} channels, gets {x.shape}")  # the layer path explains
        if isinstance(layer, ConvBNAct):
            return self._conv_unit(layer, x, name)
        if isinstance(layer, InvertedResidual):
            return self._inverted_residual(layer, x, name)
        if isinstance(layer, Fire):
            return self._fire(layer, x, name)
        if isinstance(layer, GlobalAvgPool) and len(x.shape) == 4:
            y = self._new((x.shape[0], x.shape[3]))
            self._step(name, lambda: self._gap_fn(x, y))
            self._release(x)
            return y
        if isinstance(layer, Dense) and len(x.shape) == 2 and x.shape[1] == layer.in_features:
            return self._dense(layer, x, name)
        if isinstance(layer, MaxPool2d) and len(x.shape) == 4:
            return self._max_pool(layer, x, name)
        if isinstance(layer, Flatten) and len(x.shape) == 4 and x.shape[1:3] == (1, 1) and x.buf is not None:
            y = _Val((x.shape[0], x.shape[3]), len(self._all))  # a view of x's buffer; takes over x's reference
            self._all.append(y)
            y.buf, y.refs = x.buf, x.refs
            return y
        return self._opaque(layer, x, name)

    def _opaque(self, layer, x, name):
        """Any other layer: its own forward(x, training=False), output a fresh array per call."""
        probe = layer.forward(np.zeros(x.shape, _F32), False)
        y = self._new(probe.shape, dynamic=True)
        xi, yi = x.index, y.index

        def make():
            def run(vals):
                vals[yi] = layer.forward(vals[xi], False)
            return run

        self._step(name, make)
        self._release(x)
        return y

    def _arg(self, v, shape=None):
        """(static array, index): kernels read static arrays directly, dynamic ones via vals[index]."""
        if v.array is None:
            return None, v.index
        return (v.array if shape is None else v.array.reshape(shape)), v.index

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
                raise _Unsupported(f"{name}: residual/scale from a dynamic tensor")
        y = out if out is not None else self._new((n, ho, wo, unit.out_ch))
        act, alpha = unit.act, _F32(unit.alpha)
        if isinstance(conv, DepthwiseConv2d):
            assert res is None and scale is None and out is None
            weights = _Weights(unit.folded_weights, (kh, kw, c))

            def make():
                (xa, xi), (ya, _) = self._arg(x), self._arg(y)
                kern, top, left, al = dw_k._dw_forward, pads[0], pads[2], float(unit.alpha)
                if n * ho * wo < SERIAL_MAX_ROWS:
                    kern = dw_k.dw_forward_serial

                def run(vals):
                    wt, b = weights()
                    kern(vals[xi] if xa is None else xa, wt, b, sh, sw, top, left, act, al, ya)
                return run
        elif isinstance(conv, Conv2d):
            pointwise = conv._is_pointwise(pads)
            k = c if pointwise else kh * kw * c
            m, n_out, width = n * ho * wo, unit.out_ch, y.shape[-1]
            weights = _Weights(unit.folded_weights, (k, n_out))
            serial = pointwise and m * k * n_out < SERIAL_MAX_MACS
            tile = fused.choose_tile(m, 1 if serial else self.threads)
            use_res, use_scale = res is not None, scale is not None
            rows_per_image = ho * wo

            def make():
                (xa, xi) = self._arg(x, (m, c) if pointwise else None)
                ya = self._arg(y, (m, width))[0]
                ra = self._arg(res, (m, width))[0] if use_res else _DUMMY2
                sa = self._arg(scale)[0] if use_scale else _DUMMY2
                if pointwise:
                    kern = fused.gemm_bias_act if not serial else fused.gemm_bias_act_serial
                    shape2d = (m, c)

                    def run(vals):
                        wt, b = weights()
                        xv = xa if xa is not None else vals[xi].reshape(shape2d)
                        kern(xv, wt, b, ra, use_res, sa, rows_per_image, use_scale, act, alpha, tile, ya, col0)
                else:
                    assert not use_scale
                    kern, top, left = fused.conv_im2col_bias_act, pads[0], pads[2]

                    def run(vals):
                        wt, b = weights()
                        xv = xa if xa is not None else vals[xi]
                        kern(xv, wt, kh, kw, sh, sw, top, left, ho, wo, b, ra, use_res, act, alpha, tile, ya, col0)
                return run
        else:
            return self._opaque(unit, x, name)
        self._step(name, make)
        self._release(x)
        return y

    def _materialise(self, x, name):
        """A copy of a dynamic tensor (the caller's input) in the arena, for kernels that read it late."""
        if x.buf is not None:
            return x
        y = self._new(x.shape)

        def make():
            xi, ya = x.index, self._arg(y)[0]

            def run(vals):
                np.copyto(ya, vals[xi])
            return run

        self._step(name, make)
        self._release(x)
        return y

    def _inverted_residual(self, block, x, name):
        if block.use_residual:
            x = self._materialise(x, name)
        fused_y = self._inverted_residual_band(block, x, name)
        if fused_y is not None:
            return fused_y
        self._hold(x)  # the residual reads x after the last conv
        y = x
        if block.expand is not None:
            y = self._conv_unit(block.expand, y, f"{name}.expand")
        y = self._conv_unit(block.dw, y, f"{name}.dw")
        scale = None
        if block.se is not None:
            scale = self._se_gate(block.se, y, f"{name}.se")
        res = x if block.use_residual else None
        y = self._conv_unit(block.project, y, f"{name}.project", res=res, scale=scale)
        if scale is not None:
            self._release(scale)
        self._release(x)
        return y

    def _inverted_residual_band(self, block, x, name):
        """The whole block as one fused kernel, if it has no SE and a large expanded tensor; else None."""
        dw, pw = block.dw, block.project
        units = [u for u in (block.expand, dw, pw) if u is not None]
        if block.se is not None or not isinstance(dw.conv, DepthwiseConv2d) or x.buf is None:
            return None
        if not all(isinstance(u.conv, Conv2d) and u.conv._is_pointwise(u.conv.pads(1, 1)) and
                   u.conv.kernel == (1, 1) for u in units if u is not dw):
            return None
        n, h, w, c = x.shape
        e = dw.in_ch
        if n * h * w * e * 4 < _FUSE_MIN_BYTES and h * w * e * 4 < _FUSE_MIN_IMAGE_BYTES:
            return None
        pads = dw.conv.pads(h, w)
        (kh, kw), (sh, sw) = dw.conv.kernel, dw.conv.stride
        ho = conv_output_size(h, kh, sh, pads[0], pads[1])
        wo = conv_output_size(w, kw, sw, pads[2], pads[3])
        y = self._new((n, ho, wo, pw.out_ch))
        items, sub_rows = fused.band_layout(n, ho, w, e, kh, sh, self.threads)
        has_expand = block.expand is not None
        w_expand = _Weights(block.expand.folded_weights, (c, e)) if has_expand else None
        w_dw = _Weights(dw.folded_weights, (kh, kw, e))
        w_project = _Weights(pw.folded_weights, (e, pw.out_ch))
        act1 = block.expand.act if has_expand else 0
        use_res = bool(block.use_residual)
        alpha = _F32(dw.alpha)
        dummy_w, dummy_b = np.zeros((1, 1), _F32), np.zeros(1, _F32)

        def make():
            xa, ya = self._arg(x)[0], self._arg(y)[0]
            kern, top, left, act2, act3 = fused.inverted_residual_band, pads[0], pads[2], dw.act, pw.act

            def run(vals):
                w1, b1 = w_expand() if has_expand else (dummy_w, dummy_b)
                wd, bd = w_dw()
                w3, b3 = w_project()
                kern(xa, has_expand, w1, b1, act1, wd, bd, sh, sw, top, left, act2, w3, b3, act3, use_res, alpha,
                     items, sub_rows, ya)
            return run

        self._step(name, make)
        self._release(x)
        return y

    def _se_gate(self, se, x, name):
        """s (N,C) = the SE gate of x; x stays alive (the next GEMM scales it by s)."""
        s = self._new((x.shape[0], x.shape[3]))
        fc1, fc2 = se.fc1, se.fc2

        def make():
            (xa, xi), sa = self._arg(x), self._arg(s)[0]
            kern, alpha = fused.se_gate, _F32(1.0)
            gate = fc2.act

            def run(vals):
                p1, p2 = fc1.params, fc2.params
                kern(xa if xa is not None else vals[xi], p1["weight"], p1["bias"], p2["weight"], p2["bias"],
                     gate, alpha, sa)
            return run

        if "bias" not in fc1.params or "bias" not in fc2.params or fc1.act != act_k.ACT_RELU:
            raise _Unsupported(f"{name}: squeeze-excitation without biases or ReLU")
        self._step(name, make)
        return s

    def _fire(self, fire, x, name):
        if fire.bypass:
            x = self._materialise(x, name)
        self._hold(x)  # read by the squeeze conv and (bypass) by both expand epilogues
        s = self._conv_unit(fire.squeeze, x, f"{name}.squeeze")
        n, h, w, _ = s.shape
        y = self._new((n, h, w, fire.out_ch))
        res = x if fire.bypass else None
        self._hold(s)
        self._conv_unit(fire.expand1x1, s, f"{name}.expand1x1", res=res, out=y, col0=0)
        self._conv_unit(fire.expand3x3, s, f"{name}.expand3x3", res=res, out=y, col0=fire.expand1x1.out_ch)
        self._release(x)
        return y

    # ---- the rest
    # The network's tail (global average pool, classifier) is microseconds of work at batch 1; it runs on
    # NumPy and on the serial GEMM the convolutions already loaded, not on kernels of its own: every
    # further compiled kernel costs ~2 MB resident and ~10 ms to load in a one-image predict.
    def _gap_fn(self, x, y):
        (xa, xi), ya = self._arg(x), self._arg(y)[0]

        def run(vals):
            np.mean(xa if xa is not None else vals[xi], axis=(1, 2), out=ya)
        return run

    def _dense(self, layer, x, name):
        y = self._new((x.shape[0], layer.out_features))
        act, alpha = layer.act, _F32(1.0)
        weights = _Weights(lambda: (layer.params["weight"], layer.params.get("bias")),
                           (layer.in_features, layer.out_features))
        rows = x.shape[0]

        def make():
            (xa, xi), ya = self._arg(x), self._arg(y)[0]
            kern = fused.gemm_bias_act_serial

            def run(vals):
                w, b = weights()
                xv = xa if xa is not None else np.ascontiguousarray(vals[xi], dtype=_F32)
                kern(xv, w, b, _DUMMY2, False, _DUMMY2, 1, False, act, alpha, rows, ya, 0)
            return run

        self._step(name, make)
        self._release(x)
        return y

    def _max_pool(self, layer, x, name):
        n, h, w, c = x.shape
        from lightcnn.layers.basic import resolve_padding

        pads = resolve_padding(layer.padding, h, w, *layer.kernel, *layer.stride)
        kh, kw, sh, sw, pads, ho, wo = pool_k._window_args(x.shape, layer.kernel, layer.stride, pads,
                                                           layer.ceil_mode)
        y = self._new((n, ho, wo, c))

        def make():
            (xa, xi), ya = self._arg(x), self._arg(y)[0]
            kern, top, left = fused.max_pool_inference, pads[0], pads[2]

            def run(vals):
                kern(xa if xa is not None else vals[xi], kh, kw, sh, sw, top, left, ya)
            return run

        self._step(name, make)
        self._release(x)
        return y

    # ---------------------------------------------------------------- running
    def run(self, x):
        """y = the layers applied to x (N,H,W,C) float32 C-contiguous; y is a fresh array."""
        vals = self.vals
        vals[self.input_index] = x
        try:
            for fn in self._fns:
                fn(vals)
            return np.array(vals[self.output_index], copy=True)
        finally:
            vals[self.input_index] = None

    def profile(self, x, repeats=5):
        """{unit name: median milliseconds} over `repeats` runs (steps of one unit are summed)."""
        vals = self.vals
        times = {name: [] for name, _ in self.steps}
        for _ in range(repeats):
            vals[self.input_index] = x
            per = {}
            for name, fn in self.steps:
                t0 = time.perf_counter()
                fn(vals)
                per[name] = per.get(name, 0.0) + time.perf_counter() - t0
            for name, t in per.items():
                times[name].append(t)
        vals[self.input_index] = None
        return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


class _Unsupported(ValueError):
    """Raised while planning when the model needs the generic layer-by-layer path."""
