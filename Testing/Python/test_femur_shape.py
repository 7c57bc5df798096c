"""The femoral-head test (femur_shape.py) on analytic shapes whose answer is known by construction, and on the
stored real bone surfaces: a head with its neck is a femur, vertebral bodies, plates, shafts, a sacrum and tibiae
are not."""

from __future__ import annotations

import numpy as np
import pytest

from FemurSegLib.anatomy import load_shapes
from FemurSegLib.femur_shape import fit_femoral_head
from FemurSegLib.synthetic.render import Grid, voxelise


def _grid(extent_mm: tuple[float, float, float], spacing: tuple[float, float, float]) -> np.ndarray:
    """Physical (z, y, x) coordinates in mm of voxel centres of a grid centred on 0."""
    axes = [np.arange(-e / 2, e / 2 + 1e-6, s) for e, s in zip(extent_mm, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    t = np.clip(((points - a) @ (b - a)) / float((b - a) @ (b - a)), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[..., None] * (b - a)), axis=-1)


def _proximal_femur(points: np.ndarray, head_radius: float) -> np.ndarray:
    """A head (sphere at 0), a neck (cylinder of radius 0.62 head radius, 130 degrees to the shaft) and a shaft."""
    neck_end = np.array([-35.0, 0.0, 25.0])  # z down and x lateral, from the head centre
    shaft_bottom = neck_end + np.array([-110.0, 0.0, 0.0])
    head = np.linalg.norm(points, axis=-1) < head_radius
    neck = _segment_distance(points, np.zeros(3), neck_end) < 0.62 * head_radius
    shaft = _segment_distance(points, neck_end + np.array([10.0, 0.0, 0.0]), shaft_bottom) < 15.0
    return head | neck | shaft


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 0.8), (3.0, 3.0, 3.0)])
@pytest.mark.parametrize("radius", [19.0, 24.0, 28.0])
def test_a_head_with_its_neck_is_a_femur_and_its_radius_is_measured(spacing, radius):
    points = _grid((200.0, 90.0, 110.0), spacing)
    fit = fit_femoral_head(_proximal_femur(points, radius), spacing)
    assert fit.is_femur, fit
    assert abs(fit.radius_mm - radius) <= max(1.5, 0.5 * max(spacing)), fit


def test_the_head_centre_is_where_the_sphere_is():
    spacing = (1.0, 1.0, 1.0)
    points = _grid((200.0, 90.0, 110.0), spacing)
    fit = fit_femoral_head(_proximal_femur(points, 23.0), spacing)
    expected = -points[0, 0, 0]  # the grid's origin (voxel 0) lies at -extent/2, the head at 0
    assert np.linalg.norm(np.array(fit.centre_mm) - expected) <= 1.5


@pytest.mark.parametrize("name, mask_of", [
    ("vertebral body", lambda p: (np.hypot(p[..., 1], p[..., 2]) < 22.0) & (np.abs(p[..., 0]) < 14.0)),
    ("plate", lambda p: (np.abs(p[..., 0]) < 8.0) & (np.abs(p[..., 1]) < 45.0) & (np.abs(p[..., 2]) < 50.0)),
    ("shaft", lambda p: np.hypot(p[..., 1], p[..., 2]) < 17.0),
    ("box", lambda p: np.all(np.abs(p) < np.array([30.0, 30.0, 30.0]), axis=-1)),
])
def test_shapes_without_a_femoral_head_are_not_femurs(name, mask_of):
    spacing = (1.0, 1.0, 1.0)
    fit = fit_femoral_head(mask_of(_grid((120.0, 110.0, 110.0), spacing)), spacing)
    assert not fit.is_femur and not fit.is_borderline, (name, fit)
    assert fit.describe().startswith("no"), fit.describe()


def test_a_metal_head_is_judged_as_a_hip_replacement():
    spacing = (1.0, 1.0, 1.0)
    points = _grid((200.0, 90.0, 110.0), spacing)
    mask = _proximal_femur(points, 14.0)
    assert not fit_femoral_head(mask, spacing).is_femur  # too small for a femoral head of bone
    ct = np.where(np.linalg.norm(points, axis=-1) < 14.0, 3071.0, np.where(mask, 600.0, 40.0))
    fit = fit_femoral_head(mask, spacing, ct)
    assert fit.prosthetic and fit.is_femur, fit
    assert "prosthetic" in fit.describe()


def test_a_head_at_the_edge_of_the_image_counts_only_when_most_of_it_is_in_view():
    """CTs often end at the femoral necks: a head whose neck leaves the image is still a head; one cut through
    above its centre cannot be judged."""
    spacing = (1.0, 1.0, 1.0)
    points = _grid((200.0, 90.0, 110.0), spacing)
    mask = _proximal_femur(points, 23.0)
    centre_row = int(round(100.0 / spacing[0]))  # the head centre's slice
    below = fit_femoral_head(mask[centre_row - 30:], spacing)  # the image begins 30 mm below the head centre
    assert below.is_femur and below.viewed < 1.0, below
    above = fit_femoral_head(mask[centre_row + 10:], spacing)  # ... 10 mm above it
    assert not above.is_femur and not above.is_borderline, above


def _voxelised(kind: str, spacing: float) -> list[tuple[str, np.ndarray]]:
    masks = []
    for shape in load_shapes(kind)[:2]:
        low, high = shape.vertices.min(0) - 5.0, shape.vertices.max(0) + 5.0
        grid = Grid(origin=low, spacing=np.full(3, spacing), direction=np.eye(3),
                    size=tuple(int(v) for v in np.ceil((high - low) / spacing) + 1))
        voxels = voxelise(grid, shape.vertices, shape.triangles)
        mask = np.zeros(grid.shape, dtype=bool)
        mask[voxels.region] = voxels.inside
        masks.append((shape.name, mask))
    return masks


@pytest.mark.parametrize("kind, is_femur", [("femur", True), ("vertebra", False), ("sacrum", False),
                                            ("tibia", False), ("patella", False)])
def test_real_bone_surfaces(kind, is_femur):
    for name, mask in _voxelised(kind, 2.0):
        fit = fit_femoral_head(mask, (2.0, 2.0, 2.0))
        assert fit.is_femur == is_femur, (name, fit)
        if not is_femur:
            assert not fit.is_borderline, (name, fit)
