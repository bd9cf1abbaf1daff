"""`python -m lightcnn.summary NAME [--profile]`: the per-layer table, checked against published model sizes.

Parameter counts are torchvision's (`sum(p.numel() for p in model.parameters())`), which the architectures with
torchvision weights must reproduce exactly; MACs are checked against the papers' multiply-add counts (1 %).
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

ROW = re.compile(r"^(\S+)\s+(\([\d, ]*\))\s+([\d,]+)\s+([\d,]+)(?:\s+(\d+\.\d+))?$")
TOTAL = re.compile(r"^total\s+([\d,]+)\s+([\d,]+)(?:\s+(\d+\.\d+))?$")


def run_summary(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lightcnn.summary", *map(str, args)], capture_output=True,
                          cwd=REPO, timeout=600, env={**os.environ, **(env or {})})


def parse(stdout):
    """-> (rows [(name, shape tuple, params, macs, ms or None)], (total params, total macs, total ms or None))."""
    rows, total = [], None
    for line in stdout.decode().splitlines():
        m = ROW.match(line)
        if m:
            name, shape, params, macs, ms = m.groups()
            rows.append((name, tuple(int(v) for v in shape.strip("(),").split(",") if v.strip()),
                         int(params.replace(",", "")), int(macs.replace(",", "")), None if ms is None else float(ms)))
            continue
        m = TOTAL.match(line)
        if m:
            total = (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")),
                     None if m.group(3) is None else float(m.group(3)))
    return rows, total


def summarise(*args):
    result = run_summary(*args)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    rows, total = parse(result.stdout)
    assert rows and total is not None, result.stdout.decode()
    return rows, total


@pytest.mark.parametrize("name,params,mmacs", [
    ("mobilenet_v2_torchvision", 3_504_872, 300),      # Sandler et al. 2018, table 4: 3.4M params, 300M MAdds
    ("mobilenet_v3_large", 5_483_032, 217),            # Howard et al. 2019, table 3: 5.4M, 219M
    ("mobilenet_v3_small_torchvision", 2_542_856, 56),  # table 4: 2.5M, 56M (SE counted as in the paper)
    ("squeezenet1_1", 1_235_496, 349),                 # torchvision docs: 0.35 GFLOPS
])
def test_registered_names_match_published_sizes(name, params, mmacs):
    rows, (total_params, total_macs, total_ms) = summarise(name)
    assert total_params == params
    assert sum(r[2] for r in rows) == total_params            # each parameter is reported by exactly one row
    assert sum(r[3] for r in rows) == total_macs
    assert abs(total_macs / 1e6 - mmacs) <= 0.01 * mmacs + 2, total_macs
    assert total_ms is None and all(r[4] is None for r in rows)
    assert rows[-1][1] == (1000,)


def test_weight_name_uses_the_weights_config_and_needs_no_weight_file(tmp_path):
    env = {"LIGHTCNN_WEIGHTS": str(tmp_path), "LIGHTCNN_CACHE": str(tmp_path)}  # no .h5 anywhere
    """mobilenet_v2 is both a weight name and an architecture: the TFLite weights' config (batch norm folded
    into conv biases, TF padding) wins; and the .h5 file is not needed for the table."""
    env_free = run_summary("mobilenet_v2", env=env)
    rows, (total_params, total_macs, _) = parse(env_free.stdout)
    assert env_free.returncode == 0, env_free.stderr.decode()
    # torchvision's count, with each batch norm's gamma + beta (2 per channel) replaced by a conv bias (1)
    assert total_params == 3_504_872 - 17_056
    names = [r[0] for r in rows]
    assert names[:4] == ["features.stem", "features.blocks.0.dw", "features.blocks.0.project",
                         "features.blocks.1.expand"]
    shapes = dict((r[0], r[1]) for r in rows)
    assert shapes["features.stem"] == (112, 112, 32)
    assert shapes["features.blocks.16.project"] == (7, 7, 320)
    assert shapes["features.last"] == (7, 7, 1280)
    assert abs(total_macs - 300_774_272) <= 0.001 * total_macs


def test_architecture_name_without_weights_and_input_size():
    rows, (total_params, _, _) = summarise("covid_squeezenet")   # an architecture with no registered weights
    from lightcnn.models import build

    assert total_params == build("covid_squeezenet").count_params()
    shapes = dict((r[0], r[1]) for r in rows)
    assert shapes["features.fuse"] == (56, 56, 128)               # seed 001: 227x227x1 -> 56x56 fused maps
    rows, _ = summarise("mobilenet_v3_small_torchvision", "--input-size", "160")
    assert dict((r[0], r[1]) for r in rows)["features.last"] == (5, 5, 576)


def test_h5_path_shows_the_model_it_holds(tmp_path):
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.models import build

    model = build("squeezenet1_1", num_classes=1000)
    model.reset_head(7, hidden=(32,), dropout=0.0)
    path = tmp_path / "tuned.h5"
    save_checkpoint(path, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                                     class_names=[f"c{i}" for i in range(7)]))
    rows, (total_params, _, _) = summarise(path)
    by_name = {r[0]: r for r in rows}
    assert by_name["head.classifier"][1] == (7,) and by_name["head.classifier"][2] == 32 * 7 + 7
    assert by_name["head.dense0"][2] == 512 * 32 + 32
    assert total_params == model.count_params()


def test_profile_adds_measured_milliseconds():
    rows, (_, _, total_ms) = summarise("squeezenet1_1", "--profile", "--repeats", "2")
    ms = np.array([r[4] for r in rows])
    assert np.all(ms >= 0) and ms.max() > 0
    assert total_ms == pytest.approx(ms.sum(), abs=0.001 * len(rows) + 0.01)
    # the convolutions dominate; the pools and the head are cheap
    conv = sum(r[4] for r in rows if r[3] > 0)
    assert conv > 0.5 * total_ms


def test_errors():
    result = run_summary("no_such_model")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "no_such_model" in err and "mobilenet_v2" in err and "Traceback" not in err
    result = run_summary("--profile")
    assert result.returncode == 2


def test_corrupt_h5_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    result = run_summary(bad)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in lines[0]
