"""lightcnn COMMAND [options]   (also: python -m lightcnn COMMAND)

One command for the tools; each subcommand runs the module `python -m lightcnn.<module>` runs, with the same
options (`lightcnn predict --help`). -q/-v given before the subcommand are passed on to it.
"""

import importlib
import sys

#: subcommand -> (module, one line of help)
COMMANDS = {
    "predict": ("lightcnn.predict", "classify images (top-k classes per image)"),
    "weights": ("lightcnn.weights.__main__", "list, fetch, build, convert and inspect weights"),
    "finetune": ("lightcnn.finetune", "fine-tune a network on an image folder"),
    "evaluate": ("lightcnn.evaluate", "evaluate a model on one split of an image folder"),
    "tune": ("lightcnn.tune.__main__", "tune fine-tuning hyperparameters (Gaussian process)"),
    "summary": ("lightcnn.summary", "per-layer table: shapes, parameters, MACs (and ms)"),
    "export": ("lightcnn.export_onnx", "export a model as ONNX"),
    "compile": ("lightcnn.compile", "compile and cache the Numba kernels of models"),
    "serve": ("lightcnn.serve", "serve a model over HTTP"),
}


def _usage():
    from lightcnn import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: lightcnn [--version] [-h] [-q | -v] COMMAND [options]", "",
             f"lightcnn {__version__}: a from-scratch CNN engine for CPU in NumPy + Numba.", "", "commands:"]
    lines += [f"  {name:{width}s}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "'lightcnn COMMAND --help' gives a command's options; -q/--quiet silences progress and notes on "
              "stderr, -v/--verbose adds detail."]
    return "\n".join(lines)


def main(argv=None):
    """Dispatch `lightcnn COMMAND ARGS` to COMMAND's module main(ARGS); returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = []  # -q / -v before the command, handed to it
    while argv and argv[0] in ("-q", "--quiet", "-v", "--verbose", "-vv"):
        passed.append(argv.pop(0))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from lightcnn import __version__

        print(f"lightcnn {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from lightcnn._cli import did_you_mean

        print(f"lightcnn: error: unknown command {name!r}{did_you_mean(name, COMMANDS)}; "
              f"commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"lightcnn: error: '{name}' is not available in this version of lightcnn ({module_name} is missing)",
              file=sys.stderr)
        return 2
    try:
        return module.main(passed + rest)
    except SystemExit as exc:  # argparse's --help/--version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
