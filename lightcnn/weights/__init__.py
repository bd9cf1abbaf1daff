"""Find, fetch, convert and build weights into the one HDF5 format.

Where things live (each overridable by an environment variable; none depends on the current folder):
  LIGHTCNN_SOURCES   folders (os.pathsep-separated) searched recursively for original
                     checkpoints by file name + SHA-256; offline machines point it at a
                     copy of the originals (these machines: ../shared/weights)
  LIGHTCNN_CACHE     the cache folder (default: the platform's user cache, lightcnn._paths:
                     $XDG_CACHE_HOME/lightcnn or ~/.cache/lightcnn on Linux, ~/Library/Caches/lightcnn
                     on macOS, %LOCALAPPDATA%\\lightcnn\\Cache on Windows); downloads land in <cache>/sources
  LIGHTCNN_WEIGHTS   converted .h5 files (default: the checkout's weights/ folder when lightcnn is
                     imported from a source checkout, else <cache>/weights)

A registered name is looked up in weight_dirs(), in order: $LIGHTCNN_WEIGHTS (when set) or the
checkout's weights/, then <cache>/weights. `build` writes into the first of them.

Nothing is downloaded unless asked: `fetch`, or `build --fetch` / `get`.
"""

import hashlib
import os
import sys
import time
from pathlib import Path

from lightcnn._files import printable
from lightcnn.checkpoint import Checkpoint, atomic_write_bytes, load_state, save_checkpoint
from lightcnn.errors import CheckpointError, LightCNNError
from lightcnn.preprocess import Preprocessing
from lightcnn.registry import DEFAULT_MODEL, IMAGENET_LABELS, REGISTRY, WeightSpec, get_spec

CONVERTER_VERSION = "2"  # 2: quantised TFLite files also record their activation grids (extra)
_REPO_WEIGHTS = Path(__file__).resolve().parent.parent.parent / "weights"


def cache_dir():
    """lightcnn's cache folder: $LIGHTCNN_CACHE, else the platform's user cache (lightcnn._paths)."""
    from lightcnn._paths import user_cache_dir

    return Path(os.environ.get("LIGHTCNN_CACHE") or user_cache_dir())


def checkout_weights_dir():
    """The weights/ folder of the source checkout lightcnn is imported from, or None for an installed copy.

    Found beside the package (never from the current folder): <checkout>/weights/README.md next to
    <checkout>/pyproject.toml and <checkout>/lightcnn/.
    """
    root = _REPO_WEIGHTS.parent
    if (_REPO_WEIGHTS / "README.md").is_file() and (root / "pyproject.toml").is_file():
        return _REPO_WEIGHTS
    return None


def weights_dir():
    """Folder converted .h5 files are written to: the first of weight_dirs()."""
    return weight_dirs()[0]


def weight_dirs():
    """Folders searched for <name>.h5, in order: $LIGHTCNN_WEIGHTS or the checkout's weights/, then <cache>/weights."""
    if os.environ.get("LIGHTCNN_WEIGHTS"):
        first = Path(os.environ["LIGHTCNN_WEIGHTS"])
    else:
        first = checkout_weights_dir() or cache_dir() / "weights"
    return list(dict.fromkeys([first, cache_dir() / "weights"]))


def source_dirs():
    """Folders searched for original checkpoints, in order."""
    dirs = [Path(p) for p in os.environ.get("LIGHTCNN_SOURCES", "").split(os.pathsep) if p]
    return dirs + [cache_dir() / "sources"]


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha_matches(path, expected):
    return sha256_of(path).startswith(expected.lower())


def find_source(filename, sha256):
    """Path of an original checkpoint with this name and hash in the source folders, or None."""
    for root in source_dirs():
        if not root.is_dir():
            continue
        for dirpath, _, files in os.walk(root):
            if filename in files:
                candidate = Path(dirpath) / filename
                if _sha_matches(candidate, sha256):
                    return candidate
    return None


def _progress(message, end="\n"):
    from lightcnn._cli import note  # obeys the command's -q

    note(message, end=end)


