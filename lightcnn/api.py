"""The Python API that mirrors the CLI: three lines to embed a classifier.

    import lightcnn
    clf = lightcnn.load("mobilenet_v2")            # or a path to any lightcnn .h5
    clf.topk("cat.jpg", k=5)                        # -> [[Prediction(index, wnid, label, score), ...]]
    clf.predict(frame)                              # a uint8 (H,W,3) array, e.g. a video frame -> (1, K)
    clf.predict("cat.jpg", tta="flip")              # test-time augmentation: flip or ten-crop (lightcnn.tta)
    clf.cam("cat.jpg").maps                         # -> (1, h, w) class activation map of the decided class
    clf.pooled(images)                              # -> (N, F) embeddings (timm's forward_features + pooling)
    clf.reset_head(3, ["a", "b", "c"])              # a new classifier on the same trunk (timm's reset_classifier)
    clf.meta                                        # parameters, MACs, file size and SHA-256, accuracy, licence

Models are found by registry name ("mobilenet_v2_keras"), by architecture and weights tag
(lightcnn.load("mobilenet_v2", weights="keras"), or "mobilenet_v2.keras") or by path; lightcnn.list_models()
and lightcnn.list_weights() say what exists.

Images are paths, bytes, PIL images or uint8 pixel arrays (H,W,C) / (N,H,W,C) with C = 1, 3 or 4; each is
resized, cropped and normalised exactly like an image file. A float32/float64 array is a batch that is already
preprocessed, accepted only as (N,H,W,C) with (H,W,C) = clf.input_shape; any other array is refused (ShapeError).

Weights are found without network access (see lightcnn.weights.find_weights);
preprocessing comes from the weight file, so a fine-tuned model carries its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

from lightcnn.checkpoint import Checkpoint, load_state, read_checkpoint
from lightcnn.errors import CheckpointError, ShapeError
from lightcnn.postprocess import softmax, topk
from lightcnn.preprocess import Preprocessing, load_image, preprocess_image

if TYPE_CHECKING:  # imported for annotations only: `import lightcnn.api` stays light
    from lightcnn.explain import Explanation
    from lightcnn.models.base import Model
    from lightcnn.postprocess import Prediction


#: what predict/topk/cam/features/pooled accept: a path, bytes, a PIL image, a uint8 pixel array (H,W,C) or
#: (N,H,W,C), a list of these, or a float (N,H,W,C) batch already preprocessed (see Classifier.batch)
Images = Union[str, os.PathLike, bytes, np.ndarray, Any, Sequence[Any]]


def _is_pixels(array, *ndims):
    """An array of 8-bit pixels: uint8, (H,W,C) or (N,H,W,C) as allowed by `ndims`, C = 1, 3 or 4, H, W > 0."""
    return (array.dtype == np.uint8 and array.ndim in ndims and array.shape[-1] in (1, 3, 4)
            and min(array.shape[-3:-1]) > 0)


class Classifier:
    """A model with its class names and preprocessing, as read from one .h5 file."""

    def __init__(self, model: Model, checkpoint: Checkpoint) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.class_names = list(checkpoint.class_names)
        self.class_ids: list[str] | None = checkpoint.class_ids
        self.preprocessing = (Preprocessing.from_dict(checkpoint.preprocessing) if checkpoint.preprocessing
                              else Preprocessing())
        self.weights_path = checkpoint.path
        self._sha256 = None
        self._meta: dict[str, Any] | None = None
        self._head_reset = False

    @property
    def name(self) -> str:
        return self.checkpoint.provenance.get("registry_name") or Path(self.weights_path or "model").stem

    @property
    def operating_point(self) -> tuple[str, float] | None:
        """(positive class name, threshold on its probability) chosen on validation when the model was
        fine-tuned (lightcnn.train.run), or None: decisions are then argmax."""
        if self._head_reset:  # the stored threshold belonged to the old head
            return None
        op = (self.checkpoint.extra or {}).get("operating_point") or {}
        if op.get("class") not in self.class_names or op.get("threshold") is None:
            return None
        return op["class"], float(op["threshold"])

    @property
    def weights_sha256(self) -> str | None:
        if self._sha256 is None and self.weights_path:
            from lightcnn.weights import sha256_of

            self._sha256 = sha256_of(self.weights_path)
        return self._sha256

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one preprocessed image: what `preprocess` makes and a float batch must have."""
        spec = self.preprocessing
        return spec.size, spec.size, spec.channels

    def _refuse(self, array):
        h, w, c = self.input_shape
        return ShapeError(f"cannot classify an array of shape {array.shape} and dtype {array.dtype}: images are uint8 "
                          "(H,W,C) or (N,H,W,C) arrays with C = 1, 3 or 4 (preprocessed like image files); a float32 "
                          f"or float64 array must be a batch (N,{h},{w},{c}) already preprocessed for this model")

    def preprocess(self, images: Images) -> np.ndarray:
        """Images -> (N,H,W,C) float32 batch, each resized, cropped and normalised as the weight file says.

        images: a path, bytes, PIL image, uint8 array (H,W,C) or a list of these, or a uint8 array (N,H,W,C).
        Arrays are pixels in RGB order, C = 1 (grey), 3 (RGB) or 4 (RGBA, composited on black), exactly as the
        decoded image file would be. Any other array raises ShapeError.
        """
        items = self._decoded(images)
        if not items and isinstance(images, np.ndarray):  # an empty (0,H,W,C) pixel array
            return np.zeros((0, *self.input_shape), np.float32)
        return np.stack([preprocess_image(image, self.preprocessing) for image in items])

    def _decoded(self, images: Images) -> list[Any]:
        """Images (see `preprocess`) -> a list of decoded PIL images or uint8 (H,W,C) arrays, one per image."""
        if isinstance(images, np.ndarray):
            if not _is_pixels(images, 3, 4):
                raise self._refuse(images)
            if images.ndim == 4 and len(images) == 0:
                return []
            items: Sequence[Any] = [images] if images.ndim == 3 else list(images)
        elif isinstance(images, (str, os.PathLike, bytes)) or hasattr(images, "mode"):
            items = [images]
        else:
            items = images  # type: ignore[assignment]  # a list of the above
        out = []
        for image in items:
            if isinstance(image, np.ndarray) and not _is_pixels(image, 3):
                raise self._refuse(image)
            if not isinstance(image, np.ndarray) and not hasattr(image, "mode"):
                image = load_image(image, **self.preprocessing.load_options())
            out.append(image)
        return out

    def views(self, images: Images, tta: str = "none") -> np.ndarray:
        """Images -> (N*V,H,W,C) float32: the V test-time views of each image, consecutive (see lightcnn.tta;
        V = 1 for "none", 2 for "flip", 10 for "ten-crop"). "none" and "flip" also take a preprocessed float
        batch (see `batch`); "ten-crop" resizes the original image, so it needs the images themselves."""
        from lightcnn.tta import check_mode, flip_views, image_views

        check_mode(tta)
        if tta == "none":
            return self.batch(images)
        if tta == "flip":
            return flip_views(self.batch(images))
        if isinstance(images, np.ndarray) and images.dtype in (np.float32, np.float64):
            raise ShapeError(f"tta='ten-crop' needs the images (paths, bytes, PIL images or uint8 pixels), not a "
                             f"preprocessed float batch {images.shape}: each image is resized again before cropping")
        items = self._decoded(images)
        if not items:
            return np.zeros((0, *self.input_shape), np.float32)
        return np.concatenate([image_views(image, self.preprocessing, tta) for image in items])

    def batch(self, images: Images) -> np.ndarray:
        """What `predict`, `topk` and `cam` accept -> the (N,H,W,C) float32 batch the network runs on.

        Pixels (paths, bytes, PIL images, uint8 arrays (H,W,C) or (N,H,W,C), lists of them) are preprocessed;
        a float32/float64 array is taken as already preprocessed only when it is (N,H,W,C) with (H,W,C) =
        `input_shape`. Anything else (a float image without its batch axis, a float batch of another size,
        uint16 or int arrays, ...) raises ShapeError saying what is accepted: no array is guessed at.
        """
        if (isinstance(images, np.ndarray) and images.dtype in (np.float32, np.float64) and images.ndim == 4
                and images.shape[1:] == self.input_shape):
            return np.ascontiguousarray(images, np.float32)
        return self.preprocess(images)

    def logits(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N,H,W,C) preprocessed batch -> (N,K) logits, run in chunks of `batch_size`."""
        batch = np.ascontiguousarray(batch, np.float32)
        outs = [self.model.forward(batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, images: Images, batch_size: int = 32, tta: str = "none") -> np.ndarray:
        """Images or a preprocessed batch (see `batch` for what is accepted) -> (N,K) probabilities.

        tta: test-time augmentation (lightcnn.tta): "none" (default), "flip" (the image and its mirror, 2 forward
        passes per image) or "ten-crop" (4 corners + centre of the image resized to round(size / 0.875), and their
        mirrors, 10 passes; needs images, not a preprocessed batch). The probabilities are the mean of each view's
        softmax; the views run through the network in chunks of `batch_size`.
        Raises CheckpointError when the network produces a non-finite score (weights that overflow)."""
        if tta == "none":
            return finite_scores(softmax(self.logits(self.batch(images), batch_size)), self.weights_path)
        from lightcnn.tta import VIEWS, mean_over_views

        probs = finite_scores(softmax(self.logits(self.views(images, tta), batch_size)), self.weights_path)
        return mean_over_views(probs, VIEWS[tta])

    def topk(self, images: Images, k: int = 5, batch_size: int = 32, tta: str = "none") -> list[list[Prediction]]:
        """Images or a preprocessed batch (see `batch`) -> per image, the k most probable classes (tta: see
        `predict`)."""
        return topk(self.predict(images, batch_size, tta), k, self.class_names, self.class_ids)

    def _chunks(self, run: Callable[[np.ndarray], np.ndarray], images: Images, batch_size: int) -> np.ndarray | None:
        batch = self.batch(images)
        outs = [run(batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)]
        return np.concatenate(outs) if outs else None

    def features(self, images: Images, batch_size: int = 32) -> np.ndarray:
        """Images or a preprocessed batch (see `batch`) -> (N,h,w,C) float32 feature maps of the trunk (the
        input of the head; timm's forward_features), run in chunks of `batch_size`."""
        out = self._chunks(self.model.features, images, batch_size)
        if out is None:  # no images: the shape of one image's maps, with N = 0
            return self.model.features(np.zeros((1, *self.input_shape), np.float32))[:0]
        return out

    def pooled(self, images: Images, batch_size: int = 32) -> np.ndarray:
        """Images or a preprocessed batch (see `batch`) -> (N,C) float32 embeddings: `features` averaged over
        h and w (the global average pooling the head starts with)."""
        if self.model.head_is_pooled:
            out = self._chunks(self.model.pooled, images, batch_size)
        else:  # SqueezeNet's original head pools after its classifier conv: average the trunk's maps here
            out = self._chunks(lambda x: self.model.features(x).mean(axis=(1, 2), dtype=np.float32), images,
                               batch_size)
        return np.zeros((0, self.model.feature_channels), np.float32) if out is None else out

    def reset_head(self, num_classes: int, class_names: Sequence[str] | None = None, hidden: Sequence[int] = (),
                   dropout: float = 0.0, seed: int = 0) -> Classifier:
        """Replace the classifier by a new, randomly initialised one with `num_classes` outputs (timm's
        reset_classifier): GAP -> [Dense+ReLU per width in `hidden`] -> dropout -> Dense(num_classes). The
        trunk is kept. class_names default to class_0, class_1, ...; the stored operating point is dropped.
        Returns self. To train the new head, see lightcnn.train (python -m lightcnn.finetune).
        """
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        names = [f"class_{i}" for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.model.reset_head(num_classes, hidden=tuple(hidden), dropout=dropout, seed=seed)
        self.class_names, self.class_ids = names, None
        self._head_reset, self._meta = True, None
        return self

    @property
    def meta(self) -> dict[str, Any]:
        """What the model and its weights are: a dict of lightcnn.weights.META_FIELDS (name, arch, tag,
        parameters, macs, input_size, num_classes, file, file_size, weights_sha256, published_top1,
        measured_top1, licence, source, url, source_sha256), None where unknown; the same fields as
        `python -m lightcnn.weights list --json`. After reset_head, parameters and MACs are the new model's,
        file and SHA-256 still the file it was loaded from."""
        meta = self._meta
        if meta is None:
            from lightcnn.registry import REGISTRY
            from lightcnn.weights import weights_meta

            spec = None if self._head_reset else REGISTRY.get(str(self.checkpoint.provenance.get("registry_name")))
            meta = weights_meta(spec, self.weights_path, self.model, self.checkpoint)
            if self.weights_path and meta["weights_sha256"]:
                self._sha256 = meta["weights_sha256"]
            self._meta = meta
        return dict(meta)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """(N,K) probabilities -> (N,) class indices: at the stored operating point when the model has one
        (see `operating_point`), else argmax. The class `predict --json` reports as "decision"."""
        if self.operating_point is None:
            return np.asarray(probs).argmax(axis=1)
        from lightcnn.metrics import decide

        name, threshold = self.operating_point
        return decide(probs, self.class_names.index(name), threshold)

    def cam(self, images: Images, class_index: int | Sequence[int] | np.ndarray | None = None, layer: str | None = None,
            method: str = "auto") -> Explanation:
        """Images or a preprocessed batch (see `batch`) -> lightcnn.explain.Explanation: maps (N,h,w) for
        `class_index` (None = each image's decided class, see `decide`: the top-1, or the class chosen at the
        stored operating point; Explanation.class_index says which). method "auto" is CAM for GAP+linear (and
        SqueezeNet conv) heads when no layer is named, else Grad-CAM at `layer` (default model.cam_layer); see
        lightcnn.explain. Maps are always of the plain view (no test-time augmentation)."""
        from lightcnn.explain import explain

        batch = self.batch(images)
        if class_index is None and self.operating_point is not None:
            class_index = self.decide(softmax(self.logits(batch)))
        return explain(self.model, batch, class_index, layer, method)

    def __repr__(self) -> str:
        return f"Classifier({self.model.arch!r}, {len(self.class_names)} classes, weights={self.weights_path})"


def finite_scores(probs: np.ndarray, weights: str | os.PathLike | None) -> np.ndarray:
    """`probs` unchanged when every value is finite; else CheckpointError naming the weights (a network whose
    weights overflow float32 gives NaN or Inf scores, which must never be reported as probabilities)."""
    bad = ~np.isfinite(probs)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise CheckpointError(f"{weights or '<model>'}: the network produced non-finite scores for {len(rows)} of "
                              f"{len(probs)} images (weights out of range for float32?)")
    return probs


def model_from_checkpoint(ckpt: Checkpoint, simulate_quantization: bool | None = False) -> Model:
    """The model a checkpoint describes, with its weights loaded.

    simulate_quantization: False (default) the plain float network, what training, export and
    summaries want; True rounds activations to the 8-bit grids recorded from a quantised TFLite
    file (lightcnn.quantsim; error if the file has none); None follows the file's default
    (extra["simulate_activation_quantization"], set from the registry when the file was built).

    Nothing is built before the checkpoint passes: a known architecture, a config that
    lightcnn.models.check_config accepts (keys of the builder's signature, types, bounds), preprocessing
    within check_preprocessing's bounds and with the model's channel count, one class name per output.
    Every refusal is a CheckpointError naming the file and the attribute.
    """
    from lightcnn.layers.basic import skip_initialisation
    from lightcnn.models import BUILDERS, build, builder_keywords, check_config

    where = ckpt.path or "<checkpoint>"
    config = ckpt.config
    try:
        check_config(ckpt.arch, config)
    except ValueError as exc:
        raise CheckpointError(f"{where}: attribute {'arch' if ckpt.arch not in BUILDERS else 'config'}: "
                              f"{exc}") from None
    check_preprocessing(ckpt)
    try:
        with skip_initialisation():  # load_state replaces every tensor (and fails if one is missing)
            model = build(ckpt.arch, **{k: v for k, v in config.items() if k != "head"})
            head = config.get("head")
            if isinstance(head, dict):  # a fine-tuned head replaced the original one
                model.reset_head(config["num_classes"], hidden=tuple(head.get("hidden", ())),
                                 dropout=head.get("dropout", 0.0), hidden_dropout=head.get("hidden_dropout", 0.0))
            elif head is not None and head != model.config.get("head") and "head" in builder_keywords(ckpt.arch):
                model = build(ckpt.arch, **config)
    except MemoryError:
        raise CheckpointError(f"{where}: the model its config describes does not fit in memory") from None
    except ValueError as exc:  # a builder's own check (the config passed check_config)
        raise CheckpointError(f"{where}: attribute config: {' '.join(str(exc).split())}") from None
    spec = Preprocessing.from_dict(ckpt.preprocessing) if ckpt.preprocessing else Preprocessing()
    if spec.channels != model.input_shape[2]:
        raise CheckpointError(f"{where}: attribute preprocessing: channel_order {spec.channel_order!r} gives "
                              f"{spec.channels} channels, the {ckpt.arch} takes {model.input_shape[2]}")
    if model.num_classes != len(ckpt.class_names):
        raise CheckpointError(f"{where}: attribute class_names: {len(ckpt.class_names)} names for a model with "
                              f"{model.num_classes} outputs")
    model = load_state(model, ckpt.tensors, where)
    extra = ckpt.extra or {}
    table = extra.get("activation_quantization")
    if simulate_quantization is None:
        simulate_quantization = bool(table) and bool(extra.get("simulate_activation_quantization"))
    if simulate_quantization:
        from lightcnn import quantsim
        from lightcnn.checkpoint import check_quantization_table

        if not table:
            raise CheckpointError(f"{where}: no activation quantisation table to simulate "
                                  "(only files converted from quantised TFLite models carry one)")
        check_quantization_table(table, where)
        try:
            quantsim.simulate_activation_quantization(model, table)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    return model


#: the input sizes a weight file may ask for: every architecture works from 32 pixels (1x1 final maps), and
#: 4096 is far beyond any model here (the resize step may go up to MAX_RESIZE)
MIN_INPUT_SIZE, MAX_INPUT_SIZE, MAX_RESIZE = 32, 4096, 8192


def check_preprocessing(ckpt: Checkpoint) -> None:
    """Refuse (CheckpointError naming the file) a preprocessing record Preprocessing would not accept, or one
    whose sizes are outside [MIN_INPUT_SIZE, MAX_INPUT_SIZE] (resize_size at most MAX_RESIZE)."""
    where = ckpt.path or "<checkpoint>"
    if not ckpt.preprocessing:
        return
    try:
        spec = Preprocessing.from_dict(ckpt.preprocessing)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: attribute preprocessing: {' '.join(str(exc).split())}"[:300]) from None
    if not MIN_INPUT_SIZE <= spec.size <= MAX_INPUT_SIZE:
        raise CheckpointError(f"{where}: attribute preprocessing: size {spec.size} is outside "
                              f"[{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}]")
    if spec.resize_size > MAX_RESIZE:
        raise CheckpointError(f"{where}: attribute preprocessing: resize_size {spec.resize_size} is over {MAX_RESIZE}")


def load(name_or_path: str | os.PathLike = "mobilenet_v2", simulate_quantization: bool | None = None,
         engine: str | None = None, weights: str | os.PathLike | None = None) -> Classifier:
    """Load a registered model by name (its converted .h5 must exist) or any lightcnn .h5 path.

    weights: with an architecture name, which of its registered weights (a tag, see lightcnn.list_weights and
    the README: "tfslim", "keras", "torchvision", "caffe", or "default"); "mobilenet_v2.keras" is the same as
    load("mobilenet_v2", weights="keras") and as today's registry name "mobilenet_v2_keras". A .h5 path is
    accepted too (its architecture must be `name_or_path`). A mistyped name raises CheckpointError with the
    closest known name.

    engine: "auto" (default: $LIGHTCNN_ENGINE, else auto), "numba" or "numpy"; see lightcnn.engine.
    `clf.model.last_engine` tells which one ran.

    simulate_quantization: None uses the file's default (on for registry models where rounding
    activations to the quantised runtime's 8-bit grids brings results closer to it, see
    lightcnn.quantsim); True/False force it on/off.
    """
    from lightcnn.registry import resolve_name
    from lightcnn.weights import find_weights

    expected_arch = None
    if weights is not None and (str(weights).endswith(".h5") or Path(str(weights)).is_file()):
        expected_arch, name_or_path = name_or_path, weights
    elif weights is not None:
        try:
            name_or_path = resolve_name(name_or_path, weights)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    ckpt = read_checkpoint(find_weights(name_or_path))
    if expected_arch is not None and ckpt.arch != expected_arch:
        raise CheckpointError(f"{name_or_path}: holds a {ckpt.arch}, not a {expected_arch}")
    model = model_from_checkpoint(ckpt, simulate_quantization)
    if engine is not None:
        model.engine = engine
    return Classifier(model, ckpt)
