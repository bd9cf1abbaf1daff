"""Test-time augmentation (TTA): several fixed views of each image, their class probabilities averaged.

    image --views--> V views (V,S,S,C) float32, normalised exactly as the plain path normalises
    N images x V views = (N*V,S,S,C) --the model, in the usual chunks of batch_size--> (N*V,K) logits
    --softmax per view--> mean over each image's V views --> (N,K) probabilities

The modes (fixed definitions: docs/notes/ct-attempt-3-preregistration.md depends on them exactly):

  none      the image as preprocessed today, 1 view; identical to predicting without TTA
  flip      the preprocessed image and its left-right mirror, x[:, :, ::-1, :] in NHWC; 2 views
  ten-crop  the image resized with the model's own resize rule to R = round(size / 0.875) (256 for 224),
            the four corner crops and the centre crop of size x size (torchvision FiveCrop's order and
            rounding), and the same five crops of the mirrored image (torchvision's TenCrop); 10 views
            (lightcnn.preprocess.ten_crop_uint8)

The probability of each class is the mean of the softmax probabilities over the views, not the softmax of the
mean logits. A forward pass costs V times as much; CAM and Grad-CAM keep using the plain view. Decisions at a
model's stored operating point apply its (plain-view) threshold to the averaged probabilities.
"""

from __future__ import annotations

import numpy as np

from lightcnn.preprocess import normalise_pixels, preprocess_image, ten_crop_uint8

__all__ = ["TTA_MODES", "VIEWS", "check_mode", "image_views", "flip_views", "mean_over_views", "describe"]

TTA_MODES = ("none", "flip", "ten-crop")
#: views per image of each mode
VIEWS = {"none": 1, "flip": 2, "ten-crop": 10}


def check_mode(tta):
    """`tta` itself when it is one of TTA_MODES, else ValueError naming the choices."""
    if tta not in VIEWS:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


def describe(tta):
    """'flip (2 views per image)': how reports and help text name a mode."""
    return f"{tta} ({VIEWS[check_mode(tta)]} view{'s' if VIEWS[tta] > 1 else ''} per image)"


def flip_views(batch):
    """x (N,H,W,C) -> (N*2,H,W,C): each image followed by its left-right mirror x[:, :, ::-1, :]."""
    batch = np.asarray(batch)
    return np.ascontiguousarray(np.stack([batch, batch[:, :, ::-1, :]], axis=1).reshape(-1, *batch.shape[1:]))


def image_views(image, spec, tta, plain=None):
    """One decoded image (anything preprocess_image accepts) -> its views (V,S,S,C) float32.

    plain: the image's plain view (S,S,C) when the caller has it already (none and flip start from it, so
    their first view is that array exactly)."""
    check_mode(tta)
    if tta == "ten-crop":
        return normalise_pixels(ten_crop_uint8(image, spec), spec)
    x = preprocess_image(image, spec) if plain is None else np.asarray(plain, np.float32)
    return x[None].copy() if tta == "none" else flip_views(x[None])


def mean_over_views(probs, views):
    """(N*V,K) per-view probabilities, each image's V views consecutive -> (N,K) their mean over the views."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(probs) % views:
        raise ValueError(f"mean_over_views: expected (N*{views}, K) probabilities, got shape {probs.shape}")
    if views == 1:
        return probs
    return probs.reshape(-1, views, probs.shape[1]).mean(axis=1)
