"""Read the SqueezeNet v1.0 Deep-Compression file (``compressed_SqueezeNet.net``) into dense arrays.

Deep Compression (Han et al., 2016) prunes a network, then shares weights through a
256-entry codebook per layer; this file stores the result before Huffman coding.
All numbers are little-endian, for the 26 conv layers of `LAYERS` in this order:

  header       26 x uint32              N[l] = stored entries of layer l
  per layer l, four contiguous blocks:
    codebook   256 x float32            entry 0 is 0.0
    bias       out_channels x float32   dense
    codes      N[l] x uint8             codebook index of each stored entry
    gaps       ceil(N[l] / 2) bytes     N[l] 4-bit gaps, two per byte, low nibble first

Decoding: stored entry j sits at flat position ``sum_{i<=j}(gap_i + 1) - 1`` of the weight
in Caffe order (out, in, kh, kw), C-contiguous, and has the value ``codebook[code_j]``;
every position never named is 0. A gap is at most 15, so longer zero runs are bridged
by filler entries with code 0: N (422,083 in all) exceeds the non-zero count (415,921).

The file must be consumed exactly: its size has to equal
``26*4 + sum(1024 + 4*out_channels + N + ceil(N/2))`` (675,763 bytes). Only a regular file
no larger than the all-weights-stored maximum (``MAX_FILE_BYTES``) is read.

(The original decoder would use 4-bit codes for layers named fc/ip; this network has none.)
"""

from typing import NamedTuple

import numpy as np

from lightcnn._files import printable, read_regular_file
from lightcnn.errors import CheckpointError

__all__ = ["LAYERS", "ConvShape", "CompressedLayer", "read_deep_compression", "read_deep_compression_raw"]

CODEBOOK_SIZE = 256


class ConvShape(NamedTuple):
    name: str
    out_channels: int
    in_channels: int
    kernel: int          # square kernels only in this network


def _fire(n, squeeze, expand, in_channels):
    return (ConvShape(f"fire{n}/conv1x1_1", squeeze, in_channels, 1),   # squeeze 1x1
            ConvShape(f"fire{n}/conv1x1_2", expand, squeeze, 1),        # expand 1x1
            ConvShape(f"fire{n}/conv3x3_2", expand, squeeze, 3))        # expand 3x3


# Weight order of the file = parameterised layers of the deploy prototxt, in network order.
LAYERS = (
    ConvShape("conv1", 96, 3, 7),
    # fire  n  squeeze expand  in = previous fire's 2*expand
    *_fire(2, 16, 64, 96),
    *_fire(3, 16, 64, 128),
    *_fire(4, 32, 128, 128),
    *_fire(5, 32, 128, 256),
    *_fire(6, 48, 192, 256),
    *_fire(7, 48, 192, 384),
    *_fire(8, 64, 256, 384),
    *_fire(9, 64, 256, 512),
    ConvShape("conv_final", 1000, 512, 1),
)


# The largest file the header could describe (every weight stored): larger files are refused unread.
MAX_FILE_BYTES = 4 * len(LAYERS) + sum(
    4 * CODEBOOK_SIZE + 4 * s.out_channels + (n := s.out_channels * s.in_channels * s.kernel ** 2) + (n + 1) // 2
    for s in LAYERS)


class CompressedLayer(NamedTuple):
    """One layer as stored: codebook (256,), bias (O,), codes (N,) uint8, gaps (N,) uint8."""

    shape: ConvShape
    codebook: np.ndarray
    bias: np.ndarray
    codes: np.ndarray
    gaps: np.ndarray


def read_deep_compression_raw(path):
    """Parse the file into a list of `CompressedLayer` (no decoding), checking every size."""
    name = printable(path)  # one line even for a file name with control characters
    data = read_regular_file(path, MAX_FILE_BYTES, CheckpointError, "a Deep-Compression .net file", name)
    path = name
    header = 4 * len(LAYERS)
    if len(data) < header:
        raise CheckpointError(f"{path}: truncated: {len(data)} bytes, the header alone needs {header}")
    counts = np.frombuffer(data, "<u4", len(LAYERS)).astype(np.int64)
    for shape, n in zip(LAYERS, counts):
        dense = shape.out_channels * shape.in_channels * shape.kernel ** 2
        if n > dense:
            raise CheckpointError(f"{path}: header says layer {shape.name} stores {n} entries, "
                                  f"more than its {dense} weights (not a Deep-Compression SqueezeNet file?)")
    expected = header + sum(4 * CODEBOOK_SIZE + 4 * s.out_channels + n + (n + 1) // 2
                            for s, n in zip(LAYERS, counts))
    if len(data) != expected:
        raise CheckpointError(f"{path}: size {len(data)} bytes, the header implies {expected} "
                              f"({'truncated' if len(data) < expected else 'trailing data'})")
    layers, pos = [], header
    for shape, n in zip(LAYERS, counts):
        n = int(n)
        codebook = np.frombuffer(data, "<f4", CODEBOOK_SIZE, pos).astype(np.float32)
        pos += 4 * CODEBOOK_SIZE
        bias = np.frombuffer(data, "<f4", shape.out_channels, pos).astype(np.float32)
        pos += 4 * shape.out_channels
        codes = np.frombuffer(data, np.uint8, n, pos).copy()
        pos += n
        packed = np.frombuffer(data, np.uint8, (n + 1) // 2, pos)
        pos += (n + 1) // 2
        gaps = np.empty(2 * packed.size, np.uint8)
        gaps[0::2] = packed & 0x0F   # entry 2k: low nibble
        gaps[1::2] = packed >> 4     # entry 2k+1: high nibble
        layers.append(CompressedLayer(shape, codebook, bias, codes, gaps[:n]))
    return layers


def read_deep_compression(path):
    """Decode the file -> ``{layer_name: (weight (O, I, KH, KW) float32, bias (O,) float32)}``.

    Layer names and order follow `LAYERS` (conv1, fire2/conv1x1_1, ..., conv_final).
    Raises `CheckpointError` when the file is missing, truncated, or decodes out of range.
    """
    out = {}
    for layer in read_deep_compression_raw(path):
        s = layer.shape
        dense = s.out_channels * s.in_channels * s.kernel ** 2
        positions = np.cumsum(layer.gaps.astype(np.int64) + 1) - 1
        if positions.size and positions[-1] >= dense:
            raise CheckpointError(f"{path}: layer {s.name} gaps reach position {positions[-1]}, "
                                  f"beyond its {dense} weights (corrupt gap data)")
        weight = np.zeros(dense, np.float32)
        weight[positions] = layer.codebook[layer.codes]
        out[s.name] = (weight.reshape(s.out_channels, s.in_channels, s.kernel, s.kernel), layer.bias)
    return out
