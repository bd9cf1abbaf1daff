"""The frozen part of a network, run once per image (and per augmented view), its outputs cached on disk.

    image --load_view--> x (S,S,C) --frozen prefix (training=False)--> f    cached as <cache>/<model key>/<item key>.npz

What is cached depends on how much of the network is trained:

    unfreeze = 0      head only: f = GAP(features(x))        (F,)        e.g. 1280 floats for MobileNetV2
    unfreeze = k      last k blocks: f = prefix(x)           (h,w,c)     the input of the first unfrozen block
    unfreeze = "all"  whole network: f = x                   (S,S,C)     the preprocessed image itself

`split_backbone(model, k)` draws that line: the last k children of ``features.blocks`` plus ``features.last``
for MobileNets, the last k Fire modules (and the pools between them) for SqueezeNet.

Views. View 0 of an image is the plain preprocessed image; views 1..V are augmented copies, each made with its
own generator seeded by (seed, view, hash of the path), so a view is the same image whatever the batch order or
process. Training picks one view per image per epoch: V cached views stand in for on-the-fly augmentation and
cost the backbone only once per view, for every later epoch and every tuning trial.

Cache keys (sha256, so a stale entry can never be read):
    model key  architecture + config (without the head) + the split point + the bytes of every prefix tensor
               (this identifies the weights exactly, even for a model that never came from a file)
               + the preprocessing dict (mean, std, crop, blur, ...)
    item key   absolute path + mtime (ns) + size of the image file + view index, and for views > 0 the
               augmentation config and seed
Entries are .npz files written atomically (temp file + rename), so concurrent runs and interrupted runs never
leave a torn entry; two processes computing the same entry both write identical bytes. Each entry also holds
the full key it was computed for (model key / item key) and a SHA-256 of its array: an entry that is
truncated, corrupt, of another shape, non-finite, computed for another key or whose values do not match its
checksum is never used; it is recomputed and overwritten, and the run prints one warning line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import repeat
from pathlib import Path

import numpy as np

from lightcnn.augment import Augmenter
from lightcnn.checkpoint import atomic_write_bytes
from lightcnn.layers.base import Sequential
from lightcnn.layers.blocks import Fire
from lightcnn.preprocess import Preprocessing, load_image, normalise_pixels, preprocess_uint8

CACHE_VERSION = "2"  # 2: entries hold their key and a checksum

# Named augmentation settings for --augment; values are Augmenter configs (see lightcnn.augment).
# random_resized_crop's output size is always set to the model's input size.
AUGMENT_PRESETS = {
    "none": {},
    # seed 000: random resized crop with scale 0.08-1.0
    "seed000": {"random_resized_crop": {"scale": [0.08, 1.0]}},
    # seed 001: rotation up to 90 degrees, zoom 1.1-1.3, Gaussian noise
    "seed001": {"zoom": {"range": [1.1, 1.3]}, "rotation": {"max_degrees": 90.0}, "gaussian_noise": {"sigma": 5.0}},
    # seed 002: flips and colour jitter
    "seed002": {"hflip": {"p": 0.5}, "colour_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2}},
    # seed 003: rotation up to 40 degrees, zoom, flips (pair with oversampling of the minority class)
    "seed003": {"zoom": {"range": [1.0, 1.2]}, "rotation": {"max_degrees": 40.0}, "hflip": {"p": 0.5}},
    # a mild mix that keeps most of a CT slice in view
    "light": {"random_resized_crop": {"scale": [0.5, 1.0]}, "rotation": {"max_degrees": 15.0}, "hflip": {"p": 0.5},
              "colour_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.0}},
}


def augment_config(spec):
    """--augment value -> Augmenter config dict: a preset name, a JSON object, or None/"" for none."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        config = dict(spec)
    elif spec in AUGMENT_PRESETS:
        config = dict(AUGMENT_PRESETS[spec])
    else:
        try:
            config = json.loads(spec)
        except ValueError:
            raise ValueError(f"--augment: {spec!r} is neither a preset ({', '.join(AUGMENT_PRESETS)}) "
                             f"nor a JSON object") from None
        if not isinstance(config, dict):
            raise ValueError(f"--augment: expected a JSON object, got {spec!r}")
    Augmenter(config)  # validates names and parameters now, with Augmenter's own messages
    return config


