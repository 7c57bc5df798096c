"""Voxelising real bone surfaces onto a CT grid and painting them in HU, for the real-shape phantom families.

Why VTK and SimpleITK: the label must be exact (a voxel is femur when its centre lies inside the periosteal
surface), and VTK's ``vtkPolyDataToImageStencil`` decides exactly that, row by row, for a closed triangle mesh.
The grid can have any spacing and direction: the surface is brought into the grid's index-aligned frame first.
Only each bone's bounding box is voxelised, so a 20-million-voxel CT costs a few seconds.

Intensities follow the legacy phantom's recipe (phantom.py): a cortical shell of given thickness, textured
trabecular bone or fatty marrow inside, partial volume from the signed distance, then blur and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..anatomy import to_polydata


@dataclass(frozen=True)
class Grid:
    """A CT voxel grid in LPS millimetres (SimpleITK's convention); arrays are (z, y, x)."""

    origin: np.ndarray  # (3,) physical position of voxel (0, 0, 0)
    spacing: np.ndarray  # (3,) x, y, z
    direction: np.ndarray  # (3, 3) columns are the image axes in physical space
    size: tuple[int, int, int]  # x, y, z

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.size[2], self.size[1], self.size[0]

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) indices of physical points (N, 3)."""
        return ((points - self.origin) @ self.direction) / self.spacing

    def physical(self, index_xyz: np.ndarray) -> np.ndarray:
        return self.origin + (index_xyz * self.spacing) @ self.direction.T

    def image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image

    def coordinate_along(self, region: tuple[slice, slice, slice], point: np.ndarray, axis: np.ndarray) -> np.ndarray:
        """(p - point) . axis for every voxel centre p of ``region`` (float32, broadcast-friendly)."""
        offset = float((self.origin - point) @ axis)
        steps = self.spacing * (self.direction.T @ axis)  # mm along ``axis`` per index step in x, y, z
        z, y, x = (np.arange(s.start, s.stop, dtype=np.float32) for s in region)
        return (offset + steps[2] * z[:, None, None] + steps[1] * y[None, :, None] + steps[0] * x[None, None, :])


@dataclass(frozen=True)
class Voxelised:
    """One closed surface on a grid: where it is, which voxel centres are inside, and a signed distance (mm)."""

    region: tuple[slice, slice, slice]  # (z, y, x) slices into the grid's array
    inside: np.ndarray  # bool, region shape
    sdf: np.ndarray  # float32 mm, negative inside, region shape


def voxelise(grid: Grid, vertices: np.ndarray, triangles: np.ndarray, margin_mm: float = 6.0) -> Voxelised | None:
    """Voxel centres inside the closed surface (vertices in LPS mm) within its bounding box; None if off-grid."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkImagingStencil import vtkImageStencilToImage, vtkPolyDataToImageStencil

    index = grid.to_index(vertices)
    margin = np.ceil(margin_mm / grid.spacing).astype(int)
    low = np.maximum(np.floor(index.min(axis=0)).astype(int) - margin, 0)
    high = np.minimum(np.ceil(index.max(axis=0)).astype(int) + margin, np.array(grid.size) - 1)
    if np.any(high < low):
        return None
    # Index-aligned millimetres: axis i runs along the grid's direction column i, origin at voxel 0.
    local = (vertices - grid.origin) @ grid.direction
    stencil = vtkPolyDataToImageStencil()
    stencil.SetInputData(to_polydata(local, triangles))
    stencil.SetOutputOrigin(0.0, 0.0, 0.0)
    stencil.SetOutputSpacing(*(float(s) for s in grid.spacing))
    stencil.SetOutputWholeExtent(int(low[0]), int(high[0]), int(low[1]), int(high[1]), int(low[2]), int(high[2]))
    to_image = vtkImageStencilToImage()
    to_image.SetInputConnection(stencil.GetOutputPort())
    to_image.SetInsideValue(1)
    to_image.SetOutsideValue(0)
    to_image.SetOutputScalarTypeToUnsignedChar()
    to_image.Update()
    shape = tuple(int(h - l + 1) for h, l in zip(high[::-1], low[::-1]))
    inside = numpy_support.vtk_to_numpy(to_image.GetOutput().GetPointData().GetScalars()).reshape(shape) > 0
    region = tuple(slice(int(l), int(h) + 1) for l, h in zip(low[::-1], high[::-1]))
    return Voxelised(region=region, inside=inside, sdf=signed_distance(inside, grid.spacing[::-1]))


def signed_distance(inside: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to the boundary between voxel centres."""
    half = 0.5 * float(np.mean(spacing_zyx))
    if not inside.any():
        return np.full(inside.shape, 1e3, dtype=np.float32)
    outside_distance = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx)
    inside_distance = ndimage.distance_transform_edt(inside, sampling=spacing_zyx)
    return np.where(inside, half - inside_distance, outside_distance - half).astype(np.float32)


def bone_hu(sdf: np.ndarray, cortex_mm: np.ndarray | float, cortex_hu: float, interior_hu: np.ndarray,
            surrounding_hu: np.ndarray, voxel_mm: float) -> np.ndarray:
    """HU of a bone with a cortical shell over ``surrounding_hu``, with partial volume at both surfaces."""
    inside_bone = np.clip(0.5 - sdf / voxel_mm, 0.0, 1.0)
    inside_endosteum = np.clip(0.5 - (sdf + cortex_mm) / voxel_mm, 0.0, 1.0)
    return (surrounding_hu * (1 - inside_bone) + cortex_hu * (inside_bone - inside_endosteum)
            + interior_hu * inside_endosteum).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: float | np.ndarray) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed by ``sigma_voxels`` (texture and correlated CT noise)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_voxels)
    return noise / (noise.std() + 1e-6)


def blur(hu: np.ndarray, sigma_mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """The scanner's point spread (Gaussian, in mm) on an anisotropic grid."""
    return ndimage.gaussian_filter(hu, np.asarray(sigma_mm) / np.asarray(spacing_zyx))
