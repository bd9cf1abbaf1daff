"""Class activation maps: where in the image the evidence for a class lies.

CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization")
    For a head  features A (N,h,w,F) -> global average pool -> [dropout] -> dense W (F,K), b (K,)
    the logit of class c is  y_c = mean_ij sum_k W[k,c] A[ij,k] + b_c,  so the map

        M_c[i,j] = sum_k W[k,c] A[i,j,k]            (N,h,w), and mean_ij M_c + b_c = y_c

    shows how much each position adds to y_c. SqueezeNet's head is a 1x1 conv to the classes
    (+ ReLU) followed by the average pool: there the map is the class channel of that conv's output,
    and mean_ij M_c = y_c exactly. No backward pass is needed.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", eq. 1-2), at any named layer L with output A (N,h,w,C):

        alpha[n,k] = mean_ij d y_c / d A[n,i,j,k]           (the channel's importance)
        M_c[n]     = ReLU( sum_k alpha[n,k] A[n,:,:,k] )     (N,h,w)

    The gradient comes from the hand-written backward passes: one forward with caches
    (training=True, but every layer frozen so batch norm uses its running statistics and no
    parameter gradient is computed, and dropout disabled), then the backward of one-hot(c) from the
    logits down to L, where it stops. For a GAP + linear head at the last conv layer,
    d y_c / d A[ij,k] = W[k,c] / (h w), so Grad-CAM = ReLU(CAM) / (h w): the two agree up to scale.

Display: a map is ReLU'd, divided by its maximum (positive evidence only, so CAM and Grad-CAM look
the same), upsampled to the network input with Pillow's bilinear filter (pixel centres aligned),
coloured through a 256-entry "jet" palette (a Pillow lookup table; no matplotlib) and blended over
the preprocessed (resized and cropped) input image.

This module does not compute guided backpropagation, Grad-CAM++ or any smoothing over noise.
"""

from typing import NamedTuple

import numpy as np

from lightcnn.layers.basic import Dense, Dropout, GlobalAvgPool
from lightcnn.layers.blocks import ConvBNAct

__all__ = ["Explanation", "cam_head_kind", "class_activation_map", "grad_cam", "activation_and_gradient",
           "explain", "normalise_map", "upsample_map", "jet_palette", "heatmap_image", "overlay",
           "display_pixels", "save_explanation"]


class Explanation(NamedTuple):
    maps: np.ndarray          # (N,h,w) float32; CAM raw (may be negative), Grad-CAM after its ReLU
    logits: np.ndarray        # (N,K) the logits the classes were chosen from
    class_index: np.ndarray   # (N,) int, the class each map explains
    method: str               # "cam" or "gradcam"
    layer: str                # dotted layer path the map lives at


# -- which heads CAM understands ----------------------------------------------------------------------------------


def cam_head_kind(model):
    """"dense" for GAP -> [dropout] -> Dense (no activation), "conv" for [dropout] -> 1x1 conv -> GAP, else None."""
    layers = [layer for _, layer in model.head_net.children()]
    core = [layer for layer in layers if not isinstance(layer, Dropout)]
    if (len(core) == 2 and isinstance(core[0], GlobalAvgPool) and isinstance(core[1], Dense)
            and core[1].act_name == "none"):
        return "dense"
    if (len(core) == 2 and isinstance(core[0], ConvBNAct) and isinstance(core[1], GlobalAvgPool)
            and core[0].conv.kernel == (1, 1) and core[0].conv.stride == (1, 1)):
        return "conv"
    return None


def _class_indices(class_index, logits):
    n = logits.shape[0]
    if class_index is None:
        return np.argmax(logits, axis=1).astype(np.int64)
    idx = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,)).copy()
    k = logits.shape[1]
    if np.any(idx < 0) or np.any(idx >= k):
        raise ValueError(f"class index {class_index!r} out of range for {k} classes")
    return idx


