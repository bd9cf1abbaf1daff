"""Datasets, splits, metrics and augmentations.

Metrics are checked against confusion matrices counted by hand in the comments; AUC against a brute-force pairwise
count; splits by their invariants (stratification, group-disjointness, k-fold coverage) over many seeds; the two
bundled COVID sets against the counts documented in shared/data/SOURCES.md.
"""

import csv
import json
import math
import warnings
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from lightcnn import augment, data, metrics

# --------------------------------------------------------------------------------------------- metrics


def test_confusion_matrix_by_hand():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2]
    # true 0: predicted 0,1,0 -> [2,1,0]; true 1: 1,2 -> [0,1,1]; true 2: 2,2,0,2 -> [1,0,3]
    expected = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 3]])
    np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred, 3), expected)


def test_binary_metrics_by_hand():
    # 10 samples, positive = 1.
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    # TP=3 FN=1 FP=1 TN=5
    m = metrics.binary_metrics(y_true, y_pred, positive=1)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)  # TN/(TN+FP); the false-positive rate would be 1/6
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_specificity_is_not_false_positive_rate():
    # TN=1, FP=3: specificity 0.25, FPR 0.75 — the two can never be confused on this case.
    m = metrics.binary_metrics([0, 0, 0, 0, 1], [0, 1, 1, 1, 1], positive=1)
    assert m["specificity"] == pytest.approx(0.25)
    assert m["specificity"] != pytest.approx(0.75)


def test_positive_class_choice_swaps_roles():
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    m1 = metrics.binary_metrics(y_true, y_pred, positive=1)
    m0 = metrics.binary_metrics(y_true, y_pred, positive=0)
    assert m0["sensitivity"] == pytest.approx(m1["specificity"])
    assert m0["specificity"] == pytest.approx(m1["sensitivity"])
    assert m0["precision"] == pytest.approx(5 / 6)  # 5 true 0 among 6 predicted 0


def test_zero_denominators_are_nan():
    # Nothing predicted positive: precision 0/0; no positives at all: sensitivity 0/0.
    m = metrics.binary_metrics([0, 0, 0], [0, 0, 0], positive=1, n_classes=2)
    assert math.isnan(m["precision"]) and math.isnan(m["sensitivity"]) and math.isnan(m["f1"])
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0


def test_per_class_report_three_classes_by_hand():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2]
    rep = metrics.per_class_report(y_true, y_pred, ["a", "b", "c"])
    # cm = [[2,1,0],[0,1,1],[1,0,3]]: column sums 3,2,4; row sums 3,2,4
    assert rep["a"]["precision"] == pytest.approx(2 / 3) and rep["a"]["recall"] == pytest.approx(2 / 3)
    assert rep["b"]["precision"] == pytest.approx(1 / 2) and rep["b"]["recall"] == pytest.approx(1 / 2)
    assert rep["c"]["precision"] == pytest.approx(3 / 4) and rep["c"]["recall"] == pytest.approx(3 / 4)
    # specificity of b: negatives are the 7 non-b samples, 1 of them predicted b -> 6/7
    assert rep["b"]["specificity"] == pytest.approx(6 / 7)
    assert rep["c"]["support"] == 4
    assert rep["macro avg"]["precision"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert rep["weighted avg"]["recall"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 4 * 3 / 4) / 9)


def _auc_pairwise(y, s):
    """Brute force: over all (positive, negative) pairs, 1 if the positive scores higher, 1/2 for a tie."""
    pos, neg = s[y == 1], s[y == 0]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_by_hand_with_ties():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=1/2, (0.4>0.1)=1 -> 3.5/4
    assert metrics.roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert metrics.roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_roc_auc_matches_pairwise_count(rng, levels):
    for _ in range(5):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, levels, n) / levels  # few levels -> many ties
        assert metrics.roc_auc(y, s) == pytest.approx(_auc_pairwise(y, s), abs=1e-12)


def test_roc_auc_matches_sklearn(rng):
    skm = pytest.importorskip("sklearn.metrics")
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    y3 = rng.integers(0, 3, 200)
    p3 = rng.dirichlet([1, 1, 1], 200)
    assert metrics.roc_auc_ovr(y3, p3) == pytest.approx(skm.roc_auc_score(y3, p3, multi_class="ovr"), abs=1e-12)


