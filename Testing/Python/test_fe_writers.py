"""Every file read back by an independent reader, with the same nodes, elements, materials and node sets:
meshio for .inp and .vtu, xml.etree for .feb, mapdl-archive for .cdb."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import meshio
import numpy as np
import pytest

from fe_shapes import toy_mesh
from FemurSegLib.fe.loadcases import find_load_cases
from FemurSegLib.fe.materials import bin_moduli
from FemurSegLib.fe.mesh import make_quadratic
from FemurSegLib.fe.model import FEModel
from FemurSegLib.fe.write_cdb import write_cdb
from FemurSegLib.fe.write_feb import write_feb
from FemurSegLib.fe.write_inp import write_inp
from FemurSegLib.fe.write_vtu import write_vtu


@pytest.fixture(scope="module", params=[False, True], ids=["linear", "quadratic"])
def model(request) -> FEModel:
    mesh, _ = toy_mesh()
    if request.param:
        mesh = make_quadratic(mesh)
    cases = find_load_cases(mesh.points, mesh.corners)
    modulus = 500.0 + 40.0 * mesh.points[mesh.corners].mean(axis=1)[:, 2] ** 1.5
    return FEModel(points=mesh.points, cells=mesh.cells, density_mg_cm3=modulus / 20.0, modulus_mpa=modulus,
                   poisson=0.3, bins=bin_moduli(modulus, 12), node_sets=cases.sets,
                   load_directions=cases.directions())


def element_modulus(model: FEModel) -> np.ndarray:
    return model.bins.modulus[model.bins.index]


def test_inp_reads_back_in_meshio_with_its_materials(model, tmp_path):
    path = tmp_path / "femur.inp"
    write_inp(model, path)
    mesh = meshio.read(path)
    kind = "tetra10" if model.quadratic else "tetra"
    assert mesh.points == pytest.approx(model.points, abs=1e-6)
    assert [block.type for block in mesh.cells] == [kind]
    assert np.array_equal(mesh.cells[0].data, model.cells)
    for name, nodes in model.node_sets.items():
        assert np.array_equal(np.sort(mesh.point_sets[name]), np.sort(nodes))
    # materials: meshio does not read them; the keywords are parsed here, element set -> material -> E
    text = path.read_text()
    elastic = {m[0]: float(m[1]) for m in re.findall(r"\*MATERIAL, NAME=(\w+)\n\*ELASTIC\n([^,]+),", text)}
    sections = dict(re.findall(r"\*SOLID SECTION, ELSET=(\w+), MATERIAL=(\w+)", text))
    recovered = np.zeros(len(model.cells))
    for elset, material in sections.items():
        recovered[mesh.cell_sets[elset][0]] = elastic[material]
    assert recovered == pytest.approx(element_modulus(model), rel=1e-5)


def test_vtu_reads_back_in_meshio_with_per_element_data(model, tmp_path):
    path = tmp_path / "femur.vtu"
    write_vtu(model, path)
    mesh = meshio.read(path)
    assert mesh.points == pytest.approx(model.points)
    assert np.array_equal(mesh.cells[0].data, model.cells)
    assert mesh.cell_data["E_MPa"][0] == pytest.approx(model.modulus_mpa)
    assert mesh.cell_data["density_mg_cm3"][0] == pytest.approx(model.density_mg_cm3)
    assert np.array_equal(np.flatnonzero(mesh.point_data["HEAD_STANCE"]), np.sort(model.node_sets["HEAD_STANCE"]))


def test_feb_parses_as_febio_4_with_the_mapped_modulus(model, tmp_path):
    path = tmp_path / "femur.feb"
    write_feb(model, path)
    root = ET.parse(path).getroot()
    assert root.tag == "febio_spec" and root.get("version") == "4.0"
    nodes = np.array([[float(v) for v in n.text.split(",")] for n in root.find("Mesh/Nodes")])
    assert nodes == pytest.approx(model.points, abs=1e-6)
    elements = root.find("Mesh/Elements")
    assert elements.get("type") == ("tet10" if model.quadratic else "tet4")
    assert np.array_equal(np.array([[int(v) for v in e.text.split(",")] for e in elements]) - 1, model.cells)
    material = root.find("Material/material")
    assert material.find("E").get("type") == "map" and float(material.find("v").text) == 0.3
    data = root.find(f"MeshData/ElementData[@name='{material.find('E').text}']")
    assert data.get("elem_set") == elements.get("name") == root.find("MeshDomains/SolidDomain").get("name")
    assert np.array([float(e.text) for e in data]) == pytest.approx(model.modulus_mpa, rel=1e-5)
    sets = {s.get("name"): np.array([int(v) for v in s.text.split(",")]) - 1 for s in root.iter("NodeSet")}
    assert sets.keys() == model.node_sets.keys()
    assert all(np.array_equal(sets[name], model.node_sets[name]) for name in sets)


def test_cdb_reads_back_in_mapdl_archive_with_its_materials(model, tmp_path):
    from mapdl_archive import Archive

    path = tmp_path / "femur.cdb"
    write_cdb(model, path)
    archive = Archive(path)
    assert archive.nodes == pytest.approx(model.points, abs=1e-6)
    assert np.array_equal(archive.nnum, np.arange(1, len(model.points) + 1))
    assert np.array_equal(archive.material_type, model.bins.index + 1)
    (kind, cells), = archive.grid.cells_dict.items()  # the archive's elements as VTK cells
    assert kind == (24 if model.quadratic else 10)  # VTK_QUADRATIC_TETRA, VTK_TETRA
    assert archive.grid.points[cells] == pytest.approx(model.points[model.cells], abs=1e-6)
    assert set(archive.etype) == {187 if model.quadratic else 185}  # SOLID187, or SOLID185 in its tetrahedral form
    for name, nodes in model.node_sets.items():
        assert np.array_equal(np.sort(archive.node_components[name]), np.sort(nodes) + 1)
    elastic = {int(m[0]): float(m[1]) for m in re.findall(r"MP,EX,(\d+),(\S+)", path.read_text())}
    assert np.array([elastic[k] for k in archive.material_type]) == pytest.approx(element_modulus(model), rel=1e-5)
