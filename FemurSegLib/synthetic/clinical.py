"""The clinical CT family: what real pelvis, abdomen and leg CTs hold around the femurs, and CTs without a femur.

Why: model v6 had seen only femurs and hip bones, so on real CT it called every large bright thing a femur (a
vertebra, the sacrum, the tibias) and reported two femurs in CTs that hold none. Here the body runs from the lower
chest to the feet and the field of view is drawn anywhere in it (``FIELDS_OF_VIEW``): hip CTs, abdomen-pelvis CTs
ending anywhere from the femoral heads down, run-off CTs to the knees and feet, the lumbar spine or upper abdomen
alone and the lower legs alone (empty labels), one hip. Around the femurs (real surfaces, Resources/Anatomy):
both hip bones, the sacrum, the lumbar vertebrae and lower ribs, tibia, fibula and patella when the knee is in view;
liver, spleen, kidneys, bladder, bowel with gas and with oral contrast as bright as bone, the aorta and the iliac
and femoral arteries (with or without contrast, with calcified plaques), arms beside the body, the table. Scans:
0.5-5 mm slices, osteoporotic bone in some cases, a metal hip implant with its streaks on one side, beam-hardening
cupping and correlated noise. The label is every femur voxel in view; a femur is in view only with its head (the
fields of view are drawn so), as FemurSeg segments the proximal femur.

Frame: LPS millimetres, x = 0 midway between the hip centres, z = 0 at their height (superior +z).
"""

from __future__ import annotations

import numpy as np

from ..anatomy import AnatomyShape, load_shapes
from . import CLINICAL_VIEWS
from .femurs import (CaseInfo, PlacedFemur, draw_intensities, femur_pair, fit_voxels, grid_around, paint_femur,
                     random_rotation)
from .invivo import place_pelvis
from .render import Grid, blur, bone_hu, smooth_noise, voxelise

