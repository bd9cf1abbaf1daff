"""Reusing a training step's large arrays instead of allocating them afresh every step.

Why: glibc serves an array above 32 MB from freshly mapped pages, which the kernel faults in and zeroes on the
first write to each page. A covid_squeezenet training step at batch 32 makes about ten such arrays (51-104 MB:
the 113x113 and 56x56 activations and their gradients), and on the 2-core development machine their page
faults cost 150-700 ms of system time a step -- the fuse conv's input-gradient GEMM took 250 ms writing into
a fresh array against 75 ms into one already mapped. Smaller arrays come from glibc's heap, already mapped.

Inside ``reusing_arrays()`` (the block lightcnn.train.loop.fit runs its epochs in) ``empty(shape, dtype)`` of
at least _MIN_BYTES hands back the memory of an array of about the same byte size (up to _SLACK times it) that
an earlier call made and that nothing references any more. Every array and view made from a pool buffer holds
a reference to it, so a buffer whose only reference is the pool's (sys.getrefcount tells) is free: reuse never
overwrites an array still in use (an activation a layer cached for backward, a view the caller kept). Outside
the block ``empty`` is np.empty. The pool is per thread and is dropped when the outermost block ends.

Memory: the pool keeps every buffer it made until the block ends, so a training step's peak grows by the
buffers that are free while others of other sizes are in use: covid_squeezenet at batch 32, 1.10 -> ~1.6 GB
peak RSS. A training loop with one batch shape makes no new buffers after its first step.
"""

import contextlib
import sys
import threading

import numpy as np

_MIN_BYTES = 1 << 22  # 4 MiB: below this the heap's own reuse is as good and the bookkeeping not worth it

_SLACK = 1.25  # a request may take a free buffer up to this many times its size
_local = threading.local()  # .pool: [uint8 buffer, ...] inside reusing_arrays(), else absent/None


def _refs(buffer):
    return sys.getrefcount(buffer)


# References to a buffer that only the pool holds, counted as _refs sees it (the pool's list slot, the
# parameter, getrefcount's argument): measured rather than assumed, so it follows the interpreter.
_calibration = [np.empty(1, np.uint8)]
_FREE_REFS = _refs(_calibration[0])
del _calibration


@contextlib.contextmanager
def reusing_arrays():
    """Inside the block `empty` reuses the free large arrays of earlier calls (this thread's); nests."""
    outer = getattr(_local, "pool", None) is None
    if outer:
        _local.pool = []
    try:
        yield
    finally:
        if outer:
            _local.pool = None


def empty(shape, dtype) -> np.ndarray:
    """np.empty(shape, dtype), C-contiguous; inside reusing_arrays() possibly the memory of a free earlier array."""
    pool = getattr(_local, "pool", None)
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if pool is None or nbytes < _MIN_BYTES:
        return np.empty(shape, dtype)
    # The smallest free buffer that fits without wasting more than _SLACK of itself: sizes a few per cent apart
    # (the first conv's 113x113x64 output and the skip concatenation's 56x56x256 at batch 32: 99.8 and 98 MiB)
    # share buffers instead of each keeping their own.
    best = -1
    for i in range(len(pool)):
        size = pool[i].size
        if (nbytes <= size <= nbytes * _SLACK and (best < 0 or size < pool[best].size)
                and _refs(pool[i]) == _FREE_REFS):
            best = i
    if best < 0:
        pool.append(np.empty(nbytes, np.uint8))
        best = len(pool) - 1
    return pool[best][:nbytes].view(dtype).reshape(shape)


def empty_like(a) -> np.ndarray:
    """empty(a.shape, a.dtype)."""
    return empty(a.shape, a.dtype)
