"""The one weight format: a self-describing, versioned HDF5 file.

Layout
------
/                      root attributes (all JSON strings unless noted)
    format             "lightcnn"                       (plain string)
    format_version     2                                (int; 1 = the same without `digests`, still read)
    arch               architecture name, e.g. "mobilenet_v2"   (plain string)
    config             builder keyword arguments, e.g. {"padding": "tf", "bn": false, ...}
    class_names        ["tench", "goldfish", ...]      one per output
    class_ids          ["n01440764", ...] or null       (WordNet IDs for ImageNet)
    preprocessing      lightcnn.preprocess.Preprocessing.to_dict()
    padding            "torch" | "tf"                   (plain string; also inside config)
    provenance         {"source_file", "source_sha256", "converter", "converter_version",
                        "lightcnn_version", "created"}
    extra              free-form JSON (training history, metrics, ...)
    digests            {"algorithm": "sha256", "metadata": hex, "tensors": {dotted name: hex}}: SHA-256 of the
                       attributes above (metadata_digest) and of each tensor (tensor_digest), checked on read
/tensors/<path>        float32 datasets; <path> is the model's dotted parameter name with
                       "." replaced by "/", e.g. tensors/features/blocks/3/dw/conv/weight

Loading is strict and by name: a missing, unexpected or wrongly shaped tensor
stops the load with one line naming the file, the tensor, and both shapes. Nothing a
file declares is trusted before it is checked (see read_checkpoint); a file that
libhdf5 itself cannot parse can still make libhdf5 misbehave (see the README).
Writes go to a temporary file in the same folder, then os.replace: a crash
never leaves a half-written checkpoint under the real name.
"""

import datetime
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from lightcnn.errors import CheckpointError

FORMAT = "lightcnn"
FORMAT_VERSION = 2  # 2: SHA-256 digests of the metadata and of every tensor (attribute 'digests')


@dataclass
class Checkpoint:
    """Everything a .h5 file holds. `tensors` maps dotted names to arrays."""

    arch: str
    config: dict
    tensors: dict
    class_names: list
    class_ids: list = None
    preprocessing: dict = None
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    path: str = None

    @property
    def padding(self):
        return self.config.get("padding", "torch")


def _umask():
    """The process umask, read without changing it where Linux reports it (os.umask can only set it, and setting
    it to read it would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_target(path):
    """A temporary file beside `path`, with the mode a plain open(path, "w") would give it.

    mkstemp creates files 0600 (private); the file is renamed to `path`, so it gets 0666 minus the umask
    (0644 under the usual umask 022), like any other file the user writes.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return tmp