# Kinds of field of view and their shares of the cases (superior-inferior ranges are drawn in _field_of_view).
FIELDS_OF_VIEW = tuple(zip(CLINICAL_VIEWS, (0.2, 0.22, 0.1, 0.13, 0.2, 0.15)))
NO_FEMUR_VIEWS = ("spine", "legs")
# OpenSim geometry (x anterior, y up, z right; Resources/Anatomy) -> LPS (x left, y posterior, z superior).
_OPENSIM_TO_LPS = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def render_clinical(rng: np.random.Generator, seed: int, femurs: list[AnatomyShape], held_out: bool,
                    view: str | None = None):
    """A clinical CT; ``view`` (one of FIELDS_OF_VIEW) fixes the kind of field of view, else it is drawn."""
    drawn = str(rng.choice([name for name, _ in FIELDS_OF_VIEW], p=[share for _, share in FIELDS_OF_VIEW]))
    view = view or drawn
    needs_whole = view in ("runoff", "legs")
    placed, subject = femur_pair(rng, femurs, whole=needs_whole)
    look = draw_intensities(rng, in_vivo=True)
    if rng.random() < 0.25:  # osteoporotic: trabecular 50-150 HU, thin cortex
        look.trabecular_hu, look.cortex_scale = float(rng.uniform(50, 150)), float(rng.uniform(0.45, 0.75))
    joint_space = float(rng.uniform(1.5, 4.0))
    hemipelves = {shape.side: shape for shape in load_shapes("hemipelvis")}
    acetabulum_radius = float(np.mean([f.head_radius for f in placed.values()])) + joint_space
    pelvis, hips = place_pelvis(hemipelves, acetabulum_radius)
    pelvis_scale = acetabulum_radius / float(np.mean([s.landmarks["acetabulum_radius"] for s in hemipelves.values()]))
    middle = (np.asarray(hemipelves["left"].landmarks["acetabulum_centre"])
              + np.asarray(hemipelves["right"].landmarks["acetabulum_centre"])) / 2
    half_width = float(hips["left"][0] - hips["right"][0]) / 2
    hip_rotation = {side: random_rotation(rng, 10.0) for side in hips}
    knees = {side: hips[side] + hip_rotation[side] @ _distal_end(placed[side]) for side in hips}
    knee_z = float(np.mean([k[2] for k in knees.values()]))
    sacrum = _sacrum(middle, pelvis_scale)
    spine_top = float(sacrum[:, 2].max()) if sacrum is not None else 90.0

    z_low, z_high = _field_of_view(rng, view, placed, knee_z, spine_top)
    body_a, body_b = half_width + float(rng.uniform(70, 140)), float(rng.uniform(95, 150))
    body_y = float(rng.uniform(-10, 30))
    if view == "one_hip":
        hip_x = float(hips["left" if rng.random() < 0.5 else "right"][0])
        x_low, x_high = hip_x - float(rng.uniform(70, 130)), hip_x + float(rng.uniform(70, 130))
    else:
        x_low, x_high = -body_a - float(rng.uniform(5, 90)), body_a + float(rng.uniform(5, 90))
    y_low, y_high = body_y - body_b - 10.0, body_y + body_b + 40.0
    in_plane = float(rng.uniform(0.6, 1.0))
    slice_mm = float(rng.choice([rng.uniform(0.5, 1.25), rng.uniform(1.25, 3.0), rng.uniform(3.0, 5.0)]))
    low, high = np.array([x_low, y_low, z_low]), np.array([x_high, y_high, z_high])
    spacing = fit_voxels(high - low, np.array([in_plane, in_plane, slice_mm]))
    grid = grid_around(low, high, spacing, np.eye(3))
    shift = rng.uniform(-200, 200, size=3).round(1)
    grid = Grid(origin=grid.origin + shift, spacing=grid.spacing, direction=grid.direction, size=grid.size)

    body = _Body(rng, grid, shift, half_width, body_a, body_b, body_y, placed, hip_rotation, hips, knee_z)
    hu = body.soft_tissue()
    contents = _paint_organs(rng, hu, body, spine_top)
    contents += _paint_vessels(rng, hu, body, hips, knees)

    def paint_bone(vertices: np.ndarray, triangles: np.ndarray, cortex_mm: float, cortex_hu: float,
                   interior_hu: float) -> bool:
        voxels = voxelise(grid, vertices + shift, triangles)
        if voxels is None or not voxels.inside.any():
            return False
        region = voxels.region
        texture = smooth_noise(rng, voxels.inside.shape, look.texture_mm / grid.spacing[::-1])
        interior = np.clip(interior_hu + 70.0 * texture, 20.0, 650.0)
        hu[region] = bone_hu(voxels.sdf, cortex_mm * look.cortex_scale, cortex_hu, interior, hu[region],
                             float(np.mean(grid.spacing)))
        return True

    def context_cortex() -> tuple[float, float, float]:
        return (float(rng.uniform(0.6, 1.8)), look.cortex_hu * float(rng.uniform(0.55, 1.0)),
                look.trabecular_hu * float(rng.uniform(0.6, 1.2)))

    for side in ("left", "right"):
        if paint_bone(pelvis[side], hemipelves[side].triangles, *context_cortex()):
            contents.append(f"hip bone {side}")
    if sacrum is not None and paint_bone(sacrum, load_shapes("sacrum")[0].triangles, *context_cortex()):
        contents.append("sacrum")
    for name, vertices, triangles in _spine(rng, spine_top):
        if paint_bone(vertices, triangles, *context_cortex()):
            contents.append(name)
    contents += _paint_ribs_and_arms(rng, hu, body, spine_top, look)
    for side in ("left", "right"):
        for name, vertices, triangles in _knee(rng, placed[side], hip_rotation[side], hips[side], side):
            if paint_bone(vertices, triangles, *context_cortex()):
                contents.append(f"{name} {side}")

    implant_side = str(rng.choice(["left", "right"])) if rng.random() < 0.1 else None
    label = np.zeros(grid.shape, dtype=np.uint8)
    sides = []
    metal = np.zeros(grid.shape, dtype=bool)
    for side in ("left", "right"):
        femur = placed[side]
        voxels = voxelise(grid, femur.vertices @ hip_rotation[side].T + hips[side] + shift, femur.triangles)
        if voxels is None or not voxels.inside.any() or not _head_in_view(femur, hips[side], z_low, z_high):
            continue
        inside = paint_femur(hu, grid, voxels, femur, hip_rotation[side], hips[side] + shift, look, rng)
        if side == implant_side:
            inside = _implant(rng, hu, metal, grid, voxels.region, inside, femur, hip_rotation[side],
                              hips[side] + shift, body.muscle_hu)
            contents.append(f"hip implant {side}")
        label[voxels.region] |= inside
        if inside.any():
            sides.append(side)
    ct = _finish(rng, hu, grid, look, slice_mm, metal, body)
    info = CaseInfo("clinical", seed, (subject,), tuple(sides), tuple(grid.spacing), grid.size,
                    {"view": view, "z_mm": [round(z_low, 1), round(z_high, 1)], "contents": contents,
                     "osteoporotic": look.cortex_scale < 1.0,
                     "hips_lps": {s: (h + shift).tolist() for s, h in hips.items()}})
    return ct, grid.image(label), info


