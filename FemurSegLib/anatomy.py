"""Real femur and hemipelvis surfaces (public CT-derived data) for phantoms that look like real anatomy.

Resources/Anatomy holds compact, watertight, decimated surfaces made once by ``convert_sources.py`` from LibHip
(MIT) and the GIAS2/GIAS3 examples (MPL-2.0); README.md there lists sources, commits, licences and the subject
split. Shapes keep their source frame in mm (LibHip: LPS scanner frame; GIAS: CT frame with superior +z), so the
two femurs of a LibHip subject, and the GIAS femur with its hemipelves, stay placed as they were scanned.

Held-out subjects (``held_out=True``) exist for benchmarks: never train on them. Everything here is numpy only
(``np.load`` with ``allow_pickle=False``); VTK is imported only by :func:`to_polydata`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vtkmodules.vtkCommonDataModel import vtkPolyData

ANATOMY_DIR: Path = Path(__file__).resolve().parent.parent / "Resources" / "Anatomy"
SHAPES_FILE = "anatomy_shapes.npz"
SHAPE_MODEL_FILE = "femur_shape_model.npz"
CONTEXT_FILE = "anatomy_context.npz"  # context bones: never labelled, all training
CONTEXT_KINDS = ("sacrum", "vertebra", "tibia", "fibula", "patella")
KINDS = ("femur", "hemipelvis", *CONTEXT_KINDS)


@dataclass(frozen=True)
class AnatomyShape:
    """One closed, outward-oriented triangle surface with its provenance and landmarks (mm, the shape's frame).

    Femur landmarks: ``head_centre``, ``head_radius`` (least-squares sphere), ``shaft_axis`` (unit, distal to
    proximal: the proximal shaft, 75-160 mm below the head centre; estimated by registration on short specimens),
    ``shaft_point`` (on the axis), ``head_top``, ``distal_end`` (on the axis, level of the most distal point),
    ``length_mm``, ``head_offset_mm``, usually ``lesser_trochanter``, and ``midshaft_axis`` on whole femurs.
    Hemipelvis: ``acetabulum_centre``, ``acetabulum_radius``. Context bones (``CONTEXT_KINDS``, from
    ``anatomy_context.npz``; side "midline" for sacrum and vertebrae) all have ``centroid``, ``bbox_min``,
    ``bbox_max``, ``extent_mm``; vertebrae also ``level``, ``body_centre``, ``body_width_mm``, ``body_height_mm``,
    ``body_depth_mm``; tibiae ``plateau_centre``, ``shaft_axis`` (distal to proximal), ``shaft_point``,
    ``distal_end``, ``length_mm``; fibulae ``head_centre``, ``proximal_end``, ``shaft_axis``, ``shaft_point``,
    ``length_mm``. Arrays are read-only: loaded shapes are shared.
    """

    name: str
    subject: str
    source: str
    licence: str
    kind: str  # one of KINDS
    side: str  # "left" | "right" (the patient's side) | "midline" (sacrum, vertebrae)
    extent: str  # "proximal" | "whole" ("" for a hemipelvis)
    held_out: bool
    vertices: np.ndarray  # (N, 3) float64, mm
    triangles: np.ndarray  # (M, 3) int64
    landmarks: dict[str, list[float] | float] = field(default_factory=dict)


@dataclass(frozen=True)
class FemurShapeModel:
    """The GIAS3 LLP26 left-femur PCA (26 subjects; gias3.examples, MPL-2.0): correspondent nodes, so any
    coefficient vector gives a plausible left femur. ``modes[k]`` is the node displacement (mm) for +1 standard
    deviation of mode k; ``variances`` (mm^2) are kept for reference. ``triangles`` closes the node grid into a
    piecewise-linear surface (the source model is quartic Lagrange, so facets deviate from it by up to ~0.5 mm)."""

    mean: np.ndarray  # (634, 3) float64, mm
    modes: np.ndarray  # (k, 634, 3) float64, mm per standard deviation
    variances: np.ndarray  # (k,) float64, mm^2
    subjects: tuple[str, ...]
    triangles: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))  # (M, 3) int64

    def sample(self, coefficients: np.ndarray) -> np.ndarray:
        """Nodes (634, 3) in mm for ``coefficients`` in standard deviations (fewer than k: the rest are 0)."""
        c = np.asarray(coefficients, dtype=np.float64).ravel()
        if len(c) > len(self.modes):
            raise ValueError(f"at most {len(self.modes)} coefficients, got {len(c)}")
        return self.mean + np.tensordot(c, self.modes[: len(c)], axes=1)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@lru_cache(maxsize=1)
def _all_shapes() -> tuple[AnatomyShape, ...]:
    return _read_shapes(SHAPES_FILE) + _read_shapes(CONTEXT_FILE)


def _read_shapes(filename: str) -> tuple[AnatomyShape, ...]:
    path = ANATOMY_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: Resources/Anatomy ships with FemurSeg")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["metadata"]))
        scale = float(meta["vertex_scale_mm"])
        shapes = []
        for entry in meta["shapes"]:
            name = entry["name"]
            origin = data[f"{name}__origin"].astype(np.float64)
            vertices = origin + data[f"{name}__vertices"].astype(np.float64) * scale
            source = entry["source"]
            shapes.append(AnatomyShape(
                name=name, subject=entry["subject"], source=f"{source['repo']} {source['path']} @ {source['commit']}",
                licence=entry["licence"], kind=entry["kind"], side=entry["side"], extent=entry["extent"],
                held_out=bool(entry["held_out"]), vertices=_read_only(vertices),
                triangles=_read_only(data[f"{name}__triangles"].astype(np.int64)), landmarks=entry["landmarks"]))
    return tuple(shapes)


def load_shapes(kind: str | None = None, held_out: bool | None = None) -> list[AnatomyShape]:
    """The stored shapes in file order (hemipelves: left first; vertebrae: L5 up to L1, then T12), filtered by
    ``kind`` and ``held_out`` (None: all, context bones included).

    Loaded once per process; the returned list is new, its shapes are shared and read-only."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or None")
    return [s for s in _all_shapes()
            if (kind is None or s.kind == kind) and (held_out is None or s.held_out == held_out)]


