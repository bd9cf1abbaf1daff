"""python -m lightcnn.compile [MODEL ...] [--all] [--batch N ...]: compile and cache the Numba kernels models need.

The one visible place where lightcnn compiles. Until it has run, the default engine ("auto")
answers with the NumPy engine (no JIT, about half the speed); afterwards the same commands run
the compiled Numba kernels, loaded from the disk cache in milliseconds. Run it once per machine,
Python and numba version (a Dockerfile or CI job runs it after `pip install`):

    python -m lightcnn.compile                  # mobilenet_v2, the default model
    python -m lightcnn.compile squeezenet1_1 mobilenet_v3_large
    python -m lightcnn.compile --all            # every registered architecture

MODEL is a registered weight name or an architecture name; no weights are needed (kernels
depend on the layer types, not on the numbers). Each model's plan is built and run once on
zeros at every --batch size (default 1 and 8: the plan picks serial kernels for small maps
and fused bottlenecks for large ones), so exactly the kernels its inference calls get compiled.
Progress goes to stderr: each kernel as it compiles, with its seconds.

Two processes may start it at once: a lock file beside the cache makes the second wait, and it
then finds the kernels cached. Where the cache lives: lightcnn._jit.cache_dir().
"""

import argparse
import os
import sys
import time

from lightcnn._cli import QUIET, add_common_options, did_you_mean, parse_args, positive_int, set_verbosity


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m lightcnn.compile",
                                     description="Compile and cache the Numba kernels of the given models.")
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="registered weight or architecture names (default: mobilenet_v2)")
    parser.add_argument("--all", action="store_true", help="every registered architecture")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8], metavar="N",
                        help="batch sizes to prepare (default: 1 8)")
    add_common_options(parser)
    return parser


def _architecture(name):
    """(arch, config) for a registered weight name or an architecture name."""
    from lightcnn.models import BUILDERS
    from lightcnn.registry import REGISTRY

    if name in REGISTRY:
        spec = REGISTRY[name]
        return spec.arch, dict(spec.config), bool(spec.simulate_quantization)
    if name in BUILDERS:
        return name, {}, False
    raise KeyError(name)


class _Progress:
    """Prints each kernel Numba compiles (numba's compile events), nested callees indented."""

    def __init__(self, quiet):
        self.quiet, self.depth, self.starts, self.compiled = quiet, 0, [], []

    def on_start(self, name):
        self.starts.append(time.perf_counter())
        self.depth += 1

    def on_end(self, name):
        seconds = time.perf_counter() - self.starts.pop()
        self.depth -= 1
        if not name.startswith("lightcnn."):
            return  # numba's own helpers (np.empty, min, ...) compile inside our kernels: counted there
        self.compiled.append((name, seconds))
        if not self.quiet:
            print(f"  {'  ' * self.depth}compiled {name} ({seconds:.1f} s)", file=sys.stderr, flush=True)


def _listen(progress):
    """Install a listener for numba's compile events; returns a function that removes it."""
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev):
            progress.on_start(_name(ev))

        def on_end(self, ev):
            progress.on_end(_name(ev))

    def _name(ev):
        dispatcher = ev.data.get("dispatcher")
        fn = getattr(dispatcher, "py_func", None)
        return f"{fn.__module__}.{fn.__qualname__}" if fn is not None else str(dispatcher)

    listener = Listener()
    event.register("numba:compile", listener)
    return lambda: event.unregister("numba:compile", listener)


