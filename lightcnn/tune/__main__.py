"""python -m lightcnn.tune DATA (--model NAME | --weights FILE.h5 | --arch NAME) --space SPEC --trials 30 --epochs 20 --out RUN_DIR

Tune fine-tuning hyperparameters with the Gaussian-process optimiser (seeds 000 and 001 do this with 30 trials).
Each trial is one fine-tuning run, scored by its best validation accuracy; the best configuration is finally
trained once more by `lightcnn.train.finetune`, which writes the model and its report (unless --no-refit).

--mode head    (default) the frozen backbone runs once per image and view, its pooled features are cached on disk;
               each trial trains only a new head on those vectors (a fraction of a second)
--mode last-k  each trial trains the last blocks + head (--unfreeze K | P%, --freeze-first K); the frozen
               prefix's outputs at the split point are computed by the first trial and read from the feature cache
               by every later one, so a trial runs only the trainable suffix; with unfreeze in --space, per split
               point (seed 000: --freeze-first 6)
--mode full    each trial trains every layer (seed 001: --arch covid_squeezenet); the cache holds the
               preprocessed images
Any other lightcnn.finetune option is passed through and fixed for every trial and the refit, e.g. --unfreeze 11,
--freeze-first 6, --bn recalibrate, --activation elu, --augment seed000 --views 4, --input-size 160, --lr 1e-3
(the default of an option the search leaves out), --dropout 0.5, --lr-decay 0.8 --lr-decay-every 5.

--median-stop on|off  (last-k / full, default on) a trial whose best validation accuracy up to epoch e is below
         the median of the earlier trials' best up to epoch e stops there (from epoch max(1, epochs/4), once 3
         earlier trials reached it); it keeps its best so far. Each trial's curve goes into trials.jsonl, so
         --resume replays the same decisions.
--budget MINUTES  no trial starts after MINUTES of searching (counted from the first trial); the search ends
         with the best trial so far and the refit, said in one line.
--refit-epochs N  the refit trains N epochs instead of --epochs (short trials, one long final run).

--space  comma-separated NAME=SPEC, e.g. "lr=1e-5:1e-1:log, momentum=0.5:0.99, batch=16|32|64|100, l2=1e-12:1e-3:log"
         low:high[:log] is a range (integers when both bounds are written as integers), a|b|c a choice. Names are
         training options (lr, momentum, l2, weight_decay, dropout, label_smoothing, lr_decay, lr_decay_every,
         epochs, batch_size, focal_gamma), the aliases batch (batch_size), decay (lr_decay), lambda (l2), or
         unfreeze (--mode last-k: the number of trained blocks, e.g. unfreeze=2:11).
--runs R repeats the whole search with seeds seed, seed+1, ... (seed 000: 3 runs x 30 trials); the best trial over
         all runs wins.

--dask ADDRESS|local[:N] --parallel P  keeps P trials in flight on Dask workers (constant liar for the running
         ones, lightcnn.tune.minimize_parallel); each result is logged as it arrives. After the initial design the
         suggestions differ from a sequential run's, and depend on the order results arrive. Head mode only.

RUN_DIR/run<r>/trials.jsonl  every trial (append-only, fsync'd): --resume replays it without re-evaluating;
                             last-k/full trials add their validation curve, "stopped" (epochs run when the
                             median rule stopped them), the split point and the features computed / cached
RUN_DIR/config.json          this command's settings: --config RUN_DIR/config.json runs them again (options
                             given with it override the file's)
RUN_DIR/best.json            winning hyperparameters, observed and GP-estimated validation accuracy, the default
                             configuration's validation accuracy, test-split metrics of the final model
RUN_DIR/best/                the final fine-tuning run (best.h5, report.json, metrics.csv, config.json, the
                             plots and report.html)
RUN_DIR/convergence.png      best validation accuracy so far per trial, one line per run (matplotlib)
RUN_DIR/objective.png        the best run's GP mean over its two most important dimensions (shortest ARD
                             length-scales), the other dimensions at the best trial (matplotlib)

Exit codes: 0 done; 1 an expected failure (one line on stderr); 2 usage error.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

ALIASES = {"batch": "batch_size", "decay": "lr_decay", "lambda": "l2"}
TUNABLE = ("lr", "momentum", "l2", "weight_decay", "dropout", "label_smoothing", "lr_decay", "lr_decay_every",
           "epochs", "batch_size", "focal_gamma", "unfreeze")
#: lightcnn.finetune options a tuning run cannot pass through (several runs, or the score trials are ranked by)
NOT_PASSED = {"--kfold": "a tuning run scores trials on one validation split",
              "--seeds": "use --runs for repeated searches",
              "--monitor": "trials are scored by their best validation accuracy"}
MEDIAN_MIN_TRIALS = 3


def _err(message):
    print(f"error: {message}", file=sys.stderr, flush=True)


def _say(message):
    from lightcnn._cli import note

    note(message)


def parse_space(spec):
    """(option names, dimensions) from the --space text; aliases resolved, unknown names refused."""
    from lightcnn.tune import describe_space

    names, dims = describe_space(spec)
    options = []
    for name in names:
        option = ALIASES.get(name, name)
        if option not in TUNABLE:
            raise ValueError(f"--space: {name!r} is not a tunable option; use one of "
                             f"{', '.join(sorted(set(TUNABLE) | set(ALIASES)))}")
        options.append(option)
    if len(set(options)) != len(options):
        raise ValueError("--space names the same option twice")
    return options, dims


def _plain(value):
    """numpy scalars -> Python numbers for JSON and TrainConfig."""
    return value.item() if hasattr(value, "item") else value


class HeadObjective:
    """x (a point of the search space) -> minus the best validation accuracy of a head trained on cached features."""

    def __init__(self, options, base_train, features, labels, num_classes, progress):
        self.options, self.base_train = options, dict(base_train)
        self.features, self.labels = features, labels
        self.num_classes, self.progress = num_classes, progress
        self.trial = 0
        self.rows = []

    def config_for(self, x):
        cfg = dict(self.base_train)
        for option, value in zip(self.options, x):
            cfg[option] = _plain(value)
        cfg["monitor"] = "accuracy"
        return cfg

    def __call__(self, x):
        from lightcnn.train.heads import head_trial

        best, seconds, failure = head_trial(self.features, self.labels, self.config_for(x), self.num_classes)
        return self.record(x, best, seconds, failure)

    def record(self, x, best, seconds, failure=None):
        """Count and print one finished trial (here or on a Dask worker); returns the value to minimise."""
        self.trial += 1
        if failure and self.progress:
            self.progress(f"  trial {self.trial}: failed ({failure})")
        self.rows.append((self.trial, best, [_plain(v) for v in x], seconds))
        if self.progress:
            shown = ", ".join(f"{o}={_fmt(v)}" for o, v in zip(self.options, x))
            self.progress(f"  trial {self.trial:3d}  val accuracy {_fmt(best)}  {shown}  ({seconds:.2f} s)")
        return -best if best == best else float("nan")


def _fmt(value):
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if (abs(value) < 1e-3 or abs(value) >= 1e4) and value != 0 else f"{value:.4f}"
    return str(value)


def trials_table(options, x_iters, func_vals):
    """Seed 000's Table 2 layout: trial, validation accuracy, then one column per hyperparameter."""
    header = f"{'trial':>5s}  {'accuracy':>8s}  " + "  ".join(f"{o:>12s}" for o in options)
    lines = [header, "-" * len(header)]
    for i, (x, y) in enumerate(zip(x_iters, func_vals), 1):
        acc = -y if y == y else float("nan")
        lines.append(f"{i:5d}  {_fmt(float(acc)):>8s}  " + "  ".join(f"{_fmt(_plain(v)):>12s}" for v in x))
    return "\n".join(lines)


