"""python -m lightcnn.predict IMAGE... [--model NAME | --weights FILE.h5] [--topk 5] [--tta flip|ten-crop] [--json]
    [--cam DIR] [--threads N]

Classify images with a converted (or fine-tuned) lightcnn model.

IMAGE    a file; a directory (walked recursively in sorted order, image files only, hidden entries skipped);
         a glob pattern, expanded here (``**`` recurses), matches sorted, image files only; or ``-`` for one
         image's bytes on stdin. Results come in argument order, each argument's expansion sorted.
--model  a registered name (``python -m lightcnn.weights list``); default mobilenet_v2
--weights  any lightcnn .h5 file, e.g. a fine-tuned model (its class names and preprocessing come with it)
--topk   classes per image (default 5)
--tta MODE  test-time augmentation (lightcnn.tta): flip = the image and its left-right mirror (2 forward passes
         per image), ten-crop = the four corners and the centre of the image resized with the model's resize rule
         to round(size / 0.875), and their mirrors (10 passes); the scores are the mean of the views' softmax
         probabilities. Default none (the plain prediction). --cam maps are of the plain view; with --json every
         record carries "tta" (only when a mode other than none ran)
--json   JSON Lines on stdout, one object per image: file, model, arch, weights, weights_sha256,
         topk [{index, wnid, label, score}], decode_ms, preprocess_ms, inference_ms (the batch's time divided by
         its size), and with --cam a "cam" object
--cam DIR  per image, DIR/<name>.png (the map over the preprocessed input) and DIR/<name>.npy (the raw map) for
         the class the output names (the top-1, or the "decision" at a fine-tuned model's operating point; the
         JSON "cam" object gives it as "class" and "class_index"): CAM when the head is GAP + linear (or SqueezeNet's conv head), else Grad-CAM at the
         model's default layer; --cam-layer NAME asks for Grad-CAM at any layer of
         ``python -m lightcnn.summary NAME``
--window W  how DICOM (and 16-bit images given --hu-offset) become grey: lung (W1500/L-600), mediastinum
         (W350/L50), bone (W2000/L500), auto (the file's own WindowCenter/Width) or CENTER,WIDTH in HU;
         default: the model's own (a fine-tuned model stores its window), else the file's window
--hu-offset N  16-bit PNG/TIFF CT exports: HU = pixel + N (e.g. -1024); without it they are stretched min-max
--frame N  the N-th frame (1-based) of multi-frame DICOM files; default: every frame, each predicted and named
         ``file.dcm[frame N]`` (JSON: "file" and "frame")
--manifest FILE  more IMAGE arguments, one per line (lists too long for a shell)
--dask [ADDRESS|local[:N]]  predict in chunks of --chunk-size images on Dask workers (lightcnn.predict_chunks):
         the same output in the same order; --out DIR writes one part-<chunk>.jsonl per chunk instead, and
         --resume skips the chunks already written
--threads N  threads for Numba kernels and for BLAS (with --dask: per worker, default 1). BLAS (OpenBLAS/MKL) reads its thread count only when numpy
         is first imported, so the environment variables are set before that import; when ``main`` is called
         from a program that already imported numpy, only Numba's count changes.

Results go to stdout; progress (more than 20 images, or any number on a terminal), warnings and errors to stderr.
Weights are looked up without network access (lightcnn.weights.find_weights) and never downloaded here.

Exit codes: 0 every image predicted; 1 an image, an argument or the weights failed (every other image is still
predicted and printed); 2 usage error. Expected failures print one line, ``error: <file>: <reason>``.

Hostile inputs (lightcnn.preprocess): only regular files are opened (a FIFO, device or socket is refused unread,
so nothing blocks); at most MAX_IMAGE_BYTES (256 MiB) are read from a file or stdin; images with a side over
65500 px, an aspect ratio over 200:1 or more than 89.5 Mpx are refused from the header. File names are printed
with control characters escaped (``a\\nb.png``), so one failure is always one line.
"""

import argparse
import glob
import os
import sys
import time

from lightcnn._cli import (NORMAL, add_common_options, add_engine_argument, detail, engine_note, parse_args, set_verbosity,
                           verbosity)
