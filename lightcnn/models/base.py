"""Model: a features trunk and a classification head, with a summary.

    logits = head(features(x))        x (N,H,W,C) -> features (N,h,w,F) -> logits (N,K)

`features(x)` ends at the model's default CAM layer (the last spatial maps), so
CAM/Grad-CAM and head-only fine-tuning both start from it. When the head
begins with global average pooling, `pooled(x)` gives the (N,F) vectors that
head-only fine-tuning caches on disk, and `head_after_pool` runs the rest.
"""

import threading
import time

import os

import numpy as np

from lightcnn.engine import check_engine, default_engine
from lightcnn.layers.base import Layer, Sequential
from lightcnn.layers.basic import Dense, Dropout, GlobalAvgPool


_PLANS_LOCK = threading.Lock()

# LIGHTCNN_NO_PLAN=1: always run layer by layer (for A/B timing and debugging the fast path).
_NO_PLAN = os.environ.get("LIGHTCNN_NO_PLAN", "") in ("1", "true", "yes")


class Model(Layer):
    """A named architecture: ``features`` (Layer) then ``head`` (Sequential)."""

    def __init__(self, arch, config, features, head, input_shape, cam_layer="features"):
        super().__init__()
        self.arch = arch
        self.config = dict(config)
        self.features_net = features
        self.head_net = head
        self.input_shape = tuple(input_shape)  # (H, W, C) the weights were trained at
        self.cam_layer = cam_layer
        self._plans = {}  # (thread, shape, threads) -> InferencePlan; derived state, never saved or copied

    def children(self):
        return [("features", self.features_net), ("head", self.head_net)]

    @property
    def num_classes(self):
        return self.head_net[len(self.head_net) - 1].out_features if hasattr(
            self.head_net[len(self.head_net) - 1], "out_features") else self.config.get("num_classes")

    # -- forward/backward ------------------------------------------------------------
    def features(self, x, training=False):
        if not training:
            plan = self.inference_plan(x)
            if plan is not None:
                return plan.run(np.ascontiguousarray(x))
        return self.features_net.forward(x, training)

    def head(self, f, training=False):
        if not training:
            plan = self.inference_plan(f, "head")
            if plan is not None:
                return plan.run(np.ascontiguousarray(f))
        return self.head_net.forward(f, training)

    def forward(self, x, training=False):
        # At inference both halves run as plans, so forward(x) is exactly head(features(x)).
        return self.head(self.features(x, training), training)

    # -- the inference fast path ---------------------------------------------------------
    #: plans kept per model (thread x input shape x thread count x part x engine); oldest dropped first
    MAX_PLANS = 6

    @property
    def engine(self):
        """The inference engine asked for: "auto" (default; LIGHTCNN_ENGINE), "numba" or "numpy".
        See lightcnn.engine; `last_engine` says which one the latest plan runs on."""
        return self.__dict__.get("_engine") or default_engine()

    @engine.setter
    def engine(self, name):
        self.__dict__["_engine"] = check_engine(name)
        self.__dict__["_plans"] = {}
        self.__dict__["_prefix_plans"] = {}

    @property
    def weights_packed_only(self):
        """Predict-only memory saving, off by default (the predict CLI turns it on): each weight the numba
        engine reads as packed GEMM panels (pointwise and KxK convs without a batch norm to fold, dense
        layers) is kept only as those panels once a plan has packed it, not also as the plain array
        (Layer.hold_packed; MobileNetV2: 13 MB of its 14). Nothing else changes: whatever asks a layer for
        its params (training, export, summaries, Grad-CAM, the NumPy engine) gets them unpacked back,
        bit-identical, and from then on the layer holds both again."""
        return bool(self.__dict__.get("_weights_packed_only"))

    @weights_packed_only.setter
    def weights_packed_only(self, on):
        self.__dict__["_weights_packed_only"] = bool(on)

    @property
    def last_engine(self):
        """"numba" or "numpy": the engine of the most recently built inference plan (None before any)."""
        return self.__dict__.get("_last_engine")

    def inference_plan(self, x, part="features"):
        """The InferencePlan of `part` ("features": the trunk, "head": the head) for a float32
        (N,H,W,C) batch shaped like x, built on first use; or None.

        None means "use the layer-by-layer path": not a float32 (N,H,W,C) array, a shape the
        layers reject (they raise the precise error), or LIGHTCNN_NO_PLAN=1.
        """
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4) or _NO_PLAN:
            return None
        return self._plan(x.shape, part)

    def _plan(self, shape, part):
        """inference_plan for a float32 (N,H,W,C) batch of `shape`."""
        net = self.features_net if part == "features" else self.head_net
        if net is None:
            return None
        from lightcnn._jit import get_num_threads

        plans = self.__dict__.setdefault("_plans", {})
        engine = self.engine
        key = (threading.get_ident(), shape, get_num_threads(), part, engine)
        entry = plans.get(key)
        if entry is not None and entry[0] is net:
            return entry[1]
        from lightcnn.layers.plan import InferencePlan

        try:
            plan = InferencePlan([(part, net)], shape, engine=engine)
        except ValueError:  # includes ShapeError: let the layer path raise its own message
            return None
        if self.weights_packed_only:
            plan.hold_weights_packed()
            if part == "features" and len(plan.output_shape) == 4:
                # the head's plan now too: its weights (MobileNetV2's classifier, 5 MB) are packed while the
                # process is small; packed after the trunk's first run, plain copy and panels topped its peak
                self._plan(plan.output_shape, "head")
        with _PLANS_LOCK:  # threads share the dict (each has its own plans in it)
            while len(plans) >= self.MAX_PLANS:
                plans.pop(next(iter(plans)), None)
            plans[key] = (net, plan)
        self.__dict__["_last_engine"] = plan.engine
        return plan

    def profile_plans(self, x, repeats=5):
        """{plan step name: median ms} of the inference plans forward(x) runs (features, then head)."""
        x = np.ascontiguousarray(x, np.float32)
        plan = self.inference_plan(x)
        if plan is None:
            return None
        times = plan.profile(x, repeats)
        f = plan.run(x)
        head_plan = self.inference_plan(f, "head")
        if head_plan is not None:
            times.update(head_plan.profile(f, repeats))
        return times

    def _on_params_changed(self):
        self.__dict__["_plans"] = {}
        self.__dict__["_prefix_plans"] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plans"] = {}  # plans hold buffers and bound kernels of *this* object: rebuilt on demand
        state.pop("_prefix_plans", None)
        return state

    def backward(self, dlogits, through_features=True):
        df = self.head_net.backward(dlogits)
        return self.features_net.backward(df) if through_features else df

    # -- head-only fine-tuning ---------------------------------------------------------
    @property
    def head_is_pooled(self):
        return len(self.head_net) > 0 and isinstance(self.head_net[0], GlobalAvgPool)

    def pooled(self, x):
        """(N,F) pooled features; requires a head that starts with global average pooling."""
        if not self.head_is_pooled:
            raise ValueError(f"{self.arch}: head does not start with global average pooling; call reset_head first")
        return self.head_net[0].forward(self.features(x))

    def head_after_pool(self):
        """The head without its pooling layer: (N,F) -> logits."""
        return Sequential(self.head_net.layers[1:])

    def reset_head(self, num_classes, hidden=(), dropout=0.2, hidden_dropout=0.0, seed=0):
        """Replace the head by GAP -> [Dense+ReLU for each width in `hidden`] -> dropout -> Dense(num_classes).

        `hidden=(64, 64, 64, 32, 32)` with dropouts gives seed 003's dense stack.
        Returns the new head; the features trunk is untouched.
        """
        rng = np.random.default_rng(seed)
        width = self.feature_channels
        layers = [("pool", GlobalAvgPool())]
        if hidden:
            if hidden_dropout:
                layers.append(("dropout0", Dropout(hidden_dropout, seed)))
            for i, units in enumerate(hidden):
                layers.append((f"dense{i}", Dense(width, units, act="relu", rng=rng)))
                width = units
        if dropout:
            layers.append(("dropout", Dropout(dropout, seed + 1)))
        layers.append(("classifier", Dense(width, num_classes, rng=rng, init="glorot")))
        self.head_net = Sequential(layers)
        self.config["num_classes"] = int(num_classes)
        self.config["head"] = {"hidden": list(hidden), "dropout": dropout, "hidden_dropout": hidden_dropout}
        return self.head_net

    @property
    def feature_channels(self):
        return self.features_net.out_ch

    # -- summary ---------------------------------------------------------------------
    def trace(self, x, profile=False, repeats=1, fast=True):
        """Run forward once, recording each unit's name, output shape, params, MACs (and ms).

        With profile=True and fast=True, ms is the unit's time in the inference plan (the path
        forward() takes: fused epilogues, residual adds and SE scales are timed with the unit
        that absorbs them); with fast=False, the time of the unit's own layer-by-layer forward.
        """
        rows = []
        originals = []
        for path, layer in self.named_layers():
            # only outermost units: a ConvBNAct's inner conv is reported by the ConvBNAct
            if not layer.is_unit or any(path.startswith(f"{p}.") for p, _ in originals):
                continue
            original = layer.forward
            if not (profile and not fast):
                original = self._unit_runner(layer, path)

            def traced(inp, training=False, out=None, col0=0, _layer=layer, _path=path, _orig=original):
                start = time.perf_counter()
                for _ in range(repeats if profile else 1):
                    y = _orig(inp, training)
                elapsed = (time.perf_counter() - start) / (repeats if profile else 1)
                params = sum(v.size for _, _, _, v in _layer.named_parameters())
                rows.append(dict(name=_path, kind=repr(_layer), in_shape=tuple(inp.shape), out_shape=tuple(y.shape),
                                 params=params, macs=_layer.macs(inp.shape, y.shape) // max(inp.shape[0], 1),
                                 ms=elapsed * 1e3))
                if out is None:
                    return y
                out[..., col0:col0 + y.shape[-1]] = y  # a unit asked to write into its slot (Fire's expands)
                return out[..., col0:col0 + y.shape[-1]]

            layer.forward = traced
            originals.append((path, layer))
        try:
            self.head_net.forward(self.features_net.forward(x))  # the layer path: what the patches observe
        finally:
            for _, layer in originals:
                del layer.forward  # restore the class method
        times = self.profile_plans(x, repeats) if profile and fast else None
        if times is not None:
            _attribute_plan_times(rows, times)
        return rows

    def _unit_runner(self, layer, path):
        """forward(x) of one unit through a plan on this model's engine (so a summary on the numpy
        engine compiles nothing); the unit's own forward where it cannot be planned."""
        from lightcnn.layers.plan import InferencePlan

        own = layer.forward

        def run(x, training=False):
            if not (isinstance(x, np.ndarray) and x.dtype == np.float32):
                return own(x, training)
            try:
                plan = InferencePlan([(path, layer)], x.shape, engine=self.engine)
            except ValueError:
                return own(x, training)
            self.__dict__["_last_engine"] = plan.engine
            return plan.run(np.ascontiguousarray(x))
        return run

    def summary(self, input_size=None, profile=False, repeats=5, fast=True):
        """Per-unit table as text: name, output shape, parameters, MACs (and ms with profile=True).

        fast=False profiles the layer-by-layer path instead of the inference plan (see trace).
        """
        h, w, c = self.input_shape if input_size is None else (input_size, input_size, self.input_shape[2])
        x = np.zeros((1, h, w, c), np.float32)
        if profile:
            self.forward(x)  # compile and warm caches before timing
        rows = self.trace(x, profile=profile, repeats=repeats, fast=fast)
        lines = [f"{self.arch}  input (1, {h}, {w}, {c})"]
        header = f"{'layer':42s} {'output':>20s} {'params':>10s} {'MACs':>13s}" + (f" {'ms':>8s}" if profile else "")
        lines += [header, "-" * len(header)]
        for r in rows:
            line = f"{r['name']:42s} {str(r['out_shape'][1:]):>20s} {r['params']:>10,d} {r['macs']:>13,d}"
            if profile:
                line += f" {r['ms']:8.3f}"
            lines.append(line)
        total_params = sum(v.size for v in self.params_only().values())
        total_macs = sum(r["macs"] for r in rows)
        lines.append("-" * len(header))
        tail = f"{'total':42s} {'':>20s} {total_params:>10,d} {total_macs:>13,d}"
        if profile:
            tail += f" {sum(r['ms'] for r in rows):8.3f}"
        lines.append(tail)
        return "\n".join(lines)

    def params_only(self):
        return {name: value for name, _, _, value in self.named_parameters()}

    def count_params(self):
        return int(sum(v.size for v in self.params_only().values()))

    def count_macs(self, input_size=None):
        h, w, c = self.input_shape if input_size is None else (input_size, input_size, self.input_shape[2])
        return int(sum(r["macs"] for r in self.trace(np.zeros((1, h, w, c), np.float32))))

    def __repr__(self):
        return f"Model({self.arch!r}, {self.config})"


