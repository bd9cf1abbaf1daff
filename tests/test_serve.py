"""python -m lightcnn.serve: the JSON API through Starlette's TestClient (no server, no sockets), the CLI's
start-up rules, and the page itself in headless Chromium driven by Selenium.

Needs the web extras (pip install -e ".[web-test]"); without them the tests skip. The browser test also needs
/usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver) and skips, saying
which is missing, where they are absent. It leaves a screenshot in its tmp_path and at SCREENSHOT.
"""

import base64
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web-test]'")
pytest.importorskip("multipart", reason="python-multipart (the web extra) is not installed")
pytest.importorskip("httpx", reason="httpx (Starlette's TestClient) is not installed")
from starlette.testclient import TestClient  # noqa: E402

from lightcnn.web.app import create_app  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/lightcnn-serve-screenshot.png")
TWO = ("mobilenet_v2", "squeezenet1_0_caffe")


# -- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(session_weights):
    """{name: .h5} of the registry models the tests use, as the session built them; skip when absent."""
    if session_weights is None:
        pytest.skip("original checkpoints not found (LIGHTCNN_SOURCES): no registry weights to serve")
    table = {name: session_weights / f"{name}.h5" for name in (*TWO, "mobilenet_v3_small")}
    missing = [str(p) for p in table.values() if not p.is_file()]
    if missing:
        pytest.skip(f"weights not built this session: {', '.join(missing)}")
    return table


@pytest.fixture(scope="module")
def images(data_dir):
    folder = data_dir / "smoke-test-images"
    cat, dragonfly = folder / "cat.bmp", folder / "dragonfly.bmp"
    for path in (cat, dragonfly):
        if not path.is_file():
            pytest.skip(f"smoke-test image not found at {path}")
    return {"cat": cat, "dragonfly": dragonfly}


@pytest.fixture(scope="module")
def client(weights):
    with TestClient(create_app(weights)) as c:
        yield c


def post(client, files, **fields):
    """POST /api/predict with `files` [(name, bytes)] and form fields (lists repeat the field)."""
    return client.post("/api/predict", files=[("file", (name, data, "application/octet-stream"))
                                              for name, data in files], data=fields)


def png_size(data_uri):
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(data_uri[len(prefix):]))) as img:
        assert img.format == "PNG"
        return img.size


# -- the API ------------------------------------------------------------------------------------------------------


