"""Half-maximum edge trimming on analytic shapes blurred by SimpleITK: it removes a one-voxel overshoot (exactly on flat
faces), keeps an exact mask nearly whole and never adds a voxel, whatever lies next to the bone."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.edges import trim_to_half_maximum
from FemurSegLib.metrics import dice

SPACING = (1.0, 1.0, 1.0)


def blurred(values: np.ndarray) -> np.ndarray:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing(SPACING)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 0.6))


def blurred_ball(background_hu: float, bone_hu: float = 1200.0, radius_mm: float = 12.3,
                 neighbour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CT (a ball of ``bone_hu`` blurred by a 0.6 mm Gaussian, SimpleITK) and the exact label (voxel centre inside).
    ``neighbour`` adds a second, brighter ball 2 mm from the first, outside the label (potting, a rod, hip bone)."""
    z, y, x = np.mgrid[:48, :48, :64].astype(float)
    label = (z - 24) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 <= radius_mm ** 2
    values = np.where(label, bone_hu, background_hu).astype(np.float32)
    if neighbour:
        values[(z - 24) ** 2 + (y - 24) ** 2 + (x - 45) ** 2 <= 7.0 ** 2] = 1600.0
    return blurred(values), label


def one_voxel_larger(label: np.ndarray) -> np.ndarray:
    image = sitk.GetImageFromArray(label.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryDilate(image, [1, 1, 1], sitk.sitkBall)) != 0


@pytest.mark.parametrize("background_hu", [-1000.0, 0.0, 60.0])
def test_an_overshoot_on_flat_faces_is_trimmed_exactly(background_hu):
    """A 20 x 24 x 30 mm block of cortex: the half maximum lies on its faces, so the trim restores the block."""
    label = np.zeros((40, 44, 50), dtype=bool)
    label[10:30, 10:34, 10:40] = True
    ct = blurred(np.where(label, 1200.0, background_hu))
    overshoot = one_voxel_larger(label)
    assert dice(overshoot, label) < 0.92
    assert np.array_equal(trim_to_half_maximum(overshoot, ct, np.array(SPACING)), label)


@pytest.mark.parametrize("background_hu", [-1000.0, 0.0, 60.0])
def test_a_one_voxel_overshoot_around_a_ball_is_mostly_trimmed(background_hu):
    """Only voxels that face the outside through a face are judged, so where the ball curves some overshoot stays."""
    ct, label = blurred_ball(background_hu)
    overshoot = one_voxel_larger(label)
    assert dice(overshoot, label) < 0.86
    trimmed = trim_to_half_maximum(overshoot, ct, np.array(SPACING))
    assert not (trimmed & ~overshoot).any(), "only removes"
    assert dice(trimmed, label) > 0.94
    assert not (label & ~trimmed).any(), "no voxel of the ball itself is lost"


def test_an_exact_mask_keeps_nearly_all_its_voxels():
    ct, label = blurred_ball(0.0)
    trimmed = trim_to_half_maximum(label, ct, np.array(SPACING))
    assert label.sum() - trimmed.sum() <= 0.01 * label.sum()


def test_a_bright_neighbour_outside_the_mask_is_never_added():
    ct, label = blurred_ball(0.0, neighbour=True)
    overshoot = one_voxel_larger(label)
    trimmed = trim_to_half_maximum(overshoot, ct, np.array(SPACING))
    assert not (trimmed & ~overshoot).any()
    assert dice(trimmed, label) > 0.94


def test_an_empty_mask_stays_empty():
    ct, label = blurred_ball(0.0)
    assert not trim_to_half_maximum(np.zeros_like(label), ct, np.array(SPACING)).any()
