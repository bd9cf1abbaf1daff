"""Read a TFLite model (a FlatBuffer) into tensors, operators and dequantised arrays.

FlatBuffers in five rules (all integers little-endian)
-----------------------------------------------------
1. The file starts with a uint32 offset to the root table, then the 4-byte file
   identifier, ``b"TFL3"`` for TFLite.
2. A *table* at position ``t`` starts with an int32 ``soffset``; its *vtable* lives at
   ``t - soffset``: uint16 vtable size in bytes, uint16 table size, then one uint16 per
   field id giving the field's position relative to ``t`` (0, or an id beyond the vtable,
   means "absent: use the schema default").
3. Scalars are stored inline. Tables, vectors and strings are stored by reference: a
   uint32 at position ``p`` pointing to ``p + value``.
4. A vector is a uint32 element count followed by the elements; a vector of tables holds
   one uint32 reference per element (each relative to its own position). A string is a
   vector of bytes (plus a NUL not counted).
5. A union field takes two ids: a ubyte type tag (id n) then the table reference (id n+1).

The TFLite schema subset read here (field ids in brackets)
----------------------------------------------------------
Model: version[0] operator_codes[1] subgraphs[2] description[3] buffers[4]
OperatorCode: deprecated_builtin_code:byte[0] custom_code[1] version[2] builtin_code:int[3]
    (old files only fill the byte; codes > 127 live only in builtin_code; the code is the max)
SubGraph: tensors[0] inputs[1] outputs[2] operators[3] name[4]
Tensor: shape[0] type[1] buffer[2] name[3] quantization[4]
QuantizationParameters: min[0] max[1] scale[2] zero_point:long[3] details[4,5] quantized_dimension[6]
Operator: opcode_index[0] inputs[1] outputs[2] builtin_options[3 type, 4 table]
Buffer: data[0] offset:ulong[1] size:ulong[2] (offset/size only for data outside a >2 GB flatbuffer)
Options tables, in `_OPTIONS` below: Conv2D, DepthwiseConv2D, Pool2D, FullyConnected,
Softmax, Add/Mul/Sub/Div, Reshape, Reducer (MEAN...), Concatenation.

Quantisation: real = scale * (q - zero_point); with several scales, scale[c] applies to
index c along ``quantized_dimension`` (per-channel: axis 0 of a conv kernel OHWI, axis 3
of a depthwise kernel 1HWC). int32 biases use scale = input_scale * weight_scale, zp 0.

Layouts stay TFLite's: activations NHWC, conv kernels (O, KH, KW, I), depthwise kernels
(1, KH, KW, C*M), fully-connected (O, I). Only subgraph 0 is read. Every read is
bounds-checked, so a truncated or garbled file raises `CheckpointError`, never IndexError.
Only a regular file of at most ``MAX_FILE_BYTES`` is read; a constant tensor must have at most
``MAX_TENSOR_ELEMENTS`` elements and exactly the bytes its shape needs, and all constants
together copy at most ``MAX_COPY_RATIO`` times the file's size (+ 1 MiB) out of it.
"""

import math
import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lightcnn._files import printable, read_regular_file
from lightcnn.errors import CheckpointError, LightCNNError

__all__ = ["TFLiteModel", "TFLiteOperator", "TFLiteTensor", "dequantize", "read_tflite"]

FILE_IDENTIFIER = b"TFL3"

MAX_FILE_BYTES = 2 << 30          # a flatbuffer addresses at most 2 GiB; the registered files are 2.6-4 MB
MAX_TENSOR_ELEMENTS = 1 << 28     # same cap as the .pth reader
MAX_COPY_RATIO = 4                # constant bytes copied out, per byte of the file (+ 1 MiB): tensors sharing
COPY_SLACK = 1 << 20              # one buffer cannot multiply a small file into gigabytes

