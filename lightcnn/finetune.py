"""python -m lightcnn.finetune DATA (--model NAME | --weights FILE.h5 | --arch NAME) --out RUN_DIR [options]

Fine-tune an ImageNet network on an image folder (class folders, or a bundled dataset with manifest.csv) and
write RUN_DIR/config.json, metrics.csv (one row per epoch), last.h5 (resume state, every epoch), best.h5 (the
fine-tuned model: class names + preprocessing inside, usable with `python -m lightcnn.predict --weights`) and
report.json (per split: accuracy, sensitivity, specificity, precision, f1, roc_auc, confusion matrix, bootstrap
95 % confidence intervals, per-class table). Progress goes to stderr.

Exit codes: 0 done; 1 expected failure (one line "error: ..."; e.g. the loss became NaN - the last good
checkpoint RUN_DIR/last.h5 is kept); 2 usage error.
"""

import argparse
import os
import sys

from lightcnn._cli import add_common_options, progress_printer, set_verbosity
from lightcnn._cli import nonneg_float as _nonneg_float
from lightcnn._cli import nonneg_int as _nonneg_int
from lightcnn._cli import positive_float as _positive_float
from lightcnn._cli import positive_int as _positive_int
from lightcnn.errors import LightCNNError

EPILOG = """\
modes:
  head     train only a new head on pooled features of the frozen backbone; the backbone runs once per image
           (and per augmented view) and its outputs are cached on disk (--cache-dir), keyed by the weights,
           the preprocessing and the file, so later epochs and runs cost only the head
  last-k   also train the last K blocks (--unfreeze K: the last K inverted-residual blocks plus the final 1x1
           conv of MobileNets, or the last K Fire modules of SqueezeNet). EVERY batch norm stays frozen in
           inference mode (running statistics), also inside the unfrozen blocks; the frozen prefix runs once per
           image/view and is cached too
  full     train every layer, batch norm in training mode (e.g. --arch covid_squeezenet from scratch)

augmentation presets (--augment NAME, or a JSON object of lightcnn.augment ops):
  seed000  random resized crop, scale 0.08-1.0      seed001  rotation <= 90, zoom 1.1-1.3, Gaussian noise
  seed002  horizontal flip + colour jitter          seed003  rotation <= 40, zoom 1.0-1.2, flip (+ --oversample)
  light    crop scale 0.5-1, rotation <= 15, flip, brightness/contrast 0.2
  Augmented views are computed once (--views N per training image); each epoch uses one view per image.
"""


def _fractions(text):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.8,0.1,0.1, got {text!r}") \
            from None
    if len(values) not in (2, 3) or abs(sum(values) - 1) > 1e-6 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"fractions must be 2 or 3 numbers >= 0 summing to 1, got {text!r}")
    return values


def _hidden(text):
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 64,64,32, got {text!r}") from None


