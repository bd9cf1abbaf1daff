"""Seeded training-time augmentations on decoded images, before resizing to the model size and normalisation.

Images are NumPy arrays img (H, W, C) uint8 with C in {1, 3, 4} (what `np.asarray(pil_image)` gives, plus a
channel axis for grayscale). Every function returns a new array and never writes into its input. Randomness
comes only from the `np.random.Generator` passed in, so a run is reproduced by its seed; nothing here touches a
global random state. Geometric resampling is delegated to Pillow (bilinear, fill 0 = black, which is also the
background of CT and X-ray images).

Where it sits: file -> decode -> Augmenter (training split only) -> resize/normalise (preprocess) -> NHWC batch.
Validation and test images are never augmented.

    random_resized_crop  area fraction ~ U(scale), log aspect ~ U(log ratio), 10 tries, else a centre crop
                         (the torchvision RandomResizedCrop algorithm), then resize to `size`
    zoom                 factor s ~ U(range); s > 1 magnifies the centre (the H/s x W/s centre fills the image)
    rotation             angle ~ U(-max_degrees, +max_degrees) about the centre, same canvas size
    hflip                mirror left-right with probability p
    colour_jitter        brightness, contrast, saturation factors ~ U(1 - x, 1 + x), applied in that fixed order
    gaussian_noise       add N(0, sigma^2) per pixel, sigma in 0..255 intensity units, then round and clip

`Augmenter(config)` chains the ops named in `config` in the fixed order above; `to_dict()` gives back the full
config (defaults filled in) to store next to a checkpoint. `oversample_indices` balances classes by repetition.
Not here: mixup/cutmix, elastic deformation. Test-time augmentation (flip, ten-crop) is lightcnn.tta.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from lightcnn.errors import ShapeError

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _check(img):
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in _MODES:
        raise ShapeError(f"augment expects img (H, W, C) uint8 with C in 1/3/4, got {img.shape} {img.dtype}")
    return img


def _to_pil(img):
    return Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img, _MODES[img.shape[2]])


def _from_pil(im, channels):
    a = np.array(im, dtype=np.uint8)  # np.array copies: the result is writable and owned by the caller
    return a[:, :, None] if channels == 1 else a


def _fill(channels):
    return 0 if channels == 1 else (0,) * channels


# --------------------------------------------------------------------------------------------- geometric


def random_resized_crop_box(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of a crop whose area is a U(scale) fraction of H*W and aspect w/h is log-uniform in ratio.

    torchvision's RandomResizedCrop.get_params: up to 10 draws of (area, aspect); the first whose rounded box
    fits inside the image wins, at a uniformly random position. If none fits, the largest centred crop whose
    aspect is clamped into `ratio` is returned (so its area may exceed scale[1]).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img, rng, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """img (H, W, C) -> (S_h, S_w, C): a `random_resized_crop_box` crop resized (bilinear) to size (int or (h, w))."""
    img = _check(img)
    out_h, out_w = (size, size) if np.isscalar(size) else size
    top, left, h, w = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, ratio)
    im = _to_pil(img).resize((int(out_w), int(out_h)), Image.BILINEAR, box=(left, top, left + w, top + h))
    return _from_pil(im, img.shape[2])


def zoom_by(img, factor):
    """img (H, W, C) -> (H, W, C) magnified by `factor` about the centre (factor < 1 shrinks and pads with 0).

    Output pixel x samples input c + (x - c) / factor, c the image centre (Pillow affine, bilinear).
    """
    img = _check(img)
    if factor == 1.0:
        return img.copy()
    h, w, c = img.shape
    inv = 1.0 / factor
    cx, cy = w / 2.0, h / 2.0
    im = _to_pil(img).transform((w, h), Image.AFFINE, (inv, 0.0, cx - cx * inv, 0.0, inv, cy - cy * inv),
                                resample=Image.BILINEAR, fillcolor=_fill(c))
    return _from_pil(im, c)


def zoom(img, rng, range=(1.1, 1.3)):  # noqa: A002 - "range" is the config key
    """Magnify about the centre by a factor ~ U(range); see `zoom_by`."""
    return zoom_by(img, float(rng.uniform(range[0], range[1])))


def rotate(img, degrees):
    """img (H, W, C) rotated counter-clockwise by `degrees` about its centre, same size, corners filled with 0.

    0 degrees returns an exact copy (no resampling).
    """
    img = _check(img)
    if degrees % 360 == 0:
        return img.copy()
    im = _to_pil(img).rotate(float(degrees), resample=Image.BILINEAR, expand=False, fillcolor=_fill(img.shape[2]))
    return _from_pil(im, img.shape[2])


def rotation(img, rng, max_degrees=40.0):
    """Rotate by an angle ~ U(-max_degrees, +max_degrees)."""
    return rotate(img, float(rng.uniform(-max_degrees, max_degrees)))


def hflip(img, rng, p=0.5):
    """Mirror left-right (img[:, ::-1]) with probability p; a copy either way. One rng draw per call."""
    img = _check(img)
    flip = rng.random() < p
    return np.ascontiguousarray(img[:, ::-1]) if flip else img.copy()


# --------------------------------------------------------------------------------------------- photometric

# ITU-R 601-2 luma, the weights of Pillow's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _gray(x):
    """x (H, W, C) float32 -> (H, W, 1) luma (C=1: itself; an alpha channel is ignored)."""
    return x[:, :, :1] if x.shape[2] == 1 else (x[:, :, :3] @ _LUMA)[:, :, None]


def colour_jitter(img, rng, brightness=0.0, contrast=0.0, saturation=0.0):
    """Random brightness, contrast and saturation, as torchvision's ColorJitter but in a fixed order.

    For each non-zero strength x a factor f ~ U(max(0, 1 - x), 1 + x) is drawn, and the image becomes
        brightness  f * img
        contrast    f * img + (1 - f) * mean(luma(img))        (blend with a flat grey image)
        saturation  f * img + (1 - f) * luma(img)              (blend with its own grayscale; no-op for C = 1)
    then it is rounded and clipped to 0..255. An alpha channel is left as is.
    """
    img = _check(img)
    c = img.shape[2]
    colour = slice(0, 3) if c == 4 else slice(0, c)
    x = img.astype(np.float32)
    for strength, op in ((brightness, "b"), (contrast, "c"), (saturation, "s")):
        if not strength:
            continue
        f = np.float32(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
        if op == "b":
            x[:, :, colour] *= f
        elif op == "c":
            x[:, :, colour] = f * x[:, :, colour] + (1 - f) * _gray(x).mean()
        elif c >= 3:
            x[:, :, colour] = f * x[:, :, colour] + (1 - f) * _gray(x)
        x = np.clip(x, 0, 255)  # each torchvision step clips, which changes the next step's mean
    return np.rint(x).astype(np.uint8)


def gaussian_noise(img, rng, sigma=5.0):
    """img + N(0, sigma^2) per pixel and channel (sigma in 0..255 units), rounded and clipped to uint8."""
    img = _check(img)
    noisy = img.astype(np.float32) + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- composition

# Name -> (function, default parameters). The order of this table is the order of application: geometry first
# (so the crop defines the canvas), colour next, noise last (so the noise is not rescaled by the jitter).
OPS = {
    "random_resized_crop": (random_resized_crop, {"size": 224, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3]}),
    "zoom": (zoom, {"range": [1.1, 1.3]}),
    "rotation": (rotation, {"max_degrees": 40.0}),
    "hflip": (hflip, {"p": 0.5}),
    "colour_jitter": (colour_jitter, {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2}),
    "gaussian_noise": (gaussian_noise, {"sigma": 5.0}),
}


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else v


class Augmenter:
    """A fixed chain of the ops in `OPS`, configured by a dict such as

        {"random_resized_crop": {"size": 224, "scale": [0.08, 1.0]}, "rotation": {"max_degrees": 40},
         "hflip": {}, "gaussian_noise": {"sigma": 3}}

    Missing parameters take the defaults in `OPS`; an op maps to None (or is absent) to be off. Unknown op or
    parameter names raise ValueError. The ops always run in `OPS` order, whatever the dict order.
    `aug(img, rng)` -> augmented copy; `to_dict()` -> the complete config, JSON-able, so that
    `Augmenter(aug.to_dict())` is the same augmenter.
    """

    def __init__(self, config=None):
        config = dict(config or {})
        unknown = set(config) - set(OPS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; known: {list(OPS)}")
        self.steps = []
        for name, (fn, defaults) in OPS.items():
            params = config.get(name)
            if params is None or params is False:
                continue
            params = {} if params is True else dict(params)
            bad = set(params) - set(defaults)
            if bad:
                raise ValueError(f"{name}: unknown parameter(s) {sorted(bad)}; known: {list(defaults)}")
            self.steps.append((name, fn, {**defaults, **params}))

    def __call__(self, img, rng):
        out = _check(img)
        for _, fn, params in self.steps:
            out = fn(out, rng, **params)
        return out if self.steps else out.copy()

    def to_dict(self):
        return {name: {k: _jsonable(v) for k, v in params.items()} for name, _, params in self.steps}

    def __repr__(self):
        return f"Augmenter({self.to_dict()})"


def oversample_indices(labels, seed=0):
    """Indices (M,) sorted, in which every class appears as often as the largest one.

    A class with n_c items (majority n_max) contributes each of its indices floor(n_max / n_c) times plus
    n_max mod n_c distinct indices drawn without replacement, so duplicates are spread evenly rather than
    piling on a few lucky images. Pair with augmentation so the repeats are not pixel-identical.
    labels (N,) ints -> M = K_present * n_max indices into labels.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n_max = counts.max(initial=0)
    out = []
    for c, n_c in zip(classes, counts):
        idx = np.flatnonzero(labels == c)
        reps, extra = divmod(int(n_max), int(n_c))
        out.append(np.repeat(idx, reps))
        out.append(rng.choice(idx, size=extra, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.empty(0, np.int64)


__all__ = ["OPS", "Augmenter", "colour_jitter", "gaussian_noise", "hflip", "oversample_indices",
           "random_resized_crop", "random_resized_crop_box", "rotate", "rotation", "zoom", "zoom_by"]
