"""`finetune(config)`: one fine-tuning run from a weight file and an image folder to RUN_DIR.

    base .h5 -> model (+ new head) --split_backbone--> frozen prefix | trainable suffix + head
    images --split (official / group / random)--> train / val / test
    frozen prefix over every image (and augmented view), cached on disk       (features.extract_features)
    fit(trainable net, cached inputs)                                         (loop.fit)
    -> RUN_DIR/config.json, metrics.csv, last.h5 (every epoch), best.h5, report.json

Modes
    head     only the new head trains, on cached pooled features
    last-k   the last k blocks (+ the final 1x1 conv of MobileNets) and the head train; every batch norm is
             frozen (inference mode, running statistics), also inside the unfrozen blocks; the frozen prefix
             ran once per image and view, its outputs are cached
    full     every layer trains, batch norm in training mode (seed 001's network from scratch, --arch)

Files in RUN_DIR (all written atomically: temp file + rename)
    config.json   the FinetuneConfig; --resume refuses to continue a different configuration
    metrics.csv   one row per epoch: epoch, lr, loss, train_accuracy, val_loss, val_accuracy, val_roc_auc, seconds
    last.h5       resume state after the last completed epoch: trainable tensors (net.*), best weights (best.*),
                  optimiser moments (optim.*), and in `extra` the epoch, generator states and history
    best.h5       the full model with the best-on-validation weights, class names, preprocessing, provenance;
                  `lightcnn.load(path)`, `python -m lightcnn.predict --weights`, `python -m lightcnn.evaluate`
                  (when training diverges: the best epoch before it, with extra["stopped"], and no report)
    report.json   per split (train = unaugmented view, val, test): accuracy, sensitivity, specificity,
                  precision, f1, roc_auc, confusion_matrix, confidence_intervals (bootstrap 95 %), per_class
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from lightcnn.checkpoint import Checkpoint, atomic_write_text, read_checkpoint, save_checkpoint
from lightcnn.data import (check_training_data, discover, group_stratified_split, kfold_dataset, split_dataset,
                           stratified_split)
from lightcnn.errors import LightCNNError, TrainingError
from lightcnn.kernels.linear import softmax
from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import BatchNorm
from lightcnn.metrics import classification_report, kfold_summary, youden_threshold
from lightcnn.preprocess import GRAYSCALE_227, TORCHVISION, Preprocessing
from lightcnn.train.features import augment_config, extract_features, split_backbone
from lightcnn.train.loop import TrainConfig, TrainState, fit, predict_logits

MODES = ("head", "last-k", "full")
SPLITS = ("auto", "official", "random", "group")
METRIC_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")
# Options that may change between an interrupted run and its --resume (they do not change the numbers).
RESUME_MAY_DIFFER = ("cache_dir", "n_bootstrap", "report_test")


class RunError(LightCNNError):
    """A fine-tuning run cannot start (bad option combination, RUN_DIR holds another run, ...)."""


@dataclass
class FinetuneConfig:
    """Everything one run depends on; stored as RUN_DIR/config.json. `train` holds the TrainConfig fields.

    data        image folder (class folders or a bundled manifest.csv); csv: optional explicit CSV
    model       registered weight name, or weights: a .h5 path, or arch: build from scratch (mode full only)
    mode        head | last-k | full; unfreeze = k for last-k
    augment     preset name or Augmenter config; views = augmented views cached per training image
    blur_sigma  3x3 Gaussian blur added to the weights' preprocessing (seed 000: 1.3)
    resize      None = the weights' resize mode; "stretch" keeps the whole slice (CT figures of any aspect
                ratio), "square" / "shorter" / "central_fraction" as in lightcnn.preprocess
    split       auto | official | random | group; fractions for random/group; kfold K > 1 replaces the split by
                K group-aware folds (validation carved from each training part)
    positive    class name whose sensitivity/specificity/... are reported (None: macro averages)
    report_test False keeps the test split out of report.json (for choosing settings on val only)
    """

    data: str
    out: str
    model: str | None = None
    weights: str | None = None
    arch: str | None = None
    csv: str | None = None
    mode: str = "head"
    unfreeze: int = 2
    augment: object = None
    views: int = 0
    blur_sigma: float | None = None
    resize: str | None = None
    split: str = "auto"
    fractions: list = field(default_factory=lambda: [0.8, 0.1, 0.1])
    kfold: int = 0
    positive: str | None = None
    cache_dir: str | None = None
    n_bootstrap: int = 1000
    report_test: bool = True
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        sources = [s for s in (self.model, self.weights, self.arch) if s]
        if len(sources) != 1:
            raise RunError("give exactly one of --model NAME, --weights FILE.h5 (or arch for a network from scratch)")
        if self.mode not in MODES:
            raise RunError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.arch and self.mode != "full":
            raise RunError(f"arch {self.arch!r} has no pretrained weights: use mode 'full'")
        if self.split not in SPLITS:
            raise RunError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.mode == "last-k" and int(self.unfreeze) < 1:
            raise RunError("last-k needs --unfreeze K >= 1")
        if self.resize not in (None, "shorter", "square", "stretch", "central_fraction"):
            raise RunError(f"resize must be shorter, square, stretch or central_fraction, got {self.resize!r}")
        if self.views < 0:
            raise RunError("--views must be >= 0")
        try:
            self.augment = augment_config(self.augment) or None
            self.train = TrainConfig.from_dict(dict(self.train)).to_dict()  # validated, defaults filled
        except ValueError as exc:
            raise RunError(str(exc)) from None
        if self.views and not self.augment:
            raise RunError("--views N needs an augmentation (--augment PRESET or JSON)")
        if self.augment and not self.views:
            raise RunError("--augment needs --views N (augmented views are computed once and cached)")
        if self.kfold == 1 or self.kfold < 0:
            raise RunError("--kfold needs K >= 2")

    @classmethod
    def from_dict(cls, data):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RunError(f"unknown option(s) {unknown}")
        return cls(**data)

    def to_dict(self):
        return asdict(self)


@dataclass
class RunResult:
    out: Path
    report: dict
    history: list
    best_path: Path | None
    timings: dict


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- setup


def load_base(cfg):
    """(model, preprocessing, provenance dict) for the run's starting point."""
    from lightcnn.models import build

    if cfg.arch:
        model = build(cfg.arch)
        prep = GRAYSCALE_227 if model.input_shape[2] == 1 else TORCHVISION
        provenance = {"base": f"{cfg.arch} (random initialisation)"}
    else:
        from lightcnn.api import model_from_checkpoint
        from lightcnn.weights import find_weights, sha256_of

        path = find_weights(cfg.weights or cfg.model)
        ckpt = read_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        prep = Preprocessing.from_dict(ckpt.preprocessing) if ckpt.preprocessing else TORCHVISION
        provenance = {"base_weights": Path(path).name, "base_sha256": sha256_of(path),
                      "base_source": ckpt.provenance.get("source_file"),
                      "base_source_sha256": ckpt.provenance.get("source_sha256")}
    if cfg.blur_sigma:
        prep = replace(prep, blur_sigma=float(cfg.blur_sigma))
    if cfg.resize:
        prep = replace(prep, resize=cfg.resize)
    return model, prep, provenance