def to_polydata(vertices: np.ndarray, triangles: np.ndarray) -> vtkPolyData:
    """A vtkPolyData triangle surface (for voxelisation, Slicer models or file export); imports VTK lazily so the
    rest of FemurSegLib works without it."""
    from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray  # noqa: PLC0415
    from vtkmodules.vtkCommonCore import vtkPoints  # noqa: PLC0415
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData  # noqa: PLC0415

    points = np.ascontiguousarray(vertices, dtype=np.float64).reshape(-1, 3)
    cells = np.ascontiguousarray(triangles, dtype=np.int64).reshape(-1, 3)
    if len(cells) and (cells.min() < 0 or cells.max() >= len(points)):
        raise ValueError("triangle index out of range")
    vtk_points = vtkPoints()
    vtk_points.SetData(numpy_to_vtk(points, deep=True))
    polys = vtkCellArray()
    polys.SetData(numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(cells) + 1, 3, dtype=np.int64), deep=True),
                  numpy_to_vtkIdTypeArray(cells.ravel(), deep=True))
    polydata = vtkPolyData()
    polydata.SetPoints(vtk_points)
    polydata.SetPolys(polys)
    return polydata


@lru_cache(maxsize=1)
def load_femur_shape_model() -> FemurShapeModel:
    """The LLP26 left-femur shape model (cached; arrays read-only). Its samples count as training data."""
    path = ANATOMY_DIR / SHAPE_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: Resources/Anatomy ships with FemurSeg")
    with np.load(path, allow_pickle=False) as data:
        return FemurShapeModel(
            mean=_read_only(data["mean"].astype(np.float64)), modes=_read_only(data["modes"].astype(np.float64)),
            variances=_read_only(data["variances"].astype(np.float64)),
            subjects=tuple(str(s) for s in data["subjects"]),
            triangles=_read_only(data["triangles"].astype(np.int64)))
