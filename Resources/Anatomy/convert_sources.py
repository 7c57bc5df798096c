#!/usr/bin/env python3
"""One-off converter: public CT-derived femur / hemipelvis surfaces -> compact arrays in Resources/Anatomy.

Run by a developer (never imported by FemurSeg at run time) with the three public repositories cloned or mirrored
(bare git directories are fine: every file is read with ``git show COMMIT:PATH`` at the pinned commits below)::

    python Resources/Anatomy/convert_sources.py \\
        --libhip /path/to/diku-dk/libhip --gias2 /path/to/juzhang/gias2-shape-modelling-tutorial \\
        --gias3 /path/to/musculoskeletal/gias3.examples [--out Resources/Anatomy] [--no-verify]

Needs numpy, scipy and vtk (9.x). ``femur_left_rigid_LLP26.pc`` is a Python-2 pickle: it is loaded once here with
a restricted unpickler that admits only numpy's array reconstruction (nothing else can be constructed); the
fieldwork mesh that gives its node connectivity is a Berkeley DB shelve, read with ``db5.3_dump`` (Debian package
db5.3-util) and the same restricted unpickler.

What it does to every surface (why: compact, watertight, in mm, ready for voxelisation):

1. vtkTriangleFilter + vtkCleanPolyData (merge duplicate points);
2. drops the faces on non-manifold edges (some libhip cargen surfaces have a few) and closes every hole with a
   minimum-area triangulation of its boundary loop (the cargen surfaces have thin slits on the head where fTetWild
   tracked the cartilage interface; vtkFillHolesFilter left loops that touch each other open);
3. keeps the largest connected region, orients the faces consistently outwards (vtkPolyDataNormals);
4. vtkQuadricDecimation (volume preservation on) to ~5000 triangles for proximal femurs, ~12000 for whole femurs
   and hemipelves (surfaces within 20 % of that are kept as they are), then measures the decimation error
   against the cleaned dense surface (vtkDistancePolyDataFilter);
5. quantises vertices to int16 in 0.05 mm steps relative to a float64 origin (error <= 0.025 mm), triangles uint16;
6. computes landmarks on the stored (de-quantised) surface: femoral head sphere (Hough vote along the vertex
   normals, then an iterated least-squares fit to the head vertices whose normals are radial), proximal shaft axis
   (line through the centroids of cross-sections 75-160 mm below the head centre; femurs cut shorter get the
   mean axis of the whole gias2 training femurs registered onto them by rigid ICP), head top, distal end, lesser
   trochanter; acetabulum sphere for the hemipelves (checked against the femoral head of the same subject);
7. checks watertightness (every edge in exactly two faces, opposite directions) and the side: from the frame
   (libhip STL headers say SPACE=LPS: a left femur's head lies towards -x) and, on femurs long enough, from
   anatomy alone (the lesser trochanter is posterior); fails if the label disagrees with either.

Outputs: anatomy_shapes.npz, femur_shape_model.npz (see README.md for the layout); with ``--opensim
/path/to/opensim-org/opensim-models`` also anatomy_context.npz (context bones: the gias3 sacrum and OpenSim
CC BY 3.0 vertebrae, tibiae, fibulae, patella; ``--context-only`` writes just that, needing only --gias3 and
--opensim); with verification on, it then
loads them through FemurSegLib.anatomy, voxelises two shapes at 1 mm and prints the tables quoted in README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERTEX_SCALE_MM = 0.05
FORMAT = "FemurSeg anatomy shapes v1"

LIBHIP = {"repo": "https://github.com/diku-dk/libhip", "licence": "MIT",
          "licence_file": "LICENSE-libhip-MIT.txt", "attribution": "Moshfeghifar et al., LibHip (DIKU, 2022); "
          "CT from The Cancer Imaging Archive (TCGA-BLCA cases TCGA-4Z-*, CT Lymph Nodes)"}
GIAS2 = {"repo": "https://github.com/juzhang/gias2-shape-modelling-tutorial", "licence": "MPL-2.0",
         "licence_file": "LICENSE-MPL-2.0.txt", "attribution": "Ju Zhang, GIAS2 shape modelling tutorial (2017); "
         "femurs of the Melbourne Femur Collection"}
GIAS3 = {"repo": "https://github.com/musculoskeletal/gias3.examples", "licence": "MPL-2.0",
         "licence_file": "LICENSE-MPL-2.0.txt", "attribution": "gias3.examples (Auckland Bioengineering "
         "Institute, musculoskeletal group)"}

LIBHIP_HEAD = "90fce593cb304a1fab506215af2f9083876f91ec"  # 2022-11-24, newest; RawSegment m3, m4, m7, m8(left)
LIBHIP_CARGEN = "cee49dff05348e734121004eb825dad03cad6c4a"  # 2022-05-18: last with cargen_output/*/morpho_output
GIAS2_HEAD = "9b7b8c0fdb9892c48c712fb794723d00f495ca9e"  # 2017-07-09
GIAS3_HEAD = "866a3456c5542e0146009058be66fb752fedd253"  # 2022-08-17

LIBHIP_SUBJECTS = [f"m{i}" for i in range(2, 12)]  # m1: no usable femur (RawSegment is LFS, no cargen output)
LIBHIP_RAW = {("m3", "l"), ("m3", "r"), ("m4", "l"), ("m4", "r"), ("m7", "l"), ("m7", "r"), ("m8", "l")}
GIAS2_SUBJECTS = ["2007_5028", "2008_0006", "2008_0019", "2008_0051", "2008_0158", "2008_1342", "2008_1461",
                  "2008_1489", "2008_1524"]  # 2008_0010_l.wrl is absent from the repository (object missing)
PELVIS_SUBJECT = "2007_5028"
PELVIS_PATH = "src/gias3/examples/fieldwork/fit_whole_pelvis_data/2007_5028_short_closedsacrum.wrl"
PCA_DIR = "src/gias3/examples/data/femur_pca"

# Held-out subjects (about a quarter per source; everything else, and every PCA sample, is training).
HELD_OUT = {"libhip-m4", "libhip-m9", "libhip-m11", "gias2-2008_0019", "gias2-2008_1461"}

PROXIMAL_TRIANGLES = 5000
WHOLE_TRIANGLES = 12000
PELVIS_TRIANGLES = 12000
WHOLE_FEMUR_MIN_LENGTH_MM = 300.0
PROXIMAL_SHAFT_MM = (75.0, 160.0)  # shaft_axis: fitted this far below the head centre (below the lesser trochanter)
MIN_SHAFT_MM = 60.0  # less shaft than this: the axis comes from registered whole femurs (shorter section runs
# start at the lesser trochanter's flare and drifted 4-11 deg from the registered axes; 85 mm runs agree within 1.4)


# --- reading the sources ----------------------------------------------------------------------------------------

def git_bytes(repo: Path, commit: str, path: str) -> bytes:
    """The blob at ``commit:path``; refuses Git LFS pointers and missing objects with a clear message."""
    result = subprocess.run(["git", f"--git-dir={_git_dir(repo)}", "show", f"{commit}:{path}"],
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"cannot read {commit[:8]}:{path} in {repo}: {result.stderr.decode().strip()}")
    data = result.stdout
    if data.startswith(b"version https://git-lfs"):
        raise SystemExit(f"{commit[:8]}:{path} in {repo} is a Git LFS pointer, not the file")
    return data


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def _vtk():
    import vtk  # noqa: PLC0415 - the converter is the only place that needs all of VTK
    return vtk


def read_stl(data: bytes):
    vtk = _vtk()
    with tempfile.NamedTemporaryFile(suffix=".stl") as handle:
        handle.write(data)
        handle.flush()
        reader = vtk.vtkSTLReader()
        reader.SetFileName(handle.name)
        reader.Update()
        polydata = reader.GetOutput()
    if polydata.GetNumberOfCells() == 0:
        raise SystemExit("an STL source has no triangles")
    return polydata


def read_vrml(data: bytes) -> list:
    """One vtkPolyData per VRML Shape, in file order (vtkVRMLImporter; a small IndexedFaceSet parser if it fails)."""
    vtk = _vtk()
    shapes = []
    try:
        with tempfile.NamedTemporaryFile(suffix=".wrl") as handle:
            handle.write(data)
            handle.flush()
            importer = vtk.vtkVRMLImporter()
            importer.SetFileName(handle.name)
            importer.Update()
            actors = importer.GetRenderer().GetActors()
            actors.InitTraversal()
            for _ in range(actors.GetNumberOfItems()):
                actor = actors.GetNextActor()
                transform = vtk.vtkTransform()
                transform.SetMatrix(actor.GetMatrix())
                moved = vtk.vtkTransformPolyDataFilter()
                moved.SetInputData(actor.GetMapper().GetInput())
                moved.SetTransform(transform)
                moved.Update()
                shapes.append(moved.GetOutput())
    except Exception as error:  # noqa: BLE001 - any importer failure falls back to the parser
        print(f"  vtkVRMLImporter failed ({error}); parsing IndexedFaceSet directly")
        shapes = []
    if not shapes or any(s.GetNumberOfCells() == 0 for s in shapes):
        shapes = [to_polydata(v, t) for v, t in parse_indexed_face_sets(data.decode("latin1"))]
    return shapes


def parse_indexed_face_sets(text: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(points, triangles) of every IndexedFaceSet: enough for the gias files (Transform without fields)."""
    out = []
    for block in re.finditer(r"IndexedFaceSet\s*\{(.*?)coordIndex\s*\[(.*?)\]", text, re.S):
        points_text = re.search(r"point\s*\[(.*?)\]", block.group(1), re.S).group(1)
        points = np.array(points_text.replace(",", " ").split(), dtype=float).reshape(-1, 3)
        index = np.array(block.group(2).replace(",", " ").split(), dtype=np.int64)
        faces, face = [], []
        for i in index:
            if i < 0:
                faces += [(face[0], face[k], face[k + 1]) for k in range(1, len(face) - 1)]
                face = []
            else:
                face.append(int(i))
        out.append((points, np.array(faces, dtype=np.int64)))
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy's ndarray reconstruction only: the gias pickles hold dicts of arrays, nothing executable."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as function  # noqa: PLC0415 - numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as function  # noqa: PLC0415
    return function


