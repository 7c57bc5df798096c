"""FemurSeg on a real CT with reference femur labels: Dice per femur, what else it labels, and a crop above the
femurs, on which it must find no femur.

The development case is TotalSegmentator's example CT (Apache-2.0; a real abdomen-pelvis CT at 3 mm ending at the
proximal femurs, one of them with a hip replacement) with the femur labels of TotalSegmentator's own model
(``femur_left`` 75, ``femur_right`` 76 in its v2 label map). It is a yardstick, never training data, and nothing
is tuned to it; neither file is committed and this script fetches nothing. To run it:

    git clone https://github.com/wasserth/TotalSegmentator /tmp/TotalSegmentator
    python benchmarks/realct_benchmark.py \\
        --ct /tmp/TotalSegmentator/tests/reference_files/example_ct.nii.gz \\
        --labels /tmp/TotalSegmentator/tests/reference_files/example_seg_fast_force_split.nii.gz

Any CT with a label map works (``--left-value``, ``--right-value``; sides in the patient's frame).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CROP_ABOVE_MM = 40.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True, help="reference label map on the CT's grid")
    parser.add_argument("--left-value", type=int, default=75)
    parser.add_argument("--right-value", type=int, default=76)
    parser.add_argument("--model", help="model name or folder (default: the bundled model)")
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk

    from FemurSegLib.imageio import read_image
    from FemurSegLib.inference import LABEL_VALUES, InferenceOptions, Segmenter
    from FemurSegLib.metrics import dice
    from FemurSegLib.models import resolve_model

    ct = read_image(args.ct, "CT")
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(args.labels)))
    model = resolve_model(args.model)
    segmenter = Segmenter(model.root, InferenceOptions(device="cpu"), notify=lambda message: None)
    started = time.perf_counter()
    result = segmenter.run(ct)
    seconds = time.perf_counter() - started
    predicted = sitk.GetArrayFromImage(result.label)
    truth = {"left": reference == args.left_value, "right": reference == args.right_value}
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    print(f"{args.ct.name}: {list(ct.GetSize())} voxels of {' x '.join(f'{s:.2f}' for s in ct.GetSpacing())} mm, "
          f"model {model.name}, {seconds:.1f} s")
    print("found: " + (", ".join(f"{f.side} {f.volume_ml:.0f} ml" for f in result.femurs) or "no femur"))
    for warning in result.warnings:
        print(f"  warning: {warning}")
    for side, mask in truth.items():
        guess = predicted == LABEL_VALUES[side]
        print(f"{side:6s} reference {mask.sum() * voxel_ml:6.1f} ml, FemurSeg {guess.sum() * voxel_ml:6.1f} ml, "
              f"Dice {dice(guess, mask) if mask.any() or guess.any() else float('nan'):.4f}")
    elsewhere = (predicted != 0) & ~truth["left"] & ~truth["right"]
    print(f"labelled outside both reference femurs: {elsewhere.sum() * voxel_ml:.1f} ml")

    femur_voxels = np.argwhere(truth["left"] | truth["right"])
    if not len(femur_voxels):
        return
    top_index = max(femur_voxels, key=lambda index: ct.TransformIndexToPhysicalPoint(
        [int(v) for v in index[::-1]])[2])
    top_z = ct.TransformIndexToPhysicalPoint([int(v) for v in top_index[::-1]])[2]
    keep = [k for k in range(ct.GetSize()[2])
            if ct.TransformIndexToPhysicalPoint([0, 0, k])[2] > top_z + CROP_ABOVE_MM]
    if len(keep) < 8:
        print("crop above the femurs: too few slices above them")
        return
    crop = sitk.RegionOfInterest(ct, [ct.GetSize()[0], ct.GetSize()[1], len(keep)], [0, 0, min(keep)])
    cropped = segmenter.run(crop)
    found = ", ".join(f"{f.side} {f.volume_ml:.0f} ml" for f in cropped.femurs) or "no femur found"
    print(f"crop from {CROP_ABOVE_MM:.0f} mm above the femurs ({len(keep)} slices): {found}")


if __name__ == "__main__":
    main()
