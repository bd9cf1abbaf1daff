"""One training step of lightcnn's hand-written backprop beside PyTorch eager, same weights, same batch, one process.

    python bench/compare_training.py                   # the three cases below, batch 32, 2 threads
    python bench/compare_training.py --batch 16 --threads 1 --json

A step is forward + backward + SGD update (momentum 0.9) of the trainable part; batch norm frozen when
fine-tuning (inference statistics, affine fixed: lightcnn's last-k; torch's eval-mode BN without grads),
in training mode (batch statistics) when training from scratch:
  mobilenet_v2 last-7   the input is the frozen prefix's output (the cached boundary activations,
                        (N, 14, 14, 64) at 224x224), the last 7 blocks + last conv + a 2-class head train;
  squeezenet1_1 last-Fire  likewise from the input of the last Fire module;
  covid_squeezenet full    seed 001's network from scratch on (N, 227, 227, 1).
PyTorch runs an NCHW module built from the same lightcnn layers (bench/compare_runtimes.torch_module's
translation). Before timing, the two losses must agree within 1e-4 relative. Timing is interleaved
(lightcnn, torch, lightcnn, ...) after warm-up; the ratio lightcnn / torch is the figure to read (the
machine is shared: absolute times move). Beside wall time it reports the process's CPU time per step
(all threads): on a busy machine, with --threads 1, that ratio is the steadier measure of the work done.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _lightcnn_case(case, batch, rng):
    """(trainable lightcnn Sequential-like net with forward/backward, input batch, labels)."""
    from lightcnn.layers.base import Sequential
    from lightcnn.models import build
    from lightcnn.models.base import randomise_batchnorm_statistics
    from lightcnn.train.features import split_backbone

    arch, unfreeze = {"mobilenet_v2_last7": ("mobilenet_v2", 7), "squeezenet1_1_last_fire": ("squeezenet1_1", 1),
                      "covid_squeezenet_full": ("covid_squeezenet", "all")}[case]
    model = build(arch, num_classes=2) if arch != "covid_squeezenet" else build(arch)
    randomise_batchnorm_statistics(model, rng)
    if unfreeze != "all":
        model.reset_head(2, dropout=0.0)
    prefix, suffix = split_backbone(model, unfreeze)
    x = rng.standard_normal((batch,) + tuple(model.input_shape)).astype(np.float32)
    x = prefix.forward(x, False) if len(prefix) else x
    net = Sequential([("features", suffix), ("head", model.head_net)])
    for _, layer in prefix.named_layers():
        layer.frozen = True
    if unfreeze != "all":  # fine-tuning: batch norm keeps its ImageNet statistics (from scratch it trains)
        for _, layer in net.named_layers():
            if type(layer).__name__ == "BatchNorm":
                layer.frozen = True
    return model, net, np.ascontiguousarray(x), rng.integers(0, 2, batch), unfreeze == "all"


def _torch_net(net, in_shape, train_bn):
    from torch import nn

    import compare_runtimes

    body, _ = compare_runtimes.torch_convert(net, in_shape)
    body.train()
    for module in body.modules():
        if isinstance(module, nn.BatchNorm2d) and not train_bn:  # frozen as in lightcnn: inference statistics,
            module.eval()                                          # affine not trained
            for param in module.parameters():
                param.requires_grad_(False)
    return body


def lightcnn_step(net, x, y, lr=1e-3, momentum=0.9):
    from lightcnn.kernels._split_blas import gemm_caller_thread
    from lightcnn.kernels.linear import cross_entropy
    from lightcnn.layers.base import skip_input_gradient
    from lightcnn.optim import SGD

    opt = SGD(net, lr=lr, momentum=momentum)
    # as lightcnn.train.loop.fit: no gradient w.r.t. the input (PyTorch's input has requires_grad=False)
    skip_input_gradient(net)

    def step():
        with gemm_caller_thread():  # as fit() runs its epochs
            logits = net.forward(x, training=True)
            loss, dlogits = cross_entropy(logits, y)
            net.backward(dlogits)
            opt.step()
        return loss
    return step


def torch_step(module, x, y, lr=1e-3, momentum=0.9):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(module(xt), yt)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def compare(case, batch, threads, runs, warmup):
    import torch

    from lightcnn._jit import set_num_threads
    from lightcnn.kernels._reuse import reusing_arrays

    set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    model, net, x, y, train_bn = _lightcnn_case(case, batch, rng)
    module = _torch_net(net, x.shape[1:], train_bn)
    ours, theirs = lightcnn_step(net, x, y), torch_step(module, x, y)
    with reusing_arrays():  # lightcnn's steps reuse their large arrays as under fit() (PyTorch's are untouched)
        return _timed(case, ours, theirs, runs, warmup)


def _timed(case, ours, theirs, runs, warmup):
    first = (ours(), theirs())  # same weights, same batch: the first losses must agree
    if not abs(first[0] - first[1]) <= 1e-4 * max(1.0, abs(first[1])):
        raise SystemExit(f"{case}: first-step losses differ: lightcnn {first[0]:.6f}, torch {first[1]:.6f}")
    for _ in range(warmup):
        ours()
        theirs()
    times = {"lightcnn": [], "torch": []}
    cpu = {"lightcnn": [], "torch": []}
    for _ in range(runs):
        for name, fn in (("lightcnn", ours), ("torch", theirs)):
            time.sleep(0.02)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    med_cpu = {k: float(np.median(v)) * 1e3 for k, v in cpu.items()}
    return {"lightcnn_ms": med["lightcnn"], "torch_ms": med["torch"], "ratio_torch": med["lightcnn"] / med["torch"],
            "lightcnn_cpu_ms": med_cpu["lightcnn"], "torch_cpu_ms": med_cpu["torch"],
            "ratio_torch_cpu": med_cpu["lightcnn"] / med_cpu["torch"],
            "first_loss": first[0], "loss_diff": abs(first[0] - first[1])}


CASES = ("mobilenet_v2_last7", "squeezenet1_1_last_fire", "covid_squeezenet_full")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = {}
    print(f"# batch {args.batch}, {args.threads} threads, {args.runs} interleaved runs, load {os.getloadavg()[0]:.2f}",
          file=sys.stderr if args.json else sys.stdout)
    for case in args.cases:
        out[case] = r = compare(case, args.batch, args.threads, args.runs, args.warmup)
        if not args.json:
            print(f"{case:26s} lightcnn {r['lightcnn_ms']:9.1f} ms   torch {r['torch_ms']:9.1f} ms   "
                  f"x torch {r['ratio_torch']:5.2f}   CPU {r['lightcnn_cpu_ms']:8.1f} / {r['torch_cpu_ms']:8.1f} ms "
                  f"x {r['ratio_torch_cpu']:5.2f}   (first-step loss diff {r['loss_diff']:.1e})")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
