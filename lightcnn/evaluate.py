"""python -m lightcnn.evaluate MODEL.h5 DATA [--split test] [--positive CLASS] [--tta flip|ten-crop] [--json]

Evaluate a (fine-tuned) lightcnn model on one split of an image folder and print the report: accuracy,
sensitivity, specificity, precision, f1 and ROC-AUC with bootstrap 95 % confidence intervals, the per-class
table and the confusion matrix.

The split is rebuilt exactly as the training run made it: for a file written by `lightcnn.finetune`, the split
method, seed, fractions and positive class default to the values stored in the file (`extra.training`); give
--split-method/--seed/--fractions/--positive to override. Images go through the model's own preprocessing,
never augmented. Classes are matched by name, so DATA must use the model's class names.

A two-class model trained with a positive class carries an operating point: the P(positive) threshold that
maximised Youden's J on its validation split. The report then also gives the metrics at that threshold
(`at_operating_point` in JSON); --threshold T evaluates at T instead.

--out DIR writes DIR/report.json (the report with its ROC/PR points), roc.png, pr.png, confusion.png (with
matplotlib, the `plot` extra) and DIR/report.html, one self-contained page; --cam adds cam_grid.png, the three
highest- and lowest-scoring images with their class activation maps. --window / --hu-offset override the model's
CT window for DICOM and 16-bit images (see lightcnn.dicom).

--tta flip|ten-crop averages the softmax probabilities over test-time views of each image (lightcnn.tta): flip
is the image and its left-right mirror (2 forward passes per image); ten-crop is the four corners and the centre
of the image resized with the model's resize rule to round(size / 0.875), and their mirrors (10 passes). Every
metric, curve, plot and the operating-point report is computed from the averaged probabilities (the stored
threshold is applied to them as it is); report.json and report.html record the mode ("tta"). The CAM grid
always shows the plain view. Default none: exactly the plain prediction.

Exit codes: 0 done; 1 expected failure (one line "error: ..."); 2 usage error.
"""

import argparse
import json
import os
import sys
import warnings

from lightcnn._cli import add_common_options, add_engine_argument, probability, set_verbosity
from lightcnn.errors import LightCNNError


