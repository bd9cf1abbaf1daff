"""python -m lightcnn.finetune DATA (--model NAME | --weights FILE.h5 | --arch NAME) --out RUN_DIR [options]

Fine-tune an ImageNet network on an image folder (class folders, or a bundled dataset with manifest.csv) and
write RUN_DIR/config.json, metrics.csv (one row per epoch), last.h5 (resume state, every epoch), best.h5 (the
fine-tuned model: class names + preprocessing inside, usable with `python -m lightcnn.predict --weights`) and
report.json (per split: accuracy, sensitivity, specificity, precision, f1, roc_auc, confusion matrix, bootstrap
95 % confidence intervals, per-class table). Progress goes to stderr.

--kfold K and --seeds S1,S2,... run several fine-tunings (RUN_DIR/fold<i>, RUN_DIR/seed<S>); with --dask they run
as Dask tasks in parallel and give the same results (lightcnn.cluster).

Exit codes: 0 done; 1 expected failure (one line "error: ..."; e.g. the loss became NaN - the last good
checkpoint RUN_DIR/last.h5 is kept); 2 usage error.
"""

import argparse
import contextlib
import os
import sys
import uuid

from lightcnn._cli import add_common_options, progress_printer, set_verbosity
from lightcnn._cli import nonneg_float as _nonneg_float
from lightcnn._cli import nonneg_int as _nonneg_int
from lightcnn._cli import positive_float as _positive_float
from lightcnn._cli import positive_int as _positive_int
from lightcnn.cluster import add_dask_arguments
from lightcnn.errors import LightCNNError

