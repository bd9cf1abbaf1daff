"""Tuning trials that fine-tune (--mode last-k / full), sharing the frozen part's work between trials.

    base FinetuneConfig + a trial's settings {lr: .., batch_size: .., unfreeze: ..}
      -> Start for the trial's split point (built once per split point: weights loaded, BN / activation
         changes, --bn recalibrate at the base --batch-size), copied for the trial
      -> frozen-part outputs from the feature cache (computed by the first trial at that split point, keyed by
         the prefix's bytes: every later trial reads them) -> fit of the trainable suffix + head
      -> best validation accuracy; on_epoch(val_accuracy, last=...) after every epoch may raise to stop the trial

Head-mode trials need none of this: `head_features` gives the cached pooled features once and
lightcnn.train.heads trains heads on them.
"""

from __future__ import annotations

import json

from lightcnn.train.run import FinetuneConfig, fit_trial, start_model, training_inputs

#: the keys of a trial's settings that are FinetuneConfig fields rather than training options
RUN_OPTIONS = ("unfreeze",)


class FinetuneTrials:
    """Callable (settings, on_epoch, info) -> best val accuracy, for the trials of one base configuration.

    cfg     the base FinetuneConfig (mode last-k or full; train.monitor is set to accuracy here)
    parts   {"train": idx, "val": idx} of `ds`
    info    filled with {"unfreeze": k, "trained_parameters": p, "features": {"computed": n, "cached": m}} for
            the trial's log line before it trains (p: the parameters of the suffix and the head that train)
    """

    def __init__(self, cfg, ds, parts, progress=None):
        self.base = cfg.to_dict()
        self.base["train"] = dict(self.base["train"], monitor="accuracy")
        self.ds, self.parts, self.progress = ds, {k: parts[k] for k in ("train", "val")}, progress
        self.starts = {}

    def config(self, settings):
        """The FinetuneConfig of a trial: the base with the trial's settings."""
        d = json.loads(json.dumps(self.base))
        for key in RUN_OPTIONS:
            if key in settings:
                d[key], d["freeze_first"] = settings[key], None
        d["train"].update({k: v for k, v in settings.items() if k not in RUN_OPTIONS})
        return FinetuneConfig.from_dict(d)

    def start(self, cfg):
        """The shared Start of cfg's split point (built with the base training options)."""
        key = json.dumps([cfg.unfreeze, cfg.freeze_first])
        if key not in self.starts:
            d = dict(json.loads(json.dumps(self.base)), unfreeze=cfg.unfreeze, freeze_first=cfg.freeze_first)
            self.starts[key] = start_model(FinetuneConfig.from_dict(d), self.ds, self.parts["train"], self.progress)
        return self.starts[key]

    def __call__(self, settings, on_epoch, info):
        cfg = self.config(settings)
        start = self.start(cfg)
        info["unfreeze"] = start.unfreeze
        result = fit_trial(cfg, start, self.parts, self.ds, info=info, progress=self.progress,
                           on_epoch_end=lambda state, row: on_epoch(row["val_accuracy"], last=state.stopped
                                                                    or state.epoch >= cfg.train["epochs"]))
        return result.best_value


def head_features(cfg, ds, parts, progress=None):
    """{split: cached pooled features} for head-mode trials ("train": (V+1, N, F) with --views, else (1, N, F);
    the others (M, F); None for an empty split) and the feature stats, via the fine-tuning code (so --activation,
    --input-size, --views, ... apply as in finetune)."""
    start = start_model(cfg, ds, parts["train"], progress)
    _, x, stats, _ = training_inputs(cfg, start, parts, ds, progress)
    return x, stats


__all__ = ["FinetuneTrials", "RUN_OPTIONS", "head_features"]
