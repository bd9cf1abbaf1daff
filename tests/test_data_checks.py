"""Training data sanity (issue 13): refused before any feature is computed, tiny splits reported as null,
the best model kept after a divergence, stale temporaries removed. Tiny generated images in tmp_path."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lightcnn.api import load
from lightcnn.checkpoint import Checkpoint, save_checkpoint
from lightcnn.data import DataCheckError, check_training_data, discover
from lightcnn.errors import TrainingError
from lightcnn.metrics import bootstrap_ci, classification_report
from lightcnn.models import build
from lightcnn.preprocess import Preprocessing
from lightcnn.train.run import finetune
from tests.conftest import REPO


def _images(folder, counts, seed=0):
    """folder/<class>/<i>.png, distinct random 12x12 images; returns {class: [paths]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i in range(n):
            p = folder / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(p)
            out[name].append(p)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    m = build("squeezenet1_1", num_classes=2, seed=0)
    path = tmp_path_factory.mktemp("w") / "tiny.h5"
    return save_checkpoint(path, Checkpoint(arch=m.arch, config=m.config, tensors=m.state_dict(),
                                            class_names=["x", "y"],
                                            preprocessing=Preprocessing(size=32, resize_size=36).to_dict()))


def _run(tmp_path, weights, data, **options):
    config = dict(data=str(data), weights=str(weights), out=str(tmp_path / "run"), n_bootstrap=50,
                  cache_dir=str(tmp_path / "cache"), train={"epochs": 2, "batch_size": 4})
    config.update(options)
    return finetune(config, progress=None)


def _refused(tmp_path, weights, data, *fragments, **options):
    with pytest.raises(DataCheckError) as info:
        _run(tmp_path, weights, data, **options)
    text = " | ".join(info.value.problems)
    for fragment in fragments:
        assert fragment in text, text
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))  # nothing computed
    return info.value.problems


def test_a_single_class_folder_is_refused(tmp_path, weights):
    _images(tmp_path / "data", {"only": 30})
    _refused(tmp_path, weights, tmp_path / "data", "1 class (only); fine-tuning needs at least two")


def test_a_class_too_small_for_the_split_is_refused(tmp_path, weights):
    _images(tmp_path / "data", {"a": 20, "b": 2})
    _refused(tmp_path, weights, tmp_path / "data", "class 'b' has 2 images; the split needs at least 3 per class")


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "split"])
        w.writerows(rows)
    return path


def test_a_split_without_a_class_in_validation_is_refused(tmp_path, weights):
    files = _images(tmp_path / "data", {"a": 5, "b": 5})
    rows = [(f"{c}/{i}.png", c, "train" if i < 3 else ("val" if c == "a" else "test")) for c in files for i in range(5)]
    csv_path = _csv(tmp_path / "split.csv", rows)
    _refused(tmp_path, weights, tmp_path / "data", "the validation split has no image of class 'b'",
             csv=str(csv_path), split="official")


def test_the_same_file_under_two_labels_is_refused(tmp_path, weights):
    files = _images(tmp_path / "data", {"a": 10, "b": 10})
    files["b"][3].write_bytes(files["a"][4].read_bytes())
    problems = _refused(tmp_path, weights, tmp_path / "data", "1 image appear under two class labels (same SHA-256)")
    assert len(problems) == 1


def test_the_same_file_across_splits_is_a_leak_warning(tmp_path):
    files = _images(tmp_path / "data", {"a": 4, "b": 4})
    files["a"][3].write_bytes(files["a"][0].read_bytes())
    ds = discover(tmp_path / "data")
    train, val, test = np.array([0, 1, 4, 5]), np.array([2, 6]), np.array([3, 7])
    notes = check_training_data(ds, [(train, val, test)], need=3)
    assert len(notes) == 1 and notes[0].startswith("data leak: 1 image appear in more than one split")


def test_each_fold_is_checked(tmp_path):
    _images(tmp_path / "data", {"a": 4, "b": 4})
    ds = discover(tmp_path / "data")
    good = (np.array([0, 1, 4, 5]), np.array([2, 6]), np.array([3, 7]))
    bad = (np.array([0, 1, 2, 3, 4]), np.array([5, 6]), np.array([7]))  # no 'a' in validation
    with pytest.raises(DataCheckError) as info:
        check_training_data(ds, [good, bad], need=2)
    assert info.value.problems == [f"{tmp_path / 'data'}: the validation split of fold 2 has no image of class 'a'"]


