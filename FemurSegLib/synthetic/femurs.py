"""What every real-shape family shares: a femur surface placed, varied by the shape model and painted in HU, and
the grids they are rendered on. Why one module: ex-vivo, in-vivo and whole-body cases must paint bone the same way,
so that a network cannot tell the family by how its femur looks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..anatomy import AnatomyShape, load_femur_shape_model, to_polydata
from .render import Grid, Voxelised, blur, bone_hu, smooth_noise

MAX_VOXELS = 24_000_000  # keeps one case within ~1 GiB while rendering and nnU-Net preprocessing


@dataclass(frozen=True)
class CaseInfo:
    """What was drawn for a case: for reports, benchmarks (side per femur) and tests."""

    family: str
    seed: int
    subjects: tuple[str, ...]
    sides: tuple[str, ...]  # sides of the labelled femurs, in label order (all femurs are label 1)
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PlacedFemur:
    """A femur surface with its head centre at 0, in the source's patient frame (in-vivo: LPS, superior +z) or
    in the specimen frame (ex-vivo: shaft axis +z); ``axis`` is its shaft axis, distal to proximal."""

    vertices: np.ndarray
    triangles: np.ndarray
    side: str
    subject: str
    axis: np.ndarray
    head_radius: float
    head_top: float  # along ``axis``, of the most proximal point
    lesser_trochanter: float  # along ``axis``


def specimen_rotation(shape: AnatomyShape) -> np.ndarray:
    """Rows: the specimen frame's axes in ``shape``'s frame; the shaft axis becomes +z (where the saw cuts)."""
    axis = np.asarray(shape.landmarks["shaft_axis"], dtype=float)
    axis /= np.linalg.norm(axis)
    helper = np.eye(3)[int(np.argmin(np.abs(axis)))]
    x_axis = np.cross(helper, axis)
    x_axis /= np.linalg.norm(x_axis)
    return np.stack([x_axis, np.cross(axis, x_axis), axis])


def place_femur(shape: AnatomyShape, mirror: bool, scale: np.ndarray, rotation: np.ndarray) -> PlacedFemur:
    """``shape`` turned by ``rotation`` about its head centre, mirrored (x -> -x: the other side) and scaled."""
    marks = shape.landmarks
    centre = np.asarray(marks["head_centre"], dtype=float)
    flip = np.array([-1.0, 1.0, 1.0]) if mirror else np.ones(3)
    vertices = (shape.vertices - centre) @ rotation.T * flip * scale
    axis = rotation @ np.asarray(marks["shaft_axis"], dtype=float) * flip * scale
    axis /= np.linalg.norm(axis)
    lesser = marks.get("lesser_trochanter")
    lesser_along = (float((rotation @ (np.asarray(lesser) - centre)) * flip * scale @ axis) if lesser is not None
                    else -55.0 * float(np.mean(scale)))
    side = {"left": "right", "right": "left"}[shape.side] if mirror else shape.side
    return PlacedFemur(vertices=vertices, triangles=shape.triangles, side=side, subject=shape.subject, axis=axis,
                       head_radius=float(marks["head_radius"]) * float(np.mean(scale)),
                       head_top=float(np.max(vertices @ axis)), lesser_trochanter=lesser_along)


def femur_pair(rng: np.random.Generator, femurs: list[AnatomyShape],
               whole: bool = False) -> tuple[dict[str, PlacedFemur], str]:
    """Both femurs of one subject in its patient frame (a missing side mirrored), varied and scaled alike, and the
    subject; ``whole``: whole femurs only (a field of view that reaches the knees)."""
    by_subject: dict[str, dict[str, AnatomyShape]] = {}
    for shape in femurs:
        if not whole or shape.extent == "whole":
            by_subject.setdefault(shape.subject, {})[shape.side] = shape
    subject = sorted(by_subject)[rng.integers(len(by_subject))]
    pair = by_subject[subject]
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3)
    placed = {}
    for side in ("left", "right"):
        source = vary(pair.get(side) or pair["left" if side == "right" else "right"], rng)
        placed[side] = place_femur(source, mirror=side not in pair, scale=scale, rotation=np.eye(3))
    return placed, subject


def warp_by_shape_model(shape: AnatomyShape, coefficients: np.ndarray) -> AnatomyShape:
    """``shape`` deformed by the femur shape model (GIAS3 LLP26): the model's mean is fitted to the shape (ICP,
    similarity), and a thin-plate spline carries every vertex and landmark from the fitted mean to the fitted mean
    plus ``coefficients`` (standard deviations) of the modes. So a real surface gains the population's variation
    (neck length and angle, head size, shaft bow) while keeping its own detail."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkIterativeClosestPointTransform, vtkPolyData
    from vtkmodules.vtkCommonTransforms import vtkThinPlateSplineTransform

    model = load_femur_shape_model()
    flip = np.array([-1.0, 1.0, 1.0]) if shape.side == "right" else np.ones(3)  # the model is a left femur
    mean, target = model.mean * flip, model.sample(coefficients) * flip
    # Only the part of the model that the (often proximal-only) surface also has: from its head down its length.
    keep = mean[:, 2] >= mean[:, 2].max() - float(shape.landmarks.get("length_mm", 500.0))
    top = np.asarray(shape.landmarks["head_top"], dtype=float)
    offset = top - mean[keep][np.argmax(mean[keep][:, 2])]

    def points(array: np.ndarray):
        vtk_points = vtkPoints()
        vtk_points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(array, dtype=np.float64), deep=True))
        return vtk_points

    source = vtkPolyData()
    source.SetPoints(points(mean[keep] + offset))
    icp = vtkIterativeClosestPointTransform()
    icp.SetSource(source)
    icp.SetTarget(to_polydata(shape.vertices, shape.triangles))
    icp.GetLandmarkTransform().SetModeToSimilarity()
    icp.SetMaximumNumberOfIterations(60)
    icp.StartByMatchingCentroidsOff()
    icp.Update()
    fitted = np.array([icp.TransformPoint(*p) for p in mean[keep] + offset])
    moved = np.array([icp.TransformPoint(*p) for p in target[keep] + offset])
    spline = vtkThinPlateSplineTransform()
    spline.SetSourceLandmarks(points(fitted))
    spline.SetTargetLandmarks(points(moved))
    spline.SetBasisToR()

    def warp(array: np.ndarray) -> np.ndarray:
        out = vtkPoints()
        spline.TransformPoints(points(np.atleast_2d(array)), out)
        return numpy_support.vtk_to_numpy(out.GetData()).astype(np.float64).reshape(np.shape(array))

    marks = dict(shape.landmarks)
    centre = np.asarray(marks["head_centre"], dtype=float)
    on_head = np.abs(np.linalg.norm(shape.vertices - centre, axis=1) - float(marks["head_radius"])) < 1.0
    for key in ("head_centre", "shaft_point", "head_top", "lesser_trochanter"):
        if key in marks:
            marks[key] = warp(np.asarray(marks[key], dtype=float)).tolist()
    axis_end = warp(np.asarray(shape.landmarks["shaft_point"]) + 50.0 * np.asarray(shape.landmarks["shaft_axis"]))
    axis = axis_end - np.asarray(marks["shaft_point"])
    marks["shaft_axis"] = (axis / np.linalg.norm(axis)).tolist()
    vertices = warp(shape.vertices)
    if on_head.sum() >= 20:
        marks["head_radius"] = float(np.median(np.linalg.norm(vertices[on_head] - marks["head_centre"], axis=1)))
    return AnatomyShape(name=f"{shape.name} (shape model)", subject=shape.subject, source=shape.source,
                        licence=shape.licence, kind=shape.kind, side=shape.side, extent=shape.extent,
                        held_out=shape.held_out, vertices=vertices, triangles=shape.triangles, landmarks=marks)