def download(url, dest, sha256, what):
    """Download `url` to `dest` (atomically) and verify its SHA-256; progress on stderr."""
    import urllib.request  # here, not at import: predict never downloads, and http/email cost 14 ms + 3 MB

    _progress(f"downloading {what} from {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, received, last = [], 0, 0.0
            while True:
                block = response.read(1 << 16)
                if not block:
                    break
                chunks.append(block)
                received += len(block)
                if time.monotonic() - last > 0.5:
                    pct = f" {100 * received / total:5.1f}%" if total else ""
                    _progress(f"\r  {received / 1e6:7.1f} MB{pct}", end="")
                    last = time.monotonic()
            _progress("")
    except (OSError, ValueError) as exc:  # urllib's URLError is an OSError
        reason = getattr(exc, "reason", exc)
        raise LightCNNError(f"cannot download {what} from {url} ({reason}); on a machine without internet "
                            "access put the file in a folder and set LIGHTCNN_SOURCES to it") from None
    data = b"".join(chunks)
    actual = hashlib.sha256(data).hexdigest()
    if not actual.startswith(sha256.lower()):
        raise CheckpointError(f"{url}: SHA-256 {actual[:16]}... does not match the registry's {sha256[:16]}...; "
                              "file not saved")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, data)
    return dest


def locate_or_fetch(filename, sha256, url, what, fetch):
    """The original file from LIGHTCNN_SOURCES or the cache; downloaded when `fetch` and absent."""
    found = find_source(filename, sha256)
    if found is not None:
        return found
    if not fetch:
        looked = ", ".join(str(d) for d in source_dirs())
        raise LightCNNError(f"{what}: {filename} (SHA-256 {sha256[:16]}...) not found in {looked}; set "
                            f"LIGHTCNN_SOURCES to a folder holding it, or download it with "
                            f"'python -m lightcnn.weights fetch'")
    return download(url, cache_dir() / "sources" / sha256[:16] / filename, sha256, what)


# -- class lists ---------------------------------------------------------------------


def read_synset_words(path):
    """'n01440764 tench, Tinca tinca' lines -> (wnids, short names)."""
    ids, names = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            wnid, _, text = line.strip().partition(" ")
            ids.append(wnid)
            names.append(text.split(",")[0].strip())
    if len(ids) != 1000:
        raise CheckpointError(f"{path}: expected 1000 ImageNet classes, found {len(ids)}")
    return ids, names


def imagenet_classes(fetch=False):
    path = locate_or_fetch(IMAGENET_LABELS.filename, IMAGENET_LABELS.sha256, IMAGENET_LABELS.url,
                           "ImageNet class list", fetch)
    return read_synset_words(path)


# -- conversion ----------------------------------------------------------------------

_SUFFIX_FORMAT = {".tflite": "tflite", ".pth": "pth", ".pt": "pth", ".net": "deep_compression"}


def _source_format(src, fmt=None):
    src = Path(src)
    if not src.exists():  # anything else that is not a regular file (FIFO, device) is refused by the reader
        raise CheckpointError(f"{printable(src)}: no such file")
    if fmt is None and src.suffix.lower() in (".h5", ".hdf5"):  # Keras's or lightcnn's: the attributes say
        from lightcnn.convert.keras_h5 import h5_kind

        kind = h5_kind(src)
        if kind == "lightcnn":
            raise CheckpointError(f"{printable(src)}: already a lightcnn weight file, nothing to convert "
                                  "('python -m lightcnn.weights info' shows it)")
        if kind is None:
            raise CheckpointError(f"{printable(src)}: an HDF5 file with neither Keras's 'layer_names' nor "
                                  "lightcnn's 'format' attribute; not a weight file lightcnn can convert")
        return src, "keras"
    fmt = fmt or _SUFFIX_FORMAT.get(src.suffix.lower())
    if fmt is None:
        raise CheckpointError(f"{src}: cannot tell the format from the suffix; pass --format "
                              "tflite|pth|keras|deep_compression")
    return src, fmt


KERAS_DEFAULT_BN_EPS = 1e-3  # keras.applications.MobileNetV2's BatchNormalization(epsilon=1e-3, momentum=0.999)


def _keras_bn_eps(keras, src):
    """(epsilon, where it came from): the file's model_config when it has one, else Keras MobileNetV2's 1e-3."""
    found = keras.bn_epsilons()
    if len(found) > 1:
        raise CheckpointError(f"{printable(src)}: model_config gives batch norms different epsilons {found}; "
                              "lightcnn's MobileNetV2 uses one")
    if found:
        return found[0], "model_config"
    return KERAS_DEFAULT_BN_EPS, "Keras MobileNetV2 default (the file has no model_config)"


