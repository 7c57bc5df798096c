"""Is a segmented piece shaped like a femur? The femoral head test that decides which pieces are femurs.

Why: on real CTs model v6 labelled vertebrae, the sacrum, the ilium and the tibias as femurs, and the two largest
bright pieces won. Brightness and size do not tell a femur from a vertebra; anatomy does. Every proximal femur has
a head: a sphere of radius 17-30 mm (DESIGN.md §7, §9: 20-27 mm in clinical CT) whose surface the bone follows on
most of its area, the neck leaving it on one side. A vertebral body is a short cylinder (its largest inscribed
ball touches only the endplates), the sacrum and ilium are plates, a tibial plateau is wide and flat, a shaft is a
cylinder: a sphere fits them over at most about half of its surface (measured on the stored real shapes: 0.24-0.52,
femurs 0.80-0.88), and where it does not, they leave it on two opposite sides or all round, not on one.

The test, on a piece's mask (any voxel spacing): candidate centres are the deepest points of the solid piece
(local maxima of its distance map, at least ``MIN_DEPTH_MM`` deep); from each, rays in ``RAY_COUNT`` directions
find where the piece ends; a sphere is fitted (least squares) to those ends that are not the neck, and the
*coverage* is the share of rays, among those not cut by the field of view, that end within a tolerance of that
sphere, and *one-sidedness* the length of the mean direction of the rays that run on clearly beyond it (1: all in
one cone, the neck). Counting only those, not every ray that misses by a voxel, keeps it robust to thick voxels. The best candidate gives the piece's head. Pieces whose head is out of view are not femurs here: FemurSeg
segments the proximal femur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

HEAD_RADIUS_MM = (17.0, 32.0)  # femoral heads 17-30 mm (rendered heads fit at 20.9-24.6 mm)
PROSTHETIC_HEAD_RADIUS_MM = (10.0, 20.0)  # hip replacement heads: 22-36 mm in diameter, metal or ceramic
METAL_HU = 2000.0  # a head whose inside is this bright on average is an implant's
FEMUR_COVERAGE = 0.65  # at or above: a femoral head (rendered real heads: 0.80-0.88; vertebrae, tibiae: <= 0.52)
BORDERLINE_COVERAGE = 0.57  # from here to FEMUR_COVERAGE: labelled, with a warning that says why
ONE_SIDED = 0.7  # rays that run on clearly beyond a head do so on one side, into its neck (femurs 0.89-0.92, also
# at 3-4 mm); a cylinder's (vertebral body, tibia) on opposite sides, a plate's all round (stored real shapes: <= 0.55)
MIN_DEPTH_MM = 10.0  # a candidate centre lies at least this deep inside the piece
MIN_VIEWED = 0.85  # share of rays inside the image: a head mostly in view (a shaft cut by the edge: 0.73-0.78)
RAY_COUNT = 200
MAX_RAY_MM = 60.0
CANDIDATES = 6


@dataclass(frozen=True)
class HeadFit:
    """The best femoral-head fit of a piece: centre (mm, array frame z, y, x), radius, coverage, verdict."""

    centre_mm: tuple[float, float, float] | None
    radius_mm: float
    coverage: float
    viewed: float  # share of rays not cut by the field of view
    prosthetic: bool = False  # the head is an implant's (metal inside): its radius range is PROSTHETIC_HEAD_RADIUS_MM
    one_sided: float = 1.0  # resultant length of the rays that run on beyond the sphere: 1 = all on one side (neck)

    @property
    def is_femur(self) -> bool:
        return self._plausible() and self.coverage >= FEMUR_COVERAGE

    @property
    def is_borderline(self) -> bool:
        return self._plausible() and BORDERLINE_COVERAGE <= self.coverage < FEMUR_COVERAGE

    def _plausible(self) -> bool:
        low, high = PROSTHETIC_HEAD_RADIUS_MM if self.prosthetic else HEAD_RADIUS_MM
        return (self.centre_mm is not None and low <= self.radius_mm <= high and self.viewed >= MIN_VIEWED
                and self.one_sided >= ONE_SIDED)

    def describe(self) -> str:
        """Why the piece is, or is not, a femur, in words for the warnings."""
        if self.centre_mm is None:
            return "no part of it is thick enough to hold a femoral head"
        if self.viewed < MIN_VIEWED:
            return "its head, if it has one, is cut by the edge of the image"
        shape = (f"the best sphere (radius {self.radius_mm:.0f} mm) matches {100 * self.coverage:.0f} % of its "
                 f"surface around it")
        if self.one_sided < ONE_SIDED:
            return f"no femoral head: {shape}, but not on one side as a femoral neck leaves a head"
        if not self._plausible():
            return (f"no femoral head: {shape}, and " + ("prosthetic heads measure 11-18 mm" if self.prosthetic
                                                         else "femoral heads measure 17-30 mm"))
        if self.coverage < FEMUR_COVERAGE:
            return f"no clear femoral head: {shape} (a femoral head: over {100 * FEMUR_COVERAGE:.0f} %)"
        kind = "prosthetic femoral head" if self.prosthetic else "femoral head"
        return f"{kind} of radius {self.radius_mm:.0f} mm ({100 * self.coverage:.0f} % of its sphere)"


def fit_femoral_head(mask: np.ndarray, spacing_zyx: np.ndarray | tuple[float, ...],
                     ct: np.ndarray | None = None) -> HeadFit:
    """The best femoral-head fit of the piece ``mask`` (bool, z y x) on a grid of ``spacing_zyx`` mm; with the
    CT (HU, same grid) a head that is metal inside is judged as a hip replacement's."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes:
        return HeadFit(None, 0.0, 0.0, 0.0)
    box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(boxes[0], mask.shape))
    offset = np.array([b.start for b in box], dtype=float)
    solid = ndimage.binary_fill_holes(mask[box])
    # what lies on the image border was cut by the field of view: rays that leave the image there are not judged
    touches = _border_touches(box, mask.shape)
    depth = ndimage.distance_transform_edt(solid, sampling=spacing)
    window = np.maximum(3, np.round(12.0 / spacing).astype(int))
    peaks = (depth == ndimage.maximum_filter(depth, size=window)) & (depth >= MIN_DEPTH_MM)
    found = np.argwhere(peaks)
    if not len(found):
        return HeadFit(None, 0.0, 0.0, 0.0)
    order = np.argsort(depth[tuple(found.T)])[::-1]
    chosen: list[np.ndarray] = []
    for index in found[order]:
        point = index * spacing
        if all(np.linalg.norm(point - other) > 15.0 for other in chosen):
            chosen.append(point)
        if len(chosen) == CANDIDATES:
            break
    directions = _directions(RAY_COUNT)
    best = HeadFit(None, 0.0, 0.0, 0.0)
    for centre in chosen:
        fit = _fit_at(solid, spacing, centre, directions, touches)
        if fit is not None and ct is not None and fit.centre_mm is not None:
            fit = _with_metal(fit, ct[box], spacing)
        if fit is not None and _rank(fit) > _rank(best):
            best = fit
    if best.centre_mm is None:
        return best
    centre = tuple(float(c + o * s) for c, o, s in zip(best.centre_mm, offset, spacing))
    return HeadFit(centre, best.radius_mm, best.coverage, best.viewed, best.prosthetic, best.one_sided)


