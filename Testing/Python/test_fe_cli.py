"""`femurseg fe` end to end on the toy femur, and its one-line refusals (exit 2, nothing written)."""

from __future__ import annotations

import json

import meshio
import pytest
import SimpleITK as sitk

from fe_shapes import toy_femur
from FemurSegLib.cli import main

RODS = "name,density_mg_cm3,hu,material\nwater,0,0,HA\nr200,200,250,HA\nr800,800,1000,HA\n"  # density = 0.8 HU


@pytest.fixture
def inputs(tmp_path):
    ct, label = toy_femur()
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "label.nrrd"))
    (tmp_path / "rods.csv").write_text(RODS)
    return tmp_path


def test_fe_writes_every_format_with_calibrated_moduli(inputs, capsys):
    out = inputs / "fe"
    code = main(["fe", str(inputs / "ct.nrrd"), str(inputs / "label.nrrd"), str(out), "--calibration",
                 str(inputs / "rods.csv"), "--element-size", "3", "--formats", "vtu,inp", "--law", "keller"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert sorted(p.name for p in out.iterdir()) == ["femur.inp", "femur.json", "femur.vtu"]
    assert "stance stiffness" in printed.out and "R^2 1.0000" in printed.out
    provenance = json.loads((out / "femur.json").read_text())
    assert provenance["calibration"]["slope"] == pytest.approx(0.8)
    assert provenance["law"]["name"] == "keller" and provenance["stance_stiffness_n_mm"] > 0
    mesh = meshio.read(out / "femur.vtu")
    # the toy's bone reads 400 + 6 z HU: every element's density is 0.8 x that at its centroid, to the surface's
    # partial volume (elements touching the outside average in some air)
    centroid_z = mesh.points[mesh.cells[0].data].mean(axis=1)[:, 2]
    density = mesh.cell_data["density_mg_cm3"][0]
    inner = density > 0.8 * (400 + 6 * centroid_z) - 5
    assert inner.mean() > 0.3
    assert density[inner] == pytest.approx(0.8 * (400 + 6 * centroid_z[inner]), rel=0.02)
    rho_ash = 0.877 * density / 1000 + 0.079
    assert mesh.cell_data["E_MPa"][0][inner] == pytest.approx(10500 * rho_ash[inner] ** 2.29, rel=0.03)


@pytest.mark.parametrize("rods, message", [
    ("density_mg_cm3,hu\n", "lists no rods"),
    ("density_mg_cm3,hu\n0,0\n200,900\n800,400\n", "Rods out of order"),
])
def test_bad_rods_are_refused_before_any_output(inputs, capsys, rods, message):
    (inputs / "rods.csv").write_text(rods)
    code = main(["fe", str(inputs / "ct.nrrd"), str(inputs / "label.nrrd"), str(inputs / "fe"), "--calibration",
                 str(inputs / "rods.csv"), "--element-size", "3"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("femurseg: error: ")
    assert list((inputs / "fe").iterdir()) == []


def test_a_label_in_pieces_and_a_size_it_cannot_carry_get_one_line(inputs, capsys):
    label = sitk.ReadImage(str(inputs / "label.nrrd"))
    voxels = sitk.GetArrayFromImage(label)
    voxels[:2, :4, :4] = 1
    broken = sitk.GetImageFromArray(voxels)
    broken.CopyInformation(label)
    sitk.WriteImage(broken, str(inputs / "broken.nrrd"))
    for label_name, size, message in (("broken.nrrd", "3", "not one solid piece"),
                                      ("label.nrrd", "40", "largest half-thickness")):
        code = main(["fe", str(inputs / "ct.nrrd"), str(inputs / label_name), str(inputs / "fe"),
                     "--calibration", str(inputs / "rods.csv"), "--element-size", size])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    code = main(["fe", str(inputs / "ct.nrrd"), str(inputs / "label.nrrd"), str(inputs / "rods.csv")])
    assert code == 2 and "is a file" in capsys.readouterr().err
    code = main(["fe", str(inputs / "ct.nrrd"), str(inputs / "label.nrrd"), str(inputs / "fe"), "--formats", "stl"])
    assert code == 2 and "unknown" in capsys.readouterr().err
