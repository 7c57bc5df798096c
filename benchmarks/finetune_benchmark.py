"""Fine-tuning for a "new site": a model before and after ``femurseg finetune`` on 8 exported cases, beside fill.

The new site is a scanner profile no model was trained on, applied to ex-vivo CTs of real femur shapes
(``families.generate_case("exvivo", ...)``) by :func:`new_site`:

- protocol: the specimen stands upright in its holder (shaft along the scanner's z axis, head up; cases whose
  shaft lies more than 30 degrees off an image axis are skipped), field of view cut to the specimen plus 15-40 mm;
- grid: 0.6 x 0.6 mm in-plane, 1.5 mm slices across the shaft: the case is rendered on that grid
  (``generate_case(..., scan=(0.6, 1.5))``), so its label is exact there;
- bone-like potting: a resin as dense as cortical bone (700-1000 HU) grips the distal 30 mm of the shaft;
- calibration: the site's numbers are HU' = 1.12 HU + 45 (water reads +45);
- noise: white noise of 60 HU on top of the rendering's own.

Steps: 10 held-out cases (held-out subjects, never used to train any FemurSeg model) are scored with the base model
and with fill; 8 training-subject cases (seeds from 5000, unused by the recipe) are exported into a dataset through
the exporter, as a user would, plus 2 test cases for the fine-tuning's own before/after check; ``python -m
FemurSegLib finetune`` runs as a user runs it (a child process, ``--minutes`` budget for the whole job, the new model
installed into this benchmark's own models folder); the new model is scored on the 10 held-out cases.

    python benchmarks/finetune_benchmark.py [--minutes 30] [--test-cases 10] [--train-cases 8] [--model NAME]
                                            [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACING = (0.6, 0.6, 1.5)
CALIBRATION = (1.12, 45.0)  # HU' = slope * HU + intercept
NOISE_HU = 60.0
POT_HU = (700.0, 1000.0)
POT_LENGTH_MM = 30.0
MARGIN_MM = (15.0, 40.0)
MAX_TILT_DEGREES = 30.0
TRAIN_SEED_START = 5000  # the v4 recipe uses seeds 1000-1159
TEST_SEED_START = 1


def new_site(ct: sitk.Image, label: sitk.Image, pose: np.ndarray,
             rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image] | None:
    """The site's profile applied to an ex-vivo case rendered on the site's grid (see the module docstring); None
    when the specimen would not stand upright in the site's holder (its shaft over MAX_TILT_DEGREES off every image
    axis)."""
    shaft = np.asarray(pose)[:, 2]  # the specimen's shaft (distal -> proximal) in the image axes
    axis = int(np.argmax(np.abs(shaft)))
    if abs(shaft[axis]) < np.cos(np.deg2rad(MAX_TILT_DEGREES)):
        return None
    if not np.allclose(sorted(ct.GetSpacing()), sorted(SPACING)):
        return None  # too large for the site's grid even at the tightest field of view (families.MAX_VOXELS)
    order = [a for a in range(3) if a != axis] + [axis]  # the shaft axis becomes the slice axis, head up
    images = []
    for image in (ct, label):
        image = sitk.PermuteAxes(image, order)
        if shaft[axis] < 0:
            image = sitk.Flip(image, [False, False, True])
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
        image.SetOrigin((0.0, 0.0, 0.0))
        images.append(image)
    ct, label = images
    mask = sitk.GetArrayViewFromImage(label) != 0
    low, high = np.argwhere(mask).min(0), np.argwhere(mask).max(0) + 1  # z, y, x
    spacing_zyx = np.array(ct.GetSpacing()[::-1])
    margin = np.round(rng.uniform(*MARGIN_MM, size=(2, 3)) / spacing_zyx).astype(int)
    start = np.maximum(low - margin[0], 0)
    stop = np.minimum(high + margin[1], mask.shape)
    ct, label = (sitk.RegionOfInterest(image, [int(v) for v in (stop - start)[::-1]], [int(v) for v in start[::-1]])
                 for image in (ct, label))
    hu, femur = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(label) != 0
    hu = _pot(hu, femur, rng)
    hu = CALIBRATION[0] * hu + CALIBRATION[1] + rng.normal(0.0, NOISE_HU, hu.shape)
    site_ct = sitk.GetImageFromArray(np.clip(np.round(hu), -1024, 3071).astype(np.int16))
    site_ct.CopyInformation(ct)
    return site_ct, label


def _pot(hu: np.ndarray, femur: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bone-dense potting cylinder around the distal POT_LENGTH_MM of the shaft (lowest slices), partial-volume
    edges; the femur itself is left as it is."""
    from scipy import ndimage

    slices = np.flatnonzero(femur.any(axis=(1, 2)))
    bottom = int(slices[0])
    top = bottom + int(round(POT_LENGTH_MM / SPACING[2]))
    slab = np.argwhere(femur[bottom:top])
    centre = slab[:, 1:].mean(0) * SPACING[0]
    radius = float(np.max(np.hypot(*(slab[:, 1:] * SPACING[0] - centre).T))) + float(rng.uniform(5.0, 10.0))
    y, x = np.indices(hu.shape[1:]) * SPACING[0]
    disc = np.hypot(y - centre[0], x - centre[1]) < radius
    cylinder = np.zeros(hu.shape, dtype=np.float32)
    cylinder[max(0, bottom - int(round(8.0 / SPACING[2]))):top] = disc
    weight = ndimage.gaussian_filter(cylinder, sigma=(0.4, 1.0, 1.0)) * ~femur
    return hu * (1 - weight) + float(rng.uniform(*POT_HU)) * weight


