"""Tests for lightcnn.preprocess: odd and broken files, preset values, crop rounding, and a Pillow-twin check.

Every odd file is generated in tmp_path, so these tests need nothing from ../shared except the one reference test
(cat_input_224_uint8.npy), which skips through the `data_dir` fixture when the shared folder is absent.
"""

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from lightcnn.errors import ImageError
from lightcnn.preprocess import (
    CAFFE,
    GRAYSCALE_227,
    KERAS,
    PRESETS,
    TF_SLIM,
    TORCHVISION,
    Preprocessing,
    central_fraction_box,
    gaussian_blur_3x3,
    load_image,
    normalise_pixels,
    preprocess_batch,
    preprocess_image,
    preprocess_uint8,
)

# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _save(img, path, fmt=None, **kwargs):
    img.save(path, fmt, **kwargs)
    return path


def _random_rgb(rng, height, width):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _png_chunk(tag, payload):
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height, with a tiny (invalid for that size) IDAT: only the header matters."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )


def _pillow_bilinear_weights(in_size, out_size):
    """Plain-numpy twin of Pillow's precompute_coeffs for the bilinear (triangle) filter: (out_size, in_size).

    Pillow widens the triangle by the scale factor when it downsamples (antialiasing): support = 1 * max(scale, 1).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    weights = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        for x in range(xmin, xmax):
            weights[xx, x] = max(0.0, 1.0 - abs((x - center + 0.5) / filterscale))
        weights[xx] /= weights[xx].sum()
    return weights


def _twin_resize(arr, width, height):
    """(H0,W0,C) uint8 -> (height,width,C) float64, horizontal pass then vertical pass, no intermediate rounding."""
    wx = _pillow_bilinear_weights(arr.shape[1], width)
    wy = _pillow_bilinear_weights(arr.shape[0], height)
    x = arr.astype(np.float64)
    x = np.einsum("ow,hwc->hoc", wx, x)
    return np.einsum("oh,hwc->owc", wy, x)


def _row_coded_image(height, width):
    """RGB image whose pixel (r, c) holds (r % 256, r // 256, c % 256): the crop offset can be read off a pixel."""
    r, c = np.mgrid[0:height, 0:width]
    return np.stack([r % 256, r // 256, c % 256], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Reference: the TFLite input tensor in shared/data
# ---------------------------------------------------------------------------------------------------------------


def test_central_fraction_box_matches_the_documented_cat_box():
    # data/SOURCES.md: cat.bmp is 512 x 341 and its central 87.5 % crop is the Pillow box (32, 21, 480, 320).
    assert central_fraction_box(512, 341, 0.875) == (32, 21, 480, 320)
    # TF truncates the start (int(18.75) = 18) and keeps extent n - 2 * start = 264, not round(262.5).
    assert central_fraction_box(300, 300, 0.875) == (18, 18, 282, 282)


def test_tf_slim_uint8_reproduces_the_reference_input_exactly(data_dir):
    ref = np.load(data_dir / "reference-activations" / "cat_input_224_uint8.npy")
    img = load_image(data_dir / "smoke-test-images" / "cat.bmp")
    assert img.size == (512, 341)
    pixels = preprocess_uint8(img, TF_SLIM)
    assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
    np.testing.assert_array_equal(pixels, ref[0])
    # And the float input is the uint8 tensor's real value (q - 128) / 128.
    x = preprocess_image(img, TF_SLIM)
    np.testing.assert_array_equal(x, (ref[0].astype(np.float32) - 128) / 128)


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def test_tf_slim_normalisation_is_the_uint8_quantisation():
    q = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = normalise_pixels(q, TF_SLIM)
    np.testing.assert_array_equal(x, (q.astype(np.float64) - 128) / 128)  # exact: powers of two
    assert x.min() == -1.0 and x.max() == 0.9921875


def test_keras_normalisation_is_x_over_127_5_minus_1():
    q = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = normalise_pixels(q, KERAS)
    np.testing.assert_allclose(x, q / 127.5 - 1.0, rtol=0, atol=1e-7)
    assert x.min() == -1.0 and x.max() == 1.0


def test_torchvision_normalisation_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    q = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = normalise_pixels(q, TORCHVISION)
    # torchvision: ToTensor = float().div(255), Normalize = sub_(mean).div_(std), all float32.
    t = torch.from_numpy(q.copy()).float().div(255)
    t = t.sub(torch.tensor(TORCHVISION.mean)).div(torch.tensor(TORCHVISION.std))
    np.testing.assert_array_equal(x, t.numpy())


def test_caffe_gives_bgr_minus_mean():
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    x = preprocess_image(img, CAFFE)
    assert x.shape == (227, 227, 3)
    np.testing.assert_array_equal(x[0, 0], [30 - 104, 20 - 117, 10 - 123])
    np.testing.assert_array_equal(x, np.broadcast_to(x[0, 0], x.shape))


def test_grayscale_227_uses_luma_and_one_channel():
    img = Image.new("RGB", (100, 60), (255, 0, 0))  # ITU-R 601-2: L = 0.299 * 255 -> 76
    x = preprocess_image(img, GRAYSCALE_227)
    assert x.shape == (227, 227, 1)
    np.testing.assert_allclose(x, (76 / 255 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    spec = PRESETS[name]
    again = Preprocessing.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert isinstance(again.mean, tuple)


def test_preset_definitions():
    assert (TF_SLIM.resize, TF_SLIM.crop_fraction, TF_SLIM.size) == ("central_fraction", 0.875, 224)
    assert (TF_SLIM.input_range, TF_SLIM.mean, TF_SLIM.std) == (255.0, (128.0,) * 3, (128.0,) * 3)
    assert (CAFFE.resize, CAFFE.resize_size, CAFFE.size, CAFFE.channel_order) == ("square", 256, 227, "BGR")
    assert (CAFFE.mean, CAFFE.std, CAFFE.input_range) == ((104.0, 117.0, 123.0), (1.0,) * 3, 255.0)
    assert (TORCHVISION.resize, TORCHVISION.resize_size, TORCHVISION.size) == ("shorter", 256, 224)
    assert (GRAYSCALE_227.channel_order, GRAYSCALE_227.size, len(GRAYSCALE_227.mean)) == ("L", 227, 1)


def test_from_dict_rejects_unknown_and_missing_keys():
    d = TORCHVISION.to_dict()
    with pytest.raises(ValueError, match="colour_space"):
        Preprocessing.from_dict({**d, "colour_space": "srgb"})
    del d["std"]
    with pytest.raises(ValueError, match="std"):
        Preprocessing.from_dict(d)


@pytest.mark.parametrize(
    "key, value",
    [
        ("size", 0),
        ("size", True),
        ("size", 224.0),
        ("resize", "zoom"),
        ("resize_size", 200),  # smaller than size 224 for "shorter"
        ("crop_fraction", 1.5),
        ("crop_fraction", 0.0),
        ("interpolation", "cubic"),
        ("channel_order", "RGBA"),
        ("input_range", 0),
        ("input_range", float("nan")),
        ("mean", [0.5]),
        ("mean", "abc"),
        ("std", [0.2, 0.0, 0.2]),
        ("blur_sigma", -1.0),
    ],
)
def test_from_dict_rejects_bad_values_naming_the_key(key, value):
    d = TORCHVISION.to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=key):
        Preprocessing.from_dict(d)


# ---------------------------------------------------------------------------------------------------------------
# Geometry: crop rounding conventions and a Pillow-twin comparison
# ---------------------------------------------------------------------------------------------------------------


def test_shorter_crop_rounds_half_to_even_like_torchvision():
    # 256 x 391: the shorter side is already 256 (identity resize), (391 - 224) / 2 = 83.5 -> round() = 84.
    img = Image.fromarray(_row_coded_image(391, 256))
    spec = Preprocessing(mean=(0.0,) * 3, std=(1.0,) * 3)
    pixels = preprocess_uint8(img, spec)
    top_row = int(pixels[0, 0, 0]) + 256 * int(pixels[0, 0, 1])
    assert top_row == 84
    assert pixels[0, 0, 2] == 16  # left: (256 - 224) / 2 = 16


def test_square_crop_floors_like_caffe():
    # (258 - 227) / 2 = 15.5: Caffe's integer division gives 15 (round() would give 16).
    img = Image.fromarray(_row_coded_image(258, 258))
    spec = Preprocessing(size=227, resize="square", resize_size=258, mean=(0.0,) * 3, std=(1.0,) * 3)
    pixels = preprocess_uint8(img, spec)
    assert (pixels[0, 0, 0], pixels[0, 0, 2]) == (15, 15)


def test_central_fraction_crops_before_resizing():
    # 256 x 256 at 0.875 keeps rows/cols 16..239 = exactly 224, so the resize is the identity.
    img = Image.fromarray(_row_coded_image(256, 256))
    pixels = preprocess_uint8(img, TF_SLIM)
    assert (pixels[0, 0, 0], pixels[0, 0, 2], pixels[-1, -1, 0], pixels[-1, -1, 2]) == (16, 16, 239, 239)


def test_torchvision_pipeline_matches_a_numpy_twin(rng):
    h0, w0 = 300, 457  # landscape: the shorter side is the height
    arr = _random_rgb(rng, h0, w0)
    x = preprocess_image(Image.fromarray(arr), TORCHVISION)

    new_w, new_h = int(256 * w0 / h0), 256  # torchvision truncates the longer side: 389
    resized = _twin_resize(arr, new_w, new_h)
    top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))
    crop = resized[top : top + 224, left : left + 224]
    expected = (crop / 255 - np.array(TORCHVISION.mean)) / np.array(TORCHVISION.std)

    # Pillow rounds to uint8 after each pass; the twin does not: at most 1 LSB apart in pixel units.
    diff_lsb = np.abs(x - expected) * np.array(TORCHVISION.std) * 255
    assert diff_lsb.max() <= 1.0 + 1e-4
    assert diff_lsb.mean() < 0.35  # an off-by-one crop on noise would give tens of LSB


def test_caffe_pipeline_matches_a_numpy_twin(rng):
    arr = _random_rgb(rng, 200, 300)
    x = preprocess_image(Image.fromarray(arr), CAFFE)
    resized = _twin_resize(arr, 256, 256)
    crop = resized[14 : 14 + 227, 14 : 14 + 227, ::-1]  # (256 - 227) // 2 = 14; RGB -> BGR
    expected = crop - np.array(CAFFE.mean)
    diff = np.abs(x - expected)
    assert diff.max() <= 1.0 + 1e-4 and diff.mean() < 0.35


def test_stretch_resizes_to_size_without_cropping(rng):
    arr = _random_rgb(rng, 50, 120)
    spec = Preprocessing(size=32, resize="stretch", resize_size=32, mean=(0.0,) * 3, std=(1.0,) * 3)
    pixels = preprocess_uint8(Image.fromarray(arr), spec)
    diff = np.abs(pixels - _twin_resize(arr, 32, 32))
    assert pixels.shape == (32, 32, 3) and diff.max() <= 1.0 + 1e-9


# ---------------------------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------------------------


def _naive_blur(x, sigma):
    """Loop-only twin: 9-tap 2-D Gaussian G(x, y) on (H, W), borders replicated by index clamping."""
    g = np.array([[np.exp(-(i * i + j * j) / (2 * sigma * sigma)) for j in (-1, 0, 1)] for i in (-1, 0, 1)])
    g /= g.sum()
    h, w = x.shape
    out = np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            for i in range(3):
                for j in range(3):
                    out[r, c] += g[i, j] * x[min(max(r + i - 1, 0), h - 1), min(max(c + j - 1, 0), w - 1)]
    return out


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (6, 4, 3), (2, 5, 3, 1)])
def test_gaussian_blur_matches_naive_twin(rng, shape):
    x = rng.standard_normal(shape)
    y = gaussian_blur_3x3(x, 1.3)
    assert y.shape == x.shape and y.dtype == np.float64
    planes = x.reshape((-1,) + x.shape[-3:]) if x.ndim == 4 else x[None]
    out = y.reshape((-1,) + y.shape[-3:]) if y.ndim == 4 else y[None]
    for p, o in zip(planes, out):
        if p.ndim == 2:
            np.testing.assert_allclose(o, _naive_blur(p, 1.3), rtol=1e-12, atol=1e-12)
        else:
            for ch in range(p.shape[-1]):
                np.testing.assert_allclose(o[..., ch], _naive_blur(p[..., ch], 1.3), rtol=1e-12, atol=1e-12)


