"""ROC/PR points in report.json, the plots (matplotlib, the plot extra) and RUN_DIR/report.html, checked in
a real browser (headless Chromium) where one is installed."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from lightcnn.metrics import curve_points, report_curves, roc_auc
from tests.conftest import REPO

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ----------------------------------------------------------------------------------------------- the points


def test_curve_points_equal_a_brute_force_count_at_every_threshold(rng):
    y = rng.integers(0, 2, 60)
    scores = np.round(rng.uniform(0, 1, 60), 1)  # many ties
    c = curve_points(y, scores, positive=1)
    assert c["thresholds"][0] is None and c["fpr"][0] == 0.0 and c["tpr"][0] == 0.0
    ts = c["thresholds"][1:]
    assert ts == sorted(set(scores.tolist()), reverse=True)
    n_pos, n_neg = (y == 1).sum(), (y == 0).sum()
    for k, t in enumerate(ts):
        decided = scores >= t
        tp, fp = np.sum(decided & (y == 1)), np.sum(decided & (y == 0))
        assert c["tpr"][k + 1] == pytest.approx(tp / n_pos) and c["fpr"][k + 1] == pytest.approx(fp / n_neg)
        assert c["precision"][k] == pytest.approx(tp / (tp + fp)) and c["recall"][k] == pytest.approx(tp / n_pos)
    assert c["fpr"][-1] == 1.0 and c["tpr"][-1] == 1.0
    # the trapezoid under the points is the Mann-Whitney AUC (ties are diagonal segments)
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(roc_auc(y, scores), abs=1e-12)
    assert c["auc"] == pytest.approx(roc_auc(y, scores))
    ap = sum((r - r0) * p for r0, r, p in zip([0.0] + c["recall"][:-1], c["recall"], c["precision"]))
    assert c["average_precision"] == pytest.approx(ap)


def test_curve_points_equal_sklearn_where_installed(rng):
    y = rng.integers(0, 2, 60)
    scores = np.round(rng.uniform(0, 1, 60), 1)
    c = curve_points(y, scores, positive=1)
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn not installed: no cross-check")
    fpr, tpr, _ = metrics.roc_curve(y, scores, drop_intermediate=False)
    assert np.allclose(fpr, c["fpr"]) and np.allclose(tpr, c["tpr"])
    assert c["average_precision"] == pytest.approx(metrics.average_precision_score(y, scores))


def test_report_curves_positive_class_or_one_vs_rest(rng):
    y = rng.integers(0, 3, 40)
    probs = rng.dirichlet(np.ones(3), 40)
    assert list(report_curves(y, probs, ["a", "b", "c"])) == ["a", "b", "c"]
    assert list(report_curves(y % 2, probs[:, :2] / probs[:, :2].sum(1, keepdims=True), ["n", "p"], "p")) == ["p"]
    # a class absent from the labels has no curve
    assert list(report_curves(np.zeros(40, int), probs, ["a", "b", "c"])) == []


# ----------------------------------------------------------------------------------------------- the plots


def png_stats(path):
    """(width, height, grey std, share of non-white pixels) of a PNG."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return grey.shape[1], grey.shape[0], grey.std(), float((grey < 250).mean())


