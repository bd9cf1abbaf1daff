"""`finetune(config)`: one fine-tuning run from a weight file and an image folder to RUN_DIR.

    base .h5 -> model (+ new head) --split_backbone--> frozen prefix | trainable suffix + head
    images --split (official / group / random)--> train / val / test
    frozen prefix over every image (and augmented view), cached on disk       (features.extract_features)
    fit(trainable net, cached inputs)                                         (loop.fit)
    -> RUN_DIR/config.json, metrics.csv, last.h5 (every epoch), best.h5, report.json

Modes
    head     only the new head trains, on cached pooled features
    last-k   the last k blocks (+ the final 1x1 conv of MobileNets) and the head train (k from --unfreeze K or
             P%, or --freeze-first); batch norm per --bn (lightcnn.train.bn; default frozen: inference mode,
             also inside the unfrozen blocks); the frozen prefix ran once per image and view, its outputs are
             cached (or, with --augment and no --views, runs on a fresh augmentation every epoch)
    full     every layer trains, batch norm in training mode by default (seed 001's network from scratch, --arch)

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
from lightcnn.dicom import parse_window
from lightcnn.errors import LightCNNError, TrainingError
from lightcnn.kernels.activation import ACTIVATIONS
from lightcnn.kernels.linear import softmax
from lightcnn.layers.base import Sequential
from lightcnn.layers.basic import BatchNorm
from lightcnn.metrics import classification_report, kfold_summary, report_curves, youden_threshold
from lightcnn.preprocess import GRAYSCALE_227, TORCHVISION, Preprocessing
from lightcnn.train.bn import (BN_MODES, batchnorm_layers, can_unfold, has_batchnorm, rebuild, recalibrate,
                               unfold_batchnorm)
from lightcnn.train.features import (augment_config, describe_unfreeze, extract_features, fresh_views,
                                     load_view, resolve_unfreeze, split_backbone)
from lightcnn.train.loop import TrainConfig, TrainState, fit, predict_logits, restore

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
    mode        head | last-k | full; unfreeze = k (the last k blocks) or "P%" (the top P % of the trunk's
                conv layers, rounded to blocks) for last-k; freeze_first = K freezes the first K blocks instead
    bn          frozen | train | recalibrate (lightcnn.train.bn); None = recalibrate with `activation`, train
                for full, frozen otherwise
    activation  build the pretrained trunk with this activation instead (e.g. "elu", seed 000)
    input_size  network input side in pixels (fully convolutional trunks); the preprocessing follows
    augment     preset name or Augmenter config; views = augmented views cached per training image
    blur_sigma  3x3 Gaussian blur added to the weights' preprocessing (seed 000: 1.3)
    window, hu_offset  CT window for DICOM / 16-bit CT images (lightcnn.dicom), stored in best.h5's preprocessing
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
    unfreeze: int | str = 2
    freeze_first: int | None = None
    bn: str | None = None
    activation: str | None = None
    input_size: int | None = None
    augment: object = None
    views: int = 0
    blur_sigma: float | None = None
    window: object = None
    hu_offset: float | None = None
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
        self.unfreeze = parse_unfreeze(self.unfreeze)
        if self.freeze_first is not None:
            if self.mode != "last-k":
                raise RunError("--freeze-first K needs --mode last-k")
            if int(self.freeze_first) < 0:
                raise RunError("--freeze-first needs K >= 0")
            self.freeze_first = int(self.freeze_first)
        if self.bn is None:
            self.bn = "recalibrate" if self.activation else ("train" if self.mode == "full" else "frozen")
        if self.bn not in BN_MODES:
            raise RunError(f"bn must be one of {BN_MODES}, got {self.bn!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise RunError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.activation and self.arch:
            raise RunError("--activation changes pretrained weights' network; with --arch use the builder's own")
        if self.input_size is not None and int(self.input_size) < 8:
            raise RunError(f"--input-size must be >= 8 pixels, got {self.input_size}")
        if self.resize not in (None, "shorter", "square", "stretch", "central_fraction"):
            raise RunError(f"resize must be shorter, square, stretch or central_fraction, got {self.resize!r}")
        try:
            window = parse_window(self.window)
        except ValueError as exc:
            raise RunError(f"--{exc}") from None
        self.window = list(window) if isinstance(window, tuple) else window
        if self.views < 0:
            raise RunError("--views must be >= 0")
        try:
            self.augment = augment_config(self.augment) or None
            self.train = TrainConfig.from_dict(dict(self.train)).to_dict()  # validated, defaults filled
        except ValueError as exc:
            raise RunError(str(exc)) from None
        if self.views and not self.augment:
            raise RunError("--views N needs an augmentation (--augment PRESET or JSON)")
        if self.augment and not self.views and self.mode == "head":
            raise RunError("--augment in --mode head needs --views N (augmented views are computed once and cached); "
                           "--mode last-k and full draw fresh views every epoch without it")
        if self.kfold == 1 or self.kfold < 0:
            raise RunError("--kfold needs K >= 2")

    @classmethod
    def from_dict(cls, data):
        data = {k: v for k, v in data.items() if k != "resolved"}  # what a run derived, written beside it
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
    if cfg.input_size:
        size = int(cfg.input_size)  # resize_size keeps its ratio to the crop (torchvision 256/224)
        prep = replace(prep, size=size, resize_size=max(size, round(prep.resize_size * size / prep.size)))
        model.input_shape = (size, size, model.input_shape[2])
    if cfg.blur_sigma:
        prep = replace(prep, blur_sigma=float(cfg.blur_sigma))
    if cfg.resize:
        prep = replace(prep, resize=cfg.resize)
    if cfg.window is not None:
        prep = replace(prep, window=cfg.window)
    if cfg.hu_offset is not None:
        prep = replace(prep, hu_offset=float(cfg.hu_offset))
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


def parse_unfreeze(value):
    """--unfreeze K (an int >= 1) or "P%" (0 < P <= 100) -> int or the normalised "P%" string."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return f"{share:g}%"
        k = int(text)
    except ValueError:
        raise RunError(f"--unfreeze expects K blocks (an integer >= 1) or a share like 40%, got {value!r}") from None
    if k < 1:
        raise RunError(f"--unfreeze expects K >= 1 blocks, got {k}")
    return k