def vary(shape: AnatomyShape, rng: np.random.Generator) -> AnatomyShape:
    """Training shapes: 70 % are deformed along the shape model's first six modes; held-out shapes stay real."""
    if shape.held_out or rng.random() >= 0.7:
        return shape
    return warp_by_shape_model(shape, np.clip(rng.standard_normal(6), -2.5, 2.5))


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation by up to ``max_degrees`` about a random axis (Rodrigues)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def axis_pose(rng: np.random.Generator) -> np.ndarray:
    """A random signed axis permutation with det +1: the shaft along any image axis, either way up."""
    permutation = np.eye(3)[rng.permutation(3)]
    signs = rng.choice([-1.0, 1.0], size=3)
    pose = permutation * signs[:, None]
    if np.linalg.det(pose) < 0:
        pose[0] *= -1
    return pose


@dataclass
class Intensities:
    cortex_hu: float
    trabecular_hu: float
    marrow_hu: float
    noise_hu: float
    blur_mm: float
    texture_mm: float
    cortex_scale: float = 1.0  # below 1: the thin cortex of osteoporotic bone


def draw_intensities(rng: np.random.Generator, in_vivo: bool) -> Intensities:
    return Intensities(
        cortex_hu=float(rng.uniform(800, 1600) if in_vivo else rng.uniform(900, 1900)),
        trabecular_hu=float(rng.uniform(80, 350)),
        marrow_hu=float(rng.uniform(-110, 40)),
        noise_hu=float(rng.uniform(8, 45) if in_vivo else rng.uniform(5, 40)),
        blur_mm=float(rng.uniform(0.45, 1.1)),
        texture_mm=float(rng.uniform(0.6, 1.5)),
    )