class CurveObjective:
    """x -> minus the best validation accuracy of one fine-tuning trial (last-k / full), median-stopped.

    train_fn(settings, on_epoch, info) -> best val accuracy runs the trial, calls on_epoch(val accuracy, last=bool)
    after every epoch (last: no epoch follows, nothing to stop) and may put fields for the log into the dict `info` (lightcnn.train.trials.FinetuneTrials;
    tests pass fakes). `stopper` is a MedianStopping or
    None. After each call `last` holds the trial's log fields (curve, stopped, info), see `log_extra`.
    """

    def __init__(self, options, train_fn, stopper, progress):
        self.options, self.train_fn, self.stopper, self.progress = options, train_fn, stopper, progress
        self.trial, self.rows, self.stopped, self.last = 0, [], 0, {}

    def __call__(self, x):
        from lightcnn.errors import LightCNNError
        from lightcnn.tune import StopTrial

        curve, stopper = [], self.stopper

        def on_epoch(value, last=False):  # last: the trial ends after this epoch anyway
            curve.append(float(value))
            if stopper is not None and not last and stopper.should_stop(curve):
                raise StopTrial

        settings = {o: _plain(v) for o, v in zip(self.options, x)}
        t0, stopped, failure, info = time.perf_counter(), None, None, {}
        try:
            best = self.train_fn(settings, on_epoch, info)
        except StopTrial:
            best, stopped = max(curve), len(curve)
        except (LightCNNError, FloatingPointError) as exc:  # a diverging trial is a bad value, not a crash
            best, failure = float("nan"), " ".join(str(exc).split())
        if stopper is not None:
            stopper.add(curve)
        self.stopped += stopped is not None
        self.last = {"curve": curve, **({"stopped": stopped} if stopped else {}),
                     **({"failure": failure} if failure else {}), **info}
        seconds = time.perf_counter() - t0
        self.trial += 1
        self.rows.append((self.trial, best, [_plain(v) for v in x], seconds))
        if self.progress:
            shown = ", ".join(f"{o}={_fmt(v)}" for o, v in settings.items())
            why = (f"  stopped after epoch {stopped} (below the median)" if stopped else
                   f"  failed ({failure})" if failure else "")
            self.progress(f"  trial {self.trial:3d}  val accuracy {_fmt(float(best))}  {shown}  "
                          f"({seconds:.2f} s){why}")
        best = float(best)
        return -best if best == best else float("nan")

    def log_extra(self, index, x, y):
        """The last trial's fields for its trials.jsonl line (minimize's log_extra)."""
        return self.last