def resolved_unfreeze(model, cfg):
    """(unfreeze for split_backbone, info dict or None) of a config: 0 (head), "all" (full) or k blocks."""
    if cfg.mode == "head":
        return 0, None
    if cfg.mode == "full":
        return "all", None
    try:
        return resolve_unfreeze(model, cfg.unfreeze, cfg.freeze_first)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def prepare_model(model, cfg, tcfg, num_classes):
    """New head, frozen flags, and the trainable network; returns (net, unfreeze)."""
    model.reset_head(num_classes, hidden=tuple(tcfg.hidden_layers), dropout=tcfg.dropout,
                     hidden_dropout=tcfg.hidden_dropout, seed=tcfg.seed)
    unfreeze, _ = resolved_unfreeze(model, cfg)
    return trainable_net(model, unfreeze, train_bn=cfg.bn == "train"), unfreeze


def _image_batches(items, prep, batch_size):
    """A callable giving a fresh iterator over the plain (view 0) network inputs of `items` in batches."""
    def batches():
        for start in range(0, len(items), batch_size):
            yield np.stack([load_view(getattr(it, "path", it), prep) for it in items[start:start + batch_size]])
    return batches


def adapt_base(model, cfg, batches, progress):
    """The pretrained model with the run's architecture changes: batch norm put back for --bn train/recalibrate
    on a folded file, then --activation. Returns (model, changed activation: bool)."""
    uses_bn = cfg.mode != "head" or bool(cfg.activation)  # head-only training on a fixed trunk needs none
    if cfg.bn in ("train", "recalibrate") and uses_bn and not has_batchnorm(model):
        if can_unfold(model):
            model = unfold_batchnorm(model, batches)
            if progress:
                progress(f"note: {model.arch} came with batch norm folded into its convs; put it back behind every "
                         "conv with statistics measured on the training images (the same function before training)")
        elif cfg.bn == "train":
            raise RunError(f"--bn train: {model.arch} has no batch norm (use --bn frozen)")
    changed = bool(cfg.activation) and cfg.activation != model.config.get("activation")
    if changed:
        if "activation" not in model.config:
            raise RunError(f"--activation: {model.arch}'s builder has no activation option")
        before = model.config["activation"]
        model = rebuild(model, activation=cfg.activation)
        if progress:
            progress(f"note: --activation {cfg.activation} changes the function the weights were trained for "
                     f"(with {before}); " + ("batch norm recalibrated on the training images"
                                             if cfg.bn == "recalibrate" and has_batchnorm(model)
                                             else "without --bn recalibrate its activations may grow out of range"))
    return model, changed


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
    for key in ("window", "hu_offset"):  # added later: runs written before them resume unchanged
        if d.get(key) is None:
            d.pop(key, None)
    d["train"] = {k: v for k, v in d["train"].items() if k != "epochs"}
    return json.dumps(d, sort_keys=True)