def compile_models(names, batches=(1, 8), quiet=False):
    """Compile the kernels the named models' inference plans call; returns [(kernel, seconds)] compiled."""
    import numpy as np

    from lightcnn import _jit
    from lightcnn.engine import record_compiled
    from lightcnn.layers.basic import skip_initialisation
    from lightcnn.models import build

    progress = _Progress(quiet)
    lock = _lock(quiet)
    try:
        _jit._numba()
        stop_listening = _listen(progress)
        try:
            for i, name in enumerate(names, 1):
                arch, config, quantised = _architecture(name)
                if not quiet:
                    print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                kernels = []
                for rounded in (False, True) if quantised else (False,):
                    with skip_initialisation():
                        model = build(arch, **config)
                    if rounded:  # the plan of a simulated 8-bit model: rounding steps, no fused bottlenecks
                        _simulate_everywhere(model)
                    model.engine = "numba"
                    for batch in batches:
                        x = np.zeros((batch,) + tuple(model.input_shape), np.float32)
                        for part, value in (("features", x), ("head", model.features(x))):
                            plan = model.inference_plan(value, part)
                            if plan is not None:
                                plan.run(value)
                                kernels += plan.numba_kernels()
                record_compiled(kernels)
                if not quiet:
                    print(f"[{i}/{len(names)}] {name}: ready ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                          flush=True)
        finally:
            stop_listening()
    finally:
        lock()
    return progress.compiled


def _simulate_everywhere(model):
    """Round every tensor lightcnn.quantsim can round (unit grids of scale 1): the plan a quantised
    registry model runs (its real table, read from the TFLite file, names a subset of these)."""
    from lightcnn import quantsim
    from lightcnn.layers.basic import Dense, GlobalAvgPool
    from lightcnn.layers.blocks import ConvBNAct, InvertedResidual, SqueezeExcite

    layers = {}
    for path, layer in model.named_layers():
        if isinstance(layer, (ConvBNAct, SqueezeExcite, Dense, GlobalAvgPool)) or (
                isinstance(layer, InvertedResidual) and layer.use_residual):
            layers[path] = (1.0, 0)
        if isinstance(layer, SqueezeExcite):
            layers[f"{path}.fc1@input"] = (1.0, 0)
    quantsim.simulate_activation_quantization(model, {"dtype": "uint8", "layers": layers})


def _lock(quiet):
    """Hold an exclusive lock beside the kernel cache until the returned function is called."""
    from lightcnn._jit import cache_dir

    where = cache_dir()
    if where is None:
        return lambda: None
    try:
        import fcntl
    except ImportError:  # Windows: numba's own cache writes are atomic; two compiles only waste time
        return lambda: None
    handle = open(os.path.join(where, "lightcnn-compile.lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        if not quiet:
            print("waiting for another 'python -m lightcnn.compile' to finish ...", file=sys.stderr, flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)

    def release():
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
    return release


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    args.quiet = set_verbosity(args) == QUIET
    from lightcnn._jit import cache_dir, cache_unavailable_reason
    from lightcnn.models import BUILDERS
    from lightcnn.registry import DEFAULT_MODEL, REGISTRY

    names = list(args.models)
    if args.all:  # every architecture, and every registered weight whose plan differs (simulated 8-bit models)
        names += sorted(BUILDERS) + [name for name, spec in REGISTRY.items() if spec.simulate_quantization]
    names = list(dict.fromkeys(names or [DEFAULT_MODEL]))
    for name in names:
        if name not in REGISTRY and name not in BUILDERS:
            hint = did_you_mean(name, [*REGISTRY, *BUILDERS])
            print(f"error: unknown model {name!r}{hint}; weight names: {', '.join(REGISTRY)}; architectures: "
                  f"{', '.join(sorted(BUILDERS))}", file=sys.stderr)
            return 2
    if cache_dir() is None:
        print(f"error: {cache_unavailable_reason()}: compiled kernels could not be kept", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"compiling Numba kernels into {cache_dir()} (once per machine; tens of seconds per new kernel)",
              file=sys.stderr, flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = compile_models(names, tuple(args.batch), quiet=args.quiet)
    if not args.quiet:
        print(f"done: {len(compiled)} kernel compilations, {time.perf_counter() - t0:.1f} s wall, "
              f"{time.process_time() - c0:.1f} s CPU; the default engine now runs these models on Numba",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
