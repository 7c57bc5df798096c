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


def _open_edges(shape) -> tuple[int, int]:
    """(boundary, non-manifold) edge counts by vtkFeatureEdges."""
    from vtkmodules.vtkFiltersCore import vtkFeatureEdges

    from FemurSegLib.anatomy import to_polydata

    counts = []
    for boundary in (True, False):
        edges = vtkFeatureEdges()
        edges.SetInputData(to_polydata(shape.vertices, shape.triangles))
        edges.SetBoundaryEdges(boundary)
        edges.SetNonManifoldEdges(not boundary)
        edges.FeatureEdgesOff()
        edges.ManifoldEdgesOff()
        edges.Update()
        counts.append(edges.GetOutput().GetNumberOfCells())
    return counts[0], counts[1]


@pytest.mark.parametrize("kind", ["sacrum", "vertebra", "tibia", "fibula", "patella"])
def test_context_bones_load_closed_outward_training_shapes(kind):
    from FemurSegLib.anatomy import CONTEXT_KINDS, KINDS

    assert kind in KINDS and kind in CONTEXT_KINDS
    shapes = load_shapes(kind)
    assert shapes and all(s.kind == kind and not s.held_out for s in shapes)
    assert load_shapes(kind, held_out=True) == []
    for shape in shapes:
        assert _open_edges(shape) == (0, 0), shape.name
        a, b, c = (shape.vertices[shape.triangles[:, k]] for k in range(3))
        assert np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6 > 0, f"{shape.name} is inside out"
        assert shape.licence in ("MPL-2.0", "CC-BY-3.0") and len(shape.triangles) <= 5000
        marks = shape.landmarks
        assert np.allclose(np.subtract(marks["bbox_max"], marks["bbox_min"]), marks["extent_mm"], atol=0.06)
        assert np.all(np.abs(np.subtract(marks["centroid"], shape.vertices.mean(axis=0))) < marks["extent_mm"])


def test_context_bones_have_plausible_sizes_in_mm_and_landmarks():
    sacrum = load_shapes("sacrum")[0]
    assert sacrum.name == "gias3_2007_5028_sacrum" and 80 <= sacrum.landmarks["extent_mm"][2] <= 160  # +z superior
    left, right = load_shapes("hemipelvis")[:2]
    assert right.vertices[:, 0].mean() < sacrum.landmarks["centroid"][0] < left.vertices[:, 0].mean(), \
        "the sacrum sits between the hemipelves of the same subject (same frame)"

    vertebrae = load_shapes("vertebra")
    assert [v.name for v in vertebrae] == ["opensim_L5", "opensim_L4", "opensim_L3", "opensim_L2", "opensim_L1",
                                           "opensim_T12"]
    heights = [v.landmarks["body_centre"][1] for v in vertebrae]
    assert heights == sorted(heights), "L5 lowest, T12 highest (OpenSim: y superior)"
    for vertebra in vertebrae:
        assert vertebra.landmarks["level"] == vertebra.name.split("_")[1]
        assert 35 <= vertebra.landmarks["body_width_mm"] <= 60
        assert 20 <= vertebra.landmarks["body_height_mm"] <= 40

    for tibia in load_shapes("tibia"):
        marks = tibia.landmarks
        axis = np.array(marks["shaft_axis"])
        assert abs(np.linalg.norm(axis) - 1) < 1e-3 and axis[1] > 0.95, "distal to proximal, along +y"
        assert 300 <= marks["length_mm"] <= 450
        along = tibia.vertices @ axis
        assert along.max() - np.dot(marks["plateau_centre"], axis) < 5, "plateau centre at the proximal end"
    for fibula in load_shapes("fibula"):
        marks = fibula.landmarks
        assert 300 <= marks["length_mm"] <= 450
        along = fibula.vertices @ np.array(marks["shaft_axis"])
        assert along.max() - np.dot(marks["head_centre"], marks["shaft_axis"]) < 30, "head at the proximal end"
    patella = load_shapes("patella")[0]
    assert 35 <= max(patella.landmarks["extent_mm"]) <= 60


@pytest.mark.parametrize("view", ["spine", "legs"])
def test_clinical_views_without_a_femur_hold_other_bone_and_an_empty_label(view):
    ct, label, info = generate_case("clinical", 4, held_out=True, view=view)
    assert info.family == "clinical" and info.details["view"] == view and info.sides == ()
    assert not sitk.GetArrayViewFromImage(label).any()
    bone_ml = np.count_nonzero(sitk.GetArrayViewFromImage(ct) > 300) * np.prod(ct.GetSpacing()) / 1000
    assert bone_ml > 30  # vertebrae, sacrum, hip bones or tibiae: what the model must not call a femur
    expected = {"spine": ("vertebra L3", "sacrum"), "legs": ("tibia left", "tibia right")}[view]
    assert any(name in info.details["contents"] for name in expected), info.details["contents"]


def test_clinical_hip_view_labels_two_femurs_with_their_heads_in_view():
    ct, label, info = generate_case("clinical", 5, held_out=True, view="hip")
    assert set(info.sides) == {"left", "right"}
    again = generate_case("clinical", 5, held_out=True, view="hip")
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(again[0]))
    assert np.array_equal(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(again[1]))
    z_of = [ct.TransformIndexToPhysicalPoint([0, 0, k])[2] for k in (0, ct.GetSize()[2] - 1)]
    for hip in info.details["hips_lps"].values():
        assert min(z_of) < hip[2] < max(z_of)  # the head centres lie inside the field of view
    with pytest.raises(ValueError):
        generate_case("invivo", 1, view="hip")
