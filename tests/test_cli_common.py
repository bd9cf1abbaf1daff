"""What every command shares: the `lightcnn` command and `python -m lightcnn`, --version, -q/-v, help texts."""

import argparse
import importlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import lightcnn
from lightcnn.__main__ import COMMANDS
from lightcnn.__main__ import main as lightcnn_main

MODULES = [module for name, (module, _) in COMMANDS.items() if name != "serve"]


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_top_command_version():
    done = _run("-m", "lightcnn", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"lightcnn {lightcnn.__version__}"


@pytest.mark.parametrize("module", MODULES)
def test_every_command_prints_the_version(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:  # argparse's version action exits; some mains turn it into 0
        code = main(["--version"])
        raise SystemExit(code)
    assert exc.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"lightcnn {lightcnn.__version__}"


def test_subcommand_dispatch_equals_the_module():
    via_top = _run("-m", "lightcnn", "summary", "mobilenet_v2")
    via_module = _run("-m", "lightcnn.summary", "mobilenet_v2")
    assert via_top.returncode == via_module.returncode == 0, via_top.stderr
    assert via_top.stdout == via_module.stdout and "mobilenet_v2" in via_top.stdout


def test_unknown_and_missing_commands_exit_2(capsys):
    assert lightcnn_main(["sumary", "mobilenet_v2"]) == 2
    assert "did you mean 'summary'" in capsys.readouterr().err
    try:
        importlib.import_module("lightcnn.serve")
    except ModuleNotFoundError:
        assert lightcnn_main(["serve"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "serve" in err


def _parsers(parser, path):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


@pytest.mark.parametrize("module", MODULES)
def test_every_option_has_help_text(module):
    parser = importlib.import_module(module).build_parser()
    missing = []
    for path, p in _parsers(parser, module):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            names = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {names}")
        options = {s for a in p._actions for s in a.option_strings}
        assert {"--version", "-q", "--quiet", "-v", "--verbose"} <= options, path
    assert not missing, f"options without help: {missing}"


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.models import mobilenet_v2
    from lightcnn.preprocess import Preprocessing

    root = tmp_path_factory.mktemp("quiet")
    model = mobilenet_v2(width_mult=0.35, num_classes=3, seed=0)
    save_checkpoint(root / "tiny.h5", Checkpoint(
        arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=["a", "b", "c"],
        preprocessing=Preprocessing(size=32, resize="shorter", resize_size=36).to_dict()))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(25):  # more than predict's PROGRESS_MIN_IMAGES
        path = root / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return root / "tiny.h5", paths


@pytest.mark.parametrize("flag", [None, "-q", "--quiet", "-v"])
def test_quiet_silences_progress(tiny_images, flag, capsys):
    from lightcnn.predict import main as predict_main

    weights, paths = tiny_images
    argv = [*paths, "--weights", str(weights), "--engine", "numpy", "--topk", "1"] + ([flag] if flag else [])
    assert predict_main(argv) == 0
    captured = capsys.readouterr()
    assert len([line for line in captured.out.splitlines() if line.strip()]) >= 25  # results are never silenced
    if flag in ("-q", "--quiet"):
        assert captured.err == ""
    else:
        assert "predict: 25/25 images" in captured.err
        assert (f"weights {weights}: mobilenet_v2" in captured.err) == (flag == "-v")  # a detail only with -v


def test_quiet_before_the_subcommand_reaches_it():
    loud = _run("-m", "lightcnn", "summary", "mobilenet_v2")
    quiet = _run("-m", "lightcnn", "-q", "summary", "mobilenet_v2")
    assert "# registered weights 'mobilenet_v2'" in loud.stderr
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout


def test_compile_hint_is_given_once_per_model_name(capsys, monkeypatch):
    """A long job on the auto engine's NumPy fallback gets the one-line compile hint; later long jobs of the same
    model in the process (a tuning run's validation fill after its training fill) do not repeat it, another
    model's do, short jobs and other engines never get it."""
    from types import SimpleNamespace

    from lightcnn import _cli

    monkeypatch.setattr(_cli, "_HINTED", set())
    monkeypatch.setattr(_cli, "_level", _cli.NORMAL)
    fallback = SimpleNamespace(engine="auto", last_engine="numpy")
    _cli.engine_note(fallback, _cli.LONG_JOB, "mobilenet_v2")  # not long
    _cli.engine_note(SimpleNamespace(engine="numpy", last_engine="numpy"), 500, "mobilenet_v2")
    _cli.engine_note(SimpleNamespace(engine="auto", last_engine="numba"), 500, "mobilenet_v2")
    assert capsys.readouterr().err == ""
    _cli.engine_note(fallback, 2125, "mobilenet_v2")
    _cli.engine_note(fallback, 118, "mobilenet_v2")
    _cli.engine_note(fallback, 500, "squeezenet1_1")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "lightcnn.compile mobilenet_v2" in lines[0] and "squeezenet1_1" in lines[1], lines
