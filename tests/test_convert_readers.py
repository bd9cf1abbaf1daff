"""The foreign-checkpoint readers (lightcnn.convert.pth / tflite / deep_compression).

Each reader is checked against facts recorded independently of it: MANIFEST.json and
torch.load for .pth, weights/SOURCES.md and the TFLite reference kernels' activations
for .tflite, SOURCES.md's counts for the .net file. Damaged and malicious files must
fail with one line naming the file.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from lightcnn.convert.deep_compression import LAYERS, read_deep_compression, read_deep_compression_raw
from lightcnn.convert.pth import read_pth
from lightcnn.convert.tflite import dequantize, read_tflite
from lightcnn.errors import CheckpointError, UnsafePickleError

PTH_MODELS = ("mobilenet_v2", "squeezenet1_0", "squeezenet1_1", "mobilenet_v3_large", "mobilenet_v3_small")
V2_QUANT = "mobilenet_v2_quant_tflite/mobilenet_v2_1.0_224_quant.tflite"
V2_KERAS = "mobilenet_v2_keras_int8_tflite/mobilenet_v2_1.0_224_quant.tflite"
V3_SMALL = "mobilenet_v3_small_quant_tflite/v3-small_224_1.0_uint8.tflite"
DC_NET = "squeezenet_v1.0_deep_compression/compressed_SqueezeNet.net"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _one_line_naming(err, path):
    msg = str(err.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg


def test_readers_never_import_torch():
    code = ("import sys, lightcnn.convert.pth, lightcnn.convert.tflite, lightcnn.convert.deep_compression; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- .pth


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "torchvision" / "MANIFEST.json").read_text())


def test_manifest_lists_the_models_tested_here(manifest):
    assert set(manifest) - {"_versions"} == set(PTH_MODELS)


@pytest.mark.parametrize("name", PTH_MODELS)
def test_pth_counts_match_manifest(name, manifest, fixtures_dir):
    entry = manifest[name]
    path = fixtures_dir / "torchvision" / entry["checkpoint"]
    is_zip = path.read_bytes()[:4] == b"PK\x03\x04"
    assert is_zip == (entry["format"] == "torch zip")  # both container formats are exercised
    sd = read_pth(path)
    assert len(sd) == entry["num_tensors"]
    # num_params counts parameters only (torch's model.parameters()), not BN buffers.
    assert sum(a.size for k, a in sd.items() if not k.endswith(BN_BUFFERS)) == entry["num_params"]
    for key, arr in sd.items():
        assert arr.flags.c_contiguous and arr.flags.writeable and arr.dtype.isnative
        if key.endswith("num_batches_tracked"):
            assert arr.dtype == np.int64 and arr.shape == ()
        else:
            assert arr.dtype == np.float32
    first = next(iter(sd))
    assert first.startswith("features.0.") and sd[first].ndim == 4  # first conv OIHW, file order kept


@pytest.mark.parametrize("name", PTH_MODELS)
def test_pth_equals_torch_load_bit_for_bit(name, manifest, fixtures_dir):
    torch = pytest.importorskip("torch")
    path = fixtures_dir / "torchvision" / manifest[name]["checkpoint"]
    ours = read_pth(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(ref)
    for key, t in ref.items():
        want = t.numpy()
        assert ours[key].dtype == want.dtype and ours[key].shape == want.shape, key
        assert ours[key].tobytes() == want.tobytes(), key


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_strides_offsets_and_dtypes(legacy, tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    sd = OrderedDict(
        transposed=base.t(),                      # non-contiguous view
        window=base[1:, 2:5],                     # offset + strides into a shared storage
        base=base,
        half=torch.randn(3, 5, generator=g).half(),
        double=torch.randn(2, 2, generator=g, dtype=torch.float64),
        long=torch.arange(-3, 5),
        int8=torch.tensor([-128, 0, 127], dtype=torch.int8),
        uint8=torch.tensor([0, 255], dtype=torch.uint8),
        boolean=torch.tensor([True, False, True]),
        bf16=torch.randn(4, generator=g).bfloat16(),
        scalar=torch.tensor(7),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.ones(2, 2)),
        expanded=torch.ones(1, 3).expand(2, 3),   # stride 0
    )
    path = tmp_path / "mixed.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    ours = read_pth(path)
    assert list(ours) == list(sd)
    for key, t in sd.items():
        want = (t.float() if t.dtype == torch.bfloat16 else t).detach().contiguous().numpy()
        assert ours[key].dtype == want.dtype and ours[key].shape == want.shape, key
        assert ours[key].tobytes() == want.tobytes(), key
        assert ours[key].flags.c_contiguous, key


class _RunsShell:
    """Pickles to ``os.system('touch <marker>')``: unpickling it with plain pickle runs the shell."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _legacy_stream(state_dict_pickle):
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))
    return head + state_dict_pickle + pickle.dumps([], protocol=2)