def test_gaussian_blur_keeps_flat_images_flat_and_uint8_becomes_float32():
    y = gaussian_blur_3x3(np.full((8, 9, 3), 200, dtype=np.uint8), 1.3)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, 200.0, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur_3x3(np.zeros((4, 4)), 0.0)


def test_blur_sigma_is_applied_in_the_pipeline(rng):
    arr = _random_rgb(rng, 64, 64)
    spec = Preprocessing(size=32, resize="stretch", resize_size=32, blur_sigma=1.3)
    plain = Preprocessing(size=32, resize="stretch", resize_size=32)
    x = preprocess_image(Image.fromarray(arr), spec)
    pixels = preprocess_uint8(Image.fromarray(arr), plain)
    expected = (gaussian_blur_3x3(pixels / np.float32(255), 1.3) - np.float32(plain.mean)) / np.float32(plain.std)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(x - preprocess_image(Image.fromarray(arr), plain)).max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Odd but valid files
# ---------------------------------------------------------------------------------------------------------------


def test_grayscale_l_stays_l_and_expands_to_rgb(tmp_path, rng):
    arr = rng.integers(0, 256, size=(40, 30), dtype=np.uint8)
    path = _save(Image.fromarray(arr, "L"), tmp_path / "gray.png")
    img = load_image(path)
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), arr)
    x = preprocess_image(img, TORCHVISION)
    assert x.shape == (224, 224, 3)
    np.testing.assert_allclose(x[..., 0] * 0.229 + 0.485, x[..., 1] * 0.224 + 0.456, atol=1e-6)


