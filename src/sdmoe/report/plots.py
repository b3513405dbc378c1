"""Plots of figure records (plain lists / dicts), as PNG bytes. matplotlib Agg; no model code.

Every function takes plain numbers and returns PNG bytes; `save_png` writes
them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sdmoe.files import write_bytes_atomic  # noqa: E402

DPI = 90


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_png(path, png: bytes):
    return write_bytes_atomic(path, png)


def heatmap_grid(
    matrices: dict[str, Sequence[Sequence[float]]],
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
    ncols: int = 3,
    label: str = "overlap",
) -> bytes:
    """Square heatmaps side by side (e.g. one per projection), one shared colour bar."""
    n = max(1, len(matrices))
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 0.8, 3.1 * nrows), squeeze=False)
    im = None
    for ax, (name, m) in zip(axes.flat, matrices.items()):
        im = ax.imshow(np.asarray(m, dtype=float), vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(matrices):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def overlap_heatmaps(matrices: dict[str, Sequence[Sequence[float]]], title: str = "") -> bytes:
    """E x E subspace-overlap matrices, e.g. {"gate": o, "up": o, "down": o} of one layer."""
    return heatmap_grid(matrices, title, 0.0, 1.0, "viridis", label="overlap")


def spectra_plot(
    spectra: dict[str, Sequence[Sequence[float]] | Sequence[float]],
    title: str = "",
    ylabel: str = "singular value",
    normalize: bool = True,
    logy: bool = True,
) -> bytes:
    """Line plots of descending spectra; a name may map to one spectrum or to one per expert (thin lines)."""
    n = max(1, len(spectra))
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 2.8), squeeze=False)
    for ax, (name, s) in zip(axes[0], spectra.items()):
        arr = np.asarray(s, dtype=float)
        arr = arr[None] if arr.ndim == 1 else arr
        for row in arr:
            y = row / row[0] if normalize and row.size and row[0] > 0 else row
            ax.plot(np.arange(1, len(y) + 1), y, lw=0.8 if arr.shape[0] > 1 else 1.5, alpha=0.6 if arr.shape[0] > 1 else 1)
        if logy and (arr > 0).any():
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("index", fontsize=8)
        ax.set_ylabel(ylabel + (" / largest" if normalize else ""), fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def data_spectrum_plot(eigvals_by_layer: dict[str, Sequence[float]], k: int | None = None, title: str = "") -> bytes:
    """Eigen-spectra of E[x x^T] per layer (normalised to the trace), with the top-k cut marked."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for name, vals in eigvals_by_layer.items():
        v = np.asarray(vals, dtype=float)
        tot = v.sum()
        ax.plot(np.arange(1, len(v) + 1), v / tot if tot > 0 else v, label=name, lw=1.2)
    if k:
        ax.axvline(k, color="grey", ls="--", lw=0.8, label=f"k={k}")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("eigenvalue index", fontsize=8)
    ax.set_ylabel("eigenvalue / trace", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def bars_vs_baseline(
    values: dict[str, float],
    baseline: float | None = None,
    title: str = "",
    ylabel: str = "",
    baseline_label: str = "random baseline",
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> bytes:
    """One bar per named value with a dashed baseline line (e.g. router alignment vs k/d)."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * len(names) + 1.5), 3.0))
    ax.bar(range(len(names)), [values[n] for n in names], color="#4c72b0")
    if baseline is not None:
        ax.axhline(baseline, color="#c44e52", ls="--", lw=1, label=f"{baseline_label} ({baseline:.3g})")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def grouped_bars(
    groups: dict[str, dict[str, float]], baseline: float | None = None, title: str = "", ylabel: str = ""
) -> bytes:
    """Bars grouped by outer key (e.g. layer), one colour per inner key (e.g. projection)."""
    outer = list(groups)
    inner: list[str] = []
    for g in groups.values():
        inner.extend(k for k in g if k not in inner)
    width = 0.8 / max(1, len(inner))
    fig, ax = plt.subplots(figsize=(max(3.5, 0.9 * len(outer) + 1.5), 3.0))
    for j, name in enumerate(inner):
        xs = [i + (j - (len(inner) - 1) / 2) * width for i in range(len(outer))]
        ax.bar(xs, [groups[o].get(name, np.nan) for o in outer], width, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="#c44e52", ls="--", lw=1, label=f"random ({baseline:.3g})")
    ax.set_xticks(range(len(outer)))
    ax.set_xticklabels(outer, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def load_bars(load: Sequence[float], title: str = "", fair: bool = True) -> bytes:
    """Expert load shares with the fair share 1/E and the de-facto-shared threshold 2/E."""
    e = len(load)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.22 * e + 1.5), 2.8))
    colors = ["#c44e52" if v > 2.0 / e else "#4c72b0" for v in load]
    ax.bar(range(e), load, color=colors)
    if fair:
        ax.axhline(1.0 / e, color="grey", ls="--", lw=0.8, label="1/E")
        ax.axhline(2.0 / e, color="#c44e52", ls=":", lw=0.8, label="2/E (shared)")
        ax.legend(fontsize=7)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_ylabel("share of routing slots", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def coactivation_heatmap(c: Sequence[Sequence[float]], title: str = "") -> bytes:
    arr = np.asarray(c, dtype=float)
    return heatmap_grid({title or "co-activation": arr}, "", 0.0, max(1e-9, float(arr.max())), "magma", 1, "share of tokens")
