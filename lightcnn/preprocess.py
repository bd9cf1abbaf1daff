"""Image files -> NHWC float32 batches, the way each weight family was trained.

The pipeline, one direction only::

    file / bytes / stream
      │ load_image            decode by content, EXIF orientation, frame 0, mode -> "RGB" or "L"
      ▼
    PIL image (W x H), uint8 "RGB" or "L"
      │ preprocess_uint8      channel order (RGB / BGR / L), then resize + centre crop (Pillow)
      ▼
    pixels (H, W, C) uint8    H = W = spec.size; C = 3 (RGB/BGR) or 1 (L)
      │ normalise_pixels      x * input_range / 255  ->  optional 3x3 Gaussian blur  ->  (x - mean) / std
      ▼
    x (H, W, C) float32       preprocess_image; preprocess_batch stacks N of them -> (N, H, W, C)

Every choice that changes numbers lives in one frozen `Preprocessing` record, which is stored with the
weights (`to_dict` / `from_dict`), so `predict` never hard-codes a mean or a crop. The presets reproduce the
evaluation pipelines of the families in ../shared/weights:

  TORCHVISION    shorter side -> 256, centre crop 224, x/255, ImageNet mean/std            (torchvision)
  TF_SLIM        central 87.5 % crop, resize 224, (x - 128)/128 = the uint8 input's (q-128)/128 (Coral/TFLite)
  KERAS          shorter side -> 256, centre crop 224, x/127.5 - 1                         (keras.applications)
  CAFFE          256 x 256, centre 227, BGR, x - (104, 117, 123)                           (SqueezeNet v1.0)
  GRAYSCALE_227  stretch to 227 x 227, one channel, (x/255 - 0.5)/0.5                      (seed 001 light net)

Decisions a reader should know about (each is also said where it is made):

* Resizing is Pillow's, on uint8 images. Pillow widens the filter when it downsamples (antialiasing), which is
  what torchvision's PIL path does, so TORCHVISION matches torchvision exactly for PIL inputs. TensorFlow's own
  `resize_bilinear` does not antialias; the TFLite reference tensor in shared/data was made with Pillow, and
  TF_SLIM reproduces it exactly (tests/test_preprocess.py).
* Crop boxes are rounded the way each family's reference code rounds them:
  "shorter" -> torchvision `int(round((H - size) / 2))` (Python rounds halves to even);
  "square"  -> Caffe's integer division `(H - size) // 2`;
  "central_fraction" -> TF `central_crop`: `start = int((H - H * f) / 2)`, `extent = H - 2 * start`
  (gives the box (32, 21, 480, 320) for the 512 x 341 cat.bmp).
* Alpha is composited on black (RGBA, LA, P with transparency): transparent pixels become 0. For CT and
  X-ray figures black is the background (air), and for photos an opaque image is unchanged.
* 16-bit, 32-bit integer and float images ("I;16*", "I", "F") are windowed min-max: the smallest finite value
  maps to 0 and the largest to 255, linearly, rounded to uint8. Nothing is clipped, so a 16-bit CT slice whose
  values sit in 1000..1100 keeps its contrast instead of saturating at 255 (what `Image.convert("L")` does).
  NaN -> 0, -inf -> 0, +inf -> 255; an image with a single value becomes all 0.
* RGB -> "L" uses Pillow's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B); "L" -> RGB/BGR repeats the plane.
* mean and std are given in the *output* channel order (CAFFE's (104, 117, 123) is B, G, R) and in the units of
  [0, input_range].

This module does not augment (random crops and flips belong to training code); the fixed views of test-time
augmentation's ten-crop are cut here (`ten_crop_uint8`, same geometry code as the plain path) and averaged in
lightcnn.tta. It never changes Pillow's global settings: truncated files are found by a full decode, not by
`ImageFile.LOAD_TRUNCATED_IMAGES`.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lightcnn._files import printable, read_regular_file
from lightcnn.dicom import has_dicom_magic, hu_to_uint8, parse_window, read_dicom
from lightcnn.errors import ImageError

__all__ = [
    "Preprocessing",
    "TORCHVISION",
    "TF_SLIM",
    "KERAS",
    "CAFFE",
    "GRAYSCALE_227",
    "PRESETS",
    "DEFAULT_MAX_PIXELS",
    "MAX_IMAGE_BYTES",
    "MAX_SIDE",
    "MAX_ASPECT",
    "load_image",
    "preprocess_uint8",
    "normalise_pixels",
    "preprocess_image",
    "preprocess_batch",
    "ten_crop_uint8",
    "ten_crop_resize",
    "five_crop_boxes",
    "gaussian_blur_3x3",
    "gaussian_kernel_1d",
    "central_fraction_box",
    "centre_crop_box",
    "shorter_side_size",
]

# Pillow's own default decompression-bomb threshold (~89.5 Mpx, 0.25 GiB as RGB). Our check uses this number
# explicitly so that a program that changes Image.MAX_IMAGE_PIXELS does not silently change ours.
DEFAULT_MAX_PIXELS = 89_478_485
# Always enforced, whatever max_pixels says: at most this many bytes are read from a file, stream or stdin before
# decoding (a file that is larger is refused from its size, unread); no side may exceed JPEG's own limit; and the
# longer side may be at most MAX_ASPECT times the shorter, because resizing the shorter side of a 1 x 20000
# strip to 256 would make a 256 x 5,120,000 image (3.9 GB as RGB).
MAX_IMAGE_BYTES = 256 << 20
MAX_SIDE = 65_500
MAX_ASPECT = 200

RESIZE_MODES = ("shorter", "square", "central_fraction", "stretch")
CHANNEL_ORDERS = ("RGB", "BGR", "L")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
INTERPOLATIONS = tuple(_RESAMPLE)

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Modes Pillow converts to RGB correctly without colour management. (LAB and HSV are left out on purpose:
# a plain convert() would not give the colours a viewer shows.)
_PLAIN_TO_RGB_MODES = ("RGBX", "CMYK", "YCbCr")


# ---------------------------------------------------------------------------------------------------------------
# The preprocessing record
# ---------------------------------------------------------------------------------------------------------------


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a decoded image into a network input; JSON-able, stored with the weights.

    size           output height = width, pixels
    resize         "shorter": shorter side -> resize_size (aspect kept), centre crop size   (torchvision)
                   "square":  resize to resize_size x resize_size, centre crop size          (Caffe)
                   "central_fraction": centre crop crop_fraction of each side, resize to size (TF-slim)
                   "stretch": resize straight to size x size (aspect not kept)
    resize_size    intermediate size for "shorter" and "square" (must be >= size: we crop, never pad)
    crop_fraction  fraction of height and width kept by "central_fraction", in (0, 1]
    interpolation  Pillow filter: nearest, bilinear, bicubic, lanczos, box, hamming
    channel_order  "RGB", "BGR" (Caffe) or "L" (one grey channel)
    input_range    pixels are scaled to [0, input_range] before normalisation (1.0 torchvision, 255.0 raw)
    mean, std      per output channel, in [0, input_range] units; length 3 (RGB/BGR) or 1 (L)
    blur_sigma     None, or sigma of a 3x3 Gaussian blur applied after resize/crop (seed 000 uses 1.3)
    window         None, "lung", "mediastinum", "bone", "auto" or (center, width) in HU: how a DICOM file (and a
                   16-bit image with hu_offset) becomes 8-bit grey, see lightcnn.dicom; None = the DICOM file's
                   own window, and today's min-max stretch for 16-bit PNG/TIFF
    hu_offset      None, or the scaling of 16-bit PNG/TIFF CT exports: HU = pixel + hu_offset (e.g. -1024)
    window and hu_offset are left out of `to_dict` while None, so records written before they existed (and
    the feature-cache keys made from them) stay the same.
    """

    size: int = 224
    resize: str = "shorter"
    resize_size: int = 256
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    input_range: float = 1.0
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    blur_sigma: float | None = None
    window: object = None
    hu_offset: float | None = None

    _OPTIONAL = ("window", "hu_offset")  # keys that may be absent from a stored record (None then)

    def __post_init__(self):
        # Validate every field here so that a bad record fails where it is built (or read from a weight file),
        # not halfway through a batch. Messages name the field.
        if not _is_int(self.size) or self.size < 1:
            raise ValueError(f"Preprocessing.size: expected a positive int, got {self.size!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"Preprocessing.resize: expected one of {RESIZE_MODES}, got {self.resize!r}")
        if not _is_int(self.resize_size) or self.resize_size < 1:
            raise ValueError(f"Preprocessing.resize_size: expected a positive int, got {self.resize_size!r}")
        if self.resize in ("shorter", "square") and self.resize_size < self.size:
            raise ValueError(
                f"Preprocessing.resize_size: {self.resize_size} is smaller than size {self.size}; "
                f"the centre crop would need padding"
            )
        if not _is_real(self.crop_fraction) or not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"Preprocessing.crop_fraction: expected a number in (0, 1], got {self.crop_fraction!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"Preprocessing.interpolation: expected one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(
                f"Preprocessing.channel_order: expected one of {CHANNEL_ORDERS}, got {self.channel_order!r}"
            )
        if not _is_real(self.input_range) or self.input_range <= 0:
            raise ValueError(f"Preprocessing.input_range: expected a positive number, got {self.input_range!r}")
        channels = 1 if self.channel_order == "L" else 3
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ValueError(f"Preprocessing.{name}: expected a sequence of {channels} numbers, got {value!r}")
            if len(value) != channels or not all(_is_real(v) for v in value):
                raise ValueError(
                    f"Preprocessing.{name}: expected {channels} finite numbers for channel_order "
                    f"{self.channel_order!r}, got {value!r}"
                )
            # Frozen dataclass: normalise lists (from JSON) to tuples of float so records compare and hash.
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Preprocessing.std: every value must be > 0, got {self.std!r}")
        if self.blur_sigma is not None and (not _is_real(self.blur_sigma) or self.blur_sigma <= 0):
            raise ValueError(f"Preprocessing.blur_sigma: expected None or a positive number, got {self.blur_sigma!r}")
        try:
            object.__setattr__(self, "window", parse_window(self.window))
        except ValueError as exc:
            raise ValueError(f"Preprocessing.{exc}") from None
        if self.hu_offset is not None and not _is_real(self.hu_offset):
            raise ValueError(f"Preprocessing.hu_offset: expected None or a finite number, got {self.hu_offset!r}")
        if self.hu_offset is not None:
            object.__setattr__(self, "hu_offset", float(self.hu_offset))
        object.__setattr__(self, "crop_fraction", float(self.crop_fraction))
        object.__setattr__(self, "input_range", float(self.input_range))
        if self.blur_sigma is not None:
            object.__setattr__(self, "blur_sigma", float(self.blur_sigma))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "resize_size", int(self.resize_size))

    @property
    def channels(self):
        """C of the output: 1 for "L", else 3."""
        return 1 if self.channel_order == "L" else 3

    def to_dict(self):
        """A JSON-able dict (tuples become lists) holding every field; `from_dict` reads it back."""
        out = asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        for key in self._OPTIONAL:
            if out[key] is None:
                del out[key]
        if isinstance(self.window, tuple):
            out["window"] = list(self.window)
        return out

    def load_options(self):
        """The keyword arguments of `load_image` this record decides (window, hu_offset)."""
        return {"window": self.window, "hu_offset": self.hu_offset}

    @classmethod
    def from_dict(cls, data):
        """Strict inverse of `to_dict`: every field must be present, no other key is allowed.

        Raises ValueError naming the unknown, missing or bad key. (A record read from a weight file should never
        fall back to a default mean or crop without anyone noticing.)
        """
        if not isinstance(data, dict):
            raise ValueError(f"Preprocessing.from_dict: expected a dict, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names), key=str)
        if unknown:
            raise ValueError(f"Preprocessing.from_dict: unknown key(s) {unknown}; known keys are {names}")
        missing = [n for n in names if n not in data and n not in cls._OPTIONAL]
        if missing:
            raise ValueError(f"Preprocessing.from_dict: missing key(s) {missing}")
        return cls(**{n: data[n] for n in names if n in data})


TORCHVISION = Preprocessing()
# The Coral MobileNetV2 input is uint8 with scale 1/128, zero point 128: real = (q - 128) / 128 in [-1, 0.9921875].
TF_SLIM = Preprocessing(
    size=224,
    resize="central_fraction",
    crop_fraction=0.875,
    input_range=255.0,
    mean=(128.0, 128.0, 128.0),
    std=(128.0, 128.0, 128.0),
)
# keras.applications.mobilenet_v2.preprocess_input: x / 127.5 - 1 = (x - 127.5) / 127.5 in [-1, 1].
# Keras evaluates with resize-256 / crop-224 (measured on the shared sample: better than the TF-slim crop).
KERAS = Preprocessing(
    size=224,
    resize="shorter",
    resize_size=256,
    input_range=255.0,
    mean=(127.5, 127.5, 127.5),
    std=(127.5, 127.5, 127.5),
)
# Caffe SqueezeNet: 256 x 256, centre 227, BGR, minus B=104, G=117, R=123 (mean in output = BGR order), no scaling.
CAFFE = Preprocessing(
    size=227,
    resize="square",
    resize_size=256,
    channel_order="BGR",
    input_range=255.0,
    mean=(104.0, 117.0, 123.0),
    std=(1.0, 1.0, 1.0),
)
# Seed 001's light network takes 227 x 227 x 1 CT slices. CT figures have any aspect ratio and the lungs fill the
# frame, so the whole slice is stretched (like MATLAB's augmentedImageDatastore) instead of cropped; the paper
# gives no normalisation, so [0, 1] is centred to [-1, 1].
GRAYSCALE_227 = Preprocessing(
    size=227,
    resize="stretch",
    resize_size=227,
    channel_order="L",
    input_range=1.0,
    mean=(0.5,),
    std=(0.5,),
)

PRESETS = {
    "torchvision": TORCHVISION,
    "tf_slim": TF_SLIM,
    "keras": KERAS,
    "caffe": CAFFE,
    "grayscale_227": GRAYSCALE_227,
}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _one_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _read_source(source, name):
    """Return (bytes, name) for a path, bytes-like object or binary file object; at most MAX_IMAGE_BYTES.

    Only regular files are opened (a FIFO, device or socket is refused from os.stat, so nothing blocks), and
    `name` has its control characters escaped, so every message about the source is one line.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = printable(name or "<bytes>")
        if len(source) > MAX_IMAGE_BYTES:
            raise ImageError(f"{name}: {len(source)} bytes, over the {MAX_IMAGE_BYTES}-byte limit for an image file")
        return bytes(source), name
    if isinstance(source, (str, os.PathLike)):
        name = printable(name or source)
        return read_regular_file(source, MAX_IMAGE_BYTES, ImageError, "an image file", name), name
    if hasattr(source, "read"):
        name = printable(name or str(getattr(source, "name", "<stream>")))
        try:
            data = source.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            raise ImageError(f"{name}: cannot read ({_one_line(exc)})") from exc
        if isinstance(data, str):
            raise TypeError(f"{name}: file object is open in text mode; open it with 'rb'")
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"{name}: more than the {MAX_IMAGE_BYTES}-byte limit for an image file")
        return bytes(data), name
    raise TypeError(f"load_image: expected a path, bytes or a binary file object, got {type(source).__name__}")


def _check_extent(width, height, name):
    """Refuse sizes no pipeline here can use: zero, a side over MAX_SIDE, or an aspect ratio over MAX_ASPECT."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: zero-sized image ({width}x{height})")
    if max(width, height) > MAX_SIDE:
        raise ImageError(f"{name}: {width}x{height} has a side over {MAX_SIDE} pixels (possible decompression bomb)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"{name}: {width}x{height} is more than {MAX_ASPECT} times longer than wide; refused "
                         "(resizing its shorter side would need a huge image)")