def test_roc_auc_ovr_is_mean_of_one_vs_rest(rng):
    y = rng.integers(0, 3, 50)
    p = rng.dirichlet([1, 1, 1], 50)
    expected = np.mean([_auc_pairwise((y == k).astype(int), p[:, k]) for k in range(3)])
    assert metrics.roc_auc_ovr(y, p) == pytest.approx(expected)
    # binary: macro OvR equals the plain AUC of the positive column
    y2 = rng.integers(0, 2, 50)
    s = rng.random(50)
    assert metrics.roc_auc_ovr(y2, np.stack([1 - s, s], 1)) == pytest.approx(metrics.roc_auc(y2, s))


def _noisy_scores(rng, n):
    y = rng.integers(0, 2, n)
    s = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, s


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_bootstrap_ci_contains_estimate_and_narrows(rng, method):
    widths = []
    for n in (60, 600):
        y, s = _noisy_scores(rng, n)
        lo, hi = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_resamples=500, seed=1, method=method)
        point = metrics.roc_auc(y, s)
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]  # ~ 1/sqrt(10) in theory


def test_bootstrap_ci_is_seeded(rng):
    y, s = _noisy_scores(rng, 80)
    a = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_resamples=200, seed=5)
    b = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_resamples=200, seed=5)
    assert a == b


def test_bootstrap_ci_degenerate_resamples():
    # Precision is undefined whenever a resample holds no positive prediction (only 2 of 40 are predicted 1).
    y = np.array([1, 0] + [0, 1] * 19)
    pred = np.array([1, 1] + [0] * 38)

    def precision(yt, yp):
        return metrics.binary_metrics(yt, yp, positive=1, n_classes=2)["precision"]

    lo, hi = metrics.bootstrap_ci(precision, y, pred, n_resamples=300, seed=0)
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    # A metric that is constant on every resample gives a zero-width interval, not nan.
    lo, hi = metrics.bootstrap_ci(lambda yt, yp: 1.0, y, pred, n_resamples=50, seed=0)
    assert (lo, hi) == (1.0, 1.0)


def test_classification_report_binary_keys_and_values(rng):
    y, s = _noisy_scores(rng, 120)
    probs = np.stack([1 - s, s], 1)
    rep = metrics.classification_report(y, probs, ["neg", "pos"], positive="pos", n_bootstrap=200, seed=0)
    assert set(rep) == {"accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc",
                        "confusion_matrix", "confidence_intervals", "per_class"}
    cm = np.array(rep["confusion_matrix"])
    tn, fp, fn, tp = cm.ravel()
    assert rep["specificity"] == pytest.approx(tn / (tn + fp))
    assert rep["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert rep["roc_auc"] == pytest.approx(_auc_pairwise(y, s))
    for name in metrics.METRIC_NAMES:
        lo, hi = rep["confidence_intervals"][name]
        assert lo <= rep[name] <= hi
    json.dumps(rep, allow_nan=False)  # strictly valid JSON
    text = metrics.format_report(rep)
    assert "specificity" in text and "pos" in text


def test_classification_report_three_classes_macro(rng):
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2])
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    rep = metrics.classification_report(y, probs, ["a", "b", "c"], n_bootstrap=0)
    assert rep["accuracy"] == pytest.approx(6 / 9)
    assert rep["sensitivity"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)  # macro recall
    assert rep["confidence_intervals"]["accuracy"] == [None, None]
    assert rep["per_class"]["c"]["support"] == 4
    json.dumps(rep, allow_nan=False)


def test_kfold_summary_mean_std():
    folds = [{"accuracy": 0.8, "f1": 0.5, "confusion_matrix": [[1, 0], [0, 1]]},
             {"accuracy": 0.9, "f1": None, "confusion_matrix": [[2, 1], [0, 1]]},
             {"accuracy": 1.0, "f1": 0.7, "confusion_matrix": [[0, 0], [1, 1]]}]
    s = metrics.kfold_summary(folds)
    assert s["accuracy"]["mean"] == pytest.approx(0.9)
    assert s["accuracy"]["std"] == pytest.approx(0.1)  # ddof=1: sqrt((0.01 + 0 + 0.01) / 2)
    assert s["f1"]["n"] == 2 and s["f1"]["mean"] == pytest.approx(0.6)
    assert s["confusion_matrix"] == [[3, 1], [1, 3]]
    assert "±" in metrics.format_kfold(s)


