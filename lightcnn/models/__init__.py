"""Architectures as tables plus one builder each. No file I/O here."""

from lightcnn.models.base import Model
from lightcnn.models.mobilenet_v2 import mobilenet_v2, mobilenet_v2_dense
from lightcnn.models.mobilenet_v3 import mobilenet_v3_large, mobilenet_v3_small
from lightcnn.models.squeezenet import covid_squeezenet, squeezenet1_0, squeezenet1_1

BUILDERS = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_dense": mobilenet_v2_dense,
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "squeezenet1_0": squeezenet1_0,
    "squeezenet1_1": squeezenet1_1,
    "covid_squeezenet": covid_squeezenet,
}


def build(arch, **config):
    """Build an architecture by name with its config (as stored in a checkpoint)."""
    if arch not in BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[arch](**config)




# -- what a stored config may hold ---------------------------------------------------------------------------------
#: bounds on what a config (a checkpoint's `config` attribute) may ask a builder for: enough for any real model,
#: small enough that no file can make a builder allocate gigabytes or loop for minutes
MAX_CLASSES = 100_000
MAX_WIDTH = 100_000
MAX_HIDDEN_LAYERS = 64


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _choice(*choices):
    # type and value: True == 1 in Python, but in_channels=True must not pass for 1
    return (lambda v: any(type(v) is type(c) and v == c for c in choices)), \
        f"one of {', '.join(repr(c) for c in choices)}"


def _int_in(lo, hi):
    return (lambda v: _is_int(v) and lo <= v <= hi), f"an int in [{lo}, {hi}]"


def _real_in(lo, hi, lo_open=False, hi_open=False):
    def ok(v):
        return _is_real(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return ok, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _head_ok(v):
    if v in ("linear", "dense"):
        return True
    if not isinstance(v, dict) or not set(v) <= {"hidden", "dropout", "hidden_dropout"}:
        return False
    hidden = v.get("hidden", [])
    return (isinstance(hidden, list) and len(hidden) <= MAX_HIDDEN_LAYERS
            and all(_is_int(u) and 1 <= u <= MAX_WIDTH for u in hidden)
            and all(_is_real(v.get(k, 0.0)) and 0.0 <= v.get(k, 0.0) < 1.0 for k in ("dropout", "hidden_dropout")))


_ACTIVATIONS = ("relu", "relu6", "elu", "hard_swish")
#: per builder keyword: (check, what it must be); every builder keyword must have a rule (tests check this)
CONFIG_RULES = {
    "num_classes": _int_in(1, MAX_CLASSES),
    "width_mult": _real_in(0.0, 10.0, lo_open=True),
    "activation": _choice(*_ACTIVATIONS),
    "padding": _choice("torch", "tf"),
    "bn": _choice(True, False),
    "bn_eps": _real_in(0.0, 1.0, lo_open=True),
    "dropout": _real_in(0.0, 1.0, hi_open=True),
    "in_channels": _choice(1, 3),
    "head": (_head_ok, "'linear', 'dense' or a fine-tuned head {hidden: [widths <= 100000], dropout, "
                       "hidden_dropout in [0, 1)}"),
    "seed": _int_in(0, 2**63 - 1),
    "variant": _choice("torchvision", "caffe"),
    "fire": _choice("classic", "bn_elu"),
    "bypass": _choice(None, "simple"),
}


def builder_keywords(arch):
    """The keyword arguments BUILDERS[arch] accepts (following **kwargs into the builder it forwards to)."""
    import inspect

    params = inspect.signature(BUILDERS[arch]).parameters
    names = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()) and arch == "mobilenet_v2_dense":
        names += [n for n in builder_keywords("mobilenet_v2") if n not in names]
    return names


def check_config(arch, config):
    """Refuse (ValueError, one line naming the key) a config no builder of `arch` should be given.

    The architecture must be known, `config` a dict whose keys are keywords of BUILDERS[arch] (see
    builder_keywords), or "head" holding a fine-tuned head (Model.reset_head), and whose values pass CONFIG_RULES: types, choices and bounds (num_classes and layer
    widths <= 100000, width_mult in (0, 10], dropout in [0, 1), ...). A fine-tuned `head` dict needs
    num_classes.
    """
    if not isinstance(arch, str) or arch not in BUILDERS:
        from lightcnn.errors import did_you_mean

        raise ValueError(f"unknown architecture {arch!r}{did_you_mean(arch, BUILDERS)}; known: "
                         f"{', '.join(sorted(BUILDERS))}")
    if not isinstance(config, dict):
        raise ValueError(f"config must be a JSON object, got {type(config).__name__}")
    allowed = builder_keywords(arch)
    for key, value in config.items():
        if key == "head" and key not in allowed and not isinstance(value, dict):
            raise ValueError(f"config 'head' of {arch} must be a fine-tuned head (an object), got {value!r}"[:200])
        if key not in allowed and key != "head":  # every model may carry a fine-tuned head (Model.reset_head)
            raise ValueError(f"config key {key!r} is not an option of {arch} (options: {', '.join(allowed)})")
        ok, what = CONFIG_RULES[key]
        if not ok(value):
            shown = repr(value)
            raise ValueError(f"config {key!r} must be {what}, got {shown[:80] + '...' if len(shown) > 80 else shown}")
    if isinstance(config.get("head"), dict) and "num_classes" not in config:
        raise ValueError("config has a fine-tuned head but no num_classes")
__all__ = ["Model", "BUILDERS", "CONFIG_RULES", "build", "builder_keywords", "check_config"] + list(BUILDERS)
