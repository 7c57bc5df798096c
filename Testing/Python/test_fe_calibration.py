"""Density calibration: fits checked against lines the tests construct, bad rod files refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.errors import FemurSegError
from FemurSegLib.fe.calibration import INTERNAL_REFERENCE_HA, Rod, fit_calibration, internal_calibration, read_rods
from FemurSegLib.fe.materials import get_law, material_warning


def test_rods_on_a_line_give_that_line_exactly(tmp_path):
    slope, intercept = 0.812, -3.7  # mg/cm^3 per HU, mg/cm^3
    densities = [0.0, 100.0, 400.0, 800.0, 1200.0]
    hus = [(d - intercept) / slope for d in densities]
    path = tmp_path / "rods.csv"
    path.write_text("name,density_mg_cm3,hu,material\n" +
                    "".join(f"r{i},{d},{h},K2HPO4\n" for i, (d, h) in enumerate(zip(densities, hus))))
    fit = read_rods(path)
    assert fit.material == "K2HPO4" and fit.method == "rods"
    assert fit.slope == pytest.approx(slope, rel=1e-10) and fit.intercept == pytest.approx(intercept, abs=1e-8)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert max(abs(r) for r in fit.residuals()) < 1e-8


def test_noisy_rods_report_the_residuals_and_r_squared(tmp_path):
    hus = np.array([-5.0, 120.0, 250.0, 490.0, 1010.0])
    densities = np.array([0.0, 100.0, 200.0, 400.0, 800.0])
    path = tmp_path / "rods.json"
    path.write_text(json.dumps({"material": "ha", "rods": [{"density_mg_cm3": d, "hu": h}
                                                           for d, h in zip(densities, hus)]}))
    fit = read_rods(path)
    slope, intercept = np.polyfit(hus, densities, 1)  # numpy's own least squares, independently
    fitted = slope * hus + intercept
    r2 = 1 - np.sum((densities - fitted) ** 2) / np.sum((densities - densities.mean()) ** 2)
    assert fit.material == "HA"
    assert (fit.slope, fit.intercept, fit.r_squared) == pytest.approx((slope, intercept, r2), rel=1e-9)
    assert fit.residuals() == pytest.approx(list(densities - fitted), abs=1e-9)
    assert "R^2" in fit.describe()


@pytest.mark.parametrize("content, message", [
    ("density_mg_cm3,hu\n", "lists no rods"),
    ("density_mg_cm3,hu\n100,120\n", "1 rod;"),
    ("density_mg_cm3,hu\n0,0\n100,300\n200,150\n", "Rods out of order"),
    ("density_mg_cm3,hu\n0,0\n100,100\n100,110\n", "the same density"),
    ("density,hu\n0,0\n100,100\n", "no column density_mg_cm3"),
    ("density_mg_cm3,hu\n0,zero\n100,100\n", "is not a number"),
])
def test_bad_rod_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "rods.csv"
    path.write_text(content)
    with pytest.raises(FemurSegError, match=message) as error:
        read_rods(path)
    assert "\n" not in str(error.value)


def test_internal_calibration_measures_the_tissues_of_the_scan():
    # a CT whose tissues read their nominal HU: the fit must be the nominal relation, density = 0.8 HU
    hu = np.full((40, 40, 40), -1000.0, dtype=np.float32)
    hu[5:35, 5:35, 5:20] = -100.0  # fat
    hu[5:35, 5:35, 20:35] = 50.0  # muscle
    femur = np.zeros(hu.shape, dtype=bool)
    femur[10:30, 10:30, 25:32] = True
    hu[femur] = 300.0
    cortex = femur & ~np.pad(np.ones((18, 18, 5), dtype=bool), ((11, 11), (11, 11), (26, 9)))
    hu[cortex] = 1500.0
    assert cortex.sum() >= 0.05 * femur.sum()
    ct = sitk.GetImageFromArray(hu)
    fit = internal_calibration(ct, femur)
    assert [r.name for r in fit.rods] == ["air", "fat", "muscle", "cortical bone"]
    assert [r.hu for r in fit.rods] == pytest.approx([v[0] for v in INTERNAL_REFERENCE_HA.values()])
    assert fit.slope == pytest.approx(0.8) and fit.intercept == pytest.approx(0.0, abs=1e-6)


def test_a_k2hpo4_fit_fed_to_an_ha_law_is_warned_about():
    fit = fit_calibration([Rod("a", 0, 0), Rod("b", 100, 120)], "K2HPO4")
    assert "HA" in material_warning(get_law("morgan"), fit.material)
    assert material_warning(get_law("keyak"), fit.material) is None
