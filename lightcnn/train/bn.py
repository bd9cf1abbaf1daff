"""Batch norm in fine-tuning (--bn) and architecture variants of pretrained weights (--activation).

    frozen       every BN in inference mode with the weights' running statistics; gamma/beta fixed
                 (the default of --mode head and last-k)
    train        the BNs of the trained part normalise with batch statistics and update the running ones
                 (momentum 0.1, unbiased variance), gamma/beta train: PyTorch's model.train() (default of full)
    recalibrate  before training, one pass over the training images re-estimates the running statistics of the
                 trained part: batch statistics normalise during the pass and the running ones become the
                 equal-weight average over the batches (PyTorch's momentum=None); then training as `frozen`

Folded files. TFLite MobileNets carry no BN (it is folded into conv + bias), so there is nothing to train or
recalibrate. `unfold_batchnorm` puts one behind every conv of the trunk such that the network computes exactly
what it did on the target data: with m, v the mean and variance of a channel of W*x (the conv without its
bias b) over the training images,

    running_mean = m,  running_var = v,  gamma = sqrt(v + eps),  beta = m + b   =>  BN(Wx) = Wx + b

so recalibrating such a BN after a change of activation (ELU for ReLU6, seed 000) gives each channel back the
mean and spread it had in the original network on these images, and the network starts sane: on 32 COVID-CT
slices the largest pooled feature of the TFLite MobileNetV2 is 5.5 with ReLU6, 244 with ELU as is and 7.9 with
ELU after unfolding and recalibrating (the unfolded ReLU6 network's pooled features differ by 1.4e-5).

Not here: BN of the frozen prefix in --bn train (the prefix runs once per image as a cached inference plan).
"""

from __future__ import annotations

import numpy as np

from lightcnn.layers.basic import BatchNorm
from lightcnn.layers.blocks import ConvBNAct

BN_MODES = ("frozen", "train", "recalibrate")


def batchnorm_layers(net):
    """[(dotted path, BatchNorm)] under `net`, in forward order."""
    return [(path, layer) for path, layer in net.named_layers() if isinstance(layer, BatchNorm)]


def statistics_pass(features, batches, layers, track):
    """Run `features` (training-mode forward) over `batches` (iterable of (N,H,W,C) float32) with the BNs in
    `layers` tracking statistics (`BatchNorm.track`); the others stay as they are. Returns the batch count.

    track "cumulative": the running statistics of `layers` are replaced by the average over the batches (an
    empty pass leaves them unchanged). Nothing else in the network changes; caches are cleared per batch.
    """
    layers = list(layers)
    for layer in layers:
        layer.track, layer.tracked_batches, layer.measured = track, 0, None
    n = 0
    try:
        for x in batches:
            features.forward(np.ascontiguousarray(x, np.float32), True)
            features.clear_cache()
            n += 1
    finally:
        for layer in layers:
            layer.track = None
        features.clear_cache()
        features.params_changed()
    return n


def recalibrate(model, batches, layers):
    """Re-estimate the running statistics of the BatchNorms `layers` of `model` on `batches` (see module doc)."""
    return statistics_pass(model.features_net, batches, layers, "cumulative")


def has_batchnorm(model):
    return bool(batchnorm_layers(model.features_net))


def can_unfold(model):
    """True when `model` has no BN in its trunk but its builder can put them back (a "bn" option)."""
    return not has_batchnorm(model) and model.config.get("bn") is False


def rebuild(model, **changes):
    """The same architecture built with builder options `changes`, holding `model`'s tensors (strict by name;
    options that change tensor names or shapes fail there)."""
    from lightcnn.api import model_from_checkpoint
    from lightcnn.checkpoint import Checkpoint

    config = {**model.config, **changes}
    # placeholder names: the loader checks there is one per output (the caller keeps the real ones)
    ckpt = Checkpoint(arch=model.arch, config=config, tensors=model.state_dict(),
                      class_names=[str(i) for i in range(model.num_classes)], path=f"{model.arch} with {changes}")
    new = model_from_checkpoint(ckpt)
    new.engine = model.engine
    return new


def unfold_batchnorm(model, batches):
    """A copy of a folded-BN `model` (config bn=False) with a BN behind every trunk conv, computing the same
    function; its statistics are measured on `batches` (a callable returning a fresh iterable of image batches).
    See the module docstring for the formula."""
    if not can_unfold(model):
        raise ValueError(f"{model.arch}: cannot put batch norm back (it has some, or its builder has no 'bn' option)")
    biases = {path: layer.conv.params.get("bias") for path, layer in model.named_layers()
              if isinstance(layer, ConvBNAct)}
    from lightcnn.layers.basic import skip_initialisation

    with skip_initialisation():
        new = _build_like(model, bn=True)
    state = model.state_dict()
    for path, layer in new.features_net.named_layers("features"):  # every trunk tensor both have, by name
        for store in (layer.params, layer.buffers):
            for key in store:
                store[key] = np.array(state.get(f"{path}.{key}", store[key]), copy=True)
    targets = []
    for path, layer in new.features_net.named_layers("features"):
        if isinstance(layer, ConvBNAct) and layer.bn is not None:
            bias = biases.get(path)
            bias = np.zeros(layer.out_ch, np.float32) if bias is None else np.asarray(bias, np.float32)
            bn = layer.bn
            bn.params["weight"] = np.full(layer.out_ch, np.sqrt(1.0 + bn.eps), np.float32)  # identity: z + b
            bn.params["bias"] = bias.copy()
            bn.buffers["running_mean"] = np.zeros(layer.out_ch, np.float32)
            bn.buffers["running_var"] = np.ones(layer.out_ch, np.float32)
            targets.append((bn, bias))
    new.params_changed()
    statistics_pass(new.features_net, batches(), [bn for bn, _ in targets], "measure")
    for bn, bias in targets:
        if bn.measured is None:
            raise ValueError("unfolding batch norm needs at least one training batch")
        mean, var = (np.asarray(v, np.float64) for v in bn.measured)
        bn.buffers["running_mean"] = mean.astype(np.float32)
        bn.buffers["running_var"] = var.astype(np.float32)
        bn.params["weight"] = np.sqrt(var + bn.eps).astype(np.float32)
        bn.params["bias"] = (mean + bias).astype(np.float32)
        bn.measured = None
    new.params_changed()
    return new


def _build_like(model, **changes):
    """A new trunk built with `changes` (fresh tensors) under `model`'s head (the same objects)."""
    from lightcnn.models import build

    new = build(model.arch, **{k: v for k, v in {**model.config, **changes}.items() if k != "head"})
    new.head_net = model.head_net
    if "head" in model.config:
        new.config["head"] = model.config["head"]
    new.engine = model.engine
    return new


__all__ = ["BN_MODES", "batchnorm_layers", "can_unfold", "has_batchnorm", "rebuild", "recalibrate",
           "statistics_pass", "unfold_batchnorm"]
