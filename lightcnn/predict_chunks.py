"""`predict --dask` and `predict --out DIR`: the image list cut into chunks, one task per chunk.

    paths --chunk-size--> chunk 0, chunk 1, ...        (chunk i = paths[i*size:(i+1)*size], argument order)
    chunk i --predict_chunk (a Dask worker, or inline)--> results of its images, in order
        --out DIR: the worker also writes DIR/part-<i:05d>.jsonl atomically (temp file + rename)
    client: results printed (or errors reported) strictly in chunk order as chunks finish, progress on stderr

A chunk task is pure: its output depends only on its arguments, and its only side effect is one atomic file
write. When a worker dies mid-run Dask runs its chunks again elsewhere; a part file is either absent or
complete, and the client prints each chunk once, so no image is lost and none appears twice.

Part files hold one JSON line per image, in order: the --json record of a predicted image, or
``{"file": ..., "error": "<the stderr line>"}`` for an image that could not be read. DIR/job.json records the
chunk size, the image list's SHA-256 and the weights' SHA-256; ``--resume`` checks them, skips the chunks whose
part file exists (their errors are reported again, so the exit status matches a run without interruption) and
runs the rest.

Workers run the NumPy engine unless --engine says otherwise: it needs no compile, so a fresh worker (or one
restarted after a crash) predicts at once instead of compiling Numba kernels per process or waiting on a cache
on a shared disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import uuid

from lightcnn.predict import BATCH_SIZE, _err, _Progress, json_record, predict_batch, print_result, run_meta

JOB_FORMAT = "lightcnn.predict.parts/1"


def part_name(index):
    return f"part-{index:05d}.jsonl"


def predict_chunk(index, paths, weights, engine, topk, meta, threads=1, out_dir=None, tta="none"):
    """One task: predict `paths` in batches of BATCH_SIZE (as one process would); returns the per-image results
    (see predict.predict_batch; tta: lightcnn.tta). With out_dir, also writes out_dir/part-<index>.jsonl
    atomically."""
    from lightcnn.cluster import pin_threads, worker_classifier

    with pin_threads(threads):
        clf = worker_classifier(weights, engine)
        results = []
        for start in range(0, len(paths), BATCH_SIZE):
            results += predict_batch(clf, paths[start:start + BATCH_SIZE], topk, on_error=None, tta=tta)
    if out_dir is not None:
        from lightcnn.checkpoint import atomic_write_text

        lines = [json.dumps(r if "error" in r else json_record(meta, r), allow_nan=False) for r in results]
        atomic_write_text(os.path.join(out_dir, part_name(index)), "".join(line + "\n" for line in lines))
    return results


def _read_part(path, n):
    """The records of a finished part file, or None when it is not a complete part of n images."""
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    return records if len(records) == n else None


def _job(args, paths, sha):
    job = {"format": JOB_FORMAT, "chunk_size": args.chunk_size, "images": len(paths),
           "paths_sha256": hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest(),
           "weights_sha256": sha, "topk": args.topk}
    if args.tta != "none":  # absent for none, so the folders of runs made before --tta existed still resume
        job["tta"] = args.tta
    return job


def _open_out(args, paths, sha):
    """Create --out DIR with its job.json, or check it on --resume; returns an error message or None."""
    from lightcnn.checkpoint import atomic_write_text

    job = _job(args, paths, sha)
    job_path = os.path.join(args.out, "job.json")
    if os.path.exists(job_path):
        if not args.resume:
            return f"{args.out}: holds an earlier run (job.json); pass --resume to continue it or choose another --out"
        try:
            with open(job_path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as exc:
            return f"{job_path}: cannot read it ({exc})"
        diff = sorted(k for k in set(job) | set(saved) if saved.get(k) != job.get(k))
        if diff:
            return (f"{args.out}: --resume with a different image list or options than the earlier run "
                    f"({', '.join(diff)})")
        return None
    try:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_text(job_path, json.dumps(job, indent=2) + "\n")
    except OSError as exc:
        return f"{args.out}: cannot write there ({exc.strerror or exc})"
    return None


def run_chunked(args, paths, clf):
    """Predict `paths` chunk by chunk (on Dask with --dask, else in this process); returns the failure count."""
    from lightcnn._cli import note
    from lightcnn.cluster import DaskError, mapper, pin_threads, sequential_map, session, weights_ref, worker_count

    size = args.chunk_size
    chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
    sha = clf.weights_sha256
    meta = run_meta(clf, sha, args.tta)
    if args.out is not None:
        problem = _open_out(args, paths, sha)
        if problem:
            _err(problem)
            return len(paths)
    done_parts = {}
    if args.resume:
        for i, chunk in enumerate(chunks):
            records = _read_part(os.path.join(args.out, part_name(i)), len(chunk))
            if records is not None:
                done_parts[i] = records
        if done_parts:
            note(f"resume: {len(done_parts)} of {len(chunks)} chunks already in {args.out}")
    todo = [i for i in range(len(chunks)) if i not in done_parts]
    threads = args.threads or 1
    progress = _Progress(sum(len(chunks[i]) for i in todo))  # images/s of what runs now, not of resumed parts
    state = {"failures": 0, "printed": 0, "done": 0}

    def emit(i, results):
        """Report chunk i: error lines on stderr, results on stdout (or already in the part file)."""
        for r in results:
            if "error" in r:
                state["failures"] += 1
                _err(r["error"])
            elif args.out is None:
                print_result(args, meta, r, state["printed"])
                state["printed"] += 1
        sys.stdout.flush()

    def run(run_fn, ref, engine):
        progress.start = time.perf_counter()  # images/s of the chunks that run now (not the cluster's start-up)
        jobs = [(i, chunks[i], ref, engine, args.topk, meta, threads, args.out, args.tta) for i in todo]
        ready, next_i = dict(done_parts), 0
        while next_i in ready:  # resumed chunks at the front come out before any task finishes
            emit(next_i, ready.pop(next_i))
            next_i += 1
        for j, results in run_fn(predict_chunk, jobs):
            ready[todo[j]] = results
            state["done"] += len(chunks[todo[j]])
            progress.update(state["done"])
            while next_i in ready:
                emit(next_i, ready.pop(next_i))
                next_i += 1

    if args.dask is None:  # --out alone: the same tasks, one after another in this process
        from lightcnn.cluster import _CLASSIFIERS

        ref = weights_ref(clf.weights_path)
        _CLASSIFIERS[(ref["sha256"], clf.model.engine)] = clf  # the model main() loaded: no second load
        with pin_threads(threads) if args.threads else contextlib.nullcontext():
            run(sequential_map, ref, clf.model.engine)
    elif todo:
        engine = args.engine or "numpy"  # no compile per worker process (module docstring)
        try:
            with session(args.dask, threads) as client:
                note(f"dask: {worker_count(client)} workers at {client.scheduler.address}, {len(todo)} chunks of "
                     f"up to {size} images, engine {engine}, {threads} thread(s) per worker")
                ref = weights_ref(clf.weights_path, client)  # the bytes go to every worker once
                run(mapper(client, f"lightcnn-predict-{uuid.uuid4().hex[:12]}"), ref, engine)
        except DaskError as exc:
            _err(str(exc))
            return len(paths)
    else:
        run(sequential_map, None, None)  # every chunk was resumed from its part file
    if args.out is not None:
        note(f"wrote {len(chunks)} part files to {args.out}")
    return state["failures"]


__all__ = ["part_name", "predict_chunk", "run_chunked"]
