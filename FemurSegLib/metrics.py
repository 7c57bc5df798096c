"""Agreement between two binary segmentations, with the definitions of Lang 2024 plus HD95 and volumes.

- Dice = 2TP / (2TP + FP + FN); sensitivity = TP / (TP + FN); specificity = TN / (TN + FP), over the grid.
- Surfaces are the mask voxels with a face neighbour outside the mask; surface distances are Euclidean in
  physical space (spacing-aware, exact distance transform).
- ASD = (sum of distances from each surface voxel of A to surface B + the same from B to A) / (|S_A| + |S_B|).
- HD95 = 95th percentile of the pooled symmetric surface distances (both directions together), in mm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import FemurSegError
from .imageio import mask_array, require_same_grid


@dataclass(frozen=True)
class Agreement:
    dice: float
    sensitivity: float
    specificity: float
    asd_mm: float
    hd95_mm: float
    volume_ml_reference: float
    volume_ml_other: float

    @property
    def volume_difference_ml(self) -> float:
        return self.volume_ml_other - self.volume_ml_reference

    def as_dict(self) -> dict[str, float]:
        values = asdict(self)
        values["volume_difference_ml"] = self.volume_difference_ml
        return values


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels that touch the background through a face (the image border counts as background)."""
    padded = np.pad(mask, 1)
    eroded = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(3, 1))
    return (padded & ~eroded)[1:-1, 1:-1, 1:-1]


def _distances_to(target_surface: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    return ndimage.distance_transform_edt(~target_surface, sampling=spacing_zyx)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to surface ``b``, and from ``b`` to ``a``."""
    surface_a, surface_b = surface(a), surface(b)
    return _distances_to(surface_b, spacing_zyx)[surface_a], _distances_to(surface_a, spacing_zyx)[surface_b]


def dice(reference: np.ndarray, other: np.ndarray) -> float:
    """2TP / (2TP + FP + FN) of two boolean masks; 1.0 when both are empty (they agree)."""
    total = np.count_nonzero(reference) + np.count_nonzero(other)
    return 2 * np.count_nonzero(reference & other) / total if total else 1.0


def compare_masks(reference: np.ndarray, other: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Agreement:
    """Agreement of two boolean (z, y, x) masks on the same grid."""
    if reference.shape != other.shape:
        raise FemurSegError(f"Masks have different shapes {reference.shape} and {other.shape}.")
    if not reference.any() or not other.any():
        which = "reference" if not reference.any() else "other"
        raise FemurSegError(f"The {which} segmentation is empty; there is nothing to compare.")
    tp = np.count_nonzero(reference & other)
    fp = np.count_nonzero(~reference & other)
    fn = np.count_nonzero(reference & ~other)
    tn = reference.size - tp - fp - fn
    forward, backward = surface_distances(other, reference, spacing_zyx)
    pooled = np.concatenate([forward, backward])
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    return Agreement(
        dice=dice(reference, other),
        sensitivity=tp / (tp + fn),
        specificity=tn / (tn + fp) if tn + fp else 1.0,
        asd_mm=float(pooled.sum() / pooled.size),
        hd95_mm=float(np.percentile(pooled, 95)),
        volume_ml_reference=(tp + fn) * voxel_ml,
        volume_ml_other=(tp + fp) * voxel_ml,
    )


def compare_images(reference: sitk.Image, other: sitk.Image) -> Agreement:
    """Agreement of two label images (non-zero = femur); refuses images on different grids."""
    require_same_grid(reference, other, "the reference", "the other segmentation")
    spacing_zyx = tuple(float(s) for s in reversed(reference.GetSpacing()))
    return compare_masks(mask_array(reference), mask_array(other), spacing_zyx)


def worst_slice(reference: np.ndarray, other: np.ndarray, axis: int = 0) -> int:
    """Index along ``axis`` of the (z, y, x) slice with the most disagreeing voxels."""
    disagreement = reference != other
    other_axes = tuple(i for i in range(3) if i != axis)
    return int(np.argmax(disagreement.sum(axis=other_axes)))


def worst_slices(reference: np.ndarray, other: np.ndarray, count: int = 5, min_gap: int = 5,
                 axis: int = 0) -> list[tuple[int, int]]:
    """The ``count`` slices along ``axis`` with the most disagreeing voxels as (index, voxels), most first, at least
    ``min_gap`` slices apart so that the list names different places rather than neighbours of one; slices that
    agree are left out."""
    other_axes = tuple(i for i in range(3) if i != axis)
    per_slice = (reference != other).sum(axis=other_axes)
    places: list[tuple[int, int]] = []
    for index in np.argsort(-per_slice, kind="stable"):
        if len(places) == count or per_slice[index] == 0:
            break
        if all(abs(int(index) - taken) >= min_gap for taken, _ in places):
            places.append((int(index), int(per_slice[index])))
    return places