def _rank(fit: HeadFit) -> float:
    return fit.coverage + (1.0 if fit._plausible() else 0.0) if fit.centre_mm is not None else -1.0


def _with_metal(fit: HeadFit, ct: np.ndarray, spacing: np.ndarray) -> HeadFit:
    """``fit`` marked prosthetic when the inner half of its sphere is metal on average."""
    centre = np.asarray(fit.centre_mm) / spacing
    radius = 0.5 * fit.radius_mm / spacing
    low = np.maximum(np.floor(centre - radius).astype(int), 0)
    high = np.minimum(np.ceil(centre + radius).astype(int) + 1, ct.shape)
    if np.any(high <= low):
        return fit
    inner = ct[tuple(slice(a, b) for a, b in zip(low, high))]
    metal = float(inner.mean()) >= METAL_HU
    return HeadFit(fit.centre_mm, fit.radius_mm, fit.coverage, fit.viewed, metal, fit.one_sided)


def _border_touches(box: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[bool, bool]]:
    """Per axis, whether the box reaches the image's low and high edges."""
    return [(b.start == 0, b.stop == n) for b, n in zip(box, shape)]


def _directions(count: int) -> np.ndarray:
    """``count`` unit vectors spread evenly over the sphere (Fibonacci lattice), in (z, y, x)."""
    i = np.arange(count) + 0.5
    polar = np.arccos(1 - 2 * i / count)
    azimuth = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)], axis=1)


