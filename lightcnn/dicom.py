"""DICOM files and CT windows: stored pixels -> Hounsfield units -> a window -> 8-bit grey.

    DICOM bytes --pydicom (one frame only)--> stored values s (H, W)
      │ modality rescale     HU = s * RescaleSlope + RescaleIntercept    (slope 1, intercept 0 when absent)
      ▼
    HU (H, W) float64
      │ window (center c, width w), DICOM PS3.3 C.11.2.1.2.1 "LINEAR":
      │   y = 0                                     if HU <= c - 0.5 - (w - 1) / 2
      │   y = 255                                   if HU >  c - 0.5 + (w - 1) / 2
      │   y = ((HU - (c - 0.5)) / (w - 1) + 0.5) * 255   otherwise
      ▼
    y rounded to uint8; MONOCHROME1 (white = low values) is inverted, 255 - y, so air is always dark

Windows (`Preprocessing.window`, `--window`):
    "lung"         W 1500 / L -600
    "mediastinum"  W 350  / L 50
    "bone"         W 2000 / L 500
    "auto"         the file's own first WindowCenter / WindowWidth (min-max of the frame when it has none)
    (C, W)         any center and width >= 1, in HU
    None           as "auto" for DICOM; 16-bit PNG/TIFF keep the min-max stretch of lightcnn.preprocess

A 16-bit PNG/TIFF export of a CT slice has no rescale tags; `hu_offset` gives its scaling (HU = pixel +
offset, e.g. -1024), and only then does a window apply to it. 8-bit images are already windowed and pass
through unchanged.

pydicom is an optional extra (`pip install "lightcnn[dicom]"`) and is imported only when a DICOM file is read.
Compressed transfer syntaxes other than RLE (and JPEG / JPEG 2000 where Pillow can decode them) need
pydicom's pylibjpeg plugins (`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`).
Nothing here prints or returns a patient attribute: errors name the file only.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings

import numpy as np

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (500.0, 2000.0)}
WINDOW_NAMES = (*WINDOWS, "auto")
INSTALL_HINT = 'DICOM input needs pydicom: pip install "lightcnn[dicom]"'
DICOM_MAGIC_OFFSET = 128
# Decoded samples of one frame (rows * columns * samples per pixel) are capped by the caller's max_pixels; the
# frame count is capped too, so a header cannot make a reader walk millions of empty frames.
MAX_FRAMES = 10_000


def parse_window(value):
    """None, a name in WINDOW_NAMES, "C,W", or a (center, width) pair -> None, the name, or (c, w) floats.

    Raises ValueError with a one-line message otherwise (width must be >= 1, as DICOM requires).
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in WINDOW_NAMES:
            return text
        parts = text.split(",")
        if len(parts) != 2:
            raise ValueError(f"window: expected one of {', '.join(WINDOW_NAMES)} or CENTER,WIDTH, got {value!r}")
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"window: CENTER,WIDTH must be two numbers, got {value!r}") from None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise ValueError(f"window: center and width must be finite numbers, got {value!r}")
        center, width = float(value[0]), float(value[1])
        if width < 1:
            raise ValueError(f"window: width must be >= 1, got {width:g}")
        return center, width
    raise ValueError(f"window: expected one of {', '.join(WINDOW_NAMES)} or CENTER,WIDTH, got {value!r}")


def window_to_unit(hu, center, width):
    """DICOM linear VOI window of `hu` (any shape, float) onto [0, 1] (see the module docstring)."""
    hu = np.asarray(hu, dtype=np.float64)
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if width <= 1:  # a 1-wide window is a threshold
        return np.where(hu > lo, 1.0, 0.0)
    y = (hu - (center - 0.5)) / (width - 1) + 0.5
    return np.where(hu <= lo, 0.0, np.where(hu > hi, 1.0, np.clip(y, 0.0, 1.0)))


def minmax_to_unit(values):
    """Finite values stretched to [0, 1]; NaN/-inf -> 0, +inf -> 1; a constant image -> 0."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    out = np.zeros(arr.shape, dtype=np.float64)
    if finite.any():
        lo, hi = arr[finite].min(), arr[finite].max()
        if hi > lo:
            out[finite] = (arr[finite] - lo) / (hi - lo)
    out[np.isposinf(arr)] = 1.0
    return out


def hu_to_uint8(hu, window, file_window=None, invert=False):
    """HU (H, W) -> uint8 (H, W) through `window` (None/"auto" -> file_window, else min-max)."""
    window = parse_window(window)
    if window in (None, "auto"):
        window = file_window
    elif isinstance(window, str):
        window = WINDOWS[window]
    unit = minmax_to_unit(hu) if window is None else window_to_unit(hu, *window)
    out = np.rint(unit * 255.0).astype(np.uint8)
    return 255 - out if invert else out


def has_dicom_magic(data):
    """True when bytes carry the DICOM file preamble's magic: b"DICM" at offset 128."""
    return bytes(data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4]) == b"DICM"