def unpickle(data: bytes):
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def read_shelve(data: bytes) -> dict:
    """A Python-2 ``shelve`` (Berkeley DB hash) as a dict, via ``db5.3_dump -p`` and the restricted unpickler."""
    with tempfile.NamedTemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        try:
            dump = subprocess.run(["db5.3_dump", "-p", handle.name], capture_output=True, check=True).stdout
        except FileNotFoundError as error:
            raise SystemExit("db5.3_dump is needed to read the gias fieldwork mesh (apt-get install db5.3-util)") \
                from error
    lines = dump.decode("latin1").split("\n")
    body = [line for line in lines[lines.index("HEADER=END") + 1:] if line and line != "DATA=END"]

    def unescape(line: str) -> bytes:
        out, i = bytearray(), 1  # each printable line starts with one space
        while i < len(line):
            if line[i] == "\\":
                if line[i + 1] == "\\":
                    out.append(92)
                    i += 2
                else:
                    out.append(int(line[i + 1:i + 3], 16))
                    i += 3
            else:
                out.append(ord(line[i]))
                i += 1
        return bytes(out)

    return {unescape(k).decode("latin1"): unpickle(unescape(v)) for k, v in zip(body[0::2], body[1::2])}


# --- VTK helpers ------------------------------------------------------------------------------------------------

def to_polydata(vertices: np.ndarray, triangles: np.ndarray):
    vtk = _vtk()
    from vtk.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray  # noqa: PLC0415
    points = vtk.vtkPoints()
    points.SetData(numpy_to_vtk(np.ascontiguousarray(vertices, dtype=np.float64), deep=True))
    cells = vtk.vtkCellArray()
    offsets = np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int64)
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_to_vtkIdTypeArray(np.ascontiguousarray(triangles, dtype=np.int64).ravel(), deep=True))
    polydata = vtk.vtkPolyData()
    polydata.SetPoints(points)
    polydata.SetPolys(cells)
    return polydata


def to_arrays(polydata) -> tuple[np.ndarray, np.ndarray]:
    from vtk.util.numpy_support import vtk_to_numpy  # noqa: PLC0415
    vertices = vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)
    polys = polydata.GetPolys()
    offsets = vtk_to_numpy(polys.GetOffsetsArray())
    if not np.all(np.diff(offsets) == 3):
        raise ValueError("polydata has non-triangle polygons")
    return vertices, vtk_to_numpy(polys.GetConnectivityArray()).reshape(-1, 3).astype(np.int64)


def _run(algorithm, polydata):
    algorithm.SetInputData(polydata)
    algorithm.Update()
    out = _vtk().vtkPolyData()
    out.DeepCopy(algorithm.GetOutput())
    return out


def clean(polydata):
    vtk = _vtk()
    triangles = vtk.vtkTriangleFilter()
    triangles.PassVertsOff()
    triangles.PassLinesOff()
    cleaner = vtk.vtkCleanPolyData()
    cleaner.PointMergingOn()
    cleaner.SetTolerance(0.0)
    return _run(cleaner, _run(triangles, polydata))


def edge_report(triangles: np.ndarray) -> dict[str, int]:
    """Boundary (1 face), non-manifold (>2 faces) and mis-oriented (same direction twice) edge counts."""
    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    undirected = np.sort(directed, axis=1)
    _, counts = np.unique(undirected, axis=0, return_counts=True)
    _, directed_counts = np.unique(directed, axis=0, return_counts=True)
    return {"boundary": int((counts == 1).sum()), "non_manifold": int((counts > 2).sum()),
            "misoriented": int((directed_counts > 1).sum())}


def vtk_edge_counts(polydata) -> tuple[int, int]:
    """(boundary, non-manifold) edges by vtkFeatureEdges: the independent watertightness check."""
    vtk = _vtk()
    counts = []
    for boundary in (True, False):
        edges = vtk.vtkFeatureEdges()
        edges.SetBoundaryEdges(boundary)
        edges.SetNonManifoldEdges(not boundary)
        edges.FeatureEdgesOff()
        edges.ManifoldEdgesOff()
        counts.append(_run(edges, polydata).GetNumberOfCells())
    return counts[0], counts[1]


def drop_non_manifold(polydata):
    """Remove every face that touches a non-manifold edge (the holes left are filled afterwards)."""
    vertices, triangles = to_arrays(polydata)
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
    unique, inverse, counts = np.unique(edges, axis=0, return_inverse=True, return_counts=True)
    bad_edge = counts[inverse.ravel()] > 2
    bad_face = bad_edge.reshape(3, -1).any(axis=0)
    if not bad_face.any():
        return polydata, 0
    return clean(to_polydata(vertices, triangles[~bad_face])), int(bad_face.sum())


def drop_bad_edge_faces(polydata, rings: int) -> tuple:
    """Remove the faces that touch a vertex of a non-manifold or mis-oriented edge, grown by ``rings`` rings of
    neighbouring faces (the holes left are filled afterwards)."""
    vertices, triangles = to_arrays(polydata)
    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    _, inverse, counts = np.unique(np.sort(directed, axis=1), axis=0, return_inverse=True, return_counts=True)
    _, directed_inverse, directed_counts = np.unique(directed, axis=0, return_inverse=True, return_counts=True)
    bad = (counts[inverse.ravel()] > 2) | (directed_counts[directed_inverse.ravel()] > 1)
    bad_vertices = np.unique(directed[bad].ravel())
    for _ in range(rings):
        bad_vertices = np.unique(triangles[np.isin(triangles, bad_vertices).any(axis=1)].ravel())
    bad_face = np.isin(triangles, bad_vertices).any(axis=1)
    if not bad_face.any():
        return polydata, 0
    return clean(to_polydata(vertices, triangles[~bad_face])), int(bad_face.sum())


def fill_holes(polydata) -> tuple:
    """Close every hole with a minimum-area triangulation of its boundary loop (Liepa's dynamic programme).

    vtkFillHolesFilter was tried first: on the cargen slits, whose loops touch at shared vertices, it leaves
    loops open and adds mis-oriented faces. Here loops are split at such vertices, each fill face takes the
    orientation that makes the edge it shares with the surface run the other way, and a diagonal that is already
    an edge of the surface is never used (it would become non-manifold)."""
    vertices, triangles = to_arrays(polydata)
    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    existing = set(map(tuple, directed.tolist()))
    undirected = {(min(a, b), max(a, b)) for a, b in existing}
    leaving: dict[int, list[int]] = {}
    for a, b in existing:
        if (b, a) not in existing:
            leaving.setdefault(b, []).append(a)  # the hole runs b -> a beside the surface edge a -> b
    loops = []
    while leaving:
        path = [next(iter(leaving))]
        while True:
            current = path[-1]
            following = leaving[current].pop()
            if not leaving[current]:
                del leaving[current]
            if following in path:
                start = path.index(following)
                loops.append(path[start:])
                path = path[:start + 1]
                if path[-1] not in leaving:
                    break
            else:
                path.append(following)
                if following not in leaving:
                    raise ValueError("open boundary chain")
    added = [tri for loop in loops for tri in _min_area_triangulation(vertices, loop, undirected)]
    if added:
        triangles = np.concatenate([triangles, np.array(added, dtype=np.int64)])
    return clean(to_polydata(vertices, triangles)), len(loops), len(added)


