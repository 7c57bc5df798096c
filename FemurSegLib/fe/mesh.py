"""Tetrahedral volume mesh of a femur label, in the label's LPS millimetres.

The label's watertight surface (FemurSegLib.surface: flying edges, Slicer's smoothing, decimated to about the
element size) goes to fTetWild through pytetwild (MPL-2.0; Hu et al. 2020, ACM Trans Graph 39:117), which meshes
within an envelope of the surface and guarantees valid (not inverted) tetrahedra. fTetWild meshes the whole
bounding box before it keeps the inside; a sizing field (element size within a band around the bone, 12x coarser
elsewhere) makes the outside cheap: on the sample, 2 mm went from ~75 s to ~25 s with the same elements inside.

Quadratic meshes (C3D10, SOLID187, FEBio tet10) get straight-sided mid-edge nodes in VTK's order, which Abaqus,
Ansys and FEBio share: corners 0-3, then edges 01, 12, 20, 03, 13, 23.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from vtkmodules.util import numpy_support

from ..errors import FemurSegError
from ..surface import SurfaceOptions, label_surface

QUADRATIC_EDGES = ((0, 1), (1, 2), (2, 0), (0, 3), (1, 3), (2, 3))  # VTK_QUADRATIC_TETRA = Abaqus C3D10 order
MAX_ELEMENTS = 3_000_000  # about 6 GB while meshing; more than this machine's 2 cores mesh in reasonable time
COARSE_FACTOR = 12.0  # target edge outside the bone's band, in element sizes
BAND = 3.0  # element sizes around the bone meshed at the element size


@dataclass(frozen=True)
class TetMesh:
    """Nodes (n, 3) in LPS mm and cells (m, 4) or (m, 10) of node indices, positively oriented."""

    points: np.ndarray
    cells: np.ndarray

    @property
    def quadratic(self) -> bool:
        return self.cells.shape[1] == 10

    @property
    def corners(self) -> np.ndarray:
        return self.cells[:, :4]


@dataclass(frozen=True)
class MeshReport:
    """What a mesh is worth: size, volume against the voxels, worst angle, inverted elements (must be 0)."""

    elements: int
    nodes: int
    volume_ml: float
    label_volume_ml: float
    min_dihedral_deg: float
    inverted: int
    element_size_mm: float

    @property
    def volume_error(self) -> float:
        return self.volume_ml / self.label_volume_ml - 1.0

    def describe(self) -> str:
        return (f"{self.elements} tetrahedra, {self.nodes} nodes, {self.volume_ml:.2f} ml (voxels "
                f"{self.label_volume_ml:.2f} ml, {100 * self.volume_error:+.2f} %), minimum dihedral angle "
                f"{self.min_dihedral_deg:.1f} deg, {self.inverted} inverted")

    def as_dict(self) -> dict:
        return {"elements": self.elements, "nodes": self.nodes, "volume_ml": self.volume_ml,
                "label_volume_ml": self.label_volume_ml, "volume_error": self.volume_error,
                "min_dihedral_deg": self.min_dihedral_deg, "inverted": self.inverted,
                "element_size_mm": self.element_size_mm}


def tet_volumes(points: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Signed volumes (mm^3); positive when corner 3 lies on the side the face 0-1-2 normal points to."""
    a, b, c, d = (points[corners[:, i]] for i in range(4))
    return np.einsum("ij,ij->i", b - a, np.cross(c - a, d - a)) / 6.0


