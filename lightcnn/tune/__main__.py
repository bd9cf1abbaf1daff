"""python -m lightcnn.tune DATA (--model NAME | --weights FILE.h5) --space SPEC --trials 30 --epochs 20 --out RUN_DIR

Tune fine-tuning hyperparameters with the Gaussian-process optimiser (seeds 000 and 001 do this with 30 trials).
The frozen backbone runs once per image and its pooled features are cached on disk; each trial then trains only a
new head on those vectors (a fraction of a second) and is scored by its best validation accuracy. The best
configuration is finally trained once more by `lightcnn.train.finetune`, which writes the model and its report.

--space  comma-separated NAME=SPEC, e.g. "lr=1e-5:1e-1:log, momentum=0.5:0.99, batch=16|32|64|100, l2=1e-12:1e-3:log"
         low:high[:log] is a range (integers when both bounds are written as integers), a|b|c a choice. Names are
         training options (lr, momentum, l2, weight_decay, dropout, label_smoothing, lr_decay, lr_decay_every,
         epochs, batch_size, focal_gamma) or the aliases batch (batch_size), decay (lr_decay), lambda (l2).
--runs R repeats the whole search with seeds seed, seed+1, ... (seed 000: 3 runs x 30 trials); the best trial over
         all runs wins.

--dask ADDRESS|local[:N] --parallel P  keeps P trials in flight on Dask workers (constant liar for the running
         ones, lightcnn.tune.minimize_parallel); each result is logged as it arrives. After the initial design the
         suggestions differ from a sequential run's, and depend on the order results arrive.

RUN_DIR/run<r>/trials.jsonl  every trial (append-only, fsync'd): --resume replays it without re-evaluating
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
import shutil
import sys
import time
import warnings
from pathlib import Path

ALIASES = {"batch": "batch_size", "decay": "lr_decay", "lambda": "l2"}
TUNABLE = ("lr", "momentum", "l2", "weight_decay", "dropout", "label_smoothing", "lr_decay", "lr_decay_every",
           "epochs", "batch_size", "focal_gamma")


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


def prepare_features(args, progress):
    """Dataset, split and cached pooled features for train/val/test, via the fine-tuning code."""
    from lightcnn.data import check_training_data, discover, split_dataset
    from lightcnn.train.features import extract_features
    from lightcnn.train.run import FinetuneConfig, load_base

    cfg = FinetuneConfig(data=args.data, out=str(Path(args.out) / "best"), model=args.model, weights=args.weights,
                         split=args.split, positive=args.positive, blur_sigma=args.blur_sigma,
                         window=args.window, hu_offset=args.hu_offset,
                         cache_dir=args.cache_dir or str(Path(args.out).resolve() / ".feature-cache"),
                         train=dict(epochs=args.epochs, optimizer=args.optimizer, seed=args.seed))
    ds = discover(cfg.data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = split_dataset(ds, cfg.split, tuple(cfg.fractions), args.seed)
    need = 1 if split.method == "official" else sum(1 for f in cfg.fractions if f > 0)
    leaks = check_training_data(ds, [(split.train, split.val, split.test)], need)  # before any feature
    for message in [str(w.message) for w in caught] + leaks:
        progress(f"warning: {message}")
    model, prep, _ = load_base(cfg)
    if not model.head_is_pooled:
        model.reset_head(len(ds.class_names))
    parts = {"train": split.train, "val": split.val, "test": split.test}
    if len(parts["val"]) == 0:
        raise ValueError(f"{args.data}: the split has no validation images to score trials on")
    features, labels = {}, {}
    start = time.perf_counter()
    for name, idx in parts.items():
        arr = extract_features(model, [ds.items[i] for i in idx], prep, cfg.cache_dir, seed=args.seed,
                               progress=lambda d, t, n=name: progress(f"features {n}: {d}/{t}"))
        features[name], labels[name] = arr[0], ds.labels[idx]
    progress(f"features ready in {time.perf_counter() - start:.1f} s "
             f"(train {len(parts['train'])}, val {len(parts['val'])}, test {len(parts['test'])})")
    return cfg, ds, features, labels


def build_parser():
    from lightcnn._cli import add_common_options, positive_int

    parser = argparse.ArgumentParser(prog="python -m lightcnn.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="image folder (class folders or a dataset with manifest.csv)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="registered weight name, e.g. mobilenet_v2")
    source.add_argument("--weights", help="a lightcnn .h5 file")
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
    parser.add_argument("--config", metavar="RUN/config.json",
                        help="run the settings an earlier tuning run wrote again; options given here override them")
    from lightcnn.cluster import add_dask_arguments

    add_dask_arguments(parser, "trials")
    parser.add_argument("--parallel", type=positive_int, metavar="P",
                        help="with --dask: trials in flight at once, each new one asked with the running ones as "
                             "constant-liar points (default: the number of workers)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="with --dask: Numba/BLAS threads per worker (default 1)")
    add_common_options(parser)
    return parser


#: settings of a run that RUN_DIR/config.json does not keep (they say how to run, not what)
NOT_SAVED = ("config", "resume", "quiet", "verbose", "dask", "parallel", "threads")


def main(argv=None):
    from lightcnn._cli import given_on_line, read_config_option, replay_defaults, set_verbosity

    parser = build_parser()
    _, saved = read_config_option(argv)
    if saved is not None:
        replay_defaults(parser, {k: v for k, v in saved.items() if k not in NOT_SAVED})
    args = parser.parse_args(argv)
    set_verbosity(args)
    if saved is not None:
        explicit = given_on_line(argv, parser, ("model", "weights"))
        for key in ("model", "weights"):
            if explicit and key not in explicit:
                setattr(args, key, None)
    try:
        options, dims = parse_space(args.space)
    except ValueError as exc:
        parser.error(str(exc))
    if args.parallel and args.dask is None:
        parser.error("--parallel P needs --dask (the workers that run the trials)")
    if args.dask is not None:
        from lightcnn.cluster import parse_spec

        try:
            parse_spec(args.dask)
        except ValueError as exc:
            parser.error(str(exc))

    from lightcnn.errors import LightCNNError
    from lightcnn.tune import TuneLogError

    from lightcnn.data import DataCheckError

    try:
        with _trial_runner(args) as client:
            return _run(args, options, dims, client)
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


def _search(args, run, seed, objective, dims, client, data, num_classes):
    """One run's search: sequential minimize, or with a client P trials in flight on the workers."""
    from lightcnn.tune import minimize, minimize_parallel

    common = dict(n_calls=args.trials, n_initial=min(args.initial, args.trials), acquisition=args.acquisition,
                  seed=seed, log_path=Path(args.out) / f"run{run}" / "trials.jsonl", resume=args.resume)
    if client is None:
        return minimize(objective, dims, **common)
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


