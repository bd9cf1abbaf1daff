"""The training loop: minibatch SGD/Adam over any Layer, validation every epoch, early stopping, exact resume.

    for epoch e:   lr_e = lr_at(config, e)            (warm-up, then step decay | multi-step | cosine; see lr_at)
        order = rng.permutation(train indices, oversampled if asked); view_i ~ U{0..V}   (one view per image)
                   (or x_train(e): views drawn fresh for this epoch, see fit)
        for each batch:  logits = net.forward(x, training=True)
                         loss, dlogits = CE | class-weighted CE | focal (+ label smoothing)
                         net.backward(dlogits);  [clip the global gradient norm];  optimizer.step()
                         (L2 = lambda * sum w^2 or decoupled decay)
        validation: plain cross-entropy, accuracy, ROC-AUC; keep a copy of the weights when `monitor` improves;
        stop after `patience` epochs without improvement.

`net` is anything with forward(x, training), backward(dy), named_parameters() and state_dict(): a head
(Sequential of Dense/Dropout), an unfrozen suffix + head, or a whole Model. Inputs are arrays of shape
(V, N, ...) holding V views of each of N samples (V = 1 without augmentation).

Resume. Everything that decides the next epoch is in `TrainState`: the epoch count, the generator's
bit_generator state, every Dropout generator's state, the optimiser's steps and moments, the best weights and
the early-stopping counter. `fit(..., state=...)` continues from it, and a run stopped after epoch k and resumed
ends bit-identical to one that never stopped. A non-finite loss raises TrainingError before any update is made
from it, so the last state handed to `on_epoch_end` (a caller's last good checkpoint) stays valid; the error carries
that state (`exc.state`, with the best weights so far) and names the likely cause (`diagnose`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from lightcnn.augment import oversample_indices
from lightcnn.errors import TrainingError
from lightcnn.kernels._reuse import reusing_arrays
from lightcnn.kernels._split_blas import gemm_caller_thread
from lightcnn.kernels.linear import cross_entropy, focal_loss, softmax
from lightcnn.layers.base import Sequential, input_gradient_skipped
from lightcnn.layers.basic import Dropout
from lightcnn.metrics import roc_auc, roc_auc_ovr
from lightcnn.optim import SGD, Adam, clip_grad_norm

LOSSES = ("ce", "weighted-ce", "focal")
SCHEDULES = ("step", "multistep", "cosine")
BLOW_UP = 1e4  # |activation| beyond which the divergence guard names the layer
OPTIMIZERS = ("sgd", "adam")
MONITORS = ("loss", "accuracy", "roc_auc")


@dataclass
class TrainConfig:
    """Training hyper-parameters (all JSON-able). Unknown keys are an error in `from_dict`.

    head / hidden / dropout / hidden_dropout describe the new head (Model.reset_head): "linear" is
    GAP -> dropout -> Dense(K); "dense" is seed 003's stack (64, 64, 64, 32, 32) unless `hidden` is given.
    l2 is lambda in lambda * sum(w^2) added to the loss (seed 000's eq. 3); weight_decay is decoupled (AdamW).
    lr_schedule: step (lr_decay every lr_decay_every epochs), multistep (x lr_gamma at each of lr_milestones,
    seed 002's step LR) or cosine; warmup_epochs ramp the rate up linearly first (see lr_at).
    clip_grad_norm > 0 rescales the gradients of a step whose global L2 norm exceeds it (0 = off).
    patience = 0 disables early stopping. monitor picks the validation number that decides the best epoch
    (loss: lower is better; accuracy, roc_auc: higher is better). positive = class index for the AUC
    (None: macro one-vs-rest AUC).
    """

    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    l2: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    lr_decay_every: int = 5
    lr_schedule: str = "step"
    lr_milestones: list = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    clip_grad_norm: float = 0.0
    patience: int = 0
    loss: str = "ce"
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    monitor: str = "loss"
    oversample: bool = False
    seed: int = 0
    positive: int | None = None
    head: str = "linear"
    hidden: list = field(default_factory=list)
    dropout: float = 0.2
    hidden_dropout: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")
        if self.head not in ("linear", "dense"):
            raise ValueError(f"head must be 'linear' or 'dense', got {self.head!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr_decay_every < 1 or self.patience < 0:
            raise ValueError("epochs >= 0, batch_size >= 1, lr_decay_every >= 1 and patience >= 0 are required")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        self.lr_milestones = sorted(int(m) for m in self.lr_milestones)
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise ValueError("the multistep schedule needs milestones (--lr-milestones 10,20)")
        if self.warmup_epochs < 0 or self.clip_grad_norm < 0 or self.lr_gamma <= 0:
            raise ValueError("warmup_epochs >= 0, clip_grad_norm >= 0 and lr_gamma > 0 are required")
        self.hidden = [int(h) for h in self.hidden]

    @property
    def hidden_layers(self):
        """Widths of the hidden Dense layers of the head."""
        if self.head == "dense" and not self.hidden:
            return [64, 64, 64, 32, 32]
        return list(self.hidden) if self.head == "dense" else []

    @classmethod
    def from_dict(cls, data):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def to_dict(self):
        return asdict(self)


# --------------------------------------------------------------------------------------------- pieces


def class_weights_for(labels, num_classes):
    """Inverse-frequency weights w_c = N / (K * n_c) (a class absent from `labels` gets 0)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
    w = np.zeros(num_classes)
    w[counts > 0] = counts.sum() / (np.count_nonzero(counts) * counts[counts > 0])
    return w


def make_loss(config, train_labels, num_classes):
    """f(logits (B,K), labels (B,)) -> (loss, dlogits) for config.loss."""
    weights = class_weights_for(train_labels, num_classes) if config.loss == "weighted-ce" else None
    if config.loss == "focal":
        return lambda z, y: focal_loss(z, y, config.focal_gamma, weights)
    return lambda z, y: cross_entropy(z, y, weights, config.label_smoothing)


def make_optimizer(net, config):
    if config.optimizer == "sgd":
        return SGD(net, config.lr, config.momentum, l2=config.l2, weight_decay=config.weight_decay)
    return Adam(net, config.lr, l2=config.l2, weight_decay=config.weight_decay)


def lr_at(config, epoch):
    """The learning rate of 0-based `epoch` (metrics.csv's epoch e + 1), closed forms:

        warm-up     e < W:  lr * (e + 1) / W                              (W = warmup_epochs)
        step        lr * lr_decay ** (e // lr_decay_every)                (seed 001: 0.8 every 5 epochs)
        multistep   lr * lr_gamma ** #{m in lr_milestones: e >= m}        (torch MultiStepLR stepped per epoch)
        cosine      lr * (1 + cos(pi * (e - W) / (epochs - W))) / 2       (CosineAnnealingLR, eta_min 0)
    """
    w = config.warmup_epochs
    if epoch < w:
        return config.lr * (epoch + 1) / w
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / max(config.epochs - w, 1)))
    if config.lr_schedule == "multistep":
        return config.lr * config.lr_gamma ** sum(epoch >= m for m in config.lr_milestones)
    return config.lr * config.lr_decay ** (epoch // config.lr_decay_every)


def _units(net, prefix=""):
    """(dotted path, layer) of the smallest reportable steps of `net` in forward order: Sequentials opened up,
    anything else (a block, a conv unit, a dense layer) one step."""
    for name, child in net.children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, Sequential) and child.children():
            yield from _units(child, path)
        else:
            yield path, child