def test_plot_functions_draw_what_they_are_given(tmp_path, rng):
    pytest.importorskip("matplotlib", reason='pip install "lightcnn[plot]"')
    from lightcnn import plots

    y = rng.integers(0, 2, 50)
    curves = {"pos": curve_points(y, np.clip(y * 0.3 + rng.uniform(0, 0.7, 50), 0, 1), 1)}
    plain = plots.roc_plot(tmp_path / "a.png", curves, auc_ci=[0.7, 0.9])
    marked = plots.roc_plot(tmp_path / "b.png", curves, auc_ci=[0.7, 0.9], operating_point=(0.2, 0.8, 0.5))
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=int) for p in (plain, marked))
    assert a.shape == b.shape and (np.abs(a - b).sum(axis=2) > 60).sum() > 30  # the marker and its legend entry
    red = (b[..., 0] > 180) & (b[..., 1] < 60) & (b[..., 2] < 90)  # crimson: only the operating point uses it
    assert red.sum() > 20 and not ((a[..., 0] > 180) & (a[..., 1] < 60) & (a[..., 2] < 90)).any()
    for path in (plots.pr_plot(tmp_path / "pr.png", curves),
                 plots.confusion_plot(tmp_path / "cm.png", [[5, 1], [2, 7]], ["neg", "pos"]),
                 plots.training_plot(tmp_path / "tc.png", [{"epoch": e, "loss": 1 / e, "train_accuracy": 0.5,
                                                            "val_loss": 1.2 / e, "val_accuracy": 0.6,
                                                            "val_roc_auc": 0.7} for e in (1, 2, 3)], 2),
                 plots.convergence_plot(tmp_path / "cv.png", [[0.5, 0.7, None, 0.6], [0.4, 0.8, 0.8, 0.9]])):
        w, h, std, ink = png_stats(path)
        assert w > 300 and h > 250 and std > 10 and 0.01 < ink < 0.9, path