def trainable_net(model, unfreeze, train_bn=False):
    """Set the frozen flags for fine-tuning and return the network that trains on cached inputs.

    unfreeze 0: net = the head after its pooling (input: pooled features (N,F));
             k or "all": net = Sequential(features suffix, head) (input: the prefix output / the images).
    Everything before the suffix is frozen. Unless `train_bn`, every BatchNorm is frozen too, also inside the
    suffix: it normalises with its running statistics (inference mode) and gamma/beta do not train.
    """
    model.set_frozen(True)
    _, suffix = split_backbone(model, unfreeze)
    suffix.set_frozen(False)
    model.head_net.set_frozen(False)
    if not train_bn:
        for _, layer in model.named_layers():
            if isinstance(layer, BatchNorm):
                layer.frozen = True
    if unfreeze == 0:
        return model.head_after_pool()
    return Sequential([("features", suffix), ("head", model.head_net)])


def prepare_model(model, cfg, tcfg, num_classes):
    """New head, frozen flags, and the trainable network; returns (net, unfreeze)."""
    model.reset_head(num_classes, hidden=tuple(tcfg.hidden_layers), dropout=tcfg.dropout,
                     hidden_dropout=tcfg.hidden_dropout, seed=tcfg.seed)
    unfreeze = {"head": 0, "last-k": int(cfg.unfreeze), "full": "all"}[cfg.mode]
    return trainable_net(model, unfreeze, train_bn=cfg.mode == "full"), unfreeze


