"""Half-maximum edges on analytic shapes blurred by SimpleITK: a one-voxel overshoot is removed (exactly on flat
faces), an exact mask stays nearly whole, a one-voxel undershoot is filled back where the bone stands in air and
nowhere else, and nothing next to the bone (potting, a rod) is ever added."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.edges import fit_edges_to_half_maximum
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
    assert np.array_equal(fit_edges_to_half_maximum(overshoot, ct, np.array(SPACING)), label)


@pytest.mark.parametrize("background_hu", [-1000.0, 0.0, 60.0])
def test_a_one_voxel_overshoot_around_a_ball_is_mostly_trimmed(background_hu):
    """Only voxels that face the outside through a face are judged, so where the ball curves some overshoot stays."""
    ct, label = blurred_ball(background_hu)
    overshoot = one_voxel_larger(label)
    assert dice(overshoot, label) < 0.86
    trimmed = fit_edges_to_half_maximum(overshoot, ct, np.array(SPACING))
    assert not (trimmed & ~overshoot).any(), "only removes"
    assert dice(trimmed, label) > 0.94
    assert not (label & ~trimmed).any(), "no voxel of the ball itself is lost"


def test_an_exact_mask_keeps_nearly_all_its_voxels():
    ct, label = blurred_ball(0.0)
    trimmed = fit_edges_to_half_maximum(label, ct, np.array(SPACING))
    assert label.sum() - trimmed.sum() <= 0.01 * label.sum()


@pytest.mark.parametrize("background_hu", [-1000.0, 0.0])
def test_a_bright_neighbour_outside_the_mask_is_never_added(background_hu):
    ct, label = blurred_ball(background_hu, neighbour=True)
    overshoot = one_voxel_larger(label)
    trimmed = fit_edges_to_half_maximum(overshoot, ct, np.array(SPACING))
    assert not (trimmed & ~overshoot).any()
    assert dice(trimmed, label) > 0.94


def test_an_empty_mask_stays_empty():
    ct, label = blurred_ball(0.0)
    assert not fit_edges_to_half_maximum(np.zeros_like(label), ct, np.array(SPACING)).any()


def block_in(background_hu: float, sleeve_hu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CT and exact label of a 20 x 24 x 30 mm block of cortex (1200 HU); ``sleeve_hu``: its lower 10 mm set in an
    8 mm thick sleeve of potting of that density."""
    label = np.zeros((40, 44, 50), dtype=bool)
    label[10:30, 10:34, 10:40] = True
    values = np.where(label, 1200.0, background_hu)
    if sleeve_hu is not None:
        sleeve = np.zeros_like(label)
        sleeve[2:20, 2:42, 2:48] = True
        values[sleeve & ~label] = sleeve_hu
    return blurred(values), label


def one_voxel_smaller(label: np.ndarray) -> np.ndarray:
    image = sitk.GetImageFromArray(label.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryErode(image, [1, 1, 1], sitk.sitkCross)) != 0


def test_an_undershoot_in_air_is_filled_back_one_face_step():
    """In air, every voxel facing the undersized mask whose centre lies inside the block is added, and no other:
    the block's faces come back; its edges and corners, two face steps away, stay out."""
    ct, label = block_in(-1000.0)
    undershoot = one_voxel_smaller(label)
    one_face_step = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(undershoot.astype(np.uint8)),
                                                             [1, 1, 1], sitk.sitkCross)) != 0
    fitted = fit_edges_to_half_maximum(undershoot, ct, np.array(SPACING))
    assert np.array_equal(fitted, one_face_step & label)
    assert dice(undershoot, label) < 0.92 < 0.99 < dice(fitted, label)


@pytest.mark.parametrize("background_hu", [0.0, 60.0])
def test_an_undershoot_in_water_or_soft_tissue_is_left_alone(background_hu):
    ct, label = block_in(background_hu)
    undershoot = one_voxel_smaller(label)
    assert np.array_equal(fit_edges_to_half_maximum(undershoot, ct, np.array(SPACING)), undershoot)


@pytest.mark.parametrize("sleeve_hu", [300.0, 900.0])
def test_potting_around_a_bone_in_air_is_never_added(sleeve_hu):
    """Where the block stands in a sleeve of potting as bright as half the cortex or more, the background is not air,
    so nothing is added there; above the sleeve, in air, the undershoot is filled back."""
    ct, label = block_in(-1000.0, sleeve_hu)
    undershoot = one_voxel_smaller(label)
    fitted = fit_edges_to_half_maximum(undershoot, ct, np.array(SPACING))
    assert not (fitted & ~label).any(), "no potting voxel"
    assert (fitted & ~undershoot)[25:].any(), "filled back in air"