# BuiltinOperator enum (schema.fbs), by value.
BUILTIN_OPERATORS = (
    "ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE "
    "EMBEDDING_LOOKUP FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D "
    "LOCAL_RESPONSE_NORMALIZATION LOGISTIC LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU RELU_N1_TO_1 "
    "RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX SPACE_TO_DEPTH SVDF TANH CONCAT_EMBEDDINGS SKIP_GRAM "
    "CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD UNIDIRECTIONAL_SEQUENCE_RNN GATHER BATCH_TO_SPACE_ND "
    "SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB DIV SQUEEZE UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE "
    "BIDIRECTIONAL_SEQUENCE_RNN EXP TOPK_V2 SPLIT LOG_SOFTMAX DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM "
    "CAST PRELU MAXIMUM ARG_MAX MINIMUM LESS NEG PADV2 GREATER GREATER_EQUAL LESS_EQUAL SELECT SLICE "
    "SIN TRANSPOSE_CONV SPARSE_TO_DENSE TILE EXPAND_DIMS EQUAL NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW "
    "ARG_MIN FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK LOGICAL_OR ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK "
    "REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD RANGE RESIZE_NEAREST_NEIGHBOR "
    "LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL REVERSE_V2 ADD_N GATHER_ND COS "
    "WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE MATRIX_SET_DIAG ROUND HARD_SWISH IF WHILE "
    "NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM "
    "BATCH_MATMUL PLACEHOLDER_FOR_GREATER_OP_CODES CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D IMAG "
    "REAL COMPLEX_ABS HASHTABLE HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL "
    "CONV_3D_TRANSPOSE VAR_HANDLE READ_VARIABLE ASSIGN_VARIABLE BROADCAST_ARGS RANDOM_STANDARD_NORMAL "
    "BUCKETIZE RANDOM_UNIFORM MULTINOMIAL GELU"
).split()

# TensorType enum -> (name, NumPy dtype or None when NumPy has no equivalent).
TENSOR_TYPES = {
    0: ("FLOAT32", "<f4"), 1: ("FLOAT16", "<f2"), 2: ("INT32", "<i4"), 3: ("UINT8", "u1"),
    4: ("INT64", "<i8"), 5: ("STRING", None), 6: ("BOOL", "?"), 7: ("INT16", "<i2"),
    8: ("COMPLEX64", "<c8"), 9: ("INT8", "i1"), 10: ("FLOAT64", "<f8"), 11: ("COMPLEX128", "<c16"),
    12: ("UINT64", "<u8"), 13: ("RESOURCE", None), 14: ("VARIANT", None), 15: ("UINT32", "<u4"),
    16: ("UINT16", "<u2"), 17: ("INT4", None),
}
PADDINGS = ("SAME", "VALID")
ACTIVATIONS = ("NONE", "RELU", "RELU_N1_TO_1", "RELU6", "TANH", "SIGN_BIT")

# Options tables: opcode -> (BuiltinOptions union tag, ((key, field id, kind, default), ...)).
# kind: i32 int, f32 float, bool, pad (Padding enum), act (ActivationFunctionType), ivec [int].
_CONV = (("padding", 0, "pad", 0), ("stride_w", 1, "i32", 0), ("stride_h", 2, "i32", 0),
         ("activation", 3, "act", 0), ("dilation_w", 4, "i32", 1), ("dilation_h", 5, "i32", 1))
_DEPTHWISE = (("padding", 0, "pad", 0), ("stride_w", 1, "i32", 0), ("stride_h", 2, "i32", 0),
              ("depth_multiplier", 3, "i32", 0), ("activation", 4, "act", 0),
              ("dilation_w", 5, "i32", 1), ("dilation_h", 6, "i32", 1))
_POOL = (("padding", 0, "pad", 0), ("stride_w", 1, "i32", 0), ("stride_h", 2, "i32", 0),
         ("filter_w", 3, "i32", 0), ("filter_h", 4, "i32", 0), ("activation", 5, "act", 0))
_ACT_ONLY = (("activation", 0, "act", 0),)
_OPTIONS = {
    "CONV_2D": (1, _CONV),
    "DEPTHWISE_CONV_2D": (2, _DEPTHWISE),
    "AVERAGE_POOL_2D": (5, _POOL),
    "MAX_POOL_2D": (5, _POOL),
    "L2_POOL_2D": (5, _POOL),
    "FULLY_CONNECTED": (8, (("activation", 0, "act", 0), ("weights_format", 1, "u8", 0),
                            ("keep_num_dims", 2, "bool", False))),
    "SOFTMAX": (9, (("beta", 0, "f32", 0.0),)),
    "CONCATENATION": (10, (("axis", 0, "i32", 0), ("activation", 1, "act", 0))),
    "ADD": (11, _ACT_ONLY),
    "RESHAPE": (17, (("new_shape", 0, "ivec", None),)),
    "MUL": (21, _ACT_ONLY),
    "PAD": (22, ()),
    "MEAN": (27, (("keep_dims", 0, "bool", False),)),
    "SUM": (27, (("keep_dims", 0, "bool", False),)),
    "REDUCE_MAX": (27, (("keep_dims", 0, "bool", False),)),
    "SUB": (28, _ACT_ONLY),
    "DIV": (29, _ACT_ONLY),
}
_SCALARS = {"i32": "<i", "u8": "<B", "f32": "<f", "bool": "<?", "pad": "<b", "act": "<b"}


