"""Heads trained on cached pooled features: the cheap half of head-only fine-tuning.

    f (N,F) --[Dense+ReLU]*--> dropout --> Dense(K) --> logits        (Model.reset_head without its GAP)

An epoch over a few hundred cached vectors is a handful of small GEMMs (milliseconds), so the tuner can afford
many trials. `build_head` makes exactly the layers `Model.reset_head` would (same names, same initialisation for
the same seed), so the trained parameters drop into the full model with `apply_head_params`.
"""

from __future__ import annotations

import time

import numpy as np

from lightcnn.layers.base import Layer, Sequential
from lightcnn.models.base import Model
from lightcnn.train.loop import TrainConfig, evaluate_logits, fit, predict_logits


class _Width(Layer):
    """Stands in for a features trunk: reset_head only needs `out_ch`."""

    def __init__(self, channels):
        super().__init__()
        self.out_ch = int(channels)


def build_head(in_features, num_classes, hidden=(), dropout=0.2, hidden_dropout=0.0, seed=0):
    """The head Model.reset_head builds, minus the pooling: (N,F) -> (N,K). Parameter names match
    ``model.head_net`` ("dense0.weight", ..., "classifier.weight")."""
    stub = Model("head", {}, _Width(in_features), Sequential(), (1, 1, in_features))
    stub.reset_head(num_classes, hidden=tuple(hidden), dropout=dropout, hidden_dropout=hidden_dropout, seed=seed)
    return stub.head_after_pool()


def head_from_config(in_features, num_classes, config):
    return build_head(in_features, num_classes, config.hidden_layers, config.dropout, config.hidden_dropout,
                      config.seed)


def apply_head_params(model, head_params):
    """Copy `head_params` (from train_head) into model.head_net, which must come from the same reset_head call
    shape (model.reset_head(K, hidden, ...)). Strict by name and shape."""
    from lightcnn.train.loop import restore

    restore(model.head_after_pool(), head_params)
    return model


def _as_views(x, name):
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3:
        return x
    raise ValueError(f"{name} must be (N, F) or (V, N, F) pooled features, got shape {x.shape}")


def train_head(features_train, y_train, features_val, y_val, config, num_classes=None, progress=None):
    """Train a new head on cached pooled features; the tuner's objective.

    features_train  (N, F) or (V, N, F) float32 (V views per image, see extract_features); y_train (N,) ints
    features_val    (M, F) float32 or None; y_val (M,)
    config          TrainConfig or dict of its fields (epochs, lr, optimizer, l2, loss, head, dropout, ...)
    num_classes     K (default: max label + 1 over both label arrays)
    Returns (head_params, history, best_val_metric):
        head_params      {name: array} of the best epoch, names as in model.head_net ("classifier.weight", ...)
        history          list of per-epoch dicts (loss, train_accuracy, val_loss, val_accuracy, val_roc_auc, ...)
        best_val_metric  config.monitor on the validation set at the best epoch: val loss (lower is better) for
                         monitor="loss", else val accuracy / ROC-AUC (higher is better); without validation
                         data, the last training loss
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    x_train = _as_views(features_train, "features_train")
    y_train = np.asarray(y_train, np.int64)
    x_val = None if features_val is None else np.asarray(features_val, np.float32)
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), np.max(y_val, initial=0) if y_val is not None else 0) + 1)
    head = head_from_config(x_train.shape[-1], num_classes, config)
    result = fit(head, x_train, y_train, x_val, y_val, config, num_classes=num_classes, progress=progress,
                 one_thread=True)
    return head.state_dict(), result.history, result.best_value


def head_predict(head_params, features, config, num_classes):
    """Logits (N,K) of a head given its parameters (from train_head) on pooled features (N,F)."""
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    features = np.asarray(features, np.float32)
    head = head_from_config(features.shape[1], num_classes, config)
    from lightcnn.train.loop import restore

    restore(head, head_params)
    return predict_logits(head, features)


def head_evaluate(head_params, features, labels, config, num_classes):
    """{loss, accuracy, roc_auc} of a trained head on pooled features."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    return evaluate_logits(head_predict(head_params, features, cfg, num_classes), labels, cfg.positive)


# -- tuning trials (lightcnn.tune's objective; module-level so that Dask workers can run them) -------------


def head_trial(features, labels, config, num_classes, threads=None):
    """Train one head on the cached features: (best val accuracy or nan, seconds, failure message or None).
    A plain function of its arguments, so a Dask worker can run it (threads: pin Numba/BLAS threads first)."""
    from lightcnn.errors import LightCNNError

    if threads:
        from lightcnn.cluster import pin_threads

        with pin_threads(threads):
            return head_trial(features, labels, config, num_classes)
    start, failure = time.perf_counter(), None
    try:
        _, _, best = train_head(features["train"], labels["train"], features["val"], labels["val"], config,
                                num_classes=num_classes)
    except (LightCNNError, FloatingPointError) as exc:  # a diverging trial is a bad value, not a crash
        best, failure = float("nan"), str(exc)
    return best, time.perf_counter() - start, failure


def trial_task(data, config, num_classes, threads):
    """A Dask task: (value to minimise, seconds, best val accuracy, failure or None) of one trial."""
    best, seconds, failure = head_trial(data["features"], data["labels"], config, num_classes, threads)
    return (-best if best == best else float("nan")), seconds, best, failure


__all__ = ["apply_head_params", "build_head", "head_evaluate", "head_from_config", "head_predict", "head_trial",
           "train_head", "trial_task"]