# --- anatomy placed in the patient frame -------------------------------------------------------------------------

def _distal_end(femur: PlacedFemur) -> np.ndarray:
    """The femur's most distal point along its shaft axis, relative to its head centre."""
    along = femur.vertices @ femur.axis
    return femur.axis * float(along.min())


def _head_in_view(femur: PlacedFemur, hip: np.ndarray, z_low: float, z_high: float) -> bool:
    return z_low <= float(hip[2]) and float(hip[2]) + femur.head_radius <= z_high + 1.0


def _field_of_view(rng: np.random.Generator, view: str, placed: dict[str, PlacedFemur], knee_z: float,
                   spine_top: float) -> tuple[float, float]:
    """(z_low, z_high) in mm for a kind of view; the femoral heads are either in view or the femurs are not."""
    head_top = max(f.head_radius for f in placed.values()) + 3.0
    shortest = min(float((f.vertices @ f.axis).min()) for f in placed.values())  # proximal-only surfaces end here
    if view in ("hip", "one_hip"):
        z_high = float(rng.uniform(35, 160))
        return max(-float(rng.uniform(80, 220)), shortest + 5.0), z_high
    if view == "abdomen":  # from the lower chest to anywhere between the femoral heads and the lesser trochanters
        z_high = spine_top + float(rng.uniform(150, 330))
        return max(-float(rng.uniform(25, 120)), shortest + 5.0), z_high
    if view == "runoff":
        return max(knee_z - float(rng.uniform(-60, 380)), knee_z - 420.0), float(rng.uniform(40, 250))
    if view == "spine":  # lumbar spine, iliac wings or the upper abdomen: above the femoral heads
        z_low = head_top + float(rng.uniform(10, 220))
        return z_low, z_low + float(rng.uniform(120, 320))
    z_high = knee_z - float(rng.uniform(20, 140))  # the lower legs alone: below the femoral condyles
    return z_high - float(rng.uniform(120, 300)), z_high


def _sacrum(middle: np.ndarray, scale: float) -> np.ndarray | None:
    """The sacrum's vertices in the patient frame (same source frame and scale as the hemipelves), or None."""
    shapes = load_shapes("sacrum")
    return (shapes[0].vertices - middle) * scale if shapes else None