def prepare_data(args, cfg, progress):
    """(dataset, {"train", "val", "test": indices}) with the data checks of lightcnn.finetune."""
    from lightcnn.data import check_training_data, discover, split_dataset

    ds = discover(cfg.data, cfg.csv)
    if cfg.positive is not None and cfg.positive not in ds.class_names:
        raise ValueError(f"--positive {cfg.positive!r} is not a class of {cfg.data} ({', '.join(ds.class_names)})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = split_dataset(ds, cfg.split, tuple(cfg.fractions), args.seed)
    need = 1 if split.method == "official" else sum(1 for f in cfg.fractions if f > 0)
    leaks = check_training_data(ds, [(split.train, split.val, split.test)], need)  # before any feature
    for message in [str(w.message) for w in caught] + leaks:
        progress(f"warning: {message}")
    parts = {"train": split.train, "val": split.val, "test": split.test}
    if len(parts["val"]) == 0:
        raise ValueError(f"{args.data}: the split has no validation images to score trials on")
    return ds, parts


def prepare_features(cfg, ds, parts, progress):
    """Cached pooled features of train (all views) / val / test for head-mode trials, via the fine-tuning code."""
    from lightcnn.train.trials import head_features

    start = time.perf_counter()
    x, _ = head_features(cfg, ds, parts, progress)
    features = dict(x)
    labels = {name: ds.labels[idx] for name, idx in parts.items()}
    progress(f"features ready in {time.perf_counter() - start:.1f} s "
             f"(train {len(parts['train'])}, val {len(parts['val'])}, test {len(parts['test'])})")
    return features, labels


def split_passthrough(argv, parser, finetune_parser):
    """(argv for this parser, argv for lightcnn.finetune's): an option only lightcnn.finetune knows goes, with
    its value, to the second list; everything else stays."""
    own = parser._option_string_actions
    theirs = finetune_parser._option_string_actions
    mine, passed, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if token.startswith("--") and name not in own and name in theirs:
            takes = 0 if "=" in token or theirs[name].nargs == 0 else 1
            passed.extend(argv[i:i + 1 + takes])
            i += 1 + takes
        else:
            mine.append(token)
            i += 1
    return mine, passed


def base_config(args, passed, out):
    """The FinetuneConfig every trial and the refit start from: lightcnn.finetune's parser on the passed-through
    options, then this command's own (split, positive, preprocessing, epochs, optimizer, seed, cache)."""
    from lightcnn.finetune import build_parser as finetune_parser
    from lightcnn.finetune import config_from_args
    from lightcnn.train.run import FinetuneConfig

    source = next(f"--{k}" for k in ("model", "weights", "arch") if getattr(args, k))
    parser = finetune_parser()
    parser.prog = "python -m lightcnn.tune"
    ft = parser.parse_args([str(args.data), "--out", str(Path(out) / "best"), source,
                            str(getattr(args, source[2:])), "--mode", args.mode, *passed])
    config = config_from_args(ft)
    config.update(split=args.split, positive=args.positive, blur_sigma=args.blur_sigma, window=args.window,
                  hu_offset=args.hu_offset, cache_dir=args.cache_dir or str(Path(out).resolve() / ".feature-cache"))
    config["train"].update(epochs=args.epochs, optimizer=args.optimizer, seed=args.seed, monitor="accuracy")
    return FinetuneConfig.from_dict(config)


def build_parser():
    from lightcnn._cli import add_common_options, positive_float, positive_int

    parser = argparse.ArgumentParser(prog="python -m lightcnn.tune", description=__doc__.split("\n\n")[0],
                                     epilog="Options of python -m lightcnn.finetune not listed here are passed "
                                            "through to every trial and the refit.")
    parser.add_argument("data", help="image folder (class folders or a dataset with manifest.csv)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="registered weight name, e.g. mobilenet_v2")
    source.add_argument("--weights", help="a lightcnn .h5 file")
    source.add_argument("--arch", help="an architecture trained from scratch (--mode full), e.g. covid_squeezenet")
    parser.add_argument("--mode", choices=["head", "last-k", "full"], default="head",
                        help="what each trial trains (default head); see above")
    parser.add_argument("--space", required=True, help='e.g. "lr=1e-5:1e-1:log, batch=16|32|64"')
    parser.add_argument("--trials", type=positive_int, default=30, help="trials per run (default 30)")
    parser.add_argument("--initial", type=positive_int, default=10, help="trials from the Sobol design before the GP leads")
    parser.add_argument("--runs", type=positive_int, default=1, help="independent searches with seeds seed, seed+1, ...")
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs per trial (unless tuned)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                        help="optimiser of every trial's head and of the final run (default sgd)")
    parser.add_argument("--split", default="auto", choices=["auto", "official", "random", "group"],
                        help="auto = the dataset's own split if it has one, else group-aware random (default auto)")
    parser.add_argument("--positive", help="positive class name for sensitivity/specificity (e.g. CT_COVID)")
    parser.add_argument("--blur-sigma", type=float, help="3x3 Gaussian blur added to preprocessing (seed 000: 1.3)")
    parser.add_argument("--window", help="CT window for DICOM / 16-bit CT images: lung, mediastinum, bone, auto "
                        "or CENTER,WIDTH")
    parser.add_argument("--hu-offset", type=float, help="16-bit PNG/TIFF CT exports: HU = pixel + N (e.g. -1024)")
    parser.add_argument("--acquisition", choices=["ei", "pi", "lcb"], default="ei",
                        help="acquisition function: expected improvement (default), probability of improvement, "
                             "lower confidence bound")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the heads and the first run's search (default 0)")
    parser.add_argument("--cache-dir", help="feature cache (default RUN_DIR/.feature-cache)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the trial logs in RUN_DIR")
    parser.add_argument("--median-stop", choices=["on", "off"], default="on",
                        help="stop last-k/full trials below the median of earlier trials' curves (default on)")
    parser.add_argument("--budget", type=positive_float, metavar="MINUTES",
                        help="start no trial after MINUTES of searching; end with the best so far")
    parser.add_argument("--refit-epochs", type=positive_int, metavar="N",
                        help="epochs of the final fine-tuning of the best configuration (default: --epochs); short "
                             "trials, then a longer refit")
    parser.add_argument("--no-refit", action="store_true",
                        help="skip the final fine-tuning of the best configuration (best.json still written)")
    parser.add_argument("--config", metavar="RUN/config.json",
                        help="run the settings an earlier tuning run wrote again; options given here override them")
    from lightcnn.cluster import add_dask_arguments

    add_dask_arguments(parser, "trials")
    parser.add_argument("--parallel", type=positive_int, metavar="P",
                        help="with --dask: trials in flight at once, each new one asked with the running ones as "
                             "constant-liar points (default: the number of workers)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="Numba/BLAS threads of the trials run here; with --dask: per worker (default 1)")
    add_common_options(parser)
    return parser


#: settings of a run that RUN_DIR/config.json does not keep (they say how to run, not what)
NOT_SAVED = ("config", "resume", "quiet", "verbose", "dask", "parallel", "threads")
SOURCES = ("model", "weights", "arch")


def main(argv=None):
    from lightcnn._cli import check_config_keys, given_on_line, read_config_option, replay_defaults, set_verbosity
    from lightcnn.finetune import build_parser as finetune_parser

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    config_path, saved = read_config_option(argv)
    mine, passed = split_passthrough(argv, parser, finetune_parser())
    if saved is not None:
        check_config_keys(parser, config_path, saved, extra=("finetune_args",))
        replay_defaults(parser, {k: v for k, v in saved.items() if k not in NOT_SAVED + ("finetune_args",)})
        passed = list(saved.get("finetune_args") or []) + passed  # later values win
    args = parser.parse_args(mine)
    args.finetune_args = passed
    set_verbosity(args)
    if saved is not None:
        explicit = given_on_line(argv, parser, SOURCES)
        for key in SOURCES:
            if explicit and key not in explicit:
                setattr(args, key, None)
    for token in passed:
        if token.split("=", 1)[0] in NOT_PASSED:
            parser.error(f"{token.split('=', 1)[0]}: {NOT_PASSED[token.split('=', 1)[0]]}")
    try:
        options, dims = parse_space(args.space)
    except ValueError as exc:
        parser.error(str(exc))
    if "unfreeze" in options and args.mode != "last-k":
        parser.error("unfreeze in --space needs --mode last-k")
    if "unfreeze" in options and any(t.split("=", 1)[0] == "--freeze-first" for t in passed):
        parser.error("unfreeze in --space and --freeze-first both set the split point; give one")
    if args.refit_epochs and "epochs" in options:
        parser.error("--refit-epochs and epochs in --space both set the refit's epochs; give one")
    if args.parallel and args.dask is None:
        parser.error("--parallel P needs --dask (the workers that run the trials)")
    if args.dask is not None and args.mode != "head":
        parser.error(f"--dask runs head-mode trials in parallel; --mode {args.mode} trials run here one at a time "
                     "(they share the frozen part's cache in this process): drop --dask")
    if args.dask is not None:
        from lightcnn.cluster import parse_spec

        try:
            parse_spec(args.dask)
        except ValueError as exc:
            parser.error(str(exc))
    elif args.threads:  # as lightcnn.finetune --threads: this process's kernels and BLAS
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # effective only when numpy is not imported yet
        from lightcnn._jit import set_num_threads

        set_num_threads(args.threads)
    from lightcnn.train.run import RunError

    try:
        cfg = base_config(args, passed, args.out)
    except RunError as exc:
        parser.error(str(exc))

    from lightcnn.errors import LightCNNError
    from lightcnn.tune import TuneLogError

    from lightcnn.data import DataCheckError

    try:
        with _trial_runner(args) as client:
            return _run(args, cfg, options, dims, client)
    except BrokenPipeError:  # stdout closed by its reader: lightcnn._cli.run_main ends quietly
        raise
    except DataCheckError as exc:  # the images cannot make a meaningful run: one line per problem
        for problem in exc.problems:
            _err(problem)
        return 2
    except (LightCNNError, TuneLogError, ValueError, OSError) as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err(f"interrupted; continue with --resume (completed trials are in {args.out})")
        return 130


@contextlib.contextmanager
def _trial_runner(args):
    """None (trials run here) or a connected Dask client (lightcnn.cluster)."""
    if args.dask is None:
        yield None
        return
    from lightcnn.cluster import session, worker_count

    with session(args.dask, args.threads or 1) as client:
        _say(f"dask: {worker_count(client)} workers at {client.scheduler.address}")
        yield client


def _search(args, run, seed, objective, dims, client, data, num_classes, budget=None):
    """One run's search: sequential minimize, or with a client P trials in flight on the workers."""
    from lightcnn.tune import minimize, minimize_parallel

    common = dict(n_calls=args.trials, n_initial=min(args.initial, args.trials), acquisition=args.acquisition,
                  seed=seed, log_path=Path(args.out) / f"run{run}" / "trials.jsonl", resume=args.resume,
                  callback=budget)
    if client is None:
        return minimize(objective, dims, log_extra=getattr(objective, "log_extra", None), **common)
    from lightcnn.cluster import require_dask, worker_count
    from lightcnn.train.heads import trial_task

    distributed = require_dask()
    # the features go to every worker once; each trial ships only its settings
    shipped = client.scatter({"features": data["features"], "labels": data["labels"]}, broadcast=True)

    def submit(x):
        return client.submit(trial_task, shipped, objective.config_for(x), num_classes, args.threads or 1,
                             pure=False)

    return minimize_parallel(submit, dims, n_parallel=args.parallel or max(1, worker_count(client)),
                             wait=distributed.wait, on_trial=lambda i, x, r: objective.record(x, r[2], r[1], r[3]),
                             **common)


def _stopper(args, log_path):
    """The median rule of a last-k/full run (None when off), holding the curves its log already has."""
    from lightcnn.tune import MedianStopping
    from lightcnn.tune.trial_log import TrialLog

    if args.median_stop == "off":
        return None
    stopper = MedianStopping(min_epochs=max(1, math.ceil(args.epochs / 4)), min_trials=MEDIAN_MIN_TRIALS)
    log = TrialLog(log_path)
    if args.resume and log.exists():
        for extra in log.extras():
            stopper.add(extra.get("curve", []))
    return stopper


def _run(args, cfg, options, dims, client=None):
    from lightcnn.checkpoint import atomic_write_text
    from lightcnn.train.heads import train_head
    from lightcnn.train.run import finetune
    from lightcnn.tune import TimeBudget

    out = Path(args.out)
    if out.exists() and any(out.glob("run*/trials.jsonl")) and not args.resume:
        raise ValueError(f"{out}: holds an earlier tuning run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SAVED}
    atomic_write_text(out / "config.json", json.dumps(settings, indent=2) + "\n")
    started = time.perf_counter()
    ds, parts = prepare_data(args, cfg, _say)
    num_classes = len(ds.class_names)
    positive = ds.class_names.index(args.positive) if args.positive else None
    base_train = dict(cfg.train, positive=positive)
    head = args.mode == "head"
    default_val = None
    if head:
        features, labels = prepare_features(cfg, ds, parts, _say)
        # the untuned default configuration, for comparison
        _, _, default_val = train_head(features["train"], labels["train"], features["val"], labels["val"],
                                       base_train, num_classes=num_classes)
        _say(f"default configuration: val accuracy {default_val:.4f}")
    else:
        from lightcnn.train.trials import FinetuneTrials

        trials = FinetuneTrials(cfg, ds, parts, _say)

    budget = None
    runs, results, ended_by_budget = [], [], False
    for run in range(args.runs):
        seed = args.seed + run
        if budget is not None and budget(None):
            ended_by_budget = True
            break
        _say(f"run {run + 1}/{args.runs} (seed {seed}): {args.trials} trials")
        (out / f"run{run}").mkdir(exist_ok=True)
        if head:
            objective = HeadObjective(options, base_train, features, labels, num_classes, _say)
        else:
            objective = CurveObjective(options, trials, _stopper(args, out / f"run{run}" / "trials.jsonl"), _say)
        if args.budget and budget is None:
            budget = TimeBudget(60.0 * args.budget)  # counted from the first trial
        t0 = time.perf_counter()
        result = _search(args, run, seed, objective, dims, client,
                         {"features": features, "labels": labels} if head else None, num_classes, budget)
        seconds = time.perf_counter() - t0
        ended_by_budget = ended_by_budget or (budget is not None and budget(None) and len(result.func_vals) < args.trials)
        if not len(result.func_vals):
            continue
        results.append(result)
        stopped = getattr(objective, "stopped", 0)
        print(f"\nrun {run + 1} (seed {seed}), {seconds:.1f} s, {objective.trial} trials evaluated "
              f"({len(result.func_vals) - objective.trial} replayed from the log)"
              + (f", {stopped} stopped by the median rule" if stopped else ""))
        print(trials_table(options, result.x_iters, result.func_vals))
        if result.x is None:
            continue
        runs.append(dict(seed=seed, seconds=seconds, best_x=[_plain(v) for v in result.x],
                         best_val_accuracy=-float(result.fun), estimated_x=[_plain(v) for v in result.x_estimated],
                         estimated_val_accuracy=-float(result.fun_estimated), evaluated=objective.trial,
                         trials=len(result.func_vals), stopped_by_median_rule=stopped, result=len(results) - 1))
        if ended_by_budget:
            break
    if not runs:
        raise ValueError("no trial finished" + (f" within --budget {args.budget:g} min" if args.budget else
                                                " with a finite validation accuracy"))

    best = max(runs, key=lambda r: r["best_val_accuracy"])
    _tuning_plots(out, results, best["result"])
    best_params = dict(zip(options, best["best_x"]))
    if ended_by_budget:
        n = sum(r["trials"] for r in runs)
        print(f"\nbudget of {args.budget:g} min reached after {n} trial{'s' if n != 1 else ''} "
              f"({len(runs)} of {args.runs} run{'s' if args.runs != 1 else ''}): no new trial started; best so far "
              f"val accuracy {best['best_val_accuracy']:.4f}, "
              + ("no refit (--no-refit)" if args.no_refit else "refitting it"))
    print(f"\nbest: val accuracy {best['best_val_accuracy']:.4f} (GP estimate at its own optimum "
          f"{best['estimated_val_accuracy']:.4f}); default configuration "
          + (f"{default_val:.4f}" if default_val is not None else "not run (--mode " + args.mode + ")"))
    print("      " + ", ".join(f"{k}={_fmt(v)}" for k, v in best_params.items()))

    summary = dict(options=options, space=args.space, mode=args.mode, trials_per_run=args.trials,
                   runs=[{k: v for k, v in r.items() if k != "result"} for r in runs],
                   best_params=best_params, best_val_accuracy=best["best_val_accuracy"],
                   estimated_val_accuracy=best["estimated_val_accuracy"], default_val_accuracy=default_val,
                   budget_reached=ended_by_budget, final_model=None, test={})
    if not args.no_refit:
        # RUN_DIR/best is derived from the trials alone: build it beside, then swap it in
        staging = out / "best.partial"
        if staging.exists():
            shutil.rmtree(staging)
        final_cfg = cfg.to_dict()
        final_cfg["out"] = str(staging)
        if "unfreeze" in best_params:
            final_cfg["unfreeze"], final_cfg["freeze_first"] = best_params["unfreeze"], None
        final_cfg["train"] = dict(cfg.train, **{k: v for k, v in best_params.items() if k != "unfreeze"},
                                  positive=positive, monitor="accuracy")
        if args.refit_epochs:
            final_cfg["train"]["epochs"] = args.refit_epochs
        final = finetune(final_cfg, progress=_say)
        final_dir = out / "best"
        if final_dir.exists():
            shutil.rmtree(final_dir)
        staging.rename(final_dir)
        final.best_path = final_dir / final.best_path.name
        test = final.report.get("test", {})
        summary.update(final_model=str(final.best_path),
                       test={k: test.get(k) for k in ("accuracy", "sensitivity", "specificity", "precision", "f1",
                                                       "roc_auc", "confidence_intervals")})
        if test:
            print(f"final model {final.best_path}: test accuracy {test['accuracy']:.4f}, ROC-AUC "
                  f"{_fmt(test.get('roc_auc'))}")
    summary["seconds"] = time.perf_counter() - started
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    _say(f"done in {summary['seconds']:.1f} s; {out / 'best.json'}")
    return 0


def _tuning_plots(out, results, best_run):
    """RUN_DIR/convergence.png (best-so-far per trial, every run) and objective.png (the best run's GP mean over
    its two most important dimensions); one line instead without matplotlib."""
    from lightcnn.plots import PLOT_HINT, convergence_plot, matplotlib_available, objective_plot

    if not matplotlib_available():
        _say(PLOT_HINT)
        return
    accuracy = [[-float(v) for v in r.func_vals] for r in results]  # the tuner minimised -accuracy
    convergence_plot(out / "convergence.png", accuracy)
    best = results[best_run]
    objective_plot(out / "objective.png", best.space, best.x_iters, accuracy[best_run])


def _json_default(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return str(value)


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
