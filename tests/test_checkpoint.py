"""The HDF5 format: round trip, strict loading, atomic writes, and one-line errors for broken files."""

import os

import h5py
import numpy as np
import pytest

from lightcnn.api import model_from_checkpoint
from lightcnn.checkpoint import (FORMAT_VERSION, Checkpoint, atomic_write_text, load_state, read_checkpoint,
                                 save_checkpoint)
from lightcnn.errors import CheckpointError
from lightcnn.models import build
from lightcnn.preprocess import TORCHVISION


@pytest.fixture
def small_ckpt():
    model = build("squeezenet1_1", num_classes=3, seed=4)
    return model, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                             class_names=["a", "b", "c"], class_ids=["id_a", "id_b", "id_c"],
                             preprocessing=TORCHVISION.to_dict(), provenance={"source_file": "x.pth"})


def test_round_trip_is_exact_and_self_describing(tmp_path, small_ckpt):
    model, ckpt = small_ckpt
    path = save_checkpoint(tmp_path / "m.h5", ckpt)
    back = read_checkpoint(path)
    assert back.arch == "squeezenet1_1" and back.config == model.config
    assert back.class_names == ["a", "b", "c"] and back.class_ids == ["id_a", "id_b", "id_c"]
    assert back.preprocessing == TORCHVISION.to_dict()
    assert back.provenance["source_file"] == "x.pth" and "lightcnn_version" in back.provenance
    assert set(back.tensors) == set(ckpt.tensors)
    for name, value in ckpt.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], value)
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert "tensors/features/fire2/squeeze/conv/weight" in f  # dotted name -> HDF5 path
    rebuilt = model_from_checkpoint(back)
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt.forward(x), model.forward(x))


def test_missing_tensor_is_named(tmp_path, small_ckpt):
    model, ckpt = small_ckpt
    del ckpt.tensors["features.fire4.expand3x3.conv.weight"]
    with pytest.raises(CheckpointError, match=r"m\.h5.*'features\.fire4\.expand3x3\.conv\.weight' missing"):
        load_state(build("squeezenet1_1", num_classes=3), ckpt.tensors, str(tmp_path / "m.h5"))


def test_wrong_shape_names_tensor_and_both_shapes(small_ckpt):
    _, ckpt = small_ckpt
    ckpt.tensors["head.classifier.conv.bias"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointError, match=r"src\.h5: tensor 'head\.classifier\.conv\.bias' has shape \(5,\), "
                                              r"squeezenet1_1 expects \(3,\)"):
        load_state(build("squeezenet1_1", num_classes=3), ckpt.tensors, "src.h5")


def test_unexpected_tensor_and_nan_are_refused(small_ckpt):
    _, ckpt = small_ckpt
    extra = dict(ckpt.tensors, **{"features.fire10.weight": np.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'features.fire10.weight'"):
        load_state(build("squeezenet1_1", num_classes=3), extra, "f.h5")
    bad = dict(ckpt.tensors)
    bad["features.conv1.conv.bias"] = np.full(64, np.nan, np.float32)
    with pytest.raises(CheckpointError, match="NaN"):
        load_state(build("squeezenet1_1", num_classes=3), bad, "f.h5")


def test_wrong_architecture_for_file(tmp_path, small_ckpt):
    _, ckpt = small_ckpt
    # 1.0 and 1.1 share tensor names, so the first mismatch is a shape
    with pytest.raises(CheckpointError, match=r"'features\.conv1\.conv\.weight' has shape \(3, 3, 3, 64\), "
                                              r"squeezenet1_0 expects \(7, 7, 3, 96\)"):
        load_state(build("squeezenet1_0", num_classes=3), ckpt.tensors, "f.h5")
    with pytest.raises(CheckpointError, match=r"missing \(and \d+ more\); does the file hold a mobilenet_v3_small"):
        load_state(build("mobilenet_v3_small"), ckpt.tensors, "f.h5")


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "not_lightcnn", "directory", "missing"])
def test_broken_files_give_one_line_errors(tmp_path, small_ckpt, damage):
    _, ckpt = small_ckpt
    good = save_checkpoint(tmp_path / "good.h5", ckpt)
    path = tmp_path / "bad.h5"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    elif damage == "not_lightcnn":
        with h5py.File(path, "w") as f:
            f["x"] = np.zeros(3)
    elif damage == "directory":
        path.mkdir()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "bad.h5" in message and "\n" not in message


def test_newer_format_version_is_refused(tmp_path, small_ckpt):
    _, ckpt = small_ckpt
    path = save_checkpoint(tmp_path / "m.h5", ckpt)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointError, match="newer than this lightcnn reads"):
        read_checkpoint(path)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, small_ckpt, monkeypatch):
    _, ckpt = small_ckpt
    path = save_checkpoint(tmp_path / "m.h5", ckpt)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    ckpt.class_names = ["x", "y", "z"]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, ckpt)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"], "temporary file left behind"
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "log.json", "{}")
    assert not (tmp_path / "log.json").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, small_ckpt, umask, mode):
    """Converted weights and reports are ordinary files: 0666 minus the umask, like open(path, "w") gives."""
    import stat

    from lightcnn.checkpoint import atomic_write_bytes

    _, ckpt = small_ckpt
    saved = os.umask(umask)
    try:
        h5 = save_checkpoint(tmp_path / "m.h5", ckpt)
        raw = tmp_path / "w.bin"
        atomic_write_bytes(raw, b"bytes")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(saved)
    assert stat.S_IMODE(plain.stat().st_mode) == mode  # what the umask gives any file, the reference
    assert stat.S_IMODE(h5.stat().st_mode) == mode
    assert stat.S_IMODE(raw.stat().st_mode) == mode
