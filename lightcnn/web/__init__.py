"""The local comparison page (``python -m lightcnn.serve``): a Starlette app in `lightcnn.web.app` and its
plain HTML/CSS/JS in `lightcnn/web/static/` (no build step, nothing fetched from the network).

Importing this package imports nothing; `lightcnn.web.app` needs the optional extra ``pip install "lightcnn[web]"``.
"""