def test_malicious_payload_is_live(tmp_path):
    """Control: the payload used below really runs code under plain pickle (so the next test can fail)."""
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_RunsShell(control), protocol=2))  # synthetic payload, never a checkpoint
    assert control.exists()


@pytest.mark.parametrize("container", ["raw_pkl", "legacy", "zip"])
def test_malicious_pickle_is_refused(container, tmp_path):
    marker = tmp_path / "pwned_marker"
    payload = pickle.dumps(OrderedDict(weight=_RunsShell(marker)), protocol=2)
    path = tmp_path / f"evil_{container}.pth"
    if container == "raw_pkl":        # the payload in the very first (magic-number) pickle slot
        path.write_bytes(payload)
    elif container == "legacy":       # a well-formed legacy header, payload as the state_dict
        path.write_bytes(_legacy_stream(payload))
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("evil/data.pkl", payload)
            zf.writestr("evil/byteorder", "little")
            zf.writestr("evil/version", "3\n")
    with pytest.raises(UnsafePickleError) as err:
        read_pth(path)
    assert not marker.exists()
    _one_line_naming(err, path)
    assert "system" in str(err.value)  # names the refused global (posix.system / os.system)


def test_builtins_eval_is_refused(tmp_path):
    path = tmp_path / "eval.pth"
    # GLOBAL 'builtins eval' applied to a string: hand-written so no pickler is involved.
    path.write_bytes(b"\x80\x02cbuiltins\neval\nX\x0c\x00\x00\x001+1 or boom!\x85R.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        read_pth(path)


def _damaged_copies(src, tmp_path, garble_at):
    data = src.read_bytes()
    out = []
    for cut in (len(data) // 2, 200, 3):
        p = tmp_path / f"truncated_{cut}_{src.name}"
        p.write_bytes(data[:cut])
        out.append(p)
    for pos in garble_at:
        pos = pos % len(data)
        p = tmp_path / f"garbled_{pos}_{src.name}"
        p.write_bytes(data[:pos] + bytes([0xFF ^ b for b in data[pos:pos + 32]]) + data[pos + 32:])
        out.append(p)
    empty = tmp_path / f"empty_{src.name}"
    empty.write_bytes(b"")
    return out + [empty, tmp_path / f"missing_{src.name}"]


@pytest.mark.parametrize("name", ["squeezenet1_0", "mobilenet_v3_small"])  # legacy, zip
def test_damaged_pth_raises_checkpoint_error(name, fixtures_dir, tmp_path):
    src = fixtures_dir / "torchvision" / f"{name}.pth"
    # offsets 0 and 300 hit the pickles / zip header; len//2 hits storage data (zip: CRC check).
    garble = (0, 300) if name == "squeezenet1_0" else (0, 300, src.stat().st_size // 2)
    for path in _damaged_copies(src, tmp_path, garble):
        with pytest.raises(CheckpointError) as err:
            read_pth(path)
        _one_line_naming(err, path)


# --------------------------------------------------------------------------- .tflite


def _conv_ops(model, opcode):
    return [op for op in model.operators if op.opcode == opcode]


def test_tflite_mobilenet_v2_quant_facts(sources_dir):
    m = read_tflite(sources_dir / V2_QUANT)
    assert m.version == 3 and m.description == "TOCO Converted."
    assert m.op_counts() == {"CONV_2D": 36, "DEPTHWISE_CONV_2D": 17, "ADD": 10, "AVERAGE_POOL_2D": 1,
                             "RESHAPE": 1, "SOFTMAX": 1}
    (inp,), (out,) = m.inputs, m.outputs
    t = m.tensors[inp]
    assert (t.name, t.shape, t.type_name) == ("input", (1, 224, 224, 3), "UINT8")
    assert t.scale.tolist() == [1 / 128] and t.zero_point.tolist() == [128]
    t = m.tensors[out]
    assert (t.name, t.shape, t.type_name) == ("MobilenetV2/Predictions/Softmax", (1, 1001), "UINT8")
    assert t.scale.tolist() == [1 / 256] and t.zero_point.tolist() == [0]
    convs = _conv_ops(m, "CONV_2D") + _conv_ops(m, "DEPTHWISE_CONV_2D")
    assert all(op.options["activation"] == "NONE" and op.options["padding"] == "SAME" for op in convs)
    assert all(op.options["depth_multiplier"] == 1 for op in _conv_ops(m, "DEPTHWISE_CONV_2D"))
    weights = [m.tensors[op.inputs[1]] for op in convs]
    assert all(w.type_name == "UINT8" and w.scale.size == 1 for w in weights)   # per-tensor uint8
    assert [int(m.tensors[op.inputs[1]].zero_point[0]) for op in m.operators[:4]] == [122, 165, 140, 127]
    pool = _conv_ops(m, "AVERAGE_POOL_2D")[0].options
    assert (pool["filter_h"], pool["filter_w"], pool["padding"]) == (7, 7, "VALID")
    logits = m.tensors[m.operators[-3].outputs[0]]
    assert logits.shape == (1, 1, 1, 1001) and logits.zero_point.tolist() == [58]
    assert logits.scale[0] == pytest.approx(0.0989, abs=1e-4)
    assert m.operators[-2].options["new_shape"] == (1, 1001)


def test_tflite_keras_int8_facts(sources_dir):
    m = read_tflite(sources_dir / V2_KERAS)
    assert m.description == "MLIR Converted."
    assert m.op_counts() == {"QUANTIZE": 2, "CONV_2D": 35, "DEPTHWISE_CONV_2D": 17, "PAD": 4, "ADD": 10,
                             "MEAN": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1}
    t = m.tensors[m.inputs[0]]
    assert t.type_name == "UINT8" and t.zero_point.tolist() == [127]
    assert t.scale[0] == pytest.approx(1 / 127.5, rel=1e-6)
    q = m.tensors[m.operators[0].outputs[0]]
    assert q.type_name == "INT8" and q.zero_point.tolist() == [-1]
    t = m.tensors[m.outputs[0]]
    assert (t.shape, t.type_name, t.scale.tolist(), t.zero_point.tolist()) == ((1, 1000), "UINT8", [1 / 256], [0])
    convs = _conv_ops(m, "CONV_2D") + _conv_ops(m, "DEPTHWISE_CONV_2D")
    assert sum(op.options["activation"] == "RELU6" for op in convs) == 35
    for op in convs:  # symmetric per-channel int8, axis 0 (conv OHWI) / axis 3 (depthwise 1HWC)
        w, b = m.tensors[op.inputs[1]], m.tensors[op.inputs[2]]
        axis = 0 if op.opcode == "CONV_2D" else 3
        assert w.type_name == "INT8" and w.quantized_dimension == axis
        assert w.scale.size == w.shape[axis] and not w.zero_point.any()
        # TF's symmetric scheme maps each channel's largest |w| to 127 (which proves the axis),
        # except channels whose float weights are all zero (a few exist: dead ReLU channels).
        peak = np.abs(w.data.astype(np.int32)).max(axis=tuple(a for a in range(4) if a != axis))
        assert np.isin(peak, (0, 127)).all() and (peak == 127).mean() > 0.5
        assert b.type_name == "INT32"
        x_scale = m.tensors[op.inputs[0]].scale[0]
        np.testing.assert_allclose(b.scale, x_scale * w.scale, rtol=1e-6)
    fc = m.tensors[_conv_ops(m, "FULLY_CONNECTED")[0].inputs[1]]
    assert fc.shape == (1000, 1280) and fc.type_name == "INT8" and fc.scale.size == 1
    for k, op in enumerate(m.operators):
        if op.opcode == "PAD":  # ((0,1),(0,1)) on H, W, then a VALID stride-2 depthwise
            np.testing.assert_array_equal(m.tensor_value(op.inputs[1]), [[0, 0], [0, 1], [0, 1], [0, 0]])
            nxt = m.operators[k + 1]
            assert nxt.opcode == "DEPTHWISE_CONV_2D" and nxt.options["padding"] == "VALID"
            assert nxt.options["stride_h"] == nxt.options["stride_w"] == 2


def test_tflite_mobilenet_v3_small_facts(sources_dir):
    m = read_tflite(sources_dir / V3_SMALL)
    assert m.op_counts() == {"CONV_2D": 43, "HARD_SWISH": 19, "DEPTHWISE_CONV_2D": 11, "AVERAGE_POOL_2D": 11,
                             "ADD": 15, "MUL": 18, "RESHAPE": 1, "SOFTMAX": 1}
    t = m.tensors[m.inputs[0]]
    assert t.type_name == "UINT8" and t.zero_point.tolist() == [128]
    assert t.scale[0] == pytest.approx(1 / 127, rel=1e-5)
    assert m.tensors[m.outputs[0]].shape == (1, 1001)
    dw = _conv_ops(m, "DEPTHWISE_CONV_2D")
    assert sum(op.options["stride_h"] == 2 for op in dw) == 4
    assert all(op.options["padding"] == "SAME" for op in dw)
    assert {m.tensors[op.inputs[1]].shape[1] for op in dw} == {3, 5}
    assert all(op.options.get("activation", "NONE") == "NONE" for op in m.operators)
    for op in _conv_ops(m, "ADD") + _conv_ops(m, "MUL"):  # SE blocks use quantised scalar constants
        consts = [m.tensors[i] for i in op.inputs if m.tensors[i].is_constant]
        assert all(c.shape == () and c.type_name == "UINT8" for c in consts)
    threes = [m.tensor_value(i) for op in _conv_ops(m, "ADD") for i in op.inputs if m.tensors[i].is_constant]
    assert len(threes) == 9 and all(abs(float(v) - 3.0) < 0.05 for v in threes)  # hard-sigmoid's +3


def _float_conv(x, w, b, op):
    """Plain float64 NHWC conv / depthwise conv (TFLite layouts) with TF SAME/VALID padding."""
    s, depthwise = op.options["stride_h"], op.opcode == "DEPTHWISE_CONV_2D"
    kh, kw = w.shape[1:3]
    h = x.shape[0]
    if op.options["padding"] == "SAME":
        ho = -(-h // s)
        total = max((ho - 1) * s + kh - h, 0)
        x = np.pad(x, ((total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)))
    else:
        ho = (h - kh) // s + 1
    y = np.zeros((ho, ho, w.shape[0] if not depthwise else w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[i:i + s * ho:s, j:j + s * ho:s, :]
            y += patch * w[0, i, j, :] if depthwise else patch @ w[:, i, j, :].T
    return y + b


@pytest.mark.parametrize("model, npz, ops", [
    (V2_QUANT, "mobilenet_v2_quant_tflite__cat.npz", (0, 1, 2)),      # conv s2, depthwise, project
    (V3_SMALL, "mobilenet_v3_small_quant_tflite__cat.npz", (0, 2)),   # conv s2, depthwise s2
])
def test_tflite_dequantised_weights_reproduce_reference_kernels(model, npz, ops, sources_dir, data_dir):
    m = read_tflite(sources_dir / model)
    acts = data_dir / "reference-activations"
    ref = np.load(acts / npz)
    image = np.load(acts / "cat_input_224_uint8.npy")
    for k in ops:
        op = m.operators[k]
        xi, wi, bi = op.inputs
        tx, ty = m.tensors[xi], m.tensors[op.outputs[0]]
        q_in = image if xi == m.inputs[0] else ref[f"t{xi:03d}"]
        x = dequantize(q_in, tx.scale, tx.zero_point)[0].astype(np.float64)
        y = _float_conv(x, m.tensor_value(wi).astype(np.float64), m.tensor_value(bi).astype(np.float64), op)
        lo, hi = (ty.scale[0] * (q - ty.zero_point[0]) for q in (0, 255))   # uint8 range clamp
        y = np.clip(y, lo, hi)
        got = dequantize(ref[f"t{op.outputs[0]:03d}"], ty.scale, ty.zero_point)[0]
        steps = np.abs(y - got).max() / ty.scale[0]
        # Float math differs from the integer kernel only by requantisation rounding (< 1 step);
        # a wrong layout, axis, padding side or zero point is off by many steps.
        assert steps < 1.0, f"op {k} {op.opcode}: {steps:.2f} quantisation steps off"


def test_tflite_tensor_value_and_dequantize(sources_dir):
    m = read_tflite(sources_dir / V2_KERAS)
    op = _conv_ops(m, "DEPTHWISE_CONV_2D")[0]
    w = m.tensors[op.inputs[1]]
    q = m.tensor_value(op.inputs[1], dequantize=False)
    assert q.dtype == np.int8 and q.shape == w.shape
    real = m.tensor_value(op.inputs[1])
    assert real.dtype == np.float32
    for c in range(w.shape[3]):  # per-channel along axis 3, checked one channel at a time
        np.testing.assert_array_equal(real[..., c], np.float32(np.float64(w.scale[c]) * q[..., c]))
    bias = m.tensor_value(op.inputs[2])
    np.testing.assert_allclose(bias, m.tensors[op.inputs[2]].data * m.tensors[op.inputs[2]].scale, rtol=1e-6)
    with pytest.raises(CheckpointError, match="no constant data"):
        m.tensor_value(m.inputs[0])


def test_damaged_tflite_raises_checkpoint_error(sources_dir, tmp_path):
    src = sources_dir / V2_QUANT
    data = src.read_bytes()
    bad_root = tmp_path / "bad_root.tflite"   # identifier intact, root offset points past the end
    bad_root.write_bytes((len(data) + 100).to_bytes(4, "little") + data[4:])
    wrong_id = tmp_path / "wrong_id.tflite"
    wrong_id.write_bytes(data[:4] + b"XXXX" + data[8:])
    for path in _damaged_copies(src, tmp_path, garble_at=(0, 8)) + [bad_root, wrong_id]:
        with pytest.raises(CheckpointError) as err:
            read_tflite(path)
        _one_line_naming(err, path)


# --------------------------------------------------------------------------- .net


def test_deep_compression_counts(sources_dir):
    path = sources_dir / DC_NET
    layers = read_deep_compression(path)
    assert list(layers) == [s.name for s in LAYERS] and len(layers) == 26
    assert list(layers)[:4] == ["conv1", "fire2/conv1x1_1", "fire2/conv1x1_2", "fire2/conv3x3_2"]
    assert sum(int(np.count_nonzero(w)) for w, _ in layers.values()) == 415_921
    assert sum(w.size for w, _ in layers.values()) == 1_244_448
    assert sum(b.size for _, b in layers.values()) == 3_976
    assert layers["conv1"][0].shape == (96, 3, 7, 7) and layers["conv_final"][0].shape == (1000, 512, 1, 1)
    assert layers["fire9/conv3x3_2"][0].shape == (256, 64, 3, 3)
    raw = read_deep_compression_raw(path)
    assert all(layer.codebook[0] == 0.0 for layer in raw)
    assert sum(layer.codes.size for layer in raw) == 422_083
    for layer in raw:  # every weight value is a codebook entry
        w = layers[layer.shape.name][0]
        assert np.isin(w, layer.codebook).all()


def test_deep_compression_table_matches_derived_csv(sources_dir):
    """The in-code layer table agrees with layers.csv (written independently from the prototxt)."""
    import csv

    rows = list(csv.DictReader((sources_dir / "squeezenet_v1.0_deep_compression" / "layers.csv").open()))
    assert [(r["layer"], int(r["out_channels"]), int(r["in_channels"]), int(r["kernel_h"]), int(r["kernel_w"]))
            for r in rows] == [(s.name, s.out_channels, s.in_channels, s.kernel, s.kernel) for s in LAYERS]
    raw = read_deep_compression_raw(sources_dir / DC_NET)
    assert [int(r["stored_entries"]) for r in rows] == [layer.codes.size for layer in raw]


def test_damaged_deep_compression_raises_checkpoint_error(sources_dir, tmp_path):
    src = sources_dir / DC_NET
    data = src.read_bytes()
    longer = tmp_path / "longer.net"
    longer.write_bytes(data + b"\0")
    bad_gaps = tmp_path / "bad_gaps.net"  # sizes intact, conv1's gaps all 15: positions overflow
    start = 104 + 1024 + 4 * 96 + 13902
    bad_gaps.write_bytes(data[:start] + b"\xff" * 6951 + data[start + 6951:])
    for path in _damaged_copies(src, tmp_path, garble_at=(0,)) + [longer, bad_gaps]:
        with pytest.raises(CheckpointError) as err:
            read_deep_compression(path)
        _one_line_naming(err, path)