def _spine(rng: np.random.Generator, spine_top: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Lumbar vertebrae L5 -> L1 stacked on the sacrum with discs and a lordosis, then thoracic levels made from
    L1 smaller (T12 -> T10): (name, vertices, triangles) in the patient frame."""
    vertebrae = {str(s.landmarks.get("level", s.name)): s for s in load_shapes("vertebra")}
    lumbar = [vertebrae[level] for level in ("L5", "L4", "L3", "L2", "L1") if level in vertebrae]
    if not lumbar:
        return []
    stack = lumbar + [lumbar[-1]] * 3
    names = [f"vertebra {s.landmarks.get('level', s.name)}" for s in lumbar] + ["vertebra T12", "vertebra T11",
                                                                               "vertebra T10"]
    size = float(rng.uniform(0.88, 1.15))
    lordosis = float(rng.uniform(0.0, 22.0))
    spine_y = float(rng.uniform(-5, 15))
    z = spine_top + float(rng.uniform(6, 11))
    placed = []
    for index, (shape, name) in enumerate(zip(stack, names)):
        scale = size * (1.0 - 0.05 * max(0, index - 4))
        centre = np.asarray(shape.landmarks.get("body_centre", shape.vertices.mean(0)), dtype=float)
        height = float(shape.landmarks.get("body_height_mm", 27.0)) * scale
        rotation = random_rotation(rng, 4.0) @ _OPENSIM_TO_LPS
        vertices = (shape.vertices - centre) @ rotation.T * scale
        if index < 5:  # lumbar: the lordosis; thoracic: leaning back
            offset_y = spine_y - lordosis * np.sin(np.pi * (index + 0.5) / 5.0)
        else:
            offset_y = spine_y + 4.0 * (index - 4)
        placed.append((name, vertices + np.array([0.0, offset_y, z + height / 2]), shape.triangles))
        z += height + float(rng.uniform(6, 11)) * scale
    return placed


def _knee(rng: np.random.Generator, femur: PlacedFemur, rotation: np.ndarray, hip: np.ndarray,
          side: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Tibia, fibula and patella under a femur (in the OpenSim frame, mirrored for the left leg), aligned with the
    femur's mechanical axis; nothing when the femur surface is proximal only."""
    if float((femur.vertices @ femur.axis).min()) > -300.0:
        return []
    distal = hip + rotation @ _distal_end(femur)
    down = (distal - hip) / np.linalg.norm(distal - hip)
    flip = np.array([-1.0, 1.0, 1.0]) if side == "left" else np.ones(3)  # for shapes of the right leg only

    def of_side(kind: str) -> tuple[AnatomyShape | None, np.ndarray]:
        shapes = load_shapes(kind)
        same = [s for s in shapes if s.side == side]
        return (same[0], np.ones(3)) if same else ((shapes[0], flip) if shapes else (None, flip))

    (tibia, tibia_flip), (fibula, _), (patella, patella_flip) = of_side("tibia"), of_side("fibula"), of_side("patella")
    if tibia is None:
        return []
    scale = float(rng.uniform(0.9, 1.1))
    axis = _OPENSIM_TO_LPS @ np.asarray(tibia.landmarks["shaft_axis"], dtype=float) * tibia_flip
    turn = random_rotation(rng, 4.0) @ _rotation_between(axis, np.array([0.0, 0.0, 1.0]))  # the lower leg: vertical
    plateau = np.asarray(tibia.landmarks["plateau_centre"], dtype=float)
    joint = distal + down * float(rng.uniform(3, 7))

    def leg_frame(shape: AnatomyShape) -> np.ndarray:  # tibia and fibula of one side share a frame
        return ((shape.vertices - plateau) @ _OPENSIM_TO_LPS.T * tibia_flip) @ turn.T * scale + joint

    bones = [("tibia", leg_frame(tibia), tibia.triangles)]
    if fibula is not None and fibula.side == tibia.side:
        bones.append(("fibula", leg_frame(fibula), fibula.triangles))
    if patella is not None:
        centre = np.asarray(patella.landmarks.get("centroid", patella.vertices.mean(0)), dtype=float)
        vertices = (patella.vertices - centre) @ _OPENSIM_TO_LPS.T * patella_flip * scale
        position = distal - down * float(rng.uniform(20, 40)) + np.array([0.0, -float(rng.uniform(35, 48)), 0.0])
        bones.append(("patella", vertices + position, patella.triangles))
    return bones


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector direction ``a`` to ``b`` (Rodrigues)."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if np.linalg.norm(v) < 1e-9:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1 + c)


# --- soft tissue, organs, vessels ----------------------------------------------------------------------------------

class _Body:
    """The body's outline per slice (trunk above the groin, two legs below, following the femurs and tibias), its
    coordinates and its soft-tissue HU."""

    def __init__(self, rng, grid: Grid, shift, half_width, body_a, body_b, body_y, placed, hip_rotation, hips,
                 knee_z) -> None:
        self.rng, self.grid, self.shift = rng, grid, shift
        self.half_width, self.body_a, self.body_b, self.body_y = half_width, body_a, body_b, body_y
        full = tuple(slice(0, n) for n in grid.shape)
        self.x, self.y = (grid.coordinate_along(full, shift, unit)[0] for unit in np.eye(3)[:2])  # (1|ny, nx)
        self.z = grid.coordinate_along(full, shift, np.eye(3)[2])[:, 0, 0]  # (nz,)
        self.split_z = -float(rng.uniform(30, 80))
        self.knee_z = knee_z
        self.legs = {side: self._leg_centres(placed[side], hip_rotation[side], hips[side]) for side in hips}
        self.muscle_hu = float(rng.uniform(25, 70))
        self.fat_hu = float(rng.uniform(-120, -70))

    def _leg_centres(self, femur: PlacedFemur, rotation: np.ndarray, hip: np.ndarray) -> np.ndarray:
        """(nz, 2) x, y of the leg's centre per slice: the femur's shaft, then straight on below it."""
        points = femur.vertices @ rotation.T + hip
        distal = hip + rotation @ _distal_end(femur)
        z_levels = np.linspace(float(points[:, 2].min()), -40.0, 12)
        centres = []
        for level in z_levels:
            near = points[np.abs(points[:, 2] - level) < 15.0]
            centres.append(near[:, :2].mean(0) if len(near) else distal[:2])
        centres = np.array(centres)
        below = self.z < z_levels[0]
        x = np.interp(self.z, z_levels, centres[:, 0])
        y = np.interp(self.z, z_levels, centres[:, 1]) + 8.0
        x[below], y[below] = distal[0], distal[1] + 8.0
        return np.stack([x, y], axis=1)

    def distance(self) -> np.ndarray:
        """Normalised radial distance from the body's centre line per voxel (< 1 inside the body)."""
        shape = self.grid.shape
        trunk = (self.x / self.body_a) ** 2 + ((self.y - self.body_y) / self.body_b) ** 2  # (ny, nx)
        leg_radius = np.interp(self.z, [self.knee_z - 400, self.knee_z - 60, self.knee_z, self.split_z, 400.0],
                               [32.0, 55.0, 60.0, 95.0, 95.0])
        out = np.empty(shape, dtype=np.float32)
        for k in range(shape[0]):
            legs = np.minimum(*[np.hypot(self.x - c[k, 0], self.y - c[k, 1]) for c in self.legs.values()])
            leg = (legs / leg_radius[k]) ** 2
            if self.z[k] > self.split_z:
                out[k] = trunk
            else:
                out[k] = np.minimum(leg, trunk + (self.split_z - self.z[k]) / 40.0)
        return out

    def soft_tissue(self) -> np.ndarray:
        rng = self.rng
        self.radial = self.distance()
        inside = self.radial < 1.0
        fat_depth = float(rng.uniform(0.08, 0.35))
        texture = smooth_noise(rng, self.radial.shape, 2.0)
        hu = np.full(self.radial.shape, float(rng.uniform(-1010, -980)), dtype=np.float32)
        tissue = np.where(self.radial > (1 - fat_depth) ** 2, self.fat_hu, self.muscle_hu + 12.0 * texture)
        tissue = np.where((texture > 1.6) & (self.radial < (1 - fat_depth) ** 2), self.fat_hu, tissue)
        hu = np.where(inside, tissue, hu)
        hu = np.where(inside & (self.radial > 0.98), float(rng.uniform(10, 60)), hu)  # skin
        table_y = self.body_y + self.body_b + float(rng.uniform(2, 15))
        bend = 0.0008 * float(rng.uniform(0, 1)) * self.x ** 2
        table = (self.y > table_y - bend) & (self.y < table_y - bend + float(rng.uniform(5, 15)))
        table_hu = float(rng.uniform(100, 400)) if rng.random() < 0.5 else float(rng.uniform(-300, 100))
        hu = np.where(table[None], table_hu, hu)
        return hu.astype(np.float32)

    def trunk_slices(self) -> np.ndarray:
        return self.z > self.split_z

    def ellipsoid(self, centre: np.ndarray, radii: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """(region, normalised radius squared there) of an axis-aligned ellipsoid in the patient frame."""
        index = self.grid.to_index(np.array([centre - radii, centre + radii]) + self.shift)
        low = np.maximum(np.floor(index.min(0)).astype(int), 0)
        high = np.minimum(np.ceil(index.max(0)).astype(int) + 1, np.array(self.grid.size))
        if np.any(high <= low):
            return None
        region = tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1]))
        x = self.x[:, region[2]][0][None, None, :]
        y = self.y[region[1], :][:, 0][None, :, None] if self.y.shape[0] > 1 else self.y[0, 0]
        z = self.z[region[0]][:, None, None]
        r2 = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
        return region, r2


