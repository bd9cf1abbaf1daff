"""One registry of models and weights; the CLI, tests, benchmarks and docs iterate over it.

A `WeightSpec` says where a canonical checkpoint lives (URL pinned to a commit
or a versioned file name, SHA-256), which converter reads it, which
architecture and config it fills, how its inputs are preprocessed, which class
list it uses, what accuracy it is published at and, for quantised TFLite files,
whether lightcnn.load() simulates their 8-bit activations by default
(lightcnn.quantsim). Converted files are named ``<name>.h5`` in the weights directory.
"""

from typing import Any, NamedTuple

from lightcnn.errors import did_you_mean
from lightcnn.preprocess import Preprocessing


class WeightSpec(NamedTuple):
    name: str               # the name users type: --model NAME, lightcnn.load(NAME)
    arch: str               # builder in lightcnn.models
    config: dict            # builder arguments matching the checkpoint
    filename: str           # the checkpoint's file name (searched for in $LIGHTCNN_SOURCES)
    url: str                # canonical download location
    sha256: str             # full SHA-256 of the file, or a prefix when only that is published
    converter: str          # "tflite" | "pth" | "deep_compression"
    preprocessing: Preprocessing
    classes: str            # "imagenet" (1000 classes, synset order)
    published_top1: float   # ILSVRC-2012 validation top-1 (%), as published by the source
    sample_top1: float | None  # reference runtime's top-1 on shared/data/imagenet-sample (%), or None
    source: str             # one line of provenance for the docs
    licence: str
    # quantised TFLite files: round activations to the file's 8-bit grids by default (lightcnn.quantsim),
    # set where that measurably brings lightcnn closer to the reference runtime
    simulate_quantization: bool = False
    # the weights' tag within their architecture: lightcnn.load(arch, weights=tag) or "arch.tag"
    tag: str = ""


# TF-slim / TFLite uint8 models feed raw RGB bytes; their input quantisation
# (q - zero_point) * scale becomes mean/std on 0..255 pixels here.
_TFLITE_COMMON: dict[str, Any] = dict(resize="shorter", resize_size=256, size=224, input_range=255.0)