def _attribute_plan_times(rows, times):
    """Give each trace row the plan time of its unit.

    A plan step is named after the unit it runs ("features.blocks.3.project"), after a
    container when it runs several units as one fused kernel ("features.blocks.1" =
    expand + dw + project), after the units it fuses ("features.blocks.3.expand+dw"), or
    after a part of a unit. A fused step's time goes to the first unit it covers; the
    others get 0.0 and row["fused_into"] names that unit.
    """
    for r in rows:
        r["ms"] = 0.0
    for step, ms in times.items():
        parent, _, last = step.rpartition(".")
        if "+" in last:
            named = [f"{parent}.{part}" for part in last.split("+")]
            covered = [r for r in rows if r["name"] in named]
            if covered:
                covered[0]["ms"] += ms
                for r in covered[1:]:
                    r["fused_into"] = covered[0]["name"]
                continue
        inside = [r for r in rows if step == r["name"] or step.startswith(r["name"] + ".")]
        if inside:
            inside[0]["ms"] += ms
            continue
        covered = [r for r in rows if r["name"].startswith(step + ".")]
        if covered:
            covered[0]["ms"] += ms
            for r in covered[1:]:
                r["fused_into"] = covered[0]["name"]



def randomise_batchnorm_statistics(model, rng):
    """Give every batch norm non-trivial affine terms and running statistics.

    Freshly built models have identity batch norms (gamma 1, beta 0, mean 0, var 1), which hides mistakes in
    folding or in train/inference modes; tests and benchmarks with random weights call this first.
    """
    from lightcnn.layers.basic import BatchNorm

    for _, layer in model.named_layers():
        if isinstance(layer, BatchNorm):
            c = layer.channels
            layer.params["weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            layer.params["bias"] = rng.normal(0, 0.1, c).astype(np.float32)
            layer.buffers["running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
            layer.buffers["running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    model.params_changed()
    return model