def _run(args, options, dims, client=None):
    from lightcnn.checkpoint import atomic_write_text
    from lightcnn.train.heads import train_head
    from lightcnn.train.run import finetune

    out = Path(args.out)
    if out.exists() and any(out.glob("run*/trials.jsonl")) and not args.resume:
        raise ValueError(f"{out}: holds an earlier tuning run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SAVED}
    atomic_write_text(out / "config.json", json.dumps(settings, indent=2) + "\n")
    started = time.perf_counter()
    cfg, ds, features, labels = prepare_features(args, _say)
    base_train = dict(epochs=args.epochs, optimizer=args.optimizer, seed=args.seed,
                      positive=ds.class_names.index(args.positive) if args.positive else None)

    # the untuned default configuration, for comparison
    _, _, default_val = train_head(features["train"], labels["train"], features["val"], labels["val"],
                                   dict(base_train, monitor="accuracy"), num_classes=len(ds.class_names))
    _say(f"default configuration: val accuracy {default_val:.4f}")

    runs, results = [], []
    for run in range(args.runs):
        seed = args.seed + run
        _say(f"run {run + 1}/{args.runs} (seed {seed}): {args.trials} trials")
        objective = HeadObjective(options, dict(base_train, seed=args.seed), features, labels,
                                  len(ds.class_names), _say)
        (out / f"run{run}").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        result = _search(args, run, seed, objective, dims, client, {"features": features, "labels": labels},
                         len(ds.class_names))
        seconds = time.perf_counter() - t0
        results.append(result)
        print(f"\nrun {run + 1} (seed {seed}), {seconds:.1f} s, {objective.trial} trials evaluated "
              f"({len(result.func_vals) - objective.trial} replayed from the log)")
        print(trials_table(options, result.x_iters, result.func_vals))
        runs.append(dict(seed=seed, seconds=seconds, best_x=[_plain(v) for v in result.x],
                         best_val_accuracy=-float(result.fun), estimated_x=[_plain(v) for v in result.x_estimated],
                         estimated_val_accuracy=-float(result.fun_estimated), evaluated=objective.trial))

    best = max(runs, key=lambda r: r["best_val_accuracy"])
    _tuning_plots(out, results, runs.index(best))
    best_params = dict(zip(options, best["best_x"]))
    print(f"\nbest: val accuracy {best['best_val_accuracy']:.4f} (GP estimate at its own optimum "
          f"{best['estimated_val_accuracy']:.4f}); default configuration {default_val:.4f}")
    print("      " + ", ".join(f"{k}={_fmt(v)}" for k, v in best_params.items()))

    # RUN_DIR/best is derived from the trials alone: build it beside, then swap it in
    staging = out / "best.partial"
    if staging.exists():
        shutil.rmtree(staging)
    final_cfg = cfg.to_dict()
    final_cfg["out"] = str(staging)
    final_cfg["train"] = dict(cfg.train, **base_train, **best_params, monitor="accuracy")
    final = finetune(final_cfg, progress=_say)
    final_dir = out / "best"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    staging.rename(final_dir)
    final.best_path = final_dir / final.best_path.name
    test = final.report.get("test", {})
    summary = dict(options=options, space=args.space, trials_per_run=args.trials, runs=runs,
                   best_params=best_params, best_val_accuracy=best["best_val_accuracy"],
                   estimated_val_accuracy=best["estimated_val_accuracy"], default_val_accuracy=default_val,
                   final_model=str(final.best_path),
                   test={k: test.get(k) for k in ("accuracy", "sensitivity", "specificity", "precision", "f1",
                                                   "roc_auc", "confidence_intervals")},
                   seconds=time.perf_counter() - started)
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    if test:
        print(f"final model {final.best_path}: test accuracy {test['accuracy']:.4f}, ROC-AUC "
              f"{_fmt(test.get('roc_auc'))}")
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