EPILOG = """\
modes:
  head     train only a new head on pooled features of the frozen backbone; the backbone runs once per image
           (and per augmented view) and its outputs are cached on disk (--cache-dir), keyed by the weights,
           the preprocessing and the file, so later epochs and runs cost only the head
  last-k   also train the last K blocks (--unfreeze K: the last K inverted-residual blocks plus the final 1x1
           conv of MobileNets, or the last K Fire modules of SqueezeNet; --unfreeze 40%: the top 40 % of the
           weight layers; --freeze-first K: all but the first K blocks). Batch norm per --bn (default frozen:
           inference mode, also inside the unfrozen blocks); the frozen prefix runs once per image/view and is
           cached too
  full     train every layer, batch norm in training mode (e.g. --arch covid_squeezenet from scratch)

augmentation presets (--augment NAME, or a JSON object of lightcnn.augment ops):
  seed000  random resized crop, scale 0.08-1.0      seed001  rotation <= 90, zoom 1.1-1.3, Gaussian noise
  seed002  horizontal flip + colour jitter          seed003  rotation <= 40, zoom 1.0-1.2, flip (+ --oversample)
  light    crop scale 0.5-1, rotation <= 15, flip, brightness/contrast 0.2
  --views N: N augmented views per training image are computed once and cached; each epoch uses one view per
  image (the fast option, and the only one in head mode). Without --views, --mode last-k and full draw a fresh
  augmentation of every image every epoch (seeded by --seed, the epoch and the file), as the papers train.
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


def _unfreeze(text):
    from lightcnn.train.run import RunError, parse_unfreeze

    try:
        return parse_unfreeze(text)
    except RunError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _epochs(text):
    try:
        return sorted(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 10,20, got {text!r}") from None


def _hidden(text):
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 64,64,32, got {text!r}") from None


def _seeds(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds like 1,2,3, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated seeds like 1,2,3, got {text!r}")
    return values


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
    g.add_argument("--unfreeze", type=_unfreeze, default=2, metavar="K|P%",
                   help="with --mode last-k: the number of final blocks that train (default 2), or the share of "
                        "the trunk's weight layers from the top, e.g. 40%% (seed 003), rounded to whole blocks")
    g.add_argument("--freeze-first", type=_nonneg_int, metavar="K",
                   help="with --mode last-k: the first K blocks (Fire modules) and the stem stay frozen, "
                        "everything after trains (seed 000: 6); replaces --unfreeze")
    g.add_argument("--bn", choices=("frozen", "train", "recalibrate"),
                   help="batch norm of the trained part: frozen (inference mode), train (batch statistics, "
                        "PyTorch's model.train()) or recalibrate (running statistics re-estimated on the training "
                        "images, then frozen). Default: recalibrate with --activation, train with --mode full, "
                        "else frozen")
    g.add_argument("--activation", choices=("relu", "relu6", "elu"),
                   help="build the pretrained network with this activation (seed 000's ELU MobileNetV2); the "
                        "ImageNet weights are kept, their function changes")
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
    g.add_argument("--lr-schedule", choices=("step", "multistep", "cosine"),
                   help="step: --lr-decay every --lr-decay-every epochs (default); multistep: x --lr-gamma at each "
                        "of --lr-milestones (the default when they are given); cosine: annealed to 0 at the last "
                        "epoch")
    g.add_argument("--lr-milestones", type=_epochs, metavar="E1,E2,...",
                   help="0-based epochs from which the rate is multiplied by --lr-gamma (seed 002's step LR)")
    g.add_argument("--lr-gamma", type=_positive_float, default=0.1, help="multistep factor (default 0.1)")
    g.add_argument("--warmup-epochs", type=_nonneg_int, default=0, metavar="N",
                   help="ramp the rate up linearly over the first N epochs (lr * (e+1)/N), then the schedule")
    g.add_argument("--clip-grad-norm", type=_nonneg_float, default=0.0, metavar="X",
                   help="rescale a step's gradients when their global L2 norm exceeds X (0 = off)")
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
    g.add_argument("--input-size", type=_positive_int, metavar="N",
                   help="network input side in pixels (fully convolutional trunks; seed 002: 446); best.h5 "
                        "records the preprocessing at this size")
    g.add_argument("--blur-sigma", type=_positive_float, metavar="S", help="3x3 Gaussian blur (seed 000: 1.3)")
    g.add_argument("--window", metavar="W", help="CT window for DICOM / 16-bit CT images: lung, mediastinum, "
                   "bone, auto or CENTER,WIDTH in HU (stored with best.h5; default: the file's own window)")
    g.add_argument("--hu-offset", type=float, metavar="N",
                   help="16-bit PNG/TIFF CT exports: HU = pixel + N (e.g. -1024); default: min-max stretch")
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
    g.add_argument("--threads", type=_positive_int, metavar="N",
                   help="threads for Numba kernels and BLAS (with --dask: per worker, default 1)")
    g.add_argument("--seeds", type=_seeds, metavar="S1,S2,...",
                   help="run the experiment once per seed into RUN_DIR/seed<S>; RUN_DIR/report.json gets mean ± std "
                        "over the seeds")
    add_dask_arguments(g, "the folds of --kfold, or the runs of --seeds,")
    add_common_options(p)
    return p


def config_from_args(args):
    train = dict(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                 momentum=args.momentum, l2=args.l2, weight_decay=args.weight_decay, lr_decay=args.lr_decay,
                 lr_decay_every=args.lr_decay_every, lr_schedule=args.lr_schedule or (
                     "multistep" if args.lr_milestones else "step"), lr_milestones=args.lr_milestones or [],
                 lr_gamma=args.lr_gamma, warmup_epochs=args.warmup_epochs, clip_grad_norm=args.clip_grad_norm,
                 patience=args.patience, loss=args.loss,
                 focal_gamma=args.focal_gamma, label_smoothing=args.label_smoothing, monitor=args.monitor,
                 oversample=args.oversample, seed=args.seed, head=args.head, hidden=args.hidden or [],
                 dropout=args.dropout, hidden_dropout=args.hidden_dropout)
    return dict(data=args.data, out=args.out, model=args.model, weights=args.weights, arch=args.arch, csv=args.csv,
                mode=args.mode, unfreeze=args.unfreeze, freeze_first=args.freeze_first, bn=args.bn,
                activation=args.activation, input_size=args.input_size, augment=args.augment, views=args.views,
                blur_sigma=args.blur_sigma, window=args.window, hu_offset=args.hu_offset,
                resize=args.resize, split=args.split, fractions=args.fractions,
                kfold=args.kfold, positive=args.positive, cache_dir=args.cache_dir, n_bootstrap=args.bootstrap,
                report_test=not args.no_test, train=train)


SOURCES = ("model", "weights", "arch")


def args_from_config(config):
    """A config.json (FinetuneConfig.to_dict()) -> {argparse dest: value}: the inverse of config_from_args."""
    values = {k: v for k, v in config.items() if k not in ("train", "n_bootstrap", "report_test", "resolved")}
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
    if "seed_summary" in report:
        from lightcnn.metrics import format_kfold

        lines.append(f"{len(report['seeds'])} seeds {report['seed_split']} (mean ± std):")
        lines.append(format_kfold(report["seed_summary"]))
        return "\n".join(lines)
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


@contextlib.contextmanager
def _runner(args, progress):
    """None (run here, one after another) or a Dask mapper for the folds / seeds (lightcnn.cluster)."""
    if args.dask is None:
        yield None
        return
    from lightcnn.cluster import mapper, session, worker_count

    with session(args.dask, args.threads or 1) as client:
        if progress:
            progress(f"dask: {worker_count(client)} workers at {client.scheduler.address}")
        yield mapper(client, f"lightcnn-finetune-{uuid.uuid4().hex[:12]}")


def main(argv=None):
    from lightcnn._cli import check_config_keys, given_on_line, read_config_option, replay_defaults

    parser = build_parser()
    config_path, saved = read_config_option(argv)
    if saved is not None:
        check_config_keys(parser, config_path, saved, extra=("train", "n_bootstrap", "report_test", "resolved"))
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
    if args.dask is not None and not (args.kfold or args.seeds):
        parser.error("--dask runs the folds of --kfold K or the runs of --seeds in parallel: give one of them")
    if args.dask is not None:
        from lightcnn.cluster import parse_spec

        try:
            parse_spec(args.dask)
        except ValueError as exc:
            parser.error(str(exc))
    elif args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # effective only when numpy is not imported yet
        from lightcnn._jit import set_num_threads

        set_num_threads(args.threads)
    from lightcnn.train.run import finetune, finetune_seeds

    progress = progress_printer()
    from lightcnn.data import DataCheckError

    try:
        with _runner(args, progress) as run_map:
            if args.seeds:
                result = finetune_seeds(config, args.seeds, resume=args.resume, progress=progress, run_map=run_map,
                                        threads=args.threads or 1)
            else:
                result = finetune(config, resume=args.resume, progress=progress, run_map=run_map,
                                  threads=args.threads or 1)
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
