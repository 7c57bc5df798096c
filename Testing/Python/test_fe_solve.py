"""The solvability check: a cylinder of known E has stiffness E A / L; the femur stance case solves."""

from __future__ import annotations

import numpy as np
import pytest

from fe_shapes import cylinder_surface
from FemurSegLib.fe.mesh import tetrahedralize, tet_volumes
from FemurSegLib.fe.solve import axial_stiffness

RADIUS, LENGTH, MODULUS = 5.0, 30.0, 12000.0


@pytest.fixture(scope="module")
def cylinder():
    vertices, triangles = cylinder_surface(RADIUS, LENGTH)
    return tetrahedralize(vertices, triangles, 3.0)


def test_cylinder_stiffness_is_e_a_over_l(cylinder):
    points, corners = cylinder.points, cylinder.corners
    assert tet_volumes(points, corners).sum() == pytest.approx(np.pi * RADIUS ** 2 * LENGTH, rel=0.01)
    z = points[:, 2]
    bottom, top = np.flatnonzero(z < 1e-6), np.flatnonzero(z > LENGTH - 1e-6)
    modulus = np.full(len(corners), MODULUS)
    stiffness = axial_stiffness(points, corners, modulus, 0.3, bottom, top, np.array([0, 0, -1.0]), slip=True)
    assert stiffness == pytest.approx(MODULUS * np.pi * RADIUS ** 2 / LENGTH, rel=0.02)
    # two materials in series (halves of E and 3E): 1/k = L/2 (1/E + 1/3E) / A
    layered = np.where(points[corners].mean(axis=1)[:, 2] < LENGTH / 2, MODULUS, 3 * MODULUS)
    series = np.pi * RADIUS ** 2 / (LENGTH / 2 * (1 / MODULUS + 1 / (3 * MODULUS)))
    assert axial_stiffness(points, corners, layered, 0.3, bottom, top, np.array([0, 0, -1.0]),
                           slip=True) == pytest.approx(series, rel=0.03)


def test_clamped_ends_are_stiffer_than_sliding_ends(cylinder):
    points, corners = cylinder.points, cylinder.corners
    z = points[:, 2]
    bottom, top = np.flatnonzero(z < 1e-6), np.flatnonzero(z > LENGTH - 1e-6)
    modulus = np.full(len(corners), MODULUS)
    sliding = axial_stiffness(points, corners, modulus, 0.3, bottom, top, np.array([0, 0, -1.0]), slip=True)
    clamped = axial_stiffness(points, corners, modulus, 0.3, bottom, top, np.array([0, 0, -1.0]))
    assert sliding < clamped < 1.2 * sliding
