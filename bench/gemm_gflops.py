"""GFLOP/s of the pointwise-conv GEMMs on one core: the packed-weight GEMM the plan runs vs OpenBLAS.

    python bench/gemm_gflops.py                 # MobileNetV2's pointwise shapes at batch 1 and 8
    python bench/gemm_gflops.py --shapes squeezenet1_1   # its Fire 1x1 convs and classifier
    python bench/gemm_gflops.py --rounds 9 --json

Both run the same fused epilogue (bias + ReLU6) on one thread: `blas` is fused.gemm_bias_act_serial
(OpenBLAS's SGEMM per tile, the kernel the plan used before), `packed` is
fused.gemm_packed_bias_act_serial (lightcnn.kernels.gemm). Rounds alternate between the two, and
each call is timed in CPU time of the calling thread (time.thread_time), so other processes on a
shared machine slow both alike instead of adding their time slices. GFLOP/s = 2*M*K*O / time; the
peak is one core's AVX-512 FMA rate (2 FMA units x 16 floats x 2 FLOPs x ~3.85 GHz = ~246 GFLOP/s
on the development machine; --peak to change it).
"""

import argparse
import json
import sys
import time

import numpy as np

# (M = N*H*W rows, K, O): MobileNetV2's 1x1 convs (expand / project / last) at 224x224, batch 1
MNV2_POINTWISE = [
    ("b1 expand 112x112 16->96", 12544, 16, 96),
    ("b2 expand 56x56 24->144", 3136, 24, 144),
    ("b2 project 56x56 144->24", 3136, 144, 24),
    ("b4 expand 28x28 32->192", 784, 32, 192),
    ("b4 project 28x28 192->32", 784, 192, 32),
    ("b8 expand 14x14 64->384", 196, 64, 384),
    ("b8 project 14x14 384->64", 196, 384, 64),
    ("b12 project 14x14 576->96", 196, 576, 96),
    ("b14 expand 7x7 160->960", 49, 160, 960),
    ("b14 project 7x7 960->160", 49, 960, 160),
    ("last 7x7 320->1280", 49, 320, 1280),
]
# SqueezeNet 1.1's: Fire squeeze and 1x1 expand convs, and the 1x1 classifier (its largest GEMM)
SQ11_POINTWISE = [
    ("fire2 squeeze 55x55 64->16", 3025, 64, 16),
    ("fire2 expand1x1 55x55 16->64", 3025, 16, 64),
    ("fire4 squeeze 27x27 128->32", 729, 128, 32),
    ("fire6 squeeze 13x13 256->48", 169, 256, 48),
    ("fire9 expand1x1 13x13 64->256", 169, 64, 256),
    ("classifier 13x13 512->1000", 169, 512, 1000),
]
SHAPES = {"mobilenet_v2": MNV2_POINTWISE, "squeezenet1_1": SQ11_POINTWISE}


def _time(fn, args, calls):
    t = time.thread_time()
    for _ in range(calls):
        fn(*args)
    return (time.thread_time() - t) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["mobilenet_v2"],
                        help="whose 1x1 conv shapes (default mobilenet_v2)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--peak", type=float, default=246.0, help="one core's FMA peak, GFLOP/s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from lightcnn import _blas
    from lightcnn._jit import set_num_threads
    from lightcnn.kernels import fused, gemm

    _blas.prepare()
    set_num_threads(1)
    rng = np.random.default_rng(0)
    dummy = np.zeros((1, 1), np.float32)
    relu6, one = np.int64(2), np.float32(1.0)
    blas, packed = fused.gemm_bias_act_serial.dispatcher, fused.gemm_packed_bias_act_serial.dispatcher
    rows = []
    for batch in args.batch:
        for name, m1, k, o in [shape for model in args.shapes for shape in SHAPES[model]]:
            m = m1 * batch
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = (rng.standard_normal((k, o)) * 0.1).astype(np.float32)
            b = rng.standard_normal(o).astype(np.float32)
            y = np.empty((m, o), np.float32)
            wp = gemm.pack_panels(w)
            a_blas = (x, w, b, dummy, False, dummy, 1, False, relu6, one, 256, y, 0)
            a_packed = (x, wp, o, b, dummy, False, dummy, 1, False, relu6, one, m, 1, y, 0)
            blas(*a_blas)
            packed(*a_packed)
            calls = max(2, int(0.02 / max(_time(packed, a_packed, 1), 1e-6)))
            best = {"blas": 1e9, "packed": 1e9}
            for _ in range(args.rounds):
                best["blas"] = min(best["blas"], _time(blas, a_blas, calls))
                best["packed"] = min(best["packed"], _time(packed, a_packed, calls))
            flops = 2.0 * m * k * o
            rows.append({"shape": name, "batch": batch, "m": m, "k": k, "o": o,
                         "blas_gflops": flops / best["blas"] / 1e9, "packed_gflops": flops / best["packed"] / 1e9})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"# one thread, CPU time, best of {args.rounds} rounds; % of a {args.peak:.0f} GFLOP/s core")
    print(f"{'shape':28s} {'batch':>5s} {'M x K @ K x O':>20s} | {'OpenBLAS':>8s} {'%':>4s} | {'packed':>7s} {'%':>4s} "
          f"| {'x':>5s}")
    for r in rows:
        dims = f"{r['m']}x{r['k']} @ {r['k']}x{r['o']}"
        print(f"{r['shape']:28s} {r['batch']:5d} {dims:>20s} | {r['blas_gflops']:8.1f} "
              f"{r['blas_gflops'] / args.peak:4.0%} | {r['packed_gflops']:7.1f} {r['packed_gflops'] / args.peak:4.0%} "
              f"| {r['packed_gflops'] / r['blas_gflops']:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
