"""lightcnn vs ONNX Runtime on one thread, in thread CPU time: per-core efficiency that survives a loaded machine.

    python bench/compare_cpu_time.py                                  # 4 models x batch 1, 8
    python bench/compare_cpu_time.py --models squeezenet1_1 --batch 1 --rounds 20 --json

Same weights, inputs and output check as compare_runtimes.py (its loader and ORT session), one Numba
thread and ORT intra_op_num_threads=1, rounds alternating between the two (3 calls each), medians of
time.thread_time around each call. Both run in the calling thread, so the CPU time excludes the slices
other processes take; on a shared 2-core machine at load 6-8 this ratio stayed within a few percent
where 2-thread wall-time ratios moved by 1.5x. It does not measure threading (see compare_runtimes.py).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_runtimes as cr  # noqa: E402


def measure(arch, batch, rounds):
    model, source = cr.load_lightcnn(arch, False)
    model.engine = "numba"
    ort_run = cr.ort_session(model, 1)
    x = np.random.default_rng(batch).standard_normal((batch,) + model.input_shape).astype(np.float32)
    io_path = cr.FIXTURES / f"{arch}_io.npz"
    if io_path.exists():
        xin = np.load(io_path)["input_nhwc"]
        x = np.ascontiguousarray(np.resize(xin, (batch,) + xin.shape[1:]), np.float32)
    diff = float(np.abs(ort_run(x) - model.forward(x)).max())
    if not diff <= cr.TOL:
        raise SystemExit(f"{arch} batch {batch}: ORT and lightcnn disagree by {diff}")
    fns = {"lightcnn": model.forward, "ort": ort_run}
    for fn in fns.values():
        for _ in range(5):
            fn(x)
    cpu = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(3):
                t = time.thread_time()
                fn(x)
                cpu[k].append(time.thread_time() - t)
    med = {k: float(np.median(v)) * 1e3 for k, v in cpu.items()}
    return dict(arch=arch, batch=batch, lightcnn_cpu_ms=med["lightcnn"], ort_cpu_ms=med["ort"],
                ratio=med["lightcnn"] / med["ort"], load=os.getloadavg()[0], weights=source)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(cr.MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from lightcnn import _blas
    from lightcnn._jit import set_num_threads

    _blas.prepare()
    set_num_threads(1)
    rows = []
    for arch in args.models:
        for batch in args.batch:
            row = measure(arch, batch, args.rounds)
            rows.append(row)
            if not args.json:
                print(f"{arch:20s} batch {batch}: lightcnn {row['lightcnn_cpu_ms']:8.2f} ms  ORT {row['ort_cpu_ms']:8.2f} ms"
                      f"  x ORT {row['ratio']:.2f}  (load {row['load']:.1f})", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
