"""FemurSeg's engine vs stock nnUNetPredictor defaults on the same weights vs fill, per phantom family, side by side.

Held-out cases only: legacy phantom seeds 1..N (training used seeds >= 1000), and ex-vivo / in-vivo / clinical
renders of the held-out subjects (Resources/Anatomy, ``held_out=True``), seeds 1..N. ``--no-femur M`` adds M
held-out clinical CTs without a femur (the lumbar spine or upper abdomen, the lower legs; seeds 1..M), on which
every femur FemurSeg reports is wrong. Each engine runs in its own child process,
so load time, cold start and peak RSS are its own:

- femurseg: ``inference.Segmenter`` defaults (locator, then the 1 mm network on each femur's region; no mirroring,
  tile step 1.0, B-spline to the 1 mm grid, largest component per femur, half-maximum edges (edges.py); sides;
  bfloat16 on a CPU with native bfloat16);
- femurseg-fp32 (``--fp32``): the same in float32, to show what bfloat16 changes;
- stock: ``nnUNetPredictor()`` defaults (mirroring, tile step 0.5) with the 1 mm network over the whole CT, as a
  plain nnU-Net user would run it; no sides, so each of its femur voxels is credited to the nearer true femur.

Scores per femur: Dice, ASD, HD95 (FemurSegLib.metrics), and for in-vivo cases whether FemurSeg named the side
right. Fill (Pahr & Zysset re-implementation) is scored the same way. ``--clinical`` adds one clinical-size in-vivo
CT (a held-out render resampled to 512 x 512 x 300 at 0.7 x 0.7 x 0.7 mm): seconds and peak RSS of FemurSeg.

    python benchmarks/inference_benchmark.py [--cases 5] [--families legacy exvivo invivo clinical]
                                             [--stock FAMILY ...] [--no-femur 50] [--fp32] [--clinical] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("femurseg", "femurseg-fp32", "stock")
FAMILIES = ("legacy", "exvivo", "invivo", "clinical")
NO_FEMUR_VIEWS = ("spine", "legs")  # clinical fields of view that hold no femur
sys.path.insert(0, str(REPO))


def worker(engine: str, cases: list[str], out_dir: Path, model_name: str | None) -> dict:
    """Runs in a child: load the model (cold), segment every case (warm), record times and peak RSS."""
    import numpy as np
    import SimpleITK as sitk

    started = time.perf_counter()
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    from FemurSegLib.inference import InferenceOptions, Segmenter
    from FemurSegLib.models import resolve_model

    model = resolve_model(model_name)
    if engine.startswith("femurseg"):
        options = InferenceOptions(device="cpu", bfloat16=engine == "femurseg")
        segmenter = Segmenter(model.root, options, notify=lambda message: None)

        def predict(ct):
            return segmenter.segment(ct)
    else:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        torch.set_num_threads(os.cpu_count() or 1)
        predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)  # stock defaults
        predictor.initialize_from_trained_model_folder(str(model.trained_folder), use_folds=model.folds)

        def predict(ct):
            oriented = sitk.DICOMOrient(ct, "LPS")
            array = sitk.GetArrayFromImage(oriented).astype(np.float32)[None]
            result = predictor.predict_single_npy_array(array, {"spacing": list(reversed(oriented.GetSpacing()))})
            label = sitk.GetImageFromArray((np.asarray(result) == model.femur_label).astype(np.uint8))
            label.CopyInformation(oriented)
            return sitk.Resample(label, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    load_s = time.perf_counter() - started
    times, first_case_total_s = [], 0.0
    for index, case in enumerate(cases):
        ct = sitk.ReadImage(str(out_dir / f"{case}_ct.nrrd"))
        tick = time.perf_counter()
        label = predict(ct)
        times.append(time.perf_counter() - tick)
        sitk.WriteImage(label, str(out_dir / f"{case}_{engine}.nrrd"), True)
        if index == 0:
            first_case_total_s = time.perf_counter() - started
    return {"engine": engine, "load_s": load_s, "cold_first_case_s": first_case_total_s,
            "times_s": dict(zip(cases, times)), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def run_engine(engine: str, cases: list[str], out_dir: Path, model_name: str | None) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--worker-cases", ",".join(cases),
               "--out-dir", str(out_dir)] + (["--model", model_name] if model_name else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _truth_by_side(truth, info) -> dict:
    """The true femur mask of each side (in-vivo: each piece goes to the nearer hip; else one 'femur')."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    mask = sitk.GetArrayFromImage(truth) != 0
    hips = info.get("details", {}).get("hips_lps")
    if not hips:
        return {"femur": mask}
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sides = {side: np.zeros_like(mask) for side in info["sides"]}
    for index in range(1, count + 1):
        piece = pieces == index
        centre = np.array(truth.TransformContinuousIndexToPhysicalPoint(np.argwhere(piece).mean(0)[::-1].tolist()))
        nearest = min(sides, key=lambda side: np.linalg.norm(centre - np.array(hips[side])))
        sides[nearest] |= piece
    return sides