def test_one_bit_image_becomes_0_and_255(tmp_path):
    bits = np.array([[True, False, True], [False, True, False]])
    img = load_image(_save(Image.fromarray(bits), tmp_path / "bits.png"))
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), bits * 255)


def test_la_alpha_is_composited_on_black(tmp_path):
    arr = np.array([[[200, 255], [200, 0], [200, 128]]], dtype=np.uint8)
    img = load_image(_save(Image.fromarray(arr, "LA"), tmp_path / "la.png"))
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), [[200, 0, (200 * 128 + 127) // 255]])


def test_rgba_alpha_is_composited_on_black(tmp_path):
    arr = np.array([[[100, 150, 200, 255], [100, 150, 200, 0], [100, 150, 200, 51]]], dtype=np.uint8)
    img = load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png"))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), [[[100, 150, 200], [0, 0, 0], [20, 30, 40]]])


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    img = load_image(_save(pal, tmp_path / "p_trans.png", transparency=0))
    assert img.mode == "RGB"
    out = np.asarray(img)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])  # index 0 is transparent -> black
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])


def test_palette_without_transparency(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    out = np.asarray(load_image(_save(pal, tmp_path / "p.gif")))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])


def test_cmyk_jpeg_comes_back_as_rgb_not_inverted(tmp_path, rng):
    arr = _random_rgb(rng, 20, 30)
    path = _save(Image.fromarray(arr).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert np.abs(np.asarray(img).astype(int) - arr).mean() < 8  # inverted would be ~128


def test_16bit_png_with_a_small_range_is_windowed_not_clipped(tmp_path, rng):
    values = rng.integers(1000, 1101, size=(20, 25)).astype(np.uint16)
    values[0, 0], values[0, 1] = 1000, 1100
    path = _save(Image.fromarray(values), tmp_path / "ct16.png")
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out, np.rint((values - 1000.0) * 255 / 100).astype(np.uint8))
    assert len(np.unique(out)) > 50  # Image.convert("L") would give all 255