# --------------------------------------------------------------------------------------------- splits


def _labels(rng, counts):
    y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    return rng.permutation(y)


def test_stratified_split_proportions(rng):
    y = _labels(rng, [349, 397, 55])
    parts = data.stratified_split(y, (0.8, 0.1, 0.1), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    for k, n_k in enumerate(np.bincount(y)):
        for part, f in zip(parts, (0.8, 0.1, 0.1)):
            assert abs(np.sum(y[part] == k) - n_k * f) < 1  # every class within one item of its share


def test_stratified_split_deterministic_by_seed(rng):
    y = _labels(rng, [30, 40])
    a = data.stratified_split(y, seed=3)
    b = data.stratified_split(y, seed=3)
    c = data.stratified_split(y, seed=4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def _random_groups(rng, n_groups=60):
    sizes = rng.integers(1, 9, n_groups)
    groups = np.repeat([f"p{i}" for i in range(n_groups)], sizes)
    group_label = rng.integers(0, 2, n_groups)
    labels = np.repeat(group_label, sizes)
    order = rng.permutation(len(labels))
    return labels[order], groups[order].tolist()


@pytest.mark.parametrize("seed", range(12))
def test_group_split_never_straddles(seed):
    rng = np.random.default_rng(seed)
    labels, groups = _random_groups(rng)
    groups[0] = None  # ungrouped items are allowed and count as their own group
    parts = data.group_stratified_split(labels, groups, (0.8, 0.1, 0.1), seed=seed)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    where = defaultdict(set)
    for p, idx in enumerate(parts):
        for i in idx:
            if groups[i] is not None:
                where[groups[i]].add(p)
    assert all(len(s) == 1 for s in where.values())
    # stratification is approximate but should be close to 8:1:1 of the items
    assert abs(len(parts[0]) / len(labels) - 0.8) < 0.1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grouped", [True, False])
def test_kfold_covers_every_index_once(seed, grouped):
    rng = np.random.default_rng(seed)
    labels, groups = _random_groups(rng, 80)
    folds = list(data.stratified_group_kfold(labels, groups if grouped else None, k=10, seed=seed))
    assert len(folds) == 10
    tests = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(len(labels)))
    for tr, te in folds:
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(labels)
        if grouped:
            assert not {groups[i] for i in tr} & {groups[i] for i in te}
    if not grouped:  # plain stratified k-fold: each fold within one item of n_k / 10 per class
        for _, te in folds:
            for k, n_k in enumerate(np.bincount(labels)):
                assert abs(np.sum(labels[te] == k) - n_k / 10) < 1


def test_kfold_deterministic_and_validates_k(rng):
    labels, groups = _random_groups(rng, 30)
    a = [te for _, te in data.stratified_group_kfold(labels, groups, 5, seed=1)]
    b = [te for _, te in data.stratified_group_kfold(labels, groups, 5, seed=1)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError):
        list(data.stratified_group_kfold(labels, groups, 31, seed=1))


# --------------------------------------------------------------------------------------------- discovery


def _tiny_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


def test_discover_folders(tmp_path):
    # discover() looks at names only, so the non-PNG "images" can be empty files.
    for rel in ["dog/b.png", "dog/a.jpg", "dog/sub/c.JPEG", "cat/z%1.png", "cat/notes.txt", "empty/readme.md",
                "dog/.hidden/d.png"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    ds = data.discover(tmp_path)
    assert ds.class_names == ["cat", "dog"]  # sorted; a folder without images is not a class
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == ["cat/z%1.png", "dog/a.jpg", "dog/b.png",
                                                                      "dog/sub/c.JPEG"]
    assert ds.labels.tolist() == [0, 1, 1, 1]
    assert not ds.has_groups and not ds.has_split


def test_split_without_groups_warns_loudly(tmp_path):
    for i in range(20):
        _tiny_png(tmp_path / ("a" if i % 2 else "b") / f"{i}.png")
    ds = data.discover(tmp_path)
    with pytest.warns(data.UngroupedSplitWarning, match="WITHOUT ANY GROUP"):
        s = data.split_dataset(ds, how="random", seed=0)
    assert s.warned and s.method == "random" and s.ungrouped == 20
    assert sorted(np.concatenate(s[:3]).tolist()) == list(range(20))
    with pytest.raises(data.DatasetError):
        data.split_dataset(ds, how="group")
    with pytest.raises(data.DatasetError):
        data.split_dataset(ds, how="official")
    with pytest.warns(data.UngroupedSplitWarning):
        data.kfold_dataset(ds, k=5)


def test_discover_csv_with_groups_and_split(tmp_path):
    rows = [("img/p1_a.png", "sick", " p1", "train"), ("img/p1_b.png", "sick", "p1 ", "train"),
            ("img/p2.png", "well", "p2", "test"), ("img/p3.png", "well", "p3", "val")]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "patient", "split"])
        for r in rows:
            _tiny_png(tmp_path / r[0])
            w.writerow(r)
    ds = data.discover(tmp_path, csv=tmp_path / "labels.csv")
    assert ds.class_names == ["sick", "well"]
    assert ds.groups == ["p1", "p1", "p2", "p3"]  # whitespace stripped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # grouped: no warning
        s = data.split_dataset(ds)
    assert s.method == "official" and s.train.tolist() == [0, 1] and s.val.tolist() == [3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = data.split_dataset(ds, how="random", fractions=(0.5, 0.5), seed=0)
    assert s.method == "group" and len(s.val) == 0 and not s.warned


def test_discover_csv_missing_file_is_named(tmp_path):
    (tmp_path / "l.csv").write_text("file,label\nnope.png,a\n")
    with pytest.raises(data.DatasetError, match="nope.png"):
        data.discover(tmp_path, csv=tmp_path / "l.csv")


def test_xray_group_rules():
    assert data.xray_group("Covid/COVID-00003a.jpg", "COVID-00003a") == data.xray_group("Covid/COVID-00003b.jpg")
    assert data.xray_group("Covid/COVID-00003a.jpg") != data.xray_group("Covid/COVID-00013a.jpg")
    a = data.xray_group("Covid/auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg")
    d = data.xray_group("Covid/auntminnie-d-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg")
    assert a == d is not None
    assert data.xray_group("Normal/012.jpeg") is None


# --------------------------------------------------------------------------------------------- real data


def test_covid_ct_ucsd(data_dir):
    root = data_dir / "covid-ct-ucsd"
    if not root.exists():
        pytest.skip(f"{root} not found")
    ds = data.discover(root)
    assert ds.source == "covid-ct-ucsd" and len(ds) == 746
    assert ds.class_counts() == {"CT_COVID": 349, "CT_NonCOVID": 397}
    counts = Counter((ds.class_names[it.label], it.split) for it in ds.items)
    assert [counts["CT_COVID", s] for s in ("train", "val", "test")] == [191, 60, 98]
    assert [counts["CT_NonCOVID", s] for s in ("train", "val", "test")] == [234, 58, 105]
    # The manifest's split agrees with UCSD's split files in metadata/.
    for it in ds.items:
        cls = ds.class_names[it.label]
        listed = (root / "metadata" / f"{it.split}{cls}.txt").read_text().splitlines()
        assert it.path.name in {line.strip() for line in listed}
    # No patient in two splits; "Patient 180 " (trailing space) merged with "Patient 180".
    splits_of = defaultdict(set)
    for it in ds.items:
        assert it.group is not None and it.group == it.group.strip()
        splits_of[it.group].add(it.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert "CT_COVID/Patient 180" in splits_of
    s = data.split_dataset(ds)
    assert s.method == "official" and (len(s.train), len(s.val), len(s.test)) == (425, 118, 203)
    assert all(p.is_file() for p in ds.paths[:5])  # '%' in names is taken literally


def test_covid_ct_ucsd_group_resplit_is_patient_disjoint(data_dir):
    root = data_dir / "covid-ct-ucsd"
    if not root.exists():
        pytest.skip(f"{root} not found")
    ds = data.discover(root)
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every item has a patient id: no warning
            s = data.split_dataset(ds, how="random", seed=seed)
        groups = [{ds.items[i].group for i in part} for part in s[:3]]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_covid_xray_3class(data_dir):
    root = data_dir / "covid-xray-3class"
    if not root.exists():
        pytest.skip(f"{root} not found")
    ds = data.discover(root)
    assert ds.source == "covid-xray-3class" and len(ds) == 307
    assert ds.class_counts() == {"Covid": 130, "Normal": 88, "Viral_Pneumonia": 89}
    assert not ds.has_split  # the original train/test folders leak and are ignored
    by_name = {p.name: g for p, g in zip(ds.paths, ds.groups)}
    assert by_name["COVID-00003a.jpg"] == by_name["COVID-00003b.jpg"] is not None
    assert by_name["COVID-00015a.png"] == by_name["COVID-00015b.png"]
    assert len({g for n, g in by_name.items() if n.startswith("auntminnie")}) == 1
    with pytest.warns(data.UngroupedSplitWarning):
        s = data.split_dataset(ds, seed=0)
    assert s.method == "group" and s.ungrouped == sum(g is None for g in ds.groups)


# --------------------------------------------------------------------------------------------- augment


@pytest.fixture
def image(rng):
    return rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)


FULL_CONFIG = {"random_resized_crop": {"size": 32}, "zoom": {}, "rotation": {"max_degrees": 90}, "hflip": {},
               "colour_jitter": {}, "gaussian_noise": {"sigma": 3}}


def test_augmenter_deterministic_by_seed(image):
    aug = augment.Augmenter(FULL_CONFIG)
    a = aug(image, np.random.default_rng(7))
    b = aug(image, np.random.default_rng(7))
    c = aug(image, np.random.default_rng(8))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_augmenter_config_round_trip_and_validation():
    aug = augment.Augmenter(FULL_CONFIG)
    cfg = json.loads(json.dumps(aug.to_dict()))
    assert augment.Augmenter(cfg).to_dict() == cfg
    assert cfg["zoom"]["range"] == [1.1, 1.3]
    with pytest.raises(ValueError):
        augment.Augmenter({"rotate": {}})
    with pytest.raises(ValueError):
        augment.Augmenter({"rotation": {"degrees": 3}})


def test_augment_does_not_write_input(image):
    before = image.copy()
    augment.Augmenter(FULL_CONFIG)(image, np.random.default_rng(0))
    np.testing.assert_array_equal(image, before)


def test_hflip_exact(image):
    np.testing.assert_array_equal(augment.hflip(image, np.random.default_rng(0), p=1.0), image[:, ::-1])
    np.testing.assert_array_equal(augment.hflip(image, np.random.default_rng(0), p=0.0), image)


def test_rotation_by_zero_is_identity(image):
    np.testing.assert_array_equal(augment.rotate(image, 0), image)
    np.testing.assert_array_equal(augment.rotation(image, np.random.default_rng(0), max_degrees=0), image)


def test_rotate_90_on_square_matches_rot90(rng):
    img = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    np.testing.assert_array_equal(augment.rotate(img, 90), np.rot90(img, 1))  # counter-clockwise


def test_zoom_magnifies_centre():
    # A centred white square of side 10 in a 40x40 image becomes ~ side 20 at zoom 2.
    img = np.zeros((40, 40, 1), np.uint8)
    img[15:25, 15:25] = 255
    out = augment.zoom_by(img, 2.0)
    assert abs(int((out > 127).sum()) - 400) <= 40


@pytest.mark.parametrize("hw", [(500, 400), (300, 640), (64, 64)])
def test_random_resized_crop_box_bounds_and_area(hw):
    h, w = hw
    rng = np.random.default_rng(0)
    scale = (0.08, 1.0)
    for _ in range(300):
        top, left, ch, cw = augment.random_resized_crop_box(h, w, rng, scale, (3 / 4, 4 / 3))
        assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch > 0 and cw > 0
        # Rounding each side by <= 0.5 pixel moves the area fraction by at most this much.
        slack = (0.5 * (ch + cw) + 0.25) / (h * w)
        assert scale[0] - slack <= ch * cw / (h * w) <= scale[1] + slack


def test_colour_jitter_and_noise_keep_grayscale_and_range(rng):
    gray = rng.integers(0, 256, (20, 20, 1), dtype=np.uint8)
    out = augment.colour_jitter(gray, np.random.default_rng(0), 0.5, 0.5, 0.5)
    assert out.shape == gray.shape and out.dtype == np.uint8
    rgb_gray = np.repeat(gray, 3, axis=2)  # a grey RGB image stays grey under saturation jitter
    out = augment.colour_jitter(rgb_gray, np.random.default_rng(0), saturation=0.9)
    assert np.abs(out[:, :, 0].astype(int) - out[:, :, 2]).max() <= 1
    noisy = augment.gaussian_noise(np.full((50, 50, 3), 128, np.uint8), np.random.default_rng(0), sigma=10)
    assert 8 < noisy.astype(float).std() < 12


def test_oversample_indices_balances_classes():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = augment.oversample_indices(labels, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 10, 10]
    ones = Counter(idx[labels[idx] == 1].tolist())
    assert sorted(ones.values()) == [3, 3, 4]  # repeats spread evenly: 10 = 3 + 3 + 4
    np.testing.assert_array_equal(idx, augment.oversample_indices(labels, seed=0))


# ---------------------------------------------------------------------------------------- operating point


def _youden_brute_force(y, s, positive=1):
    """Every candidate threshold tried by counting, the plainest possible reading of the definition."""
    best, best_j = None, -np.inf
    for t in sorted(set(s.tolist())):
        called = s >= t
        tp = np.sum(called & (y == positive))
        tn = np.sum(~called & (y != positive))
        j = tp / np.sum(y == positive) + tn / np.sum(y != positive) - 1
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_j = t, j
    return best


def test_youden_threshold_by_hand():
    # scores of negatives 0.1 0.2 0.4, positives 0.35 0.8 0.9: at t = 0.35 all positives are caught and one
    # negative (0.4) is called positive: J = 1 + 2/3 - 1 = 0.667; t = 0.8 gives 2/3 + 1 - 1 = 0.667 too,
    # and 0.35 is nearer 0.5 -> 0.35; argmax's 0.5 would give J = 2/3 as well but is not a candidate.
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.2, 0.35, 0.8, 0.9, 0.4])
    assert metrics.youden_threshold(y, s, 1) == 0.35
    assert math.isnan(metrics.youden_threshold(np.zeros(4, int), s[:4], 1))


