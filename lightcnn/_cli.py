"""What the command-line tools share: argparse value types (one message style for bad numbers) and `run_main`,
the `python -m` entry point that ends quietly when the reader of stdout goes away."""

import argparse
import os
import sys


def run_main(main):
    """Run a CLI's ``main()`` and exit with its return code (``if __name__ == "__main__": run_main(main)``).

    When whoever reads stdout stops early (``python -m lightcnn.predict ... --json | head -1``), writing raises
    BrokenPipeError. Like cat, grep or head themselves, the tool then stops quietly with status 0: no traceback,
    nothing on stderr. stdout is pointed at /dev/null first, so the interpreter's final flush of the lines still
    buffered cannot fail again on the way out.
    """
    try:
        code = main()
        sys.stdout.flush()  # lines still buffered may be the ones that meet the closed pipe
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor: nothing left to flush into a pipe
            pass
        code = 0
    sys.exit(code)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text):
    value = nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def probability(text):
    value = nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def add_engine_argument(parser):
    """--engine auto|numba|numpy (see lightcnn.engine)."""
    parser.add_argument("--engine", choices=("auto", "numba", "numpy"), default=None,
                        help="inference engine: auto (default, or $LIGHTCNN_ENGINE) runs Numba's compiled kernels if "
                             "they are cached ('python -m lightcnn.compile') and NumPy otherwise; numba compiles "
                             "what is missing (once, tens of seconds); numpy never compiles")


def engine_note(model, images, name):
    """One stderr line when auto fell back to NumPy for a long job (> LONG_JOB images), else nothing."""
    if model.engine == "auto" and model.last_engine == "numpy" and images > LONG_JOB:
        from lightcnn.engine import compile_hint

        print(f"note: {compile_hint(name)}", file=sys.stderr)


#: images above which a job is long enough for the compile hint
LONG_JOB = 50
