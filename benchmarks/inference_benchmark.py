"""FemurSeg's engine vs stock nnUNetPredictor defaults on the same weights, side by side in one run.

Each engine runs in its own child process (so peak RSS and cold start are its own) over the same held-out
phantoms (seeds 1..N; training used seeds >= 1000). Stock = ``nnUNetPredictor()`` defaults: test-time mirroring
on, tile step 0.5, Gaussian weighting, the trained patch size. FemurSeg = ``inference.Segmenter`` defaults: no
mirroring, nnU-Net's sliding window at tile step 1.0, largest component; "femurseg-mirrored" adds test-time mirroring. The parent
scores every engine against the exact labels, scores fill and a plain threshold, and prints a table plus the speed
ratio.

    python benchmarks/inference_benchmark.py [--cases 10] [--json OUT]
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
# "femurseg-mirrored" is FemurSeg's engine with test-time mirroring (the GUI's "fast" box unticked).
ENGINES = ("femurseg", "femurseg-mirrored", "stock")
sys.path.insert(0, str(REPO))


def worker(engine: str, seeds: list[int], out_dir: Path) -> dict:
    """Runs in a child: load the model (cold), segment every phantom (warm), record times and peak RSS.

    The CTs are read from files the parent wrote, so the peak RSS is the engine's, not the phantom generator's.
    """
    import SimpleITK as sitk

    started = time.perf_counter()
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    from FemurSegLib.inference import InferenceOptions, Segmenter
    from FemurSegLib.models import resolve_model

    model = resolve_model(None)
    if engine.startswith("femurseg"):
        options = InferenceOptions(device="cpu", fast=engine != "femurseg-mirrored")
        segmenter = Segmenter(model.root, options, notify=lambda message: None)

        def predict(ct):
            return segmenter.segment(ct)
    else:
        import numpy as np
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        torch.set_num_threads(os.cpu_count() or 1)
        predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)  # stock defaults
        predictor.initialize_from_trained_model_folder(str(model.trained_folder), use_folds=model.folds)

        def predict(ct):
            array = sitk.GetArrayFromImage(ct).astype(np.float32)[None]
            result = predictor.predict_single_npy_array(array, {"spacing": list(reversed(ct.GetSpacing()))})
            label = sitk.GetImageFromArray((np.asarray(result) == model.femur_label).astype(np.uint8))
            label.CopyInformation(ct)
            return label

    load_s = time.perf_counter() - started
    times = []
    for index, seed in enumerate(seeds):
        ct = sitk.ReadImage(str(out_dir / f"ct_{seed}.nrrd"))
        tick = time.perf_counter()
        label = predict(ct)
        times.append(time.perf_counter() - tick)
        sitk.WriteImage(label, str(out_dir / f"{engine}_{seed}.nrrd"))
        if index == 0:
            first_case_total_s = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"engine": engine, "load_s": load_s, "cold_first_case_s": first_case_total_s, "times_s": times,
            "peak_rss_gib": peak_kib / 1024**2}


def run_engine(engine: str, seeds: list[int], out_dir: Path) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--seeds", ",".join(map(str, seeds)),
               "--out-dir", str(out_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--card", action="store_true", help="write the held-out metrics into the model card")
    parser.add_argument("--worker"), parser.add_argument("--seeds"), parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, [int(s) for s in args.seeds.split(",")], args.out_dir)))
        return

    import numpy as np
    import SimpleITK as sitk

    from FemurSegLib.fill import FillParameters, compute_fill, largest_component, threshold_mask
    from FemurSegLib.metrics import compare_images
    from FemurSegLib.phantom import generate_phantom

    seeds = list(range(1, args.cases + 1))
    with tempfile.TemporaryDirectory() as temporary:
        out_dir = Path(temporary)
        for seed in seeds:
            sitk.WriteImage(generate_phantom(seed)[0], str(out_dir / f"ct_{seed}.nrrd"))
        runs = {engine: run_engine(engine, seeds, out_dir) for engine in ENGINES}
        scores: dict[str, list] = {name: [] for name in (*ENGINES, "fill", "threshold", "agreement",
                                                         "agreement-mirrored", "agreement-lcc")}
        for seed in seeds:
            ct, truth, _ = generate_phantom(seed)
            predictions = {e: sitk.ReadImage(str(out_dir / f"{e}_{seed}.nrrd")) for e in ENGINES}
            predictions["fill"] = compute_fill(ct, FillParameters())
            predictions["threshold"] = threshold_mask(ct, FillParameters().threshold_hu)
            for name, label in predictions.items():
                scores[name].append(compare_images(truth, label))
            scores["agreement"].append(compare_images(predictions["stock"], predictions["femurseg"]).dice)
            scores["agreement-mirrored"].append(
                compare_images(predictions["stock"], predictions["femurseg-mirrored"]).dice)
            # Stock nnU-Net keeps stray islands; with FemurSeg's largest-component step applied to it too, what is
            # left of the disagreement is the inference itself (tiles, mirroring).
            stock_lcc = sitk.GetImageFromArray(largest_component(sitk.GetArrayFromImage(predictions["stock"]) != 0)
                                               .astype(np.uint8))
            stock_lcc.CopyInformation(predictions["stock"])
            scores["agreement-lcc"].append(compare_images(stock_lcc, predictions["femurseg"]).dice)

    def mean(name: str, key: str) -> float:
        return float(np.mean([getattr(a, key) for a in scores[name]]))

    print(f"held-out phantoms: seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} cases), CPU threads {os.cpu_count()}")
    print(f"{'method':26s}{'Dice':>9s}{'min Dice':>10s}{'sens':>8s}{'spec':>8s}{'ASD mm':>9s}{'HD95 mm':>9s}")
    for name in (*ENGINES, "fill", "threshold"):
        dices = [a.dice for a in scores[name]]
        print(f"{name:26s}{np.mean(dices):9.4f}{np.min(dices):10.4f}{mean(name, 'sensitivity'):8.4f}"
              f"{mean(name, 'specificity'):8.4f}{mean(name, 'asd_mm'):9.4f}{mean(name, 'hd95_mm'):9.3f}")
    wins = int(sum(f.dice > max(t.dice, g.dice) for f, t, g in zip(scores["femurseg"], scores["fill"], scores["threshold"])))
    print(f"FemurSeg beats fill and threshold on {wins}/{len(seeds)} cases (Dice)")
    for key, label in (("agreement", "FemurSeg vs stock"), ("agreement-mirrored", "FemurSeg mirrored vs stock"),
                       ("agreement-lcc", "FemurSeg vs stock + largest component")):
        print(f"Dice agreement {label}: mean {np.mean(scores[key]):.4f}, min {np.min(scores[key]):.4f}")
    print(f"{'engine':26s}{'load s':>9s}{'cold 1st s':>12s}{'warm s/vol':>12s}{'peak RSS GiB':>14s}")
    for engine in ENGINES:
        run = runs[engine]
        warm = float(np.median(run["times_s"][1:] or run["times_s"]))
        run["warm_median_s"] = warm
        print(f"{engine:26s}{run['load_s']:9.2f}{run['cold_first_case_s']:12.2f}{warm:12.2f}{run['peak_rss_gib']:14.2f}")
    ratio = runs["stock"]["warm_median_s"] / runs["femurseg"]["warm_median_s"]
    print(f"speed-up (warm, stock / FemurSeg): {ratio:.1f}x")
    if args.json:
        summary = {"seeds": seeds, "runs": runs, "speedup_warm": ratio,
                   "mean": {n: {k: mean(n, k) for k in ("dice", "sensitivity", "specificity", "asd_mm", "hd95_mm")}
                            for n in (*ENGINES, "fill", "threshold")},
                   "min_dice": {n: float(np.min([a.dice for a in scores[n]])) for n in (*ENGINES, "fill", "threshold")},
                   "agreement_dice_mean": float(np.mean(scores["agreement"])),
                   "agreement_mirrored_dice_mean": float(np.mean(scores["agreement-mirrored"])),
                   "agreement_vs_stock_lcc_dice_mean": float(np.mean(scores["agreement-lcc"])), "wins": wins}
        args.json.write_text(json.dumps(summary, indent=2))
    if args.card:
        from FemurSegLib.models import resolve_model
        from FemurSegLib.training import write_model_card

        model = resolve_model(None)
        held_out = {f"{key} (mean, seeds {seeds[0]}-{seeds[-1]})": mean("femurseg", key)
                    for key in ("dice", "sensitivity", "specificity", "asd_mm", "hd95_mm")}
        held_out["min dice"] = float(np.min([a.dice for a in scores["femurseg"]]))
        held_out["warm seconds per volume (2-core CPU)"] = runs["femurseg"]["warm_median_s"]
        write_model_card(model.root, model.card.get("training", {}), held_out)


if __name__ == "__main__":
    main()