def test_32bit_integer_tiff_is_windowed(tmp_path):
    values = np.arange(-500, 1500, dtype=np.int32).reshape(40, 50)
    out = np.asarray(load_image(_save(Image.fromarray(values), tmp_path / "int32.tif")))
    assert (out[0, 0], out[-1, -1]) == (0, 255)
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order is kept


def test_float_tiff_window_and_non_finite_values(tmp_path):
    values = np.array([[-1.0, 0.0, 1.0], [np.nan, np.inf, -np.inf]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    assert Image.open(path).mode == "F"
    out = np.asarray(load_image(path))
    np.testing.assert_array_equal(out, [[0, 128, 255], [0, 255, 0]])


def test_constant_high_depth_image_becomes_black(tmp_path):
    out = np.asarray(load_image(_save(Image.fromarray(np.full((4, 4), 777, np.uint16)), tmp_path / "flat.png")))
    assert np.all(out == 0)


def test_exif_orientation_6_is_applied(tmp_path, rng):
    arr = _random_rgb(rng, 20, 40)  # W=40, H=20 as stored
    arr[:10, :20] = 255  # a bright top-left quadrant (as stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(Image.fromarray(arr), tmp_path / "rotated.jpg", quality=95, exif=exif)
    stored = np.asarray(Image.open(path).convert("RGB"))  # decoded pixels, orientation ignored
    img = load_image(path)
    assert img.size == (20, 40)  # W and H swapped
    out = np.asarray(img)
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))
    assert out[:20, 10:].mean() > 240  # the stored top-left quadrant is now at the top right


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    out = np.asarray(load_image(path))
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


