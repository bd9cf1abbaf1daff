"""Read a PyTorch ``.pth`` state_dict into NumPy arrays without importing torch.

What ``torch.save(model.state_dict(), f)`` writes
-------------------------------------------------
A state_dict is an ``OrderedDict`` of name -> tensor. Pickle cannot hold tensor memory,
so torch pickles each tensor as a call ::

    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
                                    requires_grad, backward_hooks[, metadata])

where ``storage`` is a *persistent id* -- a tuple the pickle leaves for the loader to
resolve -- and ``size``/``stride``/``storage_offset`` are in elements, so a tensor is a
strided view into a flat storage (several tensors may share one). Two containers exist:

* **zip** (torch >= 1.6; here ``mobilenet_v3_*.pth``): an uncompressed zip whose members
  sit under one top folder ``<name>/``: ``data.pkl`` (the pickle), ``byteorder``
  ("little"), ``version``, and ``data/<key>``, the raw bytes of each storage. The
  persistent id is ``('storage', torch.FloatStorage, key, location, numel)``.

* **legacy** (torch < 1.6 and the original torchvision files; here ``mobilenet_v2.pth``,
  ``squeezenet1_*.pth``): five things back to back in one stream:

    1. pickle: magic number 0x1950a86a20f9469cfc6c
    2. pickle: protocol version 1001
    3. pickle: sys_info ``{'protocol_version', 'little_endian', 'type_sizes'}``
    4. pickle: the state_dict; persistent id
       ``('storage', torch.FloatStorage, root_key, location, numel, view_metadata)``
    5. pickle: the sorted list of storage keys
    then for each key in that order: an int64 little-endian element count followed by
    count * element_size raw bytes. The stream ends exactly there.

Safety
------
Unpickling can call any importable function, so nothing here uses ``pickle.load``. A
restricted ``pickle.Unpickler`` resolves only an allow-list of globals (``_ALLOWED``) to
stand-ins written here; any other global (``os.system``, ``builtins.eval`` ...) raises
`UnsafePickleError` naming the file and the global, before anything is called.

Output
------
``read_pth(path)`` returns ``{name: ndarray}`` in the file's order, each array a
C-contiguous copy in native byte order with the tensor's shape: float32 / float64 /
float16 / int64 / int32 / int16 / int8 / uint8 / bool as stored (``num_batches_tracked``
is an int64 0-d array); bfloat16 (no NumPy dtype) is widened losslessly to float32.
A checkpoint that wraps the state_dict as ``{'state_dict': ...}`` or ``{'model': ...}`` is
unwrapped. Layouts stay PyTorch's (conv weights OIHW).
"""

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from lightcnn.errors import CheckpointError, LightCNNError, UnsafePickleError

__all__ = ["read_pth"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# torch.<Name>Storage -> dtype of its elements (little-endian; flipped for big-endian files).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # raw bits; widened to float32 at the end
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}


