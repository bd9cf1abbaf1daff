"""Hostile and degenerate inputs (issue 13): every weight file and image either works or gets one line.

Images: FIFOs and devices are refused unread, reads stop at a byte cap, sides and aspect ratios are bounded
from the header, file names with control characters stay one line, and in `predict` a bad image never stops
the good one of the same call.

The .pth files here are hand-assembled pickles (no torch needed) that each break one rule the reader must
enforce: views past or around their storage, zero-stride expansion bombs, zip members larger, smaller or more
compressed than declared, pickles that try to modify the reader's allow-listed stand-ins. Each must raise one
line naming the file, use bounded memory, and leave nothing behind that changes how the next file is read.
"""

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from lightcnn import preprocess
from lightcnn._files import printable
from lightcnn.convert.deep_compression import read_deep_compression
from lightcnn.convert.keras_h5 import read_keras_h5
from lightcnn.convert.pth import read_pth
from lightcnn.convert.tflite import read_tflite
from lightcnn.errors import CheckpointError, ImageError, UnsafePickleError
from lightcnn.preprocess import TORCHVISION, load_image, preprocess_image
from tests.conftest import REPO

# --------------------------------------------------------------------------- hand-built pickles


def _glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _obj(value):
    """One value's protocol-2 opcodes (PROTO and STOP stripped) to splice into a hand-built pickle."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _pid(storage_class, key, numel, view=None):
    parts = [_obj("storage"), _glob("torch", storage_class), _obj(key), _obj("cpu"), _obj(numel)]
    if view is not None:
        parts.append(_obj(view))
    return b"(" + b"".join(parts) + b"tQ"  # MARK ... TUPLE, then BINPERSID


def _state_dict(tensors, prelude=b""):
    """OrderedDict of name -> _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()).

    tensors: (name, storage_class, key, numel, offset, size, stride[, view]) rows; `prelude` runs first.
    """
    out = [b"\x80\x02", prelude, _glob("collections", "OrderedDict"), b")R"]
    for name, storage_class, key, numel, offset, size, stride, *view in tensors:
        out += [_obj(name), _glob("torch._utils", "_rebuild_tensor_v2"), b"(",
                _pid(storage_class, key, numel, view[0] if view else None),
                _obj(offset), _obj(tuple(size)), _obj(tuple(stride)), _obj(False),
                _glob("collections", "OrderedDict"), b")RtRs"]
    return b"".join(out) + b"."


def _poison(global_module, global_name, attribute, value):
    """Opcodes that BUILD `attribute = value` onto an allow-listed global, then drop it from the stack."""
    return (_glob(global_module, global_name) + b"N}" + _obj(attribute) + _obj(value) + b"s\x86b0")


def _write_zip(path, pickled, members, deflate=()):
    """A torch-style zip; members in `deflate` are deflated, streamed in 1 MiB chunks (so 1 GiB costs no RAM)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        for key, data in members.items():
            info = zipfile.ZipInfo(f"archive/data/{key}")
            if key in deflate:
                info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                if isinstance(data, int):  # that many zero bytes
                    chunk = bytes(1 << 20)
                    for start in range(0, data, len(chunk)):
                        f.write(chunk[:min(len(chunk), data - start)])
                else:
                    f.write(data)
    return path


