"""The one phantom generator: CT + exact femur label for a family of scans, deterministic per seed.

Families (``FAMILIES``):

- ``legacy``: the SDF-built ex-vivo phantom of phantom.py (shaft along image x, 1 mm, water), kept as one option.
- ``exvivo``: a real femur surface (Resources/Anatomy) cut 120-220 mm below the head top, the distal end potted,
  calibration rods beside it, in air or water, 0.5-1.5 mm voxels, the shaft along any image axis or direction,
  field of view from tight to 3x the specimen. ``scan`` renders the same specimen on a scanner's fixed grid
  instead (the fine-tuning benchmark's new site).
- ``invivo``: a clinical hip CT: both femurs of one subject (or a mirrored pair) in their acetabula (joint space
  1.5-4 mm), both hip bones (the one hemipelvis mirrored for the other side, scaled to the heads), soft tissue
  with fat, muscle, skin, bowel gas and the table; 0.6-1 mm in-plane, 0.6-3 mm slices, shaft along z; field of
  view from one hip to the whole pelvis.

Why domain randomisation: bundled model v3 learned its phantoms' layout (shaft along x, water, one femur) and
labelled air on real shapes. Here every intensity (cortex, trabecular bone, marrow, background, potting, noise,
blur, texture), every pose and every field of view is drawn anew, so what stays constant is bone itself.
Shape variety: real surfaces of training subjects, scaled anisotropically; held-out subjects only when
``held_out=True`` (benchmarks), never in training. Labels are exact: voxel centre inside the periosteal surface
(and above the saw cut).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .anatomy import AnatomyShape, load_femur_shape_model, load_shapes, to_polydata
from .phantom import generate_phantom
from .render import Grid, Voxelised, blur, bone_hu, smooth_noise, voxelise

FAMILIES = ("legacy", "exvivo", "invivo")
MAX_VOXELS = 24_000_000  # keeps one case within ~1 GiB while rendering and nnU-Net preprocessing
_FAMILY_SEED = {"legacy": 0, "exvivo": 1, "invivo": 2}


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


def generate_case(family: str, seed: int, held_out: bool = False,
                  scan: tuple[float, float] | None = None) -> tuple[sitk.Image, sitk.Image, CaseInfo]:
    """(CT int16 HU, uint8 femur label, CaseInfo) for ``family`` and ``seed``; the same inputs give the same case.

    ``scan`` (ex-vivo only): a scanner's (in-plane, slice) spacing in mm, the slices across the specimen's shaft,
    instead of the drawn grid; the same specimen, pose and look as without it, rendered on that grid, so the label
    stays exact there (the field of view is narrowed if the grid would exceed MAX_VOXELS)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")
    if family == "legacy":
        ct, label, shape = generate_phantom(seed)
        info = CaseInfo("legacy", seed, ("phantom",), (shape.side,), ct.GetSpacing(), ct.GetSize())
        return ct, label, info
    rng = np.random.default_rng(np.random.SeedSequence([20261124, _FAMILY_SEED[family], int(held_out), int(seed)]))
    femurs = load_shapes("femur", held_out=held_out)
    if not femurs:
        raise ValueError(f"no {'held-out' if held_out else 'training'} femur shapes in Resources/Anatomy")
    if family == "exvivo":
        return _render_exvivo(rng, seed, femurs, held_out, scan)
    if scan is not None:
        raise ValueError("a scan profile applies to the ex-vivo family only")
    return _render_invivo(rng, seed, femurs, held_out)


# --- femur geometry -------------------------------------------------------------------------------------------

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


def _vary(shape: AnatomyShape, rng: np.random.Generator) -> AnatomyShape:
    """Training shapes: 70 % are deformed along the shape model's first six modes; held-out shapes stay real."""
    if shape.held_out or rng.random() >= 0.7:
        return shape
    return warp_by_shape_model(shape, np.clip(rng.standard_normal(6), -2.5, 2.5))


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation by up to ``max_degrees`` about a random axis (Rodrigues)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _axis_pose(rng: np.random.Generator) -> np.ndarray:
    """A random signed axis permutation with det +1: the shaft along any image axis, either way up."""
    permutation = np.eye(3)[rng.permutation(3)]
    signs = rng.choice([-1.0, 1.0], size=3)
    pose = permutation * signs[:, None]
    if np.linalg.det(pose) < 0:
        pose[0] *= -1
    return pose