WEIGHTS = (
    WeightSpec(
        name="mobilenet_v2",
        arch="mobilenet_v2",
        config=dict(padding="tf", bn=False, num_classes=1000),
        filename="mobilenet_v2_1.0_224_quant.tflite",
        url="https://github.com/google-coral/edgetpu/raw/5020de9386ff370dcc1f63291a2d0f98eeb98adb/"
            "test_data/mobilenet_v2_1.0_224_quant.tflite",
        sha256="51e8256b05665529f8836fe6e8eeed41b2fc75a900d8eebda338d70a6726f8da",
        converter="tflite",
        preprocessing=Preprocessing(**_TFLITE_COMMON, mean=(128.0,) * 3, std=(128.0,) * 3),
        classes="imagenet",
        published_top1=70.8,
        sample_top1=87.3,
        source="Google's quantisation-aware MobileNetV2 1.0/224 (TF-slim, TFLite uint8), Coral test data",
        licence="Apache-2.0",
        tag="tfslim",
    ),
    WeightSpec(
        name="mobilenet_v2_keras",
        arch="mobilenet_v2",
        config=dict(padding="tf", bn=False, num_classes=1000),
        filename="mobilenet_v2_1.0_224_quant.tflite",
        url="https://github.com/phil137786/optimizing-models/raw/f33c1dfd2b1ec86cdce45a1befde83068aa4dd1a/"
            "mobilenet_v2_1.0_224_quant.tflite",
        sha256="3cb2d53f5b57aea6696724c803db309de8db81270c06f9b05947da711cd7da01",
        converter="tflite",
        preprocessing=Preprocessing(**_TFLITE_COMMON, mean=(127.5,) * 3, std=(127.5,) * 3),
        classes="imagenet",
        published_top1=71.3,
        sample_top1=87.8,
        source="tf.keras.applications.MobileNetV2(weights='imagenet'), post-training int8 TFLite",
        licence="none stated (Keras weights: Apache-2.0)",
        tag="keras",
    ),
    WeightSpec(
        name="mobilenet_v3_small",
        arch="mobilenet_v3_small",
        config=dict(padding="tf", bn=False, num_classes=1000),
        filename="v3-small_224_1.0_uint8.tflite",
        url="https://github.com/weilly0912/ATU_Model_Zoo/raw/16742989779cd175d708afd02c3c748a86494027/"
            "Classification/mobilenet_v3/v3-small_224_1.0_uint8.tflite",
        sha256="da341cf06fa50127a72dcbeb140ee5ee98013630aa044260a4c3d45c43fc89ce",
        converter="tflite",
        preprocessing=Preprocessing(**_TFLITE_COMMON, mean=(128.0,) * 3, std=(127.0,) * 3),
        classes="imagenet",
        published_top1=64.9,
        sample_top1=76.1,
        source="Google's quantisation-aware TF-slim MobileNetV3-Small 1.0/224 (TFLite uint8)",
        licence="MIT (zoo) / Apache-2.0 (TF-slim)",
        tag="tfslim",
        # sample, float -> simulated: top-1 73.9 -> 76.7%, top-1 agreement with the runtime 82.5 -> 87.7%
        simulate_quantization=True,
    ),
    WeightSpec(
        name="squeezenet1_0_caffe",
        arch="squeezenet1_0",
        config=dict(variant="caffe", num_classes=1000),
        filename="compressed_SqueezeNet.net",
        url="https://github.com/songhan/SqueezeNet-Deep-Compression/raw/fb13faa2cf121ced9999f8a9d538ec6c56084733/"
            "compressed_SqueezeNet.net",
        sha256="e4ab6960ae8cd81505e1c2136921201507e930966c53deaf15862a395b3a3261",
        converter="deep_compression",
        preprocessing=Preprocessing(size=227, resize="square", resize_size=256, channel_order="BGR",
                                    input_range=255.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)),
        classes="imagenet",
        published_top1=57.5,
        sample_top1=62.3,
        source="SqueezeNet v1.0 with Deep Compression (pruned, 8-bit codebook), Caffe layout",
        licence="BSD-2-Clause",
        tag="caffe",
    ),
    # torchvision's published checkpoints. torchvision publishes only the first 8 hex digits
    # of each file's SHA-256 (in the file name); that prefix is what is checked.
    WeightSpec(
        name="mobilenet_v2_torchvision", arch="mobilenet_v2", config=dict(num_classes=1000),
        filename="mobilenet_v2-b0353104.pth", url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        sha256="b0353104", converter="pth", preprocessing=Preprocessing(), classes="imagenet",
        published_top1=71.878, sample_top1=None, source="torchvision MobileNet_V2_Weights.IMAGENET1K_V1",
        licence="BSD-3-Clause", tag="torchvision"),
    WeightSpec(
        name="mobilenet_v3_large", arch="mobilenet_v3_large", config=dict(num_classes=1000),
        filename="mobilenet_v3_large-8738ca79.pth",
        url="https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
        sha256="8738ca79", converter="pth", preprocessing=Preprocessing(), classes="imagenet",
        published_top1=74.042, sample_top1=None, source="torchvision MobileNet_V3_Large_Weights.IMAGENET1K_V1",
        licence="BSD-3-Clause", tag="torchvision"),
    WeightSpec(
        name="mobilenet_v3_small_torchvision", arch="mobilenet_v3_small", config=dict(num_classes=1000),
        filename="mobilenet_v3_small-047dcff4.pth",
        url="https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
        sha256="047dcff4", converter="pth", preprocessing=Preprocessing(), classes="imagenet",
        published_top1=67.668, sample_top1=None, source="torchvision MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        licence="BSD-3-Clause", tag="torchvision"),
    WeightSpec(
        name="squeezenet1_0", arch="squeezenet1_0", config=dict(num_classes=1000),
        filename="squeezenet1_0-b66bff10.pth", url="https://download.pytorch.org/models/squeezenet1_0-b66bff10.pth",
        sha256="b66bff10", converter="pth", preprocessing=Preprocessing(), classes="imagenet",
        published_top1=58.092, sample_top1=None, source="torchvision SqueezeNet1_0_Weights.IMAGENET1K_V1",
        licence="BSD-3-Clause", tag="torchvision"),
    WeightSpec(
        name="squeezenet1_1", arch="squeezenet1_1", config=dict(num_classes=1000),
        filename="squeezenet1_1-b8a52dc0.pth", url="https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
        sha256="b8a52dc0", converter="pth", preprocessing=Preprocessing(), classes="imagenet",
        published_top1=58.178, sample_top1=None, source="torchvision SqueezeNet1_1_Weights.IMAGENET1K_V1",
        licence="BSD-3-Clause", tag="torchvision"),
)