from lightcnn._cli import positive_int as _positive_int
from lightcnn._files import printable
from lightcnn.cluster import add_dask_arguments
from lightcnn.errors import LightCNNError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".dcm"})
BATCH_SIZE = 16
GRADCAM_BATCH = 4
PROGRESS_MIN_IMAGES = 20
STDIN = "-"


def _err(message):
    print(f"error: {message}", file=sys.stderr, flush=True)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m lightcnn.predict",
        description="Classify images with a lightcnn model (top-k classes per image).",
        epilog="Exit codes: 0 all images predicted, 1 some image or the weights failed, 2 usage error.")
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files, directories (recursive), glob patterns, or - for stdin")
    parser.add_argument("--manifest", metavar="FILE", help="more IMAGE arguments, one per line (for lists too "
                        "long for a shell); blank lines are skipped")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="NAME", help="registered model name (default: mobilenet_v2)")
    source.add_argument("--weights", metavar="FILE.h5", help="a lightcnn .h5 weight file")
    parser.add_argument("--topk", type=_positive_int, default=5, metavar="K", help="classes per image (default 5)")
    parser.add_argument("--tta", choices=("none", "flip", "ten-crop"), default="none",
                        help="test-time augmentation: flip (image + mirror, 2 passes per image) or ten-crop (4 "
                        "corners + centre of the image resized to size/0.875, + mirrors, 10 passes); scores are the "
                        "mean of the views' softmax; --cam uses the plain view (default none)")
    parser.add_argument("--json", action="store_true", help="JSON Lines output, one object per image")
    parser.add_argument("--cam", metavar="DIR", help="write a class activation map (PNG overlay + .npy) per image")
    parser.add_argument("--cam-layer", metavar="LAYER", help="with --cam: Grad-CAM at this layer (names as in "
                        "python -m lightcnn.summary); default: CAM for GAP+linear heads, else Grad-CAM at the "
                        "model's default layer")
    parser.add_argument("--window", type=_window, metavar="W", help="CT window for DICOM / 16-bit CT images: lung, "
                        "mediastinum, bone, auto or CENTER,WIDTH (default: the model's, else the file's own)")
    parser.add_argument("--hu-offset", type=_finite_float, metavar="N",
                        help="16-bit PNG/TIFF CT exports: HU = pixel + N (e.g. -1024); default: min-max stretch")
    parser.add_argument("--frame", type=_positive_int, metavar="N",
                        help="only frame N (1-based) of multi-frame DICOM files (default: every frame)")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="threads for Numba kernels and BLAS")
    add_engine_argument(parser)
    g = parser.add_argument_group("chunked and distributed runs (lightcnn.predict_chunks)")
    add_dask_arguments(g, "chunks of images")
    g.add_argument("--chunk-size", type=_positive_int, default=64, metavar="N",
                   help="images per chunk (one task, one part file) with --dask or --out (default 64)")
    g.add_argument("--out", metavar="DIR", help="write DIR/part-00000.jsonl, ... (one JSON Lines file per chunk, "
                   "each written atomically) instead of printing")
    g.add_argument("--resume", action="store_true", help="with --out: skip the chunks whose part file exists")
    add_common_options(parser)
    return parser


def _window(text):
    from lightcnn.dicom import parse_window

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("window: ")) from None


def _finite_float(text):
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _set_blas_threads(n):
    """Must run before numpy is imported to have an effect on BLAS (see the module docstring)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


# -- argument expansion ------------------------------------------------------------------------------------------


def _is_image_name(name, path=None):
    """An image extension, or (when `path` is given) no extension and the DICOM magic (DICOM series files)."""
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return True
    if path is not None and not ext:
        from lightcnn.dicom import looks_like_dicom

        return looks_like_dicom(path)
    return False


def _walk_images(root):
    """Image files under `root`, sorted, depth-first; entries starting with '.' are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and _is_image_name(f, os.path.join(dirpath, f)))
    return found


