"""Property: a mutated lightcnn .h5 either loads and predicts finite probabilities, or raises LightCNNError.

The base files are the project's own: a small SqueezeNet 1.1 (3 classes, 32-pixel input) written by
save_checkpoint, once plain and once with an activation quantisation table switched on. Each example copies one,
damages it and calls lightcnn.load + Classifier.predict on one fixed image. Mutations: byte flips anywhere,
truncations, deleted or replaced datasets (wrong shape, integer/float16/complex dtypes, NaN/Inf/huge values,
declared 4 TiB shapes, external links), absurd or non-UTF-8 attributes, unknown architectures and config
values, broken preprocessing and quantisation tables. "Re-signed" variants recompute the digests after the
damage, so the checks behind the digests are exercised as well as the digests themselves.

Examples per test: FUZZ_EXAMPLES (about 2,100 in all by default); LIGHTCNN_FUZZ_EXAMPLES=N runs N per test.
A watchdog (faulthandler) ends the process with a traceback if one example takes over WATCHDOG_SECONDS, so a
libhdf5 hang cannot stall CI.
"""

import faulthandler
import json
import os
import shutil

import h5py
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lightcnn  # noqa: E402
from lightcnn.checkpoint import Checkpoint, metadata_digest, save_checkpoint, tensor_digest  # noqa: E402
from lightcnn.errors import LightCNNError  # noqa: E402
from lightcnn.models import build  # noqa: E402
from lightcnn.preprocess import Preprocessing  # noqa: E402

FUZZ_EXAMPLES = {"flips": 700, "truncations": 200, "datasets": 500, "attributes": 700}
WATCHDOG_SECONDS = 120
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
SMALL = Preprocessing(size=32, resize_size=36).to_dict()


def _examples(kind):
    env = os.environ.get("LIGHTCNN_FUZZ_EXAMPLES")
    return int(env) if env else FUZZ_EXAMPLES[kind]