def load_image(source, *, max_pixels=DEFAULT_MAX_PIXELS, name=None, window=None, hu_offset=None, frame=0):
    """Decode one image file into a fully loaded PIL image in mode "RGB" or "L".

    source      a path (str / os.PathLike) to a regular file, bytes, or a binary file object (read to its end);
                at most MAX_IMAGE_BYTES in every case
    max_pixels  refuse images with more than this many pixels (W * H) before decoding them; None = no limit of
                ours (Pillow's hard limit, twice Image.MAX_IMAGE_PIXELS, still applies). MAX_SIDE and
                MAX_ASPECT apply either way, also before decoding.
    name        what error messages call the source (default: the path, the stream's .name, or "<bytes>"),
                control characters escaped
    window, hu_offset  CT display (see `Preprocessing`, lightcnn.dicom); usually `**spec.load_options()`
    frame       0-based frame of a multi-frame DICOM file (other formats: always their first frame)

    DICOM files (the DICM magic at byte 128, or a path ending in .dcm) are read with pydicom (the optional
    `dicom` extra): stored values -> Hounsfield units (RescaleSlope/Intercept) -> window -> "L",
    MONOCHROME1 inverted; colour DICOM gives "RGB". Every other format is found from the content, never the
    extension (some .png files in the CT set are JPEG streams).
    EXIF orientation is applied, an animated file gives its first frame, and the mode is reduced to "RGB" or
    "L" as described in the module docstring (alpha on black, high-bit-depth min-max windowing).
    Every failure raises ImageError with one line "<name>: <problem>".
    """
    data, name = _read_source(source, name)
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if has_dicom_magic(data) or (isinstance(source, (str, os.PathLike))
                                 and os.fspath(source).lower().endswith(".dcm")):
        pixels, mode = read_dicom(data, name, ImageError, frame=frame, window=window, check_extent=_check_extent,
                                  max_pixels=max_pixels)
        return Image.fromarray(pixels, mode)
    try:
        # Pillow warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises above twice that. The warning is
        # silenced only inside this block (catch_warnings restores the filters; note it is not thread-safe before
        # Python 3.14) because `max_pixels` below is the limit we enforce, with an error, not a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            _check_extent(width, height, name)
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                    f"(possible decompression bomb)"
                )
            # Image.open reads only the header; load() decodes the pixels, so truncated or corrupt data fails here
            # (as long as nobody set ImageFile.LOAD_TRUNCATED_IMAGES, which we never do). Frame 0 is the current
            # frame after open, so animated files give their first frame.
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: too many pixels for Pillow ({_one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # OSError "image file is truncated", SyntaxError "broken PNG file", ... all mean the same to the user.
        raise ImageError(f"{name}: cannot decode, file is truncated or corrupt ({_one_line(exc)})") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a malformed EXIF block; Pillow raises various types here
        raise ImageError(f"{name}: cannot apply EXIF orientation ({_one_line(exc)})") from exc
    return _to_rgb_or_l(img, name, window, hu_offset)


def _composite_on_black(img):
    """RGBA/LA -> RGB/L with transparent pixels black: c * a / 255, rounded (integer arithmetic, exact)."""
    grey = img.mode in ("LA", "La")
    arr = np.asarray(img.convert("LA" if grey else "RGBA"), dtype=np.uint16)
    colour, alpha = arr[..., :-1], arr[..., -1:]
    out = ((colour * alpha + 127) // 255).astype(np.uint8)
    return Image.fromarray(out[..., 0] if grey else out, "L" if grey else "RGB")


def _window_to_l(img):
    """High-bit-depth single channel -> "L" by min-max windowing of the finite values (see module docstring)."""
    arr = np.asarray(img).astype(np.float64)
    finite = np.isfinite(arr)
    out = np.zeros(arr.shape, dtype=np.float64)
    if finite.any():
        lo, hi = arr[finite].min(), arr[finite].max()
        if hi > lo:
            # Multiply before dividing: exact for integer data, so halves really are halves when rounded.
            out[finite] = (arr[finite] - lo) * 255.0 / (hi - lo)
    out[np.isposinf(arr)] = 255.0  # NaN and -inf stay 0
    return Image.fromarray(np.rint(out).astype(np.uint8), "L")


def _to_rgb_or_l(img, name, window=None, hu_offset=None):
    """Reduce any supported Pillow mode to "RGB" (colour) or "L" (grey); unknown modes raise ImageError."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in _HIGH_DEPTH_MODES:
        if hu_offset is not None and window is not None:  # a CT export with known scaling: HU, then the window
            hu = np.asarray(img).astype(np.float64) + hu_offset
            return Image.fromarray(hu_to_uint8(hu, window), "L")
        return _window_to_l(img)
    if mode in ("P", "PA"):
        # A palette entry may be marked transparent (info["transparency"]); those pixels go black like alpha.
        if mode == "PA" or "transparency" in img.info:
            return _composite_on_black(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("LA", "La"):
        return _composite_on_black(img.convert("LA") if mode == "La" else img)
    if mode in ("RGBA", "RGBa"):
        return _composite_on_black(img.convert("RGBA"))
    if mode in _PLAIN_TO_RGB_MODES:
        return img.convert("RGB")
    raise ImageError(f"{name}: unsupported image mode {mode!r}")


# ---------------------------------------------------------------------------------------------------------------
# Geometry: resize and crop (uint8, Pillow)
# ---------------------------------------------------------------------------------------------------------------


def shorter_side_size(width, height, resize_size):
    """(new_width, new_height) with the shorter side = resize_size, the longer truncated like torchvision."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def centre_crop_box(width, height, size, rounding="torchvision"):
    """Pillow box (left, top, right, bottom) of a size x size centre crop.

    rounding "torchvision": offset = int(round((extent - size) / 2))  (halves go to even, as in CenterCrop)
             "caffe":       offset = (extent - size) // 2              (the data layer's integer division)
    """
    if rounding == "torchvision":
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    elif rounding == "caffe":
        left, top = (width - size) // 2, (height - size) // 2
    else:
        raise ValueError(f"centre_crop_box: rounding must be 'torchvision' or 'caffe', got {rounding!r}")
    return left, top, left + size, top + size


def central_fraction_box(width, height, fraction):
    """Pillow box of TF's `tf.image.central_crop(image, fraction)`: start = int((n - n*f)/2), extent = n - 2*start.

    For the 512 x 341 cat.bmp and f = 0.875 this is (32, 21, 480, 320).
    """
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    return left, top, width - left, height - top


def _geometry(img, spec):
    """Resize + crop a PIL image to spec.size x spec.size (any mode Pillow can resize)."""
    resample = _RESAMPLE[spec.interpolation]
    size = spec.size
    if spec.resize == "shorter":
        img = img.resize(shorter_side_size(img.width, img.height, spec.resize_size), resample)
        return img.crop(centre_crop_box(img.width, img.height, size, "torchvision"))
    if spec.resize == "square":
        img = img.resize((spec.resize_size, spec.resize_size), resample)
        return img.crop(centre_crop_box(img.width, img.height, size, "caffe"))
    if spec.resize == "central_fraction":
        # Crop first, then resize the crop: the filter never sees pixels outside the box (as in TF-slim).
        img = img.crop(central_fraction_box(img.width, img.height, spec.crop_fraction))
        return img.resize((size, size), resample)
    return img.resize((size, size), resample)  # "stretch"


def ten_crop_resize(size):
    """R = round(size / 0.875): the side the image is resized to before ten-crop (256 for 224, as torchvision's
    Resize(256) + TenCrop(224) evaluation)."""
    return int(round(size / 0.875))


def five_crop_boxes(width, height, size):
    """Pillow boxes (left, top, right, bottom) of torchvision's FiveCrop, in its order: top-left, top-right,
    bottom-left, bottom-right, centre. The centre box rounds like CenterCrop: int(round((extent - size) / 2.0))."""
    if size > width or size > height:
        raise ValueError(f"five_crop_boxes: a {size} x {size} crop does not fit a {width} x {height} image")
    return [(0, 0, size, size), (width - size, 0, width, size), (0, height - size, size, height),
            (width - size, height - size, width, height), centre_crop_box(width, height, size, "torchvision")]


def _ten_crop_geometry(img, spec):
    """Resize with the model's own rule, but to R = ten_crop_resize(size) instead of size / resize_size."""
    resample = _RESAMPLE[spec.interpolation]
    side = ten_crop_resize(spec.size)
    if spec.resize == "shorter":
        return img.resize(shorter_side_size(img.width, img.height, side), resample)
    if spec.resize == "central_fraction":  # the central fraction first, as the plain path does
        img = img.crop(central_fraction_box(img.width, img.height, spec.crop_fraction))
    return img.resize((side, side), resample)  # "square", "stretch", "central_fraction"


def ten_crop_uint8(image, spec):
    """The ten test-time views of one image: uint8 pixels (10, size, size, C), channels in spec.channel_order.

    The image is resized with the model's resize rule to R = ten_crop_resize(size) ("shorter": shorter side
    -> R, aspect kept; "square" and "stretch": R x R; "central_fraction": its central crop, then R x R), then
    cut into the four corner crops and the centre crop of size x size (`five_crop_boxes`, torchvision's FiveCrop
    order and rounding), followed by the same five crops of the left-right mirrored image, as torchvision's
    TenCrop does. (That is the mirror of each first crop, except that when R' - size is odd along the width,
    R' the resized width, the mirrored image's centre crop sits one pixel to the side: both round the same way.)
    normalise_pixels turns the stack into network inputs exactly as it does the plain view.
    """
    arr = _uint8_pixels(image, spec, _ten_crop_geometry)
    boxes = five_crop_boxes(arr.shape[1], arr.shape[0], spec.size)
    views = np.stack([a[top:bottom, left:right] for a in (arr, arr[:, ::-1]) for left, top, right, bottom in boxes])
    if spec.channel_order == "BGR":
        views = views[..., ::-1]
    return np.ascontiguousarray(views)


def _as_pil(image, name, spec=None):
    """Accept a PIL image or an array (H,W) / (H,W,1) / (H,W,3) / (H,W,4) and reduce it to "RGB" or "L"."""
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        try:
            image = Image.fromarray(np.ascontiguousarray(arr))
        except (TypeError, ValueError) as exc:
            raise ImageError(f"{name}: cannot make an image from an array {image.shape} {image.dtype}") from exc
    elif not isinstance(image, Image.Image):
        return load_image(image, **(spec.load_options() if spec is not None else {}))
    _check_extent(image.width, image.height, name)
    return _to_rgb_or_l(image, name)


def preprocess_uint8(image, spec):
    """The integer half of the pipeline: channel order, then resize + centre crop.

    image  PIL image, array (H0,W0[,C]) uint8 / uint16 / float32, or anything `load_image` accepts
    return pixels (size, size, C) uint8, C-contiguous, channels in spec.channel_order (C = 1 for "L")

    This is the exact input of the uint8 TFLite models. blur_sigma and mean/std are not applied here
    (they need float arithmetic; see `normalise_pixels`).
    """
    arr = _uint8_pixels(image, spec, _geometry)
    if spec.channel_order == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def _uint8_pixels(image, spec, geometry):
    """image -> (H, W, C) uint8 pixels after geometry(PIL image, spec) (a resize rule), RGB or L (C = 1)."""
    name = printable(getattr(image, "filename", None) or "<image>")
    img = _as_pil(image, name, spec).convert("L" if spec.channel_order == "L" else "RGB")
    arr = np.asarray(geometry(img, spec), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalise_pixels(pixels, spec):
    """The float half: x * input_range / 255 -> optional blur -> (x - mean) / std.

    pixels  (H,W,C) or (N,H,W,C) uint8 (or any real dtype holding 0..255 values), channels in output order
    return  same shape, float32

    Division by 255 and by std (not multiplication by a reciprocal) keeps the values bit-identical to
    torchvision's ToTensor + Normalize.
    """
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim not in (3, 4) or x.shape[-1] != spec.channels:
        raise ValueError(
            f"normalise_pixels: expected (H,W,{spec.channels}) or (N,H,W,{spec.channels}) for channel_order "
            f"{spec.channel_order!r}, got shape {x.shape}"
        )
    if spec.input_range != 255.0:
        x = x * np.float32(spec.input_range) / np.float32(255.0)
    if spec.blur_sigma is not None:
        # The blur is linear with weights summing to 1, so blurring before or after the per-channel affine
        # normalisation gives the same result; doing it here keeps it in pixel units.
        x = gaussian_blur_3x3(x, spec.blur_sigma)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocess_image(image, spec):
    """One image -> network input.

    image   PIL image (any supported mode), array, or a path / bytes / binary file (see `load_image`)
    return  x (size, size, C) float32, C-contiguous; C = 3 for RGB/BGR, 1 for L
    """
    return normalise_pixels(preprocess_uint8(image, spec), spec)


def preprocess_batch(sources, spec, *, max_pixels=DEFAULT_MAX_PIXELS):
    """Many images -> one batch.

    sources  iterable of paths, bytes, binary files, PIL images or arrays
    return   x (N, size, size, C) float32, C-contiguous (N = 0 gives an empty batch of the right shape)
    """
    sources = list(sources)
    out = np.empty((len(sources), spec.size, spec.size, spec.channels), dtype=np.float32)
    for i, source in enumerate(sources):
        if not isinstance(source, (Image.Image, np.ndarray)):
            source = load_image(source, max_pixels=max_pixels, **spec.load_options())
        out[i] = preprocess_image(source, spec)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------------------------


def gaussian_kernel_1d(sigma):
    """The 3 taps g(-1), g(0), g(1) of exp(-t^2 / (2 sigma^2)), normalised to sum 1 (float64)."""
    t = np.array([-1.0, 0.0, 1.0])
    g = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return g / g.sum()


def gaussian_blur_3x3(array, sigma):
    """3x3 Gaussian blur over the two spatial axes, borders replicated (edge pixels repeated).

    array  (H,W), (H,W,C) or (N,H,W,C); integer input is computed and returned as float32, float keeps its dtype
    sigma  > 0; the 2-D kernel G(x,y) ∝ exp(-(x²+y²)/(2σ²)) on {-1,0,1}², normalised to sum 1, so a flat
           image stays flat. It is separable, G = g gᵀ, so we run two 3-tap passes (6 instead of 9 MACs/pixel).

    Edge replication (OpenCV's BORDER_REPLICATE, scipy's mode="nearest") keeps border pixels from darkening.
    Note OpenCV's GaussianBlur defaults to BORDER_REFLECT_101; the two differ only on the outermost ring.
    """
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"gaussian_blur_3x3: sigma must be a positive number, got {sigma!r}")
    x = np.asarray(array)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"gaussian_blur_3x3: expected (H,W), (H,W,C) or (N,H,W,C), got shape {x.shape}")
    h_axis = 1 if x.ndim == 4 else 0
    g = gaussian_kernel_1d(float(sigma)).astype(x.dtype)
    for axis in (h_axis, h_axis + 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 1)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        taps = []
        for k in range(3):  # the three shifted views p[k : k + n] along `axis` (no copies)
            index = [slice(None)] * x.ndim
            index[axis] = slice(k, k + n)
            taps.append(p[tuple(index)])
        x = g[0] * taps[0] + g[1] * taps[1] + g[2] * taps[2]
    return x