def expand_images(args):
    """Arguments -> (list of image paths, STDIN for '-'; list of one-line errors), in a deterministic order."""
    paths, errors = [], []
    for arg in args:
        if arg == STDIN:
            paths.append(STDIN)
        elif os.path.isdir(arg):
            found = _walk_images(arg)
            if found:
                paths.extend(found)
            else:
                errors.append(f"{printable(arg)}: directory contains no image files "
                              f"({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)")
        elif os.path.exists(arg):
            paths.append(arg)  # an explicit file is tried whatever its extension (formats are found by content)
        elif glob.has_magic(arg):
            found = []
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    found.extend(_walk_images(match))
                elif _is_image_name(match, match):
                    found.append(match)
            if found:
                paths.extend(found)
            else:
                errors.append(f"{printable(arg)}: no image files match this pattern")
        else:
            errors.append(f"{printable(arg)}: no such file or directory")
    return paths, errors


# -- output ------------------------------------------------------------------------------------------------------


def _format_text(name, preds, cam=None, decision=None):
    lines = [printable(name)]  # a file name with a newline must not add a line to the block
    # A fine-tuned model's classes have no separate IDs (wnid == label): print the name once.
    lines += [f"{rank:>4d}  {p.score:.4f}  {p.wnid}  {p.label}" if p.wnid != p.label else
              f"{rank:>4d}  {p.score:.4f}  {p.label}" for rank, p in enumerate(preds, 1)]
    if decision:
        lines.append(f"   decision  {decision['label']}  (operating point: {decision['positive']} when "
                     f"P >= {decision['threshold']:.4f})")
    if cam:
        lines.append(f"   cam  {cam['png']}  ({cam['class']})")
    return "\n".join(lines)


def _decisions(probs, clf):
    """Per image {"label", "positive", "threshold"} at the model's stored operating point (a two-class model
    fine-tuned with a positive class, see lightcnn.evaluate), else None."""
    if clf.operating_point is None:
        return [None] * len(probs)
    from lightcnn.metrics import decide

    name, threshold = clf.operating_point
    labels = decide(probs, clf.class_names.index(name), threshold)
    return [{"label": clf.class_names[int(k)], "positive": name, "threshold": threshold} for k in labels]


class _Progress:
    """n/total on stderr: in place on a terminal, otherwise one line per 10 %."""

    def __init__(self, total):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.enabled = verbosity() >= NORMAL and (total > PROGRESS_MIN_IMAGES or (self.tty and total > 1))
        self.start = time.perf_counter()
        self.next_pct = 10

    def update(self, done):
        if not self.enabled:
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        text = f"predict: {done}/{self.total} images ({rate:.1f}/s)"
        if self.tty:
            print(f"\r{text}", end="" if done < self.total else "\n", file=sys.stderr, flush=True)
        elif 100 * done >= self.next_pct * self.total or done == self.total:
            print(text, file=sys.stderr, flush=True)
            while self.next_pct * self.total <= 100 * done:
                self.next_pct += 10


class Source(tuple):
    """(path, frame, label): one thing to predict. frame is None, or the 0-based frame of a DICOM file, and
    label names it in the output: the path, or ``path[frame N]`` (1-based, as DICOM numbers frames)."""

    path = property(lambda self: self[0])
    frame = property(lambda self: self[1])
    label = property(lambda self: self[2])


def _as_source(item):
    """A Source for a plain path too (Dask chunks and predict_batch pass paths; a DICOM then gives frame 1)."""
    return item if isinstance(item, Source) else Source((item, None, item))


def expand_frames(paths, frame=None):
    """Paths -> (list of Source, list of one-line errors): a multi-frame DICOM file becomes one Source per
    frame (or only `frame`, 1-based); every other path one Source. Only DICOM headers are read here."""
    from lightcnn.dicom import looks_like_dicom

    sources, errors = [], []
    for path in paths:
        if path == STDIN or not looks_like_dicom(path):
            sources.append(Source((path, None if frame is None else frame - 1, path)))
            continue
        from lightcnn._files import read_regular_file
        from lightcnn.dicom import dicom_frame_count
        from lightcnn.errors import ImageError
        from lightcnn.preprocess import MAX_IMAGE_BYTES

        try:
            data = read_regular_file(path, MAX_IMAGE_BYTES, ImageError, "an image file", printable(path))
            n = dicom_frame_count(data, printable(path), ImageError)
        except ImageError as exc:
            errors.append(str(exc))
            continue
        if frame is not None:
            sources.append(Source((path, frame - 1, path if n == 1 and frame == 1 else f"{path}[frame {frame}]")))
        elif n == 1:
            sources.append(Source((path, None, path)))
        else:
            sources.extend(Source((path, i, f"{path}[frame {i + 1}]")) for i in range(n))
    return sources, errors


