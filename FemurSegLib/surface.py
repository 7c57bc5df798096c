"""Watertight surfaces of a label for finite-element meshing, made with VTK's own filters.

Pipeline: the label (non-zero voxels, or one value) padded by one voxel so the surface closes at the image border
-> ``vtkDiscreteFlyingEdges3D`` in voxel index space -> the image's index-to-physical transform (spacing, origin
and direction matrix, reflections included) -> optional ``vtkWindowedSincPolyDataFilter`` smoothing (Slicer's
"smoothing factor": pass band 10^(-4 f), 20 iterations; it does not shrink the shape) -> optional
``vtkQuadricDecimation`` (volume preserving). ``vtkFeatureEdges`` counts open and non-manifold edges (0 =
watertight) and ``vtkMassProperties`` gives the enclosed volume, to compare with the label's voxel volume.

Coordinates: files are written in **LPS** by default (the patient coordinates of the NRRD/NIfTI file and of
SimpleITK), which is what Slicer's own model and segmentation exports write; the header carries ``SPACE=LPS``
as Slicer writes it, so Slicer loads the file where the segment is shown. ``coordinates="RAS"`` flips x and y
for tools that expect Slicer's display coordinates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.vtkCommonTransforms import vtkTransform
from vtkmodules.vtkFiltersCore import (vtkFeatureEdges, vtkMassProperties, vtkQuadricDecimation, vtkReverseSense,
                                       vtkWindowedSincPolyDataFilter)
from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D, vtkTransformPolyDataFilter
from vtkmodules.vtkIOGeometry import vtkOBJWriter, vtkSTLWriter
from vtkmodules.vtkIOLegacy import vtkPolyDataWriter
from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter

from .errors import FemurSegError
from .imageio import check_label
from .iopolicy import atomic_path, check_output_file

SURFACE_FORMATS = ("stl", "vtk", "vtp", "obj")
COORDINATES = ("LPS", "RAS")
SMOOTHING_ITERATIONS = 20  # as Slicer's closed-surface conversion
MAX_DECIMATE = 0.99  # more leaves a handful of triangles, or none (0.9999999 gave "watertight, 0 triangles")


@dataclass(frozen=True)
class SurfaceOptions:
    smoothing: float = 0.5  # 0 = none; Slicer's default smoothing factor for closed surfaces
    decimate: float = 0.0  # fraction of the triangles to remove, in [0, 1)
    coordinates: str = "LPS"

    def __post_init__(self) -> None:
        if not 0 <= self.smoothing <= 1:
            raise FemurSegError(f"Smoothing {self.smoothing:g} is out of range: give a factor in [0, 1] "
                                "(0 = none, 0.5 = Slicer's default).")
        if not 0 <= self.decimate <= MAX_DECIMATE:
            raise FemurSegError(f"Decimation {self.decimate} is out of range: give the fraction of triangles to "
                                f"remove, in [0, {MAX_DECIMATE:g}] (e.g. 0.5 halves them).")
        if self.coordinates not in COORDINATES:
            raise FemurSegError(f"Coordinates '{self.coordinates}' must be LPS or RAS.")


@dataclass(frozen=True)
class SurfaceCheck:
    """What a finished surface is worth for meshing: closed or not, and how its volume matches the voxels."""

    triangles: int
    open_edges: int  # boundary plus non-manifold edges
    volume_ml: float  # enclosed by the surface
    label_volume_ml: float  # voxel count x voxel volume

    @property
    def watertight(self) -> bool:
        return self.open_edges == 0

    @property
    def volume_error(self) -> float:
        """Relative difference of the enclosed volume from the voxel volume."""
        return self.volume_ml / self.label_volume_ml - 1.0

    def describe(self) -> str:
        """One line for people: closed or not, and the volumes."""
        closed = "watertight" if self.watertight else f"NOT watertight ({self.open_edges} open edges)"
        return (f"{closed}, {self.triangles} triangles, encloses {self.volume_ml:.2f} ml "
                f"(voxels {self.label_volume_ml:.2f} ml, {100 * self.volume_error:+.2f} %)")

    def problems(self) -> list[str]:
        """Plain-words warnings for a surface that should not go to a mesher as it is."""
        found = []
        if not self.watertight:
            found.append(f"surface not watertight ({self.open_edges} open or non-manifold edges)")
        if abs(self.volume_error) > 0.01:
            found.append(f"surface encloses {self.volume_ml:.2f} ml vs {self.label_volume_ml:.2f} ml of voxels "
                         f"({100 * self.volume_error:+.1f} %)")
        return found


def surface_format(path: str | os.PathLike) -> str:
    """The writer for ``path`` by its extension, or a message naming the ones there are."""
    extension = Path(path).suffix.lower().lstrip(".")
    if extension not in SURFACE_FORMATS:
        raise FemurSegError(f"Surface file '{path}' must end in one of "
                            f"{', '.join('.' + f for f in SURFACE_FORMATS)}.")
    return extension


def _index_to_physical(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from (padded) voxel index to LPS millimetres; the padding shifts indices by one."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    scaled = direction @ np.diag(image.GetSpacing())
    matrix = np.eye(4)
    matrix[:3, :3] = scaled
    matrix[:3, 3] = np.array(image.GetOrigin()) - scaled @ np.ones(3)
    return matrix


def label_surface(label: sitk.Image, options: SurfaceOptions = SurfaceOptions(),
                  value: int | None = None) -> vtkPolyData:
    """Closed triangle surface of the label's non-zero voxels (or of ``value``), in LPS millimetres.

    The image must be a label (imageio.check_label: whole numbers 0-255, so a CT is refused) and ``value`` a
    foreground value, 1-255 (0 would be the background's surface)."""
    check_label(label, "The label")
    if value is not None and not (isinstance(value, int) and 1 <= value <= 255):
        raise FemurSegError(f"Label value {value} is not a foreground value; give one of 1-255 (0 is the background).")
    voxels = sitk.GetArrayViewFromImage(label)
    mask = voxels != 0 if value is None else voxels == value
    if not mask.any():
        raise FemurSegError("The label is empty" + ("" if value is None else f" for value {value}") +
                            "; there is no surface to make.")
    padded = np.pad(mask.astype(np.uint8), 1)
    image = vtkImageData()
    image.SetDimensions(padded.shape[2], padded.shape[1], padded.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(padded.ravel(), deep=True))
    contour = vtkDiscreteFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, 1)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    contour.ComputeScalarsOff()

    matrix = _index_to_physical(label)
    transform = vtkTransform()
    transform.SetMatrix(matrix.ravel().tolist())
    placed = vtkTransformPolyDataFilter()
    placed.SetTransform(transform)
    placed.SetInputConnection(contour.GetOutputPort())
    last = placed
    if np.linalg.det(matrix[:3, :3]) < 0:  # a reflection turns the triangles inside out: turn them back
        last = vtkReverseSense()
        last.ReverseCellsOn()
        last.SetInputConnection(placed.GetOutputPort())
    if options.smoothing > 0:
        smoother = vtkWindowedSincPolyDataFilter()
        smoother.SetInputConnection(last.GetOutputPort())
        smoother.SetNumberOfIterations(SMOOTHING_ITERATIONS)
        smoother.SetPassBand(10.0 ** (-4.0 * options.smoothing))
        smoother.NormalizeCoordinatesOn()
        smoother.BoundarySmoothingOff()
        smoother.FeatureEdgeSmoothingOff()
        smoother.NonManifoldSmoothingOn()
        last = smoother
    if options.decimate > 0:
        decimation = vtkQuadricDecimation()
        decimation.SetInputConnection(last.GetOutputPort())
        decimation.SetTargetReduction(options.decimate)
        decimation.VolumePreservationOn()
        last = decimation
    last.Update()
    surface = vtkPolyData()
    surface.DeepCopy(last.GetOutput())
    if surface.GetNumberOfPolys() < 4:  # fewer cannot enclose anything
        raise FemurSegError(f"The surface has {surface.GetNumberOfPolys()} triangles after decimating "
                            f"{options.decimate:g} of them; use a smaller --decimate.")
    return surface


