"""python -m lightcnn.tune end to end on a small generated dataset: table, logs, resume, best model, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lightcnn.checkpoint import Checkpoint, save_checkpoint
from lightcnn.models import build
from lightcnn.preprocess import Preprocessing

SPACE = "lr=1e-3:1e-1:log, batch=8|16, l2=1e-8:1e-3:log"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two classes a small random network can tell apart: bright vs dark noise images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for cls, level in (("bright", 170), ("dark", 70)):
        (root / cls).mkdir()
        for i in range(20):
            pixels = np.clip(rng.normal(level, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = build("mobilenet_v3_small", seed=1)
    path = tmp_path_factory.mktemp("w") / "tiny.h5"
    prep = Preprocessing(size=64, resize="stretch", resize_size=64)
    save_checkpoint(path, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                                     class_names=[f"c{i}" for i in range(1000)], preprocessing=prep.to_dict()))
    return path


def run_tune(*args):
    return subprocess.run([sys.executable, "-m", "lightcnn.tune", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_tune_run_resume_and_outputs(tmp_path, dataset, weights):
    out = tmp_path / "run"
    common = [dataset, "--weights", weights, "--space", SPACE, "--epochs", "3", "--initial", "2", "--split",
              "random", "--out", out, "--cache-dir", tmp_path / "cache"]
    first = run_tune(*common, "--trials", "4")
    assert first.returncode == 0, first.stderr
    assert "4 trials evaluated (0 replayed" in first.stdout
    table = [line for line in first.stdout.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 5]
    assert len(table) == 4, first.stdout
    log = (out / "run0" / "trials.jsonl").read_text().splitlines()
    assert len(log) == 5  # a settings header + one line per trial
    best = json.loads((out / "best.json").read_text())
    assert set(best["best_params"]) == {"lr", "batch_size", "l2"}
    assert 0.0 <= best["best_val_accuracy"] <= 1.0 and 0.0 <= best["default_val_accuracy"] <= 1.0
    assert best["test"]["accuracy"] is not None and (out / "best" / "best.h5").is_file()

    again = run_tune(*common, "--trials", "4")
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr

    resumed = run_tune(*common, "--trials", "6", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 trials evaluated (4 replayed from the log)" in resumed.stdout
    first_rows = [line for line in first.stdout.splitlines() if line[:5].strip() in {"1", "2", "3", "4"}]
    resumed_rows = [line for line in resumed.stdout.splitlines() if line[:5].strip() in {"1", "2", "3", "4"}]
    assert first_rows[:4] == resumed_rows[:4], "replayed trials must be identical"


def test_fine_tuned_model_predicts(tmp_path, dataset, weights):
    out = tmp_path / "run"
    result = run_tune(dataset, "--weights", weights, "--space", "lr=1e-3:1e-1:log", "--trials", "3", "--initial",
                      "2", "--epochs", "2", "--split", "random", "--out", out)
    assert result.returncode == 0, result.stderr
    predicted = subprocess.run([sys.executable, "-m", "lightcnn.predict", "--weights", out / "best" / "best.h5",
                                dataset / "bright" / "00.png", "--json", "--topk", "2"],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    labels = {t["label"] for t in json.loads(predicted.stdout)["topk"]}
    assert labels == {"bright", "dark"}


@pytest.mark.parametrize("space,message", [("speed=1:2", "not a tunable option"), ("lr=1e-5", "lr"),
                                           ("lr=1e-3:1e-1:log, lr=1e-3:1e-2", "duplicate name 'lr'"),
                                           ("batch=8|16, batch_size=8|32", "twice")])
def test_bad_space_is_a_usage_error(tmp_path, dataset, weights, space, message):
    result = run_tune(dataset, "--weights", weights, "--space", space, "--out", tmp_path / "r")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_config_replays_a_tuning_run(tmp_path, dataset, weights, capsys):
    from lightcnn.tune.__main__ import main as tune_main

    first = tmp_path / "first"
    assert tune_main([str(dataset), "--weights", str(weights), "--space", "lr=1e-3:1e-1:log", "--trials", "2",
                      "--initial", "2", "--epochs", "2", "--split", "random", "--seed", "4", "--out", str(first),
                      "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    saved = json.loads((first / "config.json").read_text())
    assert saved["space"] == "lr=1e-3:1e-1:log" and saved["seed"] == 4 and saved["trials"] == 2

    again = tmp_path / "again"
    assert tune_main(["--config", str(first / "config.json"), "--out", str(again), "--trials", "3", "-q"]) == 0
    replayed = json.loads((again / "config.json").read_text())
    assert replayed == {**saved, "out": str(again), "trials": 3}
    assert len((again / "run0" / "trials.jsonl").read_text().splitlines()) == 4  # header + 3 trials
    capsys.readouterr()
