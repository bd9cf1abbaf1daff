"""Classification metrics with the formulas spelled out, exact tie-aware ROC-AUC and bootstrap intervals.

Conventions
-----------
y_true  (N,)    int class indices in [0, K)
y_pred  (N,)    int predicted indices (usually probs.argmax(1))
probs   (N, K)  class scores, row i for sample i (probabilities, or any monotone score per class)
y_score (N,)    score of the positive class for binary AUC

Confusion matrix `cm[t, p]` = number of samples of true class t predicted as p (rows = truth, columns =
prediction). For one "positive" class the others are pooled into "negative":

    TP = cm[pos, pos]          FN = sum_p cm[pos, p] - TP
    FP = sum_t cm[t, pos] - TP TN = N - TP - FN - FP

    accuracy     = (TP + TN) / N               (multi-class: trace(cm) / N)
    sensitivity  = TP / (TP + FN)              recall, true-positive rate
    specificity  = TN / (TN + FP)              true-negative rate; NOT FP/(FP+TN), which is the false-positive rate
    precision    = TP / (TP + FP)              positive predictive value
    f1           = 2 TP / (2 TP + FP + FN)     harmonic mean of precision and sensitivity

A ratio whose denominator is 0 (e.g. precision when nothing is predicted positive) is undefined and returned as
nan, never silently as 0 or 1; `classification_report` turns nan into None so the result is valid JSON.

Decisions are argmax(probs) unless a `threshold` is given for the positive class: then sample i is called
positive when probs[i, positive] >= threshold and otherwise gets its best other class. `youden_threshold` picks
such an operating point on a validation split. This module does not import scikit-learn.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


def _ratio(num, den):
    return float(num) / float(den) if den else math.nan


def confusion_matrix(y_true, y_pred, n_classes) -> np.ndarray:
    """cm (K, K) int64 with cm[t, p] = #{i : y_true[i] = t and y_pred[i] = p}."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in length")
    k = int(n_classes)
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def binary_counts(cm, positive) -> tuple[int, int, int, int]:
    """(TP, FP, TN, FN) of class `positive` against all others, from cm (K, K)."""
    cm = np.asarray(cm)
    tp = int(cm[positive, positive])
    fn = int(cm[positive].sum()) - tp
    fp = int(cm[:, positive].sum()) - tp
    tn = int(cm.sum()) - tp - fn - fp
    return tp, fp, tn, fn