def _write_legacy(path, pickled, storages):
    """Legacy stream: magic, protocol, sys_info, state_dict, sorted keys, then each (int64 count, bytes)."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))
    body = b"".join(np.int64(len(raw) // 4).tobytes() + raw for _, raw in sorted(storages.items()))
    path.write_bytes(head + pickled + pickle.dumps(sorted(storages), protocol=2) + body)
    return path


FOUR = np.arange(4, dtype="<f4").tobytes()


def _view(size, stride, offset=0, numel=4):
    return _state_dict([("w", "FloatStorage", "0", numel, offset, size, stride)])


# name -> (builder(tmp_path) -> path, expected fragment of the one-line message)
HOSTILE = {
    "zero_stride_20000x20000": (lambda d: _write_zip(d / "a.pth", _view((20000, 20000), (0, 0)), {"0": FOUR}),
                                "over the limit of 268435456"),
    "zero_stride_3000x3000": (lambda d: _write_zip(d / "a.pth", _view((3000, 3000), (0, 0)), {"0": FOUR}),
                              "expansion bomb"),
    "overlapping_strides": (lambda d: _write_zip(d / "a.pth", _view((5000, 5000), (1, 1), numel=5000),
                                                 {"0": bytes(20000)}), "expansion bomb"),
    "offset_past_end": (lambda d: _write_zip(d / "a.pth", _view((4,), (1,), offset=10), {"0": FOUR}),
                        "reads past its storage of 4 elements"),
    "view_past_end": (lambda d: _write_zip(d / "a.pth", _view((2, 3), (3, 1)), {"0": FOUR}),
                      "reads past its storage"),
    "negative_size": (lambda d: _write_zip(d / "a.pth", _view((-1, 4), (4, 1)), {"0": FOUR}), "negative size"),
    "negative_stride": (lambda d: _write_zip(d / "a.pth", _view((4,), (-1,), offset=3), {"0": FOUR}),
                        "negative size, stride or offset"),
    "size_stride_mismatch": (lambda d: _write_zip(d / "a.pth", _view((2, 2), (1,)), {"0": FOUR}),
                             "malformed view"),
    "member_larger_than_declared": (lambda d: _write_zip(d / "a.pth", _view((4,), (1,)), {"0": bytes(400)}),
                                    "is 400 bytes in the archive, its declared size is 16"),
    "truncated_member": (lambda d: _write_zip(d / "a.pth", _view((4,), (1,)), {"0": FOUR[:8]}),
                         "is 8 bytes in the archive, its declared size is 16"),
    "missing_member": (lambda d: _write_zip(d / "a.pth", _view((4,), (1,)), {}), "has no member"),
    "huge_declared_numel": (lambda d: _write_zip(d / "a.pth", _view((4,), (1,), numel=10 ** 30), {"0": FOUR}),
                            "is 16 bytes in the archive"),
    # 64 MiB of deflated zeros (64 KiB in the file) declared as a 4-float storage: refused before inflating.
    "zip_bomb_small_declared": (lambda d: _write_zip(d / "a.pth", _view((4,), (1,)), {"0": 64 << 20}, {"0"}),
                                "is 67108864 bytes in the archive, its declared size is 16"),
    # The same member honestly declared as 16 M floats: over 16x the archive's size + 1 MiB.
    "zip_bomb_honest_declared": (lambda d: _write_zip(d / "a.pth", _view((4,), (1,), numel=16 << 20),
                                                      {"0": 64 << 20}, {"0"}), "a zip bomb?"),
    "legacy_zero_stride": (lambda d: _write_legacy(d / "a.pth", _view((20000, 20000), (0, 0)), {"0": FOUR}),
                           "over the limit"),
    "legacy_bad_view_offset": (lambda d: _write_legacy(d / "a.pth", _state_dict(
        [("w", "FloatStorage", "0", 4, 0, (2,), (1,), ("v", -2, 2))]), {"0": FOUR}), "bad offset or size"),
}

# Pickles that try to change the reader's allow-listed stand-ins (before the fix this changed the next file).
POISONED = {
    "storage_name": _poison("torch", "FloatStorage", "name", "BFloat16Storage"),
    "storage_dtype": _poison("torch", "FloatStorage", "dtype", "garbage"),
    "rebuild_function": _poison("torch._utils", "_rebuild_tensor_v2", "_fn", None),
}


def _one_line_naming(err, path, fragment):
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert fragment in msg, msg


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pth_gives_one_line(case, tmp_path):
    build, fragment = HOSTILE[case]
    path = build(tmp_path)
    with pytest.raises(CheckpointError) as err:
        read_pth(path)
    _one_line_naming(err, path, fragment)


def test_the_builders_make_readable_files_when_the_geometry_is_sane(tmp_path):
    """Control: the hand-built containers are valid, so the failures above come from the geometry alone."""
    storage = np.arange(12, dtype="<f4")
    path = _write_zip(tmp_path / "ok.pth", _view((3, 2), (1, 3), offset=1, numel=12), {"0": storage.tobytes()})
    np.testing.assert_array_equal(read_pth(path)["w"], [[1, 4], [2, 5], [3, 6]])  # a transposed window
    legacy = _write_legacy(tmp_path / "ok_legacy.pth", _view((2, 2), (0, 1)), {"0": FOUR})
    np.testing.assert_array_equal(read_pth(legacy)["w"], [[0, 1], [0, 1]])  # a small stride-0 expansion is fine
    deflated = _write_zip(tmp_path / "ok_deflated.pth", _view((4,), (1,)), {"0": FOUR}, {"0"})
    np.testing.assert_array_equal(read_pth(deflated)["w"], [0, 1, 2, 3])


@pytest.mark.parametrize("case", sorted(POISONED))
def test_pickles_that_modify_the_allow_list_are_refused(case, tmp_path):
    pickled = _state_dict([("w", "FloatStorage", "0", 4, 0, (4,), (1,))], prelude=POISONED[case])
    path = _write_zip(tmp_path / f"poison_{case}.pth", pickled, {"0": FOUR})
    with pytest.raises(UnsafePickleError) as err:
        read_pth(path)
    _one_line_naming(err, path, "tried to modify the allow-listed")


CONVERT_CASES = {
    "zero_stride_20000x20000": HOSTILE["zero_stride_20000x20000"],
    "zip_bomb_small_declared": HOSTILE["zip_bomb_small_declared"],
    # a sane view with the wrong rank for its name: the layout transform used to say "axes don't match array"
    "two_dim_conv_weight": (lambda d: _write_zip(d / "a.pth", _state_dict(
        [("features.0.weight", "FloatStorage", "0", 4, 0, (2, 2), (2, 1))]), {"0": FOUR}),
        "tensor 'features.0.weight' has shape (2, 2); a conv weight has 4 dims"),
    # used to be called "no such file" by the converter; now the reader says what it is, without blocking on it
    "fifo": (lambda d: (os.mkfifo(d / "a.pth"), d / "a.pth")[1], "is a named pipe (FIFO), not a regular file"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_weights_convert_cli_gives_one_line_and_exit_1(case, tmp_path):
    build, fragment = CONVERT_CASES[case]
    src = build(tmp_path)
    out = tmp_path / "out.h5"
    result = subprocess.run([sys.executable, "-m", "lightcnn.weights", "convert", str(src), "--arch", "squeezenet1_1",
                             "-o", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: ") and fragment in lines[0], lines
    assert not out.exists()


# --------------------------------------------------------------------------- no state between files

FRESH_SCRIPT = """
import sys, numpy as np
from lightcnn.convert.pth import read_pth
sd = read_pth(sys.argv[1])
np.savez(sys.argv[2], **{f"{i:04d}": a for i, a in enumerate(sd.values())}, __names__=np.array(list(sd)))
"""


@pytest.fixture(scope="module")
def fresh_results(fixtures_dir, tmp_path_factory):
    """Each fixture checkpoint read by a fresh interpreter: the result no earlier file could have influenced."""
    out = {}
    for name in ("mobilenet_v3_small", "squeezenet1_1"):  # zip, legacy
        src = fixtures_dir / "torchvision" / f"{name}.pth"
        npz = tmp_path_factory.mktemp("fresh") / f"{name}.npz"
        subprocess.run([sys.executable, "-c", FRESH_SCRIPT, str(src), str(npz)], check=True, cwd=REPO)
        with np.load(npz) as z:
            names = list(z["__names__"])
            out[name] = (src, dict(zip(names, (z[f"{i:04d}"] for i in range(len(names))))))
    return out


def test_hostile_files_leave_no_state_behind(fresh_results, tmp_path):
    for case, (build, _) in HOSTILE.items():
        folder = tmp_path / case
        folder.mkdir()
        with pytest.raises(CheckpointError):
            read_pth(build(folder))
    for case, prelude in POISONED.items():
        pickled = _state_dict([("w", "FloatStorage", "0", 4, 0, (4,), (1,))], prelude=prelude)
        with pytest.raises(UnsafePickleError):
            read_pth(_write_zip(tmp_path / f"poison_{case}.pth", pickled, {"0": FOUR}))
    for name, (src, want) in fresh_results.items():
        got = read_pth(src)
        assert list(got) == list(want), name
        for key, arr in want.items():
            assert got[key].dtype == arr.dtype and got[key].shape == arr.shape, key
            assert got[key].tobytes() == arr.tobytes(), key


# --------------------------------------------------------------------------- special files and peak memory


@pytest.mark.parametrize("reader", [read_pth, read_tflite, read_deep_compression, read_keras_h5])
def test_readers_refuse_fifos_without_blocking(reader, tmp_path):
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError) as err:
        reader(fifo)
    _one_line_naming(err, fifo, "named pipe (FIFO), not a regular file")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
@pytest.mark.parametrize("reader", [read_pth, read_tflite, read_deep_compression, read_keras_h5])
def test_readers_refuse_devices(reader):
    with pytest.raises(CheckpointError) as err:
        reader("/dev/zero")
    _one_line_naming(err, "/dev/zero", "character device, not a regular file")


def test_a_file_name_with_a_newline_stays_one_line(tmp_path):
    path = tmp_path / "two\nlines.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        read_pth(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "two\\nlines.pth") + ": "), msg


# Peak RSS of this process alone: /proc's VmHWM belongs to the address space exec made, while Linux carries
# getrusage's ru_maxrss over from the (large) pytest parent across fork + exec, hiding the child's own peak.
PEAK_SCRIPT = """
import json, re, resource, sys
from lightcnn.convert.pth import read_pth
from lightcnn.errors import CheckpointError
try:
    read_pth(sys.argv[1])
    outcome = "read"