def _write_resolved(out, resolved):
    """Add what the run derived from its options (which blocks train, BN handling) to config.json as "resolved"
    (FinetuneConfig.from_dict ignores it, so --config and --resume replay the options, not the derivation)."""
    path = out / "config.json"
    data = json.loads(path.read_text())
    data["resolved"] = json.loads(json.dumps(resolved, default=_json_default))
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


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


@dataclass
class Start:
    """A run's base network before training: the weights loaded, batch norm put back / --activation applied
    (adapt_base), the head reset and the frozen flags set (prepare_model), --bn recalibrate done. Tuning trials
    that share the split point start from copies of one Start, so the frozen prefix is the same bytes in every
    trial and its cached outputs are found again (extract_features keys them by those bytes)."""

    model: object
    prep: Preprocessing
    provenance: dict
    unfreeze: object
    resolved: dict


def start_model(cfg, ds, train_idx, progress):
    """The Start of a run described by `cfg` whose training split is `train_idx` (see Start)."""
    tcfg = TrainConfig.from_dict(cfg.train)
    model, prep, provenance = load_base(cfg)
    train_batches = _image_batches([ds.items[i] for i in train_idx], prep, tcfg.batch_size)
    folded = can_unfold(model)
    model, activation_changed = adapt_base(model, cfg, train_batches, progress)
    _, unfreeze = prepare_model(model, cfg, tcfg, len(ds.class_names))
    _, unfreeze_info = resolved_unfreeze(model, cfg)
    recalibrated = []
    if cfg.bn == "recalibrate":
        # the trained part's BN; all of them when the activation changed (the frozen part computes anew too)
        scope = model.features_net if activation_changed else split_backbone(model, unfreeze)[1]
        recalibrated = [path for path, _ in batchnorm_layers(scope)]
        batches = recalibrate(model, train_batches(), [layer for _, layer in batchnorm_layers(scope)])
        if progress:
            progress(f"bn: recalibrated {len(recalibrated)} batch norms on {len(train_idx)} training images "
                     f"({batches} batches)" if recalibrated else "bn: nothing to recalibrate (no batch norm trains)")
    resolved = {"bn": cfg.bn, "recalibrated_batchnorms": len(recalibrated), "unfreeze": unfreeze_info,
                "batchnorm_unfolded": folded and has_batchnorm(model),
                "activation": model.config.get("activation")}
    if unfreeze_info is not None and progress:
        asked = f"--freeze-first {cfg.freeze_first}" if cfg.freeze_first is not None else f"--unfreeze {cfg.unfreeze}"
        progress(describe_unfreeze(unfreeze_info, asked))
    return Start(model, prep, provenance, unfreeze, resolved)


