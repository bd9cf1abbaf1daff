"""The Python API that mirrors the CLI: three lines to embed a classifier.

    import lightcnn
    clf = lightcnn.load("mobilenet_v2")            # or a path to any lightcnn .h5
    clf.topk("cat.jpg", k=5)                        # -> [[Prediction(index, wnid, label, score), ...]]
    clf.cam("cat.jpg").maps                         # -> (1, h, w) class activation map of the top-1 class

Weights are found without network access (see lightcnn.weights.find_weights);
preprocessing comes from the weight file, so a fine-tuned model carries its own.
"""

from pathlib import Path

import numpy as np

from lightcnn.checkpoint import load_state, read_checkpoint
from lightcnn.errors import CheckpointError
from lightcnn.postprocess import softmax, topk
from lightcnn.preprocess import Preprocessing, load_image, preprocess_image


class Classifier:
    """A model with its class names and preprocessing, as read from one .h5 file."""

    def __init__(self, model, checkpoint):
        self.model = model
        self.checkpoint = checkpoint
        self.class_names = list(checkpoint.class_names)
        self.class_ids = checkpoint.class_ids
        self.preprocessing = (Preprocessing.from_dict(checkpoint.preprocessing) if checkpoint.preprocessing
                              else Preprocessing())
        self.weights_path = checkpoint.path
        self._sha256 = None

    @property
    def name(self):
        return self.checkpoint.provenance.get("registry_name") or Path(self.weights_path or "model").stem

    @property
    def operating_point(self):
        """(positive class name, threshold on its probability) chosen on validation when the model was
        fine-tuned (lightcnn.train.run), or None: decisions are then argmax."""
        op = (self.checkpoint.extra or {}).get("operating_point") or {}
        if op.get("class") not in self.class_names or op.get("threshold") is None:
            return None
        return op["class"], float(op["threshold"])

    @property
    def weights_sha256(self):
        if self._sha256 is None and self.weights_path:
            from lightcnn.weights import sha256_of

            self._sha256 = sha256_of(self.weights_path)
        return self._sha256

    def preprocess(self, images):
        """Images (paths, bytes, PIL images) -> (N,H,W,C) float32 batch."""
        if isinstance(images, (str, Path, bytes)) or hasattr(images, "mode"):
            images = [images]
        return np.stack([preprocess_image(load_image(i) if not hasattr(i, "mode") else i, self.preprocessing)
                         for i in images])

    def logits(self, batch, batch_size=32):
        """(N,H,W,C) preprocessed batch -> (N,K) logits, run in chunks of `batch_size`."""
        batch = np.ascontiguousarray(batch, np.float32)
        outs = [self.model.forward(batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, images, batch_size=32):
        """Images or an NHWC batch -> (N,K) probabilities."""
        batch = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.preprocess(images)
        return softmax(self.logits(batch, batch_size))

    def topk(self, images, k=5, batch_size=32):
        """Images or an NHWC batch -> per image, the k most probable classes."""
        return topk(self.predict(images, batch_size), k, self.class_names, self.class_ids)

    def cam(self, images, class_index=None, layer=None, method="auto"):
        """Images or an NHWC batch -> lightcnn.explain.Explanation: maps (N,h,w) for `class_index`
        (None = each image's top-1). method "auto" is CAM for GAP+linear (and SqueezeNet conv) heads when no
        layer is named, else Grad-CAM at `layer` (default model.cam_layer); see lightcnn.explain."""
        from lightcnn.explain import explain

        batch = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.preprocess(images)
        return explain(self.model, np.ascontiguousarray(batch, np.float32), class_index, layer, method)

    def __repr__(self):
        return f"Classifier({self.model.arch!r}, {len(self.class_names)} classes, weights={self.weights_path})"


def model_from_checkpoint(ckpt, simulate_quantization=False):
    """The model a checkpoint describes, with its weights loaded.

    simulate_quantization: False (default) the plain float network, what training, export and
    summaries want; True rounds activations to the 8-bit grids recorded from a quantised TFLite
    file (lightcnn.quantsim; error if the file has none); None follows the file's default
    (extra["simulate_activation_quantization"], set from the registry when the file was built).
    """
    from lightcnn.layers.basic import skip_initialisation
    from lightcnn.models import build

    with skip_initialisation():  # load_state replaces every tensor (and fails if one is missing)
        model = build(ckpt.arch, **{k: v for k, v in ckpt.config.items() if k != "head"})
        head = ckpt.config.get("head")
        if isinstance(head, dict):  # a fine-tuned head replaced the original one
            model.reset_head(ckpt.config["num_classes"], hidden=tuple(head.get("hidden", ())),
                             dropout=head.get("dropout", 0.0), hidden_dropout=head.get("hidden_dropout", 0.0))
        elif head is not None:
            model = build(ckpt.arch, **ckpt.config)
    model = load_state(model, ckpt.tensors, ckpt.path or "<checkpoint>")
    extra = ckpt.extra or {}
    table = extra.get("activation_quantization")
    if simulate_quantization is None:
        simulate_quantization = bool(table) and bool(extra.get("simulate_activation_quantization"))
    if simulate_quantization:
        from lightcnn import quantsim

        if not table:
            raise CheckpointError(f"{ckpt.path or '<checkpoint>'}: no activation quantisation table to simulate "
                                  "(only files converted from quantised TFLite models carry one)")
        quantsim.simulate_activation_quantization(model, table)
    return model


def load(name_or_path="mobilenet_v2", simulate_quantization=None):
    """Load a registered model by name (its converted .h5 must exist) or any lightcnn .h5 path.

    simulate_quantization: None uses the file's default (on for registry models where rounding
    activations to the quantised runtime's 8-bit grids brings results closer to it, see
    lightcnn.quantsim); True/False force it on/off.
    """
    from lightcnn.weights import find_weights

    ckpt = read_checkpoint(find_weights(name_or_path))
    return Classifier(model_from_checkpoint(ckpt, simulate_quantization), ckpt)