def test_predict_matches_the_python_api_and_reports_bad_files_one_by_one(client, images, weights):
    import lightcnn

    cat = images["cat"].read_bytes()
    response = post(client, [("cat.bmp", cat), ("notes.png", b"not an image at all"),
                             ("cut.bmp", cat[: len(cat) // 3])], model=list(TWO), topk="3")
    assert response.status_code == 200
    results = response.json()
    assert [(r["file"], r["model"]) for r in results] == [("cat.bmp", TWO[0]), ("cat.bmp", TWO[1]),
                                                          ("notes.png", None), ("cut.bmp", None)]
    assert results[2]["error"] == "notes.png: not a recognised image format (19 bytes)"
    assert results[3]["error"].startswith("cut.bmp: cannot decode, file is truncated or corrupt")
    for result in results[:2]:
        clf = lightcnn.load(str(weights[result["model"]]))
        expected = [p.to_dict() for p in clf.topk(str(images["cat"]), k=3)[0]]
        assert [p["index"] for p in result["topk"]] == [p["index"] for p in expected]
        np.testing.assert_allclose([p["score"] for p in result["topk"]], [p["score"] for p in expected], atol=2e-6)
        assert result["topk"][0]["label"] == "Egyptian cat"
        # the shape of `python -m lightcnn.predict --json`
        assert {"file", "model", "arch", "weights", "weights_sha256", "topk", "decode_ms", "preprocess_ms",
                "inference_ms", "engine"} <= set(result)
        assert result["weights_sha256"] == clf.weights_sha256 and result["arch"] == clf.model.arch
        assert "decision" not in result                      # ImageNet models have no operating point
        cam = result["cam"]
        size = clf.input_shape[0]
        assert png_size(cam["image"]) == png_size(cam["heatmap"]) == (size, size)
        assert cam["class"] == "Egyptian cat" and cam["method"] == "cam"
        np.testing.assert_array_equal(cam["map_shape"], clf.cam(str(images["cat"])).maps.shape[1:])


def test_cam_off_layer_choice_and_request_errors(client, images):
    cat = [("cat.bmp", images["cat"].read_bytes())]
    (plain,) = post(client, cat, model="mobilenet_v2", cam="0").json()
    assert "cam" not in plain and plain["topk"][0]["label"] == "Egyptian cat" and len(plain["topk"]) == 5
    (deep,) = post(client, cat, model="mobilenet_v2", layer="features.blocks.10").json()
    assert deep["cam"]["method"] == "gradcam" and deep["cam"]["layer"] == "features.blocks.10"
    assert deep["cam"]["map_shape"] == [14, 14]

    bad = post(client, cat, model="resnet50")
    assert bad.status_code == 404
    assert bad.json()["error"] == ("unknown model 'resnet50'; this server has: mobilenet_v2, squeezenet1_0_caffe, "
                                   "mobilenet_v3_small")
    # a model field is a name, never a path, even when it names an existing weight file
    for sneaky in (str(REPO / "weights" / "mobilenet_v2.h5"), "../mobilenet_v2", "mobilenet_v2.h5"):
        assert post(client, cat, model=sneaky).status_code == 404
    layer = post(client, cat, model="mobilenet_v2", layer="features.fire9")
    assert layer.status_code == 400 and "has no layer 'features.fire9'" in layer.json()["error"]
    assert "features.blocks.10" in layer.json()["error"]
    for topk in ("0", "21", "five"):
        assert post(client, cat, topk=topk).status_code == 400
    nofile = client.post("/api/predict", data={"model": "mobilenet_v2"}, files={"other": ("x", b"y")})
    assert nofile.status_code == 400 and "'file'" in nofile.json()["error"]
    assert client.post("/api/predict", json={"file": "cat.bmp"}).status_code == 415
    assert client.get("/api/predict").status_code == 405


def test_models_listing(client, weights):
    import lightcnn

    listed = client.get("/api/models").json()
    assert [m["name"] for m in listed] == list(weights)
    for info in listed:
        clf = lightcnn.load(str(weights[info["name"]]))
        assert info["params"] == clf.model.count_params() and info["macs"] == clf.model.count_macs()
        assert info["weights_sha256"] == clf.weights_sha256 and info["weights"] == f"{info['name']}.h5"
        assert info["num_classes"] == 1000 and info["classes"] == clf.class_names[:20]
        assert info["operating_point"] is None and info["metrics"] is None
        assert info["cam"]["layers"][0] in ("features.last", "features.fire9")
    assert listed[0]["cam"] == {"method": "cam", "layer": None, "layers": listed[0]["cam"]["layers"]}
    assert listed[2]["cam"]["method"] == "gradcam"       # MobileNetV3's head is not GAP + linear


def test_a_fine_tuned_model_shows_its_decision_and_metrics(tmp_path, images):
    """A two-class .h5 with an operating point and test metrics (NaN included, which JSON cannot carry)."""
    import lightcnn
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.models import mobilenet_v2
    from lightcnn.preprocess import Preprocessing

    model = mobilenet_v2(width_mult=0.35, num_classes=2, seed=1)
    ckpt = Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(), class_names=["neg", "pos"],
                      preprocessing=Preprocessing(size=32, resize="shorter", resize_size=36).to_dict(),
                      extra={"operating_point": {"class": "pos", "threshold": 0.0},
                             "metrics": {"val": {"accuracy": 0.75, "roc_auc": float("nan")},
                                         "test": {"accuracy": 0.5, "roc_auc": 0.625}},
                             "training": {"lr": 1e-3}, "mode": "head", "best_epoch": 3})
    path = tmp_path / "ct.h5"
    save_checkpoint(path, ckpt)
    with TestClient(create_app({"ct": path})) as c:
        (info,) = c.get("/api/models").json()
        assert info["operating_point"] == {"positive": "pos", "threshold": 0.0}
        assert info["metrics"] == {"val": {"accuracy": 0.75, "roc_auc": None}, "test": {"accuracy": 0.5,
                                                                                       "roc_auc": 0.625}}
        assert info["training"] == {"mode": "head", "best_epoch": 3} and info["classes"] == ["neg", "pos"]
        (result,) = post(c, [("scan.bmp", images["cat"].read_bytes())]).json()
    # threshold 0: the decision is always "pos", whatever the argmax says; the map explains the decision
    assert result["decision"] == {"label": "pos", "positive": "pos", "threshold": 0.0}
    assert result["cam"]["class"] == "pos" and result["cam"]["class_index"] == 1
    expected = lightcnn.load(str(path)).cam(str(images["cat"]))
    assert result["cam"]["map_shape"] == list(expected.maps.shape[1:])


def test_oversized_upload_is_413_with_and_without_content_length(weights, images):
    cat = images["cat"].read_bytes()              # 0.5 MB
    with TestClient(create_app(weights, max_upload_mb=0.25)) as c:
        response = post(c, [("cat.bmp", cat)])
        assert response.status_code == 413
        assert response.json()["error"] == "upload larger than 0.25 MB (the server's --max-upload-mb)"
        boundary = "lightcnnboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cat.bmp\"\r\n"
                "Content-Type: image/bmp\r\n\r\n").encode() + cat + f"\r\n--{boundary}--\r\n".encode()

        def chunks():                           # a generator: sent chunked, without a Content-Length
            for i in range(0, len(body), 65536):
                yield body[i:i + 65536]

        streamed = c.post("/api/predict", content=chunks(),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413
        small = post(c, [("tiny.png", _png((20, 30)))], model="mobilenet_v2")
        assert small.status_code == 200 and "topk" in small.json()[0]


def _png(shape, seed=0):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_uploads_stay_in_memory_and_the_pixel_guard_applies(weights, monkeypatch):
    """A 3 MB upload is above Starlette's 1 MB spool size: it must still never roll over to a temporary file."""
    from PIL import Image

    def rollover(self):
        raise AssertionError("an upload was written to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", rollover)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1000, 1000, 3), np.uint8)).save(buf, "BMP")
    assert len(buf.getvalue()) > 2**21
    with TestClient(create_app(weights, max_pixels=500_000)) as c:
        (result,) = post(c, [("big.bmp", buf.getvalue())], model="mobilenet_v2", cam="0").json()
    assert result["error"] == ("big.bmp: 1000x1000 = 1000000 pixels exceeds max_pixels=500000 "
                               "(possible decompression bomb)")


