"""The ex-vivo QCT family: a real femur surface (Resources/Anatomy) cut 120-220 mm below the head top, the distal
end potted, calibration rods beside it, in air or water, 0.5-1.5 mm voxels, the shaft along any image axis or
direction, field of view from tight to 3x the specimen. ``scan`` renders the same specimen on a scanner's fixed grid
instead (the fine-tuning benchmark's new site).
"""

from __future__ import annotations

import numpy as np

from ..anatomy import AnatomyShape
from .femurs import (CaseInfo, axis_pose, box_corners, draw_intensities, finish, fit_field_of_view, fit_voxels,
                     grid_around, paint_femur, place_femur, random_rotation, specimen_rotation, vary)
from .render import Grid, smooth_noise, voxelise


def render_exvivo(rng: np.random.Generator, seed: int, femurs: list[AnatomyShape], held_out: bool,
                   scan: tuple[float, float] | None):
    shape = vary(femurs[rng.integers(len(femurs))], rng)
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
    pose = random_rotation(rng, 180.0) if rng.random() < 0.2 else axis_pose(rng) @ random_rotation(rng, 25.0)
    in_plane = float(rng.uniform(0.5, 1.0))
    spacing = np.array([in_plane, in_plane, float(rng.uniform(0.5, 1.5))])
    if scan is not None:  # the slice axis is the image axis closest to the shaft
        spacing = np.full(3, float(scan[0]))
        spacing[int(np.argmax(np.abs(pose[:, 2])))] = float(scan[1])
        box_low, box_high = fit_field_of_view(low - 3.0, high + 3.0, box_low, box_high, pose, spacing)
    # The image grid is axis-aligned in its own frame; the specimen frame is rotated into it by ``pose``.
    corners = box_corners(box_low, box_high) @ pose.T
    spacing = fit_voxels(corners.max(0) - corners.min(0), spacing)
    grid = grid_around(corners.min(0), corners.max(0), spacing, np.eye(3))
    grid = Grid(origin=grid.origin + rng.uniform(-150, 150, size=3).round(1), spacing=grid.spacing,
                direction=grid.direction, size=grid.size)
    shift = grid.origin - corners.min(0)  # physical = pose @ canonical + shift

    look = draw_intensities(rng, in_vivo=False)
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
    inside = paint_femur(hu, grid, voxels, femur, pose, shift, look, rng, cut_z=cut_z)
    label[voxels.region] = inside
    ct = finish(hu, grid, look, rng)
    info = CaseInfo("exvivo", seed, (femur.subject,), (femur.side,), tuple(grid.spacing), grid.size,
                    {"water": water, "potted": potted, "rods": rods, "fov": fov, "cut_mm": cut_length,
                     "pose": pose.round(3).tolist()})
    return ct, grid.image(label), info


def _canonical_coordinates(grid: Grid, pose: np.ndarray, shift: np.ndarray) -> list[np.ndarray]:
    """Canonical x, y, z of every voxel centre (three float32 arrays, (z, y, x))."""
    full = tuple(slice(0, n) for n in grid.shape)
    return [grid.coordinate_along(full, shift, pose @ unit) for unit in np.eye(3)]
