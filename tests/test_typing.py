"""The public API's type hints hold: mypy (basic mode, settings in pyproject.toml) passes on the public modules."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

PUBLIC = ["lightcnn/__init__.py", "lightcnn/api.py", "lightcnn/registry.py", "lightcnn/tune/__init__.py",
          "lightcnn/tune/space.py", "lightcnn/tune/runner.py", "lightcnn/layers/basic.py",
          "lightcnn/kernels/conv.py", "lightcnn/kernels/depthwise.py", "lightcnn/kernels/linear.py",
          "lightcnn/kernels/norm.py", "lightcnn/kernels/pool.py", "lightcnn/kernels/activation.py",
          "lightcnn/kernels/transpose.py"]


def test_public_modules_type_check():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[typecheck]')")
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                           "--cache-dir", str(REPO / ".mypy_cache"), *PUBLIC], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_says_it_is_typed():
    assert (REPO / "lightcnn" / "py.typed").is_file()
    assert '"py.typed"' in (REPO / "pyproject.toml").read_text()


def test_signatures_carry_hints():
    import inspect

    import lightcnn
    from lightcnn.api import Classifier
    from lightcnn.layers.basic import Conv2d
    from lightcnn.tune import Real, minimize

    for fn in (lightcnn.load, lightcnn.list_models, Classifier.pooled, Classifier.reset_head, minimize,
               Real.__init__, Conv2d.__init__, Conv2d.forward):
        hints = inspect.signature(fn)
        assert hints.return_annotation is not inspect.Signature.empty, fn
        assert all(p.annotation is not inspect.Parameter.empty for name, p in hints.parameters.items()
                   if name != "self"), fn
