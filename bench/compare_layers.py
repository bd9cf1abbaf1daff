"""Per-block time of lightcnn's numba engine beside ONNX Runtime's, same weights, same input, one process.

    python bench/compare_layers.py                         # MobileNetV2, batch 1, 2 threads
    python bench/compare_layers.py --model squeezenet1_1 --batch 8 --threads 1
    python bench/compare_layers.py --json                  # {block: {lightcnn_ms, ort_ms, ...}}

ONNX Runtime side: lightcnn's own graph exported by lightcnn.export_onnx, whose node names start
with the lightcnn unit that emitted them ("features.blocks.3.project/conv_41"); the session runs with
profiling on, and each node's kernel time ("<node>_kernel_time" events) is summed over the timed runs.
lightcnn side: InferencePlan.profile, the median time of each plan step over the same number of runs.
Both are grouped by *block*: the first three parts of the path ("features.blocks.3", "features.stem",
"head.classifier"), because each side fuses differently inside a block (lightcnn runs a whole
bottleneck as one step, ORT fuses conv + activation). GFLOP/s = 2 x the block's multiply-accumulates
(Model.trace) / time; the single-core FMA peak of this machine is about 246 GFLOP/s (2 cores ~465).

Profiling adds a little overhead on both sides (a timer call per step / per node); the per-block
shares are what to read, the totals only roughly match bench/compare_runtimes.py's.
"""

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runtimes import FIXTURES, load_lightcnn  # noqa: E402


def block_of(path):
    """'features.blocks.3.project' -> 'features.blocks.3'; 'features.stem' -> itself."""
    parts = path.split("/")[0].split(".")
    return ".".join(parts[:3] if len(parts) > 2 and parts[1] in ("blocks", "early", "late") else parts[:2])


def lightcnn_blocks(model, x, repeats):
    from lightcnn._jit import get_num_threads  # noqa: F401  (numba's pool already set by the caller)

    model.engine = "numba"
    model.forward(x)
    times = defaultdict(float)
    for part, value in (("features", x), ("head", model.features(x))):
        plan = model.inference_plan(value, part)
        for name, ms in plan.profile(value, repeats).items():
            times[block_of(name)] += ms
    return dict(times)


def ort_blocks(model, x, threads, repeats):
    import onnxruntime

    from lightcnn.export_onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort_profile")
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        for _ in range(5):
            session.run(None, feed)  # warm-up runs are in the profile too: counted below, then dropped
        for _ in range(repeats):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    per_node = defaultdict(list)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per_node[ev["name"][:-len("_kernel_time")]].append(ev["dur"] / 1e3)
    times = defaultdict(float)
    for node, durations in per_node.items():
        timed = durations[-repeats:]
        times[block_of(node)] += float(np.median(timed))
    return dict(times)


def block_macs(model, x):
    macs = defaultdict(int)
    for row in model.trace(x[:1]):
        macs[block_of(row["name"])] += row["macs"] * x.shape[0]
    return dict(macs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", help="architecture with a torchvision fixture")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--random", action="store_true", help="random weights even when the fixture exists")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from lightcnn._jit import set_num_threads

    set_num_threads(args.threads)
    model, source = load_lightcnn(args.model, args.random)
    x = np.random.default_rng(0).standard_normal((args.batch,) + model.input_shape).astype(np.float32)
    io_path = FIXTURES / f"{args.model}_io.npz"
    if io_path.exists() and not args.random:
        xin = np.load(io_path)["input_nhwc"]
        x = np.ascontiguousarray(np.resize(xin, (args.batch,) + xin.shape[1:]), np.float32)
    ours = lightcnn_blocks(model, x, args.repeats)
    theirs = ort_blocks(model, x, args.threads, args.repeats)
    macs = block_macs(model, x)
    blocks = sorted(set(ours) | set(theirs), key=lambda b: list(ours).index(b) if b in ours else 10**6)
    total_ours, total_ort = sum(ours.values()), sum(theirs.values())
    rows = {}
    for b in blocks:
        lc, ort = ours.get(b, 0.0), theirs.get(b, 0.0)
        rows[b] = {"lightcnn_ms": lc, "ort_ms": ort, "ratio": lc / ort if ort else None, "macs": macs.get(b, 0),
                   "lightcnn_gflops": 2e-6 * macs.get(b, 0) / lc if lc else None,
                   "ort_gflops": 2e-6 * macs.get(b, 0) / ort if ort else None,
                   "lightcnn_share": lc / total_ours if total_ours else None}
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "threads": args.threads, "weights": source,
                          "blocks": rows, "lightcnn_total_ms": total_ours, "ort_total_ms": total_ort}, indent=1))
        return 0
    print(f"# {args.model}, batch {args.batch}, {args.threads} threads, {args.repeats} runs, load "
          f"{os.getloadavg()[0]:.2f}; weights: {source}")
    print(f"{'block':26s} {'lightcnn ms':>11s} {'ORT ms':>8s} {'x ORT':>6s} {'MMACs':>8s} {'GFLOP/s':>8s} "
          f"{'ORT':>6s} {'share':>6s}")
    for b, r in rows.items():
        ratio = f"{r['ratio']:6.2f}" if r["ratio"] else "     -"
        gl = f"{r['lightcnn_gflops']:8.1f}" if r["lightcnn_gflops"] else "       -"
        go = f"{r['ort_gflops']:6.1f}" if r["ort_gflops"] else "     -"
        print(f"{b:26s} {r['lightcnn_ms']:11.3f} {r['ort_ms']:8.3f} {ratio} {r['macs'] / 1e6:8.1f} {gl} {go} "
              f"{r['lightcnn_share']:6.1%}")
    print(f"{'total':26s} {total_ours:11.3f} {total_ort:8.3f} {total_ours / total_ort:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
