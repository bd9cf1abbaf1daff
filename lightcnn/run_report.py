"""What a finished run leaves for a reader: the plots (lightcnn.plots), a CAM grid and RUN_DIR/report.html.

    report.json body + run facts --> roc.png, pr.png, confusion.png, curves.png, cam_grid.png   (matplotlib)
                                 --> report.html: one self-contained page (images inlined as data URIs, no
                                     script, no external file), written atomically

Without matplotlib the page is still written, without pictures, and `PLOT_HINT` says how to get them.
The page shows file paths, counts, metrics and settings only; nothing from inside an image file (a DICOM
header's patient attributes never reach it).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path

import numpy as np

from lightcnn.checkpoint import atomic_write_text

METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


def cam_rows(clf, paths, scores, k=3, names=None):
    """The k highest- and k lowest-scoring images with their CAM overlays: [(label, rgb, overlay)].

    scores (N,) the score that orders them (P(positive), or the top-1 probability); the map is for the class
    the model decides (Classifier.cam's default)."""
    from lightcnn.explain import display_pixels, overlay
    from lightcnn.preprocess import load_image, normalise_pixels, preprocess_uint8

    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    picks = list(order[:k]) + [i for i in order[::-1][:k] if i not in order[:k]]
    spec = clf.preprocessing
    pixels = [preprocess_uint8(load_image(paths[i], **spec.load_options()), spec) for i in picks]
    batch = normalise_pixels(np.stack(pixels), spec)
    explanation = clf.cam(batch)
    rows = []
    for n, i in enumerate(picks):
        rgb = display_pixels(pixels[n], spec.channel_order)
        over = np.asarray(overlay(rgb, explanation.maps[n]))
        label = names[i] if names else "/".join(Path(paths[i]).parts[-2:])
        cls = clf.class_names[int(explanation.class_index[n])]
        rows.append((f"{'high' if n < k else 'low'} {scores[i]:.3f}: {label} -> {cls}", rgb, over))
    return rows


def write_plots(out, split_report, class_names, split_name, at_operating_point=None, history=None,
                best_epoch=None, cam=None, warn=None):
    """roc/pr/confusion/curves (+ cam_grid.png from `cam` rows) in `out`; {} and one hint without matplotlib."""
    from lightcnn.plots import PLOT_HINT, cam_grid_plot, matplotlib_available, write_run_plots

    if not matplotlib_available():
        if warn:
            warn(PLOT_HINT)
        return {}
    written = write_run_plots(out, split_report, class_names, split_name, at_operating_point, history, best_epoch)
    if cam:
        written["cam_grid"] = cam_grid_plot(Path(out) / "cam_grid.png", cam)
    return written


# --------------------------------------------------------------------------------------------- HTML


def _e(value):
    return html.escape(str(value), quote=True)


def _num(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _with_ci(report, key):
    ci = (report.get("confidence_intervals") or {}).get(key) or [None, None]
    text = _num(report.get(key))
    if ci[0] is not None and report.get(key) is not None:
        text += f" <span class=ci>[{_num(ci[0])}, {_num(ci[1])}]</span>"
    return text


def _data_uri(path):
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(header, rows):
    head = f"<thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def caveats(splits, split_info, window=None):
    """The warnings a reader of the numbers needs, from the split facts and the split sizes."""
    out = []
    method = (split_info or {}).get("method", "")
    ungrouped = (split_info or {}).get("ungrouped_items") or 0
    if method in ("random", "stratified") or ungrouped or any("group" in w or "patient" in w
                                                              for w in (split_info or {}).get("warnings", [])):
        out.append("No patient IDs for (some) images: images of one patient may be on both sides of the split, "
                   "which makes the test metrics optimistic.")
    for name, rep in splits.items():
        n = int(sum(map(sum, rep["confusion_matrix"])))
        if n < 100:
            out.append(f"The {name} split has {n} images: its confidence intervals are wide.")
    out.append("Confidence intervals are bootstrap 95 % intervals over images, not over patients or sites.")
    if window is not None:
        out.append(f"DICOM / 16-bit CT images were shown to the model through the window {window}.")
    out.append("Research software: not a medical device; not for diagnosis.")
    return out


def write_html(path, *, title, data_rows, data_notes, model_rows, config, splits, at_operating_point=None,
               operating_point=None, class_names=(), plots=None, caveat_lines=(), extra_sections=()):
    """RUN_DIR/report.html: one page, every picture inlined; returns the path."""
    plots = plots or {}
    metric_rows = []
    for name, rep in splits.items():
        metric_rows.append([f"<b>{_e(name)}</b> (argmax)"] + [_with_ci(rep, k) for k in METRICS])
        at = (at_operating_point or {}).get(name)
        if at:
            metric_rows.append([f"{_e(name)} at P &ge; {_num(at.get('threshold'), 4)}"]
                               + [_with_ci(at, k) for k in METRICS])
    op_text = ""
    if operating_point:
        op_text = (f"<p>Operating point: {_e(operating_point['class'])} when P &ge; "
                   f"{_num(operating_point['threshold'], 4)} ({_e(operating_point.get('rule', ''))}).</p>")
    figures = "".join(f"<figure{' class=wide' if k == 'curves' else ''}><img alt='{_e(k)}' src='{_data_uri(p)}'>"
                      f"<figcaption>{_e(Path(p).name)}</figcaption></figure>"
                      for k, p in plots.items() if k != "cam_grid")
    if not plots:
        from lightcnn.plots import PLOT_HINT

        figures = f"<p class=note>{_e(PLOT_HINT)}</p>"
    cam = plots.get("cam_grid")
    cam_html = (f"<figure class=wide><img alt='CAM grid' src='{_data_uri(cam)}'></figure>" if cam else
                "<p class=note>No CAM examples (evaluate with --cam, or no matplotlib).</p>")
    sections = [
        ("Data", _table(data_rows[0], data_rows[1:])
         + "".join(f"<p class=note>{_e(n)}</p>" for n in data_notes)),
        ("Model and weights", _table(None, model_rows)),
        ("Metrics", _table(["split"] + list(METRICS), metric_rows) + op_text
         + "<p class=note>Values with bootstrap 95 % confidence intervals in brackets.</p>"),
        ("Plots", f"<div class=grid>{figures}</div>"),
        ("CAM examples", cam_html),
        *extra_sections,
        ("Configuration", f"<pre>{_e(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>"),
        ("Caveats", "<ul>" + "".join(f"<li>{_e(c)}</li>" for c in caveat_lines) + "</ul>"),
    ]
    body = "".join(f"<section><h2>{_e(h)}</h2>{content}</section>" for h, content in sections)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1120px; color: #222; padding: 0 16px; }}
h1 {{ font-size: 22px; margin-bottom: 2px; }}
h2 {{ font-size: 17px; border-bottom: 1px solid #ccc; padding-bottom: 3px; }}
table {{ border-collapse: collapse; margin: 6px 0; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
th {{ background: #f3f5f8; }} .ci {{ color: #777; font-size: 12px; }} .note {{ color: #555; font-size: 13px; }}
.grid {{ display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }}
figure {{ margin: 0; }} .grid .wide {{ grid-column: 1 / -1; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ font-size: 12px; color: #777; }}
pre {{ background: #f7f7f7; padding: 8px; font-size: 12px; max-height: 420px; overflow: auto; }}
li {{ margin: 3px 0; }}
</style></head><body>
<h1>{_e(title)}</h1><p class=note>Written by lightcnn {stamp}. Classes: {_e(", ".join(class_names))}.</p>
{body}
</body></html>
"""
    atomic_write_text(path, page)
    return Path(path)


def class_counts(splits, class_names):
    """[[header...], [class, n per split...], [total...]] from the splits' confusion matrices (row sums)."""
    names = list(splits)
    rows = [["class"] + names]
    sums = {n: np.asarray(splits[n]["confusion_matrix"]).sum(axis=1) for n in names}
    for k, cls in enumerate(class_names):
        rows.append([_e(cls)] + [str(int(sums[n][k])) for n in names])
    rows.append(["<b>total</b>"] + [str(int(sums[n].sum())) for n in names])
    return rows


__all__ = ["cam_rows", "write_plots", "write_html", "caveats", "class_counts"]
