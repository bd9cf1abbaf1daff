"""The convolutions' GEMMs, split over threads, each thread's BLAS on one thread.

    matmul(a, b, out)   out = a @ b     a (M,K), b (K,N) -> out (M,N); one band of rows per thread
    matmul_tn(a, b)     a^T @ b         a (M,K), b (M,N) -> (K,N); M cut into chunks fixed by M alone,
                                        the partial products summed in chunk order; when M is too short
                                        for two chunks, the output cut into row or column pieces instead

Why not NumPy's own threads: OpenBLAS on 2 threads inside a training step collapses when the
machine is busy. One covid_squeezenet step at batch 32 (load 3.8, another process on a core) took
7.4 s with NumPy's BLAS on 2 threads and 3.3 s with it on 1 (an earlier profile: a pointwise
backward took 214 ms against 35 ms). Here every BLAS call runs on one thread (lightcnn._threads.pin_numpy_blas_threads) and the
parallelism is ours: a band of rows per thread, one join per GEMM, so two free cores are both used
and a busy one costs at most its band. The thread count is the kernels' (lightcnn._jit.get_num_threads).

matmul's bands split rows, not sums; matmul_tn's chunks depend on M only, so its sums are added in
the same order on any number of threads (tests/test_kernels_conv.py checks both against float64
products, and matmul_tn bit for bit on 1 and 2 threads). Small products (below _SPLIT_FLOPS) are
one call.
Without OpenBLAS's per-thread setter (OpenBLAS < 0.3.27, MKL) BLAS keeps its own threading, and the
results are the same.
"""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lightcnn._jit import get_num_threads
from lightcnn._threads import numpy_blas_threads, pin_numpy_blas_threads

_SPLIT_FLOPS = 2e7  # below this a GEMM takes < ~0.5 ms: not worth a hand-off to another thread
_TN_CHUNK_ROWS = 4096  # matmul_tn: at least this many rows per chunk ...
_TN_MAX_CHUNKS = 8  # ... and at most this many chunks
# M too short to chunk: the output is cut into this many pieces (if each gets >= _TN_MIN_PIECE rows or columns).
# Two: on 1 thread, two pieces cost 0-8% over one call, eight 10-40% (5408x576 by 256: 13.3 ms whole or in
# two, 16.2 in eight); a fixed number keeps the result independent of the thread count.
_TN_PIECES = 2
_TN_MIN_PIECE = 64

_lock = threading.Lock()
_pool = {"executor": None, "workers": 0}
_caller = threading.local()  # .one_blas_thread: the calling thread's BLAS is on one thread (see below)


@contextlib.contextmanager
def gemm_caller_thread():
    """Inside the block the calling thread's NumPy BLAS is on one thread, and the calling thread runs one
    band of every GEMM itself: one hand-off to the pool fewer per GEMM, none at one thread.

    For a training loop (lightcnn.train.loop.fit): ~180 GEMMs a covid_squeezenet step, and on a busy
    machine every hand-off waits for the pool thread to be scheduled. One setter call per block.
    """
    previous = getattr(_caller, "one_blas_thread", False)
    with numpy_blas_threads(1):
        _caller.one_blas_thread = True
        try:
            yield
        finally:
            _caller.one_blas_thread = previous


def _pin_one_blas_thread():
    """Pool-thread initializer: this thread's BLAS stays on one thread for good.

    Setting it per call and restoring it costs ~2 ms a call on a busy machine (OpenBLAS parks
    and wakes its workers), more than a small GEMM; so the calling thread never runs a band.
    """
    pin_numpy_blas_threads(1)


def _executor(workers):
    with _lock:
        if _pool["executor"] is None or _pool["workers"] < workers:
            _pool["executor"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightcnn-gemm",
                                                   initializer=_pin_one_blas_thread)
            _pool["workers"] = workers
        return _pool["executor"]


def _run(tasks):
    """Run callables [(fn, args), ...] on the pool's one-BLAS-thread workers (the first on the calling
    thread inside gemm_caller_thread); results in order."""
    here = getattr(_caller, "one_blas_thread", False)
    rest = tasks[1:] if here else tasks
    futures = []
    if rest:
        ex = _executor(max(get_num_threads(), len(rest)))
        err = np.geterr()  # the caller's floating-point error handling (np.errstate is per thread)
        futures = [ex.submit(_with_errstate, err, fn, args) for fn, args in rest]
    first = [tasks[0][0](*tasks[0][1])] if here else []
    return first + [f.result() for f in futures]


def _with_errstate(err, fn, args):
    with np.errstate(**err):
        return fn(*args)


def _bands(m, parts):
    edges = np.linspace(0, m, parts + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _dot_into(a, b, out):
    np.dot(a, b, out=out)


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = a @ b.  a (M,K) C-contiguous rows, b (K,N) (any strides), out (M,N) C-contiguous, a's dtype."""
    m, k = a.shape
    n = b.shape[1]
    threads = get_num_threads()
    parts = 1 if 2.0 * m * k * n < _SPLIT_FLOPS else min(threads, m)
    _run([(_dot_into, (a[lo:hi], b, out[lo:hi])) for lo, hi in _bands(m, max(parts, 1))])
    return out


def _tn(a, b):
    return a.T @ b


def matmul_tn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^T @ b.  a (M,K), b (M,N) -> (K,N) in a's dtype: the weight gradient x^T dy of a GEMM layer."""
    m, k = a.shape
    n = b.shape[1]
    if 2.0 * m * k * n < _SPLIT_FLOPS:
        return a.T @ b
    if m // _TN_CHUNK_ROWS < 2:
        return _tn_pieces(a, b)
    bands = _bands(m, min(_TN_MAX_CHUNKS, m // _TN_CHUNK_ROWS))
    threads = max(1, min(get_num_threads(), len(bands)))
    # Each thread takes a run of whole chunks; the chunks (not the threads) fix the summation order.
    groups = [bands[lo:hi] for lo, hi in _bands(len(bands), threads)]
    partials = [p for group in _run([(_tn_group, (a, b, g)) for g in groups]) for p in group]
    total = partials[0]
    for p in partials[1:]:
        total += p
    return total


def _tn_pieces(a, b):
    """a^T @ b for an M too short to cut into two sums (a weight gradient at 13x13 or 28x28, batch 32):
    the output is cut instead, into row pieces (along K) or column pieces (along N, whichever is longer),
    so both threads work and every output element is still one whole sum over M. The pieces depend on
    the shape alone, so the result does not depend on the thread count."""
    k, n = a.shape[1], b.shape[1]
    along_k = k >= n
    pieces = _bands(k if along_k else n, max(1, min(_TN_PIECES, (k if along_k else n) // _TN_MIN_PIECE)))
    out = np.empty((k, n), a.dtype)
    groups = [pieces[lo:hi] for lo, hi in _bands(len(pieces), max(1, min(get_num_threads(), len(pieces))))]
    _run([(_tn_piece_group, (a, b, out, g, along_k)) for g in groups])
    return out


def _tn_piece_group(a, b, out, pieces, along_k):
    for lo, hi in pieces:
        if along_k:
            np.matmul(a[:, lo:hi].T, b, out=out[lo:hi])  # out's rows lo:hi are contiguous
        else:
            out[:, lo:hi] = a.T @ b[:, lo:hi]


def _tn_group(a, b, bands):
    return [a[lo:hi].T @ b[lo:hi] for lo, hi in bands]
