"""DICOM input and CT windows: HU and windows checked against pydicom's own LUT functions, MONOCHROME1,
multi-frame files in predict, extension-less files, corrupt files, no patient identifiers in any output, the
window travelling with a fine-tuned model, and 16-bit PNG exports with --hu-offset."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

pydicom = pytest.importorskip("pydicom", reason='the dicom extra is not installed (pip install "lightcnn[dicom]")')
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from lightcnn.dicom import WINDOWS, parse_window, read_dicom, window_to_unit  # noqa: E402
from lightcnn.errors import ImageError  # noqa: E402
from lightcnn.preprocess import Preprocessing, load_image  # noqa: E402

PATIENT_NAME = "Secretname^Jane"
PATIENT_ID = "PID-4711-SECRET"


def bundled(name):
    """A test file shipped inside pydicom (never one it would download)."""
    from pathlib import Path

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.exists():
        pytest.skip(f"{name} is not bundled with pydicom {pydicom.__version__}")
    return str(path)


def write_ct(path, frames, slope=1.0, intercept=-1024.0, photometric="MONOCHROME2", window=((40, 400), (-600, 1500)),
             preamble=True):
    """A CT (or MONOCHROME1) file with patient identifiers: frames (F,H,W) int16 stored values."""
    frames = np.asarray(frames, dtype=np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Rows, ds.Columns = frames.shape[1:]
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter = [c for c, _ in window] if len(window) > 1 else window[0][0]
        ds.WindowWidth = [w for _, w in window] if len(window) > 1 else window[0][1]
    ds.PixelData = (frames if len(frames) > 1 else frames[0]).tobytes()
    ds.save_as(str(path), enforce_file_format=preamble)
    return ds


def ct_frames(rng, n=1, shape=(40, 48)):
    """Stored values covering air (-1000 HU), lung (-600), soft tissue (40) and bone (+1000) at intercept -1024."""
    base = rng.integers(0, 2200, (n, *shape))
    base[:, :8] = 24  # -1000 HU: air
    return base.astype(np.int16)


# ----------------------------------------------------------------------------------------------- HU and windows


def test_hu_equal_pydicom_modality_lut_on_bundled_and_written_files(tmp_path, rng):
    written = tmp_path / "slope.dcm"
    write_ct(written, ct_frames(rng), slope=2.0, intercept=-2048.0)
    for path in (bundled("CT_small.dcm"), bundled("MR_small.dcm"), str(written)):
        data = open(path, "rb").read()
        ours = read_dicom(data, path, ImageError, return_hu=True)
        ds = pydicom.dcmread(path)
        theirs = apply_modality_lut(ds.pixel_array, ds)
        assert ours.shape == theirs.shape
        assert np.max(np.abs(ours - theirs)) == 0.0, path  # the same affine map, exactly
    # the slope really was applied: stored value 1100 -> 2 * 1100 - 2048 = 152 HU
    assert read_dicom(open(written, "rb").read(), "w", ImageError, return_hu=True).max() > 1500


@pytest.mark.parametrize("window", ["lung", "mediastinum", "bone", (40.0, 400.0), (-500.0, 1.0)])
def test_window_equals_pydicom_apply_voi_lut(window, rng):
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    centre, width = WINDOWS[window] if isinstance(window, str) else window
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = centre, width, "LINEAR"
    probe = np.concatenate([hu.ravel(), rng.uniform(-2000, 3000, 5000), [centre - width / 2, centre + width / 2]])
    voi = apply_voi_lut(probe.astype(np.float64), ds)
    lo, hi = apply_voi_lut(np.array([-1e9, 1e9]), ds)
    theirs = (voi - lo) / (hi - lo)
    ours = window_to_unit(probe, centre, width)
    assert np.max(np.abs(ours - theirs)) < 1e-12
    # load_image's pixels are that window rounded to 8 bits
    pixels = np.asarray(load_image(path, window=window if isinstance(window, str) else f"{centre},{width}"))
    expect = np.rint(255 * theirs[:hu.size].reshape(hu.shape)).astype(np.uint8)
    assert np.array_equal(pixels, expect)


def test_auto_window_is_the_files_first_value_and_none_falls_back_to_min_max(tmp_path, rng):
    frames = ct_frames(rng)
    write_ct(tmp_path / "w.dcm", frames)  # WindowCenter [40, -600], WindowWidth [400, 1500]
    write_ct(tmp_path / "nw.dcm", frames, window=None)
    hu = frames[0].astype(np.float64) - 1024
    mediastinal = np.rint(255 * window_to_unit(hu, 40, 400)).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(tmp_path / "w.dcm", window="auto")), mediastinal)
    assert np.array_equal(np.asarray(load_image(tmp_path / "w.dcm")), mediastinal)  # None = the file's window
    minmax = np.rint(255 * (hu - hu.min()) / (hu.max() - hu.min())).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(tmp_path / "nw.dcm", window="auto")), minmax)
    # lung differs from mediastinum on these values: the window really changes the pixels
    assert not np.array_equal(np.asarray(load_image(tmp_path / "w.dcm", window="lung")), mediastinal)


def test_monochrome1_is_inverted(tmp_path, rng):
    frames = ct_frames(rng)
    write_ct(tmp_path / "m2.dcm", frames)
    write_ct(tmp_path / "m1.dcm", frames, photometric="MONOCHROME1")
    m2 = np.asarray(load_image(tmp_path / "m2.dcm", window="lung")).astype(int)
    m1 = np.asarray(load_image(tmp_path / "m1.dcm", window="lung")).astype(int)
    assert np.array_equal(m1, 255 - m2)
    air = round(255 * ((-1000 + 600.5) / 1499 + 0.5))  # -1000 HU in the lung window: 60, dark
    assert air == 60 and (m2[:8] == air).all() and (m1[:8] == 255 - air).all()


def test_multi_frame_files_give_each_frame(tmp_path, rng):
    frames = ct_frames(rng, n=3)
    frames[1] //= 2
    write_ct(tmp_path / "mf.dcm", frames)
    for k in range(3):
        expect = np.rint(255 * window_to_unit(frames[k] - 1024.0, -600, 1500)).astype(np.uint8)
        assert np.array_equal(np.asarray(load_image(tmp_path / "mf.dcm", window="lung", frame=k)), expect)
    with pytest.raises(ImageError, match=r"mf\.dcm: frame 4 requested, the file has 3 frame"):
        load_image(tmp_path / "mf.dcm", frame=3)
    # a bundled multi-frame file: 15 dose planes, each its own image
    dose = bundled("rtdose.dcm")
    ds = pydicom.dcmread(dose)
    planes = [np.asarray(load_image(dose, frame=k)) for k in (0, 7)]
    for k, plane in zip((0, 7), planes):
        stored = ds.pixel_array[k].astype(np.float64)
        expect = np.rint(255 * (stored - stored.min()) / (stored.max() - stored.min())).astype(np.uint8)
        assert np.array_equal(plane, expect)


def test_extension_less_dicom_is_found_by_its_magic(tmp_path, rng):
    write_ct(tmp_path / "IM0001", ct_frames(rng))
    img = load_image(tmp_path / "IM0001", window="lung")
    assert img.mode == "L" and img.size == (48, 40)
    assert np.array_equal(np.asarray(load_image((tmp_path / "IM0001").read_bytes(), window="lung")), np.asarray(img))
    from lightcnn.predict import expand_images

    (tmp_path / "notes").write_text("not an image")
    paths, errors = expand_images([str(tmp_path)])
    assert paths == [str(tmp_path / "IM0001")] and not errors


def test_corrupt_and_pixel_less_dicom_fail_in_one_line_naming_the_file(tmp_path, rng):
    write_ct(tmp_path / "ok.dcm", ct_frames(rng))
    data = (tmp_path / "ok.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:400])
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    for name in ("cut.dcm", "junk.dcm"):
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name)
        message = str(info.value)
        assert message.startswith(str(tmp_path / name)) and "\n" not in message
    with pytest.raises(ImageError, match="without pixel data"):
        load_image(bundled("rtplan.dcm"))


def test_preprocessing_window_is_validated_and_round_trips():
    spec = Preprocessing(window="Lung", hu_offset=-1024)
    assert spec.window == "lung" and spec.hu_offset == -1024.0
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["window"] == "lung" and Preprocessing.from_dict(d) == spec
    custom = Preprocessing(window="-500,1200")
    assert custom.window == (-500.0, 1200.0) and custom.to_dict()["window"] == [-500.0, 1200.0]
    assert Preprocessing.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    # records written before the field existed have no key, and the default record still writes none
    assert "window" not in Preprocessing().to_dict() and "hu_offset" not in Preprocessing().to_dict()
    for bad in ("soft", "40", "40,0", [1, float("nan")], 3):
        with pytest.raises(ValueError, match="Preprocessing.window"):
            Preprocessing(window=bad)
    with pytest.raises(ValueError, match="Preprocessing.hu_offset"):
        Preprocessing(hu_offset=float("inf"))
    assert parse_window(" bone ") == "bone"


def test_16_bit_png_export_with_hu_offset_is_windowed_like_the_dicom(tmp_path, rng):
    frames = ct_frames(rng)
    write_ct(tmp_path / "s.dcm", frames)
    png = tmp_path / "s.png"
    Image.fromarray(frames[0].astype(np.uint16)).save(png)  # a 16-bit export, stored value = HU + 1024
    assert Image.open(png).mode.startswith("I")
    dicom_pixels = np.asarray(load_image(tmp_path / "s.dcm", window="lung"))
    assert np.array_equal(np.asarray(load_image(png, window="lung", hu_offset=-1024)), dicom_pixels)
    # without the offset: today's min-max stretch, whatever the window says
    stored = frames[0].astype(np.float64)
    minmax = np.rint((stored - stored.min()) * 255 / (stored.max() - stored.min())).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(png, window="lung")), minmax)
    assert np.array_equal(np.asarray(load_image(png)), minmax)


# ----------------------------------------------------------------------------------------------- the tools


def tiny_model(path, classes=("neg", "pos"), window=None):
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.models import mobilenet_v2

    model = mobilenet_v2(width_mult=0.35, num_classes=len(classes), seed=1)
    prep = Preprocessing(size=32, resize="stretch", resize_size=32, window=window)
    save_checkpoint(path, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                                     class_names=list(classes), preprocessing=prep.to_dict(),
                                     provenance={"source_file": "random init"}))
    return path


def run_predict(*args):
    return subprocess.run([sys.executable, "-m", "lightcnn.predict", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**__import__("os").environ, "LIGHTCNN_ENGINE": "numpy",
                                                      "PYTHONPATH": str(REPO)})


def test_predict_names_each_frame_and_never_prints_patient_identifiers(tmp_path, rng):
    weights = tiny_model(tmp_path / "tiny.h5")
    frames = ct_frames(rng, n=3)
    frames[1] = 24  # an all-air frame: a different prediction from the others
    write_ct(tmp_path / "scan.dcm", frames)
    write_ct(tmp_path / "one.dcm", ct_frames(rng))
    result = run_predict("--weights", weights, "--window", "lung", "--json", tmp_path / "scan.dcm",
                         tmp_path / "one.dcm", "--cam", tmp_path / "maps")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["file"], r.get("frame")) for r in records] == [
        (str(tmp_path / "scan.dcm"), 1), (str(tmp_path / "scan.dcm"), 2), (str(tmp_path / "scan.dcm"), 3),
        (str(tmp_path / "one.dcm"), None)]
    scores = [r["topk"][0]["score"] for r in records]
    assert scores[0] != scores[1]
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == [
        "one.png", "scan-frame1.png", "scan-frame2.png", "scan-frame3.png"]
    text = run_predict("--weights", weights, tmp_path / "scan.dcm", "--frame", "2")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"{tmp_path / 'scan.dcm'}[frame 2]"
    assert len([line for line in text.stdout.splitlines() if "[frame" in line]) == 1
    for output in (result.stdout, result.stderr, text.stdout, text.stderr,
                   "".join(p.read_text(errors="replace") for p in (tmp_path / "maps").glob("*"))):
        for secret in (PATIENT_NAME, PATIENT_ID, "Secretname"):
            assert secret not in output


def test_predict_corrupt_dicom_and_missing_extra_are_one_line(tmp_path, rng):
    weights = tiny_model(tmp_path / "tiny.h5")
    write_ct(tmp_path / "ok.dcm", ct_frames(rng))
    (tmp_path / "bad.dcm").write_bytes((tmp_path / "ok.dcm").read_bytes()[:300])
    result = run_predict("--weights", weights, tmp_path / "bad.dcm", tmp_path / "ok.dcm")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "bad.dcm") in errors[0]
    assert str(tmp_path / "ok.dcm") in result.stdout  # the good file is still predicted
    # without pydicom: one line saying how to install it
    script = ("import sys; sys.modules['pydicom'] = None; from lightcnn.predict import main; "
              f"sys.exit(main(['--weights', {str(weights)!r}, {str(tmp_path / 'ok.dcm')!r}]))")
    missing = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600,
                             env={**__import__("os").environ, "LIGHTCNN_ENGINE": "numpy", "PYTHONPATH": str(REPO)})
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f'error: {tmp_path / "ok.dcm"}: DICOM input needs pydicom: pip install "lightcnn[dicom]"']


def test_window_travels_with_a_fine_tuned_model_and_evaluate_and_api_read_dicom(tmp_path, rng):
    import lightcnn
    from lightcnn.evaluate import evaluate
    from lightcnn.finetune import main as finetune_main

    weights = tiny_model(tmp_path / "tiny.h5", classes=[f"c{i}" for i in range(10)])
    data = tmp_path / "data"
    for label, scale in (("air", 0), ("tissue", 1)):
        (data / label).mkdir(parents=True)
        for i in range(5):
            f = ct_frames(rng)
            if not scale:
                f[:] = 24 + rng.integers(0, 40, f.shape)
            write_ct(data / label / f"{i}.dcm", f)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert finetune_main([str(data), "--weights", str(weights), "--out", str(out), "--window", "lung",
                              "--epochs", "1", "--bootstrap", "0", "--quiet", "--split", "random",
                              "--fractions", "0.6,0.2,0.2", "--cache-dir", str(tmp_path / "cache")]) == 0
    clf = lightcnn.load(str(out / "best.h5"))
    assert clf.preprocessing.window == "lung"
    # the API reads the DICOM with the model's window: the same batch as the window applied by hand
    path = data / "tissue" / "0.dcm"
    pixels = np.asarray(load_image(path, window="lung"))
    assert np.allclose(clf.preprocess(str(path)), clf.preprocess(pixels[:, :, None].repeat(3, 2)))
    assert not np.allclose(clf.preprocess(str(path)),
                           clf.preprocess(np.asarray(load_image(path, window="bone"))[:, :, None].repeat(3, 2)))
    report, info = evaluate(str(out / "best.h5"), str(data), split="all", n_bootstrap=0)
    assert info["images"] == 10 and sum(map(sum, report["confusion_matrix"])) == 10
    assert PATIENT_ID not in (out / "report.json").read_text() and PATIENT_NAME not in json.dumps(report)