def make_augmenter(config, preprocessing):
    """An Augmenter for `config` whose random_resized_crop outputs the model's input size (None if empty)."""
    config = dict(config or {})
    if not config:
        return None
    if config.get("random_resized_crop") not in (None, False):
        rrc = dict(config["random_resized_crop"] if isinstance(config["random_resized_crop"], dict) else {})
        rrc["size"] = preprocessing.size
        config["random_resized_crop"] = rrc
    return Augmenter(config)


# --------------------------------------------------------------------------------------------- one image


def load_view(path, preprocessing, augmenter=None, rng=None):
    """One image file -> x (S,S,C) float32, the network input; augmented when `augmenter` is given.

    Without augmentation this is exactly `preprocess_image(load_image(path), preprocessing)`. With it:
      * random_resized_crop in the chain: the crop is taken from the decoded image and resized to S x S
        (torchvision's training transform; it replaces resize + centre crop), then the other ops run;
      * otherwise: resize + centre crop as at inference, then the ops run on the S x S image.
    Augmentation works on RGB (or grey) pixels; BGR models get their channels swapped afterwards, and the
    blur and mean/std of `preprocessing` are applied last.
    """
    if augmenter is None:
        spec = preprocessing
        img = load_image(path, **spec.load_options()).convert("L" if spec.channel_order == "L" else "RGB")
        return normalise_pixels(preprocess_uint8(img, spec), spec)
    return augmented_view(augment_source(path, preprocessing, augmenter), preprocessing, augmenter, rng)


def augment_source(path, preprocessing, augmenter):
    """The uint8 pixels (H, W, C) the augmenter starts from, the same every epoch: the decoded image when the
    chain crops (random_resized_crop), else the S x S image resized and centre-cropped as at inference."""
    spec = preprocessing
    work = "L" if spec.channel_order == "L" else "RGB"
    img = load_image(path, **spec.load_options()).convert(work)
    if _crops(augmenter):
        arr = np.asarray(img, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr
    return preprocess_uint8(img, replace(spec, channel_order=work))


def augmented_view(source, preprocessing, augmenter, rng):
    """augment_source's pixels -> one augmented network input x (S,S,C) float32 (load_view's second half)."""
    spec = preprocessing
    work_spec = replace(spec, channel_order="L" if spec.channel_order == "L" else "RGB")
    if _crops(augmenter):
        pixels = preprocess_uint8(augmenter(source, rng), replace(work_spec, resize="stretch"))  # already S x S
    else:
        pixels = augmenter(source, rng)
    if spec.channel_order == "BGR":
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])
    return normalise_pixels(pixels, spec)


def _crops(augmenter):
    return any(name == "random_resized_crop" for name, _, _ in augmenter.steps)


def view_rng(path, view, seed):
    """The generator of augmented view `view` of `path`: depends on nothing else (not batch order, not mtime)."""
    h = int.from_bytes(hashlib.sha256(os.fspath(Path(path).resolve()).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(view), h])


def epoch_view_rng(path, epoch, seed):
    """The generator of `path`'s augmentation in `epoch` when views are drawn fresh every epoch: depends on the
    seed, the epoch and the file only (a stream apart from view_rng's cached views)."""
    h = int.from_bytes(hashlib.sha256(os.fspath(Path(path).resolve()).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(epoch), h, 1])


_LOADER_THREADS = max(1, min(4, os.cpu_count() or 1))
# fresh_views' decoded images kept between epochs, in all: 425 CT slices at 227 x 227 are 22 MB, 10 000 RGB
# ImageNet-sized photos kept whole for random_resized_crop ~5 GB (so only the first ~1 GB of them)
_SOURCE_CACHE_BYTES = 1 << 30
_SOURCE_LOCK = threading.Lock()


