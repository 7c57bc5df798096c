"""Plausibility checks around inference: is this a CT in HU before, is each femur plausible after.

Why: a network asked about an image unlike its training data still answers, and its answer looks like a
segmentation. Measured on bundled model v3 (DESIGN.md §7): an all-zero CT gave 575 ml of "femur", a 5x5x5
volume 98 %, a real abdominal CT 7.8 litres. These checks are cheap and model-independent; every front end shows
their words beside the result (CLI: ``femurseg: warning: …``; Slicer and browser: the status area).

Numbers (DESIGN.md §7, Lang 2024): a proximal femur from head to lesser trochanter holds ~110-140 ml, an
ex-vivo proximal femur cut 120-220 mm below the head ~150-350 ml, a whole femur ~400-700 ml; a femoral head
alone, at the edge of a field of view, ~25 ml. A femur is flat: the thinnest of its three principal extents is
42-62 mm for a proximal femur and 64-78 mm for a whole femur (the 40 real femurs in Resources/Anatomy, measured
2026-11-24); hip bone labelled with it (in-vivo renders, the bone within 40 mm of each femur: 60-290 ml) takes that
past 95 mm, while the volume alone stays in a femur's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

MIN_EXTENT_MM = 40.0  # a femoral head is ~45 mm across: anything narrower cannot hold one
MIN_VOXELS_PER_AXIS = 8
SPACING_RANGE_MM = (0.1, 5.0)
FEMUR_VOLUME_ML = (20.0, 900.0)
MAX_FIELD_FRACTION = 0.5
MAIN_COMPONENT_FRACTION = 0.9
MAX_THICKNESS_MM = 90.0
THICKNESS_SAMPLE = 200_000  # voxel centres enough for extents to ~1 voxel


@dataclass(frozen=True)
class FemurCheck:
    """One femur's measurements and what is implausible about it (empty list: nothing)."""

    volume_ml: float
    field_fraction: float
    main_component_fraction: float
    thickness_mm: float
    warnings: tuple[str, ...]


def ct_warnings(ct: sitk.Image) -> list[str]:
    """Reasons ``ct`` does not look like a CT in Hounsfield units (empty list: it does).

    For a CT that imageio.check_ct accepted (finite, not blank, not tiny): that one refuses what cannot be
    segmented at all, this one names what can be run but probably should not be trusted.
    """
    size = np.array(ct.GetSize())
    spacing = np.array(ct.GetSpacing())
    extent = size * spacing
    problems = []
    if size.min() < MIN_VOXELS_PER_AXIS or extent.min() < MIN_EXTENT_MM:
        problems.append(f"the image is {' x '.join(f'{e:.0f}' for e in extent)} mm ({' x '.join(map(str, size))} "
                        f"voxels): too small to hold a femoral head (at least {MIN_EXTENT_MM:.0f} mm and "
                        f"{MIN_VOXELS_PER_AXIS} voxels along every axis)")
    if spacing.min() < SPACING_RANGE_MM[0] or spacing.max() > SPACING_RANGE_MM[1]:
        problems.append(f"voxel spacing {', '.join(f'{s:g}' for s in spacing)} mm is outside the "
                        f"{SPACING_RANGE_MM[0]:g}-{SPACING_RANGE_MM[1]:g} mm of a CT; check the file's header")
    values = sitk.GetArrayViewFromImage(ct)
    sample = np.asarray(values[:: max(1, values.shape[0] // 64)], dtype=np.float32)
    low, high = np.percentile(sample, [0.5, 99.9])
    median = float(np.median(sample))
    if low >= -10.0 and 700.0 <= median <= 1400.0 and high <= 5000.0:
        problems.append(f"values run from {low:.0f} to {high:.0f} with median {median:.0f}: this looks "
                        "like raw scanner numbers without the rescale offset (water ~1000 instead of 0); convert to "
                        "HU first (usually subtract 1024)")
    elif median < -1500.0:
        problems.append(f"the median value is {median:.0f}, below air (-1000): the CT seems shifted by -1024 once "
                        "too often; add 1024 to its values")
    elif high < 300.0:
        problems.append(f"the brightest voxels are {high:.0f} HU: no bone (cortical bone is above ~700 HU); is "
                        "this a CT in Hounsfield units?")
    elif low > -200.0 and (high > 4000.0 or median > 1400.0):
        problems.append(f"values run from {low:.0f} to {high:.0f}: not the Hounsfield range of a CT (air -1000, "
                        "water 0, cortical bone 700-2000)")
    elif float(sample.min()) >= 0.0:
        problems.append(f"no value is below 0 (they run from {low:.0f} to {high:.0f}): a CT in HU has air at -1000 "
                        "or at least water's noise around 0; is this an MRI, or a CT without its rescale?")
    return problems


def thickness_mm(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """The thinnest of the mask's three principal extents (mm): its size across its flattest direction."""
    points = np.argwhere(mask)
    if len(points) < 4:
        return 0.0
    points = points[:: max(1, len(points) // THICKNESS_SAMPLE)] * np.asarray(spacing_zyx, dtype=float)
    points -= points.mean(axis=0)
    _, axes = np.linalg.eigh(np.cov(points.T))  # ascending variance: the first axis is the flattest
    along = points @ axes[:, 0]
    return float(along.max() - along.min() + min(spacing_zyx))


def check_femur(mask: np.ndarray, spacing_zyx: tuple[float, float, float], side: str = "femur") -> FemurCheck:
    """Volume, share of the field of view and connectedness of one femur's mask, with warnings when implausible."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    voxels = int(mask.sum())
    volume_ml = voxels * voxel_ml
    field_fraction = voxels / mask.size if mask.size else 0.0
    main_fraction, thickness = 1.0, 0.0
    if voxels:
        inside = ndimage.find_objects(mask.astype(np.uint8))[0]  # measure the femur's box, not a clinical-size grid
        labels, count = ndimage.label(mask[inside], structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            main_fraction = float(np.bincount(labels.ravel())[1:].max()) / voxels
        thickness = thickness_mm(mask[inside], spacing_zyx)
    warnings = []
    if volume_ml < FEMUR_VOLUME_ML[0]:
        warnings.append(f"{side}: {volume_ml:.1f} ml is less than a femoral head (~{FEMUR_VOLUME_ML[0]:.0f} ml); "
                        "probably not a femur")
    elif volume_ml > FEMUR_VOLUME_ML[1]:
        warnings.append(f"{side}: {volume_ml:.0f} ml is more than a whole femur (~{FEMUR_VOLUME_ML[1]:.0f} ml); "
                        "other tissue was labelled, check the result")
    if field_fraction > MAX_FIELD_FRACTION:
        warnings.append(f"{side}: it fills {field_fraction:.0%} of the image; a femur never fills the field of "
                        "view, check the input")
    if thickness > MAX_THICKNESS_MM:
        warnings.append(f"{side}: it is {thickness:.0f} mm thick across its flattest direction, more than a femur "
                        f"(at most ~{MAX_THICKNESS_MM:.0f} mm, head included): neighbouring bone, probably hip bone, "
                        "was labelled with it; check the result")
    if main_fraction < MAIN_COMPONENT_FRACTION:
        warnings.append(f"{side}: it is in several pieces (the largest holds {main_fraction:.0%}); check the result")
    return FemurCheck(volume_ml=volume_ml, field_fraction=field_fraction, main_component_fraction=main_fraction,
                      thickness_mm=thickness, warnings=tuple(warnings))