def paint_femur(hu: np.ndarray, grid: Grid, voxels: Voxelised, femur: PlacedFemur, to_physical: np.ndarray,
                 translation: np.ndarray, look: Intensities, rng: np.random.Generator,
                 cut_z: float | None = None) -> np.ndarray:
    """Paint one femur into ``hu`` (in place); return its exact label in the region (centre inside and above cut)."""
    region = voxels.region
    z = grid.coordinate_along(region, translation, to_physical @ femur.axis)  # along the shaft, head centre 0
    inside = voxels.inside.copy()
    sdf = voxels.sdf
    if cut_z is not None:
        inside &= z >= cut_z
        sdf = np.maximum(sdf, (cut_z - z).astype(np.float32))
    to_shaft = np.clip((femur.lesser_trochanter - 25.0 - z) / 45.0, 0.0, 1.0)  # 0 at the neck, 1 in the shaft
    cortex_mm = (rng.uniform(0.7, 2.0) * (1 - to_shaft) + rng.uniform(2.5, 6.0) * to_shaft) * look.cortex_scale
    texture = smooth_noise(rng, inside.shape, look.texture_mm / grid.spacing[::-1])
    marrow_weight = np.clip((femur.lesser_trochanter - 30.0 - z) / 30.0, 0.0, 1.0)
    trabecular = np.clip(look.trabecular_hu + 90.0 * texture, 20.0, 650.0)
    interior = trabecular * (1 - marrow_weight) + (look.marrow_hu + 15.0 * texture) * marrow_weight
    voxel_mm = float(np.mean(grid.spacing))
    hu[region] = bone_hu(sdf, cortex_mm, look.cortex_hu, interior, hu[region], voxel_mm)
    return inside


def finish(hu: np.ndarray, grid: Grid, look: Intensities, rng: np.random.Generator) -> sitk.Image:
    spacing_zyx = grid.spacing[::-1]
    hu = blur(hu, look.blur_mm, spacing_zyx)
    hu += look.noise_hu * smooth_noise(rng, hu.shape, 0.6)
    return grid.image(np.clip(np.round(hu), -1024, 3071).astype(np.int16))


def grid_around(low: np.ndarray, high: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> Grid:
    """Smallest grid with ``direction`` covering the box [low, high] (given in the grid's own axes, mm)."""
    size = np.maximum(np.ceil((high - low) / spacing).astype(int) + 1, 8)
    origin = direction @ low
    return Grid(origin=origin, spacing=spacing, direction=direction, size=tuple(int(v) for v in size))


def box_corners(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The 8 corners of the box [low, high]."""
    return np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])


def fit_field_of_view(tight_low: np.ndarray, tight_high: np.ndarray, low: np.ndarray, high: np.ndarray,
                       pose: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box [low, high] drawn towards the specimen's own box until its grid (rotated by ``pose``) holds at most
    MAX_VOXELS at ``spacing``: a fixed scan grid narrows the field of view instead of coarsening the voxels."""
    for share in np.linspace(1.0, 0.0, 11):
        box_low, box_high = tight_low + share * (low - tight_low), tight_high + share * (high - tight_high)
        corners = box_corners(box_low, box_high) @ pose.T
        if np.prod((corners.max(0) - corners.min(0)) / spacing) <= MAX_VOXELS:
            break
    return box_low, box_high


def fit_voxels(extent: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Coarsen ``spacing`` uniformly until the grid holds at most MAX_VOXELS."""
    voxels = float(np.prod(extent / spacing))
    return spacing * max(1.0, (voxels / MAX_VOXELS) ** (1 / 3))
