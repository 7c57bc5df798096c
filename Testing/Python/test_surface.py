"""Surfaces for meshing: watertight, in the label's physical coordinates, with the voxels' volume.

Checks are independent of the code under test: edges are counted from the triangle list with numpy (not
vtkFeatureEdges), volumes by the divergence theorem in numpy (not vtkMassProperties), vertices are mapped back
to voxels with SimpleITK's own physical-to-index transform, and the files are read back by VTK's readers and by
Slicer's model storage node, and compared with Slicer's own closed-surface export of the same segment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from vtkmodules.util import numpy_support
from vtkmodules.vtkIOGeometry import vtkOBJReader, vtkSTLReader
from vtkmodules.vtkIOLegacy import vtkPolyDataReader
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from FemurSegLib.errors import FemurSegError
from FemurSegLib.surface import SurfaceOptions, label_surface, write_label_surface

REPO = Path(__file__).resolve().parents[2]
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
READERS = {"stl": vtkSTLReader, "vtk": vtkPolyDataReader, "vtp": vtkXMLPolyDataReader, "obj": vtkOBJReader}


def arrays(surface) -> tuple[np.ndarray, np.ndarray]:
    points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).astype(float)
    triangles = numpy_support.vtk_to_numpy(surface.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return points, triangles


def edge_uses(triangles: np.ndarray) -> np.ndarray:
    """How many triangles use each undirected edge (2 everywhere = closed 2-manifold)."""
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
    return np.unique(edges, axis=0, return_counts=True)[1]


def signed_volume(points: np.ndarray, triangles: np.ndarray) -> float:
    """Divergence theorem: positive when the triangles face outwards."""
    a, b, c = (points[triangles[:, i]] for i in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def voxel_volume_mm3(label: sitk.Image) -> float:
    return np.count_nonzero(sitk.GetArrayViewFromImage(label)) * float(np.prod(label.GetSpacing()))


def ellipsoid_label(direction: np.ndarray, spacing=(0.8, 1.1, 1.4), origin=(-30.0, 12.5, 101.0)) -> sitk.Image:
    """A voxelised ellipsoid with a notch, touching the image border (so padding matters), on a tilted grid."""
    size = np.array([48, 40, 36])
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), axis=-1).astype(float)
    mm = (index - size / 2) * np.array(spacing)
    inside = ((mm / np.array([19.0, 22.5, 20.0])) ** 2).sum(axis=-1) <= 1.0
    inside &= ~((mm[..., 0] > 5) & (np.abs(mm[..., 1]) < 4))  # a C-shaped notch: a concave part
    label = sitk.GetImageFromArray(inside.transpose(2, 1, 0).astype(np.uint8))
    label.SetSpacing(spacing)
    label.SetOrigin(origin)
    label.SetDirection(tuple(float(v) for v in direction.ravel()))
    return label


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


DIRECTIONS = {"identity": np.eye(3), "oblique": rotation(np.array([1.0, 2.0, 0.5]), 35.0),
              "reflected": rotation(np.array([0.0, 1.0, 1.0]), 20.0) @ np.diag([1.0, -1.0, 1.0])}


@pytest.mark.parametrize("name", DIRECTIONS)
def test_vertices_lie_on_the_label_boundary_through_the_image_geometry(name):
    label = ellipsoid_label(DIRECTIONS[name])
    points, triangles = arrays(label_surface(label, SurfaceOptions(smoothing=0.0)))
    mask = sitk.GetArrayViewFromImage(label).transpose(2, 1, 0) != 0  # (i, j, k)

    def inside(index: np.ndarray) -> np.ndarray:
        valid = np.all((index >= 0) & (index < mask.shape), axis=1)
        result = np.zeros(len(index), dtype=bool)
        result[valid] = mask[tuple(index[valid].T)]
        return result

    # Each vertex of a discrete contour sits halfway between a label voxel and a background voxel along one axis.
    continuous = np.array([label.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
    fractional = np.abs(continuous - np.round(continuous))
    half = np.isclose(fractional, 0.5, atol=1e-3)
    assert np.all(half.sum(axis=1) == 1) and np.all(np.isclose(fractional[~half], 0.0, atol=1e-3))
    axis = np.argmax(half, axis=1)
    low = np.round(continuous).astype(int)
    low[np.arange(len(low)), axis] = np.floor(continuous[np.arange(len(low)), axis]).astype(int)
    high = low.copy()
    high[np.arange(len(high)), axis] += 1
    assert np.all(inside(low) != inside(high)), "a vertex between two voxels of the same side"

    assert np.all(edge_uses(triangles) == 2), "not watertight"
    volume = signed_volume(points, triangles)
    assert volume > 0, "triangles face inwards"
    assert volume == pytest.approx(voxel_volume_mm3(label), rel=0.01)


@pytest.mark.parametrize("seed", [2, 7])
@pytest.mark.parametrize("options", [SurfaceOptions(), SurfaceOptions(smoothing=1.0, decimate=0.75)],
                         ids=["default", "smooth+decimate"])
def test_phantom_surfaces_are_watertight_with_the_voxel_volume(phantom_factory, seed, options):
    _ct, label, _shape = phantom_factory(seed)
    surface = label_surface(label, options)
    points, triangles = arrays(surface)
    assert np.all(edge_uses(triangles) == 2)
    assert signed_volume(points, triangles) == pytest.approx(voxel_volume_mm3(label), rel=0.01)
    raw_triangles = label_surface(label, SurfaceOptions(smoothing=0.0)).GetNumberOfPolys()
    assert len(triangles) == pytest.approx(raw_triangles * (1 - options.decimate), rel=0.02)
    # Smoothing moves vertices off the voxel grid but keeps them within a voxel of it.
    continuous = np.array([label.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points[::50]])
    assert np.abs(continuous - np.round(continuous * 2) / 2).max() > 0.01
    distance = sitk.SignedMaurerDistanceMap(label, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    at_vertices = np.array([distance.EvaluateAtContinuousIndex(tuple(c)) for c in continuous])
    assert np.abs(at_vertices).max() < 1.5


def test_surface_command_writes_every_format_in_lps_or_ras(phantom_factory, tmp_path):
    _ct, label, _shape = phantom_factory(3)
    label_path = tmp_path / "label.nrrd"
    sitk.WriteImage(label, str(label_path))
    reference, _ = arrays(label_surface(label))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for kind, reader_class in READERS.items():
        for coordinates in ("LPS", "RAS"):
            out = tmp_path / f"femur-{coordinates}.{kind}"
            result = subprocess.run([sys.executable, "-m", "FemurSegLib", "surface", str(label_path), str(out),
                                     "--coordinates", coordinates], capture_output=True, text=True, env=env,
                                    timeout=120)
            assert result.returncode == 0, result.stderr
            assert "watertight" in result.stdout and result.stderr == ""
            reader = reader_class()
            reader.SetFileName(str(out))
            reader.Update()
            points, triangles = arrays(reader.GetOutput())
            expected = reference * (LPS_TO_RAS if coordinates == "RAS" else 1.0)
            # STL stores single precision and repeats shared vertices: compare the point sets' extents and centroid.
            assert np.allclose(points.min(axis=0), expected.min(axis=0), atol=1e-3)
            assert np.allclose(points.max(axis=0), expected.max(axis=0), atol=1e-3)
            if kind != "stl":
                assert np.allclose(points, expected, atol=1e-4)
                assert np.all(edge_uses(triangles) == 2)
            assert f"SPACE={coordinates}".encode() in out.read_bytes()[:4000] or kind == "vtp"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"


def test_bad_surface_requests_give_one_line(tmp_path, phantom_factory):
    _ct, label, _shape = phantom_factory(3)
    good = tmp_path / "label.nrrd"
    sitk.WriteImage(label, str(good))
    empty = tmp_path / "empty.nrrd"
    sitk.WriteImage(sitk.Image(20, 20, 20, sitk.sitkUInt8), str(empty))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cases = {
        "missing": [str(tmp_path / "nope.nrrd"), str(tmp_path / "a.stl")],
        "empty label": [str(empty), str(tmp_path / "a.stl")],
        "extension": [str(good), str(tmp_path / "a.ply")],
        "smoothing": [str(good), str(tmp_path / "a.stl"), "--smoothing", "2"],
        "decimate": [str(good), str(tmp_path / "a.stl"), "--decimate", "1"],
        "folder": [str(good), str(tmp_path / "no" / "a.stl")],
    }
    for name, args in cases.items():
        result = subprocess.run([sys.executable, "-m", "FemurSegLib", "surface", *args], capture_output=True,
                                text=True, env=env, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("femurseg: error:"), (name, result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.nrrd", "label.nrrd"]
    with pytest.raises(FemurSegError, match="value 3"):
        write_label_surface(label, tmp_path / "b.stl", value=3)


# --- the same coordinates Slicer shows ---------------------------------------------------------------------------

def test_slicer_reads_the_file_where_it_shows_the_segment(phantom_factory, tmp_path):
    slicer = pytest.importorskip("slicer")
    trame_core = pytest.importorskip("trame_slicer.core")
    from FemurSegLib import scene as femur_scene

    app = trame_core.SlicerApp()
    ct, label, shape = phantom_factory(4)
    label.SetDirection(tuple(float(v) for v in DIRECTIONS["oblique"].ravel()))
    ct.CopyInformation(label)
    ct_node = femur_scene.add_volume_node(app.scene, ct, "oblique CT")
    segmentation = femur_scene.add_label_as_segment(app.scene, app.segmentations_logic, label, ct_node,
                                                    laterality=shape.side)
    ours = tmp_path / "ours.stl"
    check = femur_scene.export_segment_surface(app.scene, app.segmentations_logic, segmentation, None, ct_node, ours)
    assert check.watertight and abs(check.volume_error) < 0.01
    direct, _ = arrays(label_surface(label))

    # Slicer's model reader honours SPACE=LPS: the loaded model is in RAS, where Slicer draws the segment.
    storage = slicer.vtkMRMLModelStorageNode()
    model = slicer.vtkMRMLModelNode()
    app.scene.AddNode(storage)
    app.scene.AddNode(model)
    storage.SetFileName(str(ours))
    assert storage.ReadData(model)
    loaded, _ = arrays(model.GetPolyData())
    assert np.allclose(loaded.min(axis=0), (direct * LPS_TO_RAS).min(axis=0), atol=1e-3)
    assert np.allclose(loaded.max(axis=0), (direct * LPS_TO_RAS).max(axis=0), atol=1e-3)

    # Slicer's own STL export of the segment's closed surface (its default: LPS) lies where ours does.
    segmentation.CreateClosedSurfaceRepresentation()
    theirs_dir = tmp_path / "slicer"
    theirs_dir.mkdir()
    assert app.segmentations_logic.ExportSegmentsClosedSurfaceRepresentationToFiles(str(theirs_dir), segmentation)
    reader = vtkSTLReader()
    reader.SetFileName(str(next(theirs_dir.glob("*.stl"))))
    reader.Update()
    theirs, _ = arrays(reader.GetOutput())
    assert np.allclose(theirs.mean(axis=0), direct.mean(axis=0), atol=0.5)
    assert np.allclose(theirs.min(axis=0), direct.min(axis=0), atol=1.0)
    assert np.allclose(theirs.max(axis=0), direct.max(axis=0), atol=1.0)
    assert not np.allclose(theirs.mean(axis=0), (direct * LPS_TO_RAS).mean(axis=0), atol=5.0)
