"""PNG figures for people: contour overlays where segmentations disagree most, and phantom montages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .imageio import atomic_path
from .metrics import worst_slice

CONTOUR_COLOURS = {"truth": "#2ca02c", "nnU-Net": "#d62728", "fill": "#1f77b4", "threshold": "#ff7f0e"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80)


def overlay_png(ct: sitk.Image, masks: dict[str, sitk.Image], path: Path, compare: tuple[str, str] | None = None,
                title: str | None = None) -> list[int]:
    """Contours of every mask on the axial, coronal and sagittal slices where ``compare`` disagree most.

    Without ``compare`` (one result, nothing to hold it against) the slices are where the first mask is largest.
    """
    plt = _pyplot()
    hu = sitk.GetArrayViewFromImage(ct)
    arrays = {name: sitk.GetArrayViewFromImage(mask) != 0 for name, mask in masks.items()}
    first, second = (arrays[name] for name in compare) if compare else (next(iter(arrays.values())), None)
    if second is not None:
        indices = [worst_slice(first, second, axis) for axis in range(3)]
    else:
        indices = [int(np.argmax(first.sum(axis=tuple(a for a in range(3) if a != axis)))) if first.any()
                   else hu.shape[axis] // 2 for axis in range(3)]
    figure, axes = plt.subplots(1, 3, figsize=(18, 6))
    for axis, (index, ax) in enumerate(zip(indices, axes)):
        cut = [slice(None)] * 3
        cut[axis] = index
        ax.imshow(hu[tuple(cut)], cmap="gray", vmin=-200, vmax=1600, origin="lower")
        for name, array in arrays.items():
            piece = array[tuple(cut)]
            if piece.any():
                ax.contour(piece, [0.5], colors=CONTOUR_COLOURS.get(name, "white"), linewidths=1.0)
        if second is not None:
            disagreement = int(np.count_nonzero(first[tuple(cut)] != second[tuple(cut)]))
            ax.set_title(f"{'zyx'[axis]} = {index}: {disagreement} voxels differ ({compare[0]} vs {compare[1]})")
        else:
            ax.set_title(f"{'zyx'[axis]} = {index}")
        ax.axis("off")
    handles = [plt.Line2D([], [], color=CONTOUR_COLOURS.get(n, "white"), label=n) for n in arrays]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles))
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    _save(figure, path)
    plt.close(figure)
    return indices


def montage_png(cases: list[tuple[str, sitk.Image, sitk.Image]], path: Path) -> None:
    """One coronal slice through the femoral neck per case, label contour in green."""
    plt = _pyplot()
    columns = 5
    rows = (len(cases) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, (title, ct, label) in zip(axes.ravel(), cases):
        mask = sitk.GetArrayViewFromImage(label) != 0
        hu = sitk.GetArrayViewFromImage(ct)
        index = int(np.argmax(mask.sum(axis=(0, 2))))  # the y slice with the most femur: through head and neck
        ax.imshow(hu[:, index, :], cmap="gray", vmin=-200, vmax=1600, origin="lower")
        ax.contour(mask[:, index, :], [0.5], colors=CONTOUR_COLOURS["truth"], linewidths=0.8)
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
