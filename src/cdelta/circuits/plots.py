"""PNG plots of node scores and faithfulness curves (matplotlib, Agg canvas, no global backend change)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_heatmap(
    scores: torch.Tensor,
    path: str | Path,
    selected: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Layer × head heat map of head scores, plus an MLP column on its own colour scale.

    ``scores``: ``[n_layers, n_heads + 1]`` (last column MLP). ``selected``: same-shape bool
    mask of circuit nodes, drawn as black dots. Red = supports refusal (positive).
    """
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    n_layers, n_cols = s.shape
    n_heads = n_cols - 1
    fig = _figure(2.6 + 0.45 * n_heads, 1.5 + 0.22 * n_layers)
    grid = fig.add_gridspec(1, 5, width_ratios=[n_heads, 0.3, 2.0, 1.0, 0.3], wspace=0.08)
    ax_h, cax_h = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    ax_m, cax_m = fig.add_subplot(grid[3]), fig.add_subplot(grid[4])
    for ax, cax, block, label in ((ax_h, cax_h, s[:, :n_heads], "head score"), (ax_m, cax_m, s[:, n_heads:], "MLP score")):
        lim = float(np.abs(block).max()) or 1.0
        im = ax.imshow(block, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        fig.colorbar(im, cax=cax, label=label)
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax_h.set_ylabel("layer")
    ax_m.set_yticklabels([])
    ax_h.set_xticks(range(n_heads))
    ax_h.set_xticklabels([f"H{h}" for h in range(n_heads)], fontsize=7)
    ax_m.set_xticks([0])
    ax_m.set_xticklabels(["MLP"])
    if selected is not None:
        sel = np.asarray(torch.as_tensor(selected, dtype=torch.bool))
        ys, xs = np.nonzero(sel[:, :n_heads])
        ax_h.scatter(xs, ys, s=9, c="black", marker="o")
        ys, _ = np.nonzero(sel[:, n_heads:])
        ax_m.scatter(np.zeros_like(ys), ys, s=9, c="black", marker="o")
    fig.suptitle(title or "node attribution (positive = supports refusal)", fontsize=10)
    return _save(fig, path)


def plot_faithfulness(curve: dict, path: str | Path, title: str | None = None) -> Path:
    """Recovered metric vs fraction of nodes (or of edges, ``curve["unit"] == "edges"``): attributed circuit, random (mean ± sd), shuffled-label."""
    unit = curve.get("unit", "nodes")
    total = curve["n_edges"] if unit == "edges" else curve["n_nodes"]
    x = np.array(curve["sizes"], dtype=float) / total
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    mean, sd = np.array(curve["random"]["mean"]), np.array(curve["random"]["sd"])
    ax.plot(x, mean, "o-", color="tab:grey", label=f"random (mean ± sd, {len(curve['random']['seeds'])} seeds)")
    ax.fill_between(x, mean - sd, mean + sd, color="tab:grey", alpha=0.25)
    if curve.get("shuffled"):
        ax.plot(x, curve["shuffled"]["recovered"], "s--", color="tab:orange", label="shuffled-label attribution")
    ax.plot(x, curve["circuit"]["recovered"], "o-", color="tab:red", label="attributed circuit")
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{100 * v:.0f}%" if v >= 0.01 else f"{100 * v:.1f}%" for v in x])
    ax.set_xlabel(f"circuit size (fraction of {total} {unit})")
    if "gap_se" in curve:
        note = f"gap m(clean) - m(ablated) = {curve['gap']:.3f} ± {curve['gap_se']:.3f} (SE)"
        if not curve.get("gap_resolved", True):
            note += ": not resolved, ratios are noise"
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, va="bottom")
    ax.set_ylabel("recovered metric")
    ax.legend(fontsize=8)
    ax.set_title(title or f"faithfulness ({curve['ablation']} ablation of the complement)", fontsize=10)
    return _save(fig, path)
