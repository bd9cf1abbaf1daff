"""The finetune and evaluate command lines end to end on a tiny generated image folder and a tiny network."""

import csv
import json
import re

import numpy as np
import pytest

from PIL import Image

import lightcnn
from lightcnn.checkpoint import read_checkpoint
from lightcnn.evaluate import main as evaluate_main
from lightcnn.finetune import main as finetune_main
from lightcnn.metrics import METRIC_NAMES
from tests.conftest import save_tiny_mobilenet

CLASSES = ("blobs", "stripes")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """DATA/<class>/*.png (14 grey stripes and 14 blob images, 28x32) and a tiny MobileNetV2 .h5 (32x32 input)."""
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :32]
    for name in CLASSES:
        (root / "data" / name).mkdir(parents=True)
        for i in range(14):
            if name == "stripes":
                img = 128 + 100 * np.sin(rng.uniform(0.4, 0.9) * (xx if i % 2 else yy) + rng.uniform(0, 6))
            else:
                img = np.full((28, 32), 60.0)
                for _ in range(2):
                    cy, cx, r = rng.uniform(6, 22), rng.uniform(6, 26), rng.uniform(3, 6)
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 220
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "data" / name / f"{i:02d}.png")
    save_tiny_mobilenet(root / "tiny.h5")
    return root


def _run(workspace, out, *extra):
    return finetune_main([str(workspace / "data"), "--weights", str(workspace / "tiny.h5"), "--out", str(out),
                          "--cache-dir", str(workspace / "cache"), "--bootstrap", "200", "--quiet", *extra])


def test_finetune_writes_config_metrics_model_and_report(workspace, capsys):
    out = workspace / "run_head"
    assert _run(workspace, out, "--epochs", "4", "--positive", "stripes", "--augment", "seed002", "--views", "2",
                "--patience", "10") == 0
    assert capsys.readouterr().out.strip() == str(out / "report.json")
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "head" and config["views"] == 2 and config["train"]["epochs"] == 4

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert {"lr", "loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc", "seconds"} <= set(rows[0])

    report = json.loads((out / "report.json").read_text())
    for split in ("train", "val", "test"):
        for key in METRIC_NAMES:
            assert key in report[split], f"{split}: {key} missing"
            lo, hi = report[split]["confidence_intervals"][key]
            if report[split][key] is not None and lo is not None:
                assert lo <= report[split][key] + 1e-9 and report[split][key] <= hi + 1e-9
        cm = np.array(report[split]["confusion_matrix"])
        assert cm.shape == (2, 2) and cm.sum() == report["sizes"][split]
    assert report["positive"] == "stripes" and report["split"]["method"] == "random"
    assert "GROUP" in report["split"]["warnings"][0]  # the folder has no patient ids: said loudly

    # best.h5 is a complete model: class names, preprocessing and the new head travel with it
    clf = lightcnn.load(str(out / "best.h5"))
    assert clf.class_names == list(CLASSES) and clf.preprocessing.size == 32
    assert clf.model.config["head"] == {"hidden": [], "dropout": 0.2, "hidden_dropout": 0.0}
    assert clf.checkpoint.extra["metrics"]["test"]["accuracy"] == report["test"]["accuracy"]
    top = clf.topk(str(workspace / "data" / "stripes" / "00.png"), k=2)[0]
    assert {p.label for p in top} == set(CLASSES)