def _paint_organs(rng: np.random.Generator, hu: np.ndarray, body: _Body, spine_top: float) -> list[str]:
    """Liver, spleen, kidneys, bladder and bowel (gas, fluid, oral contrast) where the field of view holds them."""
    contrast = rng.random() < 0.5  # intravenous contrast (portal venous phase)
    painted = []
    level = spine_top  # the top of the sacrum
    organs = [
        ("liver", [-60, -5, level + 210], [95, 80, 85], (100, 150) if contrast else (50, 70)),
        ("spleen", [85, 35, level + 205], [35, 50, 55], (100, 140) if contrast else (40, 60)),
        ("kidney right", [-65, 45, level + 125], [28, 24, 55], (150, 250) if contrast else (25, 40)),
        ("kidney left", [65, 45, level + 135], [28, 24, 55], (150, 250) if contrast else (25, 40)),
        ("bladder", [0, -45, 25], [45, 35, 35], (0, 20) if rng.random() < 0.85 else (300, 800)),
    ]
    inside = body.radial < 0.85
    for name, centre, radii, hu_range in organs:
        radii = np.asarray(radii, dtype=float) * rng.uniform(0.8, 1.2, size=3)
        found = body.ellipsoid(np.asarray(centre, dtype=float) + rng.uniform(-12, 12, size=3), radii)
        if found is None:
            continue
        region, r2 = found
        organ = (r2 < 1.0) & inside[region]
        if organ.any():
            hu[region][organ] = float(rng.uniform(*hu_range))
            painted.append(name)
    # Bowel loops: a smooth random field thresholded into tubes, filled with gas, fluid or oral contrast.
    abdomen = (body.z > 30.0) & (body.z < level + 200)
    if abdomen.any():
        slices = slice(int(np.argmax(abdomen)), int(len(abdomen) - np.argmax(abdomen[::-1])))
        field = smooth_noise(rng, hu[slices].shape, 6.0 / body.grid.spacing[::-1])
        where = smooth_noise(rng, hu[slices].shape, 25.0 / body.grid.spacing[::-1]) > float(rng.uniform(0.0, 1.0))
        loops = (np.abs(field) < 0.12) & where & (body.radial[slices] < 0.6)
        if loops.any():
            oral = rng.random() < 0.4
            content = smooth_noise(rng, hu[slices].shape, 10.0 / body.grid.spacing[::-1])
            fill = np.where(content > 1.0, -950.0, float(rng.uniform(200, 1000)) if oral else float(rng.uniform(5, 40)))
            part = hu[slices]
            part[loops] = fill[loops]
            painted.append("bowel with oral contrast" if oral else "bowel")
    return painted