def class_activation_map(model, x=None, class_index=None, features=None):
    """CAM of `class_index` (int, (N,) ints, or None = each image's top-1).

    x (N,H,W,C) input batch, or `features` (N,h,w,F) = model.features(x) when already computed.
    Returns Explanation with maps (N,h,w) (the conv-head map is the classifier's output grid, which is
    15x15 for the padded Caffe SqueezeNet). Raises ValueError for heads CAM does not cover.
    """
    kind = cam_head_kind(model)
    if kind is None:
        raise ValueError(f"{model.arch}: CAM needs a GAP -> dense or 1x1-conv -> GAP head; use Grad-CAM instead")
    f = model.features(x) if features is None else features
    if kind == "dense":
        logits = model.head(f)
        idx = _class_indices(class_index, logits)
        w = model.head_net["classifier"].params["weight"]            # (F,K)
        maps = np.einsum("nhwf,nf->nhw", f, w[:, idx].T.astype(f.dtype))
        layer = _features_output_name(model)
    else:
        y = f
        for _, layer_obj in model.head_net.children():
            if isinstance(layer_obj, GlobalAvgPool):
                break
            y = layer_obj.forward(y, False)                          # dropout is the identity here
        logits = y.mean(axis=(1, 2))
        idx = _class_indices(class_index, logits)
        maps = y[np.arange(len(idx)), :, :, idx]
        layer = "head.classifier"
    return Explanation(np.ascontiguousarray(maps, np.float32), logits, idx, "cam", layer)


def _features_output_name(model):
    """The dotted name of the layer whose output is model.features(x) (its last unit when sequential)."""
    name = "features"
    net = model.features_net
    while hasattr(net, "layers") and len(net) > 0:
        last_name, net = net.layers[-1]
        name = f"{name}.{last_name}"
    return name


# -- Grad-CAM ------------------------------------------------------------------------------------------------------


class _StopBackward(Exception):
    """Raised inside the target layer's backward once its incoming gradient is recorded."""


def _find_layer(model, path):
    for name, layer in model.named_layers():
        if name == path:
            return layer
    names = [n for n, _ in model.named_layers() if n]
    raise ValueError(f"{model.arch}: no layer named {path!r}; layers are e.g. {', '.join(names[-6:])}")


def activation_and_gradient(model, x, class_index=None, layer=None, perturb=None):
    """Forward x once with caches and backprop d logit_c from the logits down to `layer`.

    x            (N,H,W,C) batch
    class_index  int, (N,) ints, or None (each image's top-1 from this forward)
    layer        dotted path from model.named_layers() (default model.cam_layer)
    perturb      optional function A -> A' applied to the layer's output before the rest of the network
                 sees it (finite-difference tests use it)
    returns      (A, dA, logits, class_index): A the layer's output, dA = d logit_c / d A of the same shape

    The model is left as it was: frozen flags, dropout rates and caches are restored/cleared even on error.
    """
    layer = model.cam_layer if layer is None else layer
    target = _find_layer(model, layer)
    captured = {}
    saved_frozen = [(lay, lay.frozen) for _, lay in model.named_layers()]
    saved_dropout = [(lay, lay.p) for _, lay in model.named_layers() if isinstance(lay, Dropout)]
    own = {key: target.__dict__[key] for key in ("forward", "backward") if key in target.__dict__}
    inner_forward, inner_backward = target.forward, target.backward

    def forward(inp, training=False):
        out = inner_forward(inp, training)
        if perturb is not None:
            out = perturb(out)
        captured["A"] = out
        return out

    def backward(dy):
        captured["dA"] = dy
        raise _StopBackward

    try:
        model.set_frozen(True)               # batch norm: running statistics; no parameter gradients
        for lay, _ in saved_dropout:
            lay.p = 0.0
        target.forward, target.backward = forward, backward
        logits = model.forward(x, training=True)
        idx = _class_indices(class_index, logits)
        dlogits = np.zeros_like(logits)
        dlogits[np.arange(len(idx)), idx] = 1.0
        try:
            model.backward(dlogits)
        except _StopBackward:
            pass
    finally:
        for key in ("forward", "backward"):
            if key in own:
                setattr(target, key, own[key])
            else:
                target.__dict__.pop(key, None)
        for lay, frozen in saved_frozen:
            lay.frozen = frozen
        for lay, p in saved_dropout:
            lay.p = p
        model.clear_cache()
    if "dA" not in captured:
        raise ValueError(f"{model.arch}: the backward pass never reached layer {layer!r}")
    return captured["A"], captured["dA"], logits, idx