def test_token_is_required_on_every_request(weights, images):
    token = "s3cret-token"
    with TestClient(create_app(weights, token=token)) as c:
        for path in ("/", "/api/models", "/static/app.js", "/static/style.css"):
            assert c.get(path).status_code == 401
            assert c.get(path, params={"token": "wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, params={"token": token}).status_code == 200
        denied = post(c, [("cat.bmp", images["cat"].read_bytes())])
        assert denied.status_code == 401 and "token" in denied.json()["error"]
        assert denied.headers["www-authenticate"] == "Bearer"
        ok = c.post("/api/predict", headers={"Authorization": f"Bearer {token}"}, data={"cam": "0"},
                    files=[("file", ("cat.bmp", images["cat"].read_bytes(), "image/bmp"))])
        assert ok.status_code == 200 and ok.json()[0]["topk"][0]["label"] == "Egyptian cat"
        page = c.get("/", params={"token": token})
        # the page's own assets carry the token; the Referer never does; nothing is loaded from elsewhere
        assert f'src="static/app.js?token={token}"' in page.text
        assert f'href="static/style.css?token={token}"' in page.text
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["content-security-policy"].startswith("default-src 'self'")


def test_concurrent_requests_each_get_their_own_result(client, images):
    """Two images posted 10 times each from 8 threads: every answer equals the single-request answer,
    Grad-CAM (MobileNetV3) included, which caches activations on the shared model's layers."""
    uploads = {name: path.read_bytes() for name, path in images.items()}
    models = ["mobilenet_v2", "mobilenet_v3_small"]

    def ask(name):
        response = post(client, [(f"{name}.bmp", uploads[name])], model=models, topk="5")
        assert response.status_code == 200
        return [(r["file"], r["model"], r["topk"], r["cam"]["heatmap"]) for r in response.json()]

    single = {name: ask(name) for name in uploads}
    assert single["cat"][0][2][0]["label"] == "Egyptian cat" and single["dragonfly"][0][2][0]["label"] == "dragonfly"
    assert single["cat"][1][3] != single["dragonfly"][1][3]
    order = ["cat", "dragonfly"] * 10
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, order))
    for name, answer in zip(order, answers):
        assert answer == single[name]


# -- the command line ---------------------------------------------------------------------------------------------