def _split(ds, cfg, seed):
    """Split with its warnings captured (they go to stderr and into report.json)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = split_dataset(ds, cfg.split, tuple(cfg.fractions), seed)
    return split, [str(w.message) for w in caught]


def _carve_val(ds, idx, fraction, seed):
    """Split `idx` into (train, val) keeping groups together; fraction of items goes to val."""
    sub = ds.subset(idx)
    if sub.has_groups:
        a, b = group_stratified_split(sub.labels, sub.groups, (1 - fraction, fraction), seed)
    else:
        a, b = stratified_split(sub.labels, (1 - fraction, fraction), seed)
    return np.asarray(idx)[a], np.asarray(idx)[b]


# --------------------------------------------------------------------------------------------- files


def _write_metrics_csv(path, history):
    columns = ["epoch", "lr", "loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc", "seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in history:
        writer.writerow(["" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                         for c in columns])
    atomic_write_text(path, buffer.getvalue())


def save_resume(path, state, class_names, preprocessing, fingerprint):
    ckpt = Checkpoint(arch="lightcnn-resume-state", config={"fingerprint": fingerprint}, tensors=state.tensors(),
                      class_names=list(class_names), preprocessing=preprocessing.to_dict(),
                      extra={"state": state.meta()})
    save_checkpoint(path, ckpt)


def load_resume(path, fingerprint):
    ckpt = read_checkpoint(path)
    if ckpt.arch != "lightcnn-resume-state" or ckpt.config.get("fingerprint") != fingerprint:
        raise RunError(f"{path}: resume state belongs to a different configuration")
    return TrainState.from_parts(ckpt.extra["state"], ckpt.tensors)


def _fingerprint(cfg):
    d = cfg.to_dict()
    for key in RESUME_MAY_DIFFER + ("out",):
        d.pop(key, None)
    d["train"] = {k: v for k, v in d["train"].items() if k != "epochs"}
    return json.dumps(d, sort_keys=True)


def _check_out_dir(out, cfg, resume):
    config_path = out / "config.json"
    if resume:
        if not config_path.exists():
            raise RunError(f"{out}: nothing to resume (no config.json)")
        saved = FinetuneConfig.from_dict(json.loads(config_path.read_text()))
        a, b = json.loads(_fingerprint(saved)), json.loads(_fingerprint(cfg))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if "train" in diff:
            diff.remove("train")
            diff += [f"train.{k}" for k in sorted(set(a["train"]) | set(b["train"]))
                     if a["train"].get(k) != b["train"].get(k)]
        if diff:
            raise RunError(f"{out}: --resume with different options than the interrupted run: {', '.join(diff)}")
    elif any((out / name).exists() for name in ("config.json", "last.h5", "best.h5")):
        raise RunError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def _remove_stale_temporaries(out, progress):
    """Delete the temporary files (NAME.<random>.tmp, lightcnn.checkpoint's atomic writer) a killed run left in
    RUN_DIR and its fold folders; only the names this module writes."""
    import re

    pattern = re.compile(r"(config\.json|metrics\.csv|last\.h5|best\.h5|report\.json)\.[A-Za-z0-9_]+\.tmp")
    stale = [p for p in [*out.glob("*.tmp"), *out.glob("fold*/*.tmp")] if pattern.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale and progress:
        progress(f"removed {len(stale)} temporary file{'s' if len(stale) > 1 else ''} of an interrupted run")


# --------------------------------------------------------------------------------------------- one run


def _throttled(progress, label, every=10.0):
    """progress(done, total) callback printing at most one line per `every` seconds (and the last one)."""
    if not progress:
        return None
    last = [time.perf_counter()]

    def report(done, total):
        now = time.perf_counter()
        if done == total or now - last[0] >= every:
            last[0] = now
            progress(f"{label}: {done}/{total} images")

    return report


def _report(y, logits, class_names, positive, n_bootstrap, seed, threshold=None):
    probs = softmax(logits.astype(np.float64))
    return classification_report(y, probs, class_names, positive=positive, n_bootstrap=n_bootstrap, seed=seed,
                                 threshold=threshold)


def _operating_point(y, logits, positive, class_names):
    """For two classes with a positive one: the P(positive) threshold maximising Youden's J on the validation
    split (metrics.youden_threshold), as {"class", "threshold", "rule"}; None when that is not defined."""
    if positive is None or len(class_names) != 2 or "val" not in logits:
        return None
    threshold = youden_threshold(y["val"], softmax(logits["val"].astype(np.float64))[:, positive], positive)
    if math.isnan(threshold):
        return None
    return {"class": class_names[positive], "threshold": threshold,
            "rule": "maximum Youden's J (sensitivity + specificity - 1) on the validation split"}


def _run_one(cfg, out, parts, ds, resume, progress, on_epoch_end, extra_meta):
    """Train on parts = {"train": idx, "val": idx, "test": idx}; write everything into `out`."""
    t_run = time.perf_counter()
    tcfg = TrainConfig.from_dict(cfg.train)
    class_names = list(ds.class_names)
    positive = class_names.index(cfg.positive) if cfg.positive is not None else None
    tcfg.positive = positive
    model, prep, provenance = load_base(cfg)
    net, unfreeze = prepare_model(model, cfg, tcfg, len(class_names))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).resolve().parent / ".feature-cache"
    labels = ds.labels
    y = {name: labels[idx] for name, idx in parts.items()}

    t0 = time.perf_counter()
    stats, x = {}, {}
    for name, idx in parts.items():
        if len(idx) == 0:
            x[name] = None
            continue
        views = cfg.views if name == "train" else 0
        s = {}
        arr = extract_features(model, [ds.items[i] for i in idx], prep, cache_dir, augment_views=views,
                               seed=tcfg.seed, augment=cfg.augment, unfreeze=unfreeze,
                               progress=_throttled(progress, f"features {name}"), stats=s)
        x[name] = arr if name == "train" else arr[0]
        stats[name] = s
    feature_seconds = time.perf_counter() - t0
    if progress:
        computed = sum(s["computed"] for s in stats.values())
        cached = sum(s["cached"] for s in stats.values())
        progress(f"features: {computed} computed, {cached} from cache, {feature_seconds:.1f} s")
    if x["train"] is None:
        raise RunError(f"{cfg.data}: the training split is empty")

    fingerprint = _fingerprint(cfg) + json.dumps(extra_meta.get("fold"))
    last = out / "last.h5"
    state = load_resume(last, fingerprint) if resume and last.exists() else None
    if state is not None and progress:
        progress(f"resuming after epoch {state.epoch}")

    latest = [state]  # the newest TrainState: its best weights become best.h5 if training diverges

    def epoch_end(st, row):
        latest[0] = st
        save_resume(last, st, class_names, prep, fingerprint)
        _write_metrics_csv(out / "metrics.csv", st.history)
        if on_epoch_end:
            on_epoch_end(st, row)

    try:
        result = fit(net, x["train"], y["train"], x["val"], y.get("val"), tcfg, num_classes=len(class_names),
                     state=state, on_epoch_end=epoch_end, progress=progress, one_thread=unfreeze == 0)
    except TrainingError as exc:  # keep the best model so far as best.h5 (without a report: nothing was evaluated)
        st = latest[0]
        if st is None or not st.best_weights:
            raise
        from lightcnn.train.loop import restore

        restore(net, st.best_weights)
        save_checkpoint(out / "best.h5", Checkpoint(
            arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=class_names,
            preprocessing=prep.to_dict(), provenance={**provenance, "converter": "lightcnn.finetune"},
            extra={"training": cfg.to_dict(), "best_epoch": st.best_epoch + 1, "mode": cfg.mode,
                   "unfreeze": unfreeze, "stopped": str(exc), **extra_meta}))
        raise TrainingError(f"{exc}; the best model so far (epoch {st.best_epoch + 1}) is in {out / 'best.h5'}") \
            from None
    _write_metrics_csv(out / "metrics.csv", result.history)

    report = {"class_names": class_names, "positive": cfg.positive, **extra_meta}
    shown = [n for n in ("train", "val", "test") if x.get(n) is not None and (n != "test" or cfg.report_test)]
    logits = {name: predict_logits(net, x[name][0] if name == "train" else x[name]) for name in shown}
    for name in shown:
        report[name] = _report(y[name], logits[name], class_names, positive, cfg.n_bootstrap, tcfg.seed)
    operating_point = _operating_point(y, logits, positive, class_names)
    if operating_point is not None:
        # The same model at the validation-chosen threshold: argmax stays the headline decision rule.
        report["operating_point"] = operating_point
        report["at_operating_point"] = {
            name: _report(y[name], logits[name], class_names, positive, cfg.n_bootstrap, tcfg.seed,
                          threshold=operating_point["threshold"]) for name in shown}
    report["sizes"] = {n: int(len(idx)) for n, idx in parts.items()}
    report["best_epoch"] = result.best_epoch + 1
    report["epochs_run"] = len(result.history)
    report["stopped_early"] = result.stopped_early
    report["monitor"] = {"name": tcfg.monitor if x.get("val") is not None else "loss", "value": result.best_value}
    train_seconds = sum(r["seconds"] for r in result.history)
    timings = {"features_seconds": feature_seconds, "features_computed": sum(s["computed"] for s in stats.values()),
               "features_cached": sum(s["cached"] for s in stats.values()), "train_seconds": train_seconds,
               "seconds_per_epoch": train_seconds / max(len(result.history), 1),
               "total_seconds": time.perf_counter() - t_run}
    report["timings"] = timings

    best = out / "best.h5"
    metrics = {n: {k: report[n][k] for k in METRIC_KEYS} for n in shown}
    ckpt = Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=class_names,
                      preprocessing=prep.to_dict(),
                      provenance={**provenance, "converter": "lightcnn.finetune", "source_file":
                                  provenance.get("base_weights"), "source_sha256": provenance.get("base_sha256")},
                      extra={"training": cfg.to_dict(), "metrics": metrics, "best_epoch": result.best_epoch + 1,
                             "mode": cfg.mode, "unfreeze": unfreeze, **extra_meta,
                             **({"operating_point": operating_point} if operating_point else {})})
    save_checkpoint(best, ckpt)
    report["best_h5"] = str(best)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    return RunResult(out, report, result.history, best, timings)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-able: {type(x).__name__}")


# --------------------------------------------------------------------------------------------- entry point


def finetune(config, resume=False, progress=_stderr, on_epoch_end=None):
    """Run one fine-tuning experiment described by `config` (FinetuneConfig or its dict); see module docstring.

    resume        continue an interrupted run in config.out (same options; epochs may grow)
    progress      callable(str) for progress lines (default: stderr), or None for silence
    on_epoch_end  callable(TrainState, row) after each epoch's checkpoint is written (tests use it to
                  interrupt a run)
    Returns RunResult(out, report, history, best_path, timings). For kfold runs `report` holds "kfold"
    (mean ± std per metric over the test folds) and "folds"; each fold lives in out/fold<i>.
    Raises LightCNNError subclasses (RunError, TrainingError, DatasetError, CheckpointError) for expected failures.
    """
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(dict(config))
    out = Path(cfg.out)
    _check_out_dir(out, cfg, resume)
    _remove_stale_temporaries(out, progress)
    ds = discover(cfg.data, cfg.csv)
    if cfg.positive is not None and cfg.positive not in ds.class_names:
        raise RunError(f"--positive {cfg.positive!r} is not a class of {cfg.data} ({', '.join(ds.class_names)})")
    seed = int(cfg.train.get("seed", 0))
    if progress:
        progress(f"{cfg.data}: {len(ds)} images, classes {ds.class_counts()}")
    if not cfg.kfold:
        split, notes = _split(ds, cfg, seed)
        need = 1 if split.method == "official" else sum(1 for f in cfg.fractions if f > 0)
        notes += check_training_data(ds, [(split.train, split.val, split.test)], need)  # before any feature
        for note in notes + list(ds.notes):
            if progress:
                progress(f"warning: {note}")
        parts = {"train": split.train, "val": split.val, "test": split.test}
        meta = {"split": {"method": split.method, "seed": seed, "fractions": list(cfg.fractions),
                          "ungrouped_items": split.ungrouped, "warnings": notes, "dataset_notes": list(ds.notes)}}
        return _run_one(cfg, out, parts, ds, resume, progress, on_epoch_end, meta)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folds = list(kfold_dataset(ds, cfg.kfold, seed))
    notes = [str(w.message) for w in caught]
    for note in notes:
        if progress:
            progress(f"warning: {note}")
    carved = [_carve_val(ds, train_idx, 1.0 / (cfg.kfold - 1), seed + i) for i, (train_idx, _) in enumerate(folds)]
    check_training_data(ds, [(tr, va, test) for (tr, va), (_, test) in zip(carved, folds)], cfg.kfold)
    results, t0 = [], time.perf_counter()
    for i, (train_idx, test_idx) in enumerate(folds):
        fold_out = out / f"fold{i + 1}"
        fold_out.mkdir(parents=True, exist_ok=True)
        if progress:
            progress(f"fold {i + 1}/{cfg.kfold}")
        if resume and (fold_out / "report.json").exists():
            results.append(json.loads((fold_out / "report.json").read_text()))
            continue
        tr, va = carved[i]
        meta = {"fold": i + 1, "split": {"method": f"{cfg.kfold}-fold", "seed": seed, "warnings": notes}}
        res = _run_one(cfg, fold_out, {"train": tr, "val": va, "test": test_idx}, ds, resume, progress,
                       on_epoch_end, meta)
        results.append(res.report)
    key = "test" if cfg.report_test else "val"
    summary = kfold_summary([{k: r[key][k] for k in METRIC_KEYS} | {"confusion_matrix": r[key]["confusion_matrix"]}
                             for r in results])
    report = {"kfold": summary, "kfold_split": key, "k": cfg.kfold, "class_names": list(ds.class_names),
              "positive": cfg.positive, "folds": [{k: r.get(k) for k in ("fold", "val", "test", "best_epoch")}
                                                 for r in results],
              "timings": {"total_seconds": time.perf_counter() - t0}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    return RunResult(out, report, [r.get("best_epoch") for r in results], None, report["timings"])


__all__ = ["FinetuneConfig", "MODES", "RunError", "RunResult", "finetune", "load_base", "prepare_model",
           "trainable_net"]