def diagnose(net, x, limit=BLOW_UP):
    """(path, max |activation|) of the first step of `net` whose output on batch x exceeds `limit` or is not
    finite (path "input" when x itself does); None when every step stays in range. Inference mode: nothing
    is cached and no statistic moves."""
    def peak(a):
        a = np.asarray(a)
        return float("inf") if not np.all(np.isfinite(a)) else float(np.max(np.abs(a), initial=0.0))

    with np.errstate(all="ignore"):
        if peak(x) > limit:
            return "input", peak(x)
        for path, layer in _units(net):
            x = layer.forward(x, False)
            if peak(x) > limit:
                return path, peak(x)
    return None


def divergence_message(what, net, xb, steps, lr):
    """`what` ("loss became nan at epoch 2 step 5") + the lr + the likely cause and what to try."""
    found = diagnose(net, xb)
    text = f"{what} after lr {lr:g}"
    if found is None:
        return f"{text}: activations stay below {BLOW_UP:.0e} up to the logits; try a lower --lr or --clip-grad-norm"
    path, value = found
    where = "in the cached input of the trained part (the frozen part's output)" if path == "input" else \
        f"after {path}"
    cause = f"activations exceed {BLOW_UP:.0e} {where} (max |x| {value:.3g})"
    if steps == 0:
        return f"{text}: {cause} before any update; try --bn recalibrate"
    return f"{text}: {cause}; try a lower --lr or --clip-grad-norm"


