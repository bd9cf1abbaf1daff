"""What the command-line tools share: argparse value types (one message style for bad numbers), `run_main`,
the `python -m` entry point that ends quietly when the reader of stdout goes away, and the options every command
has (--version, -q/--quiet, -v/--verbose) with the stderr printers that obey them.

Verbosity: -q shows only warnings and errors, the default adds progress and notes (`note`), -v adds details
(`detail`). Results on stdout and "error:" lines are never silenced.
"""

import argparse
import os
import sys

from lightcnn.errors import did_you_mean  # noqa: F401  (re-exported for the CLIs)


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


QUIET, NORMAL, VERBOSE = -1, 0, 1
_level = NORMAL


def add_common_options(parser, subcommand=False):
    """--version, -q/--quiet and -v/--verbose on `parser`.

    subcommand=True for the parsers of a command's subcommands: their defaults are suppressed so that an option
    given before the subcommand (`weights -q build`) is not reset by the subparser's default.
    """
    from lightcnn import __version__

    default = argparse.SUPPRESS if subcommand else None
    parser.add_argument("--version", action="version", version=f"lightcnn {__version__}",
                        help="print 'lightcnn X.Y.Z' and exit")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default if subcommand else False,
                       help="no progress or notes on stderr (warnings and errors still)")
    group.add_argument("-v", "--verbose", action="count", default=default if subcommand else 0,
                       help="more detail on stderr")
    return parser


def parse_args(parser, argv):
    """parser.parse_args(argv), or the exit code argparse chose: 0 after --help/--version, 2 for a usage error
    (it has printed why). Lets a CLI's main() return its code instead of raising SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def set_verbosity(args):
    """Set the level `note`/`detail` obey from parsed -q/-v; returns it (QUIET, NORMAL or VERBOSE)."""
    global _level
    if getattr(args, "quiet", False):
        _level = QUIET
    elif getattr(args, "verbose", 0):
        _level = VERBOSE
    else:
        _level = NORMAL
    return _level


def verbosity():
    return _level


def note(message, end="\n"):
    """Progress or a note on stderr, unless -q."""
    if _level >= NORMAL:
        print(message, end=end, file=sys.stderr, flush=True)


def detail(message):
    """A detail on stderr, only with -v."""
    if _level >= VERBOSE:
        print(message, file=sys.stderr, flush=True)


def progress_printer():
    """`note` as a progress callback, or None under -q (for functions that take progress=None to stay silent)."""
    return note if _level >= NORMAL else None


def read_config_option(argv):
    """(path, dict) of `--config FILE` in argv (a JSON object a run wrote with its settings), or (None, None).

    Read before the real parse, so that the file's values can become the parser's defaults (`replay_defaults`)
    and options given on the command line override them. An unreadable file exits with status 2, as argparse does.
    """
    import json

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return None, None
    try:
        with open(known.config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"error: --config {known.config}: {exc}", file=sys.stderr)
        sys.exit(2)
    if not isinstance(data, dict):
        print(f"error: --config {known.config}: expected a JSON object", file=sys.stderr)
        sys.exit(2)
    return known.config, data


def replay_defaults(parser, values):
    """Make `values` ({dest: value}) the parser's defaults; what they fill is no longer required on the line."""
    for action in parser._actions:
        if action.dest in values:
            action.default = values[action.dest]
            action.required = False
            if not action.option_strings:  # a positional argument: may now be left out
                action.nargs = "?"
    for group in parser._mutually_exclusive_groups:
        if any(a.dest in values and values[a.dest] is not None for a in group._group_actions):
            group.required = False


#: keys a --config file may hold besides the parser's options: free-text provenance (recipes/*.json)
CONFIG_NOTES = ("about",)


def check_config_keys(parser, path, saved, extra=()):
    """Exit with status 2 (argparse's usage error) naming every key of the --config file `saved` that is neither
    an option of `parser` nor one of `extra` / CONFIG_NOTES, so a misspelt setting is never silently ignored."""
    known = {a.dest for a in parser._actions} | set(extra) | set(CONFIG_NOTES)
    unknown = sorted(set(saved) - known)
    if unknown:
        parser.error(f"--config {path}: unknown setting(s) {', '.join(map(repr, unknown))}")


def given_on_line(argv, parser, dests):
    """Which of `dests` were given as options in argv (by any of their option strings, also as --opt=value)."""
    strings = {s: a.dest for a in parser._actions for s in a.option_strings if a.dest in dests}
    given = set()
    for token in argv or ():
        name = token.split("=", 1)[0]
        if name in strings:
            given.add(strings[name])
    return given


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
    """One stderr line when auto fell back to NumPy for a long job (> LONG_JOB images), else nothing (or -q);
    once per process and model name (a tuning run fills its feature cache for the training, then the validation
    images, and printed the same hint twice)."""
    if model.engine == "auto" and model.last_engine == "numpy" and images > LONG_JOB and name not in _HINTED:
        from lightcnn.engine import compile_hint

        _HINTED.add(name)
        note(f"note: {compile_hint(name)}")


#: images above which a job is long enough for the compile hint
LONG_JOB = 50
_HINTED = set()  # model names engine_note has given the hint for in this process