def training_inputs(cfg, start, parts, ds, progress):
    """(net, x, stats, x_train) of a run from its Start: a new head and the frozen flags for cfg.train, the
    frozen part's outputs of every split (train: all views) from the feature cache, and what fit trains on (the
    cached views, or a callable drawing fresh augmentations every epoch)."""
    tcfg = TrainConfig.from_dict(cfg.train)
    model, prep, unfreeze = start.model, start.prep, start.unfreeze
    net, _ = prepare_model(model, cfg, tcfg, len(ds.class_names))
    cache_dir = _cache_dir(cfg)
    stats, x = {}, {}
    for name, idx in parts.items():
        if len(idx) == 0:
            x[name] = None
            continue
        views = cfg.views if name == "train" else 0
        s = {}
        arr = extract_features(model, [ds.items[i] for i in idx], prep, cache_dir, augment_views=views,
                               seed=tcfg.seed, augment=cfg.augment if views else None, unfreeze=unfreeze,
                               progress=_throttled(progress, f"features {name}"), stats=s)
        x[name] = arr if name == "train" else arr[0]
        stats[name] = s
    if x["train"] is None:
        raise RunError(f"{cfg.data}: the training split is empty")
    x_train = x["train"]
    if cfg.augment and not cfg.views:  # backprop modes: views drawn fresh every epoch
        x_train = fresh_views(model, [ds.items[i] for i in parts["train"]], prep, cfg.augment, tcfg.seed, unfreeze)
        if progress:
            progress(f"augmentation: drawn fresh every epoch ({len(parts['train'])} images augmented"
                     + (" and run through the frozen part" if unfreeze != "all" else "")
                     + " per epoch; the decoded images are kept in memory, the views are not)")
    return net, x, stats, x_train


def fit_trial(cfg, start, parts, ds, on_epoch_end=None, info=None, progress=None):
    """One tuning trial: train as `finetune` would from a copy of `start` (nothing written), validation every
    epoch; on_epoch_end(TrainState, row) may raise to stop the trial. `progress` reports the frozen part's
    outputs as they are computed (the first trial at a split point can spend minutes there). Before training, `info` (a dict) gets
    "features": {"computed": n, "cached": m} (frozen-part outputs this trial computed / read from the cache)
    and "trained_parameters" (how many parameters train). Returns the FitResult."""
    import copy

    tcfg = TrainConfig.from_dict(cfg.train)
    tcfg.positive = ds.class_names.index(cfg.positive) if cfg.positive is not None else None
    start = copy.deepcopy(start)
    net, x, stats, x_train = training_inputs(cfg, start, parts, ds, progress)
    if info is not None:
        info["features"] = {k: sum(s[k] for s in stats.values()) for k in ("computed", "cached")}
        info["trained_parameters"] = sum(int(v.size) for _, layer, _, v in net.named_parameters() if not layer.frozen)
    y = {name: ds.labels[idx] for name, idx in parts.items()}
    return fit(net, x_train, y["train"], x["val"], y.get("val"), tcfg, num_classes=len(ds.class_names),
               on_epoch_end=on_epoch_end, one_thread=start.unfreeze == 0)


