"""``femurseg demo`` / ``make demo``: the main job on the bundled defaults.

Segments the bundled sample CT with the bundled model, runs fill and a plain threshold, compares each with the
sample's exact label and nnU-Net with fill, prints the table and writes labels, metrics.json, an overlay PNG of
the slices where nnU-Net and fill disagree most and a montage of phantoms 1-20 under the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import SimpleITK as sitk

from .fill import FillParameters, compute_fill, threshold_mask
from .imageio import prepare_output_folder, read_image, write_bytes_atomic, write_image
from .metrics import compare_images
from .models import BUNDLED_MODELS_DIR, DEFAULT_MODEL

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "Resources" / "SampleData"
SAMPLE_CT = SAMPLE_DIR / "FemurPhantom05.nrrd"
SAMPLE_LABEL = SAMPLE_DIR / "FemurPhantom05-label.nrrd"
MONTAGE_SEEDS = range(1, 21)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    columns = ["dice", "sensitivity", "specificity", "asd_mm", "hd95_mm", "volume_ml_reference", "volume_ml_other"]
    header = f"{'comparison':28s}" + "".join(f"{c.replace('volume_ml_', 'ml ').replace('_mm', ' mm'):>13s}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, values in rows.items():
        lines.append(f"{name:28s}" + "".join(f"{values[c]:13.4f}" for c in columns))
    return "\n".join(lines)


def run_demo(out_dir: Path, device: str = "auto") -> dict[str, dict[str, float]]:
    from .report import montage_png, overlay_png

    prepare_output_folder(out_dir, input_folders=(SAMPLE_DIR, BUNDLED_MODELS_DIR))  # what the demo reads
    ct = read_image(SAMPLE_CT, "sample CT")
    truth = read_image(SAMPLE_LABEL, "sample label")
    masks: dict[str, sitk.Image] = {"truth": truth}
    timings: dict[str, float] = {}

    if (BUNDLED_MODELS_DIR / DEFAULT_MODEL).is_dir():
        from .inference import InferenceOptions, Segmenter

        started = time.perf_counter()
        segmenter = Segmenter(BUNDLED_MODELS_DIR / DEFAULT_MODEL, InferenceOptions(device=device))
        timings["model_load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        masks["nnU-Net"] = segmenter.segment(ct)
        timings["segment_s"] = time.perf_counter() - started
    else:
        print(f"Bundled model {DEFAULT_MODEL} not found; showing the baselines only.")
    started = time.perf_counter()
    parameters = FillParameters()
    masks["fill"] = compute_fill(ct, parameters)
    timings["fill_s"] = time.perf_counter() - started
    masks["threshold"] = threshold_mask(ct, parameters.threshold_hu)

    rows = {f"{name} vs truth": compare_images(truth, mask).as_dict() for name, mask in masks.items() if name != "truth"}
    if "nnU-Net" in masks:
        rows["fill vs nnU-Net"] = compare_images(masks["nnU-Net"], masks["fill"]).as_dict()
    print(format_table(rows))
    print("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))

    for name, mask in masks.items():
        if name != "truth":
            write_image(mask, out_dir / f"femur_{name.replace('-', '').lower()}.nrrd")
    report = {"sample": SAMPLE_CT.name, "fill_parameters": parameters.__dict__, "metrics": rows, "timings": timings}
    write_bytes_atomic(out_dir / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    compare = ("nnU-Net", "fill") if "nnU-Net" in masks else ("truth", "fill")
    overlay_masks = {name: mask for name, mask in masks.items() if name != "threshold"}
    overlay_png(ct, overlay_masks, out_dir / "overlay.png", compare)

    from .synthetic.phantom import generate_phantom

    cases = []
    for seed in MONTAGE_SEEDS:
        phantom_ct, phantom_label, shape = generate_phantom(seed)
        cases.append((f"seed {seed} {shape.side} NSA {shape.neck_shaft_angle:.0f}", phantom_ct, phantom_label))
    montage_png(cases, out_dir / "phantoms_1-20.png")
    print(f"outputs in {out_dir}/: labels, metrics.json, overlay.png, phantoms_1-20.png")
    return rows
