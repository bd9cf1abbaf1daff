"""Shared fixtures: a seeded generator and the paths to ../shared (overridable).

Environment variables (each optional):
  LIGHTCNN_SHARED    root of the shared folder (default: <repo>/../shared)
  LIGHTCNN_FIXTURES  reference fixtures (default: $LIGHTCNN_SHARED/fixtures)
  LIGHTCNN_DATA      real images (default: $LIGHTCNN_SHARED/data)
  LIGHTCNN_SOURCES   original checkpoints (default: $LIGHTCNN_SHARED/weights)
Tests that need one of these skip with the path they looked at when it is absent.

  LIGHTCNN_ENGINE    the inference engine of every test that does not pin its own (default here: numba,
                     the engine the plan tests were written for; LIGHTCNN_ENGINE=numpy runs the suite
                     on the NumPy engine). tests/test_engines.py pins each engine it tests.
"""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("LIGHTCNN_ENGINE", "numba")  # CLI subprocesses inherit it


def _shared_root():
    return Path(os.environ.get("LIGHTCNN_SHARED", REPO.parent / "shared"))


def shared_path(env_name, sub):
    """Resolve a shared folder from its environment variable or the default layout."""
    value = os.environ.get(env_name)
    return Path(value) if value else _shared_root() / sub


def require_path(path, what):
    """Skip the calling test with a clear reason when `path` does not exist."""
    path = Path(path)
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set the environment variable to point at it)")
    return path


def torchvision_model(arch, fixtures_dir):
    """(model with the torchvision fixture's weights, its recorded inputs/logits npz); skips if absent."""
    from lightcnn.checkpoint import load_state
    from lightcnn.models import build
    from lightcnn.weights import convert_file

    folder = fixtures_dir / "torchvision"
    if not (folder / f"{arch}.pth").exists():
        pytest.skip(f"torchvision fixture {arch}.pth not found in {folder}")
    ck = convert_file(folder / f"{arch}.pth", arch)
    model = build(arch, **ck.config)
    load_state(model, ck.tensors)
    return model, np.load(folder / f"{arch}_io.npz")


def save_tiny_mobilenet(path):
    """A random-weight MobileNetV2 (width 0.35, 10 classes, 32x32 input) saved as a lightcnn .h5: fast runs."""
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.models import build
    from lightcnn.preprocess import Preprocessing

    model = build("mobilenet_v2", width_mult=0.35, num_classes=10, seed=0)
    save_checkpoint(path, Checkpoint(
        arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=[f"c{i}" for i in range(10)],
        preprocessing=Preprocessing(size=32, resize="shorter", resize_size=36).to_dict(),
        provenance={"source_file": "random init"}))
    return path


@pytest.fixture(scope="session")
def v2_weights(session_weights):
    """The registry's mobilenet_v2 .h5 built for this session (skips when its source is absent)."""
    from lightcnn.errors import CheckpointError
    from lightcnn.weights import find_weights

    try:
        return find_weights("mobilenet_v2")
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def rng():
    """A fresh seeded generator per test: results never depend on test order."""
    return np.random.default_rng(20261122)


@pytest.fixture(scope="session")
def fixtures_dir():
    return require_path(shared_path("LIGHTCNN_FIXTURES", "fixtures"), "reference fixtures (LIGHTCNN_FIXTURES)")


@pytest.fixture(scope="session")
def data_dir():
    return require_path(shared_path("LIGHTCNN_DATA", "data"), "shared images (LIGHTCNN_DATA)")


@pytest.fixture(scope="session")
def sources_dir():
    return require_path(shared_path("LIGHTCNN_SOURCES", "weights"), "original checkpoints (LIGHTCNN_SOURCES)")


@pytest.fixture(scope="session", autouse=True)
def session_weights(tmp_path_factory):
    """Convert the registry's locally available checkpoints once per session into a temporary folder.

    LIGHTCNN_WEIGHTS points there for the whole session (CLI subprocesses inherit it), so the tests never
    depend on what a developer happens to have built in weights/, and a clean clone with ../shared beside it
    exercises the real weights. Without the original checkpoints nothing is built and those tests skip.
    """
    sources = shared_path("LIGHTCNN_SOURCES", "weights")
    if not sources.is_dir():
        yield None
        return
    from lightcnn.errors import LightCNNError
    from lightcnn.registry import WEIGHTS
    from lightcnn.weights import build_one, find_source

    out = tmp_path_factory.mktemp("session-weights")
    saved = {k: os.environ.get(k) for k in ("LIGHTCNN_SOURCES", "LIGHTCNN_WEIGHTS")}
    os.environ["LIGHTCNN_SOURCES"] = str(sources)
    try:
        for spec in WEIGHTS:
            if find_source(spec.filename, spec.sha256) is not None:
                try:
                    build_one(spec, out_dir=out)
                except LightCNNError as exc:  # a broken original is a test failure elsewhere, not a crash here
                    print(f"conftest: could not build {spec.name}: {exc}")
        os.environ["LIGHTCNN_WEIGHTS"] = str(out)
        yield out
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
