"""lightcnn vs ONNX Runtime vs PyTorch eager: same weights, same inputs, timed side by side in one process.

    python bench/compare_runtimes.py                          # table: 4 models x batch 1, 8 x 2 threads
    python bench/compare_runtimes.py --threads 1 --batch 1    # other settings
    python bench/compare_runtimes.py --json                   # one JSON object instead of the table
    python bench/compare_runtimes.py --process                # also: whole predict processes, cold / compiled / warm

Needs the optional extras onnx + onnxruntime (``pip install lightcnn[compare]``); PyTorch is
used when installed (``torch_ms`` is null otherwise).

For each model
  1. weights: the torchvision fixture checkpoint (../shared/fixtures/torchvision/NAME.pth, realistic
     batch-norm statistics, logits of order 1) converted by lightcnn.weights.convert_file, or random
     weights with randomised batch-norm statistics when the fixture is absent (--random);
  2. the same weights in each engine (lightcnn twice: its numba engine, the headline, and its numpy
     engine, reported as `numpy ms` and its ratio to the numba engine): ONNX Runtime runs lightcnn's own graph exported by
     lightcnn.export_onnx (NHWC input, transposed inside the graph); PyTorch runs an eager NCHW
     nn.Module built here layer by layer from the lightcnn model (Conv2d + BatchNorm2d + activation,
     unfused, as torchvision's eval-mode models run);
  3. the outputs must agree: max |lightcnn - ORT| and |lightcnn - torch| <= 1e-4 (else exit 1);
  4. timing: after --warmup runs of each engine, --runs rounds of A B C (lightcnn, ORT, torch); in
     each round every engine gets a pause (--gap-ms, default 30 ms) and then a burst of --burst
     calls (default 5), each timed. All engines see the same machine load.
Two regimes come out of one run, and both are printed:
  - sustained (the headline ms, ratios and JSON): calls 2..K of each burst, the engine's pool
    busy as in a benchmark loop or a stream of batches;
  - after idle (`idle ms` columns, JSON `*_idle_ms`): the first call of each burst, after
    the pause, as a sporadic request sees it.
Why the pause: ORT's, PyTorch's and Numba's thread pools keep spinning for a while after a
call, and on 2 cores the next engine would otherwise pay for the previous engine's spinning
threads (measured: lightcnn right after an ORT call with a 2 ms gap ran 3.5x slower than alone;
with 50 ms, as fast as alone). Why the burst: after 30 ms idle a sleeping pool must be woken per
parallel loop, and the engines differ most there (lightcnn's ~60 loops per forward at batch 1
made the first call ~2x a sustained one; ORT's much less): one regime alone would hide that.
--burst 1 gives the after-idle regime only (the sustained columns then repeat it).
lightcnn's NumPy engine is timed in rounds of its own after those: its BLAS calls leave OpenBLAS's
threads spinning for far longer than the pause (measured: MobileNetV2 at batch 1 on 2 threads, the
numba engine took 7.5 ms in rounds shared with the NumPy engine and 5.1 ms without it, while ORT
moved from 3.6 to 3.8 ms).

Threads: Numba's pool is set with lightcnn._jit.set_num_threads, ORT's intra-op pool with
intra_op_num_threads (inter-op 1, sequential), PyTorch with torch.set_num_threads.
GFLOP/s counts 2 x multiply-accumulates of the convolutions and dense layers (Model.count_macs).
The shared-machine caveat applies: compare ratios from one run, not absolute times across runs.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("LIGHTCNN_FIXTURES", REPO.parent / "shared" / "fixtures")) / "torchvision"
MODELS = ("mobilenet_v2", "squeezenet1_0", "squeezenet1_1", "mobilenet_v3_large")
TOL = 1e-4


# --------------------------------------------------------------------------- models and weights


def load_lightcnn(arch, random=False, seed=0):
    """(model, source) with the fixture weights if present (and not `random`), else random ones."""
    from lightcnn.models import build

    pth = FIXTURES / f"{arch}.pth"
    if pth.exists() and not random:
        from lightcnn.checkpoint import load_state
        from lightcnn.weights import convert_file

        ck = convert_file(pth, arch)
        model = build(arch, **ck.config)
        load_state(model, ck.tensors)
        return model, f"fixture {pth.name}"
    from lightcnn.models.base import randomise_batchnorm_statistics

    model = build(arch)
    randomise_batchnorm_statistics(model, np.random.default_rng(seed))
    return model, "random"


def ort_session(model, threads):
    import onnxruntime as ort

    from lightcnn.export_onnx import export_onnx

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(export_onnx(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def torch_module(model):
    """An eager NCHW torch.nn.Module computing the same function as the lightcnn model."""
    from torch import nn

    convert = _torch_translator()
    trunk, shape = convert(model.features_net, model.input_shape)
    head, _ = convert(model.head_net, shape)
    return nn.Sequential(trunk, head).eval()


def torch_convert(layer, shape):
    """(torch module, output shape (H, W, C) or (F,)) of a lightcnn layer applied to `shape` (NCHW inside)."""
    return _torch_translator()(layer, shape)


def _torch_translator():
    """convert(layer, shape) -> (module, shape): lightcnn layers as eager PyTorch modules, same weights."""
    import torch
    from torch import nn

    from lightcnn.kernels import activation as act_k
    from lightcnn.layers.base import Sequential
    from lightcnn.layers.basic import Dense, DepthwiseConv2d, Dropout, GlobalAvgPool, MaxPool2d, resolve_padding
    from lightcnn.layers.blocks import ConvBNAct, Fire, InvertedResidual, SqueezeExcite

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, np.float32)).clone()  # never share lightcnn's arrays

    def act(code, alpha=1.0):
        return {act_k.ACT_NONE: nn.Identity(), act_k.ACT_RELU: nn.ReLU(), act_k.ACT_RELU6: nn.ReLU6(),
                act_k.ACT_ELU: nn.ELU(alpha), act_k.ACT_SIGMOID: nn.Sigmoid(),
                act_k.ACT_HARD_SIGMOID: nn.Hardsigmoid(), act_k.ACT_HARD_SWISH: nn.Hardswish()}[code]

    class ConvUnit(nn.Module):
        def __init__(self, unit, h, w):
            super().__init__()
            conv = unit.conv
            top, bottom, left, right = conv.pads(h, w)
            self.pad = None if (top == bottom and left == right) else (left, right, top, bottom)
            depthwise = isinstance(conv, DepthwiseConv2d)
            c_in, c_out = conv.in_ch, conv.out_ch
            self.conv = nn.Conv2d(c_in, c_out, conv.kernel, conv.stride, 0 if self.pad else (top, left),
                                  groups=c_in if depthwise else 1, bias="bias" in conv.params)
            wt = conv.params["weight"]
            self.conv.weight.data = t(wt.transpose(2, 0, 1)[:, None] if depthwise else wt.transpose(3, 2, 0, 1))
            if "bias" in conv.params:
                self.conv.bias.data = t(conv.params["bias"])
            self.bn = None
            if unit.bn is not None:
                bn = unit.bn
                self.bn = nn.BatchNorm2d(bn.channels, eps=bn.eps)
                self.bn.weight.data, self.bn.bias.data = t(bn.params["weight"]), t(bn.params["bias"])
                self.bn.running_mean.data = t(bn.buffers["running_mean"])
                self.bn.running_var.data = t(bn.buffers["running_var"])
            self.act = act(unit.act, unit.alpha)

        def forward(self, x):
            if self.pad:
                x = nn.functional.pad(x, self.pad)
            x = self.conv(x)
            return self.act(self.bn(x) if self.bn is not None else x)

    class Residual(nn.Module):
        def __init__(self, body, use):
            super().__init__()
            self.body, self.use = body, use

        def forward(self, x):
            return self.body(x) + x if self.use else self.body(x)

    class SE(nn.Module):
        def __init__(self, se):
            super().__init__()
            self.fc1 = nn.Conv2d(se.channels, se.squeeze_channels, 1)
            self.fc2 = nn.Conv2d(se.squeeze_channels, se.channels, 1)
            for fc, dense in ((self.fc1, se.fc1), (self.fc2, se.fc2)):
                fc.weight.data = t(dense.params["weight"].T[:, :, None, None])
                fc.bias.data = t(dense.params["bias"])
            self.a1, self.a2 = act(se.fc1.act), act(se.fc2.act)

        def forward(self, x):
            s = self.a2(self.fc2(self.a1(self.fc1(x.mean((2, 3), keepdim=True)))))
            return x * s

    class FireT(nn.Module):
        def __init__(self, fire, h, w):
            super().__init__()
            self.squeeze = ConvUnit(fire.squeeze, h, w)
            self.e1, self.e3 = ConvUnit(fire.expand1x1, h, w), ConvUnit(fire.expand3x3, h, w)
            self.bypass = fire.bypass

        def forward(self, x):
            s = self.squeeze(x)
            y = torch.cat([self.e1(s), self.e3(s)], 1)
            return y + x if self.bypass else y

    class DenseT(nn.Module):
        def __init__(self, dense):
            super().__init__()
            self.fc = nn.Linear(dense.in_features, dense.out_features)
            self.fc.weight.data = t(dense.params["weight"].T)
            self.fc.bias.data = t(dense.params["bias"])
            self.act = act(dense.act)

        def forward(self, x):
            return self.act(self.fc(x.flatten(1)))

    class GAP(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    def convert(layer, shape):
        """(module, output shape (H, W, C) or (F,)) for `layer` applied to `shape`."""
        if isinstance(layer, Sequential):
            mods = []
            for _, child in layer.children():
                mod, shape = convert(child, shape)
                mods.append(mod)
            return nn.Sequential(*mods), shape
        if isinstance(layer, ConvBNAct):
            h, w, _ = shape
            n, ho, wo, c = layer.conv.output_shape((1, h, w, layer.in_ch))
            return ConvUnit(layer, h, w), (ho, wo, c)
        if isinstance(layer, InvertedResidual):
            mods = []
            out = shape
            for _, child in layer.children():
                mod, out = (SE(child), out) if isinstance(child, SqueezeExcite) else convert(child, out)
                mods.append(mod)
            return Residual(nn.Sequential(*mods), layer.use_residual), out
        if isinstance(layer, Fire):
            return FireT(layer, shape[0], shape[1]), (shape[0], shape[1], layer.out_ch)
        if isinstance(layer, MaxPool2d):
            h, w, c = shape
            top, bottom, left, right = resolve_padding(layer.padding, h, w, *layer.kernel, *layer.stride)
            if top != bottom or left != right:
                raise NotImplementedError("asymmetric max-pool padding")
            from lightcnn.kernels.shapes import conv_output_size

            ho = conv_output_size(h, layer.kernel[0], layer.stride[0], top, bottom, layer.ceil_mode)
            wo = conv_output_size(w, layer.kernel[1], layer.stride[1], left, right, layer.ceil_mode)
            return nn.MaxPool2d(layer.kernel, layer.stride, (top, left), ceil_mode=layer.ceil_mode), (ho, wo, c)
        if isinstance(layer, GlobalAvgPool):
            return GAP(), (shape[-1],)
        if isinstance(layer, Dense):
            return DenseT(layer), (layer.out_features,)
        if isinstance(layer, Dropout):
            return nn.Identity(), shape
        if type(layer).__name__ == "_TransposeAct":  # seed 001's 4x upsampling + ELU
            h, w, _ = shape
            tc = layer.tconv
            (kh, kw), (sh, sw), (top, _, left, _) = tc.kernel, tc.stride, tc.padding
            mod = nn.ConvTranspose2d(tc.in_ch, tc.out_ch, (kh, kw), (sh, sw), (top, left))
            mod.weight.data = t(tc.params["weight"].transpose(2, 3, 0, 1))
            mod.bias.data = t(tc.params["bias"])
            return nn.Sequential(mod, act(layer.act.code, layer.act.alpha)), ((h - 1) * sh + kh - 2 * top,
                                                                            (w - 1) * sw + kw - 2 * left, tc.out_ch)
        if type(layer).__name__ == "CovidSqueezeFeatures":
            early, skip_shape = convert(layer.early, shape)
            late, late_shape = convert(layer.late, skip_shape)
            up, up_shape = convert(layer.upsample, late_shape)
            fuse, out_shape = convert(layer.fuse, skip_shape[:2] + (up_shape[2] + skip_shape[2],))
            return CovidT(early, late, up, fuse, skip_shape[:2]), out_shape
        raise NotImplementedError(f"no PyTorch translation for {type(layer).__name__}")

    class CovidT(nn.Module):
        def __init__(self, early, late, up, fuse, hw):
            super().__init__()
            self.early, self.late, self.up, self.fuse, self.hw = early, late, up, fuse, hw

        def forward(self, x):
            skip = self.early(x)
            up = self.up(self.late(skip))[:, :, :self.hw[0], :self.hw[1]]
            pad = (0, self.hw[1] - up.shape[3], 0, self.hw[0] - up.shape[2])
            if any(pad):
                up = nn.functional.pad(up, pad)
            return self.fuse(torch.cat([up, skip], 1))

    return convert


def torch_runner(model, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    module = torch_module(model)

    def run(x_nchw):
        with torch.inference_mode():
            return module(x_nchw).numpy()

    return run


# --------------------------------------------------------------------------- timing


def interleaved(fns, runs, warmup, gap_s, burst=1):
    """{name: (first_call_seconds, sustained_seconds)}: warm-up, then `runs` rounds; in each round
    every fn in turn gets a pause of gap_s and `burst` timed calls (A..A B..B C..C A..A ...).

    first: the first call of each burst (after the pause); sustained: the other calls of the
    bursts (the first ones again when burst == 1).
    """
    for name, (fn, arg) in fns.items():
        for _ in range(warmup):
            fn(arg)
    first = {name: [] for name in fns}
    rest = {name: [] for name in fns}
    for _ in range(runs):
        for name, (fn, arg) in fns.items():
            if gap_s:
                time.sleep(gap_s)
            for i in range(max(1, burst)):
                t0 = time.perf_counter()
                fn(arg)
                (rest if i else first)[name].append(time.perf_counter() - t0)
    return {name: (first[name], rest[name] or first[name]) for name in fns}


def compare(models, batches, threads, runs, warmup, gap_ms, use_torch=True, random=False, log=print, burst=5,
            use_numpy=True):
    from lightcnn._jit import set_num_threads

    set_num_threads(threads)
    results = {}
    for arch in models:
        model, source = load_lightcnn(arch, random)
        model.engine = "numba"
        numpy_model = None
        if use_numpy:
            numpy_model, _ = load_lightcnn(arch, random)  # the same weights on the NumPy engine
            numpy_model.engine = "numpy"
        ort_run = ort_session(model, threads)
        torch_run = torch_runner(model, threads) if use_torch else None
        macs = model.count_macs()
        results[arch] = {}
        for batch in batches:
            rng = np.random.default_rng(batch)
            x = rng.standard_normal((batch,) + model.input_shape).astype(np.float32)
            io_path = FIXTURES / f"{arch}_io.npz"
            if io_path.exists() and not random:  # the fixture's own (normalised) inputs, repeated to the batch
                xin = np.load(io_path)["input_nhwc"]
                x = np.ascontiguousarray(np.resize(xin, (batch,) + xin.shape[1:]), np.float32)
            y = model.forward(x)
            diffs = {"ort": float(np.abs(ort_run(x) - y).max())}
            fns = {"lightcnn": (model.forward, x), "ort": (ort_run, x)}
            if numpy_model is not None:
                diffs["numpy"] = float(np.abs(numpy_model.forward(x) - y).max())
            if torch_run is not None:
                import torch

                x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
                diffs["torch"] = float(np.abs(torch_run(x_nchw) - y).max())
                fns["torch"] = (torch_run, x_nchw)
            bad = {k: v for k, v in diffs.items() if not v <= TOL}
            if bad:
                raise SystemExit(f"{arch} batch {batch}: outputs disagree with lightcnn: {bad} (> {TOL})")
            times = interleaved(fns, runs, warmup, gap_ms / 1e3, burst)
            if numpy_model is not None:  # in rounds of its own, after the others: see the module docstring
                times.update(interleaved({"numpy": (numpy_model.forward, x)}, runs, warmup, gap_ms / 1e3, burst))
            med = {k: float(np.median(v[1])) * 1e3 for k, v in times.items()}
            p90 = {k: float(np.percentile(v[1], 90)) * 1e3 for k, v in times.items()}
            idle = {k: float(np.median(v[0])) * 1e3 for k, v in times.items()}
            row = {
                "lightcnn_ms": med["lightcnn"], "ort_ms": med["ort"], "torch_ms": med.get("torch"),
                "ratio_ort": med["lightcnn"] / med["ort"],
                "ratio_torch": med["lightcnn"] / med["torch"] if "torch" in med else None,
                "max_abs_diff": max(diffs.values()),
                "lightcnn_p90_ms": p90["lightcnn"], "ort_p90_ms": p90["ort"], "torch_p90_ms": p90.get("torch"),
                "lightcnn_idle_ms": idle["lightcnn"], "ort_idle_ms": idle["ort"], "torch_idle_ms": idle.get("torch"),
                "ratio_ort_idle": idle["lightcnn"] / idle["ort"],
                "numpy_ms": med.get("numpy"),
                "ratio_numpy_numba": med["numpy"] / med["lightcnn"] if "numpy" in med else None,
                "ratio_numpy_ort": med["numpy"] / med["ort"] if "numpy" in med else None,
                "lightcnn_gflops": 2.0 * macs * batch / (med["lightcnn"] * 1e6),
                "ort_gflops": 2.0 * macs * batch / (med["ort"] * 1e6),
                "weights": source,
            }
            results[arch][str(batch)] = row
            log(_format_row(arch, batch, threads, row))
    return results


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


HEADER = (f"{'model':20s} {'batch':>5s} {'thr':>3s} | {'lightcnn ms':>11s} {'p90':>6s} | {'ORT ms':>7s} {'p90':>6s} | "
          f"{'torch ms':>8s} {'p90':>6s} | {'x ORT':>6s} {'x torch':>7s} | {'GFLOP/s':>7s} {'ORT':>5s} | {'max|diff|':>9s} | "
          f"{'idle ms':>7s} {'ORT':>6s} {'x ORT':>6s} | {'numpy ms':>8s} {'x numba':>7s}")


def _format_row(arch, batch, threads, r):
    return (f"{arch:20s} {batch:5d} {threads:3d} | {r['lightcnn_ms']:11.2f} {r['lightcnn_p90_ms']:6.2f} | "
            f"{r['ort_ms']:7.2f} {r['ort_p90_ms']:6.2f} | {_fmt(r['torch_ms'], '8.2f')} {_fmt(r['torch_p90_ms'], '6.2f')} | "
            f"{r['ratio_ort']:6.2f} {_fmt(r['ratio_torch'], '7.2f')} | {r['lightcnn_gflops']:7.1f} {r['ort_gflops']:5.0f} | "
            f"{r['max_abs_diff']:9.1e} | {r['lightcnn_idle_ms']:7.2f} {r['ort_idle_ms']:6.2f} {r['ratio_ort_idle']:6.2f} | "
            f"{_fmt(r['numpy_ms'], '8.2f')} {_fmt(r['ratio_numpy_numba'], '7.2f')}")


# --------------------------------------------------------------------------- whole process


# The child is started by a small launcher process: a child forked straight from this process
# (hundreds of MB with PyTorch and ONNX Runtime loaded) would count the pages it shares with us
# before exec in its peak RSS.
_LAUNCHER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
print(wall, usage.ru_maxrss / 1024.0, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)
sys.stderr.write(proc.stderr.read().decode()[-500:])
"""


