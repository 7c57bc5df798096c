"""Synthetic ex-vivo proximal femur QCT phantoms with exact periosteal labels.

No labelled femur CT can be downloaded here, so FemurSeg trains and tests on phantoms that are hard where
real ex-vivo QCT (Dall'Ara 2013, as used by Lang 2024) is hard:

- a thin cortex (0.6-1.2 mm) at the head and neck that partial volume and blur smear below cortical HU;
- low-density, textured trabecular bone and a fatty medullary canal inside the periosteal surface;
- polyurethane potting around the distal cut and calibration rods at bone-like HU that are *not* femur;
- concave "C" regions (neck waist between head and greater trochanter, trochanteric fossa) that fool fill.

The femur is built from signed distance functions (head sphere, waisted elliptical neck at a neck-shaft angle
with anteversion, flaring shaft, greater and lesser trochanter, fossa carved out) joined by a smooth minimum,
so the label ``sdf <= 0`` is exact at every voxel centre. Everything is drawn from ``numpy.random`` seeded by
``seed``: the same seed always gives the same volume. Geometry: 1 mm isotropic; image x runs along the shaft,
y antero-posterior, z medio-lateral, matching the seed's sizes (about 150-200 x 70-95 x 95-135 voxels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


@dataclass(frozen=True)
class FemurShape:
    """The drawn parameters of one phantom, kept for reports and tests (lengths in mm, angles in degrees)."""

    side: str
    shaft_length: float
    shaft_radius: float
    head_radius: float
    neck_length: float
    neck_radius: float
    neck_shaft_angle: float
    anteversion: float
    cortex_shaft: float
    cortex_head: float
    cortex_hu: float
    trabecular_hu: float
    marrow_hu: float
    potting_hu: float
    background_hu: float
    noise_hu: float
    blur_mm: float


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _smooth_subtract(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """SDF of ``a`` with ``b`` carved out (smooth edge of width ``k``)."""
    return -_smooth_min(-a, b, k)


def _ellipsoid(p: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate SDF of an axis-aligned ellipsoid (exact on the surface, good near it)."""
    q = (p - centre) / radii
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / radii, axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _segment_param(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    return np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)