def make_cases(count: int, held_out: bool, seed_start: int, folder: Path) -> dict[str, tuple[Path, Path]]:
    """``count`` new-site cases written to ``folder`` as (CT, label) files, by name."""
    from FemurSegLib.synthetic.cases import generate_case

    folder.mkdir(parents=True, exist_ok=True)
    cases, seed = {}, seed_start
    while len(cases) < count:
        ct, label, info = generate_case("exvivo", seed, held_out=held_out, scan=(SPACING[0], SPACING[2]))
        site = new_site(ct, label, np.array(info.details["pose"]), np.random.default_rng([seed, int(held_out)]))
        if site is not None:
            name = f"{'heldout' if held_out else 'site'}{seed:04d}"
            paths = folder / f"{name}.nii.gz", folder / f"{name}-label.nii.gz"
            for image, path in zip(site, paths):
                sitk.WriteImage(image, str(path), True)
            cases[name] = paths
            print(f"  {name}: {info.subjects[0]} {info.sides[0]}, {list(site[0].GetSize())} voxels", flush=True)
        seed += 1
    return cases


def score_fill(cases: dict[str, tuple[Path, Path]]) -> dict:
    """Fill (default parameters, as a user would run it) with the same metrics as finetune.measure."""
    from FemurSegLib.fill import compute_fill
    from FemurSegLib.imageio import mask_array
    from FemurSegLib.metrics import compare_masks

    per_case = {}
    for name, (image, label) in cases.items():
        ct = sitk.ReadImage(str(image))
        agreement = compare_masks(mask_array(sitk.ReadImage(str(label))), mask_array(compute_fill(ct)),
                                  tuple(reversed(ct.GetSpacing())))
        per_case[name] = {"dice": agreement.dice, "asd_mm": agreement.asd_mm}
    dice = [v["dice"] for v in per_case.values()]
    return {"cases": len(dice), "dice": float(np.mean(dice)), "min_dice": float(np.min(dice)),
            "asd_mm": float(np.mean([v["asd_mm"] for v in per_case.values()])), "no_femur": 0, "per_case": per_case}