def test_bootstrap_on_one_sample_is_null_not_a_crash():
    assert all(np.isnan(v) for v in bootstrap_ci(lambda y, p: float(np.mean(y == p)), [1], [1]))
    report = classification_report(np.array([0]), np.array([[0.9, 0.1]]), ["a", "b"], positive="b")
    assert report["accuracy"] == 1.0 and report["confidence_intervals"]["accuracy"] == [None, None]


def test_a_one_image_test_split_finishes_with_null_intervals(tmp_path, weights):
    files = _images(tmp_path / "data", {"a": 5, "b": 5})
    split = {0: "train", 1: "train", 2: "train", 3: "val", 4: "test"}
    rows = [(f"{c}/{i}.png", c, split[i] if c == "a" or i != 4 else "train") for c in files for i in range(5)]
    result = _run(tmp_path, weights, tmp_path / "data", csv=str(_csv(tmp_path / "s.csv", rows)), split="official")
    test = json.loads((tmp_path / "run" / "report.json").read_text())["test"]
    assert result.report["sizes"]["test"] == 1 and test["accuracy"] in (0.0, 1.0)
    assert test["confidence_intervals"]["accuracy"] == [None, None] and test["roc_auc"] is None
    assert (tmp_path / "run" / "best.h5").exists()


def test_a_divergence_keeps_the_best_model_so_far(tmp_path, weights):
    _images(tmp_path / "data", {"a": 10, "b": 10})

    def diverge(state, row):
        if state.epoch == 2:
            raise TrainingError("loss became nan at epoch 3, batch 1 (lr 0.001); training stopped, last good "
                                "checkpoint kept")

    config = dict(data=str(tmp_path / "data"), weights=str(weights), out=str(tmp_path / "run"), n_bootstrap=0,
                  cache_dir=str(tmp_path / "cache"), train={"epochs": 5, "batch_size": 4})
    with pytest.raises(TrainingError, match=r"best model so far \(epoch [12]\) is in .*best\.h5"):
        finetune(config, progress=None, on_epoch_end=diverge)
    best = tmp_path / "run" / "best.h5"
    clf = load(str(best), engine="numpy")
    assert clf.class_names == ["a", "b"] and "loss became nan" in clf.checkpoint.extra["stopped"]
    assert (tmp_path / "run" / "last.h5").exists() and not (tmp_path / "run" / "report.json").exists()


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, weights):
    _images(tmp_path / "data", {"a": 10, "b": 10})
    run = tmp_path / "run"
    (run / "fold1").mkdir(parents=True)
    stale = [run / "last.h5.k3j_x9a2.tmp", run / "report.json.abcdefgh.tmp", run / "fold1" / "best.h5.q1w2e3r4.tmp"]
    for p in stale:
        p.write_bytes(b"half written")
    keep = run / "notes.tmp"
    keep.write_text("mine")
    _run(tmp_path, weights, tmp_path / "data")
    assert not any(p.exists() for p in stale) and keep.exists()
    assert not list(run.glob("*.*.tmp"))


def test_finetune_cli_prints_one_line_per_problem_and_exits_2(tmp_path, weights):
    _images(tmp_path / "data", {"a": 20, "b": 2, "c": 1})
    env = dict(os.environ, LIGHTCNN_ENGINE="numpy")
    result = subprocess.run([sys.executable, "-m", "lightcnn.finetune", str(tmp_path / "data"), "--weights",
                             str(weights), "--out", str(tmp_path / "run"), "--epochs", "1"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any("class 'b' has 2 images" in e for e in errors) and any("class 'c' has 1 image;" in e for e in errors)
    assert not (tmp_path / "run" / "best.h5").exists()


def test_tune_refuses_the_same_data_with_exit_2(tmp_path, weights, capsys):
    from lightcnn.tune.__main__ import main

    _images(tmp_path / "data", {"only": 12})
    status = main([str(tmp_path / "data"), "--weights", str(weights), "--out", str(tmp_path / "tune"),
                   "--space", "lr=1e-3:1e-1:log", "--trials", "2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "fine-tuning needs at least two" in errors[0]