class _Malformed(Exception):
    """Internal: a read fell outside the file or hit an impossible value."""


class _Buffer:
    """The file bytes with bounds-checked little-endian reads."""

    def __init__(self, data):
        self.data = data
        self.size = len(data)

    def check(self, pos, nbytes):
        if pos < 0 or nbytes < 0 or pos + nbytes > self.size:
            raise _Malformed(f"read of {nbytes} bytes at offset {pos} is outside the {self.size}-byte file")

    def scalar(self, fmt, pos):
        self.check(pos, struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.data, pos)[0]

    def table(self, pos):
        return _Table(self, pos)


class _Table:
    """One FlatBuffers table: resolves field ids through its vtable."""

    def __init__(self, buf, pos):
        self.buf, self.pos = buf, pos
        self.vtable = pos - buf.scalar("<i", pos)
        self.vt_size = buf.scalar("<H", self.vtable)
        if self.vt_size < 4 or self.vt_size % 2:
            raise _Malformed(f"bad vtable size {self.vt_size} at offset {self.vtable}")
        buf.check(self.vtable, self.vt_size)

    def _field(self, fid):
        slot = 4 + 2 * fid
        if slot >= self.vt_size:
            return None
        off = self.buf.scalar("<H", self.vtable + slot)
        return self.pos + off if off else None

    def scalar(self, fid, fmt, default):
        p = self._field(fid)
        return default if p is None else self.buf.scalar(fmt, p)

    def _ref(self, fid):
        p = self._field(fid)
        return None if p is None else p + self.buf.scalar("<I", p)

    def table(self, fid):
        p = self._ref(fid)
        return None if p is None else _Table(self.buf, p)

    def vector(self, fid, itemsize):
        """(start of the elements, count) or None; the whole vector is bounds-checked."""
        p = self._ref(fid)
        if p is None:
            return None
        n = self.buf.scalar("<I", p)
        self.buf.check(p + 4, n * itemsize)
        return p + 4, n

    def array(self, fid, dtype):
        dtype = np.dtype(dtype)
        v = self.vector(fid, dtype.itemsize)
        if v is None:
            return np.zeros(0, dtype)
        return np.frombuffer(self.buf.data, dtype, v[1], v[0]).copy()

    def tables(self, fid):
        v = self.vector(fid, 4)
        if v is None:
            return []
        start, n = v
        return [_Table(self.buf, p + self.buf.scalar("<I", p)) for p in range(start, start + 4 * n, 4)]

    def string(self, fid):
        v = self.vector(fid, 1)
        return "" if v is None else bytes(self.buf.data[v[0]:v[0] + v[1]]).decode("utf-8", "replace")


@dataclass(frozen=True, eq=False)
class TFLiteTensor:
    """One tensor of subgraph 0. ``data`` is the constant's array (file dtype and shape) or None."""

    index: int
    name: str
    shape: tuple
    type_name: str                 # TensorType name, e.g. "UINT8", "INT8", "INT32", "FLOAT32"
    dtype: object                  # np.dtype, or None for types NumPy lacks (STRING, INT4, ...)
    buffer: int
    scale: np.ndarray              # float32 (0,) when not quantised, (1,) per-tensor, (C,) per-channel
    zero_point: np.ndarray         # int64, same length as scale (or 1)
    quantized_dimension: int
    data: object = field(repr=False, default=None)

    @property
    def is_quantized(self):
        return self.scale.size > 0

    @property
    def is_constant(self):
        return self.data is not None


@dataclass(frozen=True, eq=False)
class TFLiteOperator:
    """One operator in execution order. ``inputs``/``outputs`` are tensor indices (-1 = absent)."""

    index: int
    opcode: str                    # BuiltinOperator name, e.g. "CONV_2D"
    inputs: tuple
    outputs: tuple
    options: dict                  # e.g. padding "SAME", stride_h 2, activation "RELU6", filter_h 7