def _run_one(cfg, out, parts, ds, resume, progress, on_epoch_end, extra_meta):
    """Train on parts = {"train": idx, "val": idx, "test": idx}; write everything into `out`."""
    t_run = time.perf_counter()
    tcfg = TrainConfig.from_dict(cfg.train)
    class_names = list(ds.class_names)
    positive = class_names.index(cfg.positive) if cfg.positive is not None else None
    tcfg.positive = positive
    start = start_model(cfg, ds, parts["train"], progress)
    model, prep, provenance, unfreeze, resolved = (start.model, start.prep, start.provenance, start.unfreeze,
                                                   start.resolved)
    _write_resolved(Path(cfg.out), resolved)
    labels = ds.labels
    y = {name: labels[idx] for name, idx in parts.items()}

    t0 = time.perf_counter()
    net, x, stats, x_train = training_inputs(cfg, start, parts, ds, progress)
    feature_seconds = time.perf_counter() - t0
    if progress:
        computed = sum(s["computed"] for s in stats.values())
        cached = sum(s["cached"] for s in stats.values())
        progress(f"features: {computed} computed, {cached} from cache, {feature_seconds:.1f} s")

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

    def save_best(extra):
        ckpt = Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=class_names,
                          preprocessing=prep.to_dict(),
                          provenance={**provenance, "converter": "lightcnn.finetune", "source_file":
                                      provenance.get("base_weights"), "source_sha256": provenance.get("base_sha256")},
                          extra={"training": cfg.to_dict(), "mode": cfg.mode, "unfreeze": unfreeze,
                                 "resolved": resolved, **extra_meta, **extra})
        save_checkpoint(out / "best.h5", ckpt)

    try:
        result = fit(net, x_train, y["train"], x["val"], y.get("val"), tcfg, num_classes=len(class_names),
                     state=state, on_epoch_end=epoch_end, progress=progress, one_thread=unfreeze == 0)
    except TrainingError as exc:
        good = getattr(exc, "state", None) or latest[0]  # the loop's own state, else the last epoch's
        if good is None or not good.best_weights:
            raise
        restore(net, good.best_weights)  # the best model so far is still worth having
        save_best({"best_epoch": good.best_epoch + 1, "stopped": str(exc)})
        raise TrainingError(f"{exc}; the best model so far (epoch {good.best_epoch + 1}) is in "
                            f"{out / 'best.h5'}") from None
    _write_metrics_csv(out / "metrics.csv", result.history)

    report = {"class_names": class_names, "positive": cfg.positive, "resolved": resolved, **extra_meta}
    shown = [n for n in ("train", "val", "test") if x.get(n) is not None and (n != "test" or cfg.report_test)]
    logits = {name: predict_logits(net, x[name][0] if name == "train" else x[name]) for name in shown}
    for name in shown:
        report[name] = _report(y[name], logits[name], class_names, positive, cfg.n_bootstrap, tcfg.seed)
        # ROC and PR points, so any tool can redraw the curves (metrics.curve_points)
        report[name]["curves"] = report_curves(y[name], softmax(logits[name].astype(np.float64)), class_names,
                                               positive)
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
    save_best({"metrics": metrics, "best_epoch": result.best_epoch + 1,
               **({"operating_point": operating_point} if operating_point else {})})
    report["best_h5"] = str(best)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    _write_pictures(out, cfg, report, shown, parts, ds, result, best, prep, progress, model.arch, provenance,
                    logits)
    return RunResult(out, report, result.history, best, timings)


def _write_pictures(out, cfg, report, shown, parts, ds, result, best, prep, progress, arch, provenance, logits):
    """roc/pr/confusion/curves.png, cam_grid.png (3 highest and 3 lowest scores of the shown split) and
    report.html for the test split (validation when the test split is not reported)."""
    from lightcnn.api import load
    from lightcnn.plots import matplotlib_available
    from lightcnn.run_report import cam_rows, caveats, class_counts, write_html, write_plots
    from lightcnn.weights import sha256_of

    split_name = "test" if "test" in shown else ("val" if "val" in shown else "train")
    class_names = report["class_names"]
    at = report.get("at_operating_point") or {}
    cam = None
    if matplotlib_available():
        clf = load(str(best))
        idx = parts[split_name]
        paths = [ds.items[i].path for i in idx]
        positive = class_names.index(cfg.positive) if cfg.positive else None
        if len(paths):  # the scores the report was made from; only the 6 shown images run the network again
            probs = softmax(logits[split_name].astype(np.float64))
            scores = probs[:, positive] if positive is not None else probs.max(axis=1)
            cam = cam_rows(clf, [str(p) for p in paths], scores, k=min(3, len(paths)))
    plots = write_plots(out, report[split_name], class_names, split_name, at.get(split_name), result.history,
                        report["best_epoch"], cam, warn=progress)
    splits = {n: report[n] for n in shown}
    split = report.get("split") or {}
    notes = [f"split: {split.get('method', '?')} (seed {split.get('seed')})"] + list(split.get("warnings") or [])
    model_rows = [["model", _esc(best)], ["SHA-256", sha256_of(best)], ["architecture", _esc(arch)],
                  ["trained", _esc(f"{cfg.mode}" + (f", last {cfg.unfreeze} blocks" if cfg.mode == "last-k" else ""))],
                  ["base weights", _esc(provenance.get("base_weights") or provenance.get("base"))],
                  ["base SHA-256", _esc(provenance.get("base_sha256") or "-")],
                  ["best epoch", f"{report['best_epoch']} of {report['epochs_run']}"],
                  ["preprocessing", _esc(json.dumps(prep.to_dict()))]]
    write_html(out / "report.html", title=f"Fine-tuning run {out.name}", data_rows=class_counts(splits, class_names),
               data_notes=notes, model_rows=model_rows, config=cfg.to_dict(), splits=splits,
               at_operating_point=at, operating_point=report.get("operating_point"), class_names=class_names,
               plots=plots, caveat_lines=caveats(splits, split, prep.window))


