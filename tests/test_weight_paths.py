"""Where weights are written and found: the platform's user cache for an installed copy, never the current folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, require_path, shared_path

FIND = "from lightcnn.weights import find_weights, weight_dirs; print(find_weights('mobilenet_v2')); print(weight_dirs())"


def _installed_copy(tmp_path):
    """The package alone, as a non-editable install has it (no checkout, no weights/ beside it)."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "lightcnn", site / "lightcnn", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _env(site, cache):
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTCNN_WEIGHTS", "LIGHTCNN_CACHE", "PYTHONPATH")}
    return dict(env, PYTHONPATH=str(site), XDG_CACHE_HOME=str(cache), LIGHTCNN_ENGINE="numpy")


def test_an_installed_copy_builds_into_and_finds_in_the_user_cache(tmp_path):
    sources = require_path(shared_path("LIGHTCNN_SOURCES", "weights"), "original checkpoints (LIGHTCNN_SOURCES)")
    site, cache = _installed_copy(tmp_path), tmp_path / "xdg-cache"
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):  # a weights/ folder in the current directory must not matter
        (folder / "weights").mkdir(parents=True)
        (folder / "weights" / "README.md").write_text("not lightcnn's\n")
        (folder / "weights" / "mobilenet_v2.h5").write_bytes(b"not a weight file")
    env = _env(site, cache)
    built = subprocess.run([sys.executable, "-m", "lightcnn.weights", "build", "mobilenet_v2"], cwd=one,
                           env=dict(env, LIGHTCNN_SOURCES=str(sources)), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    expected = cache / "lightcnn" / "weights" / "mobilenet_v2.h5"
    assert expected.is_file() and f"wrote {expected}" in built.stderr

    found = subprocess.run([sys.executable, "-c", FIND], cwd=two, env=env, capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[0] == str(expected)

    listing = subprocess.run([sys.executable, "-m", "lightcnn.weights", "list"], cwd=two, env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert f"  {cache / 'lightcnn' / 'weights'}" in listing.stdout.splitlines()
    assert f"  {cache / 'lightcnn' / 'sources'}" in listing.stdout.splitlines()
    row = next(line for line in listing.stdout.splitlines() if line.startswith("mobilenet_v2 "))
    assert row.split()[3] == "yes"


def test_order_lightcnn_weights_first_then_the_cache(tmp_path):
    site, cache = _installed_copy(tmp_path), tmp_path / "xdg-cache"
    mine = tmp_path / "mine"
    code = "from lightcnn.weights import weight_dirs, cache_dir; print(*weight_dirs(), sep='\\n'); print(cache_dir())"
    env = _env(site, cache)
    plain = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plain.stdout.split() == [str(cache / "lightcnn" / "weights"), str(cache / "lightcnn")]
    moved = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, LIGHTCNN_WEIGHTS=str(mine)),
                           capture_output=True, text=True)
    assert moved.stdout.split() == [str(mine), str(cache / "lightcnn" / "weights"), str(cache / "lightcnn")]


def test_a_source_checkout_keeps_its_weights_folder(monkeypatch):
    from lightcnn import weights

    monkeypatch.delenv("LIGHTCNN_WEIGHTS", raising=False)
    assert weights.checkout_weights_dir() == REPO / "weights"  # this test runs from the checkout
    assert weights.weight_dirs()[0] == REPO / "weights"
    assert Path(weights.weight_dirs()[-1]).name == "weights"
