"""The web page's server: a Starlette app comparing lightcnn models on uploaded images, with CAM/Grad-CAM.

    create_app({"mobilenet_v2": "weights/mobilenet_v2.h5", ...}, token=None, max_upload_mb=20) -> Starlette app

Routes
    GET  /               the page (lightcnn/web/static/index.html; its assets under /static/)
    GET  /api/models     [{name, arch, weights, weights_sha256, params, macs, input_shape, num_classes, classes
                          (first CLASSES_SHOWN), operating_point, metrics, training, cam {method, layer, layers}}]
    POST /api/predict    multipart: one or more `file`, optional `model` (repeatable; default: the first model),
                         `topk` (default 5), `layer` (Grad-CAM layer; default: the model's own choice), `cam`
                         ("0" turns the maps off) -> a JSON list, per file and model, shaped like
                         `python -m lightcnn.predict --json` plus `cam.image` and `cam.heatmap` PNG data URIs
                         (the model's input crop and the coloured map at the same size; the page blends them).
                         A file that is not an image gives {"file", "model": null, "error"} in the list.

Safety (the page may be opened on a hospital network)
    * a token, when set, is required on every request: ``Authorization: Bearer T`` or ``?token=T``; else 401;
    * a body over max_upload_mb is refused with 413 (before it is read when Content-Length says so, else as soon
      as the stream passes the limit); images over max_pixels are refused per file (load_image's bomb guard);
    * clients name models; names are looked up in the table given to create_app, never opened as paths;
    * uploads are parsed into memory (the multipart parser's spool limit is raised above the upload limit, so no
      temporary file is written) and nothing is saved;
    * every model runs on its own single worker thread. That serialises the model's requests: Grad-CAM runs a
      training-mode forward that caches activations on the layer objects and temporarily replaces methods of the
      target layer, so two Grad-CAMs (or a Grad-CAM and a forward) on one model must not overlap; the single thread
      also keeps the model's per-thread inference plan (models/base.py) built once instead of once per pool
      thread. Different models run in parallel.

This module does not do authentication beyond one shared token, TLS (put a reverse proxy in front), batching of
concurrent requests, or any storage of images or results.
"""

import asyncio
import base64
import hmac
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lightcnn.errors import LightCNNError
from lightcnn.preprocess import DEFAULT_MAX_PIXELS, load_image

STATIC = Path(__file__).resolve().parent / "static"
CLASSES_SHOWN = 20          # /api/models lists this many class names (ImageNet has 1000)
MAX_FILES = 32              # files per request
MAX_TOPK = 20
PNG_LEVEL = 3               # zlib level of the data-URI PNGs: 224x224 in ~5 ms, ~1.2x larger than level 9


# -- one served model ----------------------------------------------------------------------------------------------


