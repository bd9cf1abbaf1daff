"""python -m lightcnn.tune beyond head-only trials (issue 12): last-k / full trials sharing the frozen part's cache,
the searched split point, the median stopping rule, the time budget and exact resume with stopped trials."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from lightcnn.tune import Categorical, MedianStopping, Real, minimize
from lightcnn.tune.__main__ import CurveObjective, _stopper
from lightcnn.tune.__main__ import main as tune_main
from lightcnn.tune.trial_log import TrialLog
from tests.test_finetune_cli import workspace  # noqa: F401  (28 tiny images, a width-0.35 MobileNetV2 at 32 px)


def _tune(workspace, out, *extra):
    return tune_main([str(workspace / "data"), "--weights", str(workspace / "tiny.h5"), "--split", "random",
                      "--optimizer", "sgd", "--out", str(out), "-q", *extra])


def _log(out, run=0):
    """[(x, y, extra fields)] of RUN_DIR/run<r>/trials.jsonl."""
    log = TrialLog(out / f"run{run}" / "trials.jsonl")
    _, trials = log.read()
    return [(x, y, extra) for (x, y, _), extra in zip(trials, log.extras())]


def test_last_k_trials_read_the_boundary_cache_the_first_one_wrote(workspace, tmp_path):  # noqa: F811
    """Three last-k trials (--unfreeze 2, median rule off): the first computes the prefix output of every train
    and val image, the others compute none and read all of them; each trial trains the same parameters, logs a
    curve of one value per epoch, and its y is minus the best of that curve."""
    out = tmp_path / "run"
    assert _tune(workspace, out, "--mode", "last-k", "--unfreeze", "2", "--space", "lr=1e-3:1e-1:log",
                 "--trials", "3", "--initial", "3", "--epochs", "2", "--median-stop", "off", "--no-refit",
                 "--cache-dir", str(tmp_path / "cache")) == 0
    rows = _log(out)
    assert len(rows) == 3
    n = rows[0][2]["features"]["computed"]
    assert n > 0 and rows[0][2]["features"]["cached"] == 0
    for _, y, extra in rows[1:]:
        assert extra["features"] == {"computed": 0, "cached": n}
    for _, y, extra in rows:
        assert extra["unfreeze"] == 2 and len(extra["curve"]) == 2 and "stopped" not in extra
        assert y == -max(extra["curve"])
    assert len({extra["trained_parameters"] for _, _, extra in rows}) == 1
    best = json.loads((out / "best.json").read_text())
    assert best["mode"] == "last-k" and best["final_model"] is None and not (out / "best").exists()
    assert best["best_val_accuracy"] == max(-y for _, y, _ in rows)


def test_searched_unfreeze_depth_changes_what_trains(workspace, tmp_path):  # noqa: F811
    """unfreeze=1|3 in --space: each trial trains the split point it was given (more blocks, more trained
    parameters), the cache is computed once per split point and read by the later trials at that point, and the
    refit fine-tunes the winning depth."""
    out = tmp_path / "run"
    assert _tune(workspace, out, "--mode", "last-k", "--space", "unfreeze=1|3, lr=1e-3:1e-2:log", "--trials", "4",
                 "--initial", "4", "--epochs", "1", "--median-stop", "off", "--bootstrap", "0",
                 "--cache-dir", str(tmp_path / "cache")) == 0
    rows = _log(out)
    depths = [x[0] for x, _, _ in rows]
    assert set(depths) == {1, 3}, depths
    trained = {}
    for x, _, extra in rows:
        assert extra["unfreeze"] == x[0]
        trained.setdefault(x[0], set()).add(extra["trained_parameters"])
    assert len(trained[1]) == len(trained[3]) == 1 and trained[3].pop() > trained[1].pop()
    for i, (x, _, extra) in enumerate(rows):
        first_at_depth = x[0] not in depths[:i]
        assert (extra["features"]["computed"] > 0) == first_at_depth
        assert (extra["features"]["cached"] > 0) == (not first_at_depth)
    best = json.loads((out / "best.json").read_text())
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["mode"] == "last-k" and config["unfreeze"] == best["best_params"]["unfreeze"]
    assert config["resolved"]["unfreeze"]["unfreeze"] == best["best_params"]["unfreeze"]


def _fake_training(epochs=4, ran=None):
    """A trial whose validation accuracy after epoch e is lr * (e + 1) / epochs: a worse lr is worse at every
    epoch. `ran` collects (lr, epochs actually run)."""
    def train(settings, on_epoch, info):
        lr, curve = settings["lr"], []
        info["note"] = "fake"
        try:
            for e in range(epochs):
                curve.append(lr * (e + 1) / epochs)
                on_epoch(curve[-1], last=e == epochs - 1)
        finally:
            if ran is not None:
                ran.append((lr, len(curve)))
        return max(curve)
    return train


def test_median_rule_stops_a_clearly_worse_trial():
    """A first trial at lr 0.1 runs to the end (no earlier trials); after trials at lr 0.9 / 0.8 / 0.85, lr 0.1
    is below the median of the four earlier best-so-far values at epoch 2 (0.4125) and stops there (min_epochs
    2) with its best so far; lr 0.95 runs all four epochs."""
    ran = []
    objective = CurveObjective(["lr"], _fake_training(ran=ran), MedianStopping(min_epochs=2, min_trials=3), None)
    assert objective([0.1]) == pytest.approx(-0.1)  # no earlier trials: runs to the end
    assert objective.last == {"curve": pytest.approx([0.025, 0.05, 0.075, 0.1]), "note": "fake"}
    for lr in (0.9, 0.8, 0.85):
        objective([lr])
    assert objective([0.1]) == pytest.approx(-0.05)
    assert objective.last["stopped"] == 2 and objective.last["curve"] == pytest.approx([0.025, 0.05])
    assert objective.last["note"] == "fake"  # what the trial logged before it was stopped is kept
    assert objective([0.95]) == pytest.approx(-0.95) and "stopped" not in objective.last
    assert ran == [(0.1, 4), (0.9, 4), (0.8, 4), (0.85, 4), (0.1, 2), (0.95, 4)]
    assert objective.stopped == 1

    rule = MedianStopping(min_epochs=1, min_trials=2)
    rule.add([0.5, 0.6])
    rule.add([0.7])  # a stopped trial counts for the epochs it ran
    assert rule.median_at(0) == pytest.approx(0.6) and rule.median_at(1) is None
    assert rule.should_stop([0.59]) and not rule.should_stop([0.6]) and not rule.should_stop([0.1, 0.2])


def _search(tmp_path, n_calls, resume):
    """minimize over the fake trials with the CLI's stopper (rebuilt from the log on resume), as the CLI runs."""
    log_path = tmp_path / "trials.jsonl"
    args = SimpleNamespace(median_stop="on", epochs=4, resume=resume)
    objective = CurveObjective(["lr", "batch_size"], _fake_training(), _stopper(args, log_path), None)
    minimize(objective, [Real(0.05, 1.0, log=True, name="lr"), Categorical([8, 16], name="batch")],
             n_calls=n_calls, n_initial=4, seed=3, log_path=log_path, resume=resume, log_extra=objective.log_extra)
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in log_path.read_text().splitlines()[1:]]