def _run_measured(cmd, env):
    """{wall_s, cpu_s, rss_mb} of `cmd` run as a fresh process (raises with its stderr if it fails)."""
    done = subprocess.run([sys.executable, "-c", _LAUNCHER] + cmd, env=env, capture_output=True, text=True)
    wall, rss, rc, cpu = done.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr}")
    return {"wall_s": round(float(wall), 3), "cpu_s": round(float(cpu), 3), "rss_mb": round(float(rss), 1)}


_ORT_PREDICT = """
import sys, numpy as np, onnxruntime
from lightcnn.preprocess import Preprocessing, load_image, preprocess_image
import json
spec = Preprocessing.from_dict(json.loads(sys.argv[3]))
x = preprocess_image(load_image(sys.argv[2]), spec)[None]
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = int(sys.argv[4])
session = onnxruntime.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
logits = session.run(None, {session.get_inputs()[0].name: x})[0]
print(int(logits.argmax()))
"""


def _median_run(cmd, env, repeats):
    runs = [_run_measured(cmd, env) for _ in range(repeats)]
    return {k: float(np.median([r[k] for r in runs])) if k != "rss_mb" else max(r[k] for r in runs) for k in runs[0]}


def process_figures(image, model="mobilenet_v2", threads=2, repeats=3):
    """Whole `python -m lightcnn.predict IMAGE` processes on a fresh kernel cache, each {wall_s, cpu_s, rss_mb}:

    cold            empty cache, default engine (auto -> numpy: nothing compiles)
    compile         python -m lightcnn.compile MODEL into that cache
    after_compile   the first predict after it (auto -> numba, kernels loaded from the cache)
    warm_numba / warm_numpy   medians of `repeats` more runs with --engine numba / numpy
    ort             a script that preprocesses the same image and runs the same weights in ONNX Runtime
    """
    cmd = [sys.executable, "-m", "lightcnn.predict", str(image), "--model", model, "--threads", str(threads)]
    out = {"command": " ".join(cmd[1:])}
    with tempfile.TemporaryDirectory(prefix="lightcnn-cold-cache-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "LIGHTCNN_ENGINE"}
        env["NUMBA_CACHE_DIR"] = cache
        out["cold"] = _run_measured(cmd, env)
        out["compile"] = _run_measured([sys.executable, "-m", "lightcnn.compile", model, "-q"], env)
        out["after_compile"] = _run_measured(cmd, env)
        out["warm_numba"] = _median_run(cmd + ["--engine", "numba"], env, repeats)
        out["warm_numpy"] = _median_run(cmd + ["--engine", "numpy"], env, repeats)
        try:
            import lightcnn
            from lightcnn.export_onnx import export_onnx

            clf = lightcnn.load(model)
            onnx_path = os.path.join(cache, f"{model}.onnx")
            export_onnx(clf.model, onnx_path)
            spec = json.dumps(clf.preprocessing.to_dict())
            out["ort"] = _median_run([sys.executable, "-c", _ORT_PREDICT, onnx_path, str(image), spec, str(threads)],
                                     env, repeats)
        except Exception as exc:  # noqa: BLE001 - ORT figures are a comparison, not the measurement
            out["ort"] = {"error": f"{type(exc).__name__}: {exc}"}
    code = "import time; t = time.perf_counter(); import lightcnn; print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
             for _ in range(3)]
    out["import_lightcnn_s"] = float(np.median(times))
    return out


