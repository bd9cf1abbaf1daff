"""Transfer learning with hand-written backprop: cached frozen features, a training loop, one-file results.

    features.py  split_backbone, load_view (augmented views), extract_features (on-disk cache)
    loop.py      TrainConfig, fit (SGD/Adam, L2 / weight decay, step decay, early stopping, exact resume)
    heads.py     build_head, train_head (head-only training on cached pooled features: the tuner's objective)
    run.py       finetune(config): one run from a weight file + image folder to RUN_DIR (used by the CLI)

Typical use from Python (the CLI is `python -m lightcnn.finetune`)::

    from lightcnn.train import extract_features, train_head
    model = lightcnn.load("mobilenet_v2").model
    f_tr = extract_features(model, train_items, prep, cache_dir, augment_views=4, augment="light")  # (5, N, 1280)
    f_va = extract_features(model, val_items, prep, cache_dir)[0]                                  # (M, 1280)
    params, history, best = train_head(f_tr, y_tr, f_va, y_va, {"lr": 1e-3, "epochs": 30})
"""

from lightcnn.train.features import (AUGMENT_PRESETS, augment_config, default_cache_dir, extract_features,
                                     load_view, split_backbone)
from lightcnn.train.heads import apply_head_params, build_head, head_evaluate, head_predict, train_head
from lightcnn.train.loop import FitResult, TrainConfig, TrainState, evaluate_logits, fit, predict_logits
from lightcnn.train.run import FinetuneConfig, RunError, RunResult, finetune, trainable_net

__all__ = ["AUGMENT_PRESETS", "FinetuneConfig", "FitResult", "RunError", "RunResult", "TrainConfig", "TrainState",
           "apply_head_params", "augment_config", "build_head", "default_cache_dir", "evaluate_logits",
           "extract_features", "finetune", "fit", "head_evaluate", "head_predict", "load_view", "predict_logits",
           "split_backbone", "train_head", "trainable_net"]