def _tube(hu: np.ndarray, grid: Grid, shift: np.ndarray, points: np.ndarray, radius: float, cortex_mm: float,
          wall_hu: float, interior_hu: float) -> bool:
    """Paint a tube of ``radius`` mm around a polyline (patient frame; a bone when ``cortex_mm`` > 0, else a
    vessel filled with ``interior_hu``); partial volume from its distance to the centre line."""
    from scipy import ndimage

    dense = [points[0]]
    for a, b in zip(points[:-1], points[1:]):
        steps = max(1, int(np.ceil(np.linalg.norm(b - a) / (0.5 * float(grid.spacing.min())))))
        dense.extend(a + (b - a) * t for t in np.linspace(0, 1, steps + 1)[1:])
    index = grid.to_index(np.array(dense) + shift)
    margin = np.ceil((radius + 3.0) / grid.spacing).astype(int) + 1
    low = np.maximum(np.floor(index.min(0)).astype(int) - margin, 0)
    high = np.minimum(np.ceil(index.max(0)).astype(int) + margin, np.array(grid.size))
    if np.any(high <= low):
        return False
    region = tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1]))
    centre_line = np.ones(tuple(int(b - a) for a, b in zip(low[::-1], high[::-1])), dtype=bool)
    voxel = np.round(index - low).astype(int)
    keep = np.all((voxel >= 0) & (voxel < (high - low)), axis=1)
    if not keep.any():
        return False
    centre_line[voxel[keep, 2], voxel[keep, 1], voxel[keep, 0]] = False
    sdf = (ndimage.distance_transform_edt(centre_line, sampling=grid.spacing[::-1]) - radius).astype(np.float32)
    voxel_mm = float(np.mean(grid.spacing))
    interior = np.full(sdf.shape, interior_hu, dtype=np.float32)
    hu[region] = bone_hu(sdf, cortex_mm if cortex_mm > 0 else radius + 1.0, wall_hu if cortex_mm > 0 else interior_hu,
                         interior, hu[region], voxel_mm)
    return True


