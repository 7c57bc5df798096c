"""The phantom families: exact voxelisation (against an analytic sphere), determinism, the subject split, and the
anatomy each family promises."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FemurSegLib.anatomy import load_shapes
from FemurSegLib.synthetic.cases import generate_case
from FemurSegLib.synthetic.render import Grid, voxelise


def _sphere(radius: float, resolution: int = 180) -> tuple[np.ndarray, np.ndarray]:
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkFiltersSources import vtkSphereSource

    source = vtkSphereSource()
    source.SetRadius(radius)
    source.SetThetaResolution(resolution)
    source.SetPhiResolution(resolution)
    source.Update()
    polydata = source.GetOutput()
    vertices = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(float)
    triangles = numpy_support.vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return vertices, triangles


def test_voxelisation_is_exact_on_a_rotated_anisotropic_grid():
    """A voxel is inside exactly when its centre is inside the surface: checked against |p - c| <= r."""
    radius, centre = 20.0, np.array([3.0, -2.0, 5.0])
    vertices, triangles = _sphere(radius)
    angle = np.deg2rad(35)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    spacing, size = np.array([0.5, 0.7, 1.3]), (110, 80, 45)
    grid = Grid(origin=centre - direction @ (spacing * np.array(size) / 2), spacing=spacing, direction=direction,
                size=size)
    voxels = voxelise(grid, vertices + centre, triangles)
    z, y, x = np.meshgrid(*(np.arange(s.start, s.stop) for s in voxels.region), indexing="ij")
    points = grid.physical(np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(float))
    distance = np.linalg.norm(points - centre, axis=1).reshape(voxels.inside.shape)
    clear = np.abs(distance - radius) > 0.05  # the polygon lies within 0.01 mm of the sphere at this resolution
    assert np.array_equal(voxels.inside[clear], (distance <= radius)[clear])
    assert voxels.region[0].start > 0, "the sphere lies inside the grid, so its box does not reach the border"
    assert np.all((voxels.sdf < 0) == voxels.inside)


@pytest.mark.parametrize("family", ["legacy", "exvivo", "invivo"])
def test_the_same_seed_gives_the_same_case(family):
    first = generate_case(family, 7)
    second = generate_case(family, 7)
    for a, b in zip(first[:2], second[:2]):
        assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()


def test_held_out_subjects_only_in_held_out_cases():
    held_out = {shape.subject for shape in load_shapes() if shape.held_out}
    training = {shape.subject for shape in load_shapes() if not shape.held_out}
    assert held_out and training and not held_out & training, "a subject is either held out or not, never both"
    assert not any(shape.held_out for shape in load_shapes("hemipelvis")), "in-vivo cases use a training pelvis"
    for family in ("exvivo", "invivo"):
        assert not set(generate_case(family, 3)[2].subjects) & held_out
        assert set(generate_case(family, 3, held_out=True)[2].subjects) <= held_out


def _pieces(label: sitk.Image) -> list[np.ndarray]:
    mask = sitk.GetArrayViewFromImage(label) != 0
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return [labels == index for index in range(1, count + 1)]


def test_exvivo_is_one_femur_of_bone_in_air_or_water():
    for seed in (1, 2):
        ct, label, info = generate_case("exvivo", seed)
        hu = sitk.GetArrayViewFromImage(ct)
        femur = sitk.GetArrayViewFromImage(label) != 0
        assert len(_pieces(label)) == 1 and len(info.sides) == 1
        volume_ml = femur.sum() * np.prod(ct.GetSpacing()) / 1000
        assert 40 < volume_ml < 500
        eroded = ndimage.binary_erosion(femur, iterations=2)
        assert np.median(hu[eroded]) > 50  # trabecular bone or marrow under cortex, not background
        background = hu[~ndimage.binary_dilation(femur, iterations=4)]
        assert np.percentile(background, 50) < 60  # air (-1000) or water (0) around it
        assert all(0.5 <= s <= 1.6 for s in ct.GetSpacing())


def test_invivo_has_two_femurs_along_z_beside_the_pelvis():
    ct, label, info = generate_case("invivo", 2)
    assert info.sides == ("left", "right")
    pieces = _pieces(label)
    assert len(pieces) == 2
    spacing = np.array(ct.GetSpacing()[::-1])
    for piece in pieces:
        points = np.argwhere(piece) * spacing
        axis = np.linalg.svd(points - points.mean(0), full_matrices=False)[2][0]
        assert abs(axis[0]) > np.cos(np.deg2rad(45)), "shaft along the scanner's z axis (array axis 0)"
    hu = sitk.GetArrayViewFromImage(ct)
    bone_outside_femurs = (hu > 400) & (sitk.GetArrayViewFromImage(label) == 0)
    assert bone_outside_femurs.sum() * np.prod(spacing) / 1000 > 20, "hip bones are in the field of view"
    assert (hu < -900).any(), "air around the body"


def test_shape_model_warp_keeps_a_real_surface_with_zero_coefficients_and_varies_it_otherwise():
    from FemurSegLib.anatomy import to_polydata
    from FemurSegLib.synthetic.femurs import warp_by_shape_model
    from vtkmodules.vtkFiltersCore import vtkMassProperties

    def volume_ml(vertices, triangles) -> float:
        properties = vtkMassProperties()
        properties.SetInputData(to_polydata(vertices, triangles))
        properties.Update()
        return properties.GetVolume() / 1000

    shape = next(s for s in load_shapes("femur") if not s.held_out and s.side == "right")
    same = warp_by_shape_model(shape, np.zeros(6))
    assert np.abs(same.vertices - shape.vertices).max() < 1e-3  # thin-plate spline round-off only
    assert np.allclose(same.landmarks["head_centre"], shape.landmarks["head_centre"], atol=1e-3)
    warped = warp_by_shape_model(shape, np.array([0.0, 2.0, -2.0, 0.0, 1.0, 0.0]))
    moved = np.linalg.norm(warped.vertices - shape.vertices, axis=1)
    assert 1.0 < np.mean(moved) < 15.0, "a plausible deformation: millimetres, not centimetres"
    assert 0.7 < volume_ml(warped.vertices, shape.triangles) / volume_ml(shape.vertices, shape.triangles) < 1.3
    assert 18.0 < warped.landmarks["head_radius"] < 32.0


def test_a_scan_profile_renders_the_same_specimen_on_the_scanners_grid():
    """``scan=(in-plane, slice)``: the drawn specimen, on a grid with the slices across its shaft; the exact label
    holds the same femur volume as the drawn grid's (both voxelise one surface)."""
    drawn_ct, drawn_label, drawn = generate_case("exvivo", 4)
    ct, label, info = generate_case("exvivo", 4, scan=(0.6, 1.5))
    assert (info.subjects, info.sides, info.details["pose"]) == (drawn.subjects, drawn.sides, drawn.details["pose"])
    femur = sitk.GetArrayViewFromImage(label) != 0
    shaft_xyz = np.array(info.details["pose"])[:, 2]  # the specimen's shaft in the image axes
    spacing_xyz = np.array(ct.GetSpacing())
    assert spacing_xyz[int(np.argmax(np.abs(shaft_xyz)))] == pytest.approx(1.5)
    assert sorted(spacing_xyz) == pytest.approx([0.6, 0.6, 1.5])

    def volume_ml(image, mask) -> float:
        return float(mask.sum() * np.prod(image.GetSpacing()) / 1000)

    drawn_femur = sitk.GetArrayViewFromImage(drawn_label) != 0
    assert volume_ml(ct, femur) == pytest.approx(volume_ml(drawn_ct, drawn_femur), rel=0.02)
    with pytest.raises(ValueError, match="ex-vivo"):
        generate_case("invivo", 4, scan=(0.6, 1.5))