@dataclass(frozen=True, eq=False)
class TFLiteModel:
    """Subgraph 0 of a TFLite file, plus the model-level version and description."""

    path: str
    version: int
    description: str
    opcodes: list                  # the operator_codes table, resolved to names
    tensors: list
    operators: list
    inputs: tuple
    outputs: tuple

    def tensor_value(self, i, dequantize=True):
        """Constant tensor ``i`` as an array; quantised ones dequantised to float32 by default.

        ``dequantize=False`` gives the stored integers. Unquantised tensors (float
        weights, int32 shape vectors) come back in their own dtype.
        """
        t = self.tensors[i]
        if t.dtype is None:
            raise CheckpointError(f"{self.path}: tensor {i} ({t.name}) has type {t.type_name}, "
                                  "which has no NumPy equivalent")
        if t.data is None:
            raise CheckpointError(f"{self.path}: tensor {i} ({t.name}) has no constant data "
                                  "(it is an activation or an empty buffer)")
        if dequantize and t.is_quantized:
            return _dequantize(t.data, t.scale, t.zero_point, t.quantized_dimension)
        return t.data.copy()

    def op_counts(self):
        """{opcode: number of operators} in first-seen order."""
        return dict(Counter(op.opcode for op in self.operators))


def dequantize(q, scale, zero_point, quantized_dimension=0):
    """real = scale * (q - zero_point) as float32; per-channel along ``quantized_dimension``.

    Computed in float64 and rounded once, like TFLite's Dequantize kernel (double scale).
    """
    q = np.asarray(q)
    scale = np.asarray(scale, np.float64)
    zp = np.asarray(zero_point, np.float64)
    if scale.size > 1:
        if q.ndim == 0 or q.shape[quantized_dimension] != scale.size:
            raise ValueError(f"{scale.size} scales do not fit axis {quantized_dimension} of shape {q.shape}")
        bshape = [1] * q.ndim
        bshape[quantized_dimension] = scale.size
        scale = scale.reshape(bshape)
        zp = zp.reshape(bshape) if zp.size == scale.size else zp.reshape(-1)[:1]
    else:
        scale, zp = scale.reshape(-1)[0], (zp.reshape(-1)[0] if zp.size else 0.0)
    return ((q.astype(np.float64) - zp) * scale).astype(np.float32)


_dequantize = dequantize  # TFLiteModel.tensor_value's parameter shadows the name


def _options(op_table, opcode, buf):
    tag = op_table.scalar(3, "<B", 0)
    spec = _OPTIONS.get(opcode)
    if spec is None:
        return {}
    want_tag, fields = spec
    if tag not in (0, want_tag):
        raise _Malformed(f"{opcode} carries options of union type {tag}, expected {want_tag}")
    table = op_table.table(4) if tag else None
    out = {}
    for key, fid, kind, default in fields:
        if kind == "ivec":
            value = None if table is None else table.array(fid, "<i4")
            out[key] = None if value is None else tuple(int(v) for v in value)
            continue
        value = default if table is None else table.scalar(fid, _SCALARS[kind], default)
        if kind == "pad":
            if not 0 <= value < len(PADDINGS):
                raise _Malformed(f"{opcode} has unknown padding {value}")
            value = PADDINGS[value]
        elif kind == "act":
            if not 0 <= value < len(ACTIVATIONS):
                raise _Malformed(f"{opcode} has unknown fused activation {value}")
            value = ACTIVATIONS[value]
        out[key] = value
    return out


def _buffer_bytes(buf, buffers, index):
    if index == 0:
        return None  # buffer 0 is the empty sentinel
    if index >= len(buffers):
        raise _Malformed(f"buffer index {index} out of range ({len(buffers)} buffers)")
    b = buffers[index]
    v = b.vector(0, 1)
    if v is not None and v[1] > 0:
        return buf.data[v[0]:v[0] + v[1]]
    offset, size = b.scalar(1, "<Q", 0), b.scalar(2, "<Q", 0)
    if offset > 1:  # data stored after the flatbuffer (models > 2 GB)
        buf.check(offset, size)
        return buf.data[offset:offset + size]
    return None


