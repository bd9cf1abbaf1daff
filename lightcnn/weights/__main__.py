"""python -m lightcnn.weights {list,fetch,build,convert,info}

  list                         registered models: source, SHA-256, built or not
  fetch NAME... | --all        download originals (SHA-256 checked) into the cache
  build [NAME...] [--fetch]    convert originals found in $LIGHTCNN_SOURCES (or the cache;
                               downloaded first with --fetch) into weights/NAME.h5
  convert SRC --arch A -o OUT  convert any supported file (.pth, .tflite, .net, a Keras 2 .h5); preprocessing
                               and classes come from the file where it records them (a quantised TFLite
                               input, 1001 TFLite outputs = ImageNet + background, the Caffe .net format,
                               Keras MobileNetV2's [-1, 1] scaling and 1000 outputs = ImageNet), else
                               --preprocessing and --classes are required
  info FILE.h5                 print a converted file's metadata

Exit codes: 0 success, 1 a file failed, 2 usage error.
"""

import argparse
import json
import sys
import time

from lightcnn._cli import note
from lightcnn.errors import LightCNNError


def _err(message):
    print(f"error: {message}", file=sys.stderr)


def cmd_list(args):
    from lightcnn.errors import CheckpointError
    from lightcnn.registry import WEIGHTS
    from lightcnn.weights import find_source, find_weights, registry_meta, source_dirs, weight_dirs

    if args.json:  # one object per line, the fields of lightcnn.load(NAME).meta
        for spec in WEIGHTS:
            print(json.dumps(registry_meta(spec)))
        return 0
    print(f"{'name':32s} {'arch.tag':32s} {'format':17s} {'built':6s} {'source found':12s} published top-1")
    for spec in WEIGHTS:
        try:
            built = "yes" if find_weights(spec.name) else "no"
        except CheckpointError:
            built = "no"
        found = "yes" if find_source(spec.filename, spec.sha256) else "no"
        print(f"{spec.name:32s} {spec.arch + '.' + spec.tag:32s} {spec.converter:17s} {built:6s} {found:12s} "
              f"{spec.published_top1}%")
    print("\nconverted .h5 files are looked for in (in order; 'build' writes into the first):")
    for folder in weight_dirs():
        print(f"  {folder}")
    print("original checkpoints are looked for in:")
    for folder in source_dirs():
        print(f"  {folder}")
    return 0


def _selected(args):
    from lightcnn.registry import WEIGHTS, get_spec

    if getattr(args, "all", False) or not args.names:
        return list(WEIGHTS)
    return [get_spec(n) for n in args.names]


def cmd_fetch(args):
    from lightcnn.registry import IMAGENET_LABELS
    from lightcnn.weights import locate_or_fetch

    if not args.names and not args.all:
        _err("name a model to fetch, or pass --all")
        return 2
    status = 0
    specs = _selected(args)
    targets = [(IMAGENET_LABELS.filename, IMAGENET_LABELS.sha256, IMAGENET_LABELS.url, "ImageNet class list")]
    targets += [(s.filename, s.sha256, s.url, s.name) for s in specs]
    for filename, sha, url, what in targets:
        try:
            path = locate_or_fetch(filename, sha, url, what, fetch=True)
            print(f"{what}: {path}")
        except LightCNNError as exc:
            _err(str(exc))
            status = 1
    return status


def cmd_build(args):
    from lightcnn.weights import build_one, find_source

    specs = _selected(args)
    explicit = bool(args.names)
    status, built = 0, 0
    for i, spec in enumerate(specs, 1):
        if not explicit and not args.fetch and find_source(spec.filename, spec.sha256) is None:
            note(f"[{i}/{len(specs)}] {spec.name}: skipped, {spec.filename} not in LIGHTCNN_SOURCES "
                  "(use --fetch to download)")
            continue
        start = time.perf_counter()
        note(f"[{i}/{len(specs)}] {spec.name}: converting {spec.filename} ...")
        try:
            out = build_one(spec, fetch=args.fetch, out_dir=args.out_dir)
        except LightCNNError as exc:
            _err(str(exc))
            status = 1
            continue
        built += 1
        note(f"[{i}/{len(specs)}] {spec.name}: wrote {out} ({time.perf_counter() - start:.1f} s)")
    if built == 0 and status == 0:
        _err("nothing built: no original checkpoint found; set LIGHTCNN_SOURCES or pass --fetch")
        return 1
    return status


