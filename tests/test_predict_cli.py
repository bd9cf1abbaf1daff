"""`python -m lightcnn.predict` run as a subprocess, as a user would run it.

Real images come from ../shared/data (skipped with the path when absent); bad files are made here. Tests that
need the converted mobilenet_v2.h5 skip with the build command when it is not built.
"""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, require_path, shared_path

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png"}


def run_cli(*args, stdin=None, env=None, timeout=900, module="lightcnn.predict"):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, capture_output=True,
                          env=full_env, cwd=REPO, timeout=timeout)


def out_text(result):
    return result.stdout.decode()


def err_lines(result):
    return [line for line in result.stderr.decode().splitlines() if line.strip()]


def assert_no_traceback(result):
    assert b"Traceback" not in result.stderr, result.stderr.decode()


def json_lines(result):
    return [json.loads(line) for line in out_text(result).splitlines()]


@pytest.fixture(scope="module")
def smoke_dir():
    return require_path(shared_path("LIGHTCNN_DATA", "data") / "smoke-test-images", "smoke-test images")


@pytest.fixture(scope="module")
def v2(v2_weights):
    import lightcnn

    return lightcnn.load(str(v2_weights))


def smoke_images(smoke_dir):
    return sorted(p for p in smoke_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def parse_text(text):
    """Text output -> [(file, [(rank, prob, wnid, label), ...])]."""
    blocks = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        rows = []
        for line in lines[1:]:
            rank, prob, wnid, label = line.strip().split("  ", 3)
            rows.append((int(rank), float(prob), wnid, label))
        blocks.append((lines[0], rows))
    return blocks


# -- results ---------------------------------------------------------------------------------------------------


def test_text_output_on_the_smoke_images(smoke_dir, v2, v2_weights):
    result = run_cli(smoke_dir)
    assert result.returncode == 0, result.stderr.decode()
    assert err_lines(result) == []
    blocks = parse_text(out_text(result))
    files = smoke_images(smoke_dir)
    assert [Path(b[0]) for b in blocks] == files                 # a directory: its image files, sorted
    library = v2.topk([str(f) for f in files], k=5)
    for (name, rows), lib in zip(blocks, library):
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        probs = [r[1] for r in rows]
        assert probs == sorted(probs, reverse=True) and 0 <= probs[-1] and probs[0] <= 1
        assert [(r[2], r[3]) for r in rows] == [(p.wnid, p.label) for p in lib], name
        np.testing.assert_allclose(probs, [p.score for p in lib], atol=5e-5)
    # Against the reference runtime's top-1 (TFLite, its own crop): 9 of 10 agree (grace_hopper is a near tie
    # between "military uniform" and "mortarboard" that the crop decides).
    with open(smoke_dir / "expected_top1.csv", newline="") as f:
        expected = {row["image"]: int(row["top1_class_index_1000"]) for row in csv.DictReader(f)
                    if "mobilenet_v2_quant_tflite" in row["model"]}
    got = {Path(name).name: lib[0].index for (name, _), lib in zip(blocks, library)}
    agree = sum(got[name] == idx for name, idx in expected.items())
    assert agree >= 9, (got, expected)


def test_json_lines_validate(smoke_dir, v2, v2_weights):
    names = ["parrot.jpg", "cat.bmp", "hot_dog.jpg"]            # argument order is output order
    result = run_cli(*[smoke_dir / n for n in names], "--json", "--topk", "3")
    assert result.returncode == 0, result.stderr.decode()
    records = json_lines(result)
    assert [Path(r["file"]).name for r in records] == names
    sha = hashlib.sha256(Path(v2_weights).read_bytes()).hexdigest()
    library = v2.topk([str(smoke_dir / n) for n in names], k=3)
    for record, lib in zip(records, library):
        assert set(record) == {"file", "model", "arch", "weights", "weights_sha256", "topk", "decode_ms",
                               "preprocess_ms", "inference_ms", "batch_size", "engine"}
        assert record["engine"] == os.environ["LIGHTCNN_ENGINE"]  # pinned by conftest (numba unless overridden)
        assert record["model"] == "mobilenet_v2" and record["arch"] == "mobilenet_v2"
        assert Path(record["weights"]).resolve() == Path(v2_weights).resolve()
        assert record["weights_sha256"] == sha
        assert record["batch_size"] == 3
        for key in ("decode_ms", "preprocess_ms", "inference_ms"):
            assert isinstance(record[key], float) and record[key] >= 0
        assert len(record["topk"]) == 3
        for entry, pred in zip(record["topk"], lib):
            assert set(entry) == {"index", "wnid", "label", "score"}
            assert (entry["index"], entry["wnid"], entry["label"]) == (pred.index, pred.wnid, pred.label)
            assert entry["label"] == v2.class_names[entry["index"]]
            assert entry["score"] == pytest.approx(pred.score, abs=1e-6)
        scores = [e["score"] for e in record["topk"]]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
    assert [r["topk"][0]["label"] for r in records] == ["macaw", "Egyptian cat", "hotdog"]


def test_stdin_and_threads_give_the_same_answer(smoke_dir, v2_weights):
    cat = smoke_dir / "cat.bmp"
    by_path = json_lines(run_cli(cat, "--json"))[0]
    piped = run_cli("-", "--json", "--threads", "1", stdin=cat.read_bytes())
    assert piped.returncode == 0, piped.stderr.decode()
    record = json_lines(piped)[0]
    assert record["file"] == "-"
    assert [e["index"] for e in record["topk"]] == [e["index"] for e in by_path["topk"]]
    np.testing.assert_allclose([e["score"] for e in record["topk"]], [e["score"] for e in by_path["topk"]],
                               atol=2e-6)


def test_directories_recurse_and_globs_expand(tmp_path, smoke_dir, v2_weights):
    root = tmp_path / "imgs"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    shutil.copy(smoke_dir / "hot_dog.jpg", root / "a.jpg")
    shutil.copy(smoke_dir / "owl.jpg", root / "a" / "z.JPG")    # extensions are case-insensitive
    shutil.copy(smoke_dir / "bird.bmp", root / "b" / "x.bmp")
    shutil.copy(smoke_dir / "cat.bmp", root / ".hidden" / "c.bmp")
    (root / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    result = run_cli(root, f"{root}/**/*.bmp", f"{tmp_path}/nothing*.png", tmp_path / "empty", "--json", "--topk", "1")
    assert result.returncode == 1                                  # the pattern and the folder found nothing
    files = [Path(r["file"]).relative_to(tmp_path).as_posix() for r in json_lines(result)]
    assert files == ["imgs/a.jpg", "imgs/a/z.JPG", "imgs/b/x.bmp",  # the directory, sorted, hidden skipped
                     "imgs/b/x.bmp"]                               # the glob (** recursive, hidden skipped)
    errors = err_lines(result)
    assert len(errors) == 2, errors
    assert errors[0].startswith("error: ") and "nothing*.png" in errors[0] and "no image files" in errors[0]
    assert str(tmp_path / "empty") in errors[1] and "no image files" in errors[1]
    assert_no_traceback(result)


def test_bad_images_fail_one_line_each_and_the_rest_is_predicted(tmp_path, smoke_dir, v2_weights):
    good = tmp_path / "good.bmp"
    shutil.copy(smoke_dir / "cat.bmp", good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not a PNG\n")
    truncated = tmp_path / "truncated.jpg"
    data = (smoke_dir / "hot_dog.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    missing = tmp_path / "missing.jpg"
    result = run_cli(empty, good, text, truncated, missing, "--topk", "1")
    assert result.returncode == 1
    blocks = parse_text(out_text(result))
    assert [b[0] for b in blocks] == [str(good)] and blocks[0][1][0][3] == "Egyptian cat"
    errors = err_lines(result)
    assert len(errors) == 4, errors
    # the missing file is reported while arguments are expanded, the others in order as they are read
    assert str(missing) in errors[0] and "no such file" in errors[0]
    for line, path in zip(errors[1:], (empty, text, truncated)):
        assert line.startswith(f"error: {path}: "), line
    assert "empty" in errors[1] and "not a recognised image" in errors[2] and "truncated" in errors[3]
    assert_no_traceback(result)


def test_a_fine_tuned_model_brings_its_classes_and_preprocessing(tmp_path, smoke_dir):
    """A one-channel, 96x96, 3-class model saved the way lightcnn saves a fine-tuned head."""
    import lightcnn
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.models import build
    from lightcnn.preprocess import Preprocessing

    model = build("mobilenet_v2", num_classes=1000, width_mult=0.35, in_channels=1, seed=4)
    model.reset_head(3, dropout=0.1, seed=4)
    spec = Preprocessing(size=96, resize="stretch", resize_size=96, channel_order="L", mean=(0.5,), std=(0.25,))
    path = tmp_path / "xray_finetuned.h5"
    save_checkpoint(path, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                                     class_names=["normal", "pneumonia", "covid"], preprocessing=spec.to_dict()))
    images = [smoke_dir / "cat.bmp", smoke_dir / "owl.jpg"]
    result = run_cli("--weights", path, *images, "--json")
    assert result.returncode == 0, result.stderr.decode()
    records = json_lines(result)
    library = lightcnn.load(str(path)).topk([str(i) for i in images], k=5)
    for record, lib in zip(records, library):
        assert record["model"] == "xray_finetuned" and record["weights"] == str(path)
        assert len(record["topk"]) == 3                           # --topk 5 is clamped to the 3 classes
        assert {e["label"] for e in record["topk"]} == {"normal", "pneumonia", "covid"}
        assert all(e["wnid"] == e["label"] for e in record["topk"])  # no WordNet IDs: the name stands in
        assert [e["index"] for e in record["topk"]] == [p.index for p in lib]
        np.testing.assert_allclose([e["score"] for e in record["topk"]], [p.score for p in lib], atol=2e-6)


# -- CAM -------------------------------------------------------------------------------------------------------


def test_cam_writes_overlay_and_raw_map(tmp_path, smoke_dir, v2):
    from PIL import Image

    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(smoke_dir / "cat.bmp", other / "cat.bmp")
    cams = tmp_path / "cams"
    result = run_cli(smoke_dir / "cat.bmp", smoke_dir / "hot_dog.jpg", other / "cat.bmp", "--cam", cams, "--json")
    assert result.returncode == 0, result.stderr.decode()
    records = json_lines(result)
    assert [Path(r["cam"]["png"]).name for r in records] == ["cat.png", "hot_dog.png", "cat-2.png"]
    expected = v2.cam([str(smoke_dir / "cat.bmp"), str(smoke_dir / "hot_dog.jpg")])
    for i, record in enumerate(records[:2]):
        cam = record["cam"]
        assert cam["method"] == "cam" and cam["layer"] == "features.last"
        assert cam["class_index"] == record["topk"][0]["index"] == expected.class_index[i]
        raw = np.load(cam["npy"])
        assert raw.shape == (7, 7)
        np.testing.assert_allclose(raw, expected.maps[i], rtol=1e-5, atol=1e-5)
        with Image.open(cam["png"]) as img:
            assert img.mode == "RGB" and img.size == (224, 224)
    # the same picture from another folder: same map (float32 rounding differs with the position in the batch)
    np.testing.assert_allclose(np.load(records[2]["cam"]["npy"]), np.load(records[0]["cam"]["npy"]), rtol=1e-5,
                               atol=1e-4)


def test_cam_layer_gives_grad_cam_there(tmp_path, smoke_dir, v2):
    cams = tmp_path / "cams"
    result = run_cli(smoke_dir / "pets.jpg", "--cam", cams, "--cam-layer", "features.blocks.10", "--json")
    assert result.returncode == 0, result.stderr.decode()
    cam = json_lines(result)[0]["cam"]
    assert cam["method"] == "gradcam" and cam["layer"] == "features.blocks.10"
    expected = v2.cam(str(smoke_dir / "pets.jpg"), layer="features.blocks.10")
    raw = np.load(cam["npy"])
    assert raw.shape == (14, 14) and raw.min() >= 0
    np.testing.assert_allclose(raw, expected.maps[0], rtol=1e-4, atol=1e-6 * raw.max())

    bad = run_cli(smoke_dir / "pets.jpg", "--cam", cams, "--cam-layer", "features.nope")
    assert bad.returncode == 2 and "features.nope" in bad.stderr.decode()
    assert_no_traceback(bad)
    flat = run_cli(smoke_dir / "pets.jpg", "--cam", cams, "--cam-layer", "head.classifier")
    assert flat.returncode == 1 and "spatial" in flat.stderr.decode()
    assert parse_text(out_text(flat))[0][1][0][3] == "Italian greyhound"   # the prediction is still printed
    assert_no_traceback(flat)


@pytest.mark.parametrize("name,method,shape", [("squeezenet1_0_caffe", "cam", (15, 15)),
                                               ("mobilenet_v3_small", "gradcam", (7, 7))])
def test_cam_for_other_heads(tmp_path, smoke_dir, name, method, shape):
    """SqueezeNet: the class channel of its 1x1-conv head (15x15 with the Caffe padding); MobileNetV3's
    hidden dense layer makes CAM undefined, so Grad-CAM at its default layer is used."""
    from lightcnn.errors import CheckpointError
    from lightcnn.weights import find_weights

    try:
        find_weights(name)
    except CheckpointError as exc:
        pytest.skip(str(exc))
    result = run_cli(smoke_dir / "hot_dog.jpg", "--model", name, "--cam", tmp_path, "--json")
    assert result.returncode == 0, result.stderr.decode()
    record = json_lines(result)[0]
    assert record["topk"][0]["label"] == "hotdog"
    assert record["cam"]["method"] == method
    raw = np.load(record["cam"]["npy"])
    assert raw.shape == shape and raw.max() > 0


# -- weights and usage errors ----------------------------------------------------------------------------------


def test_missing_weights_say_what_where_and_how_to_build(tmp_path, smoke_dir):
    empty, cache = tmp_path / "weights", tmp_path / "cache"
    empty.mkdir()
    result = run_cli(smoke_dir / "cat.bmp", env={"LIGHTCNN_WEIGHTS": str(empty), "LIGHTCNN_CACHE": str(cache),
                                                  "LIGHTCNN_SOURCES": str(tmp_path / "none")})
    assert result.returncode == 1
    assert out_text(result) == ""
    errors = err_lines(result)
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith("error: ") and "mobilenet_v2.h5" in line
    assert str(empty) in line and str(cache / "weights") in line
    assert "python -m lightcnn.weights build mobilenet_v2" in line
    assert not cache.exists() or not any(cache.rglob("*")), "nothing may be downloaded implicitly"


def test_corrupt_or_missing_weight_files(tmp_path, smoke_dir):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(300))
    for weights, reason in ((bad, "not a readable HDF5"), (tmp_path / "absent.h5", "no such")):
        result = run_cli(smoke_dir / "cat.bmp", "--weights", weights)
        assert result.returncode == 1
        errors = err_lines(result)
        assert len(errors) == 1 and str(weights) in errors[0] and reason in errors[0], errors
        assert_no_traceback(result)


@pytest.mark.parametrize("args", [
    [],                                              # no IMAGE
    ["x.jpg", "--topk", "0"],
    ["x.jpg", "--topk", "many"],
    ["x.jpg", "--threads", "0"],
    ["x.jpg", "--model", "mobilenet_v2", "--weights", "w.h5"],
    ["-", "-"],
    ["x.jpg", "--cam-layer", "features.last"],      # without --cam
    ["x.jpg", "--model", "no_such_model"],
    ["x.jpg", "--bogus"],
])
def test_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr.decode()
    assert out_text(result) == ""
    assert "error" in result.stderr.decode()
    assert_no_traceback(result)


def test_importing_the_cli_is_light():
    """A one-image run should not pay for imports it does not need before parsing arguments."""
    code = ("import sys, lightcnn.predict; "
            "print(sorted(m for m in ('numpy', 'numba', 'h5py', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=60)
    assert result.stdout.decode().strip() == "[]", result.stderr.decode()


def test_progress_goes_to_stderr_for_many_images(tmp_path, smoke_dir, v2_weights):
    folder = tmp_path / "many"
    folder.mkdir()
    sources = smoke_images(smoke_dir)
    for i in range(21):
        src = sources[i % len(sources)]
        shutil.copy(src, folder / f"{i:02d}{src.suffix}")
    result = run_cli(folder, "--topk", "1", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert len(json_lines(result)) == 21                           # stdout holds only results
    progress = [line for line in err_lines(result) if line.startswith("predict: ")]
    assert progress and progress[-1].startswith("predict: 21/21 images")


# -- the whole ImageNet sample in one invocation ---------------------------------------------------------------


@pytest.mark.slow
def test_cli_top1_on_the_imagenet_sample_equals_the_library(v2, v2_weights):
    from lightcnn.registry import REGISTRY

    sample = require_path(shared_path("LIGHTCNN_DATA", "data") / "imagenet-sample", "ImageNet sample")
    with open(sample / "labels.csv", newline="") as f:
        labels = {row["file"]: int(row["class_index"]) for row in csv.DictReader(f)}
    start = time.perf_counter()
    result = run_cli(sample / "images", "--json", "--topk", "1", timeout=3600)
    cli_seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    records = json_lines(result)
    assert len(records) == len(labels) == 1000
    files = [Path(r["file"]) for r in records]
    assert files == sorted(files)
    cli_top1 = [r["topk"][0]["index"] for r in records]
    library_top1 = [p[0].index for p in v2.topk([str(f) for f in files], k=1)]
    mismatched = [(f.name, c, l) for f, c, l in zip(files, cli_top1, library_top1) if c != l]
    assert not mismatched, mismatched[:10]
    accuracy = 100 * np.mean([labels[f.name] == c for f, c in zip(files, cli_top1)])
    print(f"\nCLI: 1000 images in {cli_seconds:.1f} s, top-1 {accuracy:.1f} %")
    assert abs(accuracy - REGISTRY["mobilenet_v2"].sample_top1) <= 2.0, accuracy


@pytest.mark.parametrize("cam_layer", [None, "features.blocks.3"], ids=["cam", "gradcam"])
def test_cam_explains_the_decided_class_and_says_which(tmp_path, capsys, cam_layer):
    """A two-class model whose stored operating point overrules the argmax for this image: the map, the "cam"
    record and the text output all follow the decision, as lightcnn.Classifier.cam does."""
    import lightcnn
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.models import mobilenet_v2
    from lightcnn.predict import main as predict_main
    from lightcnn.preprocess import Preprocessing

    rng = np.random.default_rng(3)
    image = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    model = mobilenet_v2(width_mult=0.35, num_classes=2, seed=1)
    ckpt = Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=["neg", "pos"],
                      preprocessing=Preprocessing(size=32, resize="shorter", resize_size=36).to_dict())
    path = tmp_path / "two.h5"
    save_checkpoint(path, ckpt)
    p_pos = float(lightcnn.load(str(path)).predict(str(image))[0, 1])
    top1 = int(p_pos >= 0.5)
    # a threshold on P(pos) that decides the other class than argmax does
    threshold = (1.0 + p_pos) / 2 if top1 == 1 else p_pos / 2
    ckpt.extra = {"operating_point": {"class": "pos", "threshold": threshold}}
    save_checkpoint(path, ckpt)
    clf = lightcnn.load(str(path))
    decided = 1 - top1

    layer_args = ["--cam-layer", cam_layer] if cam_layer else []
    assert predict_main(["--weights", str(path), str(image), "--json", "--cam", str(tmp_path / "maps"),
                         *layer_args]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["topk"][0]["index"] == top1 and record["decision"]["label"] == clf.class_names[decided]
    assert record["cam"]["class_index"] == decided and record["cam"]["class"] == clf.class_names[decided]
    expected = clf.cam(str(image), layer=cam_layer)   # the API's default is the decided class too
    assert list(expected.class_index) == [decided]
    np.testing.assert_allclose(np.load(record["cam"]["npy"]), expected.maps[0], rtol=1e-5, atol=1e-6)
    argmax_map = clf.cam(str(image), class_index=top1, layer=cam_layer).maps[0]
    assert not np.allclose(argmax_map, expected.maps[0])

    assert predict_main(["--weights", str(path), str(image), "--cam", str(tmp_path / "maps2"), *layer_args]) == 0
    assert f"({clf.class_names[decided]})" in capsys.readouterr().out.splitlines()[-1]


# --------------------------------------------------------------------------- engines from the command line


def test_fresh_cache_predicts_on_numpy_and_a_long_job_says_compile_would_help(smoke_dir, v2_weights, tmp_path):
    """auto with an empty kernel cache: the NumPy engine, nothing compiled, and for more than 50 images one
    note naming `python -m lightcnn.compile`; a one-image job prints no note."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "many"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    for i in range(51):
        Image.fromarray(np.roll(pixels, i, axis=0)).save(folder / f"{i:02d}.png")
    env = {"LIGHTCNN_ENGINE": "auto", "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    many = run_cli(folder, "--json", "--topk", "1", env=env)
    assert many.returncode == 0, many.stderr.decode()
    assert {r["engine"] for r in json_lines(many)} == {"numpy"}
    notes = [line for line in err_lines(many) if line.startswith("note:")]
    assert len(notes) == 1 and "python -m lightcnn.compile mobilenet_v2" in notes[0], err_lines(many)
    assert not list((tmp_path / "numba-cache").rglob("*.nbi")), "auto compiled kernels"
    one = run_cli(smoke_dir / "cat.bmp", "--json", env=env)
    assert one.returncode == 0 and json_lines(one)[0]["engine"] == "numpy"
    assert json_lines(one)[0]["topk"][0]["label"] == "Egyptian cat"
    assert not [line for line in err_lines(one) if line.startswith("note:")]


def test_engine_option_pins_the_engine(smoke_dir, v2_weights):
    results = {}
    for engine in ("numpy", "numba"):
        result = run_cli(smoke_dir / "cat.bmp", "--json", "--engine", engine)
        assert result.returncode == 0, result.stderr.decode()
        results[engine] = json_lines(result)[0]
        assert results[engine]["engine"] == engine
    a, b = ([p["score"] for p in results[e]["topk"]] for e in ("numpy", "numba"))
    assert [p["index"] for p in results["numpy"]["topk"]] == [p["index"] for p in results["numba"]["topk"]]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