def binary_metrics_from_cm(cm, positive) -> dict:
    """accuracy, sensitivity, specificity, precision, f1 of class `positive` vs the rest (formulas above)."""
    tp, fp, tn, fn = binary_counts(cm, positive)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def binary_metrics(y_true, y_pred, positive=1, n_classes=None) -> dict:
    """Metrics of class index `positive` vs the rest; y_true, y_pred (N,) ints. See the module docstring."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = n_classes or int(max(y_true.max(initial=0), y_pred.max(initial=0), positive) + 1)
    return binary_metrics_from_cm(confusion_matrix(y_true, y_pred, k), positive)


def roc_auc(y_true, y_score, positive=1) -> float:
    """Area under the ROC curve of `y_score` for class `positive`; nan if either class is absent.

    Computed exactly as the Mann-Whitney statistic with midranks:

        AUC = P(score of a random positive > score of a random negative) + 1/2 P(tie)
            = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    where R_pos is the sum of the (average, i.e. tie-aware) ranks of the positives among all N scores. This equals
    the trapezoidal area under the empirical ROC curve, where a block of tied scores is one diagonal segment
    (sklearn's roc_auc_score gives the same number). O(N log N).
    """
    y_true = np.asarray(y_true).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} differ in length")
    pos = y_true == positive
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(y_score)  # midranks: each tie block shares its average rank
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def curve_points(y_true, y_score, positive=1) -> dict:
    """ROC and precision-recall points of `y_score` for class `positive`, one per distinct score.

    The decision at threshold t is "positive iff score >= t", for every distinct score t from the highest down:
        thresholds (M,)  descending; the ROC lists start with the point (0, 0) for "nothing positive", whose
                         threshold is None (+inf), so fpr/tpr have M + 1 entries
        fpr, tpr         FP / N_neg and TP / N_pos   (sklearn.metrics.roc_curve with drop_intermediate=False)
        precision, recall TP / (TP + FP) and TP / N_pos at each threshold (M entries each)
        auc              roc_auc (Mann-Whitney); average_precision = sum (R_i - R_{i-1}) P_i (sklearn's AP)
    None when either class is absent (no curve is defined).
    """
    y_true = np.asarray(y_true).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    pos = y_true == positive
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-y_score, kind="stable")
    s, p = y_score[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last index of each block of equal scores
    tp = np.cumsum(p)[last].astype(np.float64)
    fp = (last + 1) - tp
    tpr, fpr = tp / n_pos, fp / n_neg
    precision = tp / (tp + fp)
    recall_steps = np.diff(np.r_[0.0, tpr])
    return {"thresholds": [None] + s[last].tolist(), "fpr": [0.0] + fpr.tolist(), "tpr": [0.0] + tpr.tolist(),
            "precision": precision.tolist(), "recall": tpr.tolist(), "auc": roc_auc(y_true, y_score, positive),
            "average_precision": float(np.sum(recall_steps * precision))}


def report_curves(y_true, probs, class_names, positive=None) -> dict:
    """{class name: curve_points} for report.json: the positive class of a two-class report, else every class
    one-vs-rest. Classes absent from y_true (or the only class present) are left out."""
    probs = np.asarray(probs, dtype=np.float64)
    if isinstance(positive, str):
        positive = list(class_names).index(positive)
    ks = [positive] if positive is not None and len(class_names) == 2 else range(len(class_names))
    out = {}
    for k in ks:
        points = curve_points(y_true, probs[:, k], k)
        if points is not None:
            out[class_names[k]] = points
    return out


def roc_auc_ovr(y_true, probs) -> float:
    """Macro one-vs-rest AUC: mean over classes k of roc_auc(y_true == k, probs[:, k]).

    Classes absent from y_true (their AUC is undefined) are left out of the mean; nan if none is defined.
    For K = 2 both terms equal the binary AUC, so this is the binary AUC.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    aucs = [roc_auc(y_true, probs[:, k], positive=k) for k in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def per_class_report(y_true, y_pred, class_names) -> dict:
    """{name: {precision, recall, specificity, f1, support}} for each class, plus "macro avg" (unweighted mean
    over classes, nan entries skipped) and "weighted avg" (weighted by support) — recall is sensitivity."""
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    rows = {}
    for c, name in enumerate(class_names):
        m = binary_metrics_from_cm(cm, c)
        rows[name] = {"precision": m["precision"], "recall": m["sensitivity"], "specificity": m["specificity"],
                      "f1": m["f1"], "support": int(cm[c].sum())}
    support = np.array([rows[n]["support"] for n in class_names], dtype=np.float64)
    for avg in ("macro avg", "weighted avg"):
        rows[avg] = {"support": int(support.sum())}
        for key in ("precision", "recall", "specificity", "f1"):
            v = np.array([rows[n][key] for n in class_names])
            ok = ~np.isnan(v)
            w = np.ones(k) if avg == "macro avg" else support
            rows[avg][key] = float(np.average(v[ok], weights=w[ok])) if ok.any() and w[ok].sum() else math.nan
    return rows


def decide(probs, positive=None, threshold=None) -> np.ndarray:
    """(N,) predicted class indices: argmax(probs), or with `threshold`, `positive` wherever
    probs[:, positive] >= threshold and the best other class elsewhere."""
    probs = np.asarray(probs, dtype=np.float64)
    if threshold is None:
        return probs.argmax(axis=1)
    if positive is None:
        raise ValueError("a decision threshold needs a positive class")
    others = probs.copy()
    others[:, positive] = -np.inf
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))


def youden_threshold(y_true, y_score, positive=1) -> float:
    """The threshold t maximising Youden's J = sensitivity + specificity - 1 of "positive iff score >= t".

    Candidates are the observed scores (J only changes there); among equally good ones the one nearest 0.5
    (argmax's threshold for two classes) wins, so a split that cannot tell them apart keeps the usual rule.
    nan if y_true lacks either class.
    """
    y_true = np.asarray(y_true).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    pos = y_true == positive
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    cands = np.unique(y_score)
    # called positive at threshold t: scores >= t. Counts via sorted scores, O(N log N).
    pos_sorted, neg_sorted = np.sort(y_score[pos]), np.sort(y_score[~pos])
    tp = n_pos - np.searchsorted(pos_sorted, cands, side="left")
    fp = n_neg - np.searchsorted(neg_sorted, cands, side="left")
    j = tp / n_pos + (n_neg - fp) / n_neg - 1.0
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])