def grad_cam(model, x, class_index=None, layer=None):
    """Grad-CAM of `class_index` at `layer` (default model.cam_layer); returns Explanation, maps (N,h,w) >= 0."""
    layer = model.cam_layer if layer is None else layer
    a, da, logits, idx = activation_and_gradient(model, x, class_index, layer)
    if a.ndim != 4:
        raise ValueError(f"{model.arch}: layer {layer!r} outputs shape {a.shape}; Grad-CAM needs a spatial "
                         "(N, H, W, C) map")
    alpha = da.astype(np.float64).mean(axis=(1, 2))                  # (N,C)
    maps = np.maximum(np.einsum("nhwc,nc->nhw", a.astype(np.float64), alpha), 0.0)
    return Explanation(maps.astype(np.float32), logits, idx, "gradcam", layer)


def explain(model, x, class_index=None, layer=None, method="auto"):
    """One entry point: method "cam", "gradcam" or "auto" (CAM when the head allows it and no layer is named,
    else Grad-CAM at `layer` or model.cam_layer)."""
    if method not in ("auto", "cam", "gradcam"):
        raise ValueError(f"method must be 'auto', 'cam' or 'gradcam', got {method!r}")
    if method == "auto":
        method = "cam" if layer is None and cam_head_kind(model) is not None else "gradcam"
    if method == "cam":
        if layer is not None:
            raise ValueError("CAM is defined at the features output only; pass method='gradcam' to name a layer")
        return class_activation_map(model, x, class_index)
    return grad_cam(model, x, class_index, layer)


# -- display -------------------------------------------------------------------------------------------------------


def normalise_map(m):
    """ReLU, then divide by the maximum: (h,w) -> values in [0, 1] (all zero when nothing is positive)."""
    m = np.maximum(np.asarray(m, np.float64), 0.0)
    top = m.max() if m.size else 0.0
    return (m / top if top > 0 else np.zeros_like(m)).astype(np.float32)


def upsample_map(m, size):
    """(h,w) map -> (H,W) float32 with Pillow's bilinear filter; size = (H, W)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(m, np.float32))  # mode "F"
    return np.asarray(img.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR), np.float32)


def jet_palette():
    """The 256-entry "jet" colour map as a flat [r0, g0, b0, r1, ...] list for Image.putpalette.

    Piecewise linear: t = i/255; r = clip(1.5 - |4t - 3|), g = clip(1.5 - |4t - 2|), b = clip(1.5 - |4t - 1|).
    0 is dark blue, 0.5 green, 1 dark red.
    """
    t = np.arange(256) / 255.0
    rgb = np.stack([1.5 - np.abs(4 * t - c) for c in (3.0, 2.0, 1.0)], axis=1)
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8).reshape(-1).tolist()


def heatmap_image(m01):
    """(H,W) values in [0, 1] -> PIL "RGB" image through the jet palette (a "P" image with a lookup table)."""
    from PIL import Image

    idx = np.rint(np.clip(np.asarray(m01, np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    img = Image.fromarray(idx)                          # mode "L"
    img.putpalette(jet_palette())                       # "L" + palette -> "P": the indices index the table
    return img.convert("RGB")


def display_pixels(pixels, channel_order):
    """Preprocessed uint8 pixels (H,W,C) in the model's channel order -> (H,W,3) RGB for display."""
    pixels = np.asarray(pixels, np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels)


def overlay(rgb, m, alpha=0.5):
    """Blend the coloured, normalised, upsampled map over an (H,W,3) uint8 RGB image; returns a PIL image."""
    from PIL import Image

    base = Image.fromarray(np.ascontiguousarray(rgb, np.uint8))  # (H,W,3) uint8 -> "RGB"
    heat = heatmap_image(upsample_map(normalise_map(m), (base.height, base.width)))
    return Image.blend(base, heat, float(alpha))


def save_explanation(stem, rgb, m, alpha=0.5):
    """Write <stem>.png (overlay) and <stem>.npy (the raw (h,w) float32 map); returns both paths."""
    from pathlib import Path

    stem = Path(stem)
    png, npy = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npy")
    np.save(npy, np.asarray(m, np.float32))
    overlay(rgb, m, alpha).save(png)
    return png, npy