def _score(truth_sides: dict, predicted, spacing, sided: bool, nearest_to: dict | None = None) -> list[dict]:
    """Per true femur: Dice, ASD, HD95 and whether the predicted side was right (``sided``: label 1 left, 2 right)."""
    import numpy as np

    from FemurSegLib.errors import FemurSegError
    from FemurSegLib.inference import LABEL_VALUES
    from FemurSegLib.metrics import compare_masks

    rows = []
    for side, truth in truth_sides.items():
        if side == "femur":
            guess, side_right = predicted != 0, None
        elif sided:
            guess = predicted == LABEL_VALUES[side]
            side_right = bool(guess.any() and (guess & truth).sum() >= 0.5 * truth.sum())
        elif nearest_to is None:  # unsided output, one true femur: all of it
            guess, side_right = predicted != 0, None
        else:  # unsided output: the predicted voxels nearer to this femur than to the other
            guess, side_right = (predicted != 0) & nearest_to[side], None
        try:
            agreement = compare_masks(truth, guess, spacing)
            rows.append({"side": side, "dice": agreement.dice, "asd_mm": agreement.asd_mm,
                         "hd95_mm": agreement.hd95_mm, "side_right": side_right})
        except FemurSegError:  # nothing predicted for this femur
            rows.append({"side": side, "dice": 0.0, "asd_mm": float("nan"), "hd95_mm": float("nan"),
                         "side_right": side_right})
    return rows


def _nearest(truth_sides: dict):
    """For unsided outputs: which voxels lie nearer to each true femur (a Voronoi split by distance)."""
    from scipy import ndimage

    if len(truth_sides) < 2:
        return None
    distances = {side: ndimage.distance_transform_edt(~mask) for side, mask in truth_sides.items()}
    left, right = distances.get("left"), distances.get("right")
    return {"left": left <= right, "right": right < left}