def _esc(value):
    import html

    return html.escape(str(value))


def _cache_dir(cfg):
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).resolve().parent / ".feature-cache"


def warm_feature_cache(cfg, ds, views, progress=None):
    """Compute the frozen backbone's output for every image of `ds` (and `views` augmented views with the run's
    seed) once, in dataset order, before several runs that share the cache start (k folds, several seeds).

    Why: an output's last bits depend on the batch it was computed in. Without this, each cached image holds
    what the first run to reach it computed, so folds run in parallel would read other bits than folds run one
    after another; with it, every run reads the same cache whether runs are sequential or Dask tasks, and
    parallel runs do not compute the same images twice.
    """
    model, prep, _ = load_base(cfg)
    tcfg = TrainConfig.from_dict(cfg.train)
    _, unfreeze = prepare_model(model, cfg, tcfg, len(ds.class_names))
    extract_features(model, ds.items, prep, _cache_dir(cfg), augment_views=views, seed=tcfg.seed,
                     augment=cfg.augment, unfreeze=unfreeze, progress=_throttled(progress, "features"))


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-able: {type(x).__name__}")


# --------------------------------------------------------------------------------------------- entry point


def run_fold(cfg, i, parts, ds, resume, meta, threads=1):
    """Fold i of a k-fold run as one task (cfg.out/fold<i+1>, written atomically); returns its report."""
    from lightcnn.cluster import pin_threads

    fold_out = Path(cfg.out) / f"fold{i + 1}"
    fold_out.mkdir(parents=True, exist_ok=True)
    with pin_threads(threads):
        return _run_one(cfg, fold_out, parts, ds, resume, None, None, meta).report


def _headline(report):
    """'val accuracy 0.8214, test accuracy 0.7500' (the splits the report has)."""
    if "kfold" in report:
        acc = report["kfold"].get("accuracy", {})
        return f"{report['kfold_split']} accuracy {acc.get('mean', math.nan):.4f} ± {acc.get('std', math.nan):.4f}"
    return ", ".join(f"{n} accuracy {report[n]['accuracy']:.4f}" for n in ("val", "test") if report.get(n))


