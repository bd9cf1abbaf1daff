"""python -m lightcnn.serve [--models NAME|FILE.h5 ...] [--models-dir DIR] [--host 127.0.0.1] [--port 8000] [--token T]

A local web page to compare models on your own images, with CAM/Grad-CAM, and its JSON API (lightcnn.web.app).

--models      registered names (their converted weights must be found, see lightcnn.weights.find_weights) and/or
              lightcnn .h5 files, e.g. fine-tuned models; default: every registered model whose weights are found
--models-dir  also serve every *.h5 in DIR (sorted; named by file name without .h5)
--host        default 127.0.0.1 (this machine only). Any other address needs a token: --token T, or one is
              generated and printed; every request must then carry it (the printed URL does)
--port        default 8000
--token       require this token on every request (Authorization: Bearer T, or ?token=T for the page)
--max-upload-mb  larger request bodies get HTTP 413 (default 20)

Clients choose models by the names printed at start; no client-supplied text is ever opened as a path.
Needs the optional extra: pip install "lightcnn[web]" (Starlette, Uvicorn, python-multipart).
Exit codes: 0 stopped normally, 2 usage error (no models, a model not found, the extra missing).
"""

import argparse
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from lightcnn._cli import add_engine_argument, parse_args, positive_float
from lightcnn.errors import LightCNNError

EXTRA_HINT = 'pip install "lightcnn[web]"'
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m lightcnn.serve",
                                     description="A local web page (and JSON API) comparing lightcnn models on "
                                                 "your own images, with CAM/Grad-CAM overlays.")
    parser.add_argument("--models", nargs="+", metavar="NAME|FILE.h5",
                        help="registered model names or .h5 files (default: every registered model that is built)")
    parser.add_argument("--models-dir", metavar="DIR", help="serve every *.h5 file in DIR as well")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--token", help="require this token on every request (generated when --host is not local)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=20.0, metavar="MB",
                        help="largest request body accepted (default 20; larger ones get HTTP 413)")
    add_engine_argument(parser)
    return parser


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def _unique(name, table):
    stem, n = name, 1
    while name in table:
        n += 1
        name = f"{stem}-{n}"
    return name


def resolve_models(names, models_dir):
    """{client-visible name: .h5 path}; raises LightCNNError naming what was not found."""
    from lightcnn.registry import REGISTRY
    from lightcnn.weights import find_weights

    table = {}
    if names is None and models_dir is None:
        for name in REGISTRY:
            try:
                table[name] = find_weights(name)
            except LightCNNError:
                continue
        return table
    for name in names or ():
        path = find_weights(name)
        table[_unique(name if name in REGISTRY else Path(path).stem, table)] = path
    if models_dir is not None:
        folder = Path(models_dir)
        if not folder.is_dir():
            raise LightCNNError(f"--models-dir {folder}: no such directory")
        found = sorted(p for p in folder.glob("*.h5") if p.is_file())
        if not found:
            raise LightCNNError(f"--models-dir {folder}: no .h5 files in it")
        for path in found:
            table[_unique(path.stem, table)] = path
    return table


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    try:
        import multipart  # noqa: F401  (python-multipart; Starlette needs it to parse uploads)
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print(f"error: the web page needs the optional web extra: {EXTRA_HINT}", file=sys.stderr)
        return 2
    try:
        models = resolve_models(args.models, args.models_dir)
    except LightCNNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not models:
        print("error: no model weights found; build some with 'python -m lightcnn.weights build mobilenet_v2 "
              "--fetch' or pass --models FILE.h5", file=sys.stderr)
        return 2
    from lightcnn.web.app import create_app

    token = args.token
    if not is_loopback(args.host) and not token:
        token = secrets.token_urlsafe(24)
        print(f"lightcnn.serve: --host {args.host} is reachable from other machines: generated a token",
              file=sys.stderr)
    allowed = [*LOOPBACK_NAMES, args.host] if is_loopback(args.host) else None
    app = create_app({name: os.fspath(path) for name, path in models.items()}, token=token,
                     max_upload_mb=args.max_upload_mb, engine=args.engine, allowed_hosts=allowed)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"lightcnn.serve: {url}  (models: {', '.join(models)}; Ctrl+C stops)", flush=True)
    from lightcnn.engine import default_engine, stamp_path

    stamp = stamp_path()
    if (args.engine or default_engine()) == "auto" and not (stamp and os.path.exists(stamp)):
        print("note: no compiled kernels yet, so requests run on the NumPy engine; 'python -m lightcnn.compile "
              "--all' once makes them about twice as fast", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    from lightcnn._cli import run_main

    run_main(main)
