"""Running lightcnn's jobs on Dask: the optional extra, connecting, and what every worker process keeps.

    --dask local        a LocalCluster on this machine: one worker process per core, 1 thread each
    --dask local:N      the same with N worker processes
    --dask ADDRESS      an existing scheduler, e.g. tcp://10.0.0.5:8786 (``dask scheduler`` + ``dask worker``)

What runs where
    The client (the command you typed) expands the file list, splits it into chunks or folds, submits one
    task per chunk / fold / trial and writes or prints the results in order. A task is a plain module-level
    function (``lightcnn.predict_chunks.predict_chunk``, ``lightcnn.train.run.run_fold``, ...): its result
    depends only on its arguments and it writes its files atomically, so when a worker dies Dask simply runs
    it again on another worker and nothing is lost or written twice.

Threads per worker
    Each task first calls ``pin_threads(n)`` (n = --threads, default 1): Numba's kernels get n threads and
    NumPy's BLAS n threads in the task's thread. A LocalCluster also starts its workers with
    OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS = n, which BLAS reads when numpy is first imported.
    N processes x 1 thread is the layout that scales on a CPU box: no process waits on another's BLAS pool.

Weights
    The client reads the .h5 once and ships its bytes to every worker (``client.scatter(..., broadcast=True)``;
    a MobileNetV2 file is 14 MB). Each worker process keeps the loaded model in a module-level cache keyed by
    the file's SHA-256 and the engine, so it loads the model once however many chunks it runs.

The extra: ``pip install "lightcnn[dask]"`` (dask[distributed] >= 2024.1). Without it, --dask stops with one
line that says so; nothing else in lightcnn imports dask.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile

from lightcnn.errors import LightCNNError

INSTALL_HINT = 'pip install "lightcnn[dask]" (or pip install "dask[distributed]")'
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class DaskError(LightCNNError):
    """--dask cannot run: the extra is missing, or the scheduler cannot be reached."""


def require_dask():
    """The `distributed` module, or DaskError with the install command (one line)."""
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError:
        raise DaskError(f"--dask needs the optional dask extra, which is not installed: {INSTALL_HINT}") from None
    return distributed


def parse_spec(text):
    """'local' -> ('local', None); 'local:N' -> ('local', N); anything else is a scheduler address."""
    if text == "local":
        return "local", None
    if text.startswith("local:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--dask {text!r}: expected local:N with N >= 1 worker processes")
        return "local", n
    # scheme://host:port or host:port; anything else (an image path swallowed by a bare --dask) is refused
    if re.fullmatch(r"([a-z]+://)?[^\s/:]+(:\d+)?", text) and ("://" in text or ":" in text):
        return "address", text
    raise ValueError(f"--dask {text!r}: expected local, local:N or a scheduler address such as tcp://host:8786")


def add_dask_arguments(parser, what):
    """--dask [ADDRESS|local[:N]] on a CLI parser."""
    parser.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS|local[:N]",
                        help=f"run {what} as Dask tasks: local (default when given bare) starts a LocalCluster with "
                             "one 1-thread worker process per core, local:N with N processes; an address such as "
                             f"tcp://host:8786 connects to a running scheduler (needs {INSTALL_HINT})")


@contextlib.contextmanager
def session(spec, threads=1):
    """A connected dask.distributed Client for `spec` (see parse_spec); closes what it started."""
    distributed = require_dask()
    import logging

    kind, value = parse_spec(spec)
    env = {var: str(threads) for var in THREAD_VARS}
    cluster = None
    try:
        if kind == "local":
            n = value or max(1, os.cpu_count() or 1)
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.ERROR, env=env)
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(value, timeout="20s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise DaskError(f"--dask {spec}: cannot reach the scheduler ({' '.join(str(exc).split())})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_count(client):
    return len(client.scheduler_info().get("workers", {}))


def run_map(client, fn, jobs, key_prefix):
    """Submit fn(*args) for each args in `jobs`; yield (index, result) as tasks finish (any order)."""
    distributed = require_dask()
    futures = {client.submit(fn, *args, key=f"{key_prefix}-{i}", pure=False): i for i, args in enumerate(jobs)}
    for future in distributed.as_completed(list(futures)):
        try:
            result = future.result()
        except distributed.KilledWorker as exc:  # the task took down every worker Dask let it try
            raise DaskError(f"task {future.key} was running on each worker that died "
                            f"({dask_config('distributed.scheduler.allowed-failures')} times allowed); "
                            f"is it out of memory? ({exc})") from None
        yield futures[future], result
        future.release()


def dask_config(key):
    import dask

    return dask.config.get(key, default="?")


def mapper(client, key_prefix):
    """run_map bound to a client: a callable (fn, jobs) -> iterator of (index, result)."""
    return lambda fn, jobs: run_map(client, fn, jobs, key_prefix)


def sequential_map(fn, jobs):
    """The in-process twin of `mapper`: runs the jobs one after another, in order."""
    for i, args in enumerate(jobs):
        yield i, fn(*args)


# -- on the workers ----------------------------------------------------------------------------------------------

_CLASSIFIERS = {}  # (weights sha256, engine) -> Classifier, one per worker process


def pin_threads(n):
    """Numba kernels to n threads (kept for the process); returns the context manager for BLAS in this thread."""
    from lightcnn._jit import set_num_threads
    from lightcnn._threads import numpy_blas_threads

    set_num_threads(n)
    return numpy_blas_threads(n)


def weights_ref(path, client=None):
    """What a task needs to load a model: {"sha256", "data", "path"}. Read once on the client; with a client the
    bytes go to every worker once (a plain dict, so Dask swaps the scattered future for the bytes on the worker);
    without one, the path."""
    with open(path, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    if client is None:
        return {"sha256": sha, "data": None, "path": str(path)}
    # hash=True: the same file scattered twice is one key, kept on every worker
    return {"sha256": sha, "data": client.scatter(data, broadcast=True, hash=True), "path": None}


def _local_copy(ref):
    """A path to the weight bytes on this worker: the shared path, or the shipped bytes in a temp file."""
    if ref["data"] is None:
        return ref["path"]
    folder = os.path.join(tempfile.gettempdir(), "lightcnn-dask-weights")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{ref['sha256']}.h5")
    if not os.path.exists(target):
        from lightcnn.checkpoint import atomic_write_bytes

        atomic_write_bytes(target, ref["data"])
    return target


def worker_classifier(ref, engine):
    """The Classifier for these weights on this worker process, loaded on first use and then kept."""
    key = (ref["sha256"], engine)
    clf = _CLASSIFIERS.get(key)
    if clf is None:
        from lightcnn.api import Classifier, model_from_checkpoint
        from lightcnn.checkpoint import read_checkpoint

        ckpt = read_checkpoint(_local_copy(ref))
        clf = Classifier(model_from_checkpoint(ckpt, simulate_quantization=None), ckpt)
        clf.model.engine = engine
        _CLASSIFIERS[key] = clf
    return clf


__all__ = ["DaskError", "INSTALL_HINT", "add_dask_arguments", "mapper", "parse_spec", "pin_threads",
           "require_dask", "run_map", "sequential_map", "session", "weights_ref", "worker_classifier",
           "worker_count"]
