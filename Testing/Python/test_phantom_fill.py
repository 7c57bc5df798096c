"""Phantoms are deterministic, plausible and hard; fill reproduces its documented over-fill of concavities."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FemurSegLib.fill import FillParameters, compute_fill, threshold_mask
from FemurSegLib.metrics import compare_images

SEEDS = (1, 2, 3, 4)


def test_same_seed_same_volume_and_seeds_differ(phantom_factory):
    from FemurSegLib.synthetic.phantom import generate_phantom

    ct_again, label_again, _ = generate_phantom(1)
    ct, label, _ = phantom_factory(1)
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(ct_again))
    assert np.array_equal(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(label_again))
    other_ct, _, _ = phantom_factory(2)
    assert ct.GetSize() != other_ct.GetSize() or not np.array_equal(
        sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(other_ct))


@pytest.mark.parametrize("seed", SEEDS)
def test_phantom_is_a_plausible_ex_vivo_qct(phantom_factory, seed):
    ct, label, shape = phantom_factory(seed)
    assert ct.GetSpacing() == (1.0, 1.0, 1.0)
    size = ct.GetSize()
    assert 140 <= size[0] <= 210 and 65 <= size[1] <= 100 and 85 <= size[2] <= 140, size
    assert ct.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    hu = sitk.GetArrayViewFromImage(ct)
    femur = sitk.GetArrayViewFromImage(label) != 0
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) == {0, 1}
    _, pieces = ndimage.label(femur)
    assert pieces == 1, "the femur label is one solid piece"
    assert ndimage.binary_fill_holes(femur).sum() == femur.sum(), "the periosteal label is solid inside"
    volume_ml = femur.sum() / 1000
    assert 80 < volume_ml < 320
    # Bone-like HU outside the femur: calibration rods (and potting) that must not be labelled.
    assert np.count_nonzero((hu > 700) & ~ndimage.binary_dilation(femur, iterations=3)) > 500
    # Low-density inside: trabecular bone and marrow below cortical HU make up most of the femur.
    assert np.mean(hu[femur] < 600) > 0.5
    assert shape.side in ("left", "right")


@pytest.mark.parametrize("seed", SEEDS)
def test_plain_threshold_scores_clearly_below_099(phantom_factory, seed):
    ct, label, _ = phantom_factory(seed)
    assert compare_images(label, threshold_mask(ct, 350.0)).dice < 0.99


def concavity_zone(femur: np.ndarray, radius: int = 6) -> np.ndarray:
    """Background voxels that a morphological closing of the true femur would add: its concave pockets."""
    ball = ndimage.generate_binary_structure(3, 1)
    ball = ndimage.iterate_structure(ball, radius)
    padded = np.pad(femur, radius + 1)
    closed = ndimage.binary_closing(padded, structure=ball)[tuple([slice(radius + 1, -radius - 1)] * 3)]
    return closed & ~femur


@pytest.mark.parametrize("seed", SEEDS)
def test_fill_overfills_concavities_like_the_published_failure(phantom_factory, seed):
    ct, label, _ = phantom_factory(seed)
    fill = compute_fill(ct)
    agreement = compare_images(label, fill)
    truth = sitk.GetArrayViewFromImage(label) != 0
    filled = sitk.GetArrayViewFromImage(fill) != 0
    false_positive = filled & ~truth
    false_negative = truth & ~filled
    assert agreement.sensitivity > 0.97, "fill captures nearly all bone"
    assert false_positive.sum() > 2 * false_negative.sum(), "its errors are over-fill, not under-fill"
    assert agreement.specificity < 0.9995
    pockets = concavity_zone(truth)
    # Over-filled voxels sit in the concave pockets far more often than chance.
    share_in_pockets = (false_positive & pockets).sum() / false_positive.sum()
    pocket_share_of_background = pockets.sum() / (~truth).sum()
    assert share_in_pockets > 10 * pocket_share_of_background


def test_fill_beats_plain_threshold(phantom_factory):
    ct, label, _ = phantom_factory(1)
    assert compare_images(label, compute_fill(ct)).dice > compare_images(label, threshold_mask(ct, 350.0)).dice + 0.2


def test_fill_parameters_are_validated():
    with pytest.raises(ValueError):
        FillParameters(max_open_directions=8)
    with pytest.raises(ValueError):
        FillParameters(max_ray_mm=0)


def test_fill_on_an_image_without_bone_is_empty():
    water = sitk.Image(20, 20, 20, sitk.sitkInt16)
    assert sitk.GetArrayFromImage(compute_fill(water)).sum() == 0
