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
restricted ``pickle.Unpickler`` resolves only an allow-list of globals (``_allowed_globals()``) to
stand-ins written here; any other global (``os.system``, ``builtins.eval`` ...) raises
`UnsafePickleError` naming the file and the global, before anything is called. The stand-ins
are made afresh for every file and refuse to be modified (a pickle's BUILD opcode on them
raises), so nothing one file does can change how the next one is read.

Bounds
------
Nothing a file declares is trusted to size an allocation:

* only a regular file of at most ``MAX_FILE_BYTES`` is read;
* a zip member is inflated only after its declared size was checked (a storage's member must
  hold exactly ``numel * itemsize`` bytes), never beyond that size, and all members together
  at most ``MAX_INFLATE_RATIO`` times the archive's size (+ 1 MiB): torch stores members
  uncompressed, so a deflated 1 GiB run of zeros is refused before it is inflated;
* a tensor view must lie inside its storage (``offset + sum((size-1)*stride) < numel``),
  have non-negative sizes/strides, at most ``MAX_NDIM`` dims and ``MAX_TENSOR_ELEMENTS``
  elements, and may repeat storage elements (stride 0, overlapping strides) only up to
  ``MAX_EXPANSION`` times its storage's element count (+ ``EXPANSION_SLACK``); the same
  bound holds for all tensors of the file together. A 20000 x 20000 stride-(0, 0) view of a
  4-element storage is therefore one line, not 1.6 GB.

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
import math
import pickle
import zipfile
from collections import OrderedDict

import numpy as np

from lightcnn._files import printable, read_regular_file
from lightcnn.errors import CheckpointError, LightCNNError, UnsafePickleError

