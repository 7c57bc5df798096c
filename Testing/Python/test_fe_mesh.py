"""Meshing: volume against the voxels, valid and well-shaped elements, quadratic nodes, load-case node sets,
and labels or element sizes that cannot be meshed refused in one line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from fe_shapes import HEAD, HEAD_RADIUS, toy_femur, toy_mesh
from FemurSegLib.errors import FemurSegError
from FemurSegLib.fe.loadcases import find_load_cases, surface_nodes
from FemurSegLib.fe.mesh import QUADRATIC_EDGES, make_quadratic, mesh_label, tet_volumes


@pytest.fixture(scope="module")
def meshed_in(tmp_path_factory):
    """The toy femur meshed with the current directory set to an empty folder (fTetWild writes debug files there)."""
    folder = tmp_path_factory.mktemp("current-directory")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        return toy_mesh(), folder
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def toy(meshed_in):
    return meshed_in[0]


def test_meshing_writes_nothing_into_the_current_directory(meshed_in):
    assert sorted(p.name for p in meshed_in[1].iterdir()) == []


def test_toy_mesh_is_valid_inside_the_label_and_of_its_volume(toy):
    mesh, report = toy
    _, label = toy_femur()
    voxels = np.count_nonzero(sitk.GetArrayViewFromImage(label)) * np.prod(label.GetSpacing()) / 1000.0
    assert report.label_volume_ml == pytest.approx(voxels)
    assert abs(tet_volumes(mesh.points, mesh.corners).sum() / 1000.0 / voxels - 1) < 0.01
    volumes = tet_volumes(mesh.points, mesh.corners)
    assert (volumes > 0).all() and report.inverted == 0 and report.min_dihedral_deg > 1.0
    centroids = mesh.points[mesh.corners].mean(axis=1)
    index = np.array([label.TransformPhysicalPointToIndex(tuple(c)) for c in centroids[::50]])
    assert sitk.GetArrayViewFromImage(label)[index[:, 2], index[:, 1], index[:, 0]].mean() > 0.97
    edges = np.linalg.norm(mesh.points[mesh.corners[:, 0]] - mesh.points[mesh.corners[:, 1]], axis=1)
    assert 0.6 * 3.0 < np.median(edges) < 1.5 * 3.0


def test_quadratic_nodes_sit_mid_edge_and_are_shared(toy):
    mesh, _ = toy
    quadratic = make_quadratic(mesh)
    assert quadratic.cells.shape == (len(mesh.cells), 10)
    for k, (a, b) in enumerate(QUADRATIC_EDGES):
        middle = quadratic.points[quadratic.cells[:, 4 + k]]
        assert middle == pytest.approx(0.5 * (mesh.points[mesh.corners[:, a]] + mesh.points[mesh.corners[:, b]]))
    edges = {tuple(sorted(e)) for cell in mesh.corners for e in ((cell[a], cell[b]) for a, b in QUADRATIC_EDGES)}
    assert len(quadratic.points) == len(mesh.points) + len(edges)


def test_load_case_sets_are_where_the_toy_femur_has_them(toy):
    mesh, _ = toy
    cases = find_load_cases(mesh.points, mesh.corners)
    z, x = mesh.points[:, 2], mesh.points[:, 0]
    used = np.unique(mesh.corners)
    low, high = z[used].min(), z[used].max()
    assert cases.axis[2] > 0.95 and cases.medial[0] > 0.9  # the principal axis leans towards the head a little
    # distal fixation: nodes of the shaft's lowest part only (below a fifth of the height), and many of them
    fixed = cases.sets["DISTAL_FIXATION"]
    assert (z[fixed] < low + 0.2 * (high - low)).all() and len(fixed) > 10
    assert set(used[z[used] < low + 0.02 * (high - low)]) <= set(fixed)
    on_ball = np.abs(np.linalg.norm(mesh.points - HEAD, axis=1) - HEAD_RADIUS) < 1.5
    for name in ("HEAD_STANCE", "HEAD_FALL"):
        assert on_ball[cases.sets[name]].all(), name
    fall = x[cases.sets["HEAD_FALL"]]  # the head's medial face (medial = +x)
    assert (fall > HEAD[0] + 0.3 * HEAD_RADIUS).all() and fall.mean() > HEAD[0] + 0.7 * HEAD_RADIUS
    assert (x[cases.sets["TROCHANTER_FALL"]] < 0).all()
    assert set(cases.sets["HEAD_STANCE"]) <= set(surface_nodes(mesh.corners))


def test_a_label_in_two_pieces_is_refused():
    _, label = toy_femur()
    voxels = sitk.GetArrayFromImage(label)
    voxels[:, :, :3] = 0
    voxels[2:10, 2:10, 0:3] = 1  # a loose piece apart from the femur
    broken = sitk.GetImageFromArray(voxels)
    broken.CopyInformation(label)
    with pytest.raises(FemurSegError, match="not one solid piece: 2 pieces"):
        mesh_label(broken, 3.0)


@pytest.mark.parametrize("size, message", [(30.0, "largest half-thickness"), (0.2, "under half the voxel"),
                                           (-1.0, "positive number")])
def test_an_element_size_the_label_cannot_carry_is_refused(size, message):
    with pytest.raises(FemurSegError, match=message):
        mesh_label(toy_femur()[1], size)


def test_two_femurs_need_a_value():
    _, label = toy_femur()
    voxels = sitk.GetArrayFromImage(label)
    voxels[voxels > 0] = 2
    voxels[:, :3, :3] = 1
    both = sitk.GetImageFromArray(voxels)
    both.CopyInformation(label)
    with pytest.raises(FemurSegError, match="--value"):
        mesh_label(both, 3.0)
