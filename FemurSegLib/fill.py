"""The "fill" baseline: global HU threshold plus morphological filling, as Pahr & Zysset (2009) describe it.

medtool's exact steps are not public. This is a documented re-implementation of the published description:

1. threshold the CT at ``threshold_hu`` (cortical and dense trabecular bone);
2. keep the largest 26-connected component (drops calibration rods and loose potting specks);
3. close small gaps in the thin cortex with a ball of ``closing_radius_mm``;
4. directional enclosure fill: in each of the three orthogonal slice planes, cast rays from every background
   voxel in the 8 in-plane directions at 45 degree steps; the voxel is filled when at most
   ``max_open_directions`` rays leave without hitting bone within ``max_ray_mm``. This is what closes the
   trabecular interior and the medullary canal, and also what over-fills concavities whose opening, seen from
   the voxel, is narrower than about 45 degrees per open direction: the "C" shapes at the femoral neck and the
   trochanteric fossa, and partly the potting around the distal cut (the documented failure of fill);
5. fill remaining enclosed holes slice by slice along the three axes and keep the largest component.

It is not medtool and makes no claim to match its output voxel for voxel. A fill result made elsewhere (for
example medtool's) is loaded as a plain label file with :func:`FemurSegLib.imageio.read_image`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .budget import check_fill
from .errors import FemurSegError
from .imageio import check_volume, label_image_like

_IN_PLANE_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))


# Bounds on the parameters: beyond them the result is meaningless or the closing ball outgrows memory (a 30 mm
# closing raised MemoryError). The threshold range is the Slicer module's.
THRESHOLD_HU_RANGE = (-1000.0, 3000.0)
MAX_CLOSING_MM = 5.0
MAX_RAY_MM = 100.0
MAX_CLOSING_VOXELS = 20


@dataclass(frozen=True)
class FillParameters:
    """The fill's settings; out-of-range values raise ValueError with the allowed range."""

    threshold_hu: float = 350.0
    closing_radius_mm: float = 1.0
    max_ray_mm: float = 30.0
    max_open_directions: int = 1

    def __post_init__(self) -> None:
        low, high = THRESHOLD_HU_RANGE
        if not low <= self.threshold_hu <= high:
            raise ValueError(f"threshold {self.threshold_hu:g} HU is outside {low:g} to {high:g} HU")
        if not 0 <= self.closing_radius_mm <= MAX_CLOSING_MM:
            raise ValueError(f"closing radius {self.closing_radius_mm:g} mm is outside 0 to {MAX_CLOSING_MM:g} mm "
                             "(cortical gaps are about 1 mm)")
        if not 0 < self.max_ray_mm <= MAX_RAY_MM:
            raise ValueError(f"maximum ray length {self.max_ray_mm:g} mm is outside (0, {MAX_RAY_MM:g}] mm")
        if not 0 <= self.max_open_directions < 8:
            raise ValueError(f"open directions {self.max_open_directions} is outside 0 to 7 (of 8 directions)")


def _shift(mask: np.ndarray, offset: tuple[int, int, int]) -> np.ndarray:
    """``out[p] = mask[p + offset]`` with False outside the array."""
    out = np.zeros_like(mask)
    target = []
    source = []
    for delta, length in zip(offset, mask.shape):
        if abs(delta) >= length:
            return out
        target.append(slice(max(0, -delta), length - max(0, delta)))
        source.append(slice(max(0, delta), length - max(0, -delta)))
    out[tuple(target)] = mask[tuple(source)]
    return out


def _hits_within(bone: np.ndarray, step: tuple[int, int, int], steps: int) -> np.ndarray:
    """True where a ray from the voxel along ``step`` meets bone within ``steps`` steps (binary doubling)."""
    reach = np.zeros_like(bone)
    block = _shift(bone, step)  # hit within the next 1 step
    block_length = 1
    covered = 0
    remaining = steps
    while remaining:
        if remaining & 1:
            reach |= _shift(block, tuple(covered * s for s in step))
            covered += block_length
        remaining >>= 1
        if remaining:
            block = block | _shift(block, tuple(block_length * s for s in step))
            block_length *= 2
    return reach


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (a femur is one piece; drops rods and specks)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    filled = mask.copy()
    for axis in range(3):
        moved = np.moveaxis(filled, axis, 0)
        for index in range(moved.shape[0]):
            if moved[index].any():
                moved[index] = ndimage.binary_fill_holes(moved[index])
    return filled


def fill_mask(ct_hu: np.ndarray, spacing_zyx: tuple[float, float, float], parameters: FillParameters) -> np.ndarray:
    """Boolean fill segmentation of a (z, y, x) HU array with voxel spacing in mm."""
    check_fill(ct_hu.shape[::-1], spacing_zyx[::-1], parameters.closing_radius_mm)
    bone = ct_hu >= parameters.threshold_hu
    if not bone.any():
        return bone
    bone = largest_component(bone)
    if parameters.closing_radius_mm > 0:
        radii = [max(1, int(round(parameters.closing_radius_mm / s))) for s in spacing_zyx]
        if max(radii) > MAX_CLOSING_VOXELS:
            raise FemurSegError(f"A closing radius of {parameters.closing_radius_mm:g} mm is {max(radii)} voxels at "
                                f"this spacing, over the {MAX_CLOSING_VOXELS} that fit in memory; lower it.")
        zz, yy, xx = np.ogrid[-radii[0] : radii[0] + 1, -radii[1] : radii[1] + 1, -radii[2] : radii[2] + 1]
        ball = (zz * spacing_zyx[0]) ** 2 + (yy * spacing_zyx[1]) ** 2 + (xx * spacing_zyx[2]) ** 2 <= (
            parameters.closing_radius_mm**2 + 1e-6
        )
        padded = np.pad(bone, [(r, r) for r in radii])
        bone = ndimage.binary_closing(padded, structure=ball)[tuple(slice(r, -r) for r in radii)]

    enclosed = np.zeros_like(bone)
    for plane in ((0, 1), (0, 2), (1, 2)):
        open_count = np.zeros(bone.shape, dtype=np.uint8)
        for first, second in _IN_PLANE_DIRECTIONS:
            step = [0, 0, 0]
            step[plane[0]], step[plane[1]] = first, second
            step_mm = float(np.hypot(first * spacing_zyx[plane[0]], second * spacing_zyx[plane[1]]))
            steps = max(1, int(parameters.max_ray_mm / step_mm))
            open_count += ~_hits_within(bone, tuple(step), steps)
        enclosed |= open_count <= parameters.max_open_directions
    filled = _fill_holes_slicewise(bone | enclosed)
    return largest_component(filled)


def compute_fill(ct: sitk.Image, parameters: FillParameters | None = None) -> sitk.Image:
    """Fill segmentation of ``ct`` (HU) as a uint8 label (0/1) on the CT's grid."""
    check_volume(ct, "CT")
    parameters = parameters or FillParameters()
    hu = sitk.GetArrayViewFromImage(ct)
    spacing_zyx = tuple(float(s) for s in reversed(ct.GetSpacing()))
    return label_image_like(fill_mask(hu, spacing_zyx, parameters), ct)


def threshold_mask(ct: sitk.Image, threshold_hu: float) -> sitk.Image:
    """Plain global threshold, the weakest baseline (what fill improves on)."""
    return label_image_like(sitk.GetArrayViewFromImage(ct) >= threshold_hu, ct)