__all__ = ["read_pth"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

MAX_FILE_BYTES = 2 << 30        # the largest registered .pth is 22 MB (mobilenet_v3_large)
MAX_INFLATE_RATIO = 16          # bytes inflated from a zip archive, per byte of the archive (torch stores, ratio 1)
INFLATE_SLACK = 1 << 20
MAX_TENSOR_ELEMENTS = 1 << 28   # 1 GiB of float32; the largest tensor of a registered model has 1.28 M
MAX_EXPANSION = 16              # elements a view may materialise per storage element (stride-0 broadcasts)
EXPANSION_SLACK = 1 << 16       # ... plus this many, so a scalar may still be expanded to a small tensor
MAX_NDIM = 32

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


class _Tampered(pickle.UnpicklingError):
    """Internal: a pickle's BUILD/setattr reached an allow-listed stand-in; reported as UnsafePickleError."""


class _Frozen:
    """Base of the allow-listed stand-ins: attributes are set once in __init__, never by a pickle."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise _Tampered(f"the pickle tried to modify the allow-listed {self!r}")

    def __setstate__(self, state):
        raise _Tampered(f"the pickle tried to modify the allow-listed {self!r}")


class _StorageType(_Frozen):
    """Stand-in for a ``torch.<X>Storage`` class: only its name and element dtype matter."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """One flat storage: element dtype, element count, and (once read) its 1-D data."""

    __slots__ = ("dtype", "numel", "data", "bfloat16")

    def __init__(self, dtype, numel, bfloat16=False):
        self.dtype, self.numel, self.data, self.bfloat16 = dtype, numel, None, bfloat16


class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: a strided view, checked and resolved by `_materialize`."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got no storage")
    # Geometry is only recorded here; `_materialize` checks it where the tensor's name is known.
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


class _Global(_Frozen):
    """An allow-listed callable. Refuses BUILD/setattr so a pickle cannot patch it."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __repr__(self):
        return f"global {self._fn.__name__}"


def _allowed_globals():
    """The allow-list, built afresh for every file (no stand-in is ever shared between two files)."""
    return {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _Global(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_parameter"): _Global(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Global(_rebuild_parameter),
        **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals in `allowed`; storages go through `storage_for(pid)`."""

    def __init__(self, file, path, allowed, storage_for=None):
        super().__init__(file)
        self._path = path
        self._allowed = allowed
        self._storage_for = storage_for

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
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
    """One pickle from `stream` through a fresh unpickler with a fresh allow-list."""
    return _RestrictedUnpickler(stream, path, _allowed_globals(), storage_for).load()


def _new_storage(storage_type, numel, big_endian):
    dtype = storage_type.dtype.newbyteorder(">") if big_endian else storage_type.dtype
    return _Storage(dtype, numel, bfloat16=storage_type.name == "BFloat16Storage")


def _read_zip(path, data):
    budget = MAX_INFLATE_RATIO * len(data) + INFLATE_SLACK  # bytes all members together may inflate to

    def read_member(zf, member, expected=None, what=None, declared=""):
        """A member's bytes, its declared size checked (against `expected` and the budget) before inflating."""
        nonlocal budget
        info = zf.getinfo(member)
        what = what or member
        if expected is not None and info.file_size != expected:
            raise CheckpointError(f"{path}: {what} is {info.file_size} bytes in the archive, "
                                  f"its declared size is {expected} bytes{declared}")
        if info.file_size > budget:
            raise CheckpointError(f"{path}: {what} would inflate to {info.file_size} bytes, over the limit for a "
                                  f"{len(data)}-byte archive ({MAX_INFLATE_RATIO}x + 1 MiB; a zip bomb?)")
        budget -= info.file_size
        with zf.open(info) as f:
            raw = f.read(info.file_size + 1)  # zipfile stops at file_size; +1 would show a lie anyway
        if len(raw) != info.file_size:
            raise CheckpointError(f"{path}: {what} inflates to {len(raw)} bytes, the archive declares "
                                  f"{info.file_size}")
        return raw

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: zip archive has {len(pickles)} '<folder>/data.pkl' members, expected 1")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(zf.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = read_member(zf, prefix + "byteorder").decode(errors="replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r:.40}")
        storages = {}

        def storage_for(pid):
            _, storage_type, key, _location, numel = pid[:5]
            if key not in storages:
                st = _new_storage(storage_type, numel, byteorder == "big")
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise CheckpointError(f"{path}: storage {printable(key)[:80]} has no member "
                                          f"{printable(member)[:120]}")
                raw = read_member(zf, member, numel * st.dtype.itemsize, f"storage {printable(key)[:80]}",
                                  f" ({numel} elements x {st.dtype.itemsize})")
                st.data = np.frombuffer(raw, st.dtype, numel)
                storages[key] = st
            return storages[key]

        return _unpickle(io.BytesIO(read_member(zf, pickles[0])), path, storage_for)


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
        if not (_is_index(view_offset) and _is_index(view_size)):
            raise CheckpointError(f"{path}: storage view {printable(view_key)[:80]} has a bad offset or size "
                                  f"({view_offset!r:.30}, {view_size!r:.30})")
        if view_key not in views:
            views[view_key] = (_new_storage(storage_type, view_size, big_endian), key, view_offset)
        return views[view_key][0]

    obj = _unpickle(stream, path, storage_for)
    keys = _unpickle(stream, path)
    if not isinstance(keys, list) or len(keys) != len(roots) or set(keys) != set(roots):
        raise CheckpointError(f"{path}: storage key list does not match the storages the state_dict uses")
    pos = stream.tell()
    for key in keys:
        st, shown = roots[key], printable(key)[:80]
        if pos + 8 > len(data):
            raise CheckpointError(f"{path}: truncated: storage {shown} starts at byte {pos} past the end "
                                  f"({len(data)} bytes)")
        count = int.from_bytes(data[pos:pos + 8], "big" if big_endian else "little", signed=True)
        nbytes = count * st.dtype.itemsize
        if count != st.numel:
            raise CheckpointError(f"{path}: storage {shown} records {count} elements, the state_dict says {st.numel}")
        if pos + 8 + nbytes > len(data):
            raise CheckpointError(f"{path}: truncated: storage {shown} needs bytes {pos + 8}..{pos + 8 + nbytes}, "
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


def _is_index(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _materialize(path, name, ref, allowance):
    """The tensor `ref` as a C-contiguous native-order array, after checking its view against its storage.

    `allowance` is how many elements the file may still materialise (see "Bounds" in the module docstring).
    """
    st, size, stride, offset = ref.storage, ref.size, ref.stride, ref.offset
    where = f"{path}: tensor {printable(name)[:120]}"
    geometry = f"size {size!r:.80}, stride {stride!r:.80}, offset {offset!r:.30}"
    if st.data is None:
        raise CheckpointError(f"{where} refers to a storage whose data is missing")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and len(size) <= MAX_NDIM
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, *size, *stride))):
        raise CheckpointError(f"{where} has a malformed view ({geometry}; at most {MAX_NDIM} dims)")
    if not all(v >= 0 for v in (offset, *size, *stride)):
        raise CheckpointError(f"{where} has a negative size, stride or offset ({geometry})")
    size, stride = tuple(size), tuple(stride)
    count = math.prod(size)
    if count > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{where} has {count} elements ({geometry}), over the limit of {MAX_TENSOR_ELEMENTS}")
    if count > MAX_EXPANSION * st.numel + EXPANSION_SLACK:
        raise CheckpointError(f"{where} repeats its {st.numel}-element storage into {count} elements ({geometry}); "
                              f"at most {MAX_EXPANSION}x + {EXPANSION_SLACK} is accepted (an expansion bomb?)")
    if count > allowance:
        raise CheckpointError(f"{where} takes the file's tensors past {MAX_EXPANSION}x the elements of its "
                              f"storages ({count} more elements, {allowance} left)")
    if count == 0:
        arr = np.empty(size, st.dtype.newbyteorder("="))
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= st.numel:
            raise CheckpointError(f"{where} ({geometry}) reads past its storage of {st.numel} elements")
        itemsize = st.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(st.data[offset:], shape=size,
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
    `UnsafePickleError` for a global outside the allow-list (or a pickle modifying one) and
    `CheckpointError` for a missing, truncated, malformed or oversized file, or a tensor view
    outside the bounds in the module docstring. Keeps no state between calls.
    """
    where = printable(path)  # file names with control characters still give one line
    data = read_regular_file(path, MAX_FILE_BYTES, CheckpointError, "a PyTorch checkpoint", where)
    try:
        obj = _read_zip(where, data) if data[:4] == _ZIP_MAGIC else _read_legacy(where, data)
        state = _state_dict_of(where, obj)
        refs = []
        for name, ref in state.items():
            if not isinstance(name, str) or not isinstance(ref, _TensorRef):
                raise CheckpointError(f"{where}: entry {printable(repr(name))[:60]} is a {type(ref).__name__}, "
                                      "not a tensor")
            refs.append((name, ref))
        stored = sum({id(ref.storage): ref.storage.numel for _, ref in refs}.values())
        allowance = MAX_EXPANSION * stored + EXPANSION_SLACK
        out = {}
        for name, ref in refs:
            out[name] = _materialize(where, name, ref, allowance)
            allowance -= out[name].size
        return out
    except LightCNNError:
        raise
    except _Tampered as e:
        raise UnsafePickleError(f"{where}: refused: {e}") from None
    except MemoryError:
        raise CheckpointError(f"{where}: out of memory while reading it") from None
    except Exception as e:  # pickle/zip/EOF/struct errors from a damaged file, never a raw traceback
        msg = " ".join(str(e).split())[:200] or "no detail"
        raise CheckpointError(f"{where}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {msg})") from None
