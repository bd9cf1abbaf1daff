"""Model: a features trunk and a classification head, with a summary.

    logits = head(features(x))        x (N,H,W,C) -> features (N,h,w,F) -> logits (N,K)

`features(x)` ends at the model's default CAM layer (the last spatial maps), so
CAM/Grad-CAM and head-only fine-tuning both start from it. When the head
begins with global average pooling, `pooled(x)` gives the (N,F) vectors that
head-only fine-tuning caches on disk, and `head_after_pool` runs the rest.
"""

import time

import numpy as np

from lightcnn.layers.base import Layer, Sequential
from lightcnn.layers.basic import Dense, Dropout, GlobalAvgPool


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

    def children(self):
        return [("features", self.features_net), ("head", self.head_net)]

    @property
    def num_classes(self):
        return self.head_net[len(self.head_net) - 1].out_features if hasattr(
            self.head_net[len(self.head_net) - 1], "out_features") else self.config.get("num_classes")

    # -- forward/backward ------------------------------------------------------------
    def features(self, x, training=False):
        return self.features_net.forward(x, training)

    def head(self, f, training=False):
        return self.head_net.forward(f, training)

    def forward(self, x, training=False):
        return self.head(self.features(x, training), training)

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
    def trace(self, x, profile=False, repeats=1):
        """Run forward once, recording each unit's name, output shape, params, MACs (and ms)."""
        rows = []
        originals = []
        for path, layer in self.named_layers():
            # only outermost units: a ConvBNAct's inner conv is reported by the ConvBNAct
            if not layer.is_unit or any(path.startswith(f"{p}.") for p, _ in originals):
                continue
            original = layer.forward

            def traced(inp, training=False, _layer=layer, _path=path, _orig=original):
                start = time.perf_counter()
                for _ in range(repeats if profile else 1):
                    out = _orig(inp, training)
                elapsed = (time.perf_counter() - start) / (repeats if profile else 1)
                params = sum(v.size for _, _, _, v in _layer.named_parameters())
                rows.append(dict(name=_path, kind=repr(_layer), in_shape=tuple(inp.shape), out_shape=tuple(out.shape),
                                 params=params, macs=_layer.macs(inp.shape, out.shape) // max(inp.shape[0], 1),
                                 ms=elapsed * 1e3))
                return out

            layer.forward = traced
            originals.append((path, layer))
        try:
            self.forward(x)
        finally:
            for _, layer in originals:
                del layer.forward  # restore the class method
        return rows

    def summary(self, input_size=None, profile=False, repeats=5):
        """Per-unit table as text: name, output shape, parameters, MACs (and ms with profile=True)."""
        h, w, c = self.input_shape if input_size is None else (input_size, input_size, self.input_shape[2])
        x = np.zeros((1, h, w, c), np.float32)
        if profile:
            self.forward(x)  # compile and warm caches before timing
        rows = self.trace(x, profile=profile, repeats=repeats)
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