def test_without_the_extra_it_says_what_to_install(tmp_path):
    hide = tmp_path / "hide"
    (hide / "starlette").mkdir(parents=True)
    (hide / "starlette" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {"PYTHONPATH": f"{hide}:{REPO}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "lightcnn.serve"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == 'error: the web page needs the optional web extra: pip install "lightcnn[web]"\n'


def _start(monkeypatch, capsys, argv):
    """Run the CLI with uvicorn.run replaced: -> (app, host, port, stdout, stderr)."""
    import uvicorn

    from lightcnn.serve import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    assert main(argv) == 0
    out, err = capsys.readouterr()
    return seen["app"], seen["host"], seen["port"], out, err


def test_cli_binds_locally_and_needs_a_token_elsewhere(weights, monkeypatch, capsys, tmp_path):
    app, host, port, out, _ = _start(monkeypatch, capsys, ["--models", *TWO, "--port", "8123"])
    assert (host, port) == ("127.0.0.1", 8123)
    assert out == f"lightcnn.serve: http://127.0.0.1:8123/  (models: {', '.join(TWO)}; Ctrl+C stops)\n"
    with TestClient(app, base_url="http://127.0.0.1:8123") as c:
        assert [m["name"] for m in c.get("/api/models").json()] == list(TWO)
    with TestClient(app, base_url="http://attacker.example") as c:  # DNS rebinding onto localhost
        assert c.get("/").status_code == 400

    app, host, _, out, err = _start(monkeypatch, capsys, ["--host", "0.0.0.0", "--models", "mobilenet_v2"])
    token = out.split("?token=")[1].split()[0]
    assert host == "0.0.0.0" and len(token) >= 24 and "generated a token" in err
    with TestClient(app, base_url="http://192.0.2.7:8000") as c:
        assert c.get("/api/models").status_code == 401
        assert c.get("/api/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200

    app, _, _, out, _ = _start(monkeypatch, capsys, ["--host", "0.0.0.0", "--token", "given", "--models-dir",
                                                     str(weights["mobilenet_v2"].parent)])
    assert "?token=given " in out
    with TestClient(app) as c:
        names = [m["name"] for m in c.get("/api/models?token=given").json()]
    assert set(TWO) <= set(names)

    from lightcnn.serve import main

    assert main(["--models", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["--models-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --models-dir {tmp_path}: no .h5 files in it\n"


# -- the page in a real browser -----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(weights):
    """The app on a real socket (uvicorn in a background thread) -> its base URL."""
    uvicorn = pytest.importorskip("uvicorn", reason="uvicorn (the web extra) is not installed")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(weights, allowed_hosts=["127.0.0.1"]), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.skip(f"{path} not found: the browser test needs Debian's {package} "
                        "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the web-test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def test_the_page_compares_two_models_in_chromium(server, browser, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 180)
    browser.get(server)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#model-list input[name="model"]')) == 3)
    for name in TWO:
        box = browser.find_element(By.CSS_SELECTOR, f'#model-list input[value="{name}"]')
        if not box.is_selected():
            box.click()
    browser.find_element(By.ID, "files").send_keys(str(images["cat"]))
    wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-done"))

    cells = {c.get_attribute("data-model"): c for c in browser.find_elements(By.CSS_SELECTOR, "#results .cell")}
    assert set(cells) == set(TWO)
    assert cells["mobilenet_v2"].get_attribute("data-top1") == "Egyptian cat"
    assert cells["mobilenet_v2"].find_element(By.CSS_SELECTOR, ".topk li.top1 .label").text == "Egyptian cat"
    assert cells["squeezenet1_0_caffe"].get_attribute("data-top1") == "Egyptian cat"
    widths = browser.execute_script(
        "return [...document.querySelectorAll('#results .cam img')].map(i => [i.className, i.naturalWidth]);")
    assert sorted(widths) == [["cam-base", 224], ["cam-base", 227], ["cam-heat", 224], ["cam-heat", 227]]
    assert "3.49 M" in browser.find_element(By.ID, "model-cards").get_attribute("textContent")

    # the opacity slider blends client-side; the layer chooser asks the server for Grad-CAM at that layer
    heat = cells["mobilenet_v2"].find_element(By.CSS_SELECTOR, ".cam-heat")
    assert heat.value_of_css_property("opacity") == "0.5"
    slider = cells["mobilenet_v2"].find_element(By.CSS_SELECTOR, 'input[type="range"]')
    browser.execute_script("arguments[0].value = 80; arguments[0].dispatchEvent(new Event('input'));", slider)
    assert cells["mobilenet_v2"].find_element(By.CSS_SELECTOR, ".cam-heat").value_of_css_property("opacity") == "0.8"
    Select(cells["mobilenet_v2"].find_element(By.TAG_NAME, "select")).select_by_value("features.blocks.10")
    wait.until(lambda d: "at features.blocks.10 (14×14)" in cells["mobilenet_v2"].find_element(
        By.CSS_SELECTOR, ".cam-caption").text)
    assert cells["mobilenet_v2"].find_element(By.CSS_SELECTOR, ".cam-heat").value_of_css_property("opacity") == "0.8"

    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    shutil.copy(shot, SCREENSHOT)
    browser.set_window_size(390, 1400)                  # phone width: one column
    lefts = browser.execute_script("return [...document.querySelectorAll('#results .cell')].map("
                                   "c => c.getBoundingClientRect().left);")
    assert len(set(lefts)) == 1
    browser.save_screenshot(str(SCREENSHOT.with_name("lightcnn-serve-screenshot-phone.png")))
    assert browser.find_element(By.ID, "status").text.startswith("Done: 1 image(s) × 2 model(s)")
