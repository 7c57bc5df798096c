"""The in-vivo hip CT family: both femurs of one subject (or a mirrored pair) in their acetabula (joint space
1.5-4 mm), both hip bones (the one hemipelvis mirrored for the other side, scaled to the heads), soft tissue with
fat, muscle, skin, bowel gas and the table; 0.6-1 mm in-plane, 0.6-3 mm slices, shaft along z; field of view from
one hip to the whole pelvis.
"""

from __future__ import annotations

import numpy as np

from ..anatomy import AnatomyShape, load_shapes
from .femurs import (CaseInfo, PlacedFemur, draw_intensities, femur_pair, finish, fit_voxels, grid_around,
                     paint_femur, random_rotation)
from .render import Grid, bone_hu, smooth_noise, voxelise


def render_invivo(rng: np.random.Generator, seed: int, femurs: list[AnatomyShape], held_out: bool):
    hemipelves = {shape.side: shape for shape in load_shapes("hemipelvis")}  # one training subject's pelvis
    placed, subject = femur_pair(rng, femurs)

    look = draw_intensities(rng, in_vivo=True)
    joint_space = float(rng.uniform(1.5, 4.0))
    pelvis, hips = place_pelvis(hemipelves, np.mean([f.head_radius for f in placed.values()]) + joint_space)
    half_width = float(hips["left"][0] - hips["right"][0]) / 2
    # Patient frame (LPS, x = 0 midway between the hips): each femur sits in its acetabulum, turned a little.
    hip_rotation = {side: random_rotation(rng, 10.0) for side in hips}

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
    spacing = fit_voxels(high - low, np.array([in_plane, in_plane, slice_mm]))
    grid = grid_around(low, high, spacing, np.eye(3))
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
        inside = paint_femur(hu, grid, voxels, femur, rotation, translation, look, rng)
        label[voxels.region] |= inside
        sides.append(side)
    ct = finish(hu, grid, look, rng)
    info = CaseInfo("invivo", seed, (subject,), tuple(sides), tuple(grid.spacing), grid.size,
                    {"joint_space_mm": joint_space, "hips_lps": {s: (h + shift).tolist() for s, h in hips.items()}})
    return ct, grid.image(label), info


def place_pelvis(hemipelves: dict[str, AnatomyShape],
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
