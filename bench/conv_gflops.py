"""GFLOP/s of the KxK convolutions the plan runs (stems, SqueezeNet's 3x3 expands): im2col + GEMM vs implicit GEMM.

    python bench/conv_gflops.py                 # one thread, batch 1 and 8
    python bench/conv_gflops.py --threads 2 --batch 1

`im2col` is fused.conv_im2col_bias_act (each ~256-row tile copied into an im2col scratch, then the
packed GEMM), `implicit` is fused.conv_implicit_bias_act (the packed tile reads the receptive fields
straight from the image, or from a zero-bordered copy of each band's input rows when the conv pads);
both with the bias + ReLU epilogue and the same packed weights. Rounds alternate between the two. With
one thread each call is timed in CPU time of the calling thread (time.thread_time), so other processes
on a shared machine slow both alike; with more threads, in wall time (then read the ratio only).
GFLOP/s = 2 * MACs / time; --peak is one core's AVX-512 FMA rate (~246 GFLOP/s here).
"""

import argparse
import json
import time

import numpy as np

# (name, H = W, C, O, K, stride, pad): 224x224 inputs
SHAPES = [
    ("SqueezeNet 1.1 stem 3x3 s2", 224, 3, 64, 3, 2, 0),
    ("SqueezeNet 1.0 stem 7x7 s2", 224, 3, 96, 7, 2, 0),
    ("MobileNetV2 stem 3x3 s2 p1", 224, 3, 32, 3, 2, 1),
    ("expand3x3 55x55 16->64", 55, 16, 64, 3, 1, 1),
    ("expand3x3 55x55 32->128", 55, 32, 128, 3, 1, 1),
    ("expand3x3 27x27 32->128", 27, 32, 128, 3, 1, 1),
    ("expand3x3 13x13 48->192", 13, 48, 192, 3, 1, 1),
    ("expand3x3 13x13 64->256", 13, 64, 256, 3, 1, 1),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--peak", type=float, default=246.0, help="one core's FMA peak, GFLOP/s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from lightcnn import _blas
    from lightcnn._jit import set_num_threads
    from lightcnn.kernels import fused, gemm
    from lightcnn.layers.plan_numba import conv_bands

    _blas.prepare()
    set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    dummy = np.zeros((1, 1), np.float32)
    relu, one = np.int64(1), np.float32(1.0)
    kernels = {"im2col": fused.conv_im2col_bias_act.dispatcher, "implicit": fused.conv_implicit_bias_act.dispatcher}

    def timed(fn, a, calls):
        t = clock()
        for _ in range(calls):
            fn(*a)
        return (clock() - t) / calls

    rows = []
    for batch in args.batch:
        for name, h, c, o, k, s, p in SHAPES:
            ho = (h + 2 * p - k) // s + 1
            m = batch * ho * ho
            x = rng.standard_normal((batch, h, h, c)).astype(np.float32)
            w = (rng.standard_normal((k * k * c, o)) * 0.1).astype(np.float32)
            b = rng.standard_normal(o).astype(np.float32)
            y = np.empty((m, o), np.float32)
            wp = gemm.pack_panels(w)
            common = (x, wp, o, k, k, s, s, p, p, ho, ho, b, dummy, False, relu, one)
            a = {"im2col": common + (fused.choose_tile(m, args.threads), y, 0),
                 "implicit": common + (conv_bands(batch, ho, ho, args.threads), y, 0)}
            for key in kernels:
                kernels[key](*a[key])
            calls = max(2, int(0.03 / max(timed(kernels["im2col"], a["im2col"], 1), 1e-6)))
            best = dict.fromkeys(kernels, 1e9)
            for _ in range(args.rounds):
                for key in kernels:
                    best[key] = min(best[key], timed(kernels[key], a[key], calls))
            flops = 2.0 * m * k * k * c * o
            row = dict(name=f"b{batch} {name}", macs=flops / 2, **{f"{key}_ms": best[key] * 1e3 for key in kernels},
                       **{f"{key}_gflops": flops / best[key] / 1e9 for key in kernels})
            rows.append(row)
            if not args.json:
                print(f"{row['name']:<40} im2col {row['im2col_ms']:7.3f} ms {row['im2col_gflops']:6.1f} GF/s "
                      f"({row['im2col_gflops'] / args.peak / args.threads:4.0%})   implicit {row['implicit_ms']:7.3f} ms "
                      f"{row['implicit_gflops']:6.1f} GF/s ({row['implicit_gflops'] / args.peak / args.threads:4.0%})"
                      f"   x {row['im2col_ms'] / row['implicit_ms']:.2f}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