@pytest.mark.parametrize("seed", range(5))
def test_youden_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 60), 0, 1), 2)  # ties on purpose
    assert metrics.youden_threshold(y, s, 1) == _youden_brute_force(y, s, 1)
    assert metrics.youden_threshold(1 - y, s, 0) == _youden_brute_force(1 - y, s, 0)  # positive = class 0


def test_decide_with_threshold_and_three_classes():
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.25, 0.55], [0.6, 0.1, 0.3]])
    assert metrics.decide(probs).tolist() == [0, 2, 0]
    # positive = 1 at threshold 0.25: row 0 (0.3) and row 1 (0.25, >=) become 1; row 2 keeps its best other class
    assert metrics.decide(probs, 1, 0.25).tolist() == [1, 1, 0]
    with pytest.raises(ValueError):
        metrics.decide(probs, None, 0.3)


def test_classification_report_at_threshold_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.2, 0.35, 0.8, 0.9, 0.4])
    probs = np.stack([1 - s, s], 1)
    at = metrics.classification_report(y, probs, ["neg", "pos"], positive="pos", n_bootstrap=0, threshold=0.35)
    # called positive: 0.35, 0.8, 0.9 (all three positives) and 0.4 (a negative)
    assert at["confusion_matrix"] == [[2, 1], [0, 3]] and at["threshold"] == 0.35
    assert at["sensitivity"] == 1.0 and at["specificity"] == pytest.approx(2 / 3)
    assert at["accuracy"] == pytest.approx(5 / 6) and at["precision"] == pytest.approx(3 / 4)
    plain = metrics.classification_report(y, probs, ["neg", "pos"], positive="pos", n_bootstrap=0)
    assert plain["confusion_matrix"] == [[3, 0], [1, 2]] and "threshold" not in plain
    assert at["roc_auc"] == plain["roc_auc"]  # the ranking does not depend on the decision rule
