"""Shared fixtures: a seeded generator and the paths to ../shared (overridable).

Environment variables (each optional):
  LIGHTCNN_SHARED    root of the shared folder (default: <repo>/../shared)
  LIGHTCNN_FIXTURES  reference fixtures (default: $LIGHTCNN_SHARED/fixtures)
  LIGHTCNN_DATA      real images (default: $LIGHTCNN_SHARED/data)
  LIGHTCNN_SOURCES   original checkpoints (default: $LIGHTCNN_SHARED/weights)
Tests that need one of these skip with the path they looked at when it is absent.
"""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


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