def min_dihedral_angles(points: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Smallest of the six dihedral angles of each tetrahedron, degrees (sliver elements have ~0)."""
    p = points[corners]
    faces = ((1, 2, 3), (0, 3, 2), (0, 1, 3), (0, 2, 1))  # face i is opposite corner i, outward for positive tets
    normals = []
    for a, b, c in faces:
        n = np.cross(p[:, b] - p[:, a], p[:, c] - p[:, a])
        normals.append(n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300))
    cosines = [np.einsum("ij,ij->i", normals[i], normals[j]) for i in range(4) for j in range(i + 1, 4)]
    return np.degrees(np.pi - np.arccos(np.clip(np.min(cosines, axis=0), -1.0, 1.0)))


def femur_mask(label: sitk.Image, value: int | None) -> np.ndarray:
    """The voxels to mesh (z, y, x): non-zero, or ``value``; refused when empty or not one solid piece."""
    voxels = sitk.GetArrayViewFromImage(label)
    mask = voxels != 0 if value is None else voxels == value
    if not mask.any():
        raise FemurSegError("The label is empty" + ("" if value is None else f" for value {value}") +
                            "; there is nothing to mesh.")
    values = np.unique(voxels[mask])
    if value is None and len(values) > 1:
        raise FemurSegError(f"The label holds values {', '.join(str(v) for v in values)} (e.g. left and right femur); "
                            "choose the femur to mesh with --value.")
    pieces, count = ndimage.label(mask)
    if count > 1:
        sizes = np.sort(np.bincount(pieces.ravel())[1:])[::-1] * float(np.prod(label.GetSpacing())) / 1000.0
        raise FemurSegError(f"The label is not one solid piece: {count} pieces ({', '.join(f'{s:.2f}' for s in sizes[:3])}"
                            f"{' ...' if count > 3 else ''} ml); remove the loose ones (Segment Editor: Islands, keep "
                            "largest) before meshing.")
    return mask


def check_element_size(mask: np.ndarray, spacing: tuple[float, ...], element_size: float) -> None:
    """Refuse an element size the label cannot carry: under half a voxel (resolves nothing the CT holds), over the
    label's largest half-thickness (the mesh could not follow its shape) or one giving too many elements."""
    if not np.isfinite(element_size) or element_size <= 0:
        raise FemurSegError(f"Element size {element_size} mm must be a positive number of millimetres.")
    finest = 0.5 * min(spacing)
    if element_size < finest:
        raise FemurSegError(f"Element size {element_size:g} mm is under half the voxel spacing ({finest:g} mm): "
                            "finer elements resolve nothing the CT holds; use at least that.")
    padded = np.pad(mask, 1)
    half_thickness = float(ndimage.distance_transform_edt(padded, sampling=tuple(reversed(spacing))).max())
    if element_size > half_thickness:
        raise FemurSegError(f"Element size {element_size:g} mm is more than the label's largest half-thickness "
                            f"({half_thickness:.1f} mm): the mesh could not follow its shape; use at most "
                            f"{half_thickness:.1f} mm (2 mm in vivo, 1 mm ex vivo are usual).")
    volume = float(mask.sum()) * float(np.prod(spacing))
    expected = volume / (element_size ** 3 / (6.0 * np.sqrt(2.0)))  # regular tetrahedra of that edge
    if expected > MAX_ELEMENTS:
        raise FemurSegError(f"Element size {element_size:g} mm would give about {expected / 1e6:.1f} million elements, "
                            f"more than {MAX_ELEMENTS / 1e6:g} million; use a larger element size.")


def _index_to_physical(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset from (x, y, z) voxel index to LPS mm."""
    matrix = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return matrix, np.array(image.GetOrigin())


def _sizing_field(label: sitk.Image, mask: np.ndarray, low: np.ndarray, high: np.ndarray,
                  element_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background tetrahedra over the box [low, high] with the target edge at their nodes: the element size within
    BAND sizes of the bone, COARSE_FACTOR sizes elsewhere (fTetWild keeps only the inside in the end)."""
    step = 2.0 * element_size
    counts = np.ceil((high - low) / step).astype(int) + 1
    axes = [low[i] + step * np.arange(counts[i]) for i in range(3)]
    nodes = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    distance = ndimage.distance_transform_edt(~mask, sampling=tuple(reversed(label.GetSpacing())))
    matrix, origin = _index_to_physical(label)
    index = np.rint(np.linalg.solve(matrix, (nodes - origin).T).T).astype(np.int64)[:, ::-1]  # (z, y, x)
    inside = np.all((index >= 0) & (index < mask.shape), axis=1)
    near = np.zeros(len(nodes), dtype=bool)
    near[inside] = distance[tuple(index[inside].T)] <= BAND * element_size + step
    values = np.where(near, element_size, COARSE_FACTOR * element_size)
    grid = np.arange(len(nodes)).reshape(counts)
    cube = [grid[i:i + counts[0] - 1, j:j + counts[1] - 1, k:k + counts[2] - 1].ravel()
            for i, j, k in ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1))]
    kuhn = ((0, 1, 2, 6), (0, 2, 3, 6), (0, 3, 7, 6), (0, 7, 4, 6), (0, 4, 5, 6), (0, 5, 1, 6))  # 6 tets per cube
    tets = np.concatenate([np.stack([cube[a], cube[b], cube[c], cube[d]], axis=1) for a, b, c, d in kuhn])
    return nodes, tets.astype(np.int32), values