def _ray_ends(solid: np.ndarray, spacing: np.ndarray, centre: np.ndarray,
              directions: np.ndarray, touches: list[tuple[bool, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) from ``centre`` to where each ray leaves the piece, and whether the ray left through the
    field of view's edge (then its end says nothing about the shape)."""
    step = 0.5 * float(spacing.min())
    distances = np.arange(step, MAX_RAY_MM, step)
    points = centre[None, None, :] + distances[None, :, None] * directions[:, None, :]
    index = np.round(points / spacing).astype(int)
    shape = np.array(solid.shape)
    outside_box = np.any((index < 0) | (index >= shape), axis=2)
    clipped = np.clip(index, 0, shape - 1)
    inside = solid[clipped[..., 0], clipped[..., 1], clipped[..., 2]] & ~outside_box
    leaves = np.argmax(~inside, axis=1)
    never = inside.all(axis=1)
    ends = np.where(never, MAX_RAY_MM, distances[leaves])
    exit_index = clipped[np.arange(len(directions)), leaves]
    cut = np.zeros(len(directions), dtype=bool)
    for axis, (low, high) in enumerate(touches):
        if low:
            cut |= exit_index[:, axis] <= 0
        if high:
            cut |= exit_index[:, axis] >= shape[axis] - 1
    cut |= outside_box[np.arange(len(directions)), leaves] & ~never
    return ends, cut


def _fit_at(solid: np.ndarray, spacing: np.ndarray, centre: np.ndarray, directions: np.ndarray,
            touches: list[tuple[bool, bool]]) -> HeadFit | None:
    ends, cut = _ray_ends(solid, spacing, centre, directions, touches)
    judged = ~cut
    if judged.mean() < MIN_VIEWED:
        return HeadFit(tuple(centre), 0.0, 0.0, float(judged.mean()))
    # the head's surface: not the neck (rays that run on far), refitted twice without the worst rays
    use = judged & (ends < 1.5 * np.median(ends[judged]))
    for _ in range(3):
        if use.sum() < 12:
            return None
        points = centre + ends[use, None] * directions[use]
        sphere_centre, radius = _sphere(points)
        ends, cut = _ray_ends(solid, spacing, sphere_centre, directions, touches)
        judged = ~cut
        tolerance = max(2.0, 0.6 * float(spacing.max()))
        near = np.abs(ends - radius) <= tolerance
        centre = sphere_centre
        use = judged & (np.abs(ends - radius) <= 2 * tolerance)
    viewed = float(judged.mean())
    coverage = float((near & judged).sum() / max(1, judged.sum()))
    runs_on = judged & (ends > radius + 2 * tolerance)  # clearly beyond the sphere: where the bone goes on
    one_sided = float(np.linalg.norm(directions[runs_on].mean(axis=0))) if runs_on.any() else 1.0
    return HeadFit(tuple(float(c) for c in centre), float(radius), coverage, viewed, one_sided=one_sided)


def _sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through ``points`` (N, 3): |p|^2 = 2 c.p + (r^2 - |c|^2), linear in c and that term."""
    a = np.hstack([2 * points, np.ones((len(points), 1))])
    b = (points ** 2).sum(axis=1)
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = solution[:3]
    return centre, float(np.sqrt(max(solution[3] + centre @ centre, 0.0)))