def test_resume_with_stopped_trials_replays_exactly(tmp_path):
    """Ten trials in one go, and four then six more after a resume: the same points, values, curves and stop
    decisions (the stopper is rebuilt from the logged curves); some trials were stopped."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _search(tmp_path / "a", 10, False)
    _search(tmp_path / "b", 4, False)
    resumed = _search(tmp_path / "b", 10, True)
    assert resumed == whole
    assert any("stopped" in t for t in whole) and any("stopped" not in t for t in whole[4:])


def test_last_k_resume_replays_the_trials_and_the_stop_decisions(workspace, tmp_path, capsys):  # noqa: F811
    """Real last-k trials with the median rule on: 6 trials in one go, and 3 then --resume to 6, log the same
    points, values, curves and stops (only the cache counts differ: the second search found the cache warm)."""
    common = ["--mode", "last-k", "--unfreeze", "1", "--space", "lr=1e-4:3e-1:log, batch=4|8", "--initial", "3",
              "--epochs", "3", "--no-refit", "--cache-dir", str(tmp_path / "cache")]
    assert _tune(workspace, tmp_path / "whole", *common, "--trials", "6") == 0
    assert _tune(workspace, tmp_path / "part", *common, "--trials", "3") == 0
    assert _tune(workspace, tmp_path / "part", *common, "--trials", "6", "--resume") == 0
    assert "3 trials evaluated (3 replayed from the log)" in capsys.readouterr().out

    def kept(out):
        return [(x, y, {k: v for k, v in extra.items() if k != "features"}) for x, y, extra in _log(out)]

    assert kept(tmp_path / "part") == kept(tmp_path / "whole")
    assert all(len(extra["curve"]) == extra.get("stopped", 3) for _, _, extra in kept(tmp_path / "whole"))
    assert any("stopped" in extra for _, _, extra in kept(tmp_path / "whole"))  # the rule did act


def test_budget_starts_no_trial_after_it(workspace, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--budget 0.01 (0.6 s) with head trials that take 0.25 s each, 20 trials x 2 runs asked: every logged trial
    started before the budget ran out, the search stopped after the first that ended beyond it, the second run
    never started, one line says so, and best.json holds the best trial so far (no refit with --no-refit)."""
    import lightcnn.train.heads as heads

    def slow_trial(features, labels, config, num_classes, threads=None):
        time.sleep(0.25)
        return config["lr"], 0.25, None  # "accuracy" = lr: the best trial is the largest lr

    monkeypatch.setattr(heads, "head_trial", slow_trial)
    out = tmp_path / "run"
    assert _tune(workspace, out, "--space", "lr=0.01:0.99", "--trials", "20", "--initial", "20", "--runs", "2",
                 "--epochs", "1", "--budget", "0.01", "--no-refit", "--cache-dir", str(tmp_path / "cache")) == 0
    stdout = capsys.readouterr().out
    rows = _log(out)
    seconds = [json.loads(line)["seconds"] for line in (out / "run0" / "trials.jsonl").read_text().splitlines()[1:]]
    assert 1 <= len(rows) < 20 and sum(seconds[:-1]) < 0.6  # each trial started with budget left
    assert not (out / "run1").exists()
    lines = [line for line in stdout.splitlines() if line.startswith("budget of 0.01 min reached")]
    assert len(lines) == 1 and f"after {len(rows)} trial" in lines[0] and "no refit" in lines[0]
    best = json.loads((out / "best.json").read_text())
    assert best["budget_reached"] is True and best["final_model"] is None
    assert best["best_val_accuracy"] == pytest.approx(max(x[0] for x, _, _ in rows))