def clinical_case(out_dir: Path) -> str:
    """A held-out in-vivo render on a clinical grid: 512 x 512 x 300 voxels of 0.7 mm around its hips."""
    import numpy as np
    import SimpleITK as sitk

    from FemurSegLib.synthetic.cases import generate_case

    ct, _, info = generate_case("invivo", 1, held_out=True)
    hips = np.array(list(info.details["hips_lps"].values()))
    size, spacing = np.array([512, 512, 300]), 0.7
    origin = hips.mean(0) - size * spacing / 2 + np.array([0.0, 0.0, -40.0])
    reference = sitk.Image([int(v) for v in size], sitk.sitkInt16)
    reference.SetSpacing((spacing,) * 3)
    reference.SetOrigin(tuple(float(v) for v in origin))
    clinical = sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1000, sitk.sitkInt16)
    sitk.WriteImage(clinical, str(out_dir / "clinical_ct.nrrd"), True)
    return "clinical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5, help="held-out cases per family (seeds 1..N)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--stock", nargs="*", choices=FAMILIES, default=list(FAMILIES),
                        help="families to run stock nnU-Net on (mirrored whole-volume inference of an in-vivo CT takes "
                             "minutes per case on 2 cores)")
    parser.add_argument("--fp32", action="store_true",
                        help="add FemurSeg in float32 (by default it runs in bfloat16 on a CPU with native bfloat16)")
    parser.add_argument("--clinical", action="store_true", help="add the 512 x 512 x 300 in-vivo case (FemurSeg)")
    parser.add_argument("--no-femur", type=int, default=0, metavar="M",
                        help="add M held-out clinical CTs that hold no femur; count the femurs reported")
    parser.add_argument("--model", help="model name or folder (default: the bundled model)")
    parser.add_argument("--json", type=Path, help="write every figure as JSON")
    parser.add_argument("--card", action="store_true", help="write the held-out means into the model card")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-cases", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.worker_cases.split(","), args.out_dir, args.model)))
        return

    import numpy as np
    import SimpleITK as sitk

    from FemurSegLib.synthetic.cases import generate_case
    from FemurSegLib.fill import compute_fill

    results: dict = {"families": {}, "runs": {}}
    with tempfile.TemporaryDirectory() as temporary:
        out_dir = Path(temporary)
        infos = {}
        for family in args.families:
            for seed in range(1, args.cases + 1):
                case = f"{family}{seed}"
                ct, truth, info = generate_case(family, seed, held_out=family != "legacy")
                sitk.WriteImage(ct, str(out_dir / f"{case}_ct.nrrd"), True)
                sitk.WriteImage(truth, str(out_dir / f"{case}_truth.nrrd"), True)
                infos[case] = {"family": family, "sides": list(info.sides), "details": info.details,
                               "subjects": list(info.subjects)}
                if family == "clinical" and not info.sides:  # a drawn field of view without a femur
                    infos[case] = {"family": "no femur", "view": info.details["view"]}
        for seed in range(1, args.no_femur + 1):
            case = f"nofemur{seed}"
            ct, truth, info = generate_case("clinical", seed, held_out=True,
                                            view=NO_FEMUR_VIEWS[seed % len(NO_FEMUR_VIEWS)])
            sitk.WriteImage(ct, str(out_dir / f"{case}_ct.nrrd"), True)
            infos[case] = {"family": "no femur", "view": info.details["view"]}
        cases = list(infos)
        stock_cases = [case for case in cases if infos[case]["family"] in args.stock and infos[case].get("sides")]
        runs = {"femurseg": run_engine("femurseg", cases, out_dir, args.model)}
        if args.fp32:
            runs["femurseg-fp32"] = run_engine("femurseg-fp32", cases, out_dir, args.model)
        if stock_cases:
            runs["stock"] = run_engine("stock", stock_cases, out_dir, args.model)
        if args.clinical:
            runs["femurseg-clinical"] = run_engine("femurseg", [clinical_case(out_dir)], out_dir, args.model)
        results["runs"] = runs
        for case in cases:
            info = infos[case]
            if info["family"] == "no femur":
                found = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{case}_femurseg.nrrd")))
                results.setdefault("no_femur", []).append(
                    {"case": case, "view": info["view"], "femurs_reported": int(len(np.unique(found)) - 1),
                     "seconds": runs["femurseg"].get("times_s", {}).get(case)})
                continue
            truth = sitk.ReadImage(str(out_dir / f"{case}_truth.nrrd"))
            ct = sitk.ReadImage(str(out_dir / f"{case}_ct.nrrd"))
            spacing = tuple(reversed(truth.GetSpacing()))
            truth_sides = _truth_by_side(truth, info)
            nearest = _nearest(truth_sides)
            predictions = {engine: sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{case}_{engine}.nrrd")))
                           for engine in ENGINES if (out_dir / f"{case}_{engine}.nrrd").exists()}
            predictions["fill"] = sitk.GetArrayFromImage(compute_fill(ct))
            family = results["families"].setdefault(info["family"], {name: [] for name in (*ENGINES, "fill")})
            for name, predicted in predictions.items():
                sided = name.startswith("femurseg")
                for row in _score(truth_sides, predicted, spacing, sided=sided, nearest_to=nearest):
                    family[name].append({"case": case, "seconds": runs.get(name, {}).get("times_s", {}).get(case),
                                         **row})

    print(f"held-out cases, seeds 1-{args.cases} per family, CPU threads {os.cpu_count()}")
    print(f"{'family':8s} {'method':14s}{'femurs':>7s}{'Dice':>8s}{'min':>8s}{'ASD mm':>8s}{'HD95 mm':>9s}"
          f"{'side ok':>9s}{'s/case':>8s}")
    summary = {}
    for family, methods in results["families"].items():
        summary[family] = {}
        for name, rows in methods.items():
            if not rows:
                continue
            dices = [r["dice"] for r in rows]
            sided = [r["side_right"] for r in rows if r["side_right"] is not None]
            seconds = [r["seconds"] for r in rows if r["seconds"] is not None]
            summary[family][name] = {"dice": float(np.mean(dices)), "min_dice": float(np.min(dices)),
                                     "asd_mm": float(np.nanmean([r["asd_mm"] for r in rows])),
                                     "hd95_mm": float(np.nanmean([r["hd95_mm"] for r in rows]))}
            side_text = f"{sum(sided)}/{len(sided)}" if sided else "-"
            seconds_text = f"{np.median(seconds):8.1f}" if seconds else f"{'-':>8s}"
            print(f"{family:8s} {name:14s}{len(rows):7d}{np.mean(dices):8.4f}{np.min(dices):8.4f}"
                  f"{summary[family][name]['asd_mm']:8.3f}{summary[family][name]['hd95_mm']:9.2f}{side_text:>9s}"
                  f"{seconds_text}")
        wins = sum(f["dice"] > g["dice"] for f, g in zip(methods["femurseg"], methods["fill"]))
        print(f"{family:8s} FemurSeg beats fill on {wins}/{len(methods['femurseg'])} femurs (Dice)")
    empty = results.get("no_femur", [])
    if empty:
        views = {view: sum(1 for row in empty if row["view"] == view) for view in sorted({r["view"] for r in empty})}
        clean = sum(1 for row in empty if row["femurs_reported"] == 0)
        print(f"no femur: {len(empty)} held-out CTs ({', '.join(f'{v} {n}' for v, n in views.items())}): "
              f"{clean}/{len(empty)} with 0 femurs reported, {sum(r['femurs_reported'] for r in empty)} femurs "
              "reported in all")
        summary["no femur"] = {"cases": len(empty), "clean": clean}
        print(f"{'engine':18s}{'load s':>8s}{'cold 1st s':>12s}{'warm s/vol':>12s}{'peak RSS GiB':>14s}")
    for engine, run in runs.items():
        times = list(run["times_s"].values())
        warm = float(np.median(times[1:] or times))
        print(f"{engine:18s}{run['load_s']:8.2f}{run['cold_first_case_s']:12.2f}{warm:12.2f}{run['peak_rss_gib']:14.2f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, **results}, indent=2, default=str))
    if args.card:
        from FemurSegLib.models import resolve_model
        from FemurSegLib.training import write_model_card

        model = resolve_model(args.model)
        held_out = {family: ({**values["femurseg"], "fill dice": values["fill"]["dice"]} if "femurseg" in values
                             else values) for family, values in summary.items()}
        write_model_card(model.root, model.card.get("training", {}), held_out)


if __name__ == "__main__":
    main()