def _tensor(buf, buffers, index, t, budget):
    type_id = t.scalar(1, "<b", 0)
    if type_id not in TENSOR_TYPES:
        raise _Malformed(f"tensor {index} has unknown type {type_id}")
    type_name, dtype = TENSOR_TYPES[type_id]
    dtype = None if dtype is None else np.dtype(dtype)
    shape = tuple(int(s) for s in t.array(0, "<i4"))
    name = t.string(3)
    buffer = t.scalar(2, "<I", 0)
    q = t.table(4)
    scale = np.zeros(0, np.float32) if q is None else q.array(2, "<f4")
    zero_point = np.zeros(0, np.int64) if q is None else q.array(3, "<i8")
    qdim = 0 if q is None else q.scalar(6, "<i", 0)
    if scale.size > 1 and not (0 <= qdim < len(shape) and shape[qdim] == scale.size):
        raise _Malformed(f"tensor {index} ({name}) has {scale.size} scales but shape {shape} on axis {qdim}")
    if t._field(6) is not None:
        raise _Malformed(f"tensor {index} ({name}) is stored sparse, which this reader does not support")
    raw = _buffer_bytes(buf, buffers, buffer)
    data = None
    if raw is not None and dtype is not None:
        if any(s < 0 for s in shape):
            raise _Malformed(f"constant tensor {index} ({name}) has dynamic shape {shape}")
        count = math.prod(shape)  # Python ints: no int64 wrap-around that could match a small buffer
        if count > MAX_TENSOR_ELEMENTS:
            raise _Malformed(f"tensor {index} ({name}) shape {shape} has {count} elements, over the limit of "
                             f"{MAX_TENSOR_ELEMENTS}")
        if len(raw) != count * dtype.itemsize:
            raise _Malformed(f"tensor {index} ({name}) shape {shape} {type_name} needs "
                             f"{count * dtype.itemsize} bytes, its buffer {buffer} has {len(raw)}")
        budget[0] -= len(raw)
        if budget[0] < 0:
            raise _Malformed(f"tensor {index} ({name}) takes the constants copied out past {MAX_COPY_RATIO}x the "
                             "file's size (many tensors sharing one buffer?)")
        data = np.frombuffer(raw, dtype, count).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    return TFLiteTensor(index, name, shape, type_name, dtype, buffer, scale, zero_point, qdim, data)


def _parse(path, data):
    buf = _Buffer(data)
    if buf.size < 8:
        raise _Malformed(f"only {buf.size} bytes, too short for a flatbuffer")
    if bytes(data[4:8]) != FILE_IDENTIFIER:
        raise CheckpointError(f"{path}: not a TFLite file (identifier {bytes(data[4:8])!r}, expected b'TFL3')")
    model = buf.table(buf.scalar("<I", 0))
    opcodes = []
    for oc in model.tables(1):
        code = max(oc.scalar(0, "<b", 0), oc.scalar(3, "<i", 0))
        opcodes.append(BUILTIN_OPERATORS[code] if 0 <= code < len(BUILTIN_OPERATORS) else f"BUILTIN_{code}")
    subgraphs = model.tables(2)
    if not subgraphs:
        raise _Malformed("the model has no subgraph")
    sg = subgraphs[0]
    buffers = model.tables(4)
    budget = [MAX_COPY_RATIO * buf.size + COPY_SLACK]  # bytes the constants may still copy out of the file
    tensors = [_tensor(buf, buffers, i, t, budget) for i, t in enumerate(sg.tables(0))]

    def indices(table, fid, what):
        idx = tuple(int(i) for i in table.array(fid, "<i4"))
        if any(not -1 <= i < len(tensors) for i in idx):
            raise _Malformed(f"{what} refers to a tensor index outside 0..{len(tensors) - 1}")
        return idx

    operators = []
    for k, op in enumerate(sg.tables(3)):
        code_index = op.scalar(0, "<I", 0)
        if code_index >= len(opcodes):
            raise _Malformed(f"operator {k} uses opcode index {code_index} of {len(opcodes)}")
        opcode = opcodes[code_index]
        operators.append(TFLiteOperator(k, opcode, indices(op, 1, f"operator {k}"),
                                        indices(op, 2, f"operator {k}"), _options(op, opcode, buf)))
    return TFLiteModel(str(path), model.scalar(0, "<I", 0), model.string(3), opcodes, tensors, operators,
                       indices(sg, 1, "subgraph inputs"), indices(sg, 2, "subgraph outputs"))


def read_tflite(path):
    """Parse a ``.tflite`` file -> `TFLiteModel` (subgraph 0). Raises `CheckpointError` on bad files."""
    name = printable(path)  # one line even for a file name with control characters
    data = read_regular_file(path, MAX_FILE_BYTES, CheckpointError, "a TFLite model", name)
    path = name
    try:
        return _parse(path, data)
    except LightCNNError:
        raise
    except (_Malformed, struct.error, ValueError, IndexError, OverflowError, MemoryError) as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: unreadable TFLite flatbuffer (truncated or corrupt?): {msg}") from None