class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class: only its name and element dtype matter."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """One flat storage: element dtype, element count, and (once read) its 1-D data."""

    __slots__ = ("dtype", "numel", "data", "bfloat16")

    def __init__(self, dtype, numel, bfloat16=False):
        self.dtype, self.numel, self.data, self.bfloat16 = dtype, numel, None, bfloat16


class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: a strided view, resolved once storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got no storage")
    ints = (storage_offset, *size, *stride)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride} offset={storage_offset}")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


class _Global:
    """An allow-listed callable. Refuses BUILD/setattr so a pickle cannot patch it."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError("a pickle tried to modify an allow-listed global")

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a pickle tried to modify an allow-listed global")


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Global(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Global(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Global(_rebuild_parameter),
    **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals; storages go through `storage_for(pid)`."""

    def __init__(self, file, path, storage_for=None):
        super().__init__(file)
        self._path = path
        self._storage_for = storage_for

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._path}: refused to unpickle global '{module}.{name}' "
                "(only tensor-rebuilding globals are allowed; the file may try to run code)"
            ) from None

    def persistent_load(self, pid):
        if self._storage_for is None:
            raise pickle.UnpicklingError("persistent id outside the state_dict pickle")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return self._storage_for(pid)


def _unpickle(stream, path, storage_for=None):
    return _RestrictedUnpickler(stream, path, storage_for).load()


def _new_storage(storage_type, numel, big_endian):
    dtype = storage_type.dtype.newbyteorder(">") if big_endian else storage_type.dtype
    return _Storage(dtype, numel, bfloat16=storage_type.name == "BFloat16Storage")


def _read_zip(path, data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: zip archive has {len(pickles)} '<folder>/data.pkl' members, expected 1")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(zf.namelist())
        byteorder = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
        storages = {}

        def storage_for(pid):
            _, storage_type, key, _location, numel = pid[:5]
            if key not in storages:
                st = _new_storage(storage_type, numel, byteorder == "big")
                raw = zf.read(f"{prefix}data/{key}")
                if len(raw) != numel * st.dtype.itemsize:
                    raise CheckpointError(f"{path}: storage {key} holds {len(raw)} bytes, expected "
                                          f"{numel} x {st.dtype.itemsize}")
                st.data = np.frombuffer(raw, st.dtype, numel)
                storages[key] = st
            return storages[key]

        return _unpickle(io.BytesIO(zf.read(pickles[0])), path, storage_for)


def _read_legacy(path, data):
    stream = io.BytesIO(data)
    magic = _unpickle(stream, path)
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy magic number)")
    protocol = _unpickle(stream, path)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: legacy protocol version {protocol!r}, only {_LEGACY_PROTOCOL} is known")
    sys_info = _unpickle(stream, path)
    if not isinstance(sys_info, dict):
        raise CheckpointError(f"{path}: malformed sys_info record")
    big_endian = not sys_info.get("little_endian", True)
    roots, views = {}, {}

    def storage_for(pid):
        _, storage_type, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None
        if key not in roots:
            roots[key] = _new_storage(storage_type, numel, big_endian)
        if view is None:
            return roots[key]
        view_key, view_offset, view_size = view  # old torch: a storage that is a slice of another
        if view_key not in views:
            views[view_key] = (_new_storage(storage_type, view_size, big_endian), key, view_offset)
        return views[view_key][0]

    obj = _unpickle(stream, path, storage_for)
    keys = _unpickle(stream, path)
    if not isinstance(keys, list) or set(keys) != set(roots):
        raise CheckpointError(f"{path}: storage key list does not match the storages the state_dict uses")
    pos = stream.tell()
    for key in keys:
        st = roots[key]
        if pos + 8 > len(data):
            raise CheckpointError(f"{path}: truncated: storage {key} starts at byte {pos} past the end ({len(data)} bytes)")
        count = int.from_bytes(data[pos:pos + 8], "big" if big_endian else "little", signed=True)
        nbytes = count * st.dtype.itemsize
        if count != st.numel:
            raise CheckpointError(f"{path}: storage {key} records {count} elements, the state_dict says {st.numel}")
        if pos + 8 + nbytes > len(data):
            raise CheckpointError(f"{path}: truncated: storage {key} needs bytes {pos + 8}..{pos + 8 + nbytes}, "
                                  f"file has {len(data)}")
        st.data = np.frombuffer(data, st.dtype, count, pos + 8)
        pos += 8 + nbytes
    if pos != len(data):
        raise CheckpointError(f"{path}: {len(data) - pos} unexpected bytes after the last storage")
    for view_st, root_key, offset in views.values():
        root = roots[root_key]
        if offset + view_st.numel > root.numel:
            raise CheckpointError(f"{path}: storage view exceeds its root storage {root_key}")
        view_st.data = root.data[offset:offset + view_st.numel]
    return obj


def _materialize(path, name, ref):
    st = ref.storage
    if st.data is None:
        raise CheckpointError(f"{path}: tensor {name} refers to a storage whose data is missing")
    size, stride, itemsize = ref.size, ref.stride, st.dtype.itemsize
    if 0 in size:
        arr = np.empty(size, st.dtype)
    else:
        last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= st.numel:
            raise CheckpointError(f"{path}: tensor {name} (size {size}, stride {stride}, offset {ref.offset}) "
                                  f"reads past its storage of {st.numel} elements")
        view = np.lib.stride_tricks.as_strided(st.data[ref.offset:], shape=size,
                                               strides=[s * itemsize for s in stride], writeable=False)
        arr = np.array(view, dtype=st.dtype.newbyteorder("="), order="C", copy=True)
    if st.bfloat16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _state_dict_of(path, obj):
    if isinstance(obj, dict) and not any(isinstance(v, _TensorRef) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                return obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: top-level object is {type(obj).__name__}, expected a state_dict")
    return obj


def read_pth(path):
    """Read a PyTorch state_dict file (zip or legacy format) -> ``{name: ndarray}`` in file order.

    No torch import and no arbitrary code: see the module docstring. Raises
    `UnsafePickleError` for a global outside the allow-list and `CheckpointError` for a
    missing, truncated or malformed file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        obj = _read_zip(path, data) if data[:4] == _ZIP_MAGIC else _read_legacy(path, data)
        state = _state_dict_of(path, obj)
        out = {}
        for name, ref in state.items():
            if not isinstance(name, str) or not isinstance(ref, _TensorRef):
                raise CheckpointError(f"{path}: entry {name!r:.60} is a {type(ref).__name__}, not a tensor")
            out[name] = _materialize(path, name, ref)
        return out
    except LightCNNError:
        raise
    except Exception as e:  # pickle/zip/EOF/struct errors from a damaged file, never a raw traceback
        msg = " ".join(str(e).split()) or "no detail"
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {msg})") from None
