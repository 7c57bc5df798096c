"""Small shapes for the FE tests, made here so that every expected value can be computed independently."""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk

HEAD = np.array([12.0, 0.0, 64.0])  # ball centre in the shape's own frame, mm; medial = +x
HEAD_RADIUS = 11.0
SHAFT_RADIUS = 8.0


def toy_femur_arrays(spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shaft along z (z 4-66 mm, radius 8) with a ball offset medially (+x) at its top: (label, hu, origin)."""
    origin = np.array([-14.0, -16.0, 0.0])
    shape = np.ceil(np.array([42.0, 32.0, 80.0]) / spacing).astype(int)  # x, y, z
    x, y, z = (origin[i] + spacing * np.arange(shape[i]) for i in range(3))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    shaft = (np.hypot(xx, yy) <= SHAFT_RADIUS) & (zz >= 4.0) & (zz <= 66.0)
    ball = np.sqrt((xx - HEAD[0]) ** 2 + (yy - HEAD[1]) ** 2 + (zz - HEAD[2]) ** 2) <= HEAD_RADIUS
    label = (shaft | ball).astype(np.uint8)
    hu = np.where(label > 0, 400.0 + 6.0 * zz, -1000.0).astype(np.float32)  # bone denser towards the head
    return label, hu, origin


@functools.lru_cache(maxsize=2)
def toy_femur(spacing: float = 1.0) -> tuple[sitk.Image, sitk.Image]:
    label, hu, origin = toy_femur_arrays(spacing)
    images = []
    for array in (hu, label):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((spacing,) * 3)
        image.SetOrigin(tuple(origin))
        images.append(image)
    return images[0], images[1]


def cylinder_surface(radius: float, length: float, segments: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Closed triangulated cylinder along z from 0 to ``length``, outward facing."""
    angle = 2 * np.pi * np.arange(segments) / segments
    ring = np.column_stack([radius * np.cos(angle), radius * np.sin(angle)])
    bottom = np.column_stack([ring, np.zeros(segments)])
    top = np.column_stack([ring, np.full(segments, length)])
    points = np.vstack([bottom, top, [[0, 0, 0], [0, 0, length]]])
    b_centre, t_centre = 2 * segments, 2 * segments + 1
    triangles = []
    for i in range(segments):
        j = (i + 1) % segments
        triangles += [[i, j, segments + j], [i, segments + j, segments + i],
                      [b_centre, j, i], [t_centre, segments + i, segments + j]]
    return points, np.array(triangles)


@functools.lru_cache(maxsize=1)
def toy_mesh():
    """The toy femur meshed at 3 mm, once per test session (fTetWild takes seconds even for small meshes)."""
    from FemurSegLib.fe.mesh import mesh_label

    return mesh_label(toy_femur()[1], 3.0)