def _keras_preprocessing(keras):
    """What the trunk of a Keras MobileNetV2 file expects, or None where the file leaves it open.

    Without an input layer that rescales: keras.applications.mobilenet_v2.preprocess_input, RGB pixels scaled to
    [-1, 1] = (p - 127.5) / 127.5. With one Rescaling(scale, offset) in model_config the graph is fed 0..255
    pixels and the trunk sees p * scale + offset: mean = -offset / scale, std = 1 / scale. Any other layer that
    may touch pixels (an in-graph preprocess_input as TFOpLambda, Normalization, Lambda) gives None, so
    `convert` asks for --preprocessing. Size: model_config's input (224 without one); shorter side to
    size / 0.875, then centre crop.
    """
    from lightcnn.preprocess import KERAS

    scaling = keras.input_scaling()
    if scaling is None:
        return None
    mean, std = KERAS.mean, KERAS.std
    if scaling != "none":
        scale, offset = scaling
        mean, std = (float(f"{-offset / scale:.6g}"),) * 3, (float(f"{1.0 / scale:.6g}"),) * 3
    size = keras.input_size() or KERAS.size
    return Preprocessing(**{**KERAS.to_dict(), "size": size, "resize_size": max(size, round(size / 0.875)),
                            "mean": mean, "std": std})


def _tflite_preprocessing(tensor):
    """The Preprocessing a quantised TFLite input tensor implies, or None (float input: the file cannot say).

    The runtime is fed 8-bit pixels q and computes real = scale * (q - zero_point); on 0..255 pixels p that is
    (p - mean) / std with mean = zero_point (+128 for int8, whose q is p - 128) and std = 1 / scale, the rule the
    registry's TFLite entries follow. Geometry as theirs: shorter side to size / 0.875, centre crop of the
    tensor's H = W.
    """
    shape = tuple(tensor.shape)
    if (tensor.type_name not in ("UINT8", "INT8") or tensor.scale.size != 1 or len(shape) != 4 or shape[3] != 3
            or shape[1] != shape[2] or shape[1] < 1):
        return None
    mean = float(tensor.zero_point[0]) + (128.0 if tensor.type_name == "INT8" else 0.0)
    std = float(f"{1.0 / float(tensor.scale[0]):.6g}")  # float32 scales: 1/127.5 is stored as 0.00784314
    return Preprocessing(size=shape[1], resize="shorter", resize_size=round(shape[1] / 0.875), input_range=255.0,
                         mean=(mean,) * 3, std=(std,) * 3)


def recorded_metadata(src, fmt=None):
    """(Preprocessing or None, "imagenet" or None): what a source file itself records about its inputs and classes.

    tflite            a quantised input tensor gives the scaling (see _tflite_preprocessing); 1001 outputs are
                      ImageNet with TF's "background" class first (dropped by the converter, as the registry does)
    deep_compression  the format is Caffe's SqueezeNet: Caffe preprocessing and ImageNet classes, as registered
    keras             the preprocessing keras.applications.mobilenet_v2.preprocess_input applies (pixels to
                      [-1, 1], RGB) at the model_config's input size (else 224); ImageNet when the last dense
                      layer has 1000 outputs (Keras's class order is ImageNet's sorted WordNet IDs)
    pth               nothing: a state dict has no record of either
    None where the file does not say; `python -m lightcnn.weights convert` then refuses instead of guessing.
    """
    from lightcnn.registry import WEIGHTS

    src, fmt = _source_format(src, fmt)
    if fmt == "deep_compression":
        spec = next(s for s in WEIGHTS if s.converter == "deep_compression")
        return spec.preprocessing, spec.classes
    if fmt == "keras":
        from lightcnn.convert.keras_h5 import read_keras_h5

        keras = read_keras_h5(src)
        from lightcnn.weights.mapping import keras_head_layers

        head = keras_head_layers(keras)
        classes = "imagenet" if head and head[-1][1][-1:] == (1000,) else None
        return _keras_preprocessing(keras), classes
    if fmt != "tflite":
        return None, None
    from lightcnn.convert.tflite import read_tflite

    tfl = read_tflite(src)
    preprocessing = _tflite_preprocessing(tfl.tensors[tfl.inputs[0]]) if len(tfl.inputs) == 1 else None
    outputs = [tuple(tfl.tensors[i].shape) for i in tfl.outputs]
    classes = "imagenet" if len(outputs) == 1 and outputs[0][-1:] == (1001,) else None
    return preprocessing, classes


