"""recipes/*.json (issue 12): one configuration per paper, replayed by `finetune --config` / `tune --config`.

Each recipe runs end to end here on the 28 tiny images of test_finetune_cli's workspace, with the options that
name the real data and weights overridden on the command line (as the README shows for other data): what is
tested is that every setting of the file is a valid option of the command it names, that the file's values
reach the run (its config.json), and that the run completes. Misspelt settings in a --config file are errors.
"""

import json
from pathlib import Path

import pytest

from lightcnn.finetune import main as finetune_main
from lightcnn.tune.__main__ import main as tune_main
from tests.test_finetune_cli import workspace  # noqa: F401  (28 tiny images, a width-0.35 MobileNetV2 at 32 px)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))
ABOUT = ("paper", "command", "as_written", "changed", "paper_result")


def _read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_is_a_recipe_per_paper():
    assert [p.name[:7] for p in RECIPES if p.name.startswith("seed")] == ["seed000", "seed001", "seed002", "seed003"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_says_where_it_comes_from_and_how_to_run_it(path):
    recipe = _read(path)
    assert set(ABOUT) <= set(recipe["about"]), f"{path.name}: 'about' needs {ABOUT}"
    tool = "tune" if "space" in recipe else "finetune"
    assert f"python -m lightcnn.{tool} --config recipes/{path.name}" in recipe["about"]["command"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_replays_end_to_end(path, workspace, tmp_path):  # noqa: F811
    recipe = _read(path)
    out = tmp_path / "run"
    small = ["--config", str(path), str(workspace / "data"), "--split", "random", "--positive", "stripes",
             "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "-q"]
    if "arch" in recipe:  # seed 001's network from scratch, at 64 px instead of 227 to stay fast
        small += ["--input-size", "64", "--batch-size", "8"]
    else:  # the tiny MobileNetV2 in place of the recipe's ImageNet weights, at its own 32 px
        small += ["--weights", str(workspace / "tiny.h5"), "--input-size", "32"]
    if "space" in recipe:
        assert tune_main(small + ["--trials", "2", "--initial", "2", "--runs", "1", "--epochs", "1",
                                  "--no-refit"]) == 0
        saved = _read(out / "config.json")
        assert saved["space"] == recipe["space"] and saved["mode"] == recipe["mode"]
        for option in recipe["finetune_args"][::2]:  # the recipe's fixed options reach every trial
            assert option in saved["finetune_args"]
        assert len((out / "run0" / "trials.jsonl").read_text().splitlines()) >= 2
    else:
        assert finetune_main(small + ["--epochs", "1", "--bootstrap", "0"]) == 0
        saved = _read(out / "config.json")
        for key in ("mode", "bn", "augment", "resize"):
            if key in recipe:
                expected = recipe[key]
                if key == "augment":
                    from lightcnn.train.features import augment_config

                    expected = augment_config(expected)
                assert saved[key] == expected, key
        for key, value in recipe["train"].items():
            if key not in ("epochs", "batch_size"):
                assert saved["train"][key] == value, key
        assert (out / "best.h5").exists() and (out / "report.json").exists()


@pytest.mark.parametrize("command", ["finetune", "tune"])
def test_a_misspelt_setting_in_a_config_file_is_an_error(command, workspace, tmp_path, capsys):  # noqa: F811
    settings = {"data": str(workspace / "data"), "weights": str(workspace / "tiny.h5"), "learning_rate": 0.1}
    if command == "tune":
        settings["space"] = "lr=1e-3:1e-1:log"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(settings))
    main = finetune_main if command == "finetune" else tune_main
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(path), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) 'learning_rate'" in err and str(path) in err
    assert not (tmp_path / "r").exists()