def _settings(kind):
    return settings(max_examples=_examples(kind), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{"plain": path, "quant": path}: small, valid, signed files (format version 2)."""
    folder = tmp_path_factory.mktemp("fuzz-bases")
    model = build("squeezenet1_1", num_classes=3, seed=1)
    tensors = {k: v + np.float32(0.01) for k, v in model.state_dict().items()}
    out = {}
    for kind in ("plain", "quant"):
        extra = {}
        if kind == "quant":
            extra = {"activation_quantization": {"dtype": "uint8", "layers": {"features.conv1": [0.05, 0],
                                                                              "features.fire2": [0.1, 0]}},
                     "simulate_activation_quantization": True}
        ckpt = Checkpoint(arch="squeezenet1_1", config=dict(model.config), tensors=tensors,
                          class_names=["a", "b", "c"], preprocessing=SMALL, extra=extra)
        out[kind] = save_checkpoint(folder / f"{kind}.h5", ckpt)
        with h5py.File(out[kind]) as f:
            out[kind + "_names"] = sorted(f.attrs.keys())
    out["tensor_names"] = sorted(tensors)
    out = _Bases(out)
    assert_loads_or_refuses(out["plain"], must_load=True)
    assert_loads_or_refuses(out["quant"], must_load=True)
    return out


class _Bases(dict):
    def __repr__(self):  # keeps Hypothesis' failure report short
        return f"<bases {self['plain']}>"


def resign(path):
    """Recompute the digests of a damaged file so that the checks behind them are what gets tested."""
    with h5py.File(path, "a") as f:
        raw = {}
        for key in ("format", "format_version", "arch", "config", "class_names", "class_ids", "preprocessing",
                    "padding", "provenance", "extra"):
            value = f.attrs.get(key)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            if isinstance(value, np.integer):
                value = int(value)
            raw[key] = value
        tensors = {}
        if isinstance(f.get("tensors"), h5py.Group):
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and obj.size < (1 << 22):
                    try:
                        tensors[name.replace("/", ".")] = tensor_digest(name.replace("/", "."), obj[()])
                    except (TypeError, ValueError, OSError):
                        pass
            f["tensors"].visititems(visit)
        f.attrs["digests"] = json.dumps({"algorithm": "sha256", "metadata": metadata_digest(raw), "tensors": tensors})


def assert_loads_or_refuses(path, must_load=False):
    """The property. Returns "loaded" or "refused"."""
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    try:
        try:
            clf = lightcnn.load(str(path), engine="numpy")
            probs = clf.predict(IMAGE)
        except LightCNNError as exc:
            message = str(exc)
            assert "\n" not in message and str(path) in message, message
            assert not must_load, message
            return "refused"
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert probs.shape == (1, len(clf.class_names)) and np.all(np.isfinite(probs))
    assert abs(float(probs.sum()) - 1.0) < 1e-4
    return "loaded"


def _copy(bases, kind, tmp_path, name="m.h5"):
    path = tmp_path / name
    shutil.copyfile(bases[kind], path)
    return path


# --------------------------------------------------------------------------------------------- byte-level damage


@_settings("flips")
@given(kind=st.sampled_from(["plain", "quant"]), flips=st.lists(
    st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3),
    near_start=st.booleans())
def test_byte_flips_are_caught(bases, tmp_path_factory, kind, flips, near_start):
    tmp = tmp_path_factory.mktemp("flip")
    path = _copy(bases, kind, tmp)
    data = bytearray(path.read_bytes())
    span = 8192 if near_start else len(data)  # the superblock, object headers and attributes live near the start
    for where, mask in flips:
        data[int(where * span)] ^= mask
    path.write_bytes(bytes(data))
    assert_loads_or_refuses(path)


@_settings("truncations")
@given(kind=st.sampled_from(["plain", "quant"]), keep=st.floats(0.0, 1.0, exclude_max=True))
def test_truncations_are_refused(bases, tmp_path_factory, kind, keep):
    tmp = tmp_path_factory.mktemp("cut")
    path = _copy(bases, kind, tmp)
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data))])
    assert assert_loads_or_refuses(path) == "refused"


# --------------------------------------------------------------------------------------------- datasets

_VALUES = st.sampled_from(["nan", "inf", "-inf", "huge", "negative_var", "zeros"])
_DTYPES = st.sampled_from(["int32", "float16", "complex64", "bool", "S4", "uint8"])


@st.composite
def dataset_damage(draw, names):
    what = draw(st.sampled_from(["delete", "shape", "dtype", "values", "extra", "big", "link", "tensors_dataset",
                                 "scalar"]))
    return what, draw(st.sampled_from(names)), draw(_VALUES), draw(_DTYPES), draw(st.integers(0, 3))


def _damage_dataset(path, what, name, values, dtype, k):
    key = "tensors/" + name.replace(".", "/")
    with h5py.File(path, "a") as f:
        old = f[key][()]
        if what == "delete":
            del f[key]
        elif what == "shape":
            del f[key]
            if k == 0:  # same element count, another layout
                f[key] = old.reshape(-1, 1)
            else:
                shape = [old.shape[:-1], old.shape + (1,), (old.size + 1,)][k - 1]
                f[key] = np.resize(old, shape).astype(old.dtype)
        elif what == "dtype":
            del f[key]
            f[key] = np.zeros(old.shape, dtype)
        elif what == "values":
            value = old.copy()
            flat = value.reshape(-1)
            if values == "negative_var":
                name_is_var = name.endswith("running_var")
                flat[:] = -1.0 if name_is_var else flat
            else:
                flat[k % flat.size] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 3e38,
                                       "zeros": 0.0}[values]
            f[key][...] = value
        elif what == "extra":
            f["tensors/features/unexpected/weight"] = np.zeros(3, np.float32)
        elif what == "big":  # 4 TiB declared, a few KB stored
            del f[key]
            f.create_dataset(key, shape=(1 << 20, 1 << 20), dtype="float32", chunks=(16, 16), compression="gzip")
        elif what == "link":
            del f[key]
            f[key] = h5py.ExternalLink("/dev/zero", "/x") if k % 2 else h5py.SoftLink("/tensors")
        elif what == "tensors_dataset":
            del f["tensors"]
            f["tensors"] = np.zeros(4, np.float32)
        elif what == "scalar":
            del f[key]
            f[key] = np.float32(1.0)


@_settings("datasets")
@given(data=st.data(), kind=st.sampled_from(["plain", "quant"]), signed=st.booleans())
def test_damaged_datasets_are_refused_or_harmless(bases, tmp_path_factory, data, kind, signed):
    what, name, values, dtype, k = data.draw(dataset_damage(bases["tensor_names"]))
    path = _copy(bases, kind, tmp_path_factory.mktemp("ds"))
    _damage_dataset(path, what, name, values, dtype, k)
    if signed:
        resign(path)
    outcome = assert_loads_or_refuses(path)
    if what in ("delete", "extra", "big", "link", "tensors_dataset", "scalar", "dtype") or (
            what == "values" and values in ("nan", "inf", "-inf")) or (what == "shape" and k in (0, 1, 2, 3)):
        assert outcome == "refused", (what, name)


# --------------------------------------------------------------------------------------------- attributes

_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)

_CONFIG_KEYS = ["num_classes", "variant", "fire", "bypass", "dropout", "in_channels", "seed", "width_mult", "head",
                "bn", "padding", "nonsense"]
_PREP_KEYS = list(SMALL)


@st.composite
def attribute_damage(draw, names):
    what = draw(st.sampled_from(["raw", "config_key", "config_head", "prep_key", "quant", "arch", "classes",
                                 "version", "delete", "non_utf8", "array_attr", "class_ids", "operating_point"]))
    if what == "raw":  # any attribute replaced by any JSON text
        return what, draw(st.sampled_from(names)), json.dumps(draw(_JSONISH))
    if what == "config_key":
        return what, draw(st.sampled_from(_CONFIG_KEYS)), draw(_JSONISH | st.sampled_from(
            [0, 1, 2, 3, 10**9, 10**5, 100001, -1, 1e-9, 11.0, "caffe", "bn_elu", "simple", 0.999, 1.0]))
    if what == "config_head":
        return what, None, {"hidden": draw(st.lists(st.sampled_from([1, 8, 10**7, 0, -3, 2.5]), max_size=3)),
                            "dropout": draw(st.sampled_from([0.0, 0.5, 1.0, -1, "x"]))}
    if what == "prep_key":
        return what, draw(st.sampled_from(_PREP_KEYS)), draw(_JSONISH | st.sampled_from(
            [1, 16, 31, 32, 33, 4096, 4097, 10**6, "L", "BGR", "stretch", [0.0], [1, 2, 3], [0, 0, 0], 1e-30]))
    if what == "quant":
        return what, draw(st.sampled_from(["empty_layers", "scale", "zero", "dtype", "unknown_layer", "junk"])), \
            draw(st.sampled_from([0.0, -1.0, 1e-300, 1e300, float("nan"), 1e-12, 1e6, 300, -129, 1.5, "1", None]))
    if what == "arch":
        return what, None, draw(st.sampled_from(["resnet50", "", "squeezenet1_0", "mobilenet_v2",
                                                 "lightcnn-resume-state", "squeezenet1_1 "]))
    if what == "classes":
        return what, None, draw(st.sampled_from([None, [], ["a"], ["a", "b", "c", "d"], [1, 2, 3], "abc",
                                                 ["a", None, "c"], {"a": 1}]))
    if what == "version":
        return what, None, draw(st.sampled_from([0, -1, 2, 3, 2**40, "2", 2.0, [1, 2], True]))
    if what == "class_ids":
        return what, None, draw(st.sampled_from([None, ["x"], [1, 2, 3], ["x", "y", "z"], "xyz"]))
    if what == "operating_point":
        return what, None, draw(st.sampled_from([None, {"class": "a", "threshold": 0.5}, {"class": "a"},
                                                 {"class": "z", "threshold": 2}, [1], "x",
                                                 {"class": "a", "threshold": float("nan")}]))
    return what, draw(st.sampled_from(names)), None


def _damage_attribute(path, what, key, value):
    with h5py.File(path, "a") as f:
        def edit(attr, fn):
            record = json.loads(f.attrs[attr])
            fn(record)
            f.attrs[attr] = json.dumps(record)

        if what == "raw":
            if key in ("format", "arch", "padding", "digests"):
                f.attrs[key] = value
            elif key == "format_version":
                f.attrs[key] = value  # a string where an int belongs
            else:
                f.attrs[key] = value
        elif what == "config_key":
            edit("config", lambda c: c.__setitem__(key, value))
        elif what == "config_head":
            edit("config", lambda c: c.__setitem__("head", value))
        elif what == "prep_key":
            edit("preprocessing", lambda p: p.__setitem__(key, value))
        elif what == "quant":
            def quant(extra):
                table = extra.setdefault("activation_quantization", {"dtype": "uint8", "layers": {}})
                extra["simulate_activation_quantization"] = True
                if key == "empty_layers":
                    table["layers"] = {}
                elif key == "scale":
                    table["layers"]["features.conv1"] = [value, 0]
                elif key == "zero":
                    table["layers"]["features.conv1"] = [0.05, value]
                elif key == "dtype":
                    table["dtype"] = value
                elif key == "unknown_layer":
                    table["layers"]["features.nowhere"] = [0.05, 0]
                else:
                    extra["activation_quantization"] = value
            edit("extra", quant)
        elif what == "arch":
            f.attrs["arch"] = value
        elif what == "classes":
            f.attrs["class_names"] = json.dumps(value)
        elif what == "class_ids":
            f.attrs["class_ids"] = json.dumps(value)
        elif what == "operating_point":
            edit("extra", lambda e: e.__setitem__("operating_point", value))
        elif what == "version":
            f.attrs["format_version"] = np.asarray(value) if isinstance(value, list) else value
        elif what == "delete":
            del f.attrs[key]
        elif what == "non_utf8":
            f.attrs[key] = np.bytes_(b"\xff\xfe{\x80")
        elif what == "array_attr":
            f.attrs[key] = np.array([1, 2, 3])


@_settings("attributes")
@given(data=st.data(), kind=st.sampled_from(["plain", "quant"]), signed=st.booleans())
def test_damaged_attributes_are_refused_or_harmless(bases, tmp_path_factory, data, kind, signed):
    what, key, value = data.draw(attribute_damage(bases[kind + "_names"]))
    path = _copy(bases, kind, tmp_path_factory.mktemp("attr"))
    _damage_attribute(path, what, key, value)
    if signed:
        resign(path)
    outcome = assert_loads_or_refuses(path)
    resigned_away = signed and key == "digests"  # resign() rewrote the damaged attribute
    if (what in ("non_utf8", "array_attr") and not resigned_away) or (what == "version" and value not in (2,)):
        assert outcome == "refused", (what, key, value)