@pytest.mark.parametrize("extra,message", [
    (["--mode", "last-k", "--dask", "local:1"], "--dask runs head-mode trials"),
    (["--space", "unfreeze=1:3"], "unfreeze in --space needs --mode last-k"),
    (["--mode", "last-k", "--freeze-first", "3", "--space", "unfreeze=1:3"], "give one"),
    (["--kfold", "3"], "--kfold"),
    (["--arch", "covid_squeezenet"], "use mode 'full'"),
    (["--unfreeze", "0", "--mode", "last-k"], "--unfreeze"),
])
def test_combinations_that_cannot_tune_are_usage_errors(workspace, tmp_path, capsys, extra, message):  # noqa: F811
    argv = [str(workspace / "data"), "--out", str(tmp_path / "r"), "-q"]
    if "--arch" not in extra:
        argv += ["--weights", str(workspace / "tiny.h5")]
    if "--space" not in extra:
        argv += ["--space", "lr=1e-3:1e-1:log"]
    with pytest.raises(SystemExit) as exc:
        tune_main(argv + extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_full_mode_tunes_covid_squeezenet_from_scratch(tmp_path):
    """--arch covid_squeezenet --mode full (seed 001) at 64 px on 16 grey images: every layer trains (the trained
    parameter count is the whole network's), the cache holds the images (computed once, then read), and the
    momentum / L2 of each trial are the ones logged."""
    from PIL import Image

    from lightcnn.models import build

    rng = np.random.default_rng(0)
    for cls, level in (("a", 170), ("b", 70)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.clip(rng.normal(level, 30, (40, 40)), 0, 255).astype(np.uint8)).save(
                tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "run"
    assert tune_main([str(tmp_path / "data"), "--arch", "covid_squeezenet", "--mode", "full", "--input-size", "64",
                      "--space", "lr=1e-4:1e-2:log, momentum=0.5:0.99, l2=1e-10:1e-3:log", "--trials", "2",
                      "--initial", "2", "--epochs", "1", "--batch-size", "8", "--split", "random", "--no-refit",
                      "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    rows = _log(out)
    whole = build("covid_squeezenet").count_params()
    assert [extra["unfreeze"] for _, _, extra in rows] == ["all", "all"]
    assert all(extra["trained_parameters"] == whole for _, _, extra in rows)
    assert rows[0][2]["features"]["computed"] > 0 and rows[1][2]["features"]["computed"] == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["mode"] == "full" and saved["arch"] == "covid_squeezenet"
    assert saved["finetune_args"] == ["--input-size", "64", "--batch-size", "8"]


def test_threads_apply_to_trials_run_here(workspace, tmp_path, monkeypatch):  # noqa: F811
    """--threads N without --dask sets this process's kernel threads (it used to be read only with --dask)."""
    import lightcnn._jit

    asked = []
    monkeypatch.setattr(lightcnn._jit, "set_num_threads", asked.append)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert _tune(workspace, tmp_path / "r", "--space", "lr=1e-3:1e-1:log", "--trials", "1", "--initial", "1",
                 "--epochs", "1", "--no-refit", "--threads", "1") == 0
    assert asked == [1]
    import os

    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_refit_epochs_lengthen_only_the_final_run(workspace, tmp_path):  # noqa: F811
    """Trials of --epochs 1, then a refit of --refit-epochs 3 (seed 001: short trials, one long final run); the
    setting is kept in config.json, so --config replays it."""
    out = tmp_path / "r"
    assert _tune(workspace, out, "--space", "lr=1e-3:1e-1:log", "--trials", "2", "--initial", "2", "--epochs", "1",
                 "--refit-epochs", "3") == 0
    rows = (out / "best" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["refit_epochs"] == 3


def test_refit_epochs_and_searched_epochs_conflict(workspace, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exc:
        _tune(workspace, tmp_path / "r", "--space", "lr=1e-3:1e-1:log, epochs=1:3", "--refit-epochs", "3")
    assert exc.value.code == 2 and "--refit-epochs" in capsys.readouterr().err