except CheckpointError as exc:
    outcome = str(exc)
try:
    peak_kb = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
except OSError:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "peak_mb": peak_kb / 1024}))
"""


def _peak(path):
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, check=True, cwd=REPO)
    return json.loads(result.stdout)


def test_bombs_are_refused_in_bounded_memory(tmp_path):
    """Peak RSS of reading the 1.6 GB zero-stride view and the 1 GiB zip bomb, against a 16-byte valid file.

    Before the bounds, these peaked at about 1.55 GB and 2.1 GB.
    """
    small = _write_zip(tmp_path / "small.pth", _view((4,), (1,)), {"0": FOUR})
    stride0 = _write_zip(tmp_path / "stride0.pth", _view((20000, 20000), (0, 0)), {"0": FOUR})
    bomb = _write_zip(tmp_path / "bomb.pth", _view((4,), (1,)), {"0": 1 << 30}, {"0"})
    assert bomb.stat().st_size < 2 << 20  # a 1 GiB storage in about 1 MB
    base = _peak(small)
    assert base["outcome"] == "read"
    for path in (stride0, bomb):
        got = _peak(path)
        print(f"{path.name}: peak RSS {got['peak_mb']:.1f} MB (valid 16-byte file: {base['peak_mb']:.1f} MB)")
        assert got["outcome"].startswith(f"{path}: "), got
        assert got["peak_mb"] < base["peak_mb"] + 32, (got, base)


# --------------------------------------------------------------------------- .tflite


def test_tflite_tensors_sharing_one_buffer_cannot_multiply_the_file(sources_dir, tmp_path):
    """Point every 4-D uint8 tensor of a real model at its largest weight buffer: about 100 copies of 1.28 MB
    from a 3.6 MB file. Each tensor alone is consistent (shape matches the buffer), the total is refused."""
    from lightcnn.convert import tflite

    src = sources_dir / "mobilenet_v2_quant_tflite" / "mobilenet_v2_1.0_224_quant.tflite"
    data = bytearray(src.read_bytes())
    model = read_tflite(src)
    big = max((t for t in model.tensors if t.data is not None), key=lambda t: t.data.nbytes)
    buf = tflite._Buffer(bytes(data))
    tables = buf.table(buf.scalar("<I", 0)).tables(2)[0].tables(0)
    patched = 0
    for t, table in zip(model.tensors, tables):
        buffer_field, shape = table._field(2), table.vector(0, 4)
        if t.type_name != "UINT8" or len(t.shape) != len(big.shape) or buffer_field is None or t is big:
            continue
        data[buffer_field:buffer_field + 4] = big.buffer.to_bytes(4, "little")
        data[shape[0]:shape[0] + 4 * len(big.shape)] = np.array(big.shape, "<i4").tobytes()
        patched += 1
    copies = patched * big.data.nbytes
    assert copies > tflite.MAX_COPY_RATIO * len(data) + tflite.COPY_SLACK  # the budget is really exceeded
    path = tmp_path / "shared_buffer.tflite"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        read_tflite(path)
    _one_line_naming(err, path, "sharing one buffer")


# --------------------------------------------------------------------------- images and the predict CLI


def _png_bytes(width, height):
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, "PNG")
    return out.getvalue()


def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height (an IDAT far too small for it): only the header is ever read."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def _finishes(fn, seconds=20):
    """Run fn() in a daemon thread; return its exception (or None). Fails instead of hanging when it blocks."""
    outcome = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["exc"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome.get("exc")


def _image_error(fn, source_name, fragment):
    exc = _finishes(fn)
    assert isinstance(exc, ImageError), repr(exc)
    msg = str(exc)
    assert "\n" not in msg and msg.startswith(f"{source_name}: ") and fragment in msg, msg
    return msg


def test_load_image_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    _image_error(lambda: load_image(fifo), fifo, "is a named pipe (FIFO), not a regular file")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_load_image_refuses_dev_zero():
    _image_error(lambda: load_image("/dev/zero"), "/dev/zero", "is a character device, not a regular file")


@pytest.mark.parametrize("width, height", [(1, 20000), (20000, 1), (3, 601)])
def test_extreme_aspect_ratios_are_refused_from_the_header(width, height, tmp_path):
    data = _png_bytes(width, height)
    _image_error(lambda: load_image(data, name="strip.png"), "strip.png", f"{width}x{height} is more than 200 times")
    path = tmp_path / "strip.png"
    path.write_bytes(data)
    _image_error(lambda: load_image(path), path, "more than 200 times longer")


def test_the_aspect_limit_is_exactly_200():
    """Control for the test above: 1 x 200 is still an image (upscaled to 256 x 51200 inside, then cropped)."""
    x = preprocess_image(_png_bytes(1, 200), TORCHVISION)
    assert x.shape == (224, 224, 3) and np.isfinite(x).all()
    _image_error(lambda: load_image(_png_bytes(1, 201), name="t"), "t", "1x201 is more than 200 times")


def test_a_side_over_65500_is_refused_from_the_header():
    # 70000 x 400 = 28 Mpx (under max_pixels) and 175:1 (under the aspect limit): only the side rule refuses it.
    header = _png_header_only(70_000, 400)
    _image_error(lambda: load_image(header, name="wide.png"), "wide.png", "70000x400 has a side over 65500 pixels")
    _image_error(lambda: load_image(header, name="wide.png", max_pixels=None), "wide.png", "side over 65500")


def test_arrays_and_pil_images_meet_the_same_extent_rules():
    with pytest.raises(ImageError, match="more than 200 times"):
        preprocess_image(np.zeros((20000, 1), np.uint8), TORCHVISION)
    with pytest.raises(ImageError, match="more than 200 times"):
        preprocess_image(Image.new("RGB", (20000, 1)), TORCHVISION)


def test_reads_stop_at_the_byte_cap(monkeypatch, tmp_path):
    monkeypatch.setattr(preprocess, "MAX_IMAGE_BYTES", 1000)
    stream = io.BytesIO(bytes(10_000))
    stream.name = "big-stream.png"
    _image_error(lambda: load_image(stream), "big-stream.png", "more than the 1000-byte limit")
    assert stream.tell() == 1001  # read one byte past the cap, never to the end
    _image_error(lambda: load_image(bytes(1001), name="<stdin>"), "<stdin>", "1001 bytes, over the 1000-byte limit")
    path = tmp_path / "big.png"
    path.write_bytes(bytes(1001))
    _image_error(lambda: load_image(path), path, "1001 bytes, over the 1000-byte limit for an image file")
    small = tmp_path / "small.png"
    small.write_bytes(_png_bytes(8, 8))  # control: under the cap, the same reader decodes
    assert load_image(small).size == (8, 8)


def test_a_file_name_with_a_newline_gives_one_line(tmp_path):
    path = tmp_path / "two\nlines.png"
    path.write_bytes(b"not an image")
    _image_error(lambda: load_image(path), tmp_path / "two\\nlines.png", "not a recognised image format")


def test_printable_escapes_only_what_breaks_a_line():
    assert printable("plain/ünïcode name.png") == "plain/ünïcode name.png"
    assert printable("a\nb\r\tc\x1b\u2028.png") == "a\\nb\\r\\tc\\x1b\\u2028.png"
    assert printable(b"raw\xffbytes\n") == "raw\\udcffbytes\\n"


def _smoke_image():
    from tests.conftest import require_path, shared_path

    return require_path(shared_path("LIGHTCNN_DATA", "data") / "smoke-test-images" / "cat.bmp", "smoke-test images")


def test_predict_cli_bad_images_one_line_each_and_the_good_one_predicted(tmp_path, v2_weights):
    good = tmp_path / "good.bmp"
    shutil.copy(_smoke_image(), good)
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    tall = tmp_path / "tall.png"
    tall.write_bytes(_png_bytes(1, 20000))
    newline = tmp_path / "new\nline.png"
    newline.write_bytes(b"not an image")
    args = [fifo, good, tall, newline, "-"]
    expected = [(str(fifo), "named pipe (FIFO)"), (str(tall), "1x20000 is more than 200 times longer"),
                (str(tmp_path / "new\\nline.png"), "not a recognised image format"),
                ("<stdin>", "20000x1 is more than 200 times longer")]
    if os.path.exists("/dev/zero"):
        args.insert(1, "/dev/zero")
        expected.insert(1, ("/dev/zero", "character device"))
    result = subprocess.run([sys.executable, "-m", "lightcnn.predict", *map(str, args), "--topk", "1"],
                            input=_png_bytes(20000, 1), capture_output=True, cwd=REPO, timeout=900)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == len(expected), lines
    for line, (where, fragment) in zip(lines, expected):
        assert line.startswith(f"error: {where}: ") and fragment in line, line
    blocks = result.stdout.decode().strip().split("\n\n")
    assert len(blocks) == 1 and blocks[0].splitlines()[0] == str(good), result.stdout.decode()
    assert blocks[0].splitlines()[1].endswith("Egyptian cat")
