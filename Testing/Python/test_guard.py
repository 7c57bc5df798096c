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