def run_finetune(dataset: Path, base: str | None, name: str, minutes: float, models_dir: Path) -> tuple[dict, float]:
    """``python -m FemurSegLib finetune`` as a user runs it; its messages are shown as they come."""
    command = [sys.executable, "-m", "FemurSegLib", "finetune", str(dataset), "--name", name, "--minutes",
               str(minutes), "--device", "cpu", "--progress-json"] + (["--from", base] if base else [])
    environment = dict(os.environ, FEMURSEG_MODELS_DIR=str(models_dir), PYTHONPATH=str(REPO))
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    done = {}
    for line in process.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if "message" in event:
            print(f"  [{(time.monotonic() - started) / 60:5.1f} min] {event['message']}", flush=True)
        done = event if "done" in event else done
    error = process.stderr.read()
    if process.wait() != 0:
        raise SystemExit(f"fine-tuning failed:\n{error[-3000:]}")
    return done, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="fine-tuning budget, the whole job (default 30)")
    parser.add_argument("--test-cases", type=int, default=10, help="held-out new-site cases scored (default 10)")
    parser.add_argument("--train-cases", type=int, default=8, help="cases exported for training (default 8)")
    parser.add_argument("--model", help="base model name or folder (default: the bundled model)")
    parser.add_argument("--work", type=Path, help="keep cases, dataset and the new model here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from FemurSegLib.dataset import export_case
    from FemurSegLib.finetune import measure
    from FemurSegLib.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    base = resolve_model(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="femurseg-finetune-benchmark-"))
    print(f"new site: ex-vivo real femur shapes, upright, {' x '.join(map(str, SPACING))} mm, potting "
          f"{POT_HU[0]:.0f}-{POT_HU[1]:.0f} HU, HU' = {CALIBRATION[0]} HU + {CALIBRATION[1]:g}, noise {NOISE_HU:g} HU")
    print(f"base model {base.name} (v{base.version}); work folder {work}")
    print(f"held-out cases (held-out subjects, seeds from {TEST_SEED_START}):")
    test = make_cases(args.test_cases, True, TEST_SEED_START, work / "heldout")
    print(f"training cases (training subjects, seeds from {TRAIN_SEED_START}):")
    train = make_cases(args.train_cases + 2, False, TRAIN_SEED_START, work / "site")

    dataset = work / "Dataset601_NewSite"
    for index, (name, (image, label)) in enumerate(train.items()):  # the last two: the fine-tuning's test cases
        export_case(image, label, dataset, name, test=index >= args.train_cases)
    print(f"exported {args.train_cases} training + 2 test cases into {dataset}")

    results = {"base": measure(base.root, test, "cpu"), "fill": score_fill(test)}
    name = f"{base.name}-NewSite"
    done, seconds = run_finetune(dataset, args.model, name, args.minutes, work / "models")
    results["fine-tuned"] = measure(Path(done["model"]), test, "cpu")
    card = json.loads((Path(done["model"]) / "model_card.json").read_text())
    report(results, base.name, card, seconds, args)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "finetune": card["finetune"],
                                         "card_validation": card["validation"], "seconds": seconds}, indent=2))


def report(results: dict, base_name: str, card: dict, seconds: float, args: argparse.Namespace) -> None:
    def asd(value) -> str:
        return f"{value:8.3f}" if value is not None else "     n/a"

    finetune = card["finetune"]
    print(f"\nfine-tuning: {seconds / 60:.1f} min wall (budget {args.minutes:g}), {finetune['iterations']} iterations "
          f"({finetune['epochs']} epochs) on {finetune['training_pieces']} case(s); its own check "
          f"on 2 test cases: {card['validation']['before']['dice']:.4f} -> {card['validation']['after']['dice']:.4f}")
    print(f"held-out new-site cases: {results['base']['cases']}")
    print(f"{'method':34s} {'Dice':>7s} {'min Dice':>9s} {'ASD mm':>8s}  no femur")
    labels = {"base": f"base {base_name}", "fine-tuned": "fine-tuned", "fill": "fill (350 HU)"}
    for key in ("base", "fine-tuned", "fill"):
        r = results[key]
        print(f"{labels[key]:34s} {r['dice']:7.4f} {r['min_dice']:9.4f} {asd(r['asd_mm'])}  {r['no_femur']}")
    print(f"{'case':14s} {'base':>7s} {'tuned':>7s} {'fill':>7s}")
    for case in results["base"]["per_case"]:
        print(f"{case:14s} " + " ".join(f"{results[k]['per_case'][case]['dice']:7.4f}"
                                        for k in ("base", "fine-tuned", "fill")))
    after, before = results["fine-tuned"]["dice"], results["base"]["dice"]
    print(f"targets: Dice after >= 0.98: {'yes' if after >= 0.98 else 'no'} ({after:.4f}); gain >= +0.02: "
          f"{'yes' if after - before >= 0.02 else 'no'} ({after - before:+.4f}); within 30 min: "
          f"{'yes' if seconds <= 30 * 60 else 'no'} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
