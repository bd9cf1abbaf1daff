"""Search spaces: real, integer and categorical dimensions, all mapped to the unit cube.

The Gaussian process never sees raw hyperparameters. Every point is encoded as a
*feature vector* in ``[0, 1]^D``:

=====================  ==============================================  =====
dimension              encoding u(v)                                   width
=====================  ==============================================  =====
Real(a, b)             (v - a) / (b - a)                               1
Real(a, b, log=True)   (ln v - ln a) / (ln b - ln a)                   1
Integer(a, b[, log])   as Real, on the integer value                   1
Categorical(c_1..c_k)  one-hot: e_i for choice c_i                     k
=====================  ==============================================  =====

Decoding is the inverse followed by rounding (integers) or argmax (categories).
``snap(u) = encode(decode(u))`` maps any point of the cube onto the nearest point
that can actually be evaluated; the optimiser applies it before every kernel
evaluation, so the GP is a function of what will really be run (integers
"rounded inside the kernel input", Garrido-Merchán & Hernández-Lobato 2020).

Sampling (initial designs, random candidates) goes through one number ``q`` in
``[0, 1)`` per *dimension* (not per feature), so a Sobol or Latin-hypercube
design in ``d`` dimensions stays balanced even when a categorical takes several
feature columns: integers get equal-width bins of ``q``, categories ``floor(q k)``.

``describe_space`` parses the compact text form a command line uses.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["Real", "Integer", "Categorical", "Space", "describe_space"]


class Dimension:
    """Base class: one hyperparameter with a unit-cube encoding of ``width`` features."""

    width = 1
    name: str | None = None

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        """values (n,) → features (n, width) in [0, 1]."""
        raise NotImplementedError

    def decode(self, features: np.ndarray) -> list:
        """features (n, width) → list of n valid values (rounded / argmax)."""
        raise NotImplementedError

    def from_quantile(self, q: np.ndarray) -> list:
        """q (n,) uniform in [0, 1) → list of n valid values (for designs and random search)."""
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        raise NotImplementedError


class _Interval(Dimension):
    """Shared logic of Real and Integer: an interval [low, high] on a linear or log scale."""

    def __init__(self, low: float, high: float, log: bool = False, name: str | None = None) -> None:
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{type(self).__name__}: bounds must be finite, got low={low}, high={high}")
        if not low < high:
            raise ValueError(f"{type(self).__name__}: need low < high, got low={low}, high={high}")
        if log and low <= 0:
            raise ValueError(f"{type(self).__name__}: a log scale needs low > 0, got low={low}")
        self.low, self.high, self.log, self.name = low, high, bool(log), name
        # Work on ln v for log scales: equal steps in u are equal ratios in v.
        self._a = math.log(low) if log else float(low)
        self._b = math.log(high) if log else float(high)

    def _to_unit(self, v):
        v = np.asarray(v, dtype=np.float64)
        t = np.log(v) if self.log else v
        return (t - self._a) / (self._b - self._a)

    def _from_unit(self, u):
        t = self._a + np.clip(u, 0.0, 1.0) * (self._b - self._a)
        return np.exp(t) if self.log else t

    def encode(self, values):
        return self._to_unit(values).reshape(-1, 1)

    def contains(self, value):
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        return self.low <= v <= self.high

    def to_dict(self):
        return {"type": type(self).__name__, "name": self.name, "low": self.low, "high": self.high, "log": self.log}

    def __repr__(self):
        log = ", log=True" if self.log else ""
        name = f", name={self.name!r}" if self.name else ""
        return f"{type(self).__name__}({self.low!r}, {self.high!r}{log}{name})"


class Real(_Interval):
    """A real number in [low, high]; ``log=True`` searches ln v uniformly (learning rates, decays)."""

    def __init__(self, low: float, high: float, log: bool = False, name: str | None = None) -> None:
        super().__init__(float(low), float(high), log, name)

    def decode(self, features):
        v = self._from_unit(np.asarray(features, dtype=np.float64)[:, 0])
        # exp(ln(high)) can overshoot high by one ulp: clip so decode(encode(v)) stays inside.
        return [float(x) for x in np.clip(v, self.low, self.high)]

    def from_quantile(self, q):
        return self.decode(np.asarray(q, dtype=np.float64).reshape(-1, 1))


class Integer(_Interval):
    """An integer in [low, high] (both included); ``log=True`` for sizes spanning decades."""

    def __init__(self, low: int, high: int, log: bool = False, name: str | None = None) -> None:
        if int(low) != low or int(high) != high:
            raise ValueError(f"Integer: bounds must be integers, got low={low}, high={high}")
        super().__init__(int(low), int(high), log, name)

    def decode(self, features):
        v = np.rint(self._from_unit(np.asarray(features, dtype=np.float64)[:, 0]))
        return [int(x) for x in np.clip(v, self.low, self.high)]

    def from_quantile(self, q):
        q = np.clip(np.asarray(q, dtype=np.float64), 0.0, np.nextafter(1.0, 0.0))
        if self.log:
            # Equal-ratio bins: round a log-uniform draw in [low - 1/2, high + 1/2].
            a, b = math.log(self.low - 0.5), math.log(self.high + 0.5)
            v = np.rint(np.exp(a + q * (b - a)))
        else:
            # Equal-width bins: each of the (high - low + 1) integers gets probability 1/count.
            v = self.low + np.floor(q * (self.high - self.low + 1))
        return [int(x) for x in np.clip(v, self.low, self.high)]

    def contains(self, value):
        return super().contains(value) and float(value) == int(float(value))


class Categorical(Dimension):
    """One of a list of choices, encoded one-hot so no artificial order is imposed."""

    def __init__(self, choices: Sequence[Any], name: str | None = None) -> None:
        choices = list(choices)
        if len(choices) < 2:
            raise ValueError(f"Categorical: need at least 2 choices, got {choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"Categorical: choices must be distinct, got {choices!r}")
        self.choices, self.name, self.width = choices, name, len(choices)

    def index(self, value):
        for i, c in enumerate(self.choices):
            # True == 1 in Python; keep booleans and numbers apart.
            if isinstance(c, bool) == isinstance(value, bool) and c == value:
                return i
        raise ValueError(f"Categorical{'' if self.name is None else ' ' + repr(self.name)}: "
                         f"{value!r} is not one of {self.choices!r}")

    def encode(self, values):
        idx = [self.index(v) for v in values]
        out = np.zeros((len(idx), self.width))
        out[np.arange(len(idx)), idx] = 1.0
        return out

    def decode(self, features):
        return [self.choices[i] for i in np.argmax(np.asarray(features), axis=1)]

    def from_quantile(self, q):
        i = np.minimum((np.asarray(q, dtype=np.float64) * self.width).astype(int), self.width - 1)
        return [self.choices[j] for j in i]

    def contains(self, value):
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def to_dict(self):
        return {"type": "Categorical", "name": self.name, "choices": list(self.choices)}

    def __repr__(self):
        name = f", name={self.name!r}" if self.name else ""
        return f"Categorical({self.choices!r}{name})"


class Space:
    """An ordered list of dimensions; points are lists of values, one per dimension.

    ``encode`` maps points (n points) → features (n, D) with ``D = sum(width)``;
    ``decode`` maps back, rounding; ``snap = encode ∘ decode``. ``continuous`` is the
    boolean mask (D,) of feature columns that belong to Real dimensions — the only
    columns a gradient-based acquisition optimiser may move.
    """

    dimensions: list[Dimension]

    def __init__(self, dimensions: Sequence[Dimension] | Space) -> None:
        dimensions = list(dimensions.dimensions if isinstance(dimensions, Space) else dimensions)
        if not dimensions:
            raise ValueError("Space: need at least one dimension")
        for i, d in enumerate(dimensions):
            if not isinstance(d, Dimension):
                raise TypeError(f"Space: dimension {i} is {d!r}; use Real, Integer or Categorical")
        self.dimensions = dimensions
        self.names = [d.name if d.name is not None else f"x{i}" for i, d in enumerate(dimensions)]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"Space: dimension names must be distinct, got {self.names}")
        bounds = np.cumsum([0] + [d.width for d in dimensions])
        self._slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.n_features = int(bounds[-1])
        self.continuous = np.concatenate([np.full(d.width, isinstance(d, Real)) for d in dimensions])

    def __len__(self):
        return len(self.dimensions)

    def validate(self, point):
        """Raise ValueError naming the dimension when ``point`` is not a valid point."""
        if len(point) != len(self.dimensions):
            raise ValueError(f"point has {len(point)} values, space has {len(self.dimensions)} dimensions")
        for name, d, v in zip(self.names, self.dimensions, point):
            if not d.contains(v):
                raise ValueError(f"value {v!r} of dimension {name!r} is outside {d!r}")

    def encode(self, points):
        """points: list of n points → features (n, D)."""
        points = list(points)
        out = np.empty((len(points), self.n_features))
        for j, (d, s) in enumerate(zip(self.dimensions, self._slices)):
            out[:, s] = d.encode([p[j] for p in points])
        return out

    def decode(self, features):
        """features (n, D) → list of n points (rounded to valid values)."""
        features = np.atleast_2d(features)
        cols = [d.decode(features[:, s]) for d, s in zip(self.dimensions, self._slices)]
        return [list(p) for p in zip(*cols)]

    def snap(self, features):
        """features (n, D) → nearest evaluable features (n, D): encode(decode(features))."""
        return self.encode(self.decode(features))

    def from_quantiles(self, q):
        """q (n, d) in [0, 1)^d, one column per dimension → list of n points."""
        q = np.atleast_2d(q)
        cols = [d.from_quantile(q[:, j]) for j, d in enumerate(self.dimensions)]
        return [list(p) for p in zip(*cols)]

    def sample(self, n, rng):
        """n uniformly random points, drawn with the np.random.Generator ``rng``."""
        return self.from_quantiles(rng.random((n, len(self.dimensions))))

    def to_dicts(self):
        return [dict(d.to_dict(), name=n) for d, n in zip(self.dimensions, self.names)]

    def __repr__(self):
        return f"Space({self.dimensions!r})"


def _number(text, where):
    try:
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None


def describe_space(text: str) -> tuple[list[str], list[Dimension]]:
    """Parse ``"lr=1e-5:1e-1:log, momentum=0.5:0.99, batch=16|32|64|100"`` → (names, dimensions).

    Grammar, one entry per comma:

    - ``name=low:high`` or ``name=low:high:log`` (``:lin`` is the default) — an
      Integer when both bounds are written as integers (``16:256``), else a Real
      (write ``0.0:1.0`` for a real unit interval);
    - ``name=a|b|c`` — a Categorical; choices are ints, floats or strings.

    Raises ValueError naming the entry on any mistake.
    """
    names: list[str] = []
    dims: list[Dimension] = []
    entries = [e.strip() for e in text.split(",")]
    if not any(entries):
        raise ValueError("describe_space: empty description; expected e.g. 'lr=1e-5:1e-1:log, batch=16|32'")
    for entry in entries:
        where = f"describe_space entry {entry!r}"
        if not entry:
            raise ValueError(f"describe_space: empty entry in {text!r} (stray comma?)")
        name, eq, spec = (s.strip() for s in entry.partition("="))
        if not eq or not name or not spec:
            raise ValueError(f"{where}: expected name=low:high[:log] or name=a|b|c")
        if not name.isidentifier():
            raise ValueError(f"{where}: name {name!r} is not a valid identifier")
        if name in names:
            raise ValueError(f"{where}: duplicate name {name!r}")
        if "|" in spec:
            choices = [c.strip() for c in spec.split("|")]
            if not all(choices):
                raise ValueError(f"{where}: empty choice")
            try:
                values = [_number(c, where) for c in choices]
            except ValueError:
                values = choices  # strings, e.g. optimizer=sgd|adam
            dims.append(Categorical(values, name=name))
        elif ":" in spec:
            parts = [p.strip() for p in spec.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError(f"{where}: expected low:high or low:high:log")
            scale = parts[2].lower() if len(parts) == 3 else "lin"
            if scale not in ("lin", "log"):
                raise ValueError(f"{where}: scale must be 'lin' or 'log', got {parts[2]!r}")
            low, high = _number(parts[0], where), _number(parts[1], where)
            cls = Integer if isinstance(low, int) and isinstance(high, int) else Real
            try:
                dims.append(cls(low, high, log=scale == "log", name=name))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        else:
            raise ValueError(f"{where}: expected a range low:high[:log] or choices a|b|c")
        names.append(name)
    return names, dims
