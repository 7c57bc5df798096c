"""Resources bounded before work: what a run will need is estimated from the image header and the parameters, and
a run that would not fit is refused in one line that says what to change, before it takes minutes and gigabytes.

- **nnU-Net**: the image resampled to the spacing of the first network that sees all of it (the 3 mm locator, or
  the network itself) must stay under MAX_NETWORK_VOXELS, and its sliding window under MAX_TILES tiles (a 70 KB CT
  of 50 mm voxels spans 3 m and ran 137 s and 6 GB into a traceback; ``--tile-step 1e-9`` hung computing tiles).
  The tile step has a floor, MIN_TILE_STEP: below it tiles overlap by over 90 % for no accuracy.
- **Fill** works on the CT's own grid: its memory (about FILL_BYTES_PER_VOXEL a voxel) must fit the machine, and its
  closing costs voxels x ball elements (a 1 mm ball at 0.05 mm voxels has 36 000), bounded by MAX_FILL_WORK.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from .errors import FemurSegError

MIN_TILE_STEP = 0.1
MAX_NETWORK_VOXELS = 2**27  # ~134 M: a 512 mm cube at 1 mm; a whole body at 3 mm is ~17 M
MAX_TILES = 20_000
FILL_BYTES_PER_VOXEL = 24  # bool masks, the padded closing, the open-direction counts, int32 component labels
MAX_FILL_WORK = 6e10  # voxel x ball-element operations of the closing: about 30-60 s on one core


def machine_memory_bytes() -> int:
    """Physical memory of this machine (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_tile_step(step: float) -> float:
    """nnU-Net's sliding-window step as a fraction of the patch, in [MIN_TILE_STEP, 1]."""
    if not (isinstance(step, (int, float)) and MIN_TILE_STEP <= step <= 1):
        raise FemurSegError(f"Tile step {step} is out of range: give a fraction of the patch in "
                            f"[{MIN_TILE_STEP:g}, 1], e.g. 1.0 (fewest tiles, the default) or 0.5 (nnU-Net's default).")
    return float(step)


def tile_count(shape: Sequence[int], patch: Sequence[int], step: float) -> int:
    """Tiles nnU-Net's sliding window takes (its compute_steps_for_sliding_window, counted without listing them)."""
    count = 1
    for size, length in zip(shape, patch):
        count *= math.ceil((max(size, length) - length) / (length * step)) + 1
    return count


def check_network_input(size_xyz: Sequence[int], spacing_xyz: Sequence[float], network_spacing_zyx: Sequence[float],
                        patch_zyx: Sequence[int], step: float) -> None:
    """Refuse an image that resampled to the network's spacing would exceed MAX_NETWORK_VOXELS or MAX_TILES."""
    extent_zyx = [n * s for n, s in zip(reversed(size_xyz), reversed(spacing_xyz))]
    shape = [max(1, round(e / s)) for e, s in zip(extent_zyx, network_spacing_zyx)]
    voxels = math.prod(shape)
    extent = " x ".join(f"{e:.0f}" for e in reversed(extent_zyx))
    spacing = " x ".join(f"{s:g}" for s in reversed(network_spacing_zyx))
    if voxels > MAX_NETWORK_VOXELS:
        raise FemurSegError(f"The CT spans {extent} mm: resampled to the network's {spacing} mm it would hold "
                            f"{voxels:,} voxels, over the {MAX_NETWORK_VOXELS:,} FemurSeg runs; crop it to the hips "
                            "or check its voxel spacing.")
    tiles = tile_count(shape, patch_zyx, step)
    if tiles > MAX_TILES:
        raise FemurSegError(f"The CT ({extent} mm) needs {tiles:,} network tiles at tile step {step:g}, over "
                            f"{MAX_TILES:,}; raise --tile-step or crop the CT.")


def check_fill(size_xyz: Sequence[int], spacing_xyz: Sequence[float], closing_radius_mm: float) -> None:
    """Refuse a fill that would not fit in this machine's memory or would run for many minutes."""
    voxels = math.prod(size_xyz)
    memory = machine_memory_bytes()
    needed = voxels * FILL_BYTES_PER_VOXEL
    if memory and needed > 0.8 * memory:
        raise FemurSegError(f"Fill of {voxels:,} voxels needs about {needed / 1e9:.1f} GB, more than this machine's "
                            f"{memory / 1e9:.1f} GB; crop or resample the CT first.")
    if closing_radius_mm <= 0:
        return
    radii = [max(1, round(closing_radius_mm / s)) for s in reversed(spacing_xyz)]
    ball = math.pi * 4 / 3 * math.prod(radii)  # the ellipsoid's voxels
    if voxels * ball > MAX_FILL_WORK:
        spacing = " x ".join(f"{s:g}" for s in spacing_xyz)
        raise FemurSegError(f"Fill's {closing_radius_mm:g} mm closing at {spacing} mm voxels is a {ball:,.0f}-voxel "
                            f"ball over {voxels:,} voxels, many minutes of work; resample the CT to coarser voxels "
                            "(e.g. 0.3 mm) or lower --closing-mm.")