def fresh_views(model, dataset_items, preprocessing, augment, seed, unfreeze, batch_size=16):
    """A callable epoch -> (N, ...) float32: every item augmented anew for that epoch (epoch_view_rng) and run
    through the frozen part (unfreeze as in split_backbone; "all": the images themselves). No view is cached:
    this is the papers' on-the-fly augmentation, at the price of the frozen part once per image per epoch.
    What the augmentation starts from (augment_source: the decoded, resized pixels) is the same every epoch,
    so it is kept in memory, up to _SOURCE_CACHE_BYTES in all (later images are decoded every epoch): decoding
    was 2.1 of seed 001's 4.1 ms an image (UCSD CT slices of ~350 x 230, one core)."""
    paths = [Path(getattr(it, "path", it)) for it in dataset_items]
    augmenter = make_augmenter(augment_config(augment), preprocessing)
    prefix, _ = split_backbone(model, unfreeze)
    sources, held, budget = {}, [0], _SOURCE_CACHE_BYTES

    def source(path):
        kept = sources.get(path)
        if kept is not None:
            return kept
        pixels = augment_source(path, preprocessing, augmenter)
        pixels.setflags(write=False)  # the ops return new arrays; one that wrote into its input would raise here
        with _SOURCE_LOCK:  # the loader's threads share the budget
            if held[0] + pixels.nbytes <= budget:
                sources[path] = pixels
                held[0] += pixels.nbytes
        return pixels

    def one(path, epoch):
        rng = epoch_view_rng(path, epoch, seed)
        if augmenter is None:
            return load_view(path, preprocessing, None, rng)
        return augmented_view(source(path), preprocessing, augmenter, rng)

    def inputs(epoch):
        out = []
        # Decoding and augmenting run in threads (PIL and most of NumPy release the GIL): seed 001's 425 CT
        # slices per epoch took 1.8-1.9 s serially, 1.1-1.3 s on 2 threads. Each image has its own generator
        # (epoch_view_rng), so the views do not depend on the thread count or order.
        with ThreadPoolExecutor(max_workers=_LOADER_THREADS, thread_name_prefix="lightcnn-load") as pool:
            for start in range(0, len(paths), batch_size):
                batch = np.stack(list(pool.map(one, paths[start:start + batch_size], repeat(epoch))))
                out.append(np.ascontiguousarray(frozen_output(model, prefix, unfreeze, batch), dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    return inputs


# --------------------------------------------------------------------------------------------- the split point


def _is_mobilenet_trunk(features):
    names = [n for n, _ in features.children()]
    return isinstance(features, Sequential) and "blocks" in names and "last" in names


def split_backbone(model, unfreeze):
    """Split ``model.features_net`` into (prefix, suffix) Sequentials sharing the model's layer objects.

    unfreeze  0: everything is prefix (head-only training); "all": suffix = features_net itself;
              k >= 1: MobileNet -> suffix = the last k children of features.blocks + features.last;
                      SqueezeNet -> suffix = the last k Fire modules and any pool between them.
    Children keep their names relative to ``features`` ("blocks.15", "last", "fire9"), so the suffix's
    parameter names are the model's own minus the leading "features.".
    """
    features = model.features_net
    if unfreeze == "all":
        return Sequential(), features  # any trunk, also one that is not a plain Sequential
    k = int(unfreeze)
    if k == 0:
        return Sequential(features.children()), Sequential()
    if k < 0:
        raise ValueError(f"unfreeze must be >= 0 or 'all', got {unfreeze!r}")
    if _is_mobilenet_trunk(features):
        blocks = features["blocks"]
        if k > len(blocks):
            raise ValueError(f"{model.arch} has {len(blocks)} blocks; cannot unfreeze the last {k}")
        prefix, suffix = [], []
        for name, layer in features.children():
            if name == "blocks":
                for bname, block in blocks.children():
                    target = prefix if int(bname) < len(blocks) - k else suffix
                    target.append((f"blocks.{bname}", block))
            elif name == "last":
                suffix.append((name, layer))
            else:
                (suffix if suffix else prefix).append((name, layer))
        return Sequential(prefix), Sequential(suffix)
    children = features.children() if isinstance(features, Sequential) else []
    fires = [i for i, (_, layer) in enumerate(children) if isinstance(layer, Fire)]
    if not fires:
        raise ValueError(f"{model.arch}: don't know how to split its features into blocks "
                         f"(expected MobileNet stem/blocks/last or SqueezeNet Fire modules)")
    if k > len(fires):
        raise ValueError(f"{model.arch} has {len(fires)} Fire modules; cannot unfreeze the last {k}")
    cut = fires[-k]
    return Sequential(children[:cut]), Sequential(children[cut:])


def trunk_blocks(model):
    """The number of blocks `split_backbone` counts: MobileNet blocks, or SqueezeNet Fire modules."""
    features = model.features_net
    if _is_mobilenet_trunk(features):
        return len(features["blocks"])
    children = features.children() if isinstance(features, Sequential) else []
    return sum(isinstance(layer, Fire) for _, layer in children)


def _weight_layers(net):
    from lightcnn.layers.basic import Conv2d, ConvTranspose2d, Dense, DepthwiseConv2d

    kinds = (Conv2d, ConvTranspose2d, Dense, DepthwiseConv2d)
    return sum(isinstance(layer, kinds) for _, layer in net.named_layers())


def resolve_unfreeze(model, unfreeze, freeze_first=None):
    """(k, info) for split_backbone from --unfreeze K | "P%" or --freeze-first K.

    freeze_first K    the first K blocks (and the stem) stay frozen: k = blocks - K
    "P%"              the k whose trained part holds the share of the trunk's weight layers (convolutions,
                      depthwise, dense) nearest to P % (ties: the larger k)
    info: {"unfreeze": k, "blocks": [trained children of features], "weight_layers": [trained, total],
           "share": trained / total} (the stderr line and config.json say which blocks that is).
    """
    n = trunk_blocks(model)
    if freeze_first is not None:
        if not 0 <= int(freeze_first) < n:
            raise ValueError(f"{model.arch} has {n} blocks; --freeze-first must be 0..{n - 1}, got {freeze_first}")
        k = n - int(freeze_first)
    elif isinstance(unfreeze, str) and unfreeze.endswith("%"):
        target = float(unfreeze[:-1]) / 100.0
        total = _weight_layers(model.features_net)
        shares = [(_weight_layers(split_backbone(model, j)[1]) / total, j) for j in range(1, n + 1)]
        k = min(shares, key=lambda t: (abs(t[0] - target), -t[1]))[1]
    else:
        k = int(unfreeze)
    _, suffix = split_backbone(model, k)
    trained, total = _weight_layers(suffix), _weight_layers(model.features_net)
    return k, {"unfreeze": k, "blocks": [f"features.{name}" for name, _ in suffix.children()],
               "weight_layers": [trained, total], "share": round(trained / total, 4)}


def describe_unfreeze(info, asked):
    """One line: which blocks train for --unfreeze / --freeze-first `asked`."""
    blocks = info["blocks"]
    shown = ", ".join(blocks) if len(blocks) <= 4 else f"{blocks[0]} ... {blocks[-1]}"
    trained, total = info["weight_layers"]
    return (f"{asked}: {len(blocks)} trunk children train ({shown}): {trained} of {total} weight layers "
            f"({100 * info['share']:.1f} %), the first {total - trained} frozen")


def frozen_output(model, prefix, unfreeze, x):
    """What the cache holds for a batch x (N,S,S,C): see the module docstring.

    The frozen part runs as an inference plan on the model's engine (lightcnn.engine), so feature
    extraction needs no compilation beyond what predict uses, and none at all on the numpy engine.
    """
    if unfreeze == "all":
        return x
    x = np.ascontiguousarray(x, dtype=np.float32)
    if int(unfreeze) == 0:
        return np.mean(model.features(x), axis=(1, 2), dtype=np.float64).astype(np.float32)
    return _prefix_plan(model, prefix, x.shape).run(x)


def _prefix_plan(model, prefix, shape):
    """The inference plan of the frozen prefix for batches of `shape`, kept on the model per shape."""
    from lightcnn.layers.plan import InferencePlan

    plans = model.__dict__.setdefault("_prefix_plans", {})
    key = (tuple(id(layer) for _, layer in prefix.children()), shape, model.engine)
    if key not in plans:
        if len(plans) >= 4:
            plans.pop(next(iter(plans)))
        plans[key] = InferencePlan([("features", prefix)], shape, engine=model.engine)
        model.__dict__["_last_engine"] = plans[key].engine
    return plans[key]


# --------------------------------------------------------------------------------------------- keys


def model_key(model, unfreeze, preprocessing):
    """sha256 hex of everything the cached output depends on, except the image (see module docstring)."""
    prefix, _ = split_backbone(model, unfreeze)
    config = {k: v for k, v in model.config.items() if k not in ("head", "num_classes", "dropout")}
    digest = hashlib.sha256()
    digest.update(json.dumps({"cache_version": CACHE_VERSION, "arch": model.arch, "config": config,
                              "unfreeze": str(unfreeze),
                              "preprocessing": preprocessing.to_dict()}, sort_keys=True).encode())
    if unfreeze != "all":
        for name, value in sorted(prefix.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(value.shape).encode())
            digest.update(np.ascontiguousarray(value, dtype=np.float32).tobytes())
    return digest.hexdigest()


def item_key(path, view, augment=None, seed=0):
    """sha256 hex of one image file's identity (path, mtime, size) and the view."""
    path = Path(path).resolve()
    st = path.stat()
    parts = {"path": os.fspath(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size, "view": int(view)}
    if view:
        parts.update(augment=augment, seed=int(seed))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_cache_dir():
    """$LIGHTCNN_CACHE/features, else ~/.cache/lightcnn/features."""
    root = os.environ.get("LIGHTCNN_CACHE") or Path.home() / ".cache" / "lightcnn"
    return Path(root) / "features"


def _array_sha256(array):
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _save_npz(path, array, key):
    """One cache entry: the array, the key it was computed for and the array's SHA-256."""
    buffer = io.BytesIO()
    np.savez(buffer, x=array, key=np.array(key), sha256=np.array(_array_sha256(array)))
    atomic_write_bytes(path, buffer.getvalue())


def _load_npz(path, key, shape):
    """(array, None) for a sound entry of `key` with `shape` (None: any), else (None, why it cannot be used)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if set(f.files) != {"x", "key", "sha256"}:
                return None, f"holds {sorted(f.files)}, not x, key, sha256"
            x, stored_key, digest = f["x"], str(f["key"]), str(f["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    if stored_key != key:
        return None, "computed for another image, view or model"
    if x.dtype != np.float32 or (shape is not None and x.shape != tuple(shape)):
        return None, f"{x.dtype} {x.shape}, expected float32 {tuple(shape) if shape else ''}".rstrip()
    if _array_sha256(x) != digest:
        return None, "values do not match the entry's checksum"
    if not np.all(np.isfinite(x)):
        return None, "non-finite values"
    return x, None


# --------------------------------------------------------------------------------------------- extraction


def _progress_printer(label):
    start = time.perf_counter()

    def report(done, total):
        print(f"{label}: {done}/{total} images ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    return report


def extract_features(model, dataset_items, preprocessing, cache_dir, augment_views=0, seed=0, augment=None,
                     unfreeze=0, batch_size=16, progress=None, stats=None):
    """Frozen-backbone outputs of every image and view, from the on-disk cache where possible.

    model           a lightcnn Model (its head is irrelevant; only the frozen prefix runs, with training=False)
    dataset_items   sequence of data.Item (anything with .path) or paths
    preprocessing   Preprocessing (or its dict) that turns each file into the model input
    cache_dir       folder of the cache (created); None = no cache, compute everything
    augment_views   V: views 1..V are augmented with `augment` (an Augmenter config dict or preset name)
    seed            seed of the augmented views (see `view_rng`)
    unfreeze        0 (pooled features), k (input of the last k blocks) or "all" (the images); see module doc
    progress        None, True (a line on stderr per batch) or callable(done, total)
    stats           optional dict, filled with {"computed": n, "cached": m, "unusable": u, "seconds": s}
                    (u of the n computed replaced cache entries that could not be used; one warning line)
    Returns float32 (V+1, N, ...) C-contiguous: out[v, i] is view v of item i.
    """
    t0 = time.perf_counter()
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_dict(preprocessing)
    paths = [Path(getattr(it, "path", it)) for it in dataset_items]
    aug_config = augment_config(augment) if augment_views else {}
    if augment_views and not aug_config:
        raise ValueError("augment_views > 0 needs an augmentation (augment=...)")
    augmenter = make_augmenter(aug_config, preprocessing)
    prefix, _ = split_backbone(model, unfreeze)
    views = 1 + int(augment_views)
    folder = None
    if cache_dir is not None:
        key = model_key(model, unfreeze, preprocessing)
        folder = Path(cache_dir) / key[:24]
        folder.mkdir(parents=True, exist_ok=True)
        info = folder / "key.json"
        if not info.exists():
            from lightcnn.checkpoint import atomic_write_text

            atomic_write_text(info, json.dumps({"arch": model.arch, "unfreeze": str(unfreeze), "sha256": key,
                                                "preprocessing": preprocessing.to_dict()}, indent=1))
    results = [[None] * len(paths) for _ in range(views)]
    todo = []  # (view, index, entry path or None, entry key)
    shape, bad = None, []  # what every entry must be; (entry, reason) of unusable ones
    for v in range(views):
        for i, path in enumerate(paths):
            entry = entry_key = None
            if folder is not None:
                ikey = item_key(path, v, aug_config if v else None, seed)
                entry, entry_key = folder / f"{ikey[:40]}.npz", f"{key}/{ikey}"
                if entry.exists():
                    if shape is None:  # one image through the prefix gives the shape every entry must have
                        probe = np.zeros((1, preprocessing.size, preprocessing.size, preprocessing.channels),
                                         np.float32)
                        shape = frozen_output(model, prefix, unfreeze, probe).shape[1:]
                    results[v][i], why = _load_npz(entry, entry_key, shape)
                    if results[v][i] is not None:
                        continue
                    bad.append((entry, why))
            todo.append((v, i, entry, entry_key))
    if bad:
        print(f"warning: feature cache: {len(bad)} unusable entr{'y' if len(bad) == 1 else 'ies'} recomputed "
              f"(first: {bad[0][0]}: {bad[0][1]})", file=sys.stderr, flush=True)
    if progress is True:
        progress = _progress_printer("features")
    noted = False
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        batch = np.stack([load_view(paths[i], preprocessing, augmenter if v else None,
                                    view_rng(paths[i], v, seed) if v else None) for v, i, _, _ in chunk])
        out = np.ascontiguousarray(frozen_output(model, prefix, unfreeze, batch), dtype=np.float32)
        if not noted and progress and unfreeze != "all":
            from lightcnn._cli import engine_note

            engine_note(model, len(todo), model.arch)
            noted = True
        for row, (v, i, entry, entry_key) in zip(out, chunk):
            results[v][i] = row.copy()
            if entry is not None:
                _save_npz(entry, results[v][i], entry_key)
        if progress:
            progress(start + len(chunk), len(todo))
    if stats is not None:
        stats.update(computed=len(todo), cached=views * len(paths) - len(todo), unusable=len(bad),
                     seconds=time.perf_counter() - t0)
    if not paths:
        return np.zeros((views, 0), np.float32)
    return np.ascontiguousarray(np.stack([np.stack(r) for r in results]), dtype=np.float32)


__all__ = ["AUGMENT_PRESETS", "augment_config", "default_cache_dir", "describe_unfreeze", "epoch_view_rng",
           "extract_features", "fresh_views", "frozen_output", "item_key", "load_view", "make_augmenter",
           "model_key", "resolve_unfreeze", "split_backbone", "trunk_blocks", "view_rng"]
