"""Every command-line tool that writes to stdout ends quietly when its reader goes away (`... | head -1`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_path, shared_path

CLIS = ["lightcnn.predict", "lightcnn.weights", "lightcnn.summary", "lightcnn.evaluate", "lightcnn.finetune",
        "lightcnn.tune", "lightcnn.export_onnx", "lightcnn.serve"]


def run_with_closed_stdout(module, *args):
    """Run `python -m module args` with stdout a pipe whose reading end is closed before anything is written."""
    proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=dict(os.environ))
    proc.stdout.close()  # the reader is gone: every write to stdout now fails with EPIPE
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.wait(timeout=900), stderr


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_enters_through_run_main(module):
    """The behaviour below is tested on a few tools; every tool gets it by starting through lightcnn._cli.run_main."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    path = spec.submodule_search_locations and Path(spec.submodule_search_locations[0]) / "__main__.py"
    source = Path(path or spec.origin).read_text()
    assert 'if __name__ == "__main__":' in source and "run_main(main)" in source and "sys.exit(main())" not in source


@pytest.mark.parametrize("args", [("lightcnn.summary", "mobilenet_v2"), ("lightcnn.weights", "list")],
                         ids=["summary", "weights-list"])
def test_output_into_a_closed_pipe_exits_0_silently(args):
    code, stderr = run_with_closed_stdout(*args)
    # weights list prints where converted files go on stderr before it ends; nothing else may appear there
    assert code == 0 and "Traceback" not in stderr and "Broken pipe" not in stderr and "error" not in stderr, stderr


@pytest.fixture(scope="module")
def cat():
    from lightcnn.errors import CheckpointError
    from lightcnn.weights import find_weights

    try:
        find_weights("mobilenet_v2")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    return require_path(shared_path("LIGHTCNN_DATA", "data") / "smoke-test-images" / "cat.bmp", "smoke-test images")


def test_predict_json_into_a_closed_pipe(cat):
    assert run_with_closed_stdout("lightcnn.predict", cat, "--json") == (0, "")


def test_predict_piped_into_head(cat):
    """The reported case: the second batch of results meets a pipe that head has already closed."""
    images = " ".join([f"'{Path(cat)}'"] * 17)  # BATCH_SIZE 16: two batches, printed and flushed one by one
    result = subprocess.run(["bash", "-c", f"'{sys.executable}' -m lightcnn.predict {images} --json | head -1; "
                                           "echo \"status=${PIPESTATUS[0]}\" >&2"],
                            capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=900)
    assert result.stdout.count("\n") == 1 and '"Egyptian cat"' in result.stdout
    assert result.stderr == "status=0\n", result.stderr
