"""The one weight format: a self-describing, versioned HDF5 file.

Layout
------
/                      root attributes (all JSON strings unless noted)
    format             "lightcnn"                       (plain string)
    format_version     1                                (int)
    arch               architecture name, e.g. "mobilenet_v2"   (plain string)
    config             builder keyword arguments, e.g. {"padding": "tf", "bn": false, ...}
    class_names        ["tench", "goldfish", ...]      one per output
    class_ids          ["n01440764", ...] or null       (WordNet IDs for ImageNet)
    preprocessing      lightcnn.preprocess.Preprocessing.to_dict()
    padding            "torch" | "tf"                   (plain string; also inside config)
    provenance         {"source_file", "source_sha256", "converter", "converter_version",
                        "lightcnn_version", "created"}
    extra              free-form JSON (training history, metrics, ...)
/tensors/<path>        float32 datasets; <path> is the model's dotted parameter name with
                       "." replaced by "/", e.g. tensors/features/blocks/3/dw/conv/weight

Loading is strict and by name: a missing, unexpected or wrongly shaped tensor
stops the load with one line naming the file, the tensor, and both shapes.
Writes go to a temporary file in the same folder, then os.replace: a crash
never leaves a half-written checkpoint under the real name.
"""

import datetime
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from lightcnn.errors import CheckpointError

FORMAT = "lightcnn"
FORMAT_VERSION = 1


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


def save_checkpoint(path, ckpt):
    """Write `ckpt` to `path` atomically."""
    import h5py

    from lightcnn import __version__

    tmp = _atomic_target(path)
    provenance = dict(ckpt.provenance)
    provenance.setdefault("lightcnn_version", __version__)
    provenance.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["arch"] = ckpt.arch
            f.attrs["config"] = json.dumps(ckpt.config, sort_keys=True)
            f.attrs["class_names"] = json.dumps(list(ckpt.class_names))
            f.attrs["class_ids"] = json.dumps(None if ckpt.class_ids is None else list(ckpt.class_ids))
            f.attrs["preprocessing"] = json.dumps(ckpt.preprocessing)
            f.attrs["padding"] = ckpt.padding
            f.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
            f.attrs["extra"] = json.dumps(ckpt.extra, sort_keys=True, default=float)
            group = f.create_group("tensors")
            for name, value in ckpt.tensors.items():
                group.create_dataset(name.replace(".", "/"), data=np.asarray(value))
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


def _json_attr(f, path, key, required=True):
    if key not in f.attrs:
        if required:
            raise CheckpointError(f"{path}: missing attribute '{key}' (not a lightcnn checkpoint?)")
        return None
    raw = f.attrs[key]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: attribute '{key}' is not valid JSON ({exc})") from None


def read_checkpoint(path):
    """Read a lightcnn .h5 file into a Checkpoint, or raise CheckpointError with one clear line."""
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
            fmt = f.attrs.get("format")
            if isinstance(fmt, bytes):
                fmt = fmt.decode()
            if fmt != FORMAT:
                raise CheckpointError(f"{path}: HDF5 file without format='{FORMAT}' attribute (not a lightcnn checkpoint)")
            version = int(f.attrs.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise CheckpointError(f"{path}: format_version {version} is newer than this lightcnn reads "
                                      f"({FORMAT_VERSION}); upgrade lightcnn")
            arch = f.attrs.get("arch")
            arch = arch.decode() if isinstance(arch, bytes) else str(arch)
            if "tensors" not in f:
                raise CheckpointError(f"{path}: no 'tensors' group")
            tensors = {}

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    tensors[name.replace("/", ".")] = obj[()]

            f["tensors"].visititems(visit)
            return Checkpoint(
                arch=arch,
                config=_json_attr(f, path, "config"),
                tensors=tensors,
                class_names=_json_attr(f, path, "class_names"),
                class_ids=_json_attr(f, path, "class_ids", required=False),
                preprocessing=_json_attr(f, path, "preprocessing", required=False),
                provenance=_json_attr(f, path, "provenance", required=False) or {},
                extra=_json_attr(f, path, "extra", required=False) or {},
                path=path,
            )
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt HDF5 content ({type(exc).__name__}: {exc})") from None


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
        store[key] = np.ascontiguousarray(value, dtype=np.float32)
    model.params_changed()
    return model