def _draw_shape(rng: np.random.Generator, side: str) -> FemurShape:
    scale = rng.uniform(0.88, 1.12)
    return FemurShape(
        side=side,
        shaft_length=float(rng.uniform(105, 140)),
        shaft_radius=float(scale * rng.uniform(12.5, 15.0)),
        head_radius=float(scale * rng.uniform(20.5, 24.5)),
        neck_length=float(scale * rng.uniform(46, 56)),
        neck_radius=float(scale * rng.uniform(13.0, 15.5)),
        neck_shaft_angle=float(rng.uniform(120, 140)),
        anteversion=float(rng.uniform(5, 25)),
        cortex_shaft=float(rng.uniform(3.0, 6.0)),
        cortex_head=float(rng.uniform(0.6, 1.2)),
        cortex_hu=float(rng.uniform(1200, 1800)),
        trabecular_hu=float(rng.uniform(100, 350)),
        marrow_hu=float(rng.uniform(-60, 30)),
        potting_hu=float(rng.uniform(120, 300)),
        background_hu=float(rng.uniform(-20, 20)),  # specimens are scanned in water
        noise_hu=float(rng.uniform(15, 40)),
        blur_mm=float(rng.uniform(0.5, 0.8)),
    )


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Femur:
    """Signed distance and cortical thickness of one femur in its local frame (s: shaft, a: anterior, m: medial)."""

    def __init__(self, shape: FemurShape, rng: np.random.Generator) -> None:
        self.shape = shape
        s = shape
        self.neck_base = np.array([s.shaft_length - 18.0, 0.0, 0.0])
        tilt = np.deg2rad(180.0 - s.neck_shaft_angle)
        ante = np.deg2rad(s.anteversion)
        direction = np.array([np.cos(tilt), np.sin(tilt) * np.sin(ante), np.sin(tilt) * np.cos(ante)])
        self.neck_direction = direction
        self.head_centre = self.neck_base + direction * s.neck_length
        self.trochanter_centre = np.array(
            [s.shaft_length - 4.0 + rng.uniform(-3, 3), -4.0 + rng.uniform(-2, 2), -s.shaft_radius * 0.75]
        )
        self.trochanter_radii = np.array([rng.uniform(19, 24), rng.uniform(15, 19), rng.uniform(11, 14)])
        self.fossa_centre = self.trochanter_centre + np.array(
            [rng.uniform(6, 10), -rng.uniform(8, 11), rng.uniform(9, 12)]
        )
        self.fossa_radius = float(rng.uniform(7, 9.5))
        self.lesser_centre = np.array(
            [s.shaft_length - 50.0 + rng.uniform(-4, 4), -s.shaft_radius * 0.75, s.shaft_radius * 0.7]
        )
        self.lesser_radii = np.array([rng.uniform(9, 12), rng.uniform(6, 8), rng.uniform(6, 8)])

    def shaft_radius_at(self, along: np.ndarray) -> np.ndarray:
        s = self.shape
        flare = np.clip((along - (s.shaft_length - 55.0)) / 40.0, 0.0, 1.0)
        return s.shaft_radius * (1.0 + 0.45 * flare * flare * (3 - 2 * flare))

    def sdf(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance to the periosteal surface (negative inside) and the neck-axis parameter t in [0, 1]."""
        s = self.shape
        along, ant, med = p[..., 0], p[..., 1], p[..., 2]
        radius = self.shaft_radius_at(along)
        shaft = np.hypot(ant / 0.9, med) - radius
        shaft = _smooth_subtract(shaft, (s.shaft_length - 12.0) - along, 4.0)
        shaft = np.maximum(shaft, -along)  # the distal saw cut
        head = np.linalg.norm(p - self.head_centre, axis=-1) - s.head_radius

        t = _segment_param(p, self.neck_base, self.head_centre)
        axis_point = self.neck_base + t[..., None] * (self.head_centre - self.neck_base)
        offset = p - axis_point
        # Elliptical neck: narrower antero-posteriorly; waist in the middle (the concavity fill over-fills).
        up = np.cross(self.neck_direction, np.array([0.0, 1.0, 0.0]))
        up /= np.linalg.norm(up)
        side = np.cross(self.neck_direction, up)
        distance = np.sqrt((offset @ up) ** 2 + ((offset @ side) / 0.8) ** 2 + (offset @ self.neck_direction) ** 2)
        neck_radius = s.neck_radius * (0.82 + 0.55 * (2 * t - 1) ** 2) + 2.0 * (1 - t)
        neck = distance - neck_radius

        trochanter = _ellipsoid(p, self.trochanter_centre, self.trochanter_radii)
        trochanter = _smooth_subtract(
            trochanter, np.linalg.norm(p - self.fossa_centre, axis=-1) - self.fossa_radius, 2.0
        )
        lesser = _ellipsoid(p, self.lesser_centre, self.lesser_radii)

        bone = _smooth_min(shaft, neck, 6.0)
        bone = _smooth_min(bone, head, 3.0)
        bone = _smooth_min(bone, trochanter, 5.0)
        bone = _smooth_min(bone, lesser, 4.0)
        bone = np.maximum(bone, -along)
        return bone, np.where(head < neck, 1.0, t)

    def cortex_thickness(self, p: np.ndarray, neck_t: np.ndarray) -> np.ndarray:
        s = self.shape
        along = p[..., 0]
        to_proximal = np.clip((along - (s.shaft_length - 75.0)) / 45.0, 0.0, 1.0)
        shaft_part = s.cortex_shaft * (1 - to_proximal) + 1.4 * to_proximal
        in_neck = np.clip((neck_t - 0.15) / 0.35, 0.0, 1.0)
        return shaft_part * (1 - in_neck) + s.cortex_head * in_neck


def generate_phantom(seed: int, side: str | None = None) -> tuple[sitk.Image, sitk.Image, FemurShape]:
    """Return (CT in int16 HU, uint8 periosteal label, drawn shape) for ``seed``; deterministic per seed."""
    rng = np.random.default_rng(np.random.SeedSequence([20261123, int(seed)]))
    drawn_side = "left" if rng.random() < 0.5 else "right"
    side = side or drawn_side
    if side not in ("left", "right"):
        raise ValueError("side must be 'left' or 'right'")
    shape = _draw_shape(rng, side)
    femur = _Femur(shape, rng)

    margin_distal = 14.0
    pot_height = float(rng.uniform(22, 35))
    pot_radius = shape.shaft_radius + float(rng.uniform(7, 11))
    rod_gap = float(rng.uniform(6, 12))

    # Extent of the field of view in the local frame: distal pot base to the top of head/trochanter.
    top = max(femur.head_centre[0] + shape.head_radius, femur.trochanter_centre[0] + femur.trochanter_radii[0])
    medial = femur.head_centre[2] + shape.head_radius
    lateral = femur.trochanter_centre[2] - femur.trochanter_radii[2]
    anterior = max(femur.head_centre[1] + shape.head_radius, shape.shaft_radius * 1.45, pot_radius)
    posterior = min(femur.head_centre[1] - shape.head_radius, -shape.shaft_radius * 1.45, -pot_radius)
    rod_row = posterior - rod_gap - 6.0
    low = np.array([-margin_distal, rod_row - 9.0, lateral - 6.0])
    high = np.array([top + 6.0, anterior + 6.0, medial + 6.0])
    size = np.ceil(high - low).astype(int)

    rotation = _rotation(rng, 4.0)
    centre = (low + high) / 2
    # Voxel centres (image x = along, y = anterior, z = medial) -> local frame through a small rotation.
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in size), indexing="ij"), axis=-1)
    local = (grid + low - centre) @ rotation.T.astype(np.float32) + centre

    bone_sdf, neck_t = femur.sdf(local)
    thickness = femur.cortex_thickness(local, neck_t)

    # Partial-volume fractions from the signed distance (1 mm voxels).
    inside_bone = np.clip(0.5 - bone_sdf, 0.0, 1.0)
    inside_endosteum = np.clip(0.5 - (bone_sdf + thickness), 0.0, 1.0)

    texture = ndimage.gaussian_filter(rng.standard_normal(size).astype(np.float32), 1.1)
    texture /= texture.std() + 1e-6
    along = local[..., 0]
    marrow_weight = np.clip((shape.shaft_length - 70.0 - along) / 25.0, 0.0, 1.0)
    trabecular = np.clip(shape.trabecular_hu + 90.0 * texture + 60.0 * (1 - marrow_weight), 60.0, 520.0)
    interior = trabecular * (1 - marrow_weight) + (shape.marrow_hu + 15.0 * texture) * marrow_weight
    cortex = shape.cortex_hu + 60.0 * texture

    radial = np.hypot(local[..., 1] / 0.95, local[..., 2])
    pot = ((radial < pot_radius) & (along < pot_height) & (along > -margin_distal + 3.0)).astype(np.float32)
    pot = ndimage.gaussian_filter(pot, 0.7)
    slab = ((local[..., 1] < rod_row + 8.0) & (local[..., 1] > rod_row - 8.0)).astype(np.float32)
    rods = np.zeros(size, dtype=np.float32)
    rod_hus = rng.permutation([0.0, 100.0, 400.0, 800.0, 1200.0])
    span = high[2] - low[2] - 24.0
    for index, rod_hu in enumerate(rod_hus):
        rod_m = low[2] + 12.0 + span * index / (len(rod_hus) - 1)
        rod = np.hypot(local[..., 1] - rod_row, local[..., 2] - rod_m) < 5.0
        rods[rod] = rod_hu + 40.0
    slab_hu = 40.0

    background = np.full(size, shape.background_hu, dtype=np.float32)
    background = background * (1 - pot) + shape.potting_hu * pot
    background = np.where(slab > 0, np.where(rods != 0, rods, slab_hu), background)
    hu = background * (1 - inside_bone) + cortex * (inside_bone - inside_endosteum) + interior * inside_endosteum
    hu = ndimage.gaussian_filter(hu, shape.blur_mm)
    noise = ndimage.gaussian_filter(rng.standard_normal(size).astype(np.float32), 0.5)
    hu += noise * (shape.noise_hu / (noise.std() + 1e-6))

    label = bone_sdf <= 0.0
    if side == "right":  # mirror medio-lateral: medial points to -z for a right femur
        hu, label = hu[:, :, ::-1], label[:, :, ::-1]

    # numpy (x, y, z) -> SimpleITK array order (z, y, x)
    ct = sitk.GetImageFromArray(np.round(hu).astype(np.int16).transpose(2, 1, 0).copy())
    mask = sitk.GetImageFromArray(label.astype(np.uint8).transpose(2, 1, 0).copy())
    origin = tuple(float(v) for v in np.round(rng.uniform(-120, -60, size=3), 1))
    for image in (ct, mask):
        image.SetSpacing((1.0, 1.0, 1.0))
        image.SetOrigin(origin)
    shape = FemurShape(**{**asdict(shape), "side": side})
    return ct, mask, shape
