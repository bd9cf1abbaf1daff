"""Fake quantisation: round a float tensor to an 8-bit runtime's grid (see lightcnn.quantsim for why).

    fq(y) = (clip(rint(y / scale), q_min - zero_point, q_max - zero_point)) * scale

computed in float32 as y * (1/scale), rounded half to even (NumPy's rint; the integer runtime rounds
half away from zero, which flips an occasional value by one step), clipped, scaled back.
Plain NumPy, memory-bound: four passes over y. Shapes: y (...) -> (...).
"""

import numpy as np


def fake_quant(y, scale, zero_point, qmin, qmax, out=None):
    """Round y to the grid scale * (q - zero_point), q integer in [qmin, qmax]; into `out` (may be y) or a new array."""
    scale = np.float32(scale)
    q = np.multiply(y, np.float32(1.0) / scale, dtype=np.float32, out=out)
    np.rint(q, out=q)
    np.clip(q, qmin - zero_point, qmax - zero_point, out=q)
    q *= scale
    return q