def _paint_vessels(rng: np.random.Generator, hu: np.ndarray, body: _Body, hips: dict, knees: dict) -> list[str]:
    """Aorta, iliac and femoral arteries, with or without contrast, calcified plaques in some cases."""
    blood = float(rng.uniform(150, 350)) if rng.random() < 0.5 else float(rng.uniform(30, 50))
    y_front = float(rng.uniform(-25, -10))
    aorta = np.array([[8.0, y_front, 400.0], [5.0, y_front, 130.0]])
    painted = []
    if _tube(hu, body.grid, body.shift, aorta, float(rng.uniform(9, 13)), 0.0, 0.0, blood):
        painted.append("aorta")
    for side in ("left", "right"):
        hip, knee = hips[side], knees[side]
        path = np.array([aorta[-1], [hip[0] * 0.6, y_front - 10, 50.0], hip + [-np.sign(hip[0]) * 15, -35, -10],
                         knee + [-np.sign(hip[0]) * 10, 25, 60]])
        if _tube(hu, body.grid, body.shift, path, float(rng.uniform(3.5, 6.5)), 0.0, 0.0, blood):
            painted.append(f"iliac and femoral artery {side}")
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(3, 15))):
            spot = aorta[0] + (aorta[1] - aorta[0]) * rng.uniform() + rng.normal(0, 6, size=3)
            _tube(hu, body.grid, body.shift, np.array([spot, spot + rng.normal(0, 2, size=3)]),
                  float(rng.uniform(0.8, 2.0)), 0.0, 0.0, float(rng.uniform(300, 1200)))
        painted.append("calcified plaques")
    return painted


def _paint_ribs_and_arms(rng: np.random.Generator, hu: np.ndarray, body: _Body, spine_top: float, look) -> list[str]:
    """Lower ribs (curved tubes from the thoracic spine round the trunk, falling forwards) and, in some cases, both
    arms beside the body (humerus, radius and ulna as cortical tubes)."""
    painted = []
    cortex_hu = look.cortex_hu * float(rng.uniform(0.6, 0.9))
    for level in range(3):  # ribs 12, 11, 10
        z0 = spine_top + 215.0 + 32.0 * level + float(rng.uniform(-8, 8))
        for sign in (-1.0, 1.0):
            angles = np.linspace(0.15, 1.6 + 0.35 * level, 14)
            ring = np.stack([sign * body.body_a * 0.8 * np.sin(angles),
                             body.body_y + body.body_b * 0.8 * np.cos(angles) - 10.0,
                             z0 - 45.0 * angles / angles[-1]], axis=1)
            if _tube(hu, body.grid, body.shift, ring, float(rng.uniform(4, 6)), 1.2, cortex_hu, 180.0):
                painted.append(f"rib {12 - level} {'left' if sign > 0 else 'right'}")
    if rng.random() < 0.35:
        elbow_z = spine_top + float(rng.uniform(120, 200))
        for sign in (-1.0, 1.0):
            x = sign * (body.body_a + float(rng.uniform(30, 70)))
            arm = body.ellipsoid(np.array([x, 0.0, elbow_z]), np.array([45.0, 45.0, 600.0]))
            if arm is not None:
                region, r2 = arm
                hu[region][r2 < 1.0] = body.muscle_hu
            humerus = np.array([[x, 5.0, elbow_z + 400.0], [x, 0.0, elbow_z]])
            forearm = [np.array([[x + d, -5.0, elbow_z - 5.0], [x + d * 1.3, -25.0, elbow_z - 260.0]]) for d in (-9, 9)]
            if _tube(hu, body.grid, body.shift, humerus, float(rng.uniform(9, 12)), 3.0, cortex_hu, 40.0):
                painted.append("humerus")
            for bone in forearm:
                _tube(hu, body.grid, body.shift, bone, float(rng.uniform(5, 7)), 2.0, cortex_hu, 40.0)
    return painted


