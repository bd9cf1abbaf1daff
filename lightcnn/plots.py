"""PNG plots of a run: ROC, precision-recall, confusion matrix, training curves, tuning convergence and the
GP's objective surface, and a grid of CAM overlays.

    report.json (curves, confusion matrix, CIs) / metrics history / trial logs --> Figure --> PNG bytes
                                                                                   --> atomic_write_bytes

matplotlib is an optional extra (`pip install "lightcnn[plot]"`), imported only inside these functions, and
only through `matplotlib.figure.Figure` with the Agg canvas: pyplot (its global figure list and GUI backends)
is never touched, so no window can open and nothing leaks between calls. Every function takes plain lists /
arrays and a path and returns the path; `write_run_plots` draws everything a report has.
This module draws; it computes no metric (lightcnn.metrics does).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

PLOT_HINT = 'plots skipped: matplotlib is not installed; pip install "lightcnn[plot]" to get them'


def matplotlib_available():
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    from lightcnn.checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _ci_text(ci):
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def roc_plot(path, curves, title="ROC", auc_ci=None, operating_point=None):
    """curves {class: metrics.curve_points}; one curve = a binary ROC with its AUC [95 % CI] in the legend,
    several = one-vs-rest. operating_point (fpr, tpr, threshold) is marked on the (single) curve."""
    fig = _figure(5.2, 4.8)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    for name, c in curves.items():
        ci = _ci_text(auc_ci) if len(curves) == 1 else ""
        ax.plot(c["fpr"], c["tpr"], lw=2, drawstyle="default", label=f"{name}: AUC {c['auc']:.3f}{ci}")
    if operating_point is not None:
        fpr, tpr, threshold = operating_point
        ax.plot([fpr], [tpr], "o", ms=9, mfc="none", mew=2, color="crimson",
                label=f"operating point P >= {threshold:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=title + (" (one-vs-rest)" if len(curves) > 1 else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pr_plot(path, curves, title="Precision-recall"):
    """curves {class: metrics.curve_points}: precision against recall, average precision in the legend; the
    dashed line is each class's prevalence (a random classifier's precision)."""
    fig = _figure(5.2, 4.8)
    ax = fig.add_subplot()
    for name, c in curves.items():
        line, = ax.plot([0.0] + c["recall"], [c["precision"][0]] + c["precision"], lw=2,
                        label=f"{name}: AP {c['average_precision']:.3f}")
        prevalence = c["precision"][-1]  # at the lowest threshold everything is positive
        ax.axhline(prevalence, ls="--", lw=1, color=line.get_color(), alpha=0.6)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)", ylabel="precision", title=title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion_plot(path, cm, class_names, title="Confusion matrix"):
    """Counts and row-normalised (each true class sums to 1) side by side; rows = true, columns = predicted."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    fig = _figure(4.0 + 3.2 * max(1, k / 3), 2.4 + 1.4 * max(1, k / 3))
    for i, (data, label, fmt) in enumerate(((cm, "counts", "{:.0f}"), (norm, "row-normalised", "{:.2f}"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for r in range(k):
            for c in range(k):
                ax.text(c, r, fmt.format(data[r, c]), ha="center", va="center",
                        color="white" if norm[r, c] > 0.6 else "black", fontsize=10)
        ax.set_xticks(range(k), class_names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=f"{title}: {label}")
    return _save(fig, path)


def training_plot(path, history, best_epoch=None):
    """history = one dict per epoch (lightcnn.train.loop): loss, accuracy and ROC-AUC per epoch, train and
    validation where recorded; the best epoch (1-based) as a vertical line."""
    epochs = [int(r["epoch"]) for r in history]
    panels = (("loss", "loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy"),
              ("ROC-AUC", None, "val_roc_auc"))
    fig = _figure(12, 3.6)
    for i, (title, train_key, val_key) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for key, label in ((train_key, "train"), (val_key, "validation")):
            values = [r.get(key) if key else None for r in history]
            values = [math.nan if v is None else float(v) for v in values]
            if key and not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o", ms=3, label=label)
        if best_epoch:
            ax.axvline(best_epoch, color="crimson", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.set(xlabel="epoch", title=title + (" (validation only)" if train_key is None else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def convergence_plot(path, runs, name="validation accuracy"):
    """runs = [list of objective values per trial (higher is better; None/NaN for failures)]: the best value
    so far after each trial, one line per run (as skopt's plot_convergence, for a maximised objective)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for r, values in enumerate(runs):
        v = np.array([-np.inf if x is None or not math.isfinite(x) else x for x in values], dtype=np.float64)
        best = np.maximum.accumulate(v)
        ax.plot(np.arange(1, len(v) + 1), np.where(np.isfinite(best), best, np.nan), marker="o", ms=3,
                label=f"run {r + 1}")
        ax.scatter(np.arange(1, len(v) + 1), np.where(np.isfinite(v), v, np.nan), s=8, alpha=0.35)
    ax.set(xlabel="trial", ylabel=f"best {name} so far", title="Convergence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def objective_plot(path, space, x_iters, values, name="validation accuracy"):
    """The GP posterior mean of `values` (higher is better) over the two most important numeric dimensions
    (shortest ARD length-scales), the others held at the best trial; trials as dots. One numeric dimension:
    mean ± 2 sd along it. Returns None when the space has no numeric dimension or too few finite trials."""
    from lightcnn.tune.gp import GaussianProcess, unpack
    from lightcnn.tune.space import Categorical

    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    keep = np.isfinite(v)
    numeric = [i for i, d in enumerate(space.dimensions) if not isinstance(d, Categorical)]
    if keep.sum() < 3 or not numeric:
        return None
    points = [p for p, k in zip(x_iters, keep) if k]
    X, y = space.encode(points), v[keep]
    gp = GaussianProcess(n_restarts=2).fit(X, -y, np.random.default_rng(0))  # the tuner minimises -value
    scales = unpack(gp.theta_)[1]
    cols = [space._slices[i].start for i in numeric]
    order = [numeric[j] for j in np.argsort([scales[c] for c in cols], kind="stable")][:2]
    best = X[int(np.argmax(y))]
    grid = np.linspace(0, 1, 41)

    def values_of(i, u):  # encoded u in [0, 1] -> the dimension's own values, for the axes
        feats = np.tile(best, (len(u), 1))
        feats[:, space._slices[i].start] = u
        return np.array([p[i] for p in space.decode(feats)], dtype=np.float64)

    fig = _figure(6.4, 5)
    ax = fig.add_subplot()
    if len(order) == 1:
        (i,) = order
        feats = np.tile(best, (len(grid), 1))
        feats[:, space._slices[i].start] = grid
        mu, sd = gp.predict(feats)
        xs = values_of(i, grid)
        ax.plot(xs, -mu, label="GP mean")
        ax.fill_between(xs, -mu - 2 * sd, -mu + 2 * sd, alpha=0.2, label="± 2 sd")
        ax.scatter([p[i] for p in points], y, s=14, color="k", label="trials")
        ax.set(xlabel=space.names[i], ylabel=name)
        if getattr(space.dimensions[i], "log", False):
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        i, j = order
        gu, gv = np.meshgrid(grid, grid)
        feats = np.tile(best, (gu.size, 1))
        feats[:, space._slices[i].start] = gu.ravel()
        feats[:, space._slices[j].start] = gv.ravel()
        mu, _ = gp.predict(feats)
        xs, ys = values_of(i, grid), values_of(j, grid)
        im = ax.contourf(xs, ys, (-mu).reshape(gu.shape), levels=20, cmap="viridis")
        fig.colorbar(im, ax=ax, label=f"GP mean {name}")
        ax.scatter([p[i] for p in points], [p[j] for p in points], c="white", edgecolors="k", s=18, label="trials")
        b = points[int(np.argmax(y))]
        ax.plot([b[i]], [b[j]], "*", color="crimson", ms=14, label="best trial")
        ax.set(xlabel=space.names[i], ylabel=space.names[j])
        for dim, setter in ((space.dimensions[i], ax.set_xscale), (space.dimensions[j], ax.set_yscale)):
            if getattr(dim, "log", False):
                setter("log")
        ax.legend(fontsize=8, loc="best")
    ax.set_title("GP surrogate of the objective (other dimensions at the best trial)", fontsize=10)
    return _save(fig, path)


def cam_grid_plot(path, rows, title="CAM: highest and lowest scores"):
    """rows = [(label, rgb (H,W,3) uint8, overlay (H,W,3) uint8)]: each image beside its CAM overlay, in a grid
    of two image pairs per row."""
    n = len(rows)
    per_row = 2
    lines = max(1, math.ceil(n / per_row))
    fig = _figure(10, 2.7 * lines + 0.4)
    fig.suptitle(title)
    for k, (label, rgb, over) in enumerate(rows):
        for m, (img, what) in enumerate(((rgb, "image"), (over, "CAM"))):
            ax = fig.add_subplot(lines, 2 * per_row, 2 * k + m + 1)
            ax.imshow(img)
            ax.set_axis_off()
            ax.set_title(f"{label}" if m == 0 else what, fontsize=8)
    return _save(fig, path)


def _operating_marker(report_at):
    """(fpr, tpr, threshold) of a report at the operating point, or None."""
    if not report_at or report_at.get("sensitivity") is None or report_at.get("specificity") is None:
        return None
    return 1.0 - report_at["specificity"], report_at["sensitivity"], report_at["threshold"]


def write_run_plots(out, split_report, class_names, split_name, at_operating_point=None, history=None,
                    best_epoch=None):
    """Everything a run folder gets: roc.png, pr.png, confusion.png (and curves.png with a history).
    split_report is one split of report.json (with "curves"); returns {name: path}."""
    out = Path(out)
    written = {}
    curves = split_report.get("curves") or {}
    if curves:
        ci = (split_report.get("confidence_intervals") or {}).get("roc_auc")
        marker = _operating_marker(at_operating_point) if len(curves) == 1 else None
        written["roc"] = roc_plot(out / "roc.png", curves, f"ROC, {split_name} split", ci, marker)
        written["pr"] = pr_plot(out / "pr.png", curves, f"Precision-recall, {split_name} split")
    written["confusion"] = confusion_plot(out / "confusion.png", split_report["confusion_matrix"], class_names,
                                          f"{split_name}")
    if history:
        written["curves"] = training_plot(out / "curves.png", history, best_epoch)
    return written


__all__ = ["PLOT_HINT", "matplotlib_available", "roc_plot", "pr_plot", "confusion_plot", "training_plot",
           "convergence_plot", "objective_plot", "cam_grid_plot", "write_run_plots"]