def finetune(config, resume=False, progress=_stderr, on_epoch_end=None, run_map=None, threads=1):
    """Run one fine-tuning experiment described by `config` (FinetuneConfig or its dict); see module docstring.

    resume        continue an interrupted run in config.out (same options; epochs may grow)
    progress      callable(str) for progress lines (default: stderr), or None for silence
    on_epoch_end  callable(TrainState, row) after each epoch's checkpoint is written (tests use it to
                  interrupt a run)
    run_map       None: folds run one after another here; else a callable (fn, list of argument tuples) ->
                  iterator of (index, result) that runs each fold as a task (lightcnn.cluster.mapper: Dask);
                  threads = Numba/BLAS threads per task. Each fold gives the same numbers either way.
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
    results, jobs, t0 = [None] * len(folds), [], time.perf_counter()
    for i, (train_idx, test_idx) in enumerate(folds):
        fold_out = out / f"fold{i + 1}"
        if resume and (fold_out / "report.json").exists():
            results[i] = json.loads((fold_out / "report.json").read_text())
            if progress:
                progress(f"fold {i + 1}/{cfg.kfold}: done earlier")
            continue
        tr, va = carved[i]
        meta = {"fold": i + 1, "split": {"method": f"{cfg.kfold}-fold", "seed": seed, "warnings": notes}}
        jobs.append((i, {"train": tr, "val": va, "test": test_idx}, meta))
    if jobs:
        warm_feature_cache(cfg, ds, cfg.views, progress)
    if run_map is None:
        for i, parts, meta in jobs:
            fold_out = out / f"fold{i + 1}"
            fold_out.mkdir(parents=True, exist_ok=True)
            if progress:
                progress(f"fold {i + 1}/{cfg.kfold}")
            results[i] = _run_one(cfg, fold_out, parts, ds, resume, progress, on_epoch_end, meta).report
    else:  # every fold a task (lightcnn.cluster): the same _run_one, in parallel, progress only per fold
        tasks = [(cfg, i, parts, ds, resume, meta, threads) for i, parts, meta in jobs]
        for j, report in run_map(run_fold, tasks):
            i = jobs[j][0]
            results[i] = report
            if progress:
                progress(f"fold {i + 1}/{cfg.kfold} done: " + _headline(report))
    key = "test" if cfg.report_test else "val"
    summary = kfold_summary([{k: r[key][k] for k in METRIC_KEYS} | {"confusion_matrix": r[key]["confusion_matrix"]}
                             for r in results])
    report = {"kfold": summary, "kfold_split": key, "k": cfg.kfold, "class_names": list(ds.class_names),
              "positive": cfg.positive, "folds": [{k: r.get(k) for k in ("fold", "val", "test", "best_epoch")}
                                                 for r in results],
              "timings": {"total_seconds": time.perf_counter() - t0}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    return RunResult(out, report, [r.get("best_epoch") for r in results], None, report["timings"])


def seed_config(config, seed):
    """The config of one run of a multi-seed experiment: train.seed = seed, out = <out>/seed<seed>."""
    d = (config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(dict(config))).to_dict()
    d["train"] = dict(d["train"], seed=int(seed))
    d["out"] = str(Path(d["out"]) / f"seed{seed}")
    return d


def run_seed(config, resume=False, threads=1):
    """One seed's whole run (split or k-fold) as a task; returns its report."""
    from lightcnn.cluster import pin_threads

    resume = resume and (Path(config["out"]) / "config.json").exists()  # a seed that never started runs anew
    with pin_threads(threads):
        return finetune(config, resume=resume, progress=None).report


def finetune_seeds(config, seeds, resume=False, progress=_stderr, run_map=None, threads=1):
    """The same experiment once per seed, each in <out>/seed<s> (tasks when run_map is given, see finetune);
    <out>/report.json holds mean ± std over the seeds of each run's test metrics (val with report_test False;
    a k-fold run contributes its mean over folds). Returns RunResult."""
    from lightcnn.cluster import sequential_map

    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(dict(config))
    out, t0 = Path(cfg.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    reports, jobs = [None] * len(seeds), []
    for k, s in enumerate(seeds):
        seed_cfg = seed_config(cfg, s)
        if resume and (Path(seed_cfg["out"]) / "report.json").exists():
            reports[k] = json.loads((Path(seed_cfg["out"]) / "report.json").read_text())
        else:
            jobs.append((k, seed_cfg))
    if jobs:  # the unaugmented outputs all seeds share (each seed's augmented views are its own)
        warm_feature_cache(FinetuneConfig.from_dict(jobs[0][1]), discover(cfg.data, cfg.csv), 0, progress)
    for j, report in (run_map or sequential_map)(run_seed, [(c, resume, threads) for _, c in jobs]):
        k = jobs[j][0]
        reports[k] = report
        if progress:
            progress(f"seed {seeds[k]} done: " + _headline(report))
    key = "test" if cfg.report_test else "val"
    per_seed = [({m: r["kfold"][m]["mean"] for m in METRIC_KEYS if m in r["kfold"]} if "kfold" in r else
                 {m: r[key][m] for m in METRIC_KEYS}) for r in reports]
    report = {"seeds": [int(s) for s in seeds], "seed_summary": kfold_summary(per_seed), "seed_split": key,
              "runs": [{"seed": int(s), "out": str(out / f"seed{s}"), **m} for s, m in zip(seeds, per_seed)],
              "class_names": reports[0].get("class_names"), "positive": cfg.positive,
              "timings": {"total_seconds": time.perf_counter() - t0}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    return RunResult(out, report, [], None, report["timings"])


__all__ = ["FinetuneConfig", "MODES", "RunError", "RunResult", "finetune", "finetune_seeds", "load_base",
           "prepare_model", "run_fold", "run_seed", "seed_config", "trainable_net"]
