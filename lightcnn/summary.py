"""python -m lightcnn.summary NAME [--profile] [--input-size S] [--repeats R]

Print a model's per-layer table: each unit's output shape, parameters and multiply-accumulates (MACs) for one
image, with totals; with --profile also the measured milliseconds per layer (after a warm-up forward, mean of
R runs), which is how slow layers are found.

NAME is, in this order of lookup:
  a path to a lightcnn .h5 file   the model it holds (e.g. a fine-tuned one, with its own head)
  a registered weight name        its architecture and config (``python -m lightcnn.weights list``); the table
                                  does not depend on weight values, so the .h5 need not be built
  an architecture name            the builder's defaults (``mobilenet_v2`` is also a weight name: the weight's
                                  config wins, e.g. TFLite weights have batch norm folded into conv biases)

The layer names in the first column are the ones ``predict --cam-layer`` and lightcnn.explain accept.
Exit codes: 0 printed, 1 the .h5 could not be read, 2 usage error (unknown NAME, bad option).
"""

import argparse
import os
import sys

from lightcnn._cli import add_common_options, add_engine_argument, did_you_mean, note, parse_args, set_verbosity
from lightcnn._cli import positive_int as _positive_int
from lightcnn.errors import LightCNNError


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m lightcnn.summary",
                                     description="Per-layer table of a model: shapes, parameters, MACs (and ms).")
    parser.add_argument("name", metavar="NAME", help="registered weight name, architecture name, or .h5 path")
    parser.add_argument("--profile", action="store_true", help="measure milliseconds per layer")
    parser.add_argument("--input-size", type=_positive_int, metavar="S",
                        help="square input side (default: the size the model was built for)")
    parser.add_argument("--repeats", type=_positive_int, default=5, metavar="R",
                        help="timed runs per layer with --profile (default 5)")
    add_engine_argument(parser)
    add_common_options(parser)
    return parser


def resolve_model(name):
    """NAME -> (model, description). Raises LightCNNError for an unreadable .h5, KeyError for an unknown NAME."""
    from lightcnn.models import BUILDERS, build
    from lightcnn.registry import REGISTRY

    if name.endswith(".h5") or os.sep in name or os.path.isfile(name):
        from lightcnn.api import model_from_checkpoint
        from lightcnn.checkpoint import read_checkpoint

        ckpt = read_checkpoint(name)
        try:
            model = model_from_checkpoint(ckpt)
        except (ValueError, KeyError, TypeError) as exc:
            raise LightCNNError(f"{name}: cannot build the model it describes ({' '.join(str(exc).split())})") \
                from None
        return model, f"weights {name}"
    if name in REGISTRY:
        spec = REGISTRY[name]
        return build(spec.arch, **spec.config), f"registered weights {name!r} (architecture and config only)"
    if name in BUILDERS:
        return build(name), f"architecture {name!r} with default config"
    raise KeyError(name)


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    set_verbosity(args)
    try:
        model, what = resolve_model(args.name)
    except LightCNNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyError:
        from lightcnn.models import BUILDERS
        from lightcnn.registry import REGISTRY

        hint = did_you_mean(args.name, [*REGISTRY, *BUILDERS])
        print(f"error: unknown model {args.name!r}{hint}; weight names: {', '.join(REGISTRY)}; architectures: "
              f"{', '.join(sorted(BUILDERS))}; or a .h5 path", file=sys.stderr)
        return 2
    if args.engine:
        model.engine = args.engine
    try:
        table = model.summary(input_size=args.input_size, profile=args.profile, repeats=args.repeats)
    except (LightCNNError, ValueError) as exc:  # e.g. an input size too small for the network's strides
        print(f"error: {args.name}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2 if args.input_size else 1
    note(f"# {what}; engine: {model.last_engine or model.engine}")
    print(table)
    return 0


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