@dataclass
class _Intensities:
    cortex_hu: float
    trabecular_hu: float
    marrow_hu: float
    noise_hu: float
    blur_mm: float
    texture_mm: float


def _draw_intensities(rng: np.random.Generator, in_vivo: bool) -> _Intensities:
    return _Intensities(
        cortex_hu=float(rng.uniform(800, 1600) if in_vivo else rng.uniform(900, 1900)),
        trabecular_hu=float(rng.uniform(80, 350)),
        marrow_hu=float(rng.uniform(-110, 40)),
        noise_hu=float(rng.uniform(8, 45) if in_vivo else rng.uniform(5, 40)),
        blur_mm=float(rng.uniform(0.45, 1.1)),
        texture_mm=float(rng.uniform(0.6, 1.5)),
    )


def _paint_femur(hu: np.ndarray, grid: Grid, voxels: Voxelised, femur: PlacedFemur, to_physical: np.ndarray,
                 translation: np.ndarray, look: _Intensities, rng: np.random.Generator,
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
    cortex_mm = rng.uniform(0.7, 2.0) * (1 - to_shaft) + rng.uniform(2.5, 6.0) * to_shaft
    texture = smooth_noise(rng, inside.shape, look.texture_mm / grid.spacing[::-1])
    marrow_weight = np.clip((femur.lesser_trochanter - 30.0 - z) / 30.0, 0.0, 1.0)
    trabecular = np.clip(look.trabecular_hu + 90.0 * texture, 20.0, 650.0)
    interior = trabecular * (1 - marrow_weight) + (look.marrow_hu + 15.0 * texture) * marrow_weight
    voxel_mm = float(np.mean(grid.spacing))
    hu[region] = bone_hu(sdf, cortex_mm, look.cortex_hu, interior, hu[region], voxel_mm)
    return inside


def _finish(hu: np.ndarray, grid: Grid, look: _Intensities, rng: np.random.Generator) -> sitk.Image:
    spacing_zyx = grid.spacing[::-1]
    hu = blur(hu, look.blur_mm, spacing_zyx)
    hu += look.noise_hu * smooth_noise(rng, hu.shape, 0.6)
    return grid.image(np.clip(np.round(hu), -1024, 3071).astype(np.int16))


def _grid_around(low: np.ndarray, high: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> Grid:
    """Smallest grid with ``direction`` covering the box [low, high] (given in the grid's own axes, mm)."""
    size = np.maximum(np.ceil((high - low) / spacing).astype(int) + 1, 8)
    origin = direction @ low
    return Grid(origin=origin, spacing=spacing, direction=direction, size=tuple(int(v) for v in size))


def _corners(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The 8 corners of the box [low, high]."""
    return np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])


def _fit_field_of_view(tight_low: np.ndarray, tight_high: np.ndarray, low: np.ndarray, high: np.ndarray,
                       pose: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box [low, high] drawn towards the specimen's own box until its grid (rotated by ``pose``) holds at most
    MAX_VOXELS at ``spacing``: a fixed scan grid narrows the field of view instead of coarsening the voxels."""
    for share in np.linspace(1.0, 0.0, 11):
        box_low, box_high = tight_low + share * (low - tight_low), tight_high + share * (high - tight_high)
        corners = _corners(box_low, box_high) @ pose.T
        if np.prod((corners.max(0) - corners.min(0)) / spacing) <= MAX_VOXELS:
            break
    return box_low, box_high


def _fit_voxels(extent: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Coarsen ``spacing`` uniformly until the grid holds at most MAX_VOXELS."""
    voxels = float(np.prod(extent / spacing))
    return spacing * max(1.0, (voxels / MAX_VOXELS) ** (1 / 3))


# --- ex-vivo ----------------------------------------------------------------------------------------------------

def _render_exvivo(rng: np.random.Generator, seed: int, femurs: list[AnatomyShape], held_out: bool,
                   scan: tuple[float, float] | None):
    shape = _vary(femurs[rng.integers(len(femurs))], rng)
    scale = rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, size=3)
    femur = place_femur(shape, mirror=bool(rng.random() < 0.5), scale=scale, rotation=specimen_rotation(shape))
    cut_length = float(rng.uniform(120, 220))
    cut_z = max(femur.head_top - cut_length, float(femur.vertices[:, 2].min()) + 2.0)
    kept = femur.vertices[femur.vertices[:, 2] >= cut_z - 1.0]
    shaft_radius = float(np.percentile(np.hypot(*(kept[kept[:, 2] < cut_z + 30.0][:, :2]
                                                   - kept[kept[:, 2] < cut_z + 30.0][:, :2].mean(0)).T), 90))
    shaft_centre = kept[kept[:, 2] < cut_z + 30.0][:, :2].mean(axis=0)

    # Canonical box of everything: femur above the cut, pot, rods.
    potted = rng.random() < 0.85
    pot_height = float(rng.uniform(18, 40))
    pot_radius = shaft_radius + float(rng.uniform(6, 14))
    rods = rng.random() < 0.75
    rod_offset = float(rng.uniform(15, 40))
    low = np.array([kept[:, 0].min(), kept[:, 1].min(), cut_z - (8.0 if potted else 2.0)])
    high = np.array([kept[:, 0].max(), kept[:, 1].max(), femur.head_top])
    rod_y = high[1] + rod_offset if rng.random() < 0.5 else low[1] - rod_offset
    if rods:
        low[1], high[1] = min(low[1], rod_y - 8), max(high[1], rod_y + 8)
    extent = high - low
    fov = float(rng.uniform(1.0, 3.0)) if rng.random() < 0.7 else 1.0 + float(rng.uniform(0.02, 0.25))
    centre = (low + high) / 2 + (fov - 1) * extent * rng.uniform(-0.4, 0.4, size=3)
    box_low, box_high = centre - fov * extent / 2 - 3.0, centre + fov * extent / 2 + 3.0

    # Pose: shaft along any image axis, either way up, tilted up to 25 deg (or anything, 20 % of cases).
    pose = _random_rotation(rng, 180.0) if rng.random() < 0.2 else _axis_pose(rng) @ _random_rotation(rng, 25.0)
    in_plane = float(rng.uniform(0.5, 1.0))
    spacing = np.array([in_plane, in_plane, float(rng.uniform(0.5, 1.5))])
    if scan is not None:  # the slice axis is the image axis closest to the shaft
        spacing = np.full(3, float(scan[0]))
        spacing[int(np.argmax(np.abs(pose[:, 2])))] = float(scan[1])
        box_low, box_high = _fit_field_of_view(low - 3.0, high + 3.0, box_low, box_high, pose, spacing)
    # The image grid is axis-aligned in its own frame; the specimen frame is rotated into it by ``pose``.
    corners = _corners(box_low, box_high) @ pose.T
    spacing = _fit_voxels(corners.max(0) - corners.min(0), spacing)
    grid = _grid_around(corners.min(0), corners.max(0), spacing, np.eye(3))
    grid = Grid(origin=grid.origin + rng.uniform(-150, 150, size=3).round(1), spacing=grid.spacing,
                direction=grid.direction, size=grid.size)
    shift = grid.origin - corners.min(0)  # physical = pose @ canonical + shift

    look = _draw_intensities(rng, in_vivo=False)
    water = rng.random() < 0.5
    background_hu = float(rng.uniform(-15, 25)) if water else float(rng.uniform(-1010, -960))
    hu = np.full(grid.shape, background_hu, dtype=np.float32)
    canonical = _canonical_coordinates(grid, pose, shift)
    if rods:
        rod_hus = rng.permutation([0.0, 100.0, 200.0, 400.0, 800.0, 1200.0])[: int(rng.integers(3, 6))]
        block = (np.abs(canonical[1] - rod_y) < 8.0) & (canonical[2] > low[2]) & (canonical[2] < high[2] - 20)
        hu[block] = float(rng.uniform(20, 120))
        xs = np.linspace(low[0] + 5, high[0] - 5, len(rod_hus))
        for rod_hu, rod_x in zip(rod_hus, xs):
            rod = block & (np.hypot(canonical[0] - rod_x, canonical[1] - rod_y) < float(rng.uniform(3.5, 6.0)))
            hu[rod] = rod_hu + float(rng.uniform(-30, 30))
    if potted:
        radial = np.hypot(canonical[0] - shaft_centre[0], canonical[1] - shaft_centre[1])
        pot = (radial < pot_radius) & (canonical[2] > cut_z - 8.0) & (canonical[2] < cut_z + pot_height)
        hu[pot] = float(rng.uniform(40, 450)) + 25.0 * smooth_noise(rng, hu.shape, 1.0)[pot]
    del canonical

    physical_vertices = femur.vertices @ pose.T + shift
    voxels = voxelise(grid, physical_vertices, femur.triangles)
    label = np.zeros(grid.shape, dtype=np.uint8)
    inside = _paint_femur(hu, grid, voxels, femur, pose, shift, look, rng, cut_z=cut_z)
    label[voxels.region] = inside
    ct = _finish(hu, grid, look, rng)
    info = CaseInfo("exvivo", seed, (femur.subject,), (femur.side,), tuple(grid.spacing), grid.size,
                    {"water": water, "potted": potted, "rods": rods, "fov": fov, "cut_mm": cut_length,
                     "pose": pose.round(3).tolist()})
    return ct, grid.image(label), info


def _canonical_coordinates(grid: Grid, pose: np.ndarray, shift: np.ndarray) -> list[np.ndarray]:
    """Canonical x, y, z of every voxel centre (three float32 arrays, (z, y, x))."""
    full = tuple(slice(0, n) for n in grid.shape)
    return [grid.coordinate_along(full, shift, pose @ unit) for unit in np.eye(3)]


# --- in-vivo ----------------------------------------------------------------------------------------------------

def _render_invivo(rng: np.random.Generator, seed: int, femurs: list[AnatomyShape], held_out: bool):
    hemipelves = {shape.side: shape for shape in load_shapes("hemipelvis")}  # one training subject's pelvis
    by_subject: dict[str, dict[str, AnatomyShape]] = {}
    for shape in femurs:
        by_subject.setdefault(shape.subject, {})[shape.side] = shape
    subject = sorted(by_subject)[rng.integers(len(by_subject))]
    pair = by_subject[subject]
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3)
    placed = {}
    for side in ("left", "right"):
        source = _vary(pair.get(side) or pair["left" if side == "right" else "right"], rng)
        placed[side] = place_femur(source, mirror=side not in pair, scale=scale, rotation=np.eye(3))

    look = _draw_intensities(rng, in_vivo=True)
    joint_space = float(rng.uniform(1.5, 4.0))
    pelvis, hips = _place_pelvis(hemipelves, np.mean([f.head_radius for f in placed.values()]) + joint_space)
    half_width = float(hips["left"][0] - hips["right"][0]) / 2
    # Patient frame (LPS, x = 0 midway between the hips): each femur sits in its acetabulum, turned a little.
    hip_rotation = {side: _random_rotation(rng, 10.0) for side in hips}

    # Field of view: one hip to the whole pelvis, from above the acetabulum to below the lesser trochanter.
    if rng.random() < 0.6:
        x_low, x_high = -half_width - float(rng.uniform(80, 130)), half_width + float(rng.uniform(80, 130))
    else:
        hip_x = float(hips["left" if rng.random() < 0.5 else "right"][0])
        x_low, x_high = hip_x - float(rng.uniform(70, 130)), hip_x + float(rng.uniform(70, 130))
    z_high = float(rng.uniform(35, 160))
    z_low = -float(rng.uniform(90, 200))
    body_a, body_b = half_width + float(rng.uniform(70, 140)), float(rng.uniform(95, 150))
    body_y = float(rng.uniform(-10, 30))  # body centre, posterior of the hips
    y_low, y_high = body_y - body_b - 10.0, body_y + body_b + 40.0
    in_plane = float(rng.uniform(0.6, 1.0))
    slice_mm = float(rng.choice([rng.uniform(0.6, 1.25), rng.uniform(1.25, 3.0)]))
    low, high = np.array([x_low, y_low, z_low]), np.array([x_high, y_high, z_high])
    spacing = _fit_voxels(high - low, np.array([in_plane, in_plane, slice_mm]))
    grid = _grid_around(low, high, spacing, np.eye(3))
    shift = rng.uniform(-200, 200, size=3).round(1)
    grid = Grid(origin=grid.origin + shift, spacing=grid.spacing, direction=grid.direction, size=grid.size)

    full = tuple(slice(0, n) for n in grid.shape)
    x, y, z = (grid.coordinate_along(full, shift, unit) for unit in np.eye(3))
    hu = _soft_tissue(rng, x, y, z, half_width, body_a, body_b, body_y, placed)
    del x, y, z

    for side in ("left", "right"):
        voxels = voxelise(grid, pelvis[side] + shift, hemipelves[side].triangles)
        if voxels is None:
            continue
        region = voxels.region
        texture = smooth_noise(rng, voxels.inside.shape, look.texture_mm / grid.spacing[::-1])
        interior = np.clip(look.trabecular_hu * rng.uniform(0.7, 1.1) + 80.0 * texture, 20.0, 600.0)
        hu[region] = bone_hu(voxels.sdf, float(rng.uniform(0.8, 2.0)), look.cortex_hu * rng.uniform(0.8, 1.0),
                             interior, hu[region], float(np.mean(grid.spacing)))

    label = np.zeros(grid.shape, dtype=np.uint8)
    sides = []
    for side in ("left", "right"):
        femur = placed[side]
        rotation = hip_rotation[side]
        translation = hips[side] + shift
        voxels = voxelise(grid, femur.vertices @ rotation.T + translation, femur.triangles)
        if voxels is None or not voxels.inside.any():
            continue
        inside = _paint_femur(hu, grid, voxels, femur, rotation, translation, look, rng)
        label[voxels.region] |= inside
        sides.append(side)
    ct = _finish(hu, grid, look, rng)
    info = CaseInfo("invivo", seed, (subject,), tuple(sides), tuple(grid.spacing), grid.size,
                    {"joint_space_mm": joint_space, "hips_lps": {s: (h + shift).tolist() for s, h in hips.items()}})
    return ct, grid.image(label), info


def _place_pelvis(hemipelves: dict[str, AnatomyShape],
                  acetabulum_radius: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Both hemipelves in the patient frame (their source's, origin midway between the acetabula), scaled so that
    their cups have ``acetabulum_radius``; also the hip centres."""
    centres = {side: np.asarray(shape.landmarks["acetabulum_centre"], dtype=float) for side, shape in hemipelves.items()}
    middle = (centres["left"] + centres["right"]) / 2
    scale = acetabulum_radius / float(np.mean([shape.landmarks["acetabulum_radius"] for shape in hemipelves.values()]))
    pelvis = {side: (shape.vertices - middle) * scale for side, shape in hemipelves.items()}
    hips = {side: (centre - middle) * scale for side, centre in centres.items()}
    return pelvis, hips


def _soft_tissue(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray, half_width: float,
                 body_a: float, body_b: float, body_y: float, femurs: dict[str, PlacedFemur]) -> np.ndarray:
    """Air, table, skin, subcutaneous fat, muscle with fat streaks and bowel gas, in HU (patient frame)."""
    hu = np.full(x.shape, float(rng.uniform(-1010, -980)), dtype=np.float32)
    # Pelvis level: one ellipse; below the hips it narrows into two thighs around the femoral shafts.
    thigh_radius = float(rng.uniform(70, 110))
    split_z = -float(rng.uniform(30, 80))
    trunk = ((x / body_a) ** 2 + ((y - body_y) / body_b) ** 2)
    thighs = np.minimum(np.hypot(x - half_width, y - body_y * 0.5), np.hypot(x + half_width, y - body_y * 0.5))
    body = np.where(z > split_z, trunk, np.minimum((thighs / thigh_radius) ** 2, trunk + (split_z - z) / 40.0))
    inside = body < 1.0
    fat_depth = float(rng.uniform(0.08, 0.35))
    texture = smooth_noise(rng, x.shape, 2.0)
    fat_hu, muscle_hu = float(rng.uniform(-120, -70)), float(rng.uniform(25, 70))
    tissue = np.where(body > (1 - fat_depth) ** 2, fat_hu, muscle_hu + 12.0 * texture)
    tissue = np.where((texture > 1.6) & (body < (1 - fat_depth) ** 2), fat_hu, tissue)  # fat between muscles
    gas = (smooth_noise(rng, x.shape, 4.0) > 2.3) & (z > 20.0) & (np.abs(x) < half_width - 30.0) & (trunk < 0.6)
    tissue = np.where(gas, -900.0, tissue)
    hu = np.where(inside, tissue, hu)
    hu = np.where(inside & (body > (1 - 0.01) ** 2), float(rng.uniform(10, 60)), hu)  # skin
    table_y = body_y + body_b + float(rng.uniform(2, 15))
    table = (y > table_y) & (y < table_y + float(rng.uniform(5, 15)))
    return np.where(table, float(rng.uniform(-300, 150)), hu).astype(np.float32)