def _cam_stem(cam_dir, source, used):
    """A unique file stem in cam_dir for this image: its file name without extension (and -frameN for a DICOM
    frame), -2, -3, ... on clashes."""
    path = source.path
    base = "stdin" if path == STDIN else os.path.splitext(os.path.basename(path))[0] or "image"
    if source.frame is not None:
        base += f"-frame{source.frame + 1}"
    stem, n = base, 1
    while stem in used:
        n += 1
        stem = f"{base}-{n}"
    used.add(stem)
    return os.path.join(cam_dir, stem)


def run_meta(clf, sha, tta="none"):
    """The fields every JSON record of a run shares (what the client knows about the weights; "tta" when a
    test-time augmentation other than none ran)."""
    meta = {"model": clf.name, "arch": clf.model.arch, "weights": str(clf.weights_path), "weights_sha256": sha}
    if tta != "none":
        meta["tta"] = tta
    return meta


def tta_probs(clf, views, tta):
    """(N*V,S,S,C) test-time views, each image's V consecutive -> (N,K) the mean of their softmax probabilities;
    the network runs on BATCH_SIZE views at a time (lightcnn.tta)."""
    import numpy as np

    from lightcnn.postprocess import softmax
    from lightcnn.tta import VIEWS, mean_over_views

    logits = np.concatenate([clf.model.forward(views[i:i + BATCH_SIZE]) for i in range(0, len(views), BATCH_SIZE)])
    return mean_over_views(softmax(logits), VIEWS[tta])


def json_record(meta, result, cam=None):
    """One image's --json object from a prediction result (see predict_batch)."""
    source = _as_source(result["file"])
    record = {"file": source.path, **({"frame": source.frame + 1} if source.frame is not None else {}), **meta,
              "topk": [p.to_dict() for p in result["preds"]],
              "decode_ms": round(result["times"][0], 3), "preprocess_ms": round(result["times"][1], 3),
              "inference_ms": round(result["inference_ms"], 3), "batch_size": result["batch_size"],
              "engine": result["engine"]}
    if cam:
        record["cam"] = cam
    if result["decision"]:
        record["decision"] = result["decision"]
    return record


def print_result(args, meta, result, printed, cam=None):
    """Print one image's result on stdout: a JSON line, or the text block (blank line between blocks)."""
    import json

    if args.json:
        print(json.dumps(json_record(meta, result, cam), allow_nan=False))
    else:
        label = _as_source(result["file"]).label
        print(("\n" if printed else "") + _format_text(label, result["preds"], cam, result["decision"]))


def predict_batch(clf, paths, topk_k, on_error, tta="none"):
    """Predict up to BATCH_SIZE images; returns per image, in order, a result dict or {"file", "error"}.
    tta: see lightcnn.tta (the views of the images run BATCH_SIZE at a time)."""
    import numpy as np

    from lightcnn.postprocess import softmax, topk

    errors = {}
    good, xs, _, times, _, views = _prepare_chunk(paths, clf.preprocessing, None,
                                                  on_error=lambda p, m: errors.setdefault(p, []).append(m), tta=tta)
    out = {}
    if good:
        t0 = time.perf_counter()
        if tta == "none":
            probs = softmax(clf.model.forward(np.stack(xs)))
        else:
            probs = tta_probs(clf, np.concatenate(views), tta)
        infer_ms = (time.perf_counter() - t0) * 1e3 / len(good)
        preds = topk(probs, topk_k, clf.class_names, clf.class_ids)
        decisions = _decisions(probs, clf)
        finite = np.isfinite(probs).all(axis=1)  # an error for that image, never a NaN score
        for i, path in enumerate(good):
            if not finite[i]:
                errors.setdefault(path, []).append(non_finite_line(path, clf))
                continue
            out.setdefault(path, []).append(
                {"file": path, "preds": preds[i], "decision": decisions[i], "times": times[i],
                 "inference_ms": infer_ms, "batch_size": len(good), "engine": clf.model.last_engine})
    # a path given twice is predicted twice: take its results (and errors) in order
    results = []
    for path in paths:
        if errors.get(path):
            results.append({"file": path, "error": errors[path].pop(0)})
        else:
            results.append(out[path].pop(0))
    return results