def test_png_named_file_holding_a_jpeg_is_decoded_by_content(tmp_path, rng):
    path = _save(Image.fromarray(_random_rgb(rng, 16, 16)), tmp_path / "really_a_jpeg.png", "JPEG")
    assert load_image(path).size == (16, 16)


def test_bytes_and_file_objects_are_accepted(tmp_path, rng):
    path = _save(Image.fromarray(_random_rgb(rng, 16, 12)), tmp_path / "img.png")
    a = np.asarray(load_image(path))
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), a)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(np.asarray(load_image(f)), a)
    np.testing.assert_array_equal(np.asarray(load_image(io.BytesIO(path.read_bytes()))), a)


# ---------------------------------------------------------------------------------------------------------------
# Broken files: ImageError naming the file
# ---------------------------------------------------------------------------------------------------------------


def _expect_image_error(source, fragment, **kwargs):
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(source) in message, message
    assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    _expect_image_error(tmp_path / "nope.jpg", "no such file")


def test_directory(tmp_path):
    _expect_image_error(tmp_path, "directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _expect_image_error(path, "empty")


def test_random_bytes(tmp_path, rng):
    path = tmp_path / "noise.png"
    path.write_bytes(b"NOTANIMAGE" + rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    _expect_image_error(path, "not a recognised image")


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file(tmp_path, rng, fmt, suffix):
    full = tmp_path / f"full.{suffix}"
    _save(Image.fromarray(_random_rgb(rng, 64, 64)), full, fmt)
    data = full.read_bytes()
    path = tmp_path / f"truncated.{suffix}"
    path.write_bytes(data[: len(data) * 6 // 10])
    _expect_image_error(path, "cannot decode, file is truncated or corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we never flip the global switch


def test_zero_width_png(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(0, 5))
    with pytest.raises(ImageError, match="zero.png"):
        load_image(path)


def test_zero_sized_pil_image_is_rejected():
    with pytest.raises(ImageError, match="zero-sized"):
        preprocess_image(Image.new("RGB", (0, 5)), TORCHVISION)


def test_image_over_max_pixels(tmp_path, rng):
    path = _save(Image.fromarray(_random_rgb(rng, 100, 200)), tmp_path / "big.png")
    _expect_image_error(path, "max_pixels", max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)


def test_decompression_bomb_header_is_refused_without_touching_globals(tmp_path):
    # 10000 x 10000 = 1e8 px: above Pillow's warning threshold (89.5 Mpx), below its hard error (179 Mpx).
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10_000, 10_000))
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _expect_image_error(path, "max_pixels")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert list(warnings.filters) == filters_before and Image.MAX_IMAGE_PIXELS == limit_before
    # Above Pillow's hard limit the file is refused even when our own limit is off.
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(50_000, 50_000))
    _expect_image_error(huge, "too many pixels", max_pixels=None)


def test_unsupported_mode(tmp_path):
    path = _save(Image.new("LAB", (4, 3)), tmp_path / "lab.tif")
    _expect_image_error(path, "unsupported image mode")


def test_wrong_source_type():
    with pytest.raises(TypeError):
        load_image(12345)


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


def test_preprocess_batch_mixes_source_kinds(tmp_path, rng):
    arrays = [_random_rgb(rng, 60 + 10 * i, 80) for i in range(3)]
    paths = [_save(Image.fromarray(a), tmp_path / f"b{i}.png") for i, a in enumerate(arrays)]
    with open(paths[2], "rb") as f:
        batch = preprocess_batch([paths[0], paths[1].read_bytes(), f, Image.fromarray(arrays[0])], TORCHVISION)
    assert batch.shape == (4, 224, 224, 3) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for row, a in zip(batch, arrays + arrays[:1]):
        np.testing.assert_array_equal(row, preprocess_image(Image.fromarray(a), TORCHVISION))
    assert preprocess_batch([], GRAYSCALE_227).shape == (0, 227, 227, 1)


def test_preprocess_batch_names_the_bad_file(tmp_path, rng):
    good = _save(Image.fromarray(_random_rgb(rng, 30, 30)), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageError, match="bad.jpg"):
        preprocess_batch([good, bad], TORCHVISION)
