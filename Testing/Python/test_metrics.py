"""Metrics against analytic shapes and against SimpleITK's independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.errors import FemurSegError
from FemurSegLib.metrics import compare_images, compare_masks


def sphere_image(size_xyz, spacing, centre_mm, radius_mm) -> sitk.Image:
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(reversed(size_xyz), reversed(spacing))), indexing="ij")
    cx, cy, cz = centre_mm
    mask = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius_mm**2
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin((-3.0, 7.5, 12.0))
    return image


def sitk_surface_distances(a: sitk.Image, b: sitk.Image) -> np.ndarray:
    """Independent surface distances: SimpleITK label contours and Maurer distance maps (mm)."""
    def contour(image):
        return sitk.GetArrayFromImage(sitk.LabelContour(image, fullyConnected=False)) != 0

    def distance_to(image):
        return np.abs(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            sitk.LabelContour(image, fullyConnected=False), insideIsPositive=False, squaredDistance=False,
            useImageSpacing=True)))

    return np.concatenate([distance_to(b)[contour(a)], distance_to(a)[contour(b)]])


ANISOTROPIC = (0.8, 1.1, 1.5)


def test_dice_matches_sitk_overlap_filter_to_1e6():
    reference = sphere_image((60, 50, 40), ANISOTROPIC, (24.0, 27.0, 30.0), 14.0)
    other = sphere_image((60, 50, 40), ANISOTROPIC, (29.0, 25.0, 27.0), 12.5)
    agreement = compare_images(reference, other)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(reference, other)
    assert agreement.dice == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-6)
    ref, oth = (sitk.GetArrayFromImage(i) != 0 for i in (reference, other))
    assert agreement.sensitivity == pytest.approx((ref & oth).sum() / ref.sum(), abs=1e-12)
    assert agreement.specificity == pytest.approx((~ref & ~oth).sum() / (~ref).sum(), abs=1e-12)


def test_surface_distances_match_sitk_within_half_a_voxel():
    reference = sphere_image((60, 50, 40), ANISOTROPIC, (24.0, 27.0, 30.0), 14.0)
    other = sphere_image((60, 50, 40), ANISOTROPIC, (29.0, 25.0, 27.0), 12.5)
    agreement = compare_images(reference, other)
    independent = sitk_surface_distances(other, reference)
    half_voxel = 0.5 * min(ANISOTROPIC)
    assert agreement.asd_mm == pytest.approx(independent.mean(), abs=half_voxel)
    assert agreement.hd95_mm == pytest.approx(np.percentile(independent, 95), abs=half_voxel)


def test_concentric_spheres_give_the_radius_difference():
    """Every surface point of one sphere lies |R1 - R2| from the other: ASD and HD95 equal that."""
    reference = sphere_image((64, 64, 48), ANISOTROPIC, (25.0, 35.0, 36.0), 15.0)
    other = sphere_image((64, 64, 48), ANISOTROPIC, (25.0, 35.0, 36.0), 11.0)
    agreement = compare_images(reference, other)
    voxel = max(ANISOTROPIC)
    assert agreement.asd_mm == pytest.approx(4.0, abs=0.5 * voxel)
    assert agreement.hd95_mm == pytest.approx(4.0, abs=voxel)
    analytic_dice = 2 * 11.0**3 / (15.0**3 + 11.0**3)
    assert agreement.dice == pytest.approx(analytic_dice, rel=0.03)
    assert agreement.sensitivity == pytest.approx((11.0 / 15.0) ** 3, rel=0.03)
    assert agreement.volume_ml_reference == pytest.approx(4 / 3 * math.pi * 15.0**3 / 1000, rel=0.02)


def test_offset_spheres_dice_matches_the_lens_volume():
    radius, offset = 14.0, 6.0
    reference = sphere_image((64, 60, 48), ANISOTROPIC, (24.0, 33.0, 36.0), radius)
    other = sphere_image((64, 60, 48), ANISOTROPIC, (24.0 + offset, 33.0, 36.0), radius)
    lens = math.pi * (4 * radius + offset) * (2 * radius - offset) ** 2 / 12
    analytic = lens / (4 / 3 * math.pi * radius**3)
    assert compare_images(reference, other).dice == pytest.approx(analytic, rel=0.02)


def test_identical_masks_agree_perfectly():
    reference = sphere_image((30, 30, 30), (1.0, 1.0, 1.0), (15.0, 15.0, 15.0), 8.0)
    agreement = compare_images(reference, reference)
    assert (agreement.dice, agreement.asd_mm, agreement.hd95_mm) == (1.0, 0.0, 0.0)


def test_different_grids_are_refused_with_a_message():
    reference = sphere_image((30, 30, 30), (1.0, 1.0, 1.0), (15.0, 15.0, 15.0), 8.0)
    other = sphere_image((30, 30, 30), (1.0, 1.0, 2.0), (15.0, 15.0, 15.0), 8.0)
    with pytest.raises(FemurSegError, match="not on the same voxel grid"):
        compare_images(reference, other)


def test_empty_mask_is_refused():
    full = np.zeros((10, 10, 10), bool)
    full[3:6, 3:6, 3:6] = True
    with pytest.raises(FemurSegError, match="empty"):
        compare_masks(full, np.zeros_like(full), (1.0, 1.0, 1.0))