def _min_area_triangulation(vertices: np.ndarray, loop: list[int], forbidden: set) -> list[tuple[int, int, int]]:
    n = len(loop)
    if n < 3:
        return []
    p = vertices[loop]

    def area(i: int, k: int, j: int) -> float:
        return float(np.linalg.norm(np.cross(p[k] - p[i], p[j] - p[i]))) / 2

    def allowed(i: int, j: int) -> bool:  # a chord (not a loop edge) that already exists would be used three times
        if j - i == 1 or (i == 0 and j == n - 1):
            return True
        return (min(loop[i], loop[j]), max(loop[i], loop[j])) not in forbidden

    cost = np.zeros((n, n))
    split = np.zeros((n, n), dtype=np.int64)
    for gap in range(2, n):
        for i in range(n - gap):
            j = i + gap
            best, best_k = math.inf, -1
            if allowed(i, j):
                for k in range(i + 1, j):
                    if allowed(i, k) and allowed(k, j):
                        value = cost[i, k] + cost[k, j] + area(i, k, j)
                        if value < best:
                            best, best_k = value, k
            cost[i, j], split[i, j] = best, best_k
    if not math.isfinite(cost[0, n - 1]):
        raise ValueError(f"cannot fill a hole of {n} edges without duplicating an edge")
    out, stack = [], [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        k = int(split[i, j])
        out.append((loop[i], loop[k], loop[j]))  # loop order: keeps the hole's (reversed) edge direction
        stack += [(i, k), (k, j)]
    return out


def largest_region(polydata):
    vtk = _vtk()
    regions = vtk.vtkPolyDataConnectivityFilter()
    regions.SetExtractionModeToLargestRegion()
    return clean(_run(regions, polydata))


def orient_outwards(polydata):
    vtk = _vtk()
    normals = vtk.vtkPolyDataNormals()
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()
    normals.ComputeCellNormalsOn()  # with both off the filter passes its input through unchanged
    normals.ComputePointNormalsOff()
    out = _run(normals, polydata)
    vertices, triangles = to_arrays(out)
    if signed_volume(vertices, triangles) < 0:  # AutoOrient misjudged (should not happen on closed surfaces)
        triangles = triangles[:, ::-1]
    return to_polydata(vertices, triangles)


def decimate(polydata, target_triangles: int) -> tuple:
    """vtkQuadricDecimation to about ``target_triangles``; returns (surface, repairs). Where the decimation leaves
    a non-manifold edge (rare: 1 of 27 surfaces here), the faces on it are dropped and the hole refilled."""
    vtk = _vtk()
    count = polydata.GetNumberOfCells()
    if count <= target_triangles * 1.2:
        return polydata, 0
    decimator = vtk.vtkQuadricDecimation()
    decimator.SetTargetReduction(1.0 - target_triangles / count)
    decimator.VolumePreservationOn()
    out = orient_outwards(clean(_run(decimator, polydata)))
    repairs = 0
    for _ in range(3):
        report = edge_report(to_arrays(out)[1])
        if not any(report.values()):
            return out, repairs
        out, dropped = drop_non_manifold(out)
        out, _, _ = fill_holes(out)
        out = orient_outwards(largest_region(out))
        repairs += dropped
    raise SystemExit(f"quadric decimation keeps breaking the surface: {report}")


def decimation_error(dense, coarse) -> dict[str, float]:
    """Symmetric surface distance (mm) between the cleaned dense surface and the decimated one."""
    vtk = _vtk()
    from vtk.util.numpy_support import vtk_to_numpy  # noqa: PLC0415
    distance = vtk.vtkDistancePolyDataFilter()
    distance.SetInputData(0, dense)
    distance.SetInputData(1, coarse)
    distance.SignedDistanceOff()
    distance.ComputeSecondDistanceOn()
    distance.Update()
    a = vtk_to_numpy(distance.GetOutput().GetPointData().GetArray("Distance"))
    b = vtk_to_numpy(distance.GetSecondDistanceOutput().GetPointData().GetArray("Distance"))
    both = np.concatenate([a, b])
    return {"mean_mm": round(float(both.mean()), 3), "p99_mm": round(float(np.percentile(both, 99)), 3),
            "max_mm": round(float(both.max()), 3)}


# --- geometry ---------------------------------------------------------------------------------------------------

def signed_volume(vertices: np.ndarray, triangles: np.ndarray) -> float:
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def vertex_normals_areas(vertices: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    face = np.cross(vertices[triangles[:, 1]] - vertices[triangles[:, 0]],
                    vertices[triangles[:, 2]] - vertices[triangles[:, 0]])
    normals = np.zeros_like(vertices)
    areas = np.zeros(len(vertices))
    face_area = np.linalg.norm(face, axis=1) / 2
    for k in range(3):
        np.add.at(normals, triangles[:, k], face)
        np.add.at(areas, triangles[:, k], face_area / 3)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return normals, areas


def fit_sphere(points: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted least-squares sphere: algebraic start, then Gauss-Newton on the geometric distances."""
    w = weights / weights.sum()
    a = np.c_[2 * points, np.ones(len(points))] * np.sqrt(w)[:, None]
    b = (points ** 2).sum(axis=1) * np.sqrt(w)
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    centre = solution[:3]
    radius = math.sqrt(max(solution[3] + centre @ centre, 1e-9))
    for _ in range(20):
        d = points - centre
        dist = np.linalg.norm(d, axis=1)
        residual = (dist - radius) * np.sqrt(w)
        jac = np.c_[-d / dist[:, None], -np.ones(len(points))] * np.sqrt(w)[:, None]
        step = np.linalg.lstsq(jac, -residual, rcond=None)[0]
        centre, radius = centre + step[:3], radius + step[3]
        if np.linalg.norm(step) < 1e-7:
            break
    return centre, float(radius)


def hough_sphere(vertices, normals, areas, radii: np.ndarray, concave: bool, cell_mm: float = 2.0):
    """Centre and radius voted for by points that sit on a sphere: each vertex votes at p -/+ r n for every r."""
    from scipy import ndimage  # noqa: PLC0415
    sign = 1.0 if concave else -1.0  # outward normals point to the centre of a cup, away from that of a ball
    votes = (vertices[None] + sign * radii[:, None, None] * normals[None]).reshape(-1, 3)
    weights = np.tile(areas, len(radii))
    low = votes.min(axis=0)
    index = np.floor((votes - low) / cell_mm).astype(np.int64)
    shape = index.max(axis=0) + 1
    grid = np.zeros(shape)
    np.add.at(grid, tuple(index.T), weights)
    grid = ndimage.gaussian_filter(grid, 1.0)
    best = np.array(np.unravel_index(np.argmax(grid), grid.shape))
    centre = low + (best + 0.5) * cell_mm
    near = np.linalg.norm(votes - centre, axis=1) < 2 * cell_mm
    radius_of_vote = np.repeat(radii, len(vertices))
    return centre, float(np.median(radius_of_vote[near]))


def refine_sphere(vertices, normals, areas, centre, radius, concave: bool):
    """Iterated LSQ fit on vertices near the sphere whose normals are radial (so neck, fossa and rims drop out)."""
    chosen = np.zeros(len(vertices), dtype=bool)
    for tolerance in (4.0, 3.0, 2.5, 2.0, 2.0, 1.5, 1.5):
        offset = vertices - centre
        dist = np.linalg.norm(offset, axis=1)
        radial = np.einsum("ij,ij->i", normals, offset / dist[:, None])
        facing = radial < -0.85 if concave else radial > 0.85
        chosen = (np.abs(dist - radius) < tolerance) & facing
        if chosen.sum() < 30:
            raise ValueError("too few vertices on the sphere")
        centre, radius = fit_sphere(vertices[chosen], areas[chosen])
    dist = np.linalg.norm(vertices[chosen] - centre, axis=1)
    rms = float(np.sqrt(np.average((dist - radius) ** 2, weights=areas[chosen])))
    return centre, radius, rms, float(areas[chosen].sum())


def section_centroid(vertices, triangles, axis, level) -> np.ndarray | None:
    """Length-weighted centroid of the cross-section of the surface with the plane ``x . axis = level``."""
    s = vertices @ axis - level
    st = s[triangles]
    crossing = (st.min(axis=1) < 0) & (st.max(axis=1) > 0)
    if not crossing.any():
        return None
    tri, st = triangles[crossing], st[crossing]
    points = []
    for i, j in ((0, 1), (1, 2), (2, 0)):
        cut = (st[:, i] < 0) != (st[:, j] < 0)
        t = np.where(cut, st[:, i] / np.where(cut, st[:, i] - st[:, j], 1.0), np.nan)
        points.append(vertices[tri[:, i]] + t[:, None] * (vertices[tri[:, j]] - vertices[tri[:, i]]))
    points = np.stack(points, axis=1)  # (n, 3 edges, 3): exactly two edges are cut per crossing face
    valid = ~np.isnan(points[:, :, 0])
    pairs = points[valid].reshape(-1, 2, 3)
    lengths = np.linalg.norm(pairs[:, 0] - pairs[:, 1], axis=1)
    return np.average(pairs.mean(axis=1), axis=0, weights=np.maximum(lengths, 1e-9))


def principal_axis(vertices, areas) -> np.ndarray:
    centred = vertices - np.average(vertices, axis=0, weights=areas)
    cov = (centred * areas[:, None]).T @ centred
    return np.linalg.eigh(cov)[1][:, -1]


@dataclass
class Reference:
    """A whole femur with a well-defined shaft: registered onto short proximal femurs to carry its axis over."""

    name: str
    side: str
    vertices: np.ndarray
    head_centre: np.ndarray
    axis: np.ndarray
    medial: np.ndarray
    shaft_point: np.ndarray


def shaft_sections(vertices, triangles, axis, centre, below_head: tuple[float, float]) -> tuple:
    """Axis of the shaft between ``below_head`` = (near, far) mm below the head centre (or the distal end, if
    nearer) from the centroids of cross-sections every 3 mm, iterated so each pass cuts perpendicular to the last
    axis; returns (axis, a point on it, length of shaft used in mm; 0 when fewer than 4 sections fit)."""
    shaft_point, used = vertices.mean(axis=0), 0.0
    for _ in range(4):
        along = vertices @ axis
        head_level = centre @ axis
        start = max(along.min() + 3.0, head_level - below_head[1])
        stop = head_level - below_head[0]
        centroids = [c for c in (section_centroid(vertices, triangles, axis, h) for h in np.arange(start, stop, 3.0))
                     if c is not None]
        if len(centroids) < 4:
            return axis, shaft_point, 0.0
        centroids = np.array(centroids)
        shaft_point = centroids.mean(axis=0)
        direction = np.linalg.svd(centroids - shaft_point)[2][0]
        axis = direction if direction @ axis > 0 else -direction
        used = float(stop - start)
    return axis, shaft_point, used


def register_reference(reference: Reference, mirrored: bool, vertices: np.ndarray, centre: np.ndarray,
                       axis: np.ndarray, medial: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Rigid trimmed ICP of the reference's matching proximal part onto ``vertices``; returns its shaft axis and a
    point on it in this frame, and the rms (mm). ``mirrored`` reflects the reference front-to-back first (a femur
    of the other side)."""
    from scipy.spatial import cKDTree  # noqa: PLC0415
    ref = reference.vertices - reference.head_centre
    if mirrored:
        normal = np.cross(reference.axis, reference.medial)
        ref = ref - 2 * np.outer(ref @ normal, normal)
    depth = centre @ axis - (vertices @ axis).min()  # how far below the head centre this femur reaches
    ref = ref[(ref @ reference.axis > -depth + 3.0)]
    source_frame = np.stack([reference.medial, reference.axis, np.cross(reference.medial, reference.axis)])
    target_frame = np.stack([medial, axis, np.cross(medial, axis)])
    rotation = target_frame.T @ source_frame
    translation = centre.copy()
    tree = cKDTree(vertices)
    rms = math.inf
    for iteration in range(60):
        moved = ref @ rotation.T + translation
        dist, index = tree.query(moved)
        limit = min(np.percentile(dist, 90), 4.0 if iteration > 10 else 8.0)
        keep = dist <= limit
        a, b = moved[keep], vertices[index[keep]]
        ca, cb = a.mean(axis=0), b.mean(axis=0)
        u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
        step = vt.T @ np.diag([1, 1, np.sign(np.linalg.det(vt.T @ u.T))]) @ u.T
        rotation, translation = step @ rotation, step @ (translation - ca) + cb
        rms = float(np.sqrt(np.mean(dist[keep] ** 2)))
    point = reference.shaft_point - reference.head_centre
    if mirrored:
        point = point - 2 * (point @ normal) * normal
    return rotation @ reference.axis, rotation @ point + translation, rms


def femur_landmarks(vertices: np.ndarray, triangles: np.ndarray, up: np.ndarray, side: str,
                    references: list[Reference] = ()) -> tuple[dict, dict]:
    """Landmarks (mm, the shape's own frame) and the side evidence for a femur whose proximal end is along ``up``
    (the sources' superior axis: used to orient the first principal axis, then checked).

    ``shaft_axis`` is the proximal shaft's: the line through the centroids of cross-sections 75-160 mm below the
    head centre (below the lesser trochanter); whole femurs also get ``midshaft_axis``, which differs by the
    anterior bow. A femur cut too short for 60 mm of such sections gets the mean proximal-shaft axis of the
    ``references`` registered (rigid ICP) onto its proximal end, each mirrored front-to-back first where its side
    differs from ``side`` (the label, which is checked separately)."""
    normals, areas = vertex_normals_areas(vertices, triangles)
    axis = principal_axis(vertices, areas)
    axis = axis if axis @ up > 0 else -axis
    along = vertices @ axis
    top = along.max()
    proximal = along > top - 100.0  # the head lies in the top 100 mm; condyles of whole femurs do not
    guess, guess_r = hough_sphere(vertices[proximal], normals[proximal], areas[proximal],
                                  np.arange(17.0, 31.0, 1.0), concave=False)
    centre, radius, rms, _ = refine_sphere(vertices, normals, areas, guess, guess_r, concave=False)
    whole = top - along.min() > WHOLE_FEMUR_MIN_LENGTH_MM
    section_axis, shaft_point, shaft_used = shaft_sections(vertices, triangles, axis if whole else up, centre,
                                                           PROXIMAL_SHAFT_MM)
    evidence: dict = {"shaft_sections_mm": round(shaft_used, 1)}
    midshaft = None
    if whole:  # the mid-shaft (anatomical) axis differs from the proximal one by the anterior bow (4-9 deg here)
        length = top - along.min()
        midshaft = shaft_sections(vertices, triangles, section_axis, centre, (0.25 * length, 0.8 * length))[0]
    axis = section_axis
    if references:
        start_axis = section_axis if shaft_used >= 20.0 else up
        # start pose: the head centre's direction from the shaft (sections) or from the cut end (short femurs)
        low = shaft_point if shaft_used >= 20.0 else \
            vertices[vertices @ start_axis < (vertices @ start_axis).min() + 10.0].mean(axis=0)
        medial0 = centre - low
        medial0 -= (medial0 @ start_axis) * start_axis
        medial0 /= np.linalg.norm(medial0)
        fits = [register_reference(r, r.side != side, vertices, centre, start_axis, medial0) for r in references]
        registered = np.mean([a for a, _, _ in fits], axis=0)
        registered /= np.linalg.norm(registered)
        spread = max(math.degrees(math.acos(min(1.0, float(a @ registered)))) for a, _, _ in fits)
        # each reference's axis line crosses the plane 100 mm below the head centre: their mean is the shaft point
        level = centre @ registered - 100.0
        crossings = [p + (level - p @ registered) / (a @ registered) * a for a, p, _ in fits]
        evidence["registration"] = {
            "references": [r.name for r in references], "rms_mm": round(float(np.mean([r for _, _, r in fits])), 3),
            "axis_spread_deg": round(spread, 2),
            "angle_to_section_axis_deg": round(math.degrees(math.acos(min(1.0, float(registered @ section_axis)))),
                                               2) if shaft_used > 0 else None}
        if shaft_used > 0:  # how far the registered line passes from the sections' line, 100 mm below the head
            step = (level - shaft_point @ registered) / (section_axis @ registered)
            on_sections = shaft_point + step * section_axis
            evidence["registration"]["offset_to_section_axis_mm"] = round(
                float(np.linalg.norm(np.mean(crossings, axis=0) - on_sections)), 2)
        if shaft_used < MIN_SHAFT_MM:
            axis, shaft_point = registered, np.mean(crossings, axis=0)
    evidence["shaft_axis_from"] = "sections" if shaft_used >= MIN_SHAFT_MM else "registered references"
    along = vertices @ axis
    near_head = np.linalg.norm(vertices - centre, axis=1) < radius + 5.0
    head_top = vertices[near_head][np.argmax(along[near_head])]
    distal_end = shaft_point + (along.min() - shaft_point @ axis) * axis
    foot = shaft_point + ((centre - shaft_point) @ axis) * axis
    medial = centre - foot
    head_offset = float(np.linalg.norm(medial))
    medial /= head_offset
    length = float(head_top @ axis - along.min())
    lesser, lt_score, chirality = lesser_trochanter(vertices, axis, shaft_point, centre, medial, side, length)
    marks = {
        "head_centre": _round(centre), "head_radius": round(radius, 2), "head_fit_rms_mm": round(rms, 3),
        "shaft_axis": _round(axis, 5), "shaft_point": _round(shaft_point), "head_top": _round(head_top),
        "distal_end": _round(distal_end), "length_mm": round(length, 1),
        "head_offset_mm": round(head_offset, 1),
    }
    if lesser is not None:
        marks["lesser_trochanter"] = _round(lesser)
    if midshaft is not None:
        marks["midshaft_axis"] = _round(midshaft, 5)
    evidence.update({"medial_direction": _round(medial, 4), "anatomical_side": chirality,
                     "lesser_trochanter_score_mm": lt_score,
                     "shaft_axis_dot_up": round(float(axis @ up), 3)})
    return marks, evidence


def lesser_trochanter(vertices, axis, shaft_point, centre, medial, side: str,
                      length: float) -> tuple[np.ndarray | None, float, str | None]:
    """The lesser trochanter and the side that anatomy alone implies.

    Around the shaft axis, 40-76 mm below the head centre, compare the outermost point of the two medial sectors
    (20-100 degrees either side of the medial direction): the lesser trochanter makes the posterior one stick out.
    (proximal x medial) points anterior on a left femur and posterior on a right one, so the sign of the summed
    difference gives the side in any rotated frame. Only trusted on femurs at least 150 mm long with a clear sum
    (>= 15 mm): shorter specimens are cut at or above the lesser trochanter and gave wrong answers. The landmark
    is the most prominent point of the posterior sector (posterior from ``side``, the checked label)."""
    along = vertices @ axis
    head_level = centre @ axis
    rel = vertices - (shaft_point + np.outer(along - shaft_point @ axis, axis))
    x, y = rel @ medial, rel @ np.cross(axis, medial)
    radius = np.hypot(x, y)
    angle = np.degrees(np.arctan2(y, x))
    score, best, best_bump = 0.0, None, 0.0
    posterior_sign = 1.0 if side == "right" else -1.0
    for depth in np.arange(40.0, 76.0, 3.0):
        slab = (along < head_level - depth) & (along >= head_level - depth - 3.0)
        plus = slab & (angle > 20) & (angle < 100)
        minus = slab & (angle < -20) & (angle > -100)
        if plus.sum() < 4 or minus.sum() < 4:
            continue
        score += float(radius[plus].max() - radius[minus].max())
        posterior = plus if posterior_sign > 0 else minus
        candidates = np.flatnonzero(posterior)
        bump = radius[candidates] - np.median(radius[slab])
        if bump.max() > best_bump:
            best, best_bump = int(candidates[np.argmax(bump)]), float(bump.max())
    anatomical = None
    if length >= 150.0 and abs(score) >= 15.0:
        anatomical = "right" if score > 0 else "left"
    return (vertices[best] if best is not None and best_bump >= 3.0 else None), round(score, 1), anatomical


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def acetabulum_landmarks(vertices: np.ndarray, triangles: np.ndarray) -> dict:
    normals, areas = vertex_normals_areas(vertices, triangles)
    guess, guess_r = hough_sphere(vertices, normals, areas, np.arange(18.0, 33.0, 1.0), concave=True)
    centre, radius, rms, area = refine_sphere(vertices, normals, areas, guess, guess_r, concave=True)
    return {"acetabulum_centre": _round(centre), "acetabulum_radius": round(radius, 2),
            "acetabulum_fit_rms_mm": round(rms, 3), "acetabulum_fit_area_mm2": round(area, 0)}


def _round(vector: np.ndarray, digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in vector]


# --- the conversion ---------------------------------------------------------------------------------------------

@dataclass
class Shape:
    name: str
    subject: str
    kind: str
    side: str
    extent: str
    source: dict
    vertices_q: np.ndarray
    origin: np.ndarray
    triangles: np.ndarray
    meta: dict


def quantise(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    origin = np.round((vertices.min(axis=0) + vertices.max(axis=0)) / 2 / VERTEX_SCALE_MM) * VERTEX_SCALE_MM
    q = np.round((vertices - origin) / VERTEX_SCALE_MM)
    if np.abs(q).max() > 32767:
        raise ValueError("shape too large for int16 at 0.05 mm")
    return q.astype(np.int16), origin.astype(np.float64)


def process(raw, target: int, label: str, bad_edge_rings: int | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray, np.ndarray, dict]:
    """Clean, repair, decimate and quantise one surface; returns (vertices_q, origin, triangles, dequantised, log).
    ``bad_edge_rings``: drop the faces around non-manifold and mis-oriented edges, grown by that many rings of
    neighbours, instead of only the faces on non-manifold edges (the gias3 sacrum needs 1)."""
    _, source_triangles = to_arrays(clean(raw))
    log: dict = {"source_vertices": int(raw.GetNumberOfPoints()), "source_triangles": int(raw.GetNumberOfCells()),
                 "source_edges": edge_report(source_triangles)}
    surface = clean(raw)
    if bad_edge_rings is None:
        surface, dropped = drop_non_manifold(surface)
    else:
        surface, dropped = drop_bad_edge_faces(surface, bad_edge_rings)
    log["faces_dropped_on_non_manifold_edges"] = dropped
    if edge_report(to_arrays(surface)[1])["boundary"]:
        surface, loops, added = fill_holes(surface)
        log["holes_filled"] = loops
        log["hole_fill_triangles_added"] = added
    surface = orient_outwards(largest_region(surface))
    dense = surface
    surface, repairs = decimate(surface, target)
    if repairs:
        log["faces_refilled_after_decimation"] = repairs
    log["decimation_error"] = decimation_error(dense, surface)
    vertices, triangles = to_arrays(surface)
    vertices_q, origin = quantise(vertices)
    vertices = origin + vertices_q.astype(np.float64) * VERTEX_SCALE_MM
    if len(np.unique(vertices_q, axis=0)) != len(vertices_q):
        raise ValueError(f"{label}: two vertices share one 0.05 mm position")
    if signed_volume(vertices, triangles) <= 0:
        raise ValueError(f"{label}: surface is inside out")
    log["edges"] = edge_report(triangles)
    log["watertight"] = not any(log["edges"].values())
    log["volume_mm3"] = round(signed_volume(vertices, triangles), 0)
    if len(vertices) > 65535:
        raise ValueError(f"{label}: too many vertices for uint16 triangles")
    print(f"  {label}: {log['source_triangles']} -> {len(triangles)} triangles, "
          f"dropped {dropped}, holes {log.get('holes_filled', 0)} (+{log.get('hole_fill_triangles_added', 0)}), "
          f"error {log['decimation_error']}, edges {log['edges']}")
    return vertices_q, origin, triangles.astype(np.uint16), vertices, log


def femur_entry(name, subject, side, source, raw, label) -> Shape:
    """Clean, decimate and quantise one femur (landmarks come later: short femurs need the references)."""
    first = to_arrays(clean(raw))[0]
    length = float(np.ptp(first[:, 2]))  # all sources have superior = +z (checked again by the landmarks)
    extent = "whole" if length > WHOLE_FEMUR_MIN_LENGTH_MM else "proximal"
    target = WHOLE_TRIANGLES if extent == "whole" else PROXIMAL_TRIANGLES
    vertices_q, origin, triangles, _, log = process(raw, target, label)
    return Shape(name, subject, "femur", side, extent, source, vertices_q, origin, triangles, {"processing": log})


def dequantised(shape: Shape) -> np.ndarray:
    return shape.origin + shape.vertices_q.astype(np.float64) * VERTEX_SCALE_MM


def add_femur_landmarks(shape: Shape, references: list[Reference]) -> None:
    """Landmarks on the stored (de-quantised) surface, then the side check (label vs frame vs anatomy)."""
    others = [r for r in references if r.name != shape.name]
    marks, evidence = femur_landmarks(dequantised(shape), shape.triangles.astype(np.int64), np.array([0.0, 0.0, 1.0]),
                                      shape.side, others)
    evidence["frame_side"] = frame_side(shape.source["frame"], evidence["medial_direction"])
    check_side(shape.name, shape.side, evidence)
    shape.meta.update({"landmarks": marks, "side_evidence": evidence})
    registration = evidence.get("registration", {})
    print(f"  {shape.name}: head R {marks['head_radius']:.2f} (rms {marks['head_fit_rms_mm']:.2f}), "
          f"length {marks['length_mm']:.0f}, axis from {evidence['shaft_axis_from']} "
          f"({evidence['shaft_sections_mm']:.0f} mm), sides: anatomy {evidence['anatomical_side']}, "
          f"frame {evidence['frame_side']}, registration rms {registration.get('rms_mm')} mm, "
          f"axis vs sections {registration.get('angle_to_section_axis_deg')} deg "
          f"{registration.get('offset_to_section_axis_mm')} mm, "
          f"spread {registration.get('axis_spread_deg')} deg")


def make_reference(shape: Shape) -> Reference:
    marks = shape.meta["landmarks"]
    return Reference(shape.name, shape.side, dequantised(shape), np.array(marks["head_centre"]),
                     np.array(marks["shaft_axis"]), np.array(shape.meta["side_evidence"]["medial_direction"]),
                     np.array(marks["shaft_point"]))


def frame_side(frame: str, medial: list[float]) -> str | None:
    """Side implied by the frame: in LPS (+x = patient left) a left femur's head lies towards -x (the midline)."""
    if frame != "LPS":
        return None
    return "left" if medial[0] < 0 else "right"


def check_side(label: str, side: str, evidence: dict) -> None:
    votes = {"anatomical_side": evidence.get("anatomical_side"), "frame_side": evidence.get("frame_side")}
    for key, vote in votes.items():
        if vote not in (None, side):
            raise SystemExit(f"{label}: labelled {side} but {key} says {vote}")
    if evidence["shaft_axis_dot_up"] < 0.7:  # libhip m8 lies with its hips flexed ~38 deg
        raise SystemExit(f"{label}: shaft axis is not along +z ({evidence['shaft_axis_dot_up']})")


def libhip_shapes(repo: Path) -> list[Shape]:
    shapes = []
    for subject in LIBHIP_SUBJECTS:
        for s in ("l", "r"):
            side = "left" if s == "l" else "right"
            if (subject, s) in LIBHIP_RAW:
                commit, path = LIBHIP_HEAD, f"model_repository/RawSegment/{subject}/{subject}_{s}femur_mm.stl"
                what = "RawSegment (3D Slicer export of the label map, SPACE=LPS, dense, closed)"
            else:
                commit, path = LIBHIP_CARGEN, f"model_repository/cargen_output/{subject}/morpho_output/" \
                                              f"{s}_csg__tracked_surface.stl"
                what = "cargen morpho_output tracked surface (fTetWild remesh of the segmentation, slits on the head)"
            data = git_bytes(repo, commit, path)
            if path.startswith("model_repository/RawSegment") and not data[:80].startswith(b"3D Slicer output. "
                                                                                             b"SPACE=LPS"):
                raise SystemExit(f"{path}: unexpected STL header {data[:80]!r}")
            source = {**LIBHIP, "path": path, "commit": commit, "frame": "LPS", "what": what}
            name = f"libhip_{subject}_{side}"
            shapes.append(femur_entry(name, f"libhip-{subject}", side, source, read_stl(data), name))
    return shapes


def gias2_femurs(gias2: Path) -> list[Shape]:
    shapes = []
    for subject in GIAS2_SUBJECTS:
        path = f"data/segmentations/{subject}_l.wrl"
        parts = read_vrml(git_bytes(gias2, GIAS2_HEAD, path))
        if len(parts) != 1:
            raise SystemExit(f"{path}: expected one shape, found {len(parts)}")
        source = {**GIAS2, "path": path, "commit": GIAS2_HEAD, "frame": "CT scanner frame (orientation not stated; "
                  "superior = +z)", "what": "whole-femur segmentation (VRML IndexedFaceSet, mm)"}
        name = f"gias2_{subject}_left"
        shapes.append(femur_entry(name, f"gias2-{subject}", "left", source, parts[0], name))
    return shapes


def gias3_hemipelves(gias3: Path, femurs: list[Shape]) -> list[Shape]:
    parts = read_vrml(git_bytes(gias3, GIAS3_HEAD, PELVIS_PATH))
    femur = next(s for s in femurs if s.subject == f"gias2-{PELVIS_SUBJECT}")
    femur_marks = femur.meta["landmarks"]
    centres = [to_arrays(clean(p))[0].mean(axis=0) for p in parts]
    sacrum_x = sorted(c[0] for c in centres)[1]  # the three shapes lie right, sacrum, left along x
    pelvis_shapes = []
    for index, part in enumerate(parts):
        x = centres[index][0]
        if abs(x - sacrum_x) < 1e-6:
            continue  # the sacrum
        frame_side_ = "left" if x > sacrum_x else "right"  # +x holds the left femur of this subject
        name = f"gias3_{PELVIS_SUBJECT}_hemipelvis_{frame_side_}"
        vertices_q, origin, triangles, vertices, log = process(part, PELVIS_TRIANGLES, name)
        marks = acetabulum_landmarks(vertices, triangles.astype(np.int64))
        gap = float(np.linalg.norm(np.subtract(marks["acetabulum_centre"], femur_marks["head_centre"])))
        evidence = {"frame_side": frame_side_, "shape_index_in_file": index,
                    "distance_to_left_femoral_head_centre_mm": round(gap, 2)}
        if frame_side_ == "left" and gap > 6.0:
            raise SystemExit(f"{name}: acetabulum {gap:.1f} mm from the left femoral head of the same subject")
        source = {**GIAS3, "path": PELVIS_PATH, "commit": GIAS3_HEAD, "frame": femur.source["frame"],
                  "what": f"hemipelvis (shape {index} of 3 in a whole-pelvis VRML: right, left hemipelvis, sacrum)"}
        pelvis_shapes.append(Shape(name, f"gias2-{PELVIS_SUBJECT}", "hemipelvis", frame_side_, "", source,
                                   vertices_q, origin, triangles, {"processing": log, "side_evidence": evidence,
                                                                   "landmarks": marks}))
    pelvis_shapes.sort(key=lambda s: s.side)  # left first: callers take load_shapes("hemipelvis")[0] as the left one
    return pelvis_shapes


def shape_model(gias3: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The LLP26 left-femur PCA without the held-out subjects: mean nodes, modes in mm per standard deviation,
    variances, subjects, scores and the node-grid triangles.

    LLP26 was trained on 26 femurs that include every gias2 tutorial subject, so its samples would carry the
    held-out gias2 femurs into training. 26 shapes span only 25 modes, all stored, so mean + modes @ projected
    weights gives back each training femur's nodes exactly; the held-out ones are dropped and the PCA is redone on
    the rest (same rigid alignment; mode signs follow the original modes)."""
    pc = unpickle(git_bytes(gias3, GIAS3_HEAD, f"{PCA_DIR}/femur_left_rigid_LLP26.pc"))
    subjects = git_bytes(gias3, GIAS3_HEAD, f"{PCA_DIR}/femur_left_rigid_LLP26_scans.txt").decode().split()
    mesh = read_shelve(git_bytes(gias3, GIAS3_HEAD, f"{PCA_DIR}/femur_left_quartic_flat.mesh"))
    mean_geof = read_shelve(git_bytes(gias3, GIAS3_HEAD, f"{PCA_DIR}/femur_left_mean_rigid_LLP26.geof"))
    nodes = int(mesh["number_of_points"])
    mean = np.asarray(pc["mean"])  # (1902,): gias field parameters, all x, then all y, then all z
    if not np.allclose(mean.reshape(3, nodes).T, mean_geof["field_parameters"][:, :, 0].T):
        raise SystemExit("the .pc mean does not match femur_left_mean_rigid_LLP26.geof")
    eigenvectors = np.asarray(pc["modes"])  # (1902, 26), orthonormal columns
    variances = np.asarray(pc["weights"])  # eigenvalues, mm^2 (= variance of projectedWeights, ddof=1)
    projected = np.asarray(pc["projectedWeights"])  # (modes, subjects in the order of the scans list)
    if projected.shape[1] != len(subjects) or not np.allclose(projected.var(axis=1, ddof=1), variances):
        raise SystemExit("LLP26 weights are not the variances of the projected training shapes")
    shapes = mean + projected.T @ eigenvectors.T  # (26, 1902): the training femurs' nodes
    held = [i for i, name in enumerate(subjects) if f"gias2-{name}" in HELD_OUT]
    kept = [i for i in range(len(subjects)) if i not in held]
    training = shapes[kept]
    new_mean = training.mean(axis=0)
    _, singular, vt = np.linalg.svd(training - new_mean, full_matrices=False)
    new_variances = singular ** 2 / (len(kept) - 1)
    keep = new_variances > 1e-6 * new_variances[0]  # n shapes span n - 1 modes
    vt, new_variances = vt[keep], new_variances[keep]
    overlap = vt @ eigenvectors  # (new, old): cosines between new and original modes
    vt *= np.where(np.diag(overlap[:, :len(vt)]) < 0, -1.0, 1.0)[:, None]
    sd = np.sqrt(new_variances)
    modes = (vt * sd[:, None]).reshape(-1, 3, nodes).transpose(0, 2, 1)
    scores = ((training - new_mean) @ vt.T) / sd  # (subjects, modes) in standard deviations
    mean_nodes = new_mean.reshape(3, nodes).T
    triangles = quartic_mesh_triangles(mesh)
    meta = {
        "source": {**GIAS3, "path": f"{PCA_DIR}/femur_left_rigid_LLP26.pc", "commit": GIAS3_HEAD,
                   "also": [f"{PCA_DIR}/femur_left_rigid_LLP26_scans.txt", f"{PCA_DIR}/femur_left_quartic_flat.mesh",
                            f"{PCA_DIR}/femur_left_mean_rigid_LLP26.geof"]},
        "recomputed_without": [subjects[i] for i in held],
        "modes_scaling": "modes[k] is the displacement (mm) of every node for +1 standard deviation of mode k: "
                         "nodes = mean + sum_k c_k * modes[k]; variances[k] (mm^2) = sd_k^2, for reference",
        "node_layout": "(634, 3) x, y, z in mm (the .pc stores all x, then all y, then all z)",
        "frame": "the LLP26 rigid-alignment frame (superior = +z; a left femur)",
        "triangles": "piecewise-linear triangulation of the 54 quartic Lagrange elements' node grids "
                     "(femur_left_quartic_flat.mesh, numbered as fieldwork assembles it): closed, genus 0, outward",
        "subject_scores": "the training femurs' coordinates in standard deviations (reconstruct exactly)",
        "explained_variance_first5": [round(float(v), 4) for v in (new_variances[:5] / new_variances.sum())],
        "cosine_to_original_modes_first5": [round(float(abs(overlap[k, k])), 3) for k in range(5)],
    }
    arrays = {"mean": mean_nodes.astype(np.float32), "modes": modes.astype(np.float32),
              "variances": new_variances.astype(np.float32), "subject_scores": scores.astype(np.float32),
              "triangles": triangles.astype(np.int32), "subjects": np.array([subjects[i] for i in kept]),
              "metadata": np.array(json.dumps(meta, indent=1))}
    report = edge_report(triangles)
    if any(report.values()) or signed_volume(mean_nodes, triangles) <= 0:
        raise SystemExit(f"shape-model triangulation is not a closed outward surface: {report}")
    print(f"shape model: LLP26 without {meta['recomputed_without']}: {len(kept)} subjects, {len(sd)} modes, "
          f"explained {meta['explained_variance_first5']}, "
          f"|cos| to original {meta['cosine_to_original_modes_first5']}")
    return arrays, meta


def quartic_mesh_triangles(mesh: dict) -> np.ndarray:
    """Number the element points as fieldwork assembles them (elements in order, a point shared through
    ``connectivity`` keeps the first number) and split each element's node grid into triangles."""
    number: dict = {}
    count = 0
    for element, _, _ in mesh["elements"]:
        for point in mesh["element_points"][element]:
            if point in number:
                continue
            shared = next((number[q] for q in mesh["connectivity"].get(point, []) if q in number), None)
            number[point] = count if shared is None else shared
            count += shared is None
    if count != mesh["number_of_points"]:
        raise SystemExit(f"fieldwork numbering gave {count} points, the mesh says {mesh['number_of_points']}")
    triangles = []
    for element, _, basis in mesh["elements"]:
        g = [number[p] for p in mesh["element_points"][element]]
        if basis.startswith("quad"):  # quad55 (5 x 5) and quad54 (5 x 4): xi1 runs fastest
            rows = len(g) // 5
            for j in range(rows - 1):
                for i in range(4):
                    a, b, c, d = g[i + 5 * j], g[i + 1 + 5 * j], g[i + 1 + 5 * (j + 1)], g[i + 5 * (j + 1)]
                    triangles += [(a, b, c), (a, c, d)]
        elif basis == "tri15":  # quartic simplex: rows of 5, 4, 3, 2, 1 points
            rows, k = [], 0
            for r in range(5):
                rows.append(g[k:k + 5 - r])
                k += 5 - r
            for r in range(4):
                for i in range(4 - r):
                    triangles.append((rows[r][i], rows[r][i + 1], rows[r + 1][i]))
                    if i < 3 - r:
                        triangles.append((rows[r][i + 1], rows[r + 1][i + 1], rows[r + 1][i]))
        else:
            raise SystemExit(f"unknown fieldwork basis {basis}")
    return np.array(triangles, dtype=np.int64)


def write_outputs(shapes: list[Shape], model: dict[str, np.ndarray], out: Path) -> dict:
    entries = []
    arrays: dict[str, np.ndarray] = {}
    for shape in shapes:
        held = shape.subject in HELD_OUT
        marks = shape.meta["landmarks"]
        entries.append({
            "name": shape.name, "subject": shape.subject, "kind": shape.kind, "side": shape.side,
            "extent": shape.extent, "held_out": held, "licence": shape.source["licence"],
            "source": {k: v for k, v in shape.source.items()}, "watertight": shape.meta["processing"]["watertight"],
            "n_vertices": int(len(shape.vertices_q)), "n_triangles": int(len(shape.triangles)),
            "landmarks": marks, "processing": shape.meta["processing"], "side_evidence": shape.meta["side_evidence"],
        })
        arrays[f"{shape.name}__vertices"] = shape.vertices_q
        arrays[f"{shape.name}__origin"] = shape.origin
        arrays[f"{shape.name}__triangles"] = shape.triangles
    subjects = sorted({s.subject for s in shapes})
    meta = {
        "format": FORMAT, "vertex_scale_mm": VERTEX_SCALE_MM,
        "layout": "per shape: NAME__vertices int16 (N, 3) in units of vertex_scale_mm relative to NAME__origin "
                  "float64 (3,) mm; NAME__triangles uint16 (M, 3), outward (counter-clockwise seen from outside)",
        "frames": "each shape keeps its source frame (mm): libhip LPS scanner frame; gias2/gias3 CT frame with "
                  "superior +z; the two sides of a libhip subject and the gias2-2007_5028 femur and hemipelves "
                  "are mutually placed as scanned",
        "split": {"held_out_subjects": sorted(HELD_OUT),
                  "training_subjects": [s for s in subjects if s not in HELD_OUT],
                  "rule": "about a quarter of each source's subjects held out; gias2-2007_5028 stays in training "
                          "(its hemipelvis is the only one); PCA shape-model samples are training"},
        "shapes": entries,
    }
    arrays["metadata"] = np.array(json.dumps(meta, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "anatomy_shapes.npz", **arrays)
    np.savez_compressed(out / "femur_shape_model.npz", **model)
    return meta


# --- context bones (anatomy_context.npz) -----------------------------------------------------------------------
# Bones that real pelvis / abdomen / leg CTs hold besides the femurs and hemipelves. They are never labelled, so
# all count as training (held_out False). Each keeps its source frame (mm); see README.md for the frames.

OPENSIM = {"repo": "https://github.com/opensim-org/opensim-models", "licence": "CC-BY-3.0",
           "licence_file": "LICENSE-CC-BY-3.0.txt", "attribution": "OpenSim models (opensim-org/opensim-models): "
           "Delp S.L., Loan J.P., Hoy M.G., Zajac F.E., Topp E.L., Rosen J.M., Thelen D.G., Anderson F.C., Seth A. "
           "(gait2392 / gait2354 / gait10dof18musc) and Reinbolt J.A. (leg6dof9musc); geometry after Delp et al. "
           "(1990)"}
OPENSIM_HEAD = "20a888b9655e73fb84963d6e03eee3752cf6074b"  # 2024-12-09 (the Geometry files used last changed in
# bbe7309a, 2024-11-01: normals removed). The repository has no LICENSE file: each .osim model states its own
# licence in <credits>; only files referenced by a model that says "License: Creative Commons (CCBY 3.0)" are used.
OPENSIM_LICENSED_BY = {
    "Geometry/hat_spine.vtp": "Models/Gait2392_Simbody/gait2392_thelen2003muscle.osim",
    "Geometry/tibia_r.vtp": "Models/Gait2392_Simbody/gait2392_thelen2003muscle.osim",
    "Geometry/tibia_l.vtp": "Models/Gait2392_Simbody/gait2392_thelen2003muscle.osim",
    "Geometry/fibula.vtp": "Models/Gait2392_Simbody/gait2392_thelen2003muscle.osim",
    "Geometry/l_fibula.vtp": "Models/Gait2392_Simbody/gait2392_thelen2003muscle.osim",
    "Geometry/pat.vtp": "Models/Leg6Dof9Musc/leg6dof9musc.osim",
}
OPENSIM_FRAME = "OpenSim body frame of {body} (y superior, x anterior, z right), converted from metres to mm"
OPENSIM_SPINE_LEVELS = ["L5", "L4", "L3", "L2", "L1", "T12"]  # hat_spine.vtp's closed vertebrae, lowest first
CONTEXT_TRIANGLES = 5000
CONTEXT_FORMAT = "FemurSeg anatomy context shapes v1"


def read_vtp(data: bytes):
    vtk = _vtk()
    with tempfile.NamedTemporaryFile(suffix=".vtp") as handle:
        handle.write(data)
        handle.flush()
        reader = vtk.vtkXMLPolyDataReader()
        reader.SetFileName(handle.name)
        reader.Update()
        polydata = vtk.vtkPolyData()
        polydata.DeepCopy(reader.GetOutput())
    if polydata.GetNumberOfCells() == 0:
        raise SystemExit("a VTP source has no polygons")
    return polydata


def opensim_licence_check(opensim: Path, path: str) -> str:
    """The model that licenses ``path``: it must reference the file and state CC BY 3.0 in its credits."""
    model = OPENSIM_LICENSED_BY[path]
    text = git_bytes(opensim, OPENSIM_HEAD, model).decode("utf-8", "replace")
    name = path.rsplit("/", 1)[1]
    if f"<mesh_file>{name}</mesh_file>" not in text or "License: Creative Commons (CCBY 3.0)" not in text:
        raise SystemExit(f"{model} no longer references {name} under CC BY 3.0")
    return model


def metres_to_mm(vertices: np.ndarray, triangles: np.ndarray):
    return to_polydata(vertices * 1000.0, triangles)


def components(vertices: np.ndarray, triangles: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The connected pieces of a multi-part surface, each as (vertices, triangles) renumbered."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415
    n = len(vertices)
    rows, cols = np.r_[triangles[:, 0], triangles[:, 1], triangles[:, 2]], np.r_[triangles[:, 1], triangles[:, 2],
                                                                                 triangles[:, 0]]
    _, label = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    out = []
    for piece in np.unique(label):
        keep = np.flatnonzero(label == piece)
        renumber = np.full(n, -1, dtype=np.int64)
        renumber[keep] = np.arange(len(keep))
        tri = triangles[label[triangles[:, 0]] == piece]
        out.append((vertices[keep], renumber[tri]))
    return out


def volume_centroid(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    volumes = np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0
    return (volumes[:, None] * (a + b + c) / 4.0).sum(axis=0) / volumes.sum()


def box_landmarks(vertices: np.ndarray, triangles: np.ndarray) -> dict:
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return {"centroid": _round(volume_centroid(vertices, triangles)), "bbox_min": _round(low),
            "bbox_max": _round(high), "extent_mm": _round(high - low, 1)}


def vertebra_landmarks(vertices: np.ndarray, triangles: np.ndarray, level: str) -> dict:
    """Body centre: the vertebral body is the anterior part (+x) of the vertebra; its vertices are taken as those
    within 40 % of the antero-posterior extent from the most anterior point (behind that come the pedicles,
    transverse and spinous processes). Centre and sizes are those of their bounding box."""
    marks = {"level": level, **box_landmarks(vertices, triangles)}
    x = vertices[:, 0]
    body = vertices[x >= x.max() - 0.4 * np.ptp(x)]
    low, high = body.min(axis=0), body.max(axis=0)
    marks.update({"body_centre": _round((low + high) / 2), "body_width_mm": round(float(high[2] - low[2]), 1),
                  "body_height_mm": round(float(high[1] - low[1]), 1),
                  "body_depth_mm": round(float(high[0] - low[0]), 1)})
    return marks


def long_bone_axis(vertices: np.ndarray, triangles: np.ndarray, up: np.ndarray) -> tuple:
    """Shaft axis (unit, distal to proximal) through the centroids of cross-sections every 3 mm over the middle
    50 % of the bone, iterated so each pass cuts perpendicular to the last axis; returns (axis, point, length)."""
    axis = up / np.linalg.norm(up)
    for _ in range(4):
        along = vertices @ axis
        low, high = along.min(), along.max()
        levels = np.arange(low + 0.25 * (high - low), low + 0.75 * (high - low), 3.0)
        centroids = np.array([c for c in (section_centroid(vertices, triangles, axis, h) for h in levels)
                              if c is not None])
        point = centroids.mean(axis=0)
        direction = np.linalg.svd(centroids - point)[2][0]
        axis = direction if direction @ axis > 0 else -direction
    along = vertices @ axis
    return axis, point, float(np.ptp(along))


def tibia_landmarks(vertices: np.ndarray, triangles: np.ndarray) -> dict:
    """Shaft axis and length, plateau centre (centroid of the cross-section 5 mm below the most proximal point,
    moved up the axis to that point's level), distal end (on the axis at the level of the most distal point)."""
    axis, point, length = long_bone_axis(vertices, triangles, np.array([0.0, 1.0, 0.0]))
    along = vertices @ axis
    top = along.max()
    section = section_centroid(vertices, triangles, axis, top - 5.0)
    plateau = section + 5.0 * axis
    distal = point + (along.min() - point @ axis) * axis
    return {**box_landmarks(vertices, triangles), "shaft_axis": _round(axis, 5), "shaft_point": _round(point),
            "plateau_centre": _round(plateau), "distal_end": _round(distal), "length_mm": round(length, 1)}


def fibula_landmarks(vertices: np.ndarray, triangles: np.ndarray) -> dict:
    """Shaft axis and length as for the tibia; head centre: volume-free estimate, the centroid of the vertices in
    the proximal 25 mm along the axis; proximal end: the most proximal vertex."""
    axis, point, length = long_bone_axis(vertices, triangles, np.array([0.0, 1.0, 0.0]))
    along = vertices @ axis
    head = vertices[along >= along.max() - 25.0].mean(axis=0)
    return {**box_landmarks(vertices, triangles), "shaft_axis": _round(axis, 5), "shaft_point": _round(point),
            "head_centre": _round(head), "proximal_end": _round(vertices[np.argmax(along)]),
            "length_mm": round(length, 1)}


def context_entry(name: str, subject: str, kind: str, side: str, source: dict, polydata, landmarks,
                  bad_edge_rings: int | None = None) -> Shape:
    vertices_q, origin, triangles, vertices, log = process(polydata, CONTEXT_TRIANGLES, name, bad_edge_rings)
    marks = landmarks(vertices, triangles.astype(np.int64))
    return Shape(name, subject, kind, side, "", source, vertices_q, origin, triangles,
                 {"processing": log, "landmarks": marks, "side_evidence": {}})


def context_shapes(gias3: Path, opensim: Path) -> list[Shape]:
    """The sacrum of gias3 2007_5028 (same frame as the stored hemipelves) and OpenSim (CC BY 3.0) vertebrae
    L1-L5 and T12, tibiae, fibulae and the right patella."""
    shapes = []
    parts = read_vrml(git_bytes(gias3, GIAS3_HEAD, PELVIS_PATH))
    centres = [to_arrays(clean(p))[0].mean(axis=0) for p in parts]
    sacrum_index = int(np.argsort([c[0] for c in centres])[1])  # right, sacrum, left along x
    if sacrum_index != 2:
        raise SystemExit(f"the sacrum should be shape 3 of {PELVIS_PATH}, found shape {sacrum_index + 1}")
    source = {**GIAS3, "path": PELVIS_PATH, "commit": GIAS3_HEAD, "frame": "CT scanner frame (orientation not "
              "stated; behaves as LPS, superior = +z), the frame of the gias3_2007_5028 hemipelves",
              "what": "sacrum (shape 3 of 3 in a whole-pelvis VRML: right, left hemipelvis, sacrum)"}
    shapes.append(context_entry(f"gias3_{PELVIS_SUBJECT}_sacrum", f"gias2-{PELVIS_SUBJECT}", "sacrum", "midline",
                                source, parts[sacrum_index], box_landmarks, bad_edge_rings=1))
    # (it has 2 non-manifold and 4 mis-oriented edges; dropping only the faces on them left a surface that
    # vtkQuadricDecimation broke again: with one ring of neighbours dropped and refilled it decimates cleanly)

    def opensim_source(path: str, body: str, what: str) -> dict:
        return {**OPENSIM, "path": path, "commit": OPENSIM_HEAD, "licensed_by": opensim_licence_check(opensim, path),
                "frame": OPENSIM_FRAME.format(body=body), "what": what}

    spine_path = "Geometry/hat_spine.vtp"
    vertices, triangles = to_arrays(clean(read_vtp(git_bytes(opensim, OPENSIM_HEAD, spine_path))))
    closed = [(v, t) for v, t in components(vertices, triangles) if len(t) >= 200 and not any(edge_report(t).values())]
    closed.sort(key=lambda piece: piece[0][:, 1].mean())  # lowest (L5, just above the lumbosacral joint) first
    for number, (level, (v, t)) in enumerate(zip(OPENSIM_SPINE_LEVELS, closed), start=1):
        source = opensim_source(spine_path, "torso", f"vertebra {level}: closed piece {number} of hat_spine.vtp "
                                "counted from below (the open intervertebral-disc pieces are not used)")
        shapes.append(context_entry(f"opensim_{level}", "opensim-gait2392", "vertebra", "midline", source,
                                    metres_to_mm(v, t), lambda a, b, lv=level: vertebra_landmarks(a, b, lv)))
    for path, body, kind, side, landmarks in (
            ("Geometry/tibia_r.vtp", "tibia_r", "tibia", "right", tibia_landmarks),
            ("Geometry/tibia_l.vtp", "tibia_l", "tibia", "left", tibia_landmarks),
            ("Geometry/fibula.vtp", "tibia_r", "fibula", "right", fibula_landmarks),
            ("Geometry/l_fibula.vtp", "tibia_l", "fibula", "left", fibula_landmarks),
            ("Geometry/pat.vtp", "patella_r", "patella", "right", box_landmarks)):
        v, t = to_arrays(clean(read_vtp(git_bytes(opensim, OPENSIM_HEAD, path))))
        source = opensim_source(path, body, f"{side} {kind}")
        shapes.append(context_entry(f"opensim_{kind}_{side}", "opensim-gait2392" if kind != "patella" else
                                    "opensim-leg6dof9musc", kind, side, source, metres_to_mm(v, t), landmarks))
    return shapes


def write_context(shapes: list[Shape], out: Path) -> dict:
    entries, arrays = [], {}
    for shape in shapes:
        entries.append({
            "name": shape.name, "subject": shape.subject, "kind": shape.kind, "side": shape.side, "extent": "",
            "held_out": False, "licence": shape.source["licence"], "source": dict(shape.source),
            "watertight": shape.meta["processing"]["watertight"], "n_vertices": int(len(shape.vertices_q)),
            "n_triangles": int(len(shape.triangles)), "landmarks": shape.meta["landmarks"],
            "processing": shape.meta["processing"], "side_evidence": {}})
        arrays[f"{shape.name}__vertices"] = shape.vertices_q
        arrays[f"{shape.name}__origin"] = shape.origin
        arrays[f"{shape.name}__triangles"] = shape.triangles
    meta = {
        "format": CONTEXT_FORMAT, "vertex_scale_mm": VERTEX_SCALE_MM,
        "layout": "as anatomy_shapes.npz",
        "frames": "each shape keeps its source frame (mm): the gias3 sacrum the CT frame of the stored "
                  "gias3_2007_5028 hemipelves (it sits between them); OpenSim shapes their OpenSim body frame "
                  "(y superior, x anterior, z right; vertebrae: torso, tibia/fibula: tibia_r or tibia_l, patella: "
                  "patella_r), not placed relative to each other or to any other stored shape",
        "split": {"rule": "context bones are never labelled: every shape is training (held_out false)"},
        "shapes": entries,
    }
    arrays["metadata"] = np.array(json.dumps(meta, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "anatomy_context.npz", **arrays)
    return meta


def verify_context(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from FemurSegLib import anatomy  # noqa: PLC0415
    print(f"\n{'name':30s} {'kind':9s} {'side':7s} {'tris':>5s} {'extent x y z (mm)':>22s} {'watertight':>10s} "
          f"key sizes")
    for kind in anatomy.CONTEXT_KINDS:
        for shape in anatomy.load_shapes(kind):
            boundary, non_manifold = vtk_edge_counts(anatomy.to_polydata(shape.vertices, shape.triangles))
            marks = shape.landmarks
            extra = {k: marks[k] for k in ("body_width_mm", "body_height_mm", "length_mm") if k in marks}
            extent = " ".join(f"{e:6.1f}" for e in marks["extent_mm"])
            watertight = boundary == 0 and non_manifold == 0
            print(f"{shape.name:30s} {shape.kind:9s} {shape.side:7s} {len(shape.triangles):5d} {extent:>22s} "
                  f"{str(watertight):>10s} {extra}")
            if not watertight:
                raise SystemExit(f"{shape.name}: {boundary} boundary and {non_manifold} non-manifold edges")
    sacrum = anatomy.load_shapes("sacrum")[0]
    left, right = anatomy.load_shapes("hemipelvis")[:2]
    centroid = np.array(sacrum.landmarks["centroid"])
    print(f"sacrum centroid x {centroid[0]:.1f} mm between hemipelvis centroids x {right.vertices[:, 0].mean():.1f}"
          f" (right) and {left.vertices[:, 0].mean():.1f} (left)")


# --- verification -----------------------------------------------------------------------------------------------

def verify(out: Path) -> None:
    """Load through FemurSegLib.anatomy, check every surface, voxelise two and print the tables for the README."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from FemurSegLib import anatomy  # noqa: PLC0415

    vtk = _vtk()
    shapes = [s for s in anatomy.load_shapes() if s.kind in ("femur", "hemipelvis")]
    print(f"\n{'name':34s} {'subject':17s} {'side':5s} {'extent':8s} {'tris':>6s} {'R head/acet':>11s} "
          f"{'rms':>5s} {'length':>6s} {'watertight':>10s} {'held_out':>8s}")
    for shape in shapes:
        polydata = anatomy.to_polydata(shape.vertices, shape.triangles)
        boundary, non_manifold = vtk_edge_counts(polydata)
        marks = shape.landmarks
        radius = marks.get("head_radius", marks.get("acetabulum_radius"))
        rms = marks.get("head_fit_rms_mm", marks.get("acetabulum_fit_rms_mm"))
        watertight = boundary == 0 and non_manifold == 0
        length = f"{marks['length_mm']:6.0f}" if "length_mm" in marks else "     -"
        print(f"{shape.name:34s} {shape.subject:17s} {shape.side:5s} {shape.extent or '-':8s} "
              f"{len(shape.triangles):6d} {radius:11.2f} {rms:5.2f} {length} "
              f"{str(watertight):>10s} {str(shape.held_out):>8s}")
        if not watertight:
            raise SystemExit(f"{shape.name}: {boundary} boundary and {non_manifold} non-manifold edges")
        if shape.kind == "femur" and not 19.0 <= radius <= 28.0:
            raise SystemExit(f"{shape.name}: head radius {radius} outside 19-28 mm")
    print("\nvoxelisation at 1 mm (vtkPolyDataToImageStencil) against vtkMassProperties:")
    for name in ("libhip_m3_left", "gias2_2007_5028_left", "gias3_2007_5028_hemipelvis_left"):
        shape = next(s for s in shapes if s.name == name)
        polydata = anatomy.to_polydata(shape.vertices, shape.triangles)
        mass = vtk.vtkMassProperties()
        mass.SetInputData(polydata)
        mass.Update()
        voxels = voxel_count(polydata, 1.0)
        print(f"  {name:34s} surface {mass.GetVolume() / 1000:8.2f} cm3  voxels {voxels / 1000:8.2f} cm3  "
              f"difference {100 * (voxels - mass.GetVolume()) / mass.GetVolume():+.2f} %")
    model = anatomy.load_femur_shape_model()
    mean_marks, _ = femur_landmarks(model.mean, model.triangles, np.array([0.0, 0.0, 1.0]), "left")
    sample = model.sample(np.r_[2.0, -1.0, np.zeros(len(model.variances) - 2)])
    print(f"\nshape model: {model.mean.shape[0]} nodes, {len(model.variances)} modes, "
          f"{len(model.subjects)} subjects; "
          f"mean head radius {mean_marks['head_radius']} mm (rms {mean_marks['head_fit_rms_mm']}), "
          f"length {mean_marks['length_mm']} mm; +2/-1 SD sample moves nodes by up to "
          f"{np.linalg.norm(sample - model.mean, axis=1).max():.1f} mm")


def voxel_count(polydata, spacing: float) -> int:
    vtk = _vtk()
    from vtk.util.numpy_support import vtk_to_numpy  # noqa: PLC0415
    bounds = np.array(polydata.GetBounds()).reshape(3, 2)
    origin = np.floor(bounds[:, 0]) - 2 * spacing
    size = (np.ceil((bounds[:, 1] - origin) / spacing) + 3).astype(int)
    image = vtk.vtkImageData()
    image.SetOrigin(*origin)
    image.SetSpacing(spacing, spacing, spacing)
    image.SetDimensions(*size)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(1)
    stencil_source = vtk.vtkPolyDataToImageStencil()
    stencil_source.SetInputData(polydata)
    stencil_source.SetOutputOrigin(*origin)
    stencil_source.SetOutputSpacing(spacing, spacing, spacing)
    stencil_source.SetOutputWholeExtent(0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1)
    stencil = vtk.vtkImageStencil()
    stencil.SetInputData(image)
    stencil.SetStencilConnection(stencil_source.GetOutputPort())
    stencil.ReverseStencilOff()
    stencil.SetBackgroundValue(0)
    stencil.Update()
    return int(vtk_to_numpy(stencil.GetOutput().GetPointData().GetScalars()).sum()) * int(spacing ** 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libhip", type=Path, help="clone or bare mirror of diku-dk/libhip")
    parser.add_argument("--gias2", type=Path, help="juzhang/gias2-shape-modelling-tutorial")
    parser.add_argument("--gias3", type=Path, required=True, help="musculoskeletal/gias3.examples")
    parser.add_argument("--opensim", type=Path, help="opensim-org/opensim-models (for anatomy_context.npz)")
    parser.add_argument("--context-only", action="store_true",
                        help="write only anatomy_context.npz (needs --gias3 and --opensim)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--no-verify", action="store_true", help="skip loading back and voxelising")
    args = parser.parse_args(argv)
    if args.opensim is not None:
        print("context bones (sacrum, vertebrae, tibiae, fibulae, patella):")
        write_context(context_shapes(args.gias3, args.opensim), args.out)
        print(f"wrote {args.out / 'anatomy_context.npz'} "
              f"({(args.out / 'anatomy_context.npz').stat().st_size / 1024:.0f} KiB)")
        if not args.no_verify:
            verify_context(args.out)
    if args.context_only:
        if args.opensim is None:
            parser.error("--context-only needs --opensim")
        return
    if args.libhip is None or args.gias2 is None:
        parser.error("--libhip and --gias2 are needed (or --context-only with --opensim)")
    print("gias2 femurs:")
    gias2 = gias2_femurs(args.gias2)
    print("libhip femurs:")
    libhip = libhip_shapes(args.libhip)
    print("landmarks (whole gias2 femurs first: their axes are carried onto the short libhip femurs):")
    for shape in gias2:
        add_femur_landmarks(shape, [])
    references = [make_reference(s) for s in gias2 if s.subject not in HELD_OUT]
    for shape in gias2 + libhip:
        add_femur_landmarks(shape, references)
    print("gias3 hemipelves:")
    pelves = gias3_hemipelves(args.gias3, gias2)
    shapes = libhip + gias2 + pelves
    model, _ = shape_model(args.gias3)
    write_outputs(shapes, model, args.out)
    for name in ("anatomy_shapes.npz", "femur_shape_model.npz"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.0f} KiB)")
    if not args.no_verify:
        verify(args.out)


if __name__ == "__main__":
    main()