def _default_image():
    root = Path(os.environ.get("LIGHTCNN_DATA", REPO.parent / "shared" / "data"))
    for pattern in ("smoke-test-images/*.jpg", "imagenet-sample/images/*.JPEG", "**/*.jpg"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    return None


# --------------------------------------------------------------------------- main


PROCESS_HEADER = (f"{'model':22s} {'engine / step':28s} {'wall s':>7s} {'CPU s':>7s} {'peak RSS MB':>11s}")
_PROCESS_ROWS = [("cold", "auto, empty cache (-> numpy)"), ("compile", "python -m lightcnn.compile"),
                 ("after_compile", "auto, after compile"), ("warm_numba", "--engine numba, warm"),
                 ("warm_numpy", "--engine numpy"), ("ort", "ONNX Runtime script")]


def _process_report(args, log):
    """Whole-process figures for each --process-models model, as a table (and a dict for --json)."""
    image = args.image or _default_image()
    if image is None:
        log("# --process: no image found")
        return {"error": "no image found"}
    log(f"# whole processes on {image}, {max(args.threads)} threads, load {os.getloadavg()[0]:.2f}")
    log(PROCESS_HEADER)
    report = {}
    for model in args.process_models:
        figures = report[model] = process_figures(image, model=model, threads=max(args.threads))
        for key, label in _PROCESS_ROWS:
            row = figures.get(key) or {}
            if "wall_s" in row:
                log(f"{model:22s} {label:28s} {row['wall_s']:7.2f} {row['cpu_s']:7.2f} {row['rss_mb']:11.1f}")
            else:
                log(f"{model:22s} {label:28s} {row.get('error', 'n/a')}")
    log(f"# import lightcnn: {report[args.process_models[0]]['import_lightcnn_s'] * 1e3:.2f} ms; "
        f"load after: {os.getloadavg()[0]:.2f}")
    if args.process_only and args.json:
        print(json.dumps(report, indent=1))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--runs", type=int, default=50, help="timed rounds per engine (default 50)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--gap-ms", type=float, default=30.0, help="pause before each burst (default 30 ms)")
    parser.add_argument("--burst", type=int, default=5,
                        help="timed calls per engine per round (default 5): the first is 'after idle', the rest "
                             "'sustained'")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-numpy", action="store_true",
                        help="skip the NumPy engine (under load its batch-8 calls make a run many minutes longer)")
    parser.add_argument("--random", action="store_true", help="random weights even when fixtures exist")
    parser.add_argument("--json", action="store_true", help="print one JSON object {model: {batch: {...}}}")
    parser.add_argument("--process", action="store_true", help="also time python -m lightcnn.predict (subprocess)")
    parser.add_argument("--image", help="image for --process (default: one from ../shared/data)")
    parser.add_argument("--process-only", action="store_true", help="only the whole-process figures (no latency table)")
    parser.add_argument("--process-models", nargs="+", default=["mobilenet_v2"], metavar="NAME",
                        help="registered models for --process (default: mobilenet_v2; their weights must be built)")
    args = parser.parse_args(argv)

    import onnxruntime

    from lightcnn import _blas

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.process_only:
        _process_report(args, log)
        return 0
    blas = _blas.info()
    log(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"onnxruntime {onnxruntime.__version__}; BLAS for lightcnn: OpenBLAS {blas['coretype']} "
        f"({blas['threads']} thread per call)")
    log(HEADER)
    results = {}
    for threads in args.threads:
        res = compare(args.models, args.batch, threads, args.runs, args.warmup, args.gap_ms,
                      use_torch=not args.no_torch, random=args.random, log=log, burst=args.burst,
                      use_numpy=not args.no_numpy)
        for arch, per_batch in res.items():
            for batch, row in per_batch.items():
                key = batch if len(args.threads) == 1 else f"{batch}@{threads}t"
                results.setdefault(arch, {})[key] = row
    import numba

    log(f"# load average after: {os.getloadavg()[0]:.2f}; Numba threading layer: {numba.threading_layer()}")
    process = _process_report(args, log) if args.process else None
    if args.json:
        doc = {arch: {b: {k: row[k] for k in ("lightcnn_ms", "ort_ms", "torch_ms", "ratio_ort", "ratio_torch",
                                               "max_abs_diff", "lightcnn_idle_ms", "ort_idle_ms", "torch_idle_ms",
                                               "ratio_ort_idle", "numpy_ms", "ratio_numpy_numba")}
                   for b, row in per.items()}
               for arch, per in results.items()}
        if process is not None:
            doc["_process"] = process
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