def test_objective_plot_follows_the_gp_over_the_important_dimensions(tmp_path):
    pytest.importorskip("matplotlib", reason='pip install "lightcnn[plot]"')
    from lightcnn.plots import objective_plot
    from lightcnn.tune import Categorical, Integer, Real, minimize

    # the value depends on a and b only; c is noise-free but flat, the category irrelevant
    def value(x):
        return -((np.log10(x[0]) + 2) ** 2) - (x[1] - 3) ** 2 / 4

    space = [Real(1e-4, 1, log=True, name="a"), Integer(1, 6, name="b"), Real(0, 1, name="c"),
             Categorical(["x", "y"], name="d")]
    res = minimize(lambda x: -value(x), space, n_calls=12, n_initial=8, seed=0)
    path = objective_plot(tmp_path / "objective.png", res.space, res.x_iters, [-v for v in res.func_vals])
    assert path is not None and png_stats(path)[2] > 10
    assert objective_plot(tmp_path / "none.png", res.space, res.x_iters[:2], [1.0, 2.0]) is None
    assert not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-class fine-tuning run (head only, 2 epochs, a 0.35-wide MobileNetV2 on 32 x 32 inputs)."""
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.finetune import main as finetune_main
    from lightcnn.models import mobilenet_v2
    from lightcnn.preprocess import Preprocessing

    root = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(5)
    for name, level in (("clear", 60), ("opaque", 190)):
        (root / "data" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(level, 50, (36, 36)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i:02d}.png")
    model = mobilenet_v2(width_mult=0.35, num_classes=10, seed=0)
    save_checkpoint(root / "tiny.h5", Checkpoint(
        arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=[f"c{i}" for i in range(10)],
        preprocessing=Preprocessing(size=32, resize="stretch", resize_size=32).to_dict(),
        provenance={"source_file": "random init"}))
    out = root / "run"
    assert finetune_main([str(root / "data"), "--weights", str(root / "tiny.h5"), "--out", str(out), "--quiet",
                          "--cache-dir", str(root / "cache"), "--epochs", "2", "--lr", "0.05", "--bootstrap", "50",
                          "--split", "random", "--fractions", "0.5,0.25,0.25", "--positive", "opaque"]) == 0
    return root, out


def test_finetune_report_json_has_the_points_and_the_run_has_its_plots(run):
    pytest.importorskip("matplotlib", reason='pip install "lightcnn[plot]"')
    _, out = run
    report = json.loads((out / "report.json").read_text())
    for split in ("train", "val", "test"):
        c = report[split]["curves"]["opaque"]
        assert set(c) >= {"thresholds", "fpr", "tpr", "precision", "recall"}
        assert c["auc"] == pytest.approx(report[split]["roc_auc"])
        assert len(c["fpr"]) == len(c["tpr"]) == len(c["thresholds"]) == len(c["precision"]) + 1
    for name in ("roc.png", "pr.png", "confusion.png", "curves.png", "cam_grid.png"):
        w, h, std, _ = png_stats(out / name)
        assert w > 300 and std > 10, name


def test_report_html_is_self_contained_and_says_what_holds(run):
    from lightcnn.weights import sha256_of

    _, out = run
    page = (out / "report.html").read_text()
    assert "<script" not in page.lower()
    sources = re.findall(r"""src=['"]([^'"]+)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing outside the file
    assert not re.search(r"(?:href|src)=['\"](?:https?:|file:|/)", page)
    assert sha256_of(out / "best.h5") in page
    assert "images of one patient may be on both sides of the split" in page  # a random split without groups
    report = json.loads((out / "report.json").read_text())
    assert f"{report['test']['accuracy']:.3f}" in page
    assert "P &ge; " in page and "Operating point" in page  # two classes + positive: the Youden point
    for split, n in report["sizes"].items():
        assert f"<th>{split}</th>" in page
    assert "<td><b>total</b></td>" + "".join(f"<td>{report['sizes'][s]}</td>" for s in ("train", "val", "test")) \
        in page


def test_evaluate_out_writes_plots_cam_grid_and_html(run, tmp_path):
    pytest.importorskip("matplotlib", reason='pip install "lightcnn[plot]"')
    from lightcnn.evaluate import main as evaluate_main

    root, out = run
    target = tmp_path / "eval"
    assert evaluate_main([str(out / "best.h5"), str(root / "data"), "--split", "all", "--out", str(target), "--cam",
                          "--bootstrap", "0", "--json"]) == 0
    report = json.loads((target / "report.json").read_text())
    assert report["images"] == 20 and report["curves"]["opaque"]["auc"] == pytest.approx(report["roc_auc"])
    assert {p.name for p in target.glob("*.png")} == {"roc.png", "pr.png", "confusion.png", "cam_grid.png"}
    grid = np.asarray(Image.open(target / "cam_grid.png").convert("RGB"), dtype=int)
    assert grid.std() > 20  # images and their coloured overlays
    assert "alt='CAM grid'" in (target / "report.html").read_text()


def test_without_matplotlib_the_outputs_stay_and_one_line_says_how(run, tmp_path):
    root, out = run
    target = tmp_path / "plain"
    script = ("import sys; sys.modules['matplotlib'] = None; from lightcnn.evaluate import main; "
              f"sys.exit(main([{str(out / 'best.h5')!r}, {str(root / 'data')!r}, '--split', 'all', '--out', "
              f"{str(target)!r}, '--bootstrap', '0']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "LIGHTCNN_ENGINE": "numpy"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    hints = [line for line in result.stderr.splitlines() if "matplotlib" in line]
    assert hints == ['warning: plots skipped: matplotlib is not installed; pip install "lightcnn[plot]" to get them']
    assert (target / "report.json").is_file() and (target / "report.html").is_file()
    assert not list(target.glob("*.png"))
    assert "data:image" not in (target / "report.html").read_text()


def test_report_html_renders_in_headless_chromium(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium not installed (apt-get install -y chromium): the page is not rendered")
    _, out = run
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    result = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                             "--window-size=1200,2400", (out / "report.html").resolve().as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert rgb.shape[:2] == (2400, 1200)
    assert rgb.std() > 25  # text, tables and plots, not a blank page
    # the plots are drawn: the ROC curve's blue and the CAM overlay's colours are on the page
    blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 80)
    assert blue.mean() > 0.001


def test_tune_writes_convergence_and_objective_for_its_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason='pip install "lightcnn[plot]"')
    from lightcnn.tune import Real, minimize
    from lightcnn.tune.__main__ import _tuning_plots

    space = [Real(1e-4, 1e-1, log=True, name="lr"), Real(0.5, 0.99, name="momentum")]
    results = [minimize(lambda x: (np.log10(x[0]) + 2) ** 2 + x[1], space, n_calls=8, n_initial=5, seed=s)
               for s in (0, 1)]
    _tuning_plots(tmp_path, results, 0)
    for name in ("convergence.png", "objective.png"):
        w, h, std, ink = png_stats(tmp_path / name)
        assert w > 300 and std > 10 and ink > 0.01, name