def metric_vector(y_true, probs, positive=None, threshold=None) -> np.ndarray:
    """(6,) float64 in METRIC_NAMES order for the decisions `decide(probs, positive, threshold)`.

    positive = class index: that class vs the rest (binary metrics; AUC of probs[:, positive]).
    positive = None: macro averages over classes of the one-vs-rest sensitivity, specificity, precision, f1 and
    AUC (for K = 2 the macro sensitivity and specificity both equal the balanced accuracy).
    The AUC does not depend on the threshold.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    cm = confusion_matrix(y_true, decide(probs, positive, threshold), k)
    acc = _ratio(np.trace(cm), cm.sum())
    if positive is not None:
        m = binary_metrics_from_cm(cm, positive)
        auc = roc_auc(y_true, probs[:, positive], positive=positive)
        return np.array([acc, m["sensitivity"], m["specificity"], m["precision"], m["f1"], auc])
    per = [binary_metrics_from_cm(cm, c) for c in range(k) if cm[c].sum() > 0]  # classes present in y_true
    out = [acc]
    for key in ("sensitivity", "specificity", "precision", "f1"):
        v = np.array([m[key] for m in per], dtype=np.float64)
        out.append(float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan)
    out.append(roc_auc_ovr(y_true, probs))
    return np.array(out)


def bootstrap_ci(metric_fn, y_true, y_other, n_resamples=1000, seed=0, confidence=0.95, method="BCa",
                 stratified=True):
    """Bootstrap confidence interval of metric_fn(y_true, y_other) via scipy.stats.bootstrap.

    metric_fn  f(y_true (n,), y_other (n, ...)) -> float or (M,) array
    y_other    y_pred (N,), y_score (N,) or probs (N, K): resampled together with y_true (pairs stay pairs)
    method     "BCa" (bias-corrected and accelerated, scipy's default) or "percentile"
    stratified resample within each true class (the class counts stay fixed, as pROC's ci.auc does), so no
               resample lacks a class and AUC/sensitivity stay defined; classes with < 2 samples force an
               unstratified (plain paired) resample.
    Returns (lo, hi): floats, or (M,) arrays when metric_fn returns a vector.

    Fewer than two samples: every interval is (nan, nan) (reported as null), never an error.
    Degenerate resamples: where a resample makes the metric undefined (nan, e.g. precision with no positive
    prediction) or BCa cannot be computed (all resamples equal), that metric falls back to the percentile
    interval of its finite resamples; if fewer than half are finite, its interval is (nan, nan).
    """
    y_true = np.asarray(y_true)
    y_other = np.asarray(y_other)
    n = len(y_true)
    if len(y_other) != n:
        raise ValueError(f"y_true has {n} samples, y_other {len(y_other)}")

    def statistic(*index_samples):
        idx = np.concatenate(index_samples)
        return np.asarray(metric_fn(y_true[idx], y_other[idx]), dtype=np.float64)

    if n < 2:  # nothing to resample (scipy needs two observations): the interval is unavailable, not an error
        point = statistic(np.arange(n)) if n else np.asarray(metric_fn(y_true, y_other), dtype=np.float64)
        if point.ndim == 0:
            return math.nan, math.nan
        return np.full(point.shape, math.nan), np.full(point.shape, math.nan)

    # Resample indices, not values: scipy treats each index array as one sample, and with one array per class
    # its multi-sample bootstrap resamples each class separately, i.e. a stratified bootstrap.
    classes, counts = np.unique(y_true, return_counts=True)
    if stratified and len(classes) > 1 and counts.min() >= 2:
        data = tuple(np.flatnonzero(y_true == c) for c in classes)
    else:
        data = (np.arange(n),)
    point = statistic(*data)
    with warnings.catch_warnings():
        # Degenerate distributions are handled below; scipy's warnings about them would only be noise.
        warnings.simplefilter("ignore")
        res = stats.bootstrap(data, statistic, n_resamples=n_resamples, vectorized=False, paired=False,
                              confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
    lo = np.atleast_1d(np.asarray(res.confidence_interval.low, dtype=np.float64)).copy()
    hi = np.atleast_1d(np.asarray(res.confidence_interval.high, dtype=np.float64)).copy()
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(len(lo), -1)
    alpha = (1.0 - confidence) / 2.0
    for m in range(len(lo)):
        finite = dist[m][np.isfinite(dist[m])]
        if np.isfinite(lo[m]) and np.isfinite(hi[m]) and len(finite) == dist.shape[1]:
            continue
        if len(finite) * 2 < dist.shape[1]:
            lo[m] = hi[m] = math.nan
        else:
            lo[m], hi[m] = np.quantile(finite, [alpha, 1.0 - alpha])
    if point.ndim == 0:
        return float(lo[0]), float(hi[0])
    return lo, hi


def kfold_summary(fold_results) -> dict:
    """{metric: {"mean", "std", "n"}} over a list of per-fold dicts (e.g. classification_report outputs).

    Only scalar numeric entries are summarised; nan/None folds are skipped (n counts the folds used).
    std is the sample standard deviation across folds (ddof=1), the spread one would expect of another fold;
    it is 0 for a single fold. "confusion_matrix", when present in every fold, is summed (pooled over folds).
    """
    summary = {}
    keys = [k for k in fold_results[0] if all(k in r for r in fold_results)] if fold_results else []
    for key in keys:
        values = [r[key] for r in fold_results]
        if key == "confusion_matrix":
            summary[key] = np.sum([np.asarray(v) for v in values], axis=0).tolist()
            continue
        if not all(v is None or isinstance(v, (int, float, np.number)) for v in values):
            continue
        v = np.array([math.nan if x is None else float(x) for x in values])
        v = v[~np.isnan(v)]
        summary[key] = {"mean": float(v.mean()) if len(v) else math.nan,
                        "std": float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else math.nan),
                        "n": int(len(v))}
    return summary


def _json(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def classification_report(y_true, probs, class_names, positive=None, n_bootstrap=1000, seed=0,
                          confidence=0.95, threshold=None) -> dict:
    """The report.json body for one split.

    y_true (N,) ints; probs (N, K) class scores; class_names (K,).
    positive  a class name or index: accuracy is over all classes, the other metrics are that class vs the rest
              (e.g. positive="CT_COVID"). None: macro averages over classes (see `metric_vector`).
    Returns a JSON-able dict with exactly these keys (undefined values are None):
        accuracy, sensitivity, specificity, precision, f1, roc_auc   floats
        confusion_matrix        K x K nested list, rows = true class, columns = predicted class
        confidence_intervals    {metric: [lo, hi]} at `confidence`, `n_bootstrap` stratified BCa resamples
                                (see `bootstrap_ci`); [None, None] when n_bootstrap = 0
        per_class               `per_class_report` (precision, recall, specificity, f1, support per class)
        threshold               only when given: decisions are `decide(probs, positive, threshold)`, not argmax
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(class_names)):
        raise ValueError(f"probs must be (N, K) = ({len(y_true)}, {len(class_names)}), got {probs.shape}")
    if isinstance(positive, str):
        if positive not in class_names:
            raise ValueError(f"positive class {positive!r} is not one of {list(class_names)}")
        positive = list(class_names).index(positive)

    def fn(yt, pr):
        return metric_vector(yt, pr, positive, threshold)

    values = fn(y_true, probs)
    if n_bootstrap:
        lo, hi = bootstrap_ci(fn, y_true, probs, n_resamples=n_bootstrap, seed=seed, confidence=confidence)
    else:
        lo = hi = np.full(len(METRIC_NAMES), math.nan)
    report = {name: _json(v) for name, v in zip(METRIC_NAMES, values)}
    y_pred = decide(probs, positive, threshold)
    report["confusion_matrix"] = confusion_matrix(y_true, y_pred, len(class_names)).tolist()
    report["confidence_intervals"] = {name: [_json(a), _json(b)] for name, a, b in zip(METRIC_NAMES, lo, hi)}
    report["per_class"] = {name: {k: (_json(v) if k != "support" else v) for k, v in row.items()}
                           for name, row in per_class_report(y_true, y_pred, class_names).items()}
    if threshold is not None:
        report["threshold"] = float(threshold)
    return report


def _fmt(x, width=7):
    return f"{'n/a':>{width}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{width}.4f}"


def format_report(report) -> str:
    """A plain-text rendering of `classification_report`: metrics with CIs, per-class table, confusion matrix."""
    lines = [f"{'metric':<12} {'value':>7}   {'bootstrap CI'}"]
    for name in METRIC_NAMES:
        lo, hi = report["confidence_intervals"].get(name, [None, None])
        ci = f"[{_fmt(lo, 6)}, {_fmt(hi, 6)}]" if lo is not None else ""
        lines.append(f"{name:<12} {_fmt(report[name])}   {ci}")
    per = report["per_class"]
    names = [n for n in per if n not in ("macro avg", "weighted avg")]
    w = max(12, *(len(n) for n in per))
    lines += ["", f"{'class':<{w}} {'precision':>9} {'recall':>7} {'specif.':>7} {'f1':>7} {'support':>7}"]
    for n, row in per.items():
        lines.append(f"{n:<{w}} {_fmt(row['precision'], 9)} {_fmt(row['recall'])} {_fmt(row['specificity'])} "
                     f"{_fmt(row['f1'])} {row['support']:>7d}")
    cw = max(8, *(len(n) for n in names))
    lines += ["", "confusion matrix (rows = true, columns = predicted)",
              " " * w + " " + " ".join(f"{n:>{cw}}" for n in names)]
    for n, row in zip(names, report["confusion_matrix"]):
        lines.append(f"{n:<{w}} " + " ".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def format_kfold(summary) -> str:
    """`kfold_summary` as "metric  mean ± std  (n folds)" lines."""
    return "\n".join(f"{k:<12} {v['mean']:.4f} ± {v['std']:.4f}  (n={v['n']})"
                     for k, v in summary.items() if isinstance(v, dict) and "mean" in v)


__all__ = ["METRIC_NAMES", "binary_counts", "binary_metrics", "binary_metrics_from_cm", "bootstrap_ci",
           "curve_points", "report_curves", "classification_report", "confusion_matrix", "decide", "format_kfold",
           "format_report", "kfold_summary",
           "metric_vector", "per_class_report", "roc_auc", "roc_auc_ovr", "youden_threshold"]