def build_parser():
    from lightcnn.finetune import _fractions, _nonneg_int, _positive_int

    p = argparse.ArgumentParser(prog="python -m lightcnn.evaluate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.h5", help="a lightcnn .h5 file (e.g. RUN_DIR/best.h5) or a registered name")
    p.add_argument("data", metavar="DATA", help="image folder or bundled dataset (manifest.csv)")
    p.add_argument("--split", choices=("train", "val", "test", "all"), default="test", help="default test")
    p.add_argument("--split-method", choices=("auto", "official", "random", "group"),
                   help="how to split DATA (default: as the training run did, else auto)")
    p.add_argument("--seed", type=int, help="split seed (default: the training run's, else 0)")
    p.add_argument("--fractions", type=_fractions, metavar="TR,VA,TE", help="default: the training run's")
    p.add_argument("--csv", metavar="FILE", help="explicit CSV of file,label[,group][,split]")
    p.add_argument("--positive", metavar="CLASS", help="class for sensitivity etc. (default: the training run's; "
                                                        "none = macro averages)")
    p.add_argument("--threshold", type=probability, metavar="T",
                   help="also report decisions 'positive iff P(positive) >= T' (default: the model's stored "
                        "operating point, if any)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--out", metavar="DIR", help="write report.json, the plots and report.html into DIR")
    p.add_argument("--cam", action="store_true", help="with --out: cam_grid.png of the highest/lowest scores")
    p.add_argument("--window", metavar="W", help="CT window for DICOM / 16-bit CT images: lung, mediastinum, bone, "
                   "auto or CENTER,WIDTH (default: the model's)")
    p.add_argument("--hu-offset", type=float, metavar="N", help="16-bit PNG/TIFF CT exports: HU = pixel + N")
    p.add_argument("--tta", choices=("none", "flip", "ten-crop"), default="none",
                   help="test-time augmentation: flip (image + mirror, 2 passes per image) or ten-crop (4 corners + "
                        "centre of the image resized to size/0.875, + mirrors, 10 passes); probabilities are the mean "
                        "of the views' softmax; --cam uses the plain view (default none)")
    p.add_argument("--bootstrap", type=_nonneg_int, default=1000, metavar="N", help="resamples for the CIs (1000)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per forward pass (16)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="threads for Numba kernels and BLAS")
    add_engine_argument(p)
    add_common_options(p)
    return p


def evaluate(model_path, data, split="test", split_method=None, seed=None, fractions=None, csv=None,
             positive=None, n_bootstrap=1000, batch_size=16, warn=None, threshold=None, engine=None, window=None,
             hu_offset=None, out=None, cam=False, tta="none"):
    """Returns (report dict, info dict). `report` is metrics.classification_report on the chosen split (argmax
    decisions); with a threshold (given, or the model's stored operating point) report["at_operating_point"]
    is the same at that threshold. tta "flip" or "ten-crop": the probabilities are the mean of the softmax over
    each image's test-time views (lightcnn.tta), every number of the report comes from them; info["tta"] says
    which mode ran."""
    import numpy as np

    from lightcnn.api import load
    from lightcnn.data import discover, split_dataset
    from lightcnn.metrics import classification_report
    from lightcnn.train.features import load_view

    from dataclasses import replace

    from lightcnn.metrics import report_curves
    from lightcnn.preprocess import load_image
    from lightcnn.tta import VIEWS, check_mode, image_views, mean_over_views

    try:
        check_mode(tta)
    except ValueError as exc:
        raise LightCNNError(str(exc)) from None
    clf = load(model_path, engine=engine)
    try:
        if window is not None:
            clf.preprocessing = replace(clf.preprocessing, window=window)
        if hu_offset is not None:
            clf.preprocessing = replace(clf.preprocessing, hu_offset=hu_offset)
    except ValueError as exc:
        raise LightCNNError(f"--{str(exc).removeprefix('Preprocessing.')}") from None
    training = (clf.checkpoint.extra or {}).get("training") or {}
    split_method = split_method or training.get("split", "auto")
    seed = seed if seed is not None else int((training.get("train") or {}).get("seed", 0))
    fractions = fractions or training.get("fractions") or [0.8, 0.1, 0.1]
    positive = positive if positive is not None else training.get("positive")
    csv = csv or training.get("csv")
    ds = discover(data, csv)
    unknown = [c for c in ds.class_names if c not in clf.class_names]
    if unknown:
        raise LightCNNError(f"{data}: class(es) {unknown} are not among the model's classes {clf.class_names}")
    if positive is not None and positive not in clf.class_names:
        raise LightCNNError(f"--positive {positive!r} is not one of the model's classes {clf.class_names}")
    if split == "all":
        idx = np.arange(len(ds))
        method = "all"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parts = split_dataset(ds, split_method, tuple(fractions), seed)
        for w in caught:
            if warn:
                warn(str(w.message))
        idx = {"train": parts.train, "val": parts.val, "test": parts.test}[split]
        method = parts.method
    if len(idx) == 0:
        raise LightCNNError(f"{data}: the {split} split is empty")
    to_model = np.array([clf.class_names.index(c) for c in ds.class_names])
    y = to_model[ds.labels[idx]]
    spec = clf.preprocessing

    def views(path):  # one image's test-time views (V,S,S,C), the plain view first for flip
        if tta == "ten-crop":
            return image_views(load_image(path, **spec.load_options()), spec, tta)
        return image_views(None, spec, tta, plain=load_view(path, spec))

    probs = []
    for start in range(0, len(idx), batch_size):
        if tta == "none":
            batch = np.stack([load_view(ds.items[i].path, spec) for i in idx[start:start + batch_size]])
            probs.append(clf.predict(batch, batch_size))
        else:  # batch_size images x V views, through the network in chunks of batch_size views
            batch = np.concatenate([views(ds.items[i].path) for i in idx[start:start + batch_size]])
            probs.append(mean_over_views(clf.predict(batch, batch_size), VIEWS[tta]))
    probs = np.concatenate(probs)
    report = classification_report(y, probs, clf.class_names, positive=positive, n_bootstrap=n_bootstrap, seed=seed)
    report["curves"] = report_curves(y, probs, clf.class_names, positive)
    if threshold is None and clf.operating_point is not None and clf.operating_point[0] == positive:
        threshold = clf.operating_point[1]
    if threshold is not None:
        if positive is None:
            raise LightCNNError("--threshold needs a positive class (--positive CLASS)")
        report["at_operating_point"] = classification_report(y, probs, clf.class_names, positive=positive,
                                                             n_bootstrap=n_bootstrap, seed=seed, threshold=threshold)
    info = {"model": str(model_path), "data": str(data), "split": split, "split_method": method, "seed": seed,
            "images": int(len(idx)), "positive": positive, "engine": clf.model.last_engine, "tta": tta}
    if warn is not None and clf.model.engine == "auto" and clf.model.last_engine == "numpy" and len(idx) > 50:
        from lightcnn.engine import compile_hint

        warn(compile_hint(clf.model.arch))
    if out is not None:
        _write_outputs(out, clf, report, info, ds, idx, probs, positive, cam, warn)
    return report, info


def _write_outputs(out, clf, report, info, ds, idx, probs, positive, cam, warn):
    """DIR/report.json, the plots, cam_grid.png (with cam) and report.html."""
    import html
    from pathlib import Path

    from lightcnn.checkpoint import atomic_write_text
    from lightcnn.plots import matplotlib_available
    from lightcnn.run_report import cam_rows, caveats, class_counts, write_html, write_plots
    from lightcnn.tta import describe

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LightCNNError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    atomic_write_text(out / "report.json", json.dumps({**info, **report}, indent=2) + "\n")
    rows = None
    if cam and matplotlib_available():
        paths = [str(ds.items[i].path) for i in idx]
        scores = probs[:, clf.class_names.index(positive)] if positive is not None else probs.max(axis=1)
        rows = cam_rows(clf, paths, scores, k=min(3, len(paths)))
    split = info["split"]
    at = report.get("at_operating_point")
    plots = write_plots(out, report, clf.class_names, split, at, cam=rows, warn=warn)
    grouped = ds.has_groups and info["split_method"] not in ("random",)
    split_info = {"method": info["split_method"], "seed": info["seed"],
                  "ungrouped_items": 0 if grouped else len(idx), "warnings": []}
    model_rows = [["model", html.escape(info["model"])], ["SHA-256", clf.weights_sha256 or "-"],
                  ["architecture", html.escape(clf.model.arch)], ["engine", html.escape(str(info["engine"]))],
                  ["preprocessing", html.escape(json.dumps(clf.preprocessing.to_dict()))],
                  ["test-time augmentation", html.escape(describe(info["tta"]) if info["tta"] != "none" else
                                                         "none (1 view per image)")]]
    notes = [f"{info['images']} images of {info['data']}, {split} split ({info['split_method']}, seed "
             f"{info['seed']}); " + ("patient/group IDs present" if ds.has_groups else "no patient/group IDs")]
    if info["tta"] != "none":
        notes.append(f"test-time augmentation: {describe(info['tta'])}, the mean of the views' softmax "
                     "probabilities; the CAM grid shows the plain view")
    write_html(out / "report.html", title=f"Evaluation of {Path(info['model']).name}",
               data_rows=class_counts({split: report}, clf.class_names), data_notes=notes, model_rows=model_rows,
               config=info, splits={split: report}, at_operating_point={split: at} if at else None,
               operating_point=({"class": positive, "threshold": at["threshold"], "rule": "stored with the model"
                                 " or --threshold"} if at else None), class_names=clf.class_names, plots=plots,
               caveat_lines=caveats({split: report}, split_info, clf.preprocessing.window))


def main(argv=None):
    args = build_parser().parse_args(argv)
    set_verbosity(args)
    if args.cam and not args.out:
        print("error: --cam needs --out DIR", file=sys.stderr)
        return 2
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        from lightcnn._jit import set_num_threads

        set_num_threads(args.threads)
    from lightcnn.metrics import format_report

    try:
        report, info = evaluate(args.model, args.data, args.split, args.split_method, args.seed, args.fractions,
                                args.csv, args.positive, args.bootstrap, args.batch_size,
                                warn=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True),
                                threshold=args.threshold, engine=args.engine, window=args.window,
                                hu_offset=args.hu_offset, out=args.out, cam=args.cam, tta=args.tta)
    except LightCNNError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    if args.json:
        print(json.dumps({**info, **report}, indent=2))
    else:
        pos = f", positive class {info['positive']}" if info["positive"] else ", macro averages over classes"
        if info["tta"] != "none":
            from lightcnn.tta import describe

            pos += f", test-time augmentation {describe(info['tta'])}"
        print(f"{info['model']} on {info['data']}: {info['split']} split ({info['split_method']}, "
              f"seed {info['seed']}), {info['images']} images{pos}")
        print(format_report(report))
        at = report.get("at_operating_point")
        if at is not None:
            print(f"\nat the operating point: {info['positive']} when P({info['positive']}) >= {at['threshold']:.4f}")
            print(format_report(at))
    return 0


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
