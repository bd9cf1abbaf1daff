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


__all__ = ["Model", "BUILDERS", "build"] + list(BUILDERS)
