"""Classifier inputs: uint8 pixel arrays are images (preprocessed like files), float arrays are preprocessed
batches only when their shape says so, anything else is refused with one line."""

import numpy as np
import pytest
from PIL import Image

import lightcnn
from lightcnn.checkpoint import Checkpoint, save_checkpoint
from lightcnn.errors import CheckpointError, ShapeError
from lightcnn.models import mobilenet_v2
from lightcnn.preprocess import Preprocessing
from tests.conftest import require_path, shared_path


@pytest.fixture(scope="module")
def cat_path():
    return require_path(shared_path("LIGHTCNN_DATA", "data") / "smoke-test-images" / "cat.bmp", "smoke-test images")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small random MobileNetV2 (32x32 input, 3 classes) with torchvision-style preprocessing."""
    model = mobilenet_v2(width_mult=0.35, num_classes=3, seed=0)
    path = tmp_path_factory.mktemp("api") / "tiny.h5"
    save_checkpoint(path, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                                     class_names=["a", "b", "c"],
                                     preprocessing=Preprocessing(size=32, resize="shorter", resize_size=36).to_dict()))
    return lightcnn.load(str(path))


@pytest.fixture(scope="module")
def v2():
    try:
        return lightcnn.load("mobilenet_v2")
    except CheckpointError as exc:
        pytest.skip(str(exc))


def test_a_uint8_video_frame_is_classified_like_the_same_picture_as_a_file(v2, cat_path, tmp_path):
    """The reported case: a 720p uint8 frame, alone or with a batch axis, was taken as a preprocessed batch."""
    with Image.open(cat_path) as img:
        frame = np.asarray(img.convert("RGB").resize((1280, 720), Image.BILINEAR))
    Image.fromarray(frame).save(tmp_path / "frame.png")
    from_file = v2.predict(str(tmp_path / "frame.png"))
    for images in (frame, frame[None], [frame]):
        probs = v2.predict(images)
        assert probs.shape == (1, 1000)
        np.testing.assert_allclose(probs, from_file, rtol=0, atol=1e-6)
    assert v2.topk(frame[None], k=1)[0][0].label == "Egyptian cat"


def test_cat_bmp_as_an_array_equals_the_file(v2, cat_path):
    with Image.open(cat_path) as img:
        pixels = np.asarray(img)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    np.testing.assert_allclose(v2.predict(pixels), v2.predict(cat_path), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGBA", 4)])
def test_one_three_and_four_channel_arrays_equal_their_files(tiny, tmp_path, rng, mode, channels):
    pixels = rng.integers(0, 256, size=(2, 45, 61, channels), dtype=np.uint8)
    if channels == 4:
        pixels[..., 3] = rng.integers(0, 256, size=(2, 45, 61))  # partly transparent: composited on black
    files = []
    for i, p in enumerate(pixels):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(p[..., 0] if channels == 1 else p, mode).save(files[-1])
    from_files = tiny.predict([str(f) for f in files])
    np.testing.assert_array_equal(tiny.preprocess(pixels), tiny.preprocess([str(f) for f in files]))
    np.testing.assert_allclose(tiny.predict(pixels), from_files, rtol=0, atol=1e-6)       # (N,H,W,C)
    np.testing.assert_allclose(tiny.predict(pixels[1]), from_files[1:], rtol=0, atol=1e-6)  # (H,W,C)


def test_a_float_batch_of_the_models_input_shape_is_taken_as_preprocessed(tiny, rng):
    pixels = rng.integers(0, 256, size=(3, 40, 50, 3), dtype=np.uint8)
    batch = tiny.preprocess(pixels)
    assert batch.shape == (3, *tiny.input_shape) == (3, 32, 32, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(tiny.predict(batch), tiny.predict(pixels))
    np.testing.assert_allclose(tiny.predict(batch.astype(np.float64)), tiny.predict(pixels), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tiny.cam(batch).maps, tiny.cam(pixels).maps)


@pytest.mark.parametrize("array", [
    np.zeros((1, 720, 1280, 3), np.float32),   # a float frame of another size: not a preprocessed batch
    np.zeros((32, 32, 3), np.float32),         # a preprocessed image without its batch axis
    np.zeros((1, 32, 32, 1), np.float64),      # wrong channel count for the model
    np.zeros((1, 32, 32, 3), np.float16),      # a float type that is neither float32 nor float64
    np.zeros((64, 64, 3), np.uint16),          # 16-bit pixels: decode the file instead
    np.zeros((64, 64), np.uint8),              # no channel axis
    np.zeros((64, 64, 2), np.uint8),           # C = 2
    np.zeros((1, 64, 64, 3), np.int64),
    np.zeros((0, 64, 3), np.uint8),            # zero-sized
], ids=["float-720p", "float-hwc", "float-c1", "float16", "uint16", "uint8-hw", "uint8-c2", "int64", "empty"])
def test_other_arrays_are_refused_with_one_line_saying_what_is_accepted(tiny, array):
    for call in (tiny.predict, tiny.topk, tiny.cam):
        with pytest.raises(ShapeError) as info:
            call(array)
        message = str(info.value)
        assert "\n" not in message and str(array.shape) in message and str(array.dtype) in message
        assert "uint8 (H,W,C) or (N,H,W,C)" in message and "(N,32,32,3)" in message
    assert isinstance(info.value, ValueError)


def test_a_float_array_inside_a_list_is_refused_too(tiny, rng):
    good = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    with pytest.raises(ShapeError, match=r"\(40, 40, 3\) and dtype float32"):
        tiny.predict([good, good.astype(np.float32)])