def check_surface(surface: vtkPolyData, label_volume_ml: float) -> SurfaceCheck:
    edges = vtkFeatureEdges()
    edges.SetInputData(surface)
    edges.BoundaryEdgesOn()
    edges.NonManifoldEdgesOn()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.Update()
    mass = vtkMassProperties()
    mass.SetInputData(surface)
    mass.Update()
    return SurfaceCheck(triangles=surface.GetNumberOfPolys(), open_edges=edges.GetOutput().GetNumberOfLines(),
                        volume_ml=mass.GetVolume() / 1000.0, label_volume_ml=label_volume_ml)


def write_surface(surface: vtkPolyData, path: str | os.PathLike, coordinates: str = "LPS") -> None:
    """Write atomically with the writer the extension names, tagged ``SPACE=<coordinates>`` as Slicer does."""
    kind = surface_format(path)
    if coordinates not in COORDINATES:
        raise FemurSegError(f"Coordinates '{coordinates}' must be LPS or RAS.")
    if coordinates == "RAS":
        flip = vtkTransform()
        flip.Scale(-1.0, -1.0, 1.0)  # two axes: a rotation, the triangles keep their outward orientation
        flipper = vtkTransformPolyDataFilter()
        flipper.SetTransform(flip)
        flipper.SetInputData(surface)
        flipper.Update()
        surface = flipper.GetOutput()
    header = f"FemurSeg surface. SPACE={coordinates}"
    with atomic_path(path) as temporary:
        if kind == "stl":
            writer = vtkSTLWriter()
            writer.SetFileTypeToBinary()
            writer.SetHeader(header)
        elif kind == "vtk":
            writer = vtkPolyDataWriter()
            writer.SetFileTypeToBinary()
            writer.SetHeader(header)
        elif kind == "vtp":
            tagged = vtkPolyData()
            tagged.ShallowCopy(surface)
            space = vtkStringArray()
            space.SetName("SPACE")
            space.InsertNextValue(coordinates)
            tagged.GetFieldData().AddArray(space)
            surface = tagged
            writer = vtkXMLPolyDataWriter()
        else:
            writer = vtkOBJWriter()
        writer.SetFileName(str(temporary))
        writer.SetInputData(surface)
        if not writer.Write():
            raise FemurSegError(f"Could not write the surface to '{path}'.")
        if kind == "obj":  # vtkOBJWriter has no header; Slicer reads the space from the first comment
            temporary.write_text(f"# {header}\n" + temporary.read_text())


def write_label_surface(label: sitk.Image, path: str | os.PathLike, options: SurfaceOptions = SurfaceOptions(),
                        value: int | None = None) -> SurfaceCheck:
    """Make, check and write the surface of a label: what ``femurseg surface``, batch and the GUIs call."""
    surface_format(path)  # refuse a wrong extension, a folder or an unwritable place before the work
    check_output_file(path, what="Surface file")
    surface = label_surface(label, options, value)
    voxels = sitk.GetArrayViewFromImage(label)
    count = int(np.count_nonzero(voxels if value is None else voxels == value))
    check = check_surface(surface, count * float(np.prod(label.GetSpacing())) / 1000.0)
    write_surface(surface, path, options.coordinates)
    return check