def convert_file(src, arch, config=None, fmt=None, preprocessing=None, class_ids=None, class_names=None):
    """Read a foreign checkpoint and return a Checkpoint for `arch` (strictly checked by loading it).

    preprocessing / class_names None record no preprocessing and names class_0, class_1, ... (tests and
    benchmarks that want only the tensors); `recorded_metadata` gives what the file itself says, and the
    convert command refuses rather than write such a file.
    """
    from lightcnn.convert.deep_compression import read_deep_compression
    from lightcnn.convert.pth import read_pth
    from lightcnn.convert.tflite import read_tflite
    from lightcnn.models import build
    from lightcnn.weights import mapping

    src, fmt = _source_format(src, fmt)
    config = dict(config or {})
    if fmt == "tflite":
        config.setdefault("padding", "tf")
        config.setdefault("bn", False)  # TFLite folds batch norm into the convs
    if fmt == "deep_compression":
        config.setdefault("variant", "caffe")
    provenance = {}
    if fmt == "keras":
        from lightcnn.convert.keras_h5 import read_keras_h5

        keras = read_keras_h5(src)
        config.setdefault("padding", "tf")  # Keras SAME = ZeroPadding2D(correct_pad) + VALID for 3x3 stride 2
        config.setdefault("bn", True)
        eps, provenance["bn_eps_from"] = _keras_bn_eps(keras, src)
        if "bn_eps" in config:
            provenance["bn_eps_from"] = "--config"
        config.setdefault("bn_eps", eps)
        head = mapping.keras_head_layers(keras)
        if head and len(head[-1][1]) == 2:
            config.setdefault("num_classes", head[-1][1][1])
        provenance.update(keras_version=keras.keras_version, keras_backend=keras.backend)
    model = build(arch, **config)
    if fmt == "keras" and arch == "mobilenet_v2" and len(head) > 1 and all(len(s) == 2 for _, s in head):
        model.reset_head(model.config["num_classes"], hidden=tuple(s[1] for _, s in head[:-1]))  # a dense stack
    extra = {}
    if fmt == "tflite":
        from lightcnn import quantsim

        tfl = read_tflite(src)
        tensors = mapping.map_tflite(tfl, model, str(src))
        if "activation" in config:  # the file's 8-bit grids belong to its own activations, not the variant's
            extra["architecture_variant"] = {"activation": config["activation"]}
        elif quantsim.has_quantized_activations(tfl):  # the 8-bit grids, for lightcnn.quantsim (opt-in)
            extra["activation_quantization"] = quantsim.activation_table(tfl, model, str(src))
    elif fmt == "pth":
        tensors = mapping.map_torchvision(read_pth(src), model, str(src))
    elif fmt == "deep_compression":
        tensors = mapping.map_deep_compression(read_deep_compression(src))
    elif fmt == "keras":
        tensors = mapping.map_keras(keras, model, printable(src))
    else:
        raise CheckpointError(f"{src}: unknown format {fmt!r}")
    load_state(model, tensors, str(src))  # strict: every tensor present, named and shaped as the model wants
    num_classes = model.config["num_classes"]
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise CheckpointError(f"{src}: {len(class_names)} class names for {num_classes} outputs")
    return Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=list(class_names),
                      class_ids=class_ids, preprocessing=preprocessing.to_dict() if preprocessing else None,
                      provenance=dict(source_file=src.name, source_sha256=sha256_of(src), converter=fmt,
                                      converter_version=CONVERTER_VERSION, **provenance), extra=extra)


def build_one(spec: WeightSpec, fetch=False, out_dir=None):
    """Convert one registered checkpoint into <weights_dir>/<name>.h5; returns the path."""
    src = locate_or_fetch(spec.filename, spec.sha256, spec.url, spec.name, fetch)
    class_ids, class_names = imagenet_classes(fetch)
    ckpt = convert_file(src, spec.arch, spec.config, spec.converter, spec.preprocessing, class_ids, class_names)
    ckpt.provenance["registry_name"] = spec.name
    ckpt.provenance["url"] = spec.url
    if "activation_quantization" in ckpt.extra:  # whether lightcnn.load() applies it unless told otherwise
        ckpt.extra["simulate_activation_quantization"] = bool(spec.simulate_quantization)
    out = Path(out_dir or weights_dir()) / f"{spec.name}.h5"
    save_checkpoint(out, ckpt)
    return out


