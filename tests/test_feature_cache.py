"""The feature cache never uses a bad entry: truncated, corrupt, mis-shaped, non-finite, computed for another
key or with values that do not match its checksum. Each is recomputed with one warning line."""

import numpy as np
import pytest
from PIL import Image

from lightcnn.models import build
from lightcnn.preprocess import Preprocessing
from lightcnn.train import features as feat

PREP = Preprocessing(size=32, resize_size=36)


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    model = build("squeezenet1_1", num_classes=2, seed=3)
    model.engine = "numpy"
    cache = tmp_path / "cache"
    stats = {}
    first = feat.extract_features(model, paths, PREP, cache, stats=stats)
    assert stats["computed"] == 3 and stats["cached"] == 0
    entries = {p: next((cache).rglob(f"{feat.item_key(p, 0)[:40]}.npz")) for p in paths}
    return model, paths, cache, first, entries


def _again(setup, capsys):
    model, paths, cache, first, _ = setup
    stats = {}
    capsys.readouterr()
    again = feat.extract_features(model, paths, PREP, cache, stats=stats)
    np.testing.assert_allclose(again, first, rtol=1e-4, atol=1e-5)  # a recomputed entry: another batch size
    return stats, capsys.readouterr().err


def test_sound_entries_are_used(setup, capsys):
    stats, err = _again(setup, capsys)
    assert stats["cached"] == 3 and stats["computed"] == 0 and "warning" not in err


def _truncate(entry, entries, paths):
    entry.write_bytes(entry.read_bytes()[:100])


def _flip(entry, entries, paths):
    data = bytearray(entry.read_bytes())
    data[len(data) // 3] ^= 0x04  # inside the stored array: the zip CRC no longer matches
    entry.write_bytes(bytes(data))


def _wrong_shape(entry, entries, paths):
    with np.load(entry) as f:
        key = str(f["key"])
    feat._save_npz(entry, np.zeros(7, np.float32), key)  # well-formed, valid checksum, wrong shape


def _wrong_values(entry, entries, paths):
    with np.load(entry) as f:
        x, key, sha = f["x"] + 1, f["key"], f["sha256"]
    np.savez(entry.with_suffix(""), x=x, key=key, sha256=sha)  # right shape, right key, values changed


def _other_key(entry, entries, paths):
    entry.write_bytes(entries[paths[1]].read_bytes())  # another image's sound entry under this name


def _non_finite(entry, entries, paths):
    with np.load(entry) as f:
        key, x = str(f["key"]), f["x"].copy()
    x[0] = np.nan
    feat._save_npz(entry, x, key)


def _old_format(entry, entries, paths):
    with np.load(entry) as f:
        x = f["x"]
    np.savez(entry.with_suffix(""), x=x)


@pytest.mark.parametrize("damage", [_truncate, _flip, _wrong_shape, _wrong_values, _other_key, _non_finite,
                                    _old_format])
def test_a_bad_entry_is_recomputed_with_one_warning(setup, capsys, damage):
    _, paths, _, _, entries = setup
    damage(entries[paths[0]], entries, paths)
    stats, err = _again(setup, capsys)
    assert stats["computed"] == 1 and stats["cached"] == 2 and stats["unusable"] == 1
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "1 unusable entry recomputed" in lines[0] and str(entries[paths[0]]) in lines[0]
    stats, err = _again(setup, capsys)  # the entry was rewritten: sound again
    assert stats["cached"] == 3 and "warning" not in err