def _data_uri(pixels_or_image):
    from PIL import Image

    img = pixels_or_image if hasattr(pixels_or_image, "save") else Image.fromarray(pixels_or_image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _jsonable(value):
    """Checkpoint metadata -> plain JSON (numpy scalars to Python, NaN/inf to None: JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cam_layers(model):
    """Layers worth offering for Grad-CAM, deepest first: each unit of the features network, with a sequential
    stage (MobileNet's `blocks`) opened into its blocks. Names as in ``python -m lightcnn.summary``."""
    names = []
    for name, layer in model.features_net.children():
        if hasattr(layer, "layers"):
            names += [f"features.{name}.{sub}" for sub, _ in layer.children()]
        else:
            names.append(f"features.{name}")
    return names[::-1]


class ServedModel:
    """One model of the table: loaded on first use, then used only from its own worker thread."""

    def __init__(self, name, path, engine=None):
        self.name = name
        self.path = Path(path)
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lightcnn-{name}")
        self._clf = None
        self._info = None

    async def run(self, fn, *args):
        """fn(*args) on this model's worker thread (see the module docstring for why one thread)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def classifier(self):
        if self._clf is None:
            from lightcnn.api import load

            self._clf = load(str(self.path), engine=self.engine)
        return self._clf

    def info(self):
        """What the page's model panel shows (computed once)."""
        if self._info is None:
            from lightcnn.explain import cam_head_kind

            clf = self.classifier()
            model, extra = clf.model, clf.checkpoint.extra or {}
            op = clf.operating_point
            kind = cam_head_kind(model)
            self._info = _jsonable({
                "name": self.name, "arch": model.arch, "weights": self.path.name,
                "weights_sha256": clf.weights_sha256, "params": model.count_params(), "macs": model.count_macs(),
                "input_shape": list(clf.input_shape), "num_classes": len(clf.class_names),
                "classes": clf.class_names[:CLASSES_SHOWN],
                "operating_point": {"positive": op[0], "threshold": op[1]} if op else None,
                "metrics": extra.get("metrics"),
                "training": ({"mode": extra.get("mode"), "best_epoch": extra.get("best_epoch")}
                             if "training" in extra else None),
                "cam": {"method": "cam" if kind else "gradcam", "layer": None if kind else model.cam_layer,
                        "layers": cam_layers(model)},
            })
        return self._info

    def predict(self, image, filename, k, want_cam, layer, decode_ms):
        """One decoded image -> the result object (predict --json's fields, plus the CAM as data URIs)."""
        from lightcnn import explain as ex
        from lightcnn.postprocess import softmax, topk
        from lightcnn.preprocess import normalise_pixels, preprocess_uint8

        clf = self.classifier()
        model, spec = clf.model, clf.preprocessing
        t0 = time.perf_counter()
        pixels = preprocess_uint8(image, spec)
        x = normalise_pixels(pixels, spec)[None]
        t1 = time.perf_counter()
        method = None
        if want_cam:
            method = "cam" if layer is None and ex.cam_head_kind(model) else "gradcam"
        feats = model.features(x) if method == "cam" else None       # CAM reuses the forward's features
        logits = model.head(feats) if feats is not None else model.forward(x)
        t2 = time.perf_counter()
        from lightcnn.api import finite_scores

        probs = finite_scores(softmax(logits), self.path.name)  # overflowing weights: an error, never NaN in JSON
        decided = int(clf.decide(probs)[0])
        record = {"file": filename, "model": self.name, "arch": model.arch, "weights": self.path.name,
                  "weights_sha256": clf.weights_sha256,
                  "topk": [p.to_dict() for p in topk(probs, k, clf.class_names, clf.class_ids)[0]],
                  "decode_ms": round(decode_ms, 3), "preprocess_ms": round((t1 - t0) * 1e3, 3),
                  "inference_ms": round((t2 - t1) * 1e3, 3), "batch_size": 1, "engine": model.last_engine}
        if clf.operating_point is not None:
            positive, threshold = clf.operating_point
            record["decision"] = {"label": clf.class_names[decided], "positive": positive, "threshold": threshold}
        if method:
            t3 = time.perf_counter()
            if method == "cam":
                explanation = ex.class_activation_map(model, class_index=decided, features=feats)
            else:
                explanation = ex.grad_cam(model, x, decided, layer)
            rgb = ex.display_pixels(pixels, spec.channel_order)
            heat = ex.heatmap_image(ex.upsample_map(ex.normalise_map(explanation.maps[0]), rgb.shape[:2]))
            record["cam"] = {"method": method, "layer": explanation.layer, "class_index": decided,
                             "class": clf.class_names[decided], "map_shape": list(explanation.maps.shape[1:]),
                             "ms": round((time.perf_counter() - t3) * 1e3, 3),
                             "image": _data_uri(rgb), "heatmap": _data_uri(heat)}
        return record


# -- request handling ---------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class _InMemoryParser(MultiPartParser):
    """Starlette's multipart parser with the spool limit above the upload limit: files stay in memory."""

    def __init__(self, headers, stream, limit):
        super().__init__(headers, stream, max_files=MAX_FILES, max_fields=64, max_part_size=64 * 1024)
        self.spool_max_size = limit + 1


def _error(status, message):
    return JSONResponse({"error": message}, status_code=status)


def _too_large(limit):
    return _error(413, f"upload larger than {limit / 2**20:g} MB (the server's --max-upload-mb)")


async def _read_form(request, limit):
    """The multipart form, with the body limited to `limit` bytes; raises _TooLarge."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge

    async def bounded():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise _TooLarge
            yield chunk

    return await _InMemoryParser(request.headers, bounded(), limit).parse()


def _decode(data, filename, max_pixels):
    t0 = time.perf_counter()
    image = load_image(data, max_pixels=max_pixels, name=filename)
    return image, (time.perf_counter() - t0) * 1e3


class _RequireToken:
    """ASGI middleware: every HTTP request carries the token (Bearer header or ?token=), else 401."""

    def __init__(self, app, token):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            request = Request(scope)
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), self.token):
                response = JSONResponse({"error": "missing or wrong token: send 'Authorization: Bearer <token>' "
                                                  "or open the page as /?token=<token>"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SecurityHeaders:
    """No external resources (CSP), no token in Referer headers, no MIME sniffing."""

    HEADERS = [(b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                            b"base-uri 'none'; frame-ancestors 'none'"),
               (b"referrer-policy", b"no-referrer"), (b"x-content-type-options", b"nosniff")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.HEADERS
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def create_app(models, token=None, max_upload_mb=20, max_pixels=DEFAULT_MAX_PIXELS, engine=None,
               allowed_hosts=None):
    """The Starlette app serving `models` ({client-visible name: .h5 path}, in display order).

    token          when given, required on every request (see _RequireToken)
    max_upload_mb  request bodies above this get 413
    max_pixels     per-image decompression-bomb guard (lightcnn.preprocess.load_image)
    engine         inference engine of every model (None: lightcnn's default, "auto")
    allowed_hosts  Host header values accepted (None: any); the CLI restricts a loopback server to loopback
                   names, so a web page that rebinds its DNS name to 127.0.0.1 cannot reach it
    """
    if not models:
        raise ValueError("create_app: no models to serve")
    served = {name: ServedModel(name, path, engine) for name, path in models.items()}
    limit = int(max_upload_mb * 2**20)
    index_html = (STATIC / "index.html").read_text(encoding="utf-8")
    if token:  # the page's own assets are requests too: they carry the token in their URL
        query = "?token=" + quote(token, safe="")
        index_html = index_html.replace('href="static/style.css"', f'href="static/style.css{query}"')
        index_html = index_html.replace('src="static/app.js"', f'src="static/app.js{query}"')

    async def page(request):
        return HTMLResponse(index_html, headers={"Cache-Control": "no-store"})

    async def list_models(request):
        infos = await asyncio.gather(*(m.run(m.info) for m in served.values()))
        return JSONResponse(list(infos))

    async def predict(request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(415, "POST multipart/form-data with one or more 'file' fields")
        try:
            form = await _read_form(request, limit)
        except _TooLarge:
            return _too_large(limit)
        except MultiPartException as exc:
            return _error(400, f"bad multipart body: {exc.message}")
        try:
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not files:
                return _error(400, "no 'file' field: send one or more images as multipart 'file' fields")
            names = [str(n) for n in form.getlist("model")] or [next(iter(served))]
            unknown = [n for n in names if n not in served]
            if unknown:
                return _error(404, f"unknown model {unknown[0]!r}; this server has: {', '.join(served)}")
            names = list(dict.fromkeys(names))
            try:
                k = int(form.get("topk") or 5)
            except ValueError:
                k = 0
            if not 1 <= k <= MAX_TOPK:
                return _error(400, f"topk must be an integer from 1 to {MAX_TOPK}, got {form.get('topk')!r}")
            want_cam = str(form.get("cam", "1")).lower() not in ("0", "false", "no", "off")
            layer = str(form.get("layer") or "").strip() or None
            if layer is not None:
                for name in names:
                    layers = (await served[name].run(served[name].info))["cam"]["layers"]
                    if layer not in layers:
                        return _error(400, f"model {name!r} has no layer {layer!r} for Grad-CAM; its layers are: "
                                           f"{', '.join(layers)}")
            uploads = [(f.filename or f"file{i + 1}", await f.read()) for i, f in enumerate(files)]
        finally:
            await form.close()
        results = []
        for filename, data in uploads:
            try:
                image, decode_ms = await run_in_threadpool(_decode, data, filename, max_pixels)
            except (LightCNNError, OSError, ValueError) as exc:
                results.append({"file": filename, "model": None, "error": " ".join(str(exc).split())})
                continue
            del data

            async def one(name, image=image, filename=filename, decode_ms=decode_ms):
                try:  # each worker gets its own copy: PIL images are not shared across threads
                    return await served[name].run(served[name].predict, image.copy(), filename, k, want_cam,
                                                  layer, decode_ms)
                except (LightCNNError, ValueError) as exc:
                    return {"file": filename, "model": name, "error": " ".join(str(exc).split())}

            results.extend(await asyncio.gather(*(one(name) for name in names)))
        return JSONResponse(results)

    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    if token:
        middleware.append(Middleware(_RequireToken, token=token))
    app = Starlette(routes=[Route("/", page), Route("/api/models", list_models),
                            Route("/api/predict", predict, methods=["POST"]),
                            Mount("/static", StaticFiles(directory=STATIC), name="static")],
                    middleware=middleware)
    app.state.models = served
    return app