def looks_like_dicom(path):
    """A regular file named *.dcm, or any regular file with the DICM magic (extension-less series files)."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO or device: it could block
            return False
        if os.path.splitext(path)[1].lower() == ".dcm":
            return True
        with open(path, "rb") as f:
            return has_dicom_magic(f.read(DICOM_MAGIC_OFFSET + 4))
    except OSError:
        return False


def _pydicom(error_type, name):
    try:
        import pydicom
    except ImportError:
        raise error_type(f"{name}: {INSTALL_HINT}") from None
    return pydicom


def _first(value):
    """First value of a possibly multi-valued DICOM element as float, or None."""
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else None
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _read_dataset(data, name, error_type):
    pydicom = _pydicom(error_type, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about non-conformant headers; the file still reads
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ds.PixelData  # noqa: B018  (raises when there is no pixel data)
        except AttributeError:
            raise error_type(f"{name}: DICOM file without pixel data") from None
        except Exception as exc:  # pydicom raises many types for a corrupt file; none of them is ours to show
            raise error_type(f"{name}: cannot read DICOM, file is truncated or corrupt ({type(exc).__name__})") \
                from None
    return ds


def _int(ds, keyword, default=None):
    value = ds.get(keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def dicom_info(data, name, error_type):
    """(rows, columns, frames, samples per pixel) from the header of DICOM bytes."""
    ds = _read_dataset(data, name, error_type)
    return _geometry(ds, name, error_type)


def _geometry(ds, name, error_type):
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames, samples = _int(ds, "NumberOfFrames", 1) or 1, _int(ds, "SamplesPerPixel", 1) or 1
    if rows <= 0 or cols <= 0:
        raise error_type(f"{name}: DICOM image has no Rows/Columns")
    if not 1 <= frames <= MAX_FRAMES:
        raise error_type(f"{name}: DICOM NumberOfFrames {frames} is outside 1..{MAX_FRAMES}")
    if samples not in (1, 3):
        raise error_type(f"{name}: DICOM SamplesPerPixel {samples} is not 1 or 3")
    return rows, cols, frames, samples


def dicom_frame_count(data, name, error_type):
    return dicom_info(data, name, error_type)[2]


def read_dicom(data, name, error_type, *, frame=0, window=None, check_extent=None, max_pixels=None,
               return_hu=False):
    """One frame of DICOM bytes -> ("L" or "RGB" uint8 array (H, W[, 3]), or the HU array when return_hu).

    frame         0-based frame index (error naming the file when out of range)
    window        see the module docstring; ignored for colour images (RGB, YBR, palette: shown as stored)
    check_extent  callable(width, height, name) run before decoding (lightcnn.preprocess's size guards)
    """
    ds = _read_dataset(data, name, error_type)
    rows, cols, frames, samples = _geometry(ds, name, error_type)
    if check_extent is not None:
        check_extent(cols, rows, name)
    if max_pixels is not None and rows * cols > max_pixels:
        raise error_type(f"{name}: {cols}x{rows} = {rows * cols} pixels exceeds max_pixels={max_pixels} "
                         "(possible decompression bomb)")
    if not 0 <= frame < frames:
        raise error_type(f"{name}: frame {frame + 1} requested, the file has {frames} frame(s)")
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = pixel_array(ds, index=frame if frames > 1 else None)
        except (NotImplementedError, RuntimeError) as exc:
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            label = getattr(syntax, "name", None) or "this transfer syntax"
            if "plugin" in str(exc).lower() or "decoder" in str(exc).lower() or "handler" in str(exc).lower():
                raise error_type(f"{name}: no decoder for {label}; compressed DICOM needs pylibjpeg: "
                                 "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg") from None
            raise error_type(f"{name}: cannot decode DICOM pixel data ({type(exc).__name__})") from None
        except Exception as exc:
            raise error_type(f"{name}: cannot decode DICOM pixel data, file is truncated or corrupt "
                             f"({type(exc).__name__})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples == 3 or photometric == "PALETTE COLOR" or arr.ndim == 3:
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit colour: scale by the stored range
            top = float(2 ** (_int(ds, "BitsStored", 16) or 16) - 1)
            arr = np.rint(np.clip(arr.astype(np.float64) / top, 0, 1) * 255).astype(np.uint8)
        if return_hu:
            raise error_type(f"{name}: colour DICOM has no Hounsfield units")
        return np.ascontiguousarray(arr), "RGB"
    slope = _first(ds.get("RescaleSlope"))
    intercept = _first(ds.get("RescaleIntercept"))
    hu = arr.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    if return_hu:
        return hu
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    file_window = (center, width) if center is not None and width is not None and width >= 1 else None
    return hu_to_uint8(hu, window, file_window, invert=photometric == "MONOCHROME1"), "L"


__all__ = ["WINDOWS", "WINDOW_NAMES", "INSTALL_HINT", "parse_window", "window_to_unit", "minmax_to_unit",
           "hu_to_uint8", "has_dicom_magic", "looks_like_dicom", "read_dicom", "dicom_frame_count", "dicom_info"]