def _implant(rng, hu, metal, grid: Grid, region, inside, femur: PlacedFemur, rotation, translation,
             muscle_hu: float) -> np.ndarray:
    """A total hip replacement on one femur: the head resected and replaced by a metal ball on a stem in the canal
    (and an acetabular cup); the label keeps the bone, not the metal ball. Returns the femur's label in ``region``."""
    centre = grid.coordinate_along
    axis = rotation @ femur.axis
    offsets = [centre(region, translation, unit) for unit in np.eye(3)]
    distance = np.sqrt(sum(o ** 2 for o in offsets))
    resected = distance < femur.head_radius + 1.5
    part = hu[region]
    part[resected & inside] = muscle_hu
    ball = distance < float(rng.uniform(13, 17))
    cup = (distance > femur.head_radius + 0.5) & (distance < femur.head_radius + 3.5) & (offsets[2] > -3.0)
    along = sum(o * a for o, a in zip(offsets, axis))
    radial = np.sqrt(np.maximum(distance ** 2 - along ** 2, 0.0))
    stem = (along < -10.0) & (along > -float(rng.uniform(110, 150))) & (radial < float(rng.uniform(5, 8))) & inside
    implant = ball | cup | stem
    part[implant] = 3071.0
    metal[region] |= implant
    return inside & ~resected


def _finish(rng, hu: np.ndarray, grid: Grid, look, slice_mm: float, metal: np.ndarray, body: _Body):
    """Point spread (wider along z for thick slices), metal streaks, beam-hardening cupping, correlated noise."""
    spacing_zyx = grid.spacing[::-1]
    sigma = np.array([max(look.blur_mm, 0.4 * slice_mm), look.blur_mm, look.blur_mm])
    hu = blur(hu, sigma, spacing_zyx)
    if metal.any():
        for k in np.flatnonzero(metal.any(axis=(1, 2))):
            ys, xs = np.nonzero(metal[k])
            cy, cx = ys.mean(), xs.mean()
            yy, xx = np.mgrid[0:hu.shape[1], 0:hu.shape[2]]
            angle = np.arctan2((yy - cy) * spacing_zyx[1], (xx - cx) * spacing_zyx[2])
            r = np.hypot((yy - cy) * spacing_zyx[1], (xx - cx) * spacing_zyx[2])
            streaks = np.sin(float(rng.integers(6, 18)) * angle + float(rng.uniform(0, 6.3)))
            hu[k] += float(rng.uniform(150, 450)) * streaks * np.exp(-r / float(rng.uniform(40, 90))) * (r > 15.0)
    inside = body.radial < 1.0
    hu -= float(rng.uniform(0, 40)) * np.clip(1.0 - body.radial, 0.0, 1.0) * inside  # cupping: darker centre
    noise_mm = float(rng.uniform(0.5, 1.2))
    hu += look.noise_hu * smooth_noise(rng, hu.shape, noise_mm / spacing_zyx)
    return grid.image(np.clip(np.round(hu), -1024, 3071).astype(np.int16))
