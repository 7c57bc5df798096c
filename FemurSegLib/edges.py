"""Half-maximum edges: the CT itself decides the femur's outermost voxel layer where the network is a voxel off.

A blurred step edge crosses half its height where the surface is, so a voxel whose centre lies outside the bone is
darker than the midpoint between the bone's cortex and what surrounds it, and one whose centre lies inside is
brighter (the full-width-at-half-maximum rule of QCT cortical measurement). The half maximum of a voxel is
``(peak + background) / 2`` over a box of ``NEIGHBOURHOOD_MM`` around it: peak is the brightest voxel of the mask,
background the mean of voxels more than two voxels outside the mask (at most ``BACKGROUND_CAP_HU``: soft tissue,
water or air, never neighbouring bone).

- **Remove** (everywhere): a voxel of the mask's outer layer (facing the outside through a face, 6 neighbours)
  darker than its half maximum. The networks label on a 1 mm grid and add a one-voxel ring outside thin cortex
  (legacy phantoms: 520-640 HU voxels outside the bone, models v4-v6).
- **Add** (only where the bone stands in air): a voxel facing the mask through a face and at least as bright as its
  half maximum, where the background is air (mean below ``AIR_BACKGROUND_HU`` over at least ``MIN_FAR_SHARE`` of
  the box). On an isolated specimen in air the networks leave out an in-plane voxel layer of 300-750 HU at 0.6 mm
  voxels; in water, soft tissue or next to potting, rods or hip bone, which are as bright as cortex, nothing is
  added, and a box with too few voxels clearly outside the mask (where the femur leaves the field of view) is not
  taken for air.

Measured on validation cases of training subjects, never trained on, model v6. Removal, network -> removed (seeds
8001-8004): legacy 0.9873 -> 0.9913, ex-vivo 0.9841 -> 0.9876, in-vivo 0.9848 -> 0.9850; an outer layer of 26
neighbours scored lower on all three. Adding in air, removal only -> with adding: ex-vivo (seeds 8001-8008) 0.9883 ->
0.9908, no case lower; legacy (in water) and in-vivo (seeds 8001-8003): nothing added. New-site scans of
``benchmarks/finetune_benchmark.py`` (seeds 5100-5113, 12 cases): v6 0.8968 -> 0.9030, v6 fine-tuned on 8 new-site
cases 0.9557 -> 0.9655 (cases in air 0.956-0.981 -> 0.984-0.996, in water unchanged). Adding without the air
condition lost 0.002 (ex-vivo) and 0.008 (in-vivo): potting and hip bone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

NEIGHBOURHOOD_MM = 7.0
BACKGROUND_CAP_HU = 100.0
AIR_BACKGROUND_HU = -500.0
MIN_FAR_SHARE = 0.1

_FACES = ndimage.generate_binary_structure(3, 1)


def fit_edges_to_half_maximum(mask: np.ndarray, ct_array: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """``mask`` with its outer layer fitted to the local half maximum (same shape, a new array): darker outer
    voxels removed, and in air brighter voxels just outside added."""
    if not mask.any():
        return mask.copy()
    size = np.maximum(2 * np.round(NEIGHBOURHOOD_MM / 2 / np.asarray(spacing_zyx)).astype(int) + 1, 3)
    found = np.argwhere(mask)
    start = np.maximum(found.min(0) - size, 0)
    stop = np.minimum(found.max(0) + size + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    inside, hu = mask[box], ct_array[box].astype(np.float32)
    peak = ndimage.maximum_filter(np.where(inside, hu, -np.inf), size=tuple(size), mode="nearest")
    far = ~ndimage.binary_dilation(inside, iterations=2)
    far_sum = ndimage.uniform_filter(np.where(far, hu, 0.0).astype(np.float32), size=tuple(size), mode="nearest")
    far_share = ndimage.uniform_filter(far.astype(np.float32), size=tuple(size), mode="nearest")
    background = np.where(far_share > 0, far_sum / np.maximum(far_share, 1e-6), -1000.0)
    half_maximum = (peak + np.minimum(background, BACKGROUND_CAP_HU)) / 2
    outer_layer = inside & ~ndimage.binary_erosion(inside, structure=_FACES)  # facing the outside through a face
    fitted = inside & ~(outer_layer & (hu < half_maximum))
    in_air = (far_share >= MIN_FAR_SHARE) & (background < AIR_BACKGROUND_HU)
    just_outside = ndimage.binary_dilation(fitted, structure=_FACES) & ~fitted
    fitted |= just_outside & in_air & (hu >= half_maximum)
    result = mask.copy()
    result[box] = fitted
    return result