def atomic_write_bytes(path, data):
    """Write bytes via temp file + fsync + rename."""
    tmp = _atomic_target(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


# -- limits: what a file may declare before anything of it is read -------------------------------------------------
MAX_TENSOR_ELEMENTS = 1 << 28        # one tensor: 1 GiB of float32, 100x MobileNetV2's largest
MAX_TENSORS = 100_000
MAX_EXPANSION = 64                   # declared tensor bytes <= 64 x the file's size (compressed datasets)
MAX_ATTRIBUTE_BYTES = 64 << 20       # one fixed-size attribute
MAX_CLASSES = 100_000
QUANT_SCALE_RANGE = (1e-12, 1e6)     # an activation grid's step; outside it the grid is absurd
_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
# attributes covered by the metadata digest, in this order
_METADATA_KEYS = ("format", "format_version", "arch", "config", "class_names", "class_ids", "preprocessing",
                  "padding", "provenance", "extra")


def tensor_digest(name, value):
    """SHA-256 (hex) of one tensor: its dotted name, dtype, shape and little-endian bytes."""
    value = np.asarray(value)
    value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{name}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


def metadata_digest(attrs):
    """SHA-256 (hex) of the root attributes in _METADATA_KEYS, as stored (strings and the version int)."""
    digest = hashlib.sha256()
    for key in _METADATA_KEYS:
        digest.update(f"{key}={attrs.get(key)!s}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def save_checkpoint(path, ckpt):
    """Write `ckpt` to `path` atomically, with a SHA-256 digest of the metadata and of every tensor."""
    import h5py

    from lightcnn import __version__

    tmp = _atomic_target(path)
    provenance = dict(ckpt.provenance)
    provenance.setdefault("lightcnn_version", __version__)
    provenance.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": ckpt.arch,
             "config": json.dumps(ckpt.config, sort_keys=True),
             "class_names": json.dumps(list(ckpt.class_names)),
             "class_ids": json.dumps(None if ckpt.class_ids is None else list(ckpt.class_ids)),
             "preprocessing": json.dumps(ckpt.preprocessing), "padding": ckpt.padding,
             "provenance": json.dumps(provenance, sort_keys=True),
             "extra": json.dumps(ckpt.extra, sort_keys=True, default=float)}
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            group = f.create_group("tensors")
            digests = {}
            for name, value in ckpt.tensors.items():
                value = np.asarray(value)
                group.create_dataset(name.replace(".", "/"), data=value)
                digests[name] = tensor_digest(name, value)
            f.attrs["digests"] = json.dumps({"algorithm": "sha256", "metadata": metadata_digest(attrs),
                                             "tensors": digests}, sort_keys=True)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    ckpt.provenance = provenance
    return path


def _attr(f, path, key, kinds=("str",), required=True):
    """A scalar root attribute, its size and type checked before its value is read.

    kinds: "str" (a variable- or fixed-length string) and/or "int" (an integer scalar). Returns None when absent
    and not required.
    """
    import h5py

    if key not in f.attrs:
        if required:
            raise CheckpointError(f"{path}: missing attribute '{key}' (not a lightcnn checkpoint?)")
        return None
    aid = h5py.h5a.open(f.id, key.encode())
    shape, dtype = aid.shape, aid.dtype
    is_str = h5py.check_string_dtype(dtype) is not None or dtype.kind == "S"
    is_int = dtype.kind in "iu"
    if shape not in ((), None) or not (("str" in kinds and is_str) or ("int" in kinds and is_int)):
        want = " or ".join({"str": "a string", "int": "an integer"}[k] for k in kinds)
        raise CheckpointError(f"{path}: attribute '{key}' must be {want} scalar, found {dtype} of shape {shape}")
    if aid.get_storage_size() > MAX_ATTRIBUTE_BYTES:
        raise CheckpointError(f"{path}: attribute '{key}' declares {aid.get_storage_size()} bytes")
    raw = f.attrs[key]
    if is_int:
        return int(raw)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: attribute '{key}' is not UTF-8 text") from None
    if not isinstance(raw, str):
        raise CheckpointError(f"{path}: attribute '{key}' must be a string scalar, found {type(raw).__name__}")
    return raw


_JSON_TYPE_NAMES = {dict: "an object", list: "a list", type(None): "null"}


def _json_attr(f, path, key, required=True, types=(dict,)):
    """(parsed value, the stored text) of a JSON attribute whose value must be one of `types`."""
    raw = _attr(f, path, key, required=required)
    if raw is None:
        return None, None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: attribute '{key}' is not valid JSON ({exc})") from None
    if not isinstance(value, types):
        names = " or ".join(_JSON_TYPE_NAMES[t] for t in types)
        raise CheckpointError(f"{path}: attribute '{key}' must be {names}, found {type(value).__name__}")
    return value, raw


def _check_names(path, key, names, allow_none=False):
    if names is None and allow_none:
        return
    if not isinstance(names, list) or not names or len(names) > MAX_CLASSES:
        raise CheckpointError(f"{path}: attribute '{key}' must be a list of 1 to {MAX_CLASSES} names")
    bad = next((n for n in names if not isinstance(n, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: attribute '{key}' holds {bad!r}, not a string")


def check_quantization_table(table, where):
    """Refuse (CheckpointError naming `where`) an activation quantisation table that is not
    {"dtype": "uint8"|"int8", "layers": {path: [scale, zero_point], ...}} with finite scales in QUANT_SCALE_RANGE
    and integer zero points inside the dtype's range."""
    def fail(problem):
        raise CheckpointError(f"{where}: activation quantisation table: {problem}")

    if not isinstance(table, dict) or set(table) != {"dtype", "layers"}:
        fail("expected an object with exactly 'dtype' and 'layers'")
    if table["dtype"] not in _QRANGE:
        fail(f"dtype must be 'uint8' or 'int8', got {table['dtype']!r}")
    layers = table["layers"]
    if not isinstance(layers, dict) or not layers:
        fail("'layers' must be a non-empty object of layer path -> [scale, zero_point]")
    qmin, qmax = _QRANGE[table["dtype"]]
    lo, hi = QUANT_SCALE_RANGE
    for name, grid in layers.items():
        if not (isinstance(grid, list) and len(grid) == 2):
            fail(f"layer {name!r}: expected [scale, zero_point], got {grid!r}"[:200])
        scale, zero = grid
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not lo <= scale <= hi:
            fail(f"layer {name!r}: scale {scale!r} is not a finite number in [{lo:g}, {hi:g}]")
        if isinstance(zero, bool) or not isinstance(zero, int) or not qmin <= zero <= qmax:
            fail(f"layer {name!r}: zero point {zero!r} is not an integer in [{qmin}, {qmax}]")


def _check_extra(path, extra):
    table = extra.get("activation_quantization")
    if table is not None:
        check_quantization_table(table, f"{path}: attribute 'extra'")
    if not isinstance(extra.get("simulate_activation_quantization", False), bool):
        raise CheckpointError(f"{path}: attribute 'extra': simulate_activation_quantization must be true or false")
    op = extra.get("operating_point")
    if op is not None:
        t = op.get("threshold") if isinstance(op, dict) else None
        if (not isinstance(op, dict) or not isinstance(op.get("class"), str) or isinstance(t, bool)
                or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
            raise CheckpointError(f"{path}: attribute 'extra': operating_point must be {{class: name, threshold "
                                  f"in [0, 1]}}, got {op!r}"[:300])


def _tensor_datasets(f, path):
    """[(dotted name, dataset)] under /tensors, each checked from its header only (nothing read yet)."""
    import h5py

    link = f.get("tensors", getlink=True)
    if link is None:
        raise CheckpointError(f"{path}: no 'tensors' group")
    if not isinstance(link, h5py.HardLink):
        raise CheckpointError(f"{path}: 'tensors' is a {type(link).__name__}, not a group in the file")
    group = f["tensors"]
    if not isinstance(group, h5py.Group):
        raise CheckpointError(f"{path}: 'tensors' is a {type(group).__name__}, expected a group")
    found, problems = [], []

    def visit(name, obj):
        if isinstance(obj, h5py.Group):
            return None
        if not isinstance(obj, h5py.Dataset):
            problems.append(f"tensors/{name} is a {type(obj).__name__}, not a dataset")
        elif len(found) >= MAX_TENSORS:
            problems.append(f"more than {MAX_TENSORS} tensors")
        else:
            found.append((name.replace("/", "."), obj))
        return True if problems else None

    group.visititems(visit)
    if problems:
        raise CheckpointError(f"{path}: {problems[0]}")
    limit = max(MAX_EXPANSION * os.path.getsize(path), 1 << 20)
    total = 0
    for name, ds in found:
        shape, dtype = ds.shape, ds.dtype
        if dtype.kind != "f" or dtype.itemsize not in (4, 8):
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}; expected float32 or float64")
        if shape is None or len(shape) > 4:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {shape}; expected at most 4 dimensions")
        size = int(np.prod(shape, dtype=np.float64))
        if size > MAX_TENSOR_ELEMENTS:
            raise CheckpointError(f"{path}: tensor '{name}' declares shape {shape} ({size} elements, more than "
                                  f"{MAX_TENSOR_ELEMENTS})")
        if ds.is_virtual or ds.id.get_create_plist().get_external_count():
            raise CheckpointError(f"{path}: tensor '{name}' keeps its data outside the file")
        total += size * dtype.itemsize
        if total > limit:
            raise CheckpointError(f"{path}: its tensors declare more than {limit} bytes, {MAX_EXPANSION}x the "
                                  "file's size (corrupt or hostile shapes)")
    return found


def read_checkpoint(path):
    """Read a lightcnn .h5 file into a Checkpoint, or raise CheckpointError with one clear line.

    Everything is checked before it is used: the format and its version (an integer scalar), each attribute's
    type and size before its value is read, the JSON records' types, the class names, the activation
    quantisation table; every tensor's dtype (float32/float64), rank and element count from its header before
    any data is read (at most MAX_TENSOR_ELEMENTS each, MAX_EXPANSION x the file's size in all), then its
    values (finite). Files of format version 2 carry SHA-256 digests of the metadata and of every tensor
    (`digests`), checked here: a flipped byte, a deleted or added tensor fails with the name of what changed.
    Version 1 files (no digests) still load. Architecture and config are checked when a model is built
    (lightcnn.api.model_from_checkpoint).
    """
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a .h5 weight file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        reason = str(exc).split(";")[0].split("(")[0].strip() or "unreadable"
        raise CheckpointError(f"{path}: not a readable HDF5 file ({reason})") from None
    try:
        with f:
            if "format" not in f.attrs or _attr(f, path, "format") != FORMAT:
                raise CheckpointError(f"{path}: HDF5 file without format='{FORMAT}' attribute (not a lightcnn checkpoint)")
            version = _attr(f, path, "format_version", kinds=("int",))
            if version > FORMAT_VERSION:
                raise CheckpointError(f"{path}: format_version {version} is newer than this lightcnn reads "
                                      f"({FORMAT_VERSION}); upgrade lightcnn")
            if version < 1:
                raise CheckpointError(f"{path}: format_version {version} is not a version lightcnn ever wrote")
            raw = {"format": FORMAT, "format_version": version, "arch": _attr(f, path, "arch"),
                   "padding": _attr(f, path, "padding", required=False)}
            config, raw["config"] = _json_attr(f, path, "config")
            class_names, raw["class_names"] = _json_attr(f, path, "class_names", types=(list,))
            class_ids, raw["class_ids"] = _json_attr(f, path, "class_ids", required=False, types=(list, type(None)))
            preprocessing, raw["preprocessing"] = _json_attr(f, path, "preprocessing", required=False,
                                                             types=(dict, type(None)))
            provenance, raw["provenance"] = _json_attr(f, path, "provenance", required=False,
                                                       types=(dict, type(None)))
            extra, raw["extra"] = _json_attr(f, path, "extra", required=False, types=(dict, type(None)))
            _check_names(path, "class_names", class_names)
            _check_names(path, "class_ids", class_ids, allow_none=True)
            if class_ids is not None and len(class_ids) != len(class_names):
                raise CheckpointError(f"{path}: {len(class_ids)} class_ids for {len(class_names)} class_names")
            digests = None
            if version >= 2 or "digests" in f.attrs:
                digests, _ = _json_attr(f, path, "digests")
                if (not isinstance(digests.get("metadata"), str) or not isinstance(digests.get("tensors"), dict)
                        or digests.get("algorithm") != "sha256"):
                    raise CheckpointError(f"{path}: attribute 'digests' is not {{algorithm: sha256, metadata, tensors}}")
                if metadata_digest(raw) != digests["metadata"]:
                    raise CheckpointError(f"{path}: metadata does not match its SHA-256 digest (file corrupted or "
                                          "edited after it was written)")
            _check_extra(path, extra or {})
            datasets = _tensor_datasets(f, path)
            if digests is not None:
                listed, stored = set(digests["tensors"]), {name for name, _ in datasets}
                if listed - stored:
                    raise CheckpointError(f"{path}: tensor '{sorted(listed - stored)[0]}' is listed in the digests "
                                          "but missing from the file")
                if stored - listed:
                    raise CheckpointError(f"{path}: tensor '{sorted(stored - listed)[0]}' is not covered by the "
                                          "digests (added after the file was written)")
            tensors = {}
            for name, ds in datasets:
                value = ds[()]
                if digests is not None and tensor_digest(name, value) != digests["tensors"][name]:
                    raise CheckpointError(f"{path}: tensor '{name}' does not match its SHA-256 digest (file "
                                          "corrupted or edited after it was written)")
                if not np.all(np.isfinite(value)):
                    raise CheckpointError(f"{path}: tensor '{name}' contains NaN or Inf")
                tensors[name] = value
            return Checkpoint(arch=raw["arch"], config=config, tensors=tensors, class_names=class_names,
                              class_ids=class_ids, preprocessing=preprocessing, provenance=provenance or {},
                              extra=extra or {}, path=path)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError, OverflowError,
            MemoryError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: corrupt HDF5 content ({type(exc).__name__}: {detail})") from None


def load_state(model, tensors, source="<tensors>"):
    """Copy `tensors` into `model` strictly by name; every mismatch is one line naming the tensor."""
    expected = {}
    for path, layer in model.named_layers():
        for store in (layer.params, layer.buffers):
            for key, value in store.items():
                expected[f"{path}.{key}" if path else key] = (store, key, value)
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: tensor '{missing[0]}' missing{more}; does the file hold a {model.arch}?")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}'{more} for {model.arch}")
    for name, (store, key, current) in expected.items():
        value = np.asarray(tensors[name])
        if value.shape != current.shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {value.shape}, {model.arch} expects "
                                  f"{current.shape}")
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"{source}: tensor '{name}' contains NaN or Inf")
        if key == "running_var" and np.any(value < 0):  # batch norm would take the square root of it
            raise CheckpointError(f"{source}: tensor '{name}' holds negative variances")
        store[key] = np.ascontiguousarray(value, dtype=np.float32)
    model.params_changed()
    return model