# -- the run -----------------------------------------------------------------------------------------------------


def _load_classifier(args):
    """The Classifier, or (None, exit code) after printing one line."""
    from dataclasses import replace

    from lightcnn.api import Classifier, model_from_checkpoint
    from lightcnn.checkpoint import read_checkpoint
    from lightcnn.registry import DEFAULT_MODEL, REGISTRY
    from lightcnn.weights import find_weights

    name = args.weights or args.model or DEFAULT_MODEL
    try:
        path = find_weights(name)
    except LightCNNError as exc:
        _err(str(exc))
        unknown = (args.model is not None and args.model not in REGISTRY and not args.model.endswith(".h5")
                   and os.sep not in args.model)
        return None, (2 if unknown else 1)
    try:
        ckpt = read_checkpoint(path)
        model = model_from_checkpoint(ckpt, simulate_quantization=None)  # the file's default
        # The model holds the tensors now: without the checkpoint's references to them, a predict-only model
        # can let go of the plain copy of each weight it keeps packed (main: Model.weights_packed_only).
        return Classifier(model, replace(ckpt, tensors={})), 0
    except LightCNNError as exc:
        _err(str(exc))
    except (ValueError, KeyError, TypeError) as exc:  # bad config or preprocessing record inside the file
        _err(f"{path}: cannot build the model it describes ({' '.join(str(exc).split())})")
    return None, 1


def _prepare(source, spec, stdin_bytes, tta="none"):
    """Decode + preprocess one image; returns (pixels uint8, x float32, decode_ms, preprocess_ms, views): views
    are the (V,S,S,C) test-time views of lightcnn.tta (None for tta "none"); preprocess_ms includes them."""
    from lightcnn.preprocess import load_image, normalise_pixels, preprocess_uint8
    from lightcnn.tta import image_views

    source = _as_source(source)
    t0 = time.perf_counter()
    options = dict(spec.load_options(), frame=source.frame or 0)
    if source.path == STDIN:
        img = load_image(stdin_bytes, name="<stdin>", **options)
    else:
        img = load_image(source.path, **options)
    t1 = time.perf_counter()
    pixels = preprocess_uint8(img, spec)
    x = normalise_pixels(pixels, spec)
    views = None if tta == "none" else image_views(img, spec, tta, plain=x)
    t2 = time.perf_counter()
    return pixels, x, (t1 - t0) * 1e3, (t2 - t1) * 1e3, views


def _where(path):
    """How an image is named in a one-line error: its escaped path, or <stdin>."""
    path = _as_source(path).path
    return "<stdin>" if path == STDIN else printable(path)