def build_parser():
    p = argparse.ArgumentParser(prog="python -m lightcnn.finetune", description=__doc__.split("\n\n")[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="image folder: DATA/<class>/<image>, or a bundled dataset "
                                                "with manifest.csv (covid-ct-ucsd, covid-xray-3class)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME", help="registered weights (python -m lightcnn.weights list)")
    src.add_argument("--weights", metavar="FILE.h5", help="any lightcnn .h5 file")
    src.add_argument("--arch", metavar="NAME", help="build this architecture from scratch (needs --mode full)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="output folder (created)")
    p.add_argument("--csv", metavar="FILE", help="explicit CSV of file,label[,group][,split] relative to DATA")

    g = p.add_argument_group("what trains")
    g.add_argument("--mode", choices=("head", "last-k", "full"), default="head", help="default: head")
    g.add_argument("--unfreeze", type=_positive_int, default=2, metavar="K",
                   help="with --mode last-k: the number of final blocks that train (default 2); batch norm frozen")
    g.add_argument("--head", choices=("linear", "dense"), default="linear",
                   help="linear: GAP-dropout-softmax; dense: seed 003's 64-64-64-32-32 ReLU stack (default linear)")
    g.add_argument("--hidden", type=_hidden, metavar="W1,W2,...", help="widths of the dense head's hidden layers")
    g.add_argument("--dropout", type=_nonneg_float, default=0.2, help="dropout before the classifier (0.2)")
    g.add_argument("--hidden-dropout", type=_nonneg_float, default=0.0, help="dropout before the hidden stack (0)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_nonneg_int, default=30, help="default 30")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="default 32")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="adam", help="default adam")
    g.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--momentum", type=_nonneg_float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--l2", type=_nonneg_float, default=0.0, help="lambda of the loss term lambda*sum(w^2) (seed 000)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="decoupled weight decay (AdamW style)")
    g.add_argument("--lr-decay", type=_positive_float, default=1.0, metavar="FACTOR",
                   help="multiply the rate by FACTOR every --lr-decay-every epochs (seed 001: 0.8 every 5)")
    g.add_argument("--lr-decay-every", type=_positive_int, default=5, metavar="N", help="default 5")
    g.add_argument("--patience", type=_nonneg_int, default=0,
                   help="early stopping after N epochs without validation improvement (0 = off)")
    g.add_argument("--monitor", choices=("loss", "accuracy", "roc_auc"), default="loss",
                   help="validation value that picks the best epoch (default loss)")
    g.add_argument("--loss", choices=("ce", "weighted-ce", "focal"), default="ce", help="default ce")
    g.add_argument("--focal-gamma", type=_nonneg_float, default=2.0, help="gamma of the focal loss (2)")
    g.add_argument("--label-smoothing", type=_nonneg_float, default=0.0, help="for ce / weighted-ce")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, head init, shuffling, views (0)")

    g = p.add_argument_group("data")
    g.add_argument("--augment", metavar="PRESET|JSON", help="training augmentation (see below)")
    g.add_argument("--views", type=_nonneg_int, default=0, metavar="N", help="augmented views cached per image")
    g.add_argument("--oversample", action="store_true", help="repeat minority-class images to balance classes")
    g.add_argument("--blur-sigma", type=_positive_float, metavar="S", help="3x3 Gaussian blur (seed 000: 1.3)")
    g.add_argument("--resize", choices=("shorter", "square", "stretch", "central_fraction"),
                   help="override the weights' resize/crop; stretch keeps the whole image (default: the weights')")
    g.add_argument("--split", choices=("auto", "official", "random", "group"), default="auto",
                   help="auto = the dataset's own split if it has one, else group-aware random (default auto)")
    g.add_argument("--fractions", type=_fractions, default=[0.8, 0.1, 0.1], metavar="TR,VA,TE",
                   help="train,val,test fractions for random/group splits (default 0.8,0.1,0.1)")
    g.add_argument("--kfold", type=_nonneg_int, default=0, metavar="K", help="K-fold cross-validation instead")
    g.add_argument("--positive", metavar="CLASS", help="report sensitivity etc. for this class (e.g. CT_COVID); "
                                                        "default: macro averages over classes")
    g.add_argument("--no-test", action="store_true", help="leave the test split out of report.json "
                                                          "(choose settings on validation only)")
    g.add_argument("--bootstrap", type=_nonneg_int, default=1000, metavar="N",
                   help="bootstrap resamples for the confidence intervals (default 1000; 0 = none)")

    g = p.add_argument_group("running")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN_DIR")
    g.add_argument("--config", metavar="RUN/config.json",
                   help="run the configuration an earlier run wrote again; options given here override the file's "
                        "(e.g. --out NEW_DIR, --epochs 50)")
    g.add_argument("--cache-dir", metavar="DIR", help="feature cache (default RUN_DIR/../.feature-cache)")
    g.add_argument("--threads", type=_positive_int, metavar="N", help="threads for Numba kernels and BLAS")
    add_common_options(p)
    return p


def config_from_args(args):
    train = dict(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                 momentum=args.momentum, l2=args.l2, weight_decay=args.weight_decay, lr_decay=args.lr_decay,
                 lr_decay_every=args.lr_decay_every, patience=args.patience, loss=args.loss,
                 focal_gamma=args.focal_gamma, label_smoothing=args.label_smoothing, monitor=args.monitor,
                 oversample=args.oversample, seed=args.seed, head=args.head, hidden=args.hidden or [],
                 dropout=args.dropout, hidden_dropout=args.hidden_dropout)
    return dict(data=args.data, out=args.out, model=args.model, weights=args.weights, arch=args.arch, csv=args.csv,
                mode=args.mode, unfreeze=args.unfreeze, augment=args.augment, views=args.views,
                blur_sigma=args.blur_sigma, resize=args.resize, split=args.split, fractions=args.fractions,
                kfold=args.kfold, positive=args.positive, cache_dir=args.cache_dir, n_bootstrap=args.bootstrap,
                report_test=not args.no_test, train=train)


SOURCES = ("model", "weights", "arch")


def args_from_config(config):
    """A config.json (FinetuneConfig.to_dict()) -> {argparse dest: value}: the inverse of config_from_args."""
    values = {k: v for k, v in config.items() if k not in ("train", "n_bootstrap", "report_test")}
    if "n_bootstrap" in config:
        values["bootstrap"] = config["n_bootstrap"]
    if "report_test" in config:
        values["no_test"] = not config["report_test"]
    train = dict(config.get("train") or {})
    train.pop("positive", None)  # a class index; --positive is the top-level class name
    values.update(train)
    return values


def _summary(report):
    lines = []
    if "kfold" in report:
        from lightcnn.metrics import format_kfold

        lines.append(f"{report['k']}-fold {report['kfold_split']} (mean ± std):")
        lines.append(format_kfold(report["kfold"]))
        return "\n".join(lines)
    op = report.get("operating_point")
    for split in ("val", "test"):
        for label, r in ((split, report.get(split)),
                         (f"{split} at P({op['class']}) >= {op['threshold']:.3f}" if op else None,
                          (report.get("at_operating_point") or {}).get(split))):
            if r is None:
                continue
            ci = r["confidence_intervals"]
            parts = [f"{k} {r[k]:.4f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if r[k] is not None and ci[k][0] is not None
                     else f"{k} {r[k]}" for k in ("accuracy", "sensitivity", "specificity", "f1", "roc_auc")]
            lines.append(f"{label}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv=None):
    from lightcnn._cli import given_on_line, read_config_option, replay_defaults

    parser = build_parser()
    _, saved = read_config_option(argv)
    if saved is not None:
        replay_defaults(parser, args_from_config(saved))
    args = parser.parse_args(argv)
    set_verbosity(args)
    config = config_from_args(args)
    if saved is not None:
        explicit = given_on_line(argv, parser, SOURCES)
        if explicit:  # --weights on the line replaces the file's --model (one source only)
            for key in SOURCES:
                if key not in explicit:
                    config[key] = None
        # the file's training values the command line has no option for (train.positive, ...) are kept
        config["train"] = {**(saved.get("train") or {}), **config["train"]}
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # effective only when numpy is not imported yet
        from lightcnn._jit import set_num_threads

        set_num_threads(args.threads)
    from lightcnn.train.run import finetune

    progress = progress_printer()
    from lightcnn.data import DataCheckError

    try:
        result = finetune(config, resume=args.resume, progress=progress)
    except DataCheckError as exc:  # the images cannot make a meaningful run: one line per problem, usage-like
        for problem in exc.problems:
            print(f"error: {' '.join(problem.split())}", file=sys.stderr, flush=True)
        return 2
    except LightCNNError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; continue with --resume (state in {args.out}/last.h5)", file=sys.stderr)
        return 130
    if progress:
        progress(_summary(result.report))
        progress(f"wrote {result.out}/report.json" + (f" and {result.best_path}" if result.best_path else ""))
    print(os.path.join(str(result.out), "report.json"))
    return 0


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