def find_weights(name_or_path):
    """Resolve --weights/--model to an .h5 path without network access.

    Order: an explicit existing path; <dir>/<name>.h5 for each dir in weight_dirs()
    ($LIGHTCNN_WEIGHTS or the source checkout's weights/, then the user cache's weights/).
    The error names every place looked and the command that builds the file.
    """
    from lightcnn.registry import known_names, resolve_name

    candidate = Path(name_or_path)
    if candidate.suffix == ".h5" or os.sep in str(name_or_path):
        if candidate.is_file():
            return candidate
        raise CheckpointError(f"{candidate}: no such weight file")
    try:
        name_or_path = resolve_name(name_or_path)  # "mobilenet_v2.keras" -> "mobilenet_v2_keras"
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    places = [folder / f"{name_or_path}.h5" for folder in weight_dirs()]
    for place in places:
        if place.is_file():
            return place
    if name_or_path not in REGISTRY:
        from lightcnn.errors import did_you_mean

        raise CheckpointError(f"unknown model {name_or_path!r}{did_you_mean(name_or_path, known_names())}; known: "
                              f"{', '.join(REGISTRY)} (or pass a .h5 path)")
    looked = " and ".join(str(p) for p in dict.fromkeys(places))
    raise CheckpointError(f"weights for {name_or_path!r} not built: looked for {looked}; build them with "
                          f"'python -m lightcnn.weights build {name_or_path}' (add --fetch to download, or set "
                          "LIGHTCNN_SOURCES to a folder of original checkpoints)")


# -- what a user compares weights by (lightcnn.load(...).meta, `weights list --json`) -------------------------

META_FIELDS = ("name", "arch", "tag", "parameters", "macs", "input_size", "num_classes", "file", "file_size",
               "weights_sha256", "published_top1", "measured_top1", "licence", "source", "url", "source_sha256")


def weights_meta(spec=None, path=None, model=None, checkpoint=None):
    """One dict of META_FIELDS about a model's weights (None where unknown).

    spec        the registry entry (accuracy, licence, source) or None for a file of one's own
    path        the .h5 file (size, SHA-256) or None when not built
    model       the built model (parameter count, MACs at the input size); built from spec/checkpoint if None
    checkpoint  the file's contents, for its provenance when there is no spec
    parameters and macs count multiply-accumulates of one image at input_size x input_size.
    published_top1: ILSVRC-2012 validation top-1 (%) as the source publishes it; measured_top1: the reference
    runtime's top-1 (%) on the 1000-image ImageNet sample (README, "Models and weights").
    """
    from lightcnn.layers.basic import skip_initialisation
    from lightcnn.models import build

    provenance = dict(getattr(checkpoint, "provenance", None) or {})
    if model is None:
        with skip_initialisation():
            if spec is not None:
                model = build(spec.arch, **spec.config)
            elif checkpoint is not None:
                model = build(checkpoint.arch, **{k: v for k, v in checkpoint.config.items() if k != "head"})
    size = None
    if checkpoint is not None and checkpoint.preprocessing:
        size = int(checkpoint.preprocessing.get("size") or 0) or None
    if size is None and spec is not None:
        size = spec.preprocessing.size
    built = path is not None and Path(path).is_file()
    return dict(
        name=spec.name if spec else provenance.get("registry_name") or (Path(path).stem if path else None),
        arch=spec.arch if spec else (checkpoint.arch if checkpoint is not None else getattr(model, "arch", None)),
        tag=spec.tag if spec else None,
        parameters=model.count_params() if model is not None else None,
        macs=model.count_macs(size) if model is not None else None,
        input_size=size,
        num_classes=model.num_classes if model is not None else None,
        file=str(path) if built else None,
        file_size=Path(path).stat().st_size if built else None,
        weights_sha256=sha256_of(path) if built else None,
        published_top1=spec.published_top1 if spec else None,
        measured_top1=spec.sample_top1 if spec else None,
        licence=spec.licence if spec else None,
        source=spec.source if spec else provenance.get("source_file"),
        url=spec.url if spec else provenance.get("url"),
        source_sha256=spec.sha256 if spec else provenance.get("source_sha256"),
    )


def registry_meta(spec):
    """weights_meta of a registered entry, with its .h5 wherever find_weights would find it (or not built)."""
    try:
        path = find_weights(spec.name)
    except CheckpointError:
        path = None
    return weights_meta(spec, path)


__all__ = ["weights_meta", "registry_meta", "weight_dirs", "cache_dir", "build_one", "convert_file",
           "recorded_metadata", "find_weights", "find_source", "download", "weights_dir", "source_dirs",
           "imagenet_classes", "DEFAULT_MODEL", "get_spec", "REGISTRY"]