def error_line(path, exc):
    """The one-line message (without "error: ") for an image that could not be read."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    where = _where(path)
    return msg if msg.startswith(where) else f"{where}: {msg}"


def non_finite_line(path, clf):
    return (f"{_where(path)}: {clf.weights_path}: the network produced non-finite scores (weights out of range "
            "for float32?)")


def _prepare_chunk(chunk, spec, stdin_bytes, on_error=None, tta="none"):
    """Decode + preprocess a chunk; failures print one line each (or go to on_error(path, message)).
    Returns (good paths, xs, pixels, times, failed, views): views per good image as _prepare gives them."""
    good, xs, pixels, times, failed, views = [], [], [], [], 0, []
    for path in chunk:
        try:
            pix, x, dec_ms, pre_ms, v = _prepare(path, spec, stdin_bytes, tta)  # path: a Source
        except (LightCNNError, OSError, ValueError, MemoryError) as exc:
            failed += 1  # one line for this image; the rest of the chunk is still predicted
            if on_error is None:
                _err(error_line(path, exc))
            else:
                on_error(path, error_line(path, exc))
            continue
        good.append(path)
        xs.append(x)
        pixels.append(pix)
        times.append((dec_ms, pre_ms))
        views.append(v)
    return good, xs, pixels, times, failed, views


def _explain_chunk(clf, method, layer, batch, feats, classes):
    """(N,h,w) maps of `classes` (one index per image), and the layer they live at."""
    import numpy as np

    from lightcnn import explain as explain_mod

    if method == "cam":
        ex = explain_mod.class_activation_map(clf.model, class_index=classes, features=feats)
        return ex.maps, ex.layer
    # The backward needs every activation cached: a few images at a time.
    parts = [explain_mod.grad_cam(clf.model, batch[j:j + GRADCAM_BATCH], classes[j:j + GRADCAM_BATCH], layer)
             for j in range(0, len(batch), GRADCAM_BATCH)]
    return np.concatenate([part.maps for part in parts]), parts[0].layer


def _run(args, paths, clf):
    """Predict every path in chunks of BATCH_SIZE, printing as it goes; returns the number of failures."""
    import numpy as np

    from lightcnn import explain as explain_mod
    from lightcnn.postprocess import softmax, topk
    from lightcnn.preprocess import MAX_IMAGE_BYTES

    from dataclasses import replace

    failures = 0
    spec = clf.preprocessing
    if args.window is not None or args.hu_offset is not None:
        spec = replace(spec, **{k: v for k, v in (("window", args.window), ("hu_offset", args.hu_offset))
                                if v is not None})
    # At most one byte over the cap: load_image then refuses it with one line instead of reading without end.
    stdin_bytes = sys.stdin.buffer.read(MAX_IMAGE_BYTES + 1) if any(p.path == STDIN for p in paths) else None
    cam_method = None
    if args.cam:
        try:
            os.makedirs(args.cam, exist_ok=True)
        except OSError as exc:
            _err(f"{args.cam}: cannot create the CAM folder ({exc.strerror or exc})")
            return len(paths)
        cam_method = "cam" if args.cam_layer is None and explain_mod.cam_head_kind(clf.model) else "gradcam"
    used_stems = set()
    sha = clf.weights_sha256 if args.json else None
    progress = _Progress(len(paths))
    printed = 0
    for start in range(0, len(paths), BATCH_SIZE):
        chunk = paths[start:start + BATCH_SIZE]
        good, xs, pixels, times, failed, views = _prepare_chunk(chunk, spec, stdin_bytes, tta=args.tta)
        failures += failed
        if good:
            batch = np.stack(xs)
            t0 = time.perf_counter()
            feats = clf.model.features(batch) if cam_method == "cam" else None  # the plain view's, for CAM
            if args.tta != "none":
                probs = tta_probs(clf, np.concatenate(views), args.tta)
            else:
                probs = softmax(clf.model.head(feats) if feats is not None else clf.model.forward(batch))
            infer_ms = (time.perf_counter() - t0) * 1e3 / len(good)
            finite = np.isfinite(probs).all(axis=1)  # weights that overflow float32: an error, never a NaN score
            preds = topk(np.where(finite[:, None], probs, 0.0), args.topk, clf.class_names, clf.class_ids)
            decisions = _decisions(probs, clf)
            cams = [None] * len(good)
            if cam_method:
                t0 = time.perf_counter()
                # the class the output names: the decision at the operating point if there is one, else top-1
                explained = np.array([clf.class_names.index(d["label"]) if d else p[0].index
                                      for p, d in zip(preds, decisions)])
                try:
                    maps, layer = _explain_chunk(clf, cam_method, args.cam_layer, batch, feats, explained)
                except ValueError as exc:  # e.g. --cam-layer names a layer without a spatial output
                    _err(f"--cam-layer {args.cam_layer}: {' '.join(str(exc).split())}")
                    failures += 1
                    cam_method = maps = None
                cam_ms = (time.perf_counter() - t0) * 1e3 / len(good)
                for i, path in enumerate(good if maps is not None else ()):
                    stem = _cam_stem(args.cam, path, used_stems)
                    try:
                        rgb = explain_mod.display_pixels(pixels[i], spec.channel_order)
                        png, npy = explain_mod.save_explanation(stem, rgb, maps[i])
                    except OSError as exc:
                        failures += 1
                        _err(f"{printable(stem)}.png: cannot write the CAM ({exc.strerror or exc})")
                        continue
                    cams[i] = {"png": str(png), "npy": str(npy), "method": cam_method, "layer": layer,
                               "class_index": int(explained[i]), "class": clf.class_names[int(explained[i])],
                               "ms": round(cam_ms, 3)}
            meta = run_meta(clf, sha, args.tta)
            for i, path in enumerate(good):
                if not finite[i]:
                    failures += 1
                    _err(non_finite_line(path, clf))
                    continue
                result = {"file": path, "preds": preds[i], "decision": decisions[i], "times": times[i],
                          "inference_ms": infer_ms, "batch_size": len(good), "engine": clf.model.last_engine}
                print_result(args, meta, result, printed, cams[i])
                printed += 1
            sys.stdout.flush()
        progress.update(start + len(chunk))
        if start == 0:
            engine_note(clf.model, len(paths), clf.name)
    return failures


def main(argv=None):
    """The CLI; returns the exit code (0 ok, 1 some failure, 2 usage error)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    set_verbosity(args)
    if args.manifest:
        try:
            with open(args.manifest, encoding="utf-8") as f:
                args.images += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: --manifest {printable(args.manifest)}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            return 2
    chunked = args.dask is not None or args.out is not None
    problem = None
    if args.dask is not None:
        from lightcnn.cluster import parse_spec

        try:
            parse_spec(args.dask)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        pass
    elif not args.images:
        problem = "give at least one IMAGE (or --manifest FILE)"
    elif args.resume and not args.out:
        problem = "--resume needs --out DIR"
    elif chunked and (STDIN in args.images or args.cam):
        problem = "--dask and --out take image files, not - (stdin) or --cam"
    if problem:
        parser.print_usage(sys.stderr)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.images.count(STDIN) > 1:
        parser.print_usage(sys.stderr)
        print("error: '-' (stdin) can be given only once", file=sys.stderr)
        return 2
    if args.cam_layer and not args.cam:
        parser.print_usage(sys.stderr)
        print("error: --cam-layer needs --cam DIR", file=sys.stderr)
        return 2
    if args.dask is not None:
        from lightcnn.cluster import DaskError, require_dask

        try:
            require_dask()
        except DaskError as exc:
            _err(str(exc))
            return 1
    elif args.threads:
        _set_blas_threads(args.threads)  # before the first numpy import below (see the module docstring)

    paths, errors = expand_images(args.images)
    if not chunked:  # Dask chunks carry plain paths: there a multi-frame DICOM gives its first frame
        paths, frame_errors = expand_frames(paths, args.frame)
        errors += frame_errors
    for message in errors:
        _err(message)
    clf, status = _load_classifier(args)
    if clf is None:
        return status
    from lightcnn.engine import engine_for_job

    clf.model.engine = engine_for_job(args.engine or clf.model.engine, len(paths))
    # Only forward passes follow (CAM and Grad-CAM read the weights themselves): keep the GEMM weights packed only.
    clf.model.weights_packed_only = not args.cam
    detail(f"weights {clf.weights_path}: {clf.model.arch}, {len(clf.class_names)} classes, engine {clf.model.engine}")
    if args.cam_layer and args.cam_layer not in {name for name, _ in clf.model.named_layers() if name}:
        print(f"error: --cam-layer {args.cam_layer!r}: no such layer in {clf.model.arch}; "
              f"'python -m lightcnn.summary {args.weights or args.model or clf.name}' lists them", file=sys.stderr)
        return 2
    if args.threads:
        from lightcnn._jit import set_num_threads

        set_num_threads(args.threads)
    if chunked:
        from lightcnn.predict_chunks import run_chunked

        failures = run_chunked(args, paths, clf) if paths else 0
    else:
        failures = _run(args, paths, clf) if paths else 0
    return 1 if failures or errors else 0


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
