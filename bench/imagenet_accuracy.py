"""Top-1/top-5 of every built registry model on shared/data/imagenet-sample, beside the reference runtime.

    LIGHTCNN_SOURCES=../shared/weights python -m lightcnn.weights build
    python bench/imagenet_accuracy.py [--data ../shared/data/imagenet-sample] [--limit N] [--json]

The reference column is the independent runtime's result on the same 1000
images (shared/fixtures/reference/imagenet_sample_reference.json); the sample is
easier than ILSVRC-2012 val, so compare columns, not against published figures.
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LIGHTCNN_SHARED", REPO.parent / "shared"))
DEFAULT_DATA = Path(os.environ.get("LIGHTCNN_DATA", SHARED / "data")) / "imagenet-sample"
DEFAULT_REFERENCE = Path(os.environ.get("LIGHTCNN_FIXTURES", SHARED / "fixtures")) / "reference" / \
    "imagenet_sample_reference.json"

# registry name -> key in the reference file
REFERENCE_KEYS = {
    "mobilenet_v2": "mobilenet_v2_quant_tflite",
    "mobilenet_v2_keras": "mobilenet_v2_keras_int8_tflite",
    "mobilenet_v3_small": "mobilenet_v3_small_quant_tflite",
    "squeezenet1_0_caffe": "squeezenet_v1.0_deep_compression",
}


def evaluate(name, data_dir=DEFAULT_DATA, limit=None, batch_size=25, progress=True, simulate_quantization=None):
    """(top1, top5, per-image top-5 indices, seconds) of registry model `name` on the sample.

    simulate_quantization: None = the weight file's default (lightcnn.quantsim), True/False force it."""
    import lightcnn

    clf = lightcnn.load(name, simulate_quantization=simulate_quantization)
    rows = list(csv.DictReader(open(Path(data_dir) / "labels.csv", encoding="utf-8")))[:limit]
    labels = np.array([int(r["class_index"]) for r in rows])
    top5 = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        paths = [Path(data_dir) / "images" / r["file"] for r in rows[i:i + batch_size]]
        probs = clf.predict(paths, batch_size=batch_size)
        top5.append(np.argsort(-probs, axis=1, kind="stable")[:, :5])
        if progress:
            print(f"\r{name}: {min(i + batch_size, len(rows))}/{len(rows)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    top5 = np.concatenate(top5)
    return (float(np.mean(top5[:, 0] == labels)), float(np.mean((top5 == labels[:, None]).any(1))), top5,
            time.perf_counter() - start)


def main(argv=None):
    from lightcnn.registry import REGISTRY
    from lightcnn.weights import weights_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reference = json.load(open(args.reference)) if Path(args.reference).is_file() else {}
    results = {}
    for name, spec in REGISTRY.items():
        if not (weights_dir() / f"{name}.h5").is_file():
            print(f"{name}: not built, skipped", file=sys.stderr)
            continue
        top1, top5, idx, seconds = evaluate(name, args.data, args.limit)
        ref = reference.get(REFERENCE_KEYS.get(name, ""), {})
        agree = None
        if "top5_idx" in ref:
            ref_top1 = np.array([r[0] for r in ref["top5_idx"]])[:len(idx)]
            agree = float(np.mean(ref_top1 == idx[:, 0]))
        results[name] = dict(top1=top1, top5=top5, reference_top1=ref.get("top1"), reference_top5=ref.get("top5"),
                             top1_agreement_with_reference=agree, published_top1=spec.published_top1,
                             seconds=round(seconds, 1), images=len(idx))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'model':22s} {'top-1':>7s} {'top-5':>7s} {'ref top-1':>9s} {'ref top-5':>9s} {'agree':>7s} "
          f"{'published':>9s} {'seconds':>8s}")
    for name, r in results.items():
        fmt = lambda v: "   -" if v is None else f"{100 * v:6.1f}%"  # noqa: E731
        print(f"{name:22s} {fmt(r['top1']):>7s} {fmt(r['top5']):>7s} {fmt(r['reference_top1']):>9s} "
              f"{fmt(r['reference_top5']):>9s} {fmt(r['top1_agreement_with_reference']):>7s} "
              f"{r['published_top1']:8.1f}% {r['seconds']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