def test_evaluate_prints_the_same_test_report(workspace, capsys):
    out = workspace / "run_eval"
    assert _run(workspace, out, "--epochs", "3", "--mode", "last-k", "--unfreeze", "1", "--head", "dense",
                "--hidden", "8", "--optimizer", "sgd", "--lr", "0.01", "--l2", "1e-4", "--lr-decay", "0.8",
                "--lr-decay-every", "1", "--loss", "weighted-ce") == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert evaluate_main([str(out / "best.h5"), str(workspace / "data"), "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    for key in METRIC_NAMES:
        assert key in text
    assert "confusion matrix" in text and "macro avg" in text
    line = next(t for t in text.splitlines() if t.startswith("accuracy"))
    assert float(line.split()[1]) == pytest.approx(report["test"]["accuracy"], abs=1e-4)
    assert evaluate_main([str(out / "best.h5"), str(workspace / "data"), "--json", "--split", "val",
                          "--bootstrap", "0"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"] == report["sizes"]["val"] and data["accuracy"] == pytest.approx(report["val"]["accuracy"])


def test_nan_loss_exits_1_with_one_line_and_keeps_last_good_checkpoint(workspace, capsys):
    out = workspace / "run_nan"
    # epochs 1-2 at lr 1e-3, then the step schedule multiplies the rate by 1e38: the loss overflows
    code = _run(workspace, out, "--epochs", "6", "--optimizer", "sgd", "--momentum", "0", "--lr", "0.001",
                "--lr-decay", "1e38", "--lr-decay-every", "2")
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and err.startswith("error: ") and "became" in err, err
    failed_epoch = int(re.search(r"at epoch (\d+)", err).group(1))
    assert failed_epoch >= 3  # epochs 1-2 ran at a sane rate
    state = read_checkpoint(out / "last.h5")
    assert state.extra["state"]["epoch"] == failed_epoch - 1
    assert all(np.all(np.isfinite(v)) for v in state.tensors.values())
    # the guard names what to try, and the best model of the sane epochs is kept as best.h5
    assert "try a lower --lr or --clip-grad-norm" in err and "best model so far" in err
    best = read_checkpoint(out / "best.h5")
    assert best.extra["best_epoch"] < failed_epoch and "became" in best.extra["stopped"]
    assert all(np.all(np.isfinite(v)) for v in best.tensors.values())


def test_usage_and_option_errors(workspace, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune_main([str(workspace / "data"), "--model", "mobilenet_v2"])  # no --out
    assert exc.value.code == 2
    capsys.readouterr()
    assert _run(workspace, workspace / "bad1", "--views", "2") == 1  # views without augmentation
    assert capsys.readouterr().err.startswith("error: --views N needs an augmentation")
    assert _run(workspace, workspace / "bad2", "--augment", "{\"nope\": {}}", "--views", "1") == 1
    assert "unknown augmentation" in capsys.readouterr().err
    assert _run(workspace, workspace / "bad3", "--positive", "cats") == 1
    assert "not a class" in capsys.readouterr().err


def test_resume_refuses_other_options_and_existing_runs(workspace, capsys):
    out = workspace / "run_resume"
    assert _run(workspace, out, "--epochs", "2") == 0
    assert _run(workspace, out, "--epochs", "2") == 1
    assert "already holds a run" in capsys.readouterr().err
    assert _run(workspace, out, "--epochs", "2", "--lr", "0.1", "--resume") == 1
    assert "train.lr" in capsys.readouterr().err
    # more epochs on resume continue from the saved state
    assert _run(workspace, out, "--epochs", "3", "--resume") == 0
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 3


def test_kfold_reports_mean_and_std(workspace, capsys):
    out = workspace / "run_kfold"
    assert _run(workspace, out, "--epochs", "2", "--kfold", "3", "--bootstrap", "0") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["k"] == 3 and len(report["folds"]) == 3
    assert set(METRIC_NAMES) <= set(report["kfold"]) and report["kfold"]["accuracy"]["n"] == 3
    assert np.array(report["kfold"]["confusion_matrix"]).sum() == 28  # every image is tested exactly once


def test_operating_point_is_chosen_on_val_stored_and_used_by_evaluate_and_predict(workspace, capsys):
    from lightcnn.metrics import youden_threshold
    from lightcnn.predict import main as predict_main

    out = workspace / "run_op"
    assert _run(workspace, out, "--epochs", "3", "--positive", "stripes") == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    op = report["operating_point"]
    assert op["class"] == "stripes" and 0.0 <= op["threshold"] <= 1.0
    # the threshold is a function of the validation split alone: recompute it from best.h5's val scores
    clf = lightcnn.load(str(out / "best.h5"))
    assert clf.checkpoint.extra["operating_point"] == op and clf.operating_point == ("stripes", op["threshold"])
    from lightcnn.data import discover, split_dataset

    ds = discover(str(workspace / "data"))
    with pytest.warns(UserWarning, match="GROUP"):
        parts = split_dataset(ds, "random", (0.8, 0.1, 0.1), 0)
    scores = clf.predict([str(ds.items[i].path) for i in parts.val])[:, CLASSES.index("stripes")]
    assert youden_threshold(ds.labels[parts.val], scores, CLASSES.index("stripes")) == pytest.approx(
        op["threshold"], abs=1e-6)
    at = report["at_operating_point"]["test"]
    assert at["threshold"] == op["threshold"] and sum(map(sum, at["confusion_matrix"])) == report["sizes"]["test"]

    assert evaluate_main([str(out / "best.h5"), str(workspace / "data"), "--json", "--bootstrap", "0"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["at_operating_point"]["confusion_matrix"] == at["confusion_matrix"]
    assert evaluate_main([str(out / "best.h5"), str(workspace / "data"), "--json", "--bootstrap", "0",
                          "--threshold", "1.0"]) == 0
    forced = json.loads(capsys.readouterr().out)["at_operating_point"]
    # a higher threshold can only call fewer images positive
    assert forced["threshold"] == 1.0
    assert np.array(forced["confusion_matrix"])[:, 1].sum() <= np.array(at["confusion_matrix"])[:, 1].sum()
    with pytest.raises(SystemExit) as usage:
        evaluate_main([str(out / "best.h5"), str(workspace / "data"), "--threshold", "1.5"])
    assert usage.value.code == 2

    image = str(workspace / "data" / "stripes" / "00.png")
    assert predict_main(["--weights", str(out / "best.h5"), image, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    p_stripes = next(p["score"] for p in record["topk"] if p["label"] == "stripes")
    expected = "stripes" if p_stripes >= op["threshold"] else "blobs"
    assert record["decision"] == {"label": expected, "positive": "stripes", "threshold": op["threshold"]}
    assert predict_main(["--weights", str(out / "best.h5"), image]) == 0
    text = capsys.readouterr().out
    assert f"decision  {expected}" in text
    assert not re.search(r"stripes\s+stripes|blobs\s+blobs", text)  # a class without an ID is printed once


def test_config_replays_a_run_and_the_command_line_overrides_it(workspace, capsys):
    first = workspace / "replay_a"
    assert _run(workspace, first, "--epochs", "2", "--lr", "0.01", "--positive", "stripes", "--head", "dense",
                "--hidden", "8,4", "--split", "random", "--seed", "3") == 0
    saved = json.loads((first / "config.json").read_text())

    again = workspace / "replay_b"
    assert finetune_main(["--config", str(first / "config.json"), "--out", str(again), "--quiet"]) == 0
    replayed = json.loads((again / "config.json").read_text())
    assert replayed == {**saved, "out": str(again)}
    assert (again / "best.h5").is_file()

    changed = workspace / "replay_c"
    assert finetune_main(["--config", str(first / "config.json"), "--out", str(changed), "--epochs", "1",
                          "--weights", str(workspace / "tiny.h5"), "--quiet"]) == 0
    override = json.loads((changed / "config.json").read_text())
    assert override["train"]["epochs"] == 1 and override["train"]["lr"] == 0.01
    assert override["train"]["hidden"] == [8, 4] and override["positive"] == "stripes"
    capsys.readouterr()


def test_config_file_that_cannot_be_read_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune_main(["--config", str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "missing.json" in capsys.readouterr().err
