"""JSON Lines trial log: a header line with the optimiser settings, then one line per finished trial.

::

    {"format": "lightcnn.tune.log/1", "settings": {"seed": 0, "space": [...], "n_initial": 10, ...}}
    {"trial": 0, "x": [0.0031, 0.93, 32], "y": 0.4132, "seconds": 12.3}
    {"trial": 1, "x": [0.0802, 0.61, 64], "y": "nan", "seconds": 0.4}      <- a failed trial
    {"trial": 2, "x": [...], "y": -0.71, "seconds": 9.1, "curve": [0.62, 0.71], "stopped": 2}   <- more fields

Fields beyond trial/x/y/seconds are the caller's (lightcnn.tune's CLI logs each trial's validation curve and
where the median rule stopped it); ``extras`` reads them back.

Non-finite values are written as the strings "nan", "inf", "-inf" (JSON has no NaN).
Floats are written with ``repr`` precision, so x and y read back bit-identical, and the
optimiser replays exactly the state it had.

Crash safety: every record is one ``write`` of a complete line, then ``flush`` and
``os.fsync``, in append mode. A crash can therefore only leave an incomplete *last* line;
reading reports it (file:line) as a warning and the next append cuts it off. A bad line
anywhere else means the file was edited or damaged, and reading stops with TuneLogError.
"""

import json
import math
import os
import warnings

from lightcnn.errors import LightCNNError

__all__ = ["TrialLog", "TuneLogError", "FORMAT"]

FORMAT = "lightcnn.tune.log/1"


class TuneLogError(LightCNNError, ValueError):
    """A trial log is malformed or belongs to a different tuning setup."""


def _encode_y(y):
    y = float(y)
    return y if math.isfinite(y) else repr(y)  # 'nan', 'inf', '-inf'


def _decode_y(v, where):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if v in ("nan", "inf", "-inf"):
        return float(v)
    raise TuneLogError(f"{where}: 'y' must be a number or 'nan'/'inf'/'-inf', got {v!r}")


class TrialLog:
    """Append-only trial log at ``path``; ``read`` returns (settings, trials) of an existing one."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._valid_bytes = None  # set by read(): where the last complete record ends

    def exists(self):
        return os.path.exists(self.path)

    def read(self):
        """(settings dict, list of (x list, y float, seconds float)); TuneLogError on damage."""
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the file ends with a newline, as every complete record does
        records, offset, self._valid_bytes = [], 0, 0
        for lineno, raw in enumerate(lines, start=1):
            where = f"{self.path}:{lineno}"
            try:
                records.append((where, json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if lineno == len(lines) and lineno > 1:
                    warnings.warn(f"{where}: ignoring incomplete last record (interrupted write?): {e}",
                                  RuntimeWarning, stacklevel=2)
                    break
                raise TuneLogError(f"{where}: not a valid JSON record: {e}") from None
            offset += len(raw) + 1
            self._valid_bytes = min(offset, len(data))
        if not records:
            raise TuneLogError(f"{self.path}: empty trial log (no header line)")
        where, header = records[0]
        if not isinstance(header, dict) or header.get("format") != FORMAT or "settings" not in header:
            raise TuneLogError(f"{where}: expected a header with format {FORMAT!r}, got {str(header)[:80]}")
        trials = []
        for where, rec in records[1:]:
            if not isinstance(rec, dict) or not {"trial", "x", "y"} <= rec.keys():
                raise TuneLogError(f"{where}: a trial record needs 'trial', 'x' and 'y'")
            if rec["trial"] != len(trials):
                raise TuneLogError(f"{where}: expected trial {len(trials)}, found {rec['trial']!r}")
            if not isinstance(rec["x"], list):
                raise TuneLogError(f"{where}: 'x' must be a list, got {rec['x']!r}")
            trials.append((rec["x"], _decode_y(rec["y"], where), float(rec.get("seconds", 0.0))))
        return header["settings"], trials

    def extras(self):
        """Per logged trial, the dict of its fields beyond trial/x/y/seconds (same damage rules as read)."""
        self.read()
        out = []
        with open(self.path, "rb") as f:
            lines = f.read()[:self._valid_bytes].split(b"\n")[1:]
        for raw in lines:
            if raw.strip():
                rec = json.loads(raw.decode("utf-8"))
                out.append({k: v for k, v in rec.items() if k not in ("trial", "x", "y", "seconds")})
        return out

    def create(self, settings):
        """Start a new log with its header; refuses to overwrite an existing file."""
        with open(self.path, "x", encoding="utf-8") as f:
            self._write(f, {"format": FORMAT, "settings": settings})
        self._valid_bytes = None

    def append(self, index, x, y, seconds, extra=None):
        """Add one finished trial: one line, flushed and fsynced before returning; `extra` adds fields."""
        if self._valid_bytes is not None and os.path.getsize(self.path) > self._valid_bytes:
            with open(self.path, "r+b") as f:  # drop the incomplete record a crash left behind
                f.truncate(self._valid_bytes)
        self._valid_bytes = None
        complete = True
        with open(self.path, "rb") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                complete = f.read(1) == b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if not complete:  # last record was whole but its newline was lost: finish the line
                f.write("\n")
            record = {"trial": index, "x": list(x), "y": _encode_y(y), "seconds": round(seconds, 6)}
            self._write(f, {**record, **{k: v for k, v in (extra or {}).items() if k not in record}})

    @staticmethod
    def _write(f, record):
        # allow_nan=False: a NaN hidden inside x would otherwise produce non-standard JSON.
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