def dropout_layers(net):
    return [(name, layer) for name, layer in net.named_layers() if isinstance(layer, Dropout)]


def snapshot(net):
    """Copies of every parameter and buffer of `net`, by dotted name."""
    return {name: np.array(value, copy=True) for name, value in net.state_dict().items()}


def restore(net, tensors):
    """Write `tensors` (from `snapshot`) back into `net`, strictly by name and shape."""
    slots = {}
    for path, layer in net.named_layers():
        for store in (layer.params, layer.buffers):
            for key in store:
                slots[f"{path}.{key}" if path else key] = (store, key)
    missing = sorted(set(slots) - set(tensors))
    extra = sorted(set(tensors) - set(slots))
    if missing or extra:
        raise ValueError(f"state does not fit the network: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, (store, key) in slots.items():
        value = np.asarray(tensors[name])
        if value.shape != store[key].shape:
            raise ValueError(f"state tensor {name!r} has shape {value.shape}, network expects {store[key].shape}")
        store[key] = np.array(value, dtype=store[key].dtype, copy=True)
    net.params_changed()


def predict_logits(net, x, batch_size=256):
    """net.forward(training=False) over x (N, ...) in chunks -> (N, K) float32."""
    outs = [net.forward(np.ascontiguousarray(x[i:i + batch_size]), False) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate_logits(logits, labels, positive=None):
    """{loss, accuracy, roc_auc} of logits (N,K) against labels (N,); loss is plain cross-entropy."""
    labels = np.asarray(labels, np.int64)
    loss, _ = cross_entropy(logits, labels)
    probs = softmax(logits.astype(np.float64))
    acc = float(np.mean(probs.argmax(1) == labels))
    if logits.shape[1] == 2 or positive is not None:
        pos = 1 if positive is None else positive
        auc = roc_auc(labels, probs[:, pos], positive=pos)
    else:
        auc = roc_auc_ovr(labels, probs)
    return {"loss": float(loss), "accuracy": acc, "roc_auc": float(auc)}


@contextlib.contextmanager
def single_threaded():
    """Numba kernels and BLAS on one thread inside the block, restored afterwards.

    Head training on cached features is hundreds of tiny GEMMs and softmaxes. Waking a thread pool for each
    costs more than the work, and on a busy 2-core machine spinning OpenBLAS threads and Numba workers fight
    for the cores: measured 50-400 ms per head epoch with the pools on, 3-15 ms with one thread.
    """
    import numba

    from lightcnn._threads import single_threaded_blas

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with single_threaded_blas():
            yield
    finally:
        numba.set_num_threads(previous)


def _better(monitor, value, best):
    if best is None or not math.isfinite(best):
        return math.isfinite(value)
    return value < best if monitor == "loss" else value > best


# --------------------------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything `fit` needs to continue exactly where it stopped (JSON part + arrays)."""

    epoch: int = 0                       # epochs completed
    rng: dict = None                     # the shuffling/view generator's bit_generator.state
    dropout_rngs: dict = None            # {layer path: bit_generator.state}
    optimizer: dict = None               # Optimizer.state_dict() (arrays inside)
    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_value: float | None = None
    since_best: int = 0
    stopped: bool = False                # early stopping fired
    best_weights: dict = None            # snapshot(net) at best_epoch
    weights: dict = None                 # snapshot(net) now

    def meta(self):
        """The JSON-able part."""
        return {"epoch": self.epoch, "rng": self.rng, "dropout_rngs": self.dropout_rngs,
                "optimizer": {"steps": self.optimizer["steps"], "lr": self.optimizer["lr"]} if self.optimizer else None,
                "history": self.history, "best_epoch": self.best_epoch, "best_value": self.best_value,
                "since_best": self.since_best, "stopped": self.stopped}

    def tensors(self):
        """The arrays, flat by name: net.<p>, best.<p>, optim.<p>.<slot>."""
        out = {f"net.{k}": v for k, v in (self.weights or {}).items()}
        out.update({f"best.{k}": v for k, v in (self.best_weights or {}).items()})
        for name, slots in (self.optimizer or {}).get("state", {}).items():
            out.update({f"optim.{name}.{k}": v for k, v in slots.items()})
        return out

    @classmethod
    def from_parts(cls, meta, tensors):
        state = cls(**{k: v for k, v in meta.items() if k != "optimizer"})
        state.weights = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        state.best_weights = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        slots = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                name, slot = k[6:].rsplit(".", 1)
                slots.setdefault(name, {})[slot] = v
        if meta.get("optimizer") is not None:
            state.optimizer = dict(meta["optimizer"], state=slots)
        return state


def _diverged(message, state, net):
    """The TrainingError of a diverged run: the message, and the last good state (best weights included)."""
    net.clear_cache()
    # No "checkpoint kept" here: fit writes none itself (a tuning trial keeps nothing); a caller that saved one
    # says where (finetune: the best model so far in best.h5).
    exc = TrainingError(f"{message}; training stopped")
    exc.state = state
    return exc


@dataclass
class FitResult:
    history: list            # one dict per epoch: epoch, lr, loss, train_accuracy, val_loss, val_accuracy, ...
    best_epoch: int          # 0-based; -1 when no epoch ran
    best_value: float | None  # the monitored validation value at best_epoch (or the last train loss without val)
    stopped_early: bool
    seconds: float
    state: TrainState


def fit(net, x_train, y_train, x_val, y_val, config, *, num_classes, state=None, on_epoch_end=None,
        progress=None, eval_batch=256, one_thread=False):
    """Train `net` in place and leave the best-on-validation weights in it.

    x_train   (V, N, ...) float32: V views of N samples; or a callable epoch -> (N, ...) giving that epoch's
              inputs (augmentation drawn fresh every epoch, deterministic given the epoch); y_train (N,) ints
    x_val     (M, ...) float32 or None; y_val (M,) — validation runs once per epoch, training=False
    config    TrainConfig
    state     a TrainState from an earlier call's on_epoch_end to resume from (None: fresh start)
    on_epoch_end  callable(TrainState, row) after every epoch, e.g. to write an atomic checkpoint
    progress  callable(str) for one line per epoch, or None
    one_thread  run kernels and BLAS single-threaded (right for small heads on cached features; see
              `single_threaded`)
    Without validation data the best epoch is the last one (no early stopping).
    """
    if one_thread:
        with single_threaded():
            return fit(net, x_train, y_train, x_val, y_val, config, num_classes=num_classes, state=state,
                       on_epoch_end=on_epoch_end, progress=progress, eval_batch=eval_batch)
    # nothing upstream of net needs the gradient w.r.t. its input (images or cached activations); the GEMMs
    # keep BLAS on one thread per thread (lightcnn.kernels._split_blas); the large arrays of one step are
    # reused by the next instead of being paged in afresh (lightcnn.kernels._reuse); divergence is reported below
    with (np.errstate(over="ignore", invalid="ignore"), input_gradient_skipped(net), gemm_caller_thread(),
          reusing_arrays()):
        return _fit(net, x_train, y_train, x_val, y_val, config, num_classes, state, on_epoch_end, progress,
                    eval_batch)


def _fit(net, x_train, y_train, x_val, y_val, config, num_classes, state, on_epoch_end, progress, eval_batch):
    t_start = time.perf_counter()
    y_train = np.asarray(y_train, np.int64)
    fresh = callable(x_train)
    if not fresh and (x_train.ndim < 2 or x_train.shape[1] != len(y_train)):
        raise ValueError(f"x_train must be (V, N, ...) with N = {len(y_train)}, got {x_train.shape}")
    has_val = x_val is not None and len(x_val) > 0
    views = 1 if fresh else x_train.shape[0]
    loss_fn = make_loss(config, y_train, num_classes)
    opt = make_optimizer(net, config)
    drops = dropout_layers(net)
    indices = oversample_indices(y_train, config.seed) if config.oversample else np.arange(len(y_train))
    rng = np.random.default_rng(config.seed)
    if state is None:
        state = TrainState(weights=None)
    else:
        restore(net, state.weights)
        rng.bit_generator.state = state.rng
        for name, layer in drops:
            layer.rng.bit_generator.state = state.dropout_rngs[name]
        if state.optimizer is not None:
            opt.load_state_dict(state.optimizer)
    monitor = config.monitor if has_val else "loss"
    if progress and state.epoch == 0 and len(indices) and not fresh:
        found = diagnose(net, x_train[0][indices[:config.batch_size]])
        if found is not None:
            progress(f"warning: before training, activations exceed {BLOW_UP:.0e} after {found[0]} "
                     f"(max |x| {found[1]:.3g}); try --bn recalibrate")

    for epoch in range(state.epoch, config.epochs if not state.stopped else state.epoch):
        t0 = time.perf_counter()
        opt.lr = lr_at(config, epoch)
        xs = x_train
        if fresh:
            xs = np.asarray(x_train(epoch))[None]
            if xs.shape[1] != len(y_train):
                raise ValueError(f"x_train({epoch}) must give N = {len(y_train)} inputs, got {xs.shape[1]}")
        order = rng.permutation(indices)
        picks = rng.integers(0, views, size=len(order)) if views > 1 else np.zeros(len(order), np.int64)
        total, correct = 0.0, 0
        for b in range(0, len(order), config.batch_size):
            idx = order[b:b + config.batch_size]
            xb = xs[picks[b:b + config.batch_size], idx]
            yb = y_train[idx]
            logits = net.forward(xb, True)
            loss, dlogits = loss_fn(logits, yb)
            if not math.isfinite(loss):
                net.clear_cache()
                what = f"loss became {loss} at epoch {epoch + 1} step {b // config.batch_size + 1}"
                raise _diverged(divergence_message(what, net, xb, opt.steps, opt.lr), state, net)
            net.backward(dlogits)
            if config.clip_grad_norm:
                clip_grad_norm(net, config.clip_grad_norm)
            opt.step()
            total += loss * len(idx)
            correct += int(np.sum(np.argmax(logits, 1) == yb))
        row = {"epoch": epoch + 1, "lr": opt.lr, "loss": total / max(len(order), 1) + opt.l2_penalty(),
               "train_accuracy": correct / max(len(order), 1)}
        if has_val:
            val = evaluate_logits(predict_logits(net, x_val, eval_batch), y_val, config.positive)
            row.update({f"val_{k}": v for k, v in val.items()})
            if not math.isfinite(val["loss"]):
                what = f"validation loss became {val['loss']} at epoch {epoch + 1}"
                raise _diverged(divergence_message(what, net, x_val[:eval_batch], opt.steps, opt.lr), state, net)
            value = row[f"val_{monitor}"]
        else:
            value = row["loss"]
        bad = next((name for name, _, _, v in net.named_parameters() if not np.all(np.isfinite(v))), None)
        if bad is not None:
            raise _diverged(f"weight {bad} became non-finite at epoch {epoch + 1} after lr {opt.lr:g}; try a lower "
                            "--lr or --clip-grad-norm", state, net)
        row["seconds"] = time.perf_counter() - t0
        state.history.append(row)
        if _better(monitor, value, state.best_value):
            state.best_value, state.best_epoch, state.since_best = float(value), epoch, 0
            state.best_weights = snapshot(net)
        else:
            state.since_best += 1
        state.epoch = epoch + 1
        state.stopped = bool(config.patience and has_val and state.since_best >= config.patience)
        state.rng = rng.bit_generator.state
        state.dropout_rngs = {name: layer.rng.bit_generator.state for name, layer in drops}
        state.optimizer = opt.state_dict()
        state.weights = snapshot(net)
        if progress:
            val_text = (f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} auc {row['val_roc_auc']:.4f}"
                        if has_val else "")
            progress(f"epoch {epoch + 1:3d}/{config.epochs}  lr {opt.lr:.3g}  loss {row['loss']:.4f}  "
                     f"acc {row['train_accuracy']:.4f}{val_text}  {row['seconds']:.2f} s"
                     + ("  *" if state.since_best == 0 else ""))
        if on_epoch_end:
            on_epoch_end(state, row)
        if state.stopped:
            if progress:
                progress(f"early stopping: no improvement of val {monitor} for {config.patience} epochs "
                         f"(best epoch {state.best_epoch + 1})")
            break
    if state.best_weights is not None:
        restore(net, state.best_weights)
    return FitResult(state.history, state.best_epoch, state.best_value, state.stopped,
                     time.perf_counter() - t_start, state)


__all__ = ["LOSSES", "MONITORS", "OPTIMIZERS", "SCHEDULES", "FitResult", "TrainConfig", "TrainState",
           "class_weights_for", "diagnose", "divergence_message", "evaluate_logits", "fit", "lr_at", "make_loss",
           "make_optimizer", "predict_logits", "restore", "snapshot"]
