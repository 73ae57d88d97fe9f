"""The heads' figures: a confusion matrix (region), mask overlays (metal), screw predictions (screws)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from tasks.heads.data import HeadDataset

if TYPE_CHECKING:
    from tasks.heads.training import TaskResult

__all__ = ["confusion_figure", "screw_figure", "segmentation_figure", "task_figures"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    """Rows true class, columns predicted; counts written in the cells."""
    plt = _plt()
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for (r, c), v in np.ndenumerate(cm):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick(candidates: Sequence[int], n: int) -> list[int]:
    candidates = list(candidates)
    if len(candidates) <= n:
        return candidates
    return [candidates[i] for i in np.linspace(0, len(candidates) - 1, n).round().astype(int)]


def segmentation_figure(data: HeadDataset, idx: Sequence[int], probabilities: torch.Tensor, path: Path,
                        title: str, n: int = 4) -> Path:
    """Test images with metal: truth outline (green) and predicted mask (red) on the input view."""
    plt = _plt()
    rows = list(idx)
    with_metal = [r for r, i in enumerate(rows) if bool(data.masks[i].any())] or list(range(len(rows)))
    chosen = _pick(with_metal, n)
    fig, axes = plt.subplots(1, max(1, len(chosen)), figsize=(3 * max(1, len(chosen)), 3.2), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        i = rows[r]
        ax.imshow(data.images[i, 0].float().numpy(), cmap="gray", vmin=0, vmax=1)
        pred = (probabilities[r] > 0.5).numpy()
        ax.imshow(np.ma.masked_where(~pred, pred), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
        if bool(data.masks[i].any()):
            ax.contour(data.masks[i].numpy().astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle(title + "  (green: truth, red: prediction)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def screw_figure(data: HeadDataset, idx: Sequence[int], predictions: Sequence[Sequence[dict]], threshold: float,
                 path: Path, title: str, n: int = 4) -> Path:
    """Test images with screws: true screws (green, head dot) and predictions above the threshold (red, score)."""
    plt = _plt()
    rows = list(idx)
    with_screws = [r for r, i in enumerate(rows) if len(data.screws[i])] or list(range(len(rows)))
    chosen = _pick(with_screws, n)
    fig, axes = plt.subplots(1, max(1, len(chosen)), figsize=(3 * max(1, len(chosen)), 3.2), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        i = rows[r]
        ax.imshow(data.images[i, 0].float().numpy(), cmap="gray", vmin=0, vmax=1)
        for hx, hy, tx, ty in data.screws[i]:
            ax.plot([hx, tx], [hy, ty], color="lime", lw=1.2)
            ax.plot([hx], [hy], "o", color="lime", ms=2.5)
        for p in predictions[r]:
            if p["score"] < threshold:
                continue
            (hx, hy), (tx, ty) = p["head"], p["tip"]
            ax.plot([hx, tx], [hy, ty], color="red", lw=1.0)
            ax.plot([hx], [hy], "o", color="red", ms=2.5)
            ax.text(hx, hy, f"{p['score']:.2f}", color="red", fontsize=6)
        ax.set_xlim(0, data.size)
        ax.set_ylim(data.size, 0)
        ax.set_axis_off()
    fig.suptitle(title + "  (green: truth, red: prediction and score)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def task_figures(result: TaskResult, data: HeadDataset, folder: Path, label: str) -> list[Path]:
    """The figure of one task's run (confusion matrix, segmentation overlays or screw predictions)."""
    folder.mkdir(parents=True, exist_ok=True)
    if result.task == "region":
        return [confusion_figure(result.extra["confusion_matrix"], data.classes, folder / f"region-{label}.png",
                                 f"body region, {label}: confusion matrix (test patients)")]
    if result.task == "metal":
        return [segmentation_figure(data, result.extra["test_idx"], result.extra["probabilities"],
                                    folder / f"metal-{label}.png", f"metal, {label}")]
    return [screw_figure(data, result.extra["test_idx"], result.extra["predictions"], result.head.threshold,
                         folder / f"screws-{label}.png", f"screws, {label}")]