REGISTRY = {spec.name: spec for spec in WEIGHTS}
DEFAULT_MODEL = "mobilenet_v2"


class LabelSpec(NamedTuple):
    filename: str
    url: str
    sha256: str


# The 1000 ImageNet classes in synset order, "n01440764 tench, Tinca tinca" per line.
IMAGENET_LABELS = LabelSpec(
    filename="synset_words_1000.txt",
    url="https://github.com/stevejaehyeok/ncnn-mtcnn-arcface-android/raw/c714489fdae0b81cfcc52e5d555e0bb8e904c493/"
        "app/src/main/assets/synset_words.txt",
    sha256="acf75ef0abe89694b19056e0796401068b459c457baa30335f240c7692857355",
)


def get_spec(name):
    """The WeightSpec registered as `name` (or "arch.tag"), or a ValueError listing the known names."""
    try:
        return REGISTRY[resolve_name(name)]
    except KeyError:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name, known_names())}; known: "
                         f"{', '.join(REGISTRY)}") from None


# -- discovery, as torchvision's list_models / get_model_weights and timm's "arch.tag" names ------------------

def list_models(pretrained=None):
    """Architecture names (what lightcnn.models.build takes), sorted.

    pretrained None: every architecture; True: only those with registered weights; False: only those without.
    """
    from lightcnn.models import BUILDERS

    with_weights = {spec.arch for spec in WEIGHTS}
    return sorted(a for a in BUILDERS if pretrained is None or (a in with_weights) == bool(pretrained))


def list_weights(arch=None):
    """Registered weight names ("mobilenet_v2_keras", ...), of one architecture when `arch` is given."""
    return [spec.name for spec in WEIGHTS if arch is None or spec.arch == arch]


def known_names():
    """Every name lightcnn.load accepts: registry names, "arch.tag" forms and architecture names."""
    return [*REGISTRY, *(f"{s.arch}.{s.tag}" for s in WEIGHTS), *list_models()]


def default_weights(arch):
    """The registry entry an architecture loads without a tag: the one named like it, else its first; or None."""
    specs = [spec for spec in WEIGHTS if spec.arch == arch]
    return next((s for s in specs if s.name == arch), specs[0] if specs else None)


def resolve_name(name, weights=None):
    """(architecture or registry name, weights tag) -> the registry name; ValueError with a suggestion if none.

    resolve_name("mobilenet_v2_keras") and resolve_name("mobilenet_v2", "keras") and
    resolve_name("mobilenet_v2.keras") are the same weights; weights "default" (or None after an architecture
    name) picks `default_weights`. A name that is neither registered nor "arch.tag" is returned unchanged.
    """
    if weights is None:
        if name in REGISTRY or not isinstance(name, str) or "." not in name or name.endswith(".h5"):
            return name
        arch, _, weights = name.partition(".")
        if arch not in list_models():
            return name
    else:
        arch = name
    if arch not in list_models():
        raise ValueError(f"unknown architecture {arch!r}{did_you_mean(arch, list_models())}; "
                         f"architectures: {', '.join(list_models())}")
    specs = [spec for spec in WEIGHTS if spec.arch == arch]
    if not specs:
        raise ValueError(f"{arch!r} has no registered weights; build it untrained with lightcnn.models.build"
                         f"({arch!r}), or load a .h5 of your own")
    if weights in ("default", "DEFAULT", True):
        return default_weights(arch).name
    for spec in specs:
        if weights in (spec.tag, spec.name):
            return spec.name
    tags = [s.tag for s in specs]
    raise ValueError(f"no weights {weights!r} for {arch}{did_you_mean(weights, tags)}; tags: "
                     f"{', '.join(tags)} (or 'default')")