def make_quadratic(mesh: TetMesh) -> TetMesh:
    """Add one straight-sided mid-edge node per edge (shared by neighbours), VTK / Abaqus C3D10 order."""
    corners = mesh.corners
    edges = np.stack([np.sort(corners[:, [a, b]], axis=1) for a, b in QUADRATIC_EDGES], axis=1)  # (m, 6, 2)
    unique, inverse = np.unique(edges.reshape(-1, 2), axis=0, return_inverse=True)
    midpoints = 0.5 * (mesh.points[unique[:, 0]] + mesh.points[unique[:, 1]])
    middle = len(mesh.points) + inverse.reshape(-1, 6)
    return TetMesh(np.concatenate([mesh.points, midpoints]), np.concatenate([corners, middle], axis=1))


_CWD_LOCK = threading.Lock()


@contextlib.contextmanager
def _scratch_directory() -> Iterator[None]:
    """fTetWild writes debug surfaces (``__tracked_surface.stl``, ``__cutting.stl``) into the current directory,
    whatever it is set to: run it in an empty temporary one, so that nothing lands beside the user's files."""
    with _CWD_LOCK, tempfile.TemporaryDirectory(prefix="femurseg-tetwild-") as scratch:
        previous = os.getcwd()
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(previous)


def tetrahedralize(vertices: np.ndarray, triangles: np.ndarray, element_size: float,
                   sizing: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> TetMesh:
    """fTetWild on a closed triangle surface; the result positively oriented and without unused nodes."""
    import pytetwild  # imports pyvista: only when meshing

    kwargs = {}
    if sizing is not None:
        kwargs = {"bg_vertices": sizing[0], "bg_tets": sizing[1], "bg_values": sizing[2]}
    with _scratch_directory():
        points, cells = pytetwild.tetrahedralize(
            vertices.astype(np.float64), triangles.astype(np.int32),
            edge_length_abs=COARSE_FACTOR * element_size if sizing else element_size,
            num_opt_iter=10, stop_energy=20.0, quiet=True, **kwargs)
    cells = np.asarray(cells, dtype=np.int64)
    if len(cells) == 0:
        raise FemurSegError("The mesher made no elements from the label's surface; check the label.")
    used, cells = np.unique(cells, return_inverse=True)
    cells = cells.reshape(-1, 4)
    points = np.asarray(points, dtype=np.float64)[used]
    negative = tet_volumes(points, cells) < 0
    cells[negative] = cells[negative][:, [0, 2, 1, 3]]
    return TetMesh(points, cells)


def mesh_label(label: sitk.Image, element_size: float, quadratic: bool = False,
               value: int | None = None) -> tuple[TetMesh, MeshReport]:
    """Tetrahedra of the femur label at ``element_size`` mm (target edge length), checked."""
    mask = femur_mask(label, value)
    check_element_size(mask, label.GetSpacing(), element_size)
    finest = min(label.GetSpacing())
    decimate = float(np.clip(1.0 - (finest / element_size) ** 2, 0.0, 0.9))  # triangles about the element size
    shape = sitk.GetImageFromArray(mask.astype(np.uint8))  # the chosen femur alone
    shape.CopyInformation(label)
    surface = label_surface(shape, SurfaceOptions(smoothing=0.5, decimate=decimate))
    vertices = numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
    triangles = numpy_support.vtk_to_numpy(surface.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    margin = BAND * element_size + 2.0 * element_size
    sizing = _sizing_field(label, mask, vertices.min(axis=0) - margin, vertices.max(axis=0) + margin, element_size)
    mesh = tetrahedralize(vertices, triangles, element_size, sizing)
    volumes = tet_volumes(mesh.points, mesh.corners)
    if quadratic:
        mesh = make_quadratic(mesh)
    report = MeshReport(elements=len(mesh.cells), nodes=len(mesh.points), volume_ml=float(volumes.sum()) / 1000.0,
                        label_volume_ml=float(mask.sum()) * float(np.prod(label.GetSpacing())) / 1000.0,
                        min_dihedral_deg=float(min_dihedral_angles(mesh.points, mesh.corners).min()),
                        inverted=int(np.count_nonzero(volumes <= 0)), element_size_mm=element_size)
    return mesh, report
