"""Draw the tour's figures from lightcnn's own code: python docs/figures/make_figures.py

Writes, next to this file (small PNGs, committed; rerun after changing what they show):
  im2col.png                   page 1: a padded 4x4 input, one receptive field and its row of cols
  mobilenet_v2_macs_bytes.png  page 2: per-unit MACs and activation bytes of MobileNetV2 at 224x224
  activations.png              page 5: ReLU6, hard-sigmoid, hard-swish and swish

Needs matplotlib (the docs extra: pip install -e ".[docs]"); runs on the NumPy engine, compiles nothing
beyond the activation kernel.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lightcnn.kernels.activation import activation_forward  # noqa: E402
from lightcnn.models import build  # noqa: E402

HERE = Path(__file__).resolve().parent
STYLE = dict(dpi=100, bbox_inches="tight")


def im2col_figure(path):
    """A 4x4 one-channel input, 3x3 kernel, padding (1,1,1,1): cols is (16, 9)."""
    x = np.arange(1, 17, dtype=float).reshape(4, 4)
    xp = np.pad(x, 1)
    cols = np.stack([xp[i:i + 3, j:j + 3].ravel() for i in range(4) for j in range(4)])
    pick = (1, 2)                                            # the output pixel whose row is highlighted
    row = pick[0] * 4 + pick[1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw=dict(width_ratios=[1, 1.1]))
    a.imshow(np.where(xp > 0, 0.85, 0.97), cmap="gray", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(xp):
        a.text(j, i, f"{v:.0f}" if v else "0", ha="center", va="center", fontsize=10,
               color="black" if v else "0.6")
    a.add_patch(plt.Rectangle((pick[1] - 0.5, pick[0] - 0.5), 3, 3, fill=False, lw=3, ec="tab:red"))
    a.set_title("x padded by (1, 1, 1, 1): one 3x3 receptive field", fontsize=10)
    a.set_xticks([]), a.set_yticks([])
    shade = np.full(cols.shape, 0.97)
    shade[row] = 0.8
    b.imshow(shade, cmap="gray", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(cols):
        b.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
               color="tab:red" if i == row else ("black" if v else "0.6"))
    b.set_title(f"cols (N*H'*W' = 16, KH*KW*C = 9): row {row} is that field\n"
                "y = cols @ w.reshape(9, O): one GEMM", fontsize=10)
    b.set_xlabel("column (p, q, c): the row-major order of w (KH, KW, C, O)", fontsize=9)
    b.set_ylabel("output pixel (n, i, j)", fontsize=9)
    b.set_xticks(range(9)), b.set_yticks(range(0, 16, 3))
    fig.savefig(path, **STYLE)
    plt.close(fig)


def macs_bytes_figure(path):
    net = build("mobilenet_v2")
    net.engine = "numpy"
    rows = net.trace(np.zeros((1, 224, 224, 3), np.float32))
    rows = [r for r in rows if r["name"].startswith("features")]
    macs = np.array([r["macs"] for r in rows]) / 1e6
    mbytes = np.array([4 * (np.prod(r["in_shape"]) + np.prod(r["out_shape"])) for r in rows]) / 1e6
    colour = ["tab:orange" if r["name"].endswith(".dw") else "tab:blue" for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True)
    idx = np.arange(len(rows))
    a.bar(idx, macs, color=colour)
    a.set_ylabel("MMACs")
    a.set_title("MobileNetV2 at 224x224, per unit: depthwise (orange) vs 1x1 and stem convolutions (blue)",
                fontsize=10)
    b.bar(idx, mbytes, color=colour)
    b.set_ylabel("MB in + out")
    b.set_xlabel("unit, in network order (stem, blocks 0-16 as expand / dw / project, last)")
    for ax in (a, b):
        ax.spines[["top", "right"]].set_visible(False)
    fig.savefig(path, **STYLE)
    plt.close(fig)


def activations_figure(path):
    v = np.linspace(-6, 6, 601).astype(np.float32)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(v, activation_forward(v, "relu6"), label="relu6", color="0.5", lw=1.5)
    ax.plot(v, activation_forward(v, "hard_sigmoid"), label="hard_sigmoid = relu6(x+3)/6", lw=1.5)
    ax.plot(v, v * activation_forward(v, "sigmoid"), label="swish = x * sigmoid(x)", ls="--", color="k", lw=1)
    ax.plot(v, activation_forward(v, "hard_swish"), label="hard_swish = x * relu6(x+3)/6", lw=2)
    ax.axhline(0, color="0.8", lw=0.8), ax.axvline(0, color="0.8", lw=0.8)
    ax.set_ylim(-1, 6.2)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.savefig(path, **STYLE)
    plt.close(fig)


if __name__ == "__main__":
    im2col_figure(HERE / "im2col.png")
    macs_bytes_figure(HERE / "mobilenet_v2_macs_bytes.png")
    activations_figure(HERE / "activations.png")
    for name in ("im2col.png", "mobilenet_v2_macs_bytes.png", "activations.png"):
        print(HERE / name, (HERE / name).stat().st_size, "bytes")