def cmd_convert(args):
    from lightcnn.checkpoint import save_checkpoint
    from lightcnn.preprocess import PRESETS
    from lightcnn.weights import convert_file, imagenet_classes, recorded_metadata

    config = json.loads(args.config) if args.config else {}
    preprocessing = PRESETS[args.preprocessing] if args.preprocessing else None
    classes = args.classes
    if preprocessing is None or classes is None:  # take what the file records; never guess the rest
        recorded_preprocessing, recorded_classes = recorded_metadata(args.src, args.format)
        preprocessing = preprocessing or recorded_preprocessing
        classes = classes or recorded_classes
    ids = names = None
    if classes == "imagenet":
        ids, names = imagenet_classes(fetch=False)
    elif classes:
        names = [line.strip() for line in open(classes, encoding="utf-8") if line.strip()]
    ckpt = convert_file(args.src, args.arch, config, args.format, preprocessing, ids, names)  # a bad file says so
    missing = ([f"--preprocessing {{{','.join(sorted(PRESETS))}}}"] if preprocessing is None else []) + \
              (["--classes {imagenet,FILE with one name per line}"] if classes is None else [])
    if missing:  # a file with class_0.. names or no preprocessing would predict wrongly without saying so
        what = " or ".join(m.split()[0].lstrip("-") for m in missing)
        _err(f"{args.src}: the file does not record its {what}; pass {' and '.join(missing)}")
        return 2
    save_checkpoint(args.output, ckpt)
    if "activation" in config:
        note(f"note: activation {config['activation']!r} changes the function the weights were trained for; "
             "to fine-tune, convert without it and pass --activation to python -m lightcnn.finetune, which "
             "re-estimates batch norm for the change")
    note(f"wrote {args.output}: {ckpt.arch} {ckpt.config}")
    return 0


def cmd_info(args):
    from lightcnn.checkpoint import read_checkpoint

    ckpt = read_checkpoint(args.file)
    n = sum(v.size for v in ckpt.tensors.values())
    print(json.dumps(dict(arch=ckpt.arch, config=ckpt.config, classes=len(ckpt.class_names),
                          first_classes=ckpt.class_names[:3], preprocessing=ckpt.preprocessing,
                          provenance=ckpt.provenance, tensors=len(ckpt.tensors), values=int(n)), indent=2))
    return 0


def build_parser():
    from lightcnn._cli import add_common_options
    from lightcnn.preprocess import PRESETS

    parser = argparse.ArgumentParser(prog="python -m lightcnn.weights", description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    p = sub.add_parser("list", help="registered models, their status and the folders searched")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per registered model (the fields of lightcnn.load(NAME).meta)")
    add_common_options(p, subcommand=True)
    p = sub.add_parser("fetch", help="download original checkpoints (SHA-256 checked)")
    p.add_argument("names", nargs="*", metavar="NAME", help="registered model names (python -m lightcnn.weights list)")
    p.add_argument("--all", action="store_true", help="every registered model")
    add_common_options(p, subcommand=True)
    p = sub.add_parser("build", help="convert originals into NAME.h5 in the weights folder")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="registered model names (default: every model whose original is found)")
    p.add_argument("--fetch", action="store_true", help="download originals that are not found locally")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="write the .h5 files here (default: the weights folder, see 'list')")
    add_common_options(p, subcommand=True)
    p = sub.add_parser("convert", help="convert one file")
    p.add_argument("src", metavar="SRC", help="a .pth/.pt, .tflite, Keras 2 .h5 or Deep-Compression .net checkpoint")
    p.add_argument("--arch", required=True, help="architecture it fills (python -m lightcnn.summary lists them)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.h5", help="the lightcnn .h5 file to write")
    p.add_argument("--format", choices=["tflite", "pth", "keras", "deep_compression"],
                   help="source format (default: from the file's suffix; a .h5 by its attributes)")
    p.add_argument("--config", help='builder options as JSON, e.g. \'{"width_mult": 1.0}\'')
    p.add_argument("--preprocessing", choices=sorted(PRESETS),
                   help="input preprocessing preset (required when the file does not record it)")
    p.add_argument("--classes", help="'imagenet' or a text file with one class name per line")
    add_common_options(p, subcommand=True)
    p = sub.add_parser("info", help="print a .h5 file's metadata")
    p.add_argument("file", metavar="FILE.h5", help="a lightcnn .h5 file")
    add_common_options(p, subcommand=True)
    return parser


def main(argv=None):
    from lightcnn._cli import set_verbosity

    args = build_parser().parse_args(argv)
    set_verbosity(args)
    handler = {"list": cmd_list, "fetch": cmd_fetch, "build": cmd_build, "convert": cmd_convert,
               "info": cmd_info}[args.command]
    try:
        return handler(args)
    except BrokenPipeError:  # stdout closed by its reader: lightcnn._cli.run_main ends quietly
        raise
    except (LightCNNError, ValueError, OSError) as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
