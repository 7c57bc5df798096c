"""The one entry to the phantom generators: CT + exact femur label for a family of scans, deterministic per seed.

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

import numpy as np
import SimpleITK as sitk

from ..anatomy import load_shapes
from .clinical import render_clinical
from .exvivo import render_exvivo
from .femurs import CaseInfo
from .invivo import render_invivo
from .phantom import generate_phantom

FAMILIES = ("legacy", "exvivo", "invivo", "clinical")
_FAMILY_SEED = {"legacy": 0, "exvivo": 1, "invivo": 2, "clinical": 3}


def generate_case(family: str, seed: int, held_out: bool = False, scan: tuple[float, float] | None = None,
                  view: str | None = None) -> tuple[sitk.Image, sitk.Image, CaseInfo]:
    """(CT int16 HU, uint8 femur label, CaseInfo) for ``family`` and ``seed``; the same inputs give the same case.

    ``scan`` (ex-vivo only): a scanner's (in-plane, slice) spacing in mm, the slices across the specimen's shaft,
    instead of the drawn grid; the same specimen, pose and look as without it, rendered on that grid, so the label
    stays exact there (the field of view is narrowed if the grid would exceed MAX_VOXELS).

    ``view`` (clinical only): the kind of field of view (clinical.FIELDS_OF_VIEW, e.g. "spine" or "legs": no
    femur), instead of the drawn one; the rest of the case is drawn as without it."""
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
        return render_exvivo(rng, seed, femurs, held_out, scan)
    if scan is not None:
        raise ValueError("a scan profile applies to the ex-vivo family only")
    if family == "clinical":
        return render_clinical(rng, seed, femurs, held_out, view)
    if view is not None:
        raise ValueError("a view applies to the clinical family only")
    return render_invivo(rng, seed, femurs, held_out)
