"""The plausibility guard: what it says about CTs and femurs, against independent measurements."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.demo import SAMPLE_CT, SAMPLE_LABEL
from FemurSegLib.guard import check_femur, ct_warnings


@pytest.fixture(scope="module")
def sample_ct() -> sitk.Image:
    return sitk.ReadImage(str(SAMPLE_CT))


def _like(ct: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    return image


def test_a_phantom_ct_in_hu_passes(sample_ct):
    assert ct_warnings(sample_ct) == []


@pytest.mark.parametrize("make, words", [
    (lambda a: a.astype(np.int32) + 1024, "raw scanner numbers"),
    (lambda a: np.clip(a, -1000, 200), "no bone"),
    (lambda a: a.astype(np.float32) * 8.0 + 3000.0, "not the Hounsfield range"),
    (lambda a: (a - a.min()) * (1000.0 / float(a.max() - a.min())), "no value is below 0"),  # MRI-like, 0-1000
    (lambda a: a.astype(np.int32) - 2048, "shifted by -1024 once too often"),
])
def test_images_that_are_not_a_ct_in_hu_are_named(sample_ct, make, words):
    problems = ct_warnings(_like(sample_ct, make(sitk.GetArrayFromImage(sample_ct))))
    assert any(words in problem for problem in problems), problems


def test_tiny_and_oddly_spaced_volumes_are_named():
    tiny = sitk.Image([5, 5, 5], sitk.sitkInt16)
    assert any("too small" in p for p in ct_warnings(tiny))
    odd = sitk.Image([64, 64, 64], sitk.sitkInt16)
    odd.SetSpacing((0.01, 0.01, 0.01))
    assert any("spacing" in p for p in ct_warnings(odd))


def test_femur_volume_matches_simpleitk_and_the_sample_is_plausible():
    label = sitk.ReadImage(str(SAMPLE_LABEL))
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(label)
    mask = sitk.GetArrayFromImage(label) != 0
    check = check_femur(mask, tuple(reversed(label.GetSpacing())))
    assert check.volume_ml == pytest.approx(statistics.GetPhysicalSize(1) / 1000.0, rel=1e-9)
    assert check.warnings == ()


def test_implausible_femurs_are_warned_about():
    spacing = (1.0, 1.0, 1.0)
    field = np.ones((60, 60, 60), dtype=bool)  # 216 ml filling the whole image
    assert any("fills 100%" in w for w in check_femur(field, spacing).warnings)
    speck = np.zeros((60, 60, 60), dtype=bool)
    speck[10:20, 10:20, 10:20] = True  # 1 ml
    assert any("less than a femoral head" in w for w in check_femur(speck, spacing).warnings)
    huge = np.zeros((200, 200, 100), dtype=bool)
    huge[:, :, :30] = True  # 1.2 litres
    assert any("more than a whole femur" in w for w in check_femur(huge, spacing, "left").warnings)
    pieces = np.zeros((100, 100, 100), dtype=bool)
    pieces[5:45, 5:45, 5:45] = True
    pieces[55:95, 55:95, 55:95] = True  # two equal pieces: the largest holds half
    assert any("several pieces (the largest holds 50%)" in w for w in check_femur(pieces, spacing).warnings)


def _oriented_box_sizes(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> list[float]:
    """SimpleITK's oriented bounding box of the mask (mm): an independent principal-axes measurement."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.ComputeOrientedBoundingBoxOn()
    statistics.Execute(image)
    return sorted(statistics.GetOrientedBoundingBoxSize(1))


def test_thickness_is_the_flattest_principal_extent():
    spacing = (1.0, 0.8, 0.8)
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip((160, 200, 200), spacing)), indexing="ij")
    angle = np.radians(30.0)
    u = (x - 80) * np.cos(angle) + (y - 80) * np.sin(angle)
    v = -(x - 80) * np.sin(angle) + (y - 80) * np.cos(angle)
    slab = (np.abs(u) < 60) & (np.abs(v) < 25) & (np.abs(z - 80) < 40)  # 120 x 50 x 80 mm, turned 30 degrees
    check = check_femur(slab, spacing)
    assert check.thickness_mm == pytest.approx(_oriented_box_sizes(slab, spacing)[0], abs=1.0)
    assert 49.0 <= check.thickness_mm <= 52.0
    assert not any("thick" in w for w in check.warnings)


def test_hip_bone_labelled_with_the_femur_is_warned_about():
    from scipy import ndimage

    from FemurSegLib.synthetic.cases import generate_case

    ct, truth, _ = generate_case("invivo", 3, held_out=True)
    hu, femurs = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(truth) != 0
    spacing = tuple(reversed(ct.GetSpacing()))
    pieces, count = ndimage.label(femurs)
    femur = pieces == np.bincount(pieces.ravel())[1:].argmax() + 1
    alone = check_femur(femur, spacing, "left")
    assert alone.thickness_mm == pytest.approx(_oriented_box_sizes(femur, spacing)[0], abs=1.5)
    assert alone.warnings == ()
    near_bone = (hu > 250) & ~femurs & (ndimage.distance_transform_edt(~femur, sampling=spacing) < 40)
    leaked = check_femur(femur | near_bone, spacing, "left")
    assert 20.0 <= leaked.volume_ml - alone.volume_ml, "the render should hold hip bone beside the femur"
    assert any("left: it is" in w and "probably hip bone" in w for w in leaked.warnings), leaked.warnings
