"""Material mapping against analytic integrals: uniform blocks, linear gradients, quadrature exactness."""

from __future__ import annotations

from math import factorial

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.fe.calibration import Rod, fit_calibration
from FemurSegLib.fe.mapping import map_materials, tet_rule
from FemurSegLib.fe.materials import bin_moduli, get_law
from FemurSegLib.fe.mesh import tet_volumes

IDENTITY = fit_calibration([Rod("0", 0.0, 0.0), Rod("1000", 1000.0, 1000.0)], "HA")  # density = HU


def block_mesh(n: int = 4, size: float = 12.0, origin=(4.0, 4.0, 4.0)) -> tuple[np.ndarray, np.ndarray]:
    """A cube split into 6 n^3 Kuhn tetrahedra, made here independently of the mesher."""
    axis = np.linspace(0.0, size, n + 1)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) + np.array(origin)
    grid = np.arange(len(points)).reshape(n + 1, n + 1, n + 1)
    c = [grid[i:i + n, j:j + n, k:k + n].ravel() for i, j, k in
         ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1))]
    tets = np.concatenate([np.stack([c[a], c[b], c[d], c[e]], 1) for a, b, d, e in
                           ((0, 1, 2, 6), (0, 2, 3, 6), (0, 3, 7, 6), (0, 7, 4, 6), (0, 4, 5, 6), (0, 5, 1, 6))])
    negative = tet_volumes(points, tets) < 0
    tets[negative] = tets[negative][:, [0, 2, 1, 3]]
    return points, tets


def ct_of(function, shape=(24, 24, 24)) -> sitk.Image:
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    return sitk.GetImageFromArray(function(x, y, z).astype(np.float32))  # 1 mm voxels at the origin


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_the_rule_integrates_polynomials_of_degree_2n_minus_1_exactly(n):
    bary, weights = tet_rule(n)
    assert weights.sum() == pytest.approx(1.0) and (weights > 0).all()
    degree = 2 * n - 1
    for a in range(degree + 1):
        for b in range(degree + 1 - a):
            c = degree - a - b
            exact = 6 * factorial(a) * factorial(b) * factorial(c) / factorial(a + b + c + 3)  # mean over the tet
            assert weights @ (bary[:, 1] ** a * bary[:, 2] ** b * bary[:, 3] ** c) == pytest.approx(exact)


@pytest.mark.parametrize("law_name", ["morgan", "keyak", "keller"])
def test_a_uniform_block_gives_the_laws_modulus_exactly(law_name):
    hu = 850.0
    points, tets = block_mesh()
    values = map_materials(ct_of(lambda x, y, z: hu + 0 * x), points, tets, IDENTITY, get_law(law_name), 3)
    rho = hu / 1000.0  # g/cm^3
    expected = {"morgan": 6850 * ((0.877 * rho + 0.079) / 0.6) ** 1.49,
                "keyak": 10200 * (1.22 * rho + 0.0523) ** 2.01,  # rho_ash 1.09 > 0.6: the top branch
                "keller": 10500 * (0.877 * rho + 0.079) ** 2.29}[law_name]
    assert values.density_mg_cm3 == pytest.approx(np.full(len(tets), hu), rel=1e-12)
    assert values.modulus_mpa == pytest.approx(np.full(len(tets), expected), rel=1e-12)


def power_integral_mean(f: np.ndarray, p: float) -> np.ndarray:
    """Mean of f^p over a tetrahedron on which f is linear with vertex values f (m, 4), all distinct:
    3! x the third divided difference of t^(p+3) / ((p+1)(p+2)(p+3))."""
    total = np.zeros(len(f))
    for i in range(4):
        denominator = np.prod([f[:, i] - f[:, j] for j in range(4) if j != i], axis=0)
        total += f[:, i] ** (p + 3) / denominator
    return 6 * total / ((p + 1) * (p + 2) * (p + 3))


def test_a_linear_density_gradient_gives_each_elements_analytic_integral():
    gradient = np.array([31.0, 17.0, 7.0])  # HU per mm, distinct along x, y, z
    hu = lambda x, y, z: 200.0 + gradient[0] * x + gradient[1] * y + gradient[2] * z  # noqa: E731
    points, tets = block_mesh(n=3)
    law = get_law("keller")
    values = map_materials(ct_of(hu), points, tets, IDENTITY, law, 4, floor_mpa=0.0)
    corner_hu = hu(*points[tets].transpose(2, 0, 1))  # (m, 4)
    # density is linear: its mean over an element is its value at the centroid
    assert values.density_mg_cm3 == pytest.approx(corner_hu.mean(axis=1), rel=1e-9)
    # E = 10500 (0.877 rho + 0.079)^2.29: the mean of a power of a linear function, in closed form
    ash = 0.877 * corner_hu / 1000.0 + 0.079
    exact = 10500 * power_integral_mean(ash, 2.29)
    assert values.modulus_mpa == pytest.approx(exact, rel=2e-4)
    at_centroid = law.modulus(values.density_mg_cm3 / 1000.0)
    assert np.abs(at_centroid / exact - 1).max() > 10 * np.abs(values.modulus_mpa / exact - 1).max()


def test_bins_keep_the_mean_modulus_and_every_value_when_there_are_enough():
    modulus = np.random.default_rng(3).uniform(50, 20000, 500)
    bins = bin_moduli(modulus, 16)
    assert bins.count <= 16 and bins.modulus[bins.index].mean() == pytest.approx(modulus.mean())
    assert np.abs(bins.modulus[bins.index] - modulus).max() <= (modulus.max() - modulus.min()) / 16
    exact = bin_moduli(modulus, 10**9)
    assert exact.modulus[exact.index] == pytest.approx(modulus)
