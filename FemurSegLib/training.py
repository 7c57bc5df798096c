"""The recipe that trains FemurSeg's bundled model, with nnU-Net's own planner, preprocessing and trainer.

Model v7 is two nnU-Net configurations, v6's locator and 1 mm network continued (``--base-model``, v6's plans) on
mostly clinical CTs (synthetic/clinical.py: spine, sacrum, organs, knees, CTs without a femur) with the older
families (synthetic/cases.py: legacy SDF phantoms, ex-vivo real shapes, in-vivo hip CTs) in the mix; its model card
says exactly how. Training subjects only:

- ``3d_locator`` on ``LOCATOR_DATASET`` (whole fields of view): 3 mm voxels, 64^3 patches (19 cm of context):
  finds the femur(s) in a whole CT cheaply (a 512 x 512 x 300 CT is ~120 x 120 x 80 voxels at 3 mm);
- ``3d_femurseg`` on ``DATASET`` (the box around each femur, as inference crops it: bounding box plus a random
  10-60 mm margin, cut from the same CTs): 1 mm voxels, 80^3 patches. Inference boxes are the locator's find plus
  18 mm, and a locator that takes some hip bone for femur widens them; with margins of only 10-30 mm the network
  rarely saw the pubis, ischium and ilium beyond the acetabulum, and labelled them femur (v4 interim, in-vivo).

Both are narrow U-Nets (8 -> 128 features; DESIGN.md §4: the default plan costs ~50 s per iteration here). Why the
split: bundled model v3 ran its 1 mm network over the whole field of view and invented femurs in empty margins;
at 3 mm the locator sees a whole hip in one patch, and the fine network only ever sees femur-centred regions.

Phases (``--stage``), each resumable: ``data`` (cases through the dataset exporter), ``plan`` (nnU-Net fingerprint
and planner, the recipe's two configurations, preprocessing), ``locator``, ``fine`` (continues to each count of
``--fine-epochs`` in turn), ``bundle`` (stripped fp16 checkpoints, both configurations, model card).

History: v3 (legacy phantoms only, one 1 mm network over the whole volume) reached held-out phantom Dice 0.991
but 0.000 on real shapes ex-vivo (DESIGN.md §7). v6 (femurs and hip bones only) reported two femurs on every real
CT, femur in view or not (DESIGN.md §9): v7's world adds what real CTs hold around the femurs. Training seeds start at ``TRAIN_SEED_START``; held-out
subjects (Resources/Anatomy) and seeds 1-999 of every family are never used here. The checkpoints are trained by
the plain ``nnUNetTrainer`` class (only epoch and iteration counts are set on the instance), so any nnU-Net v2
installation can load them. On a CPU with native bfloat16 the network's forward pass trains in it (precision.py,
about twice the steps per hour); v4-v6 were trained in float32, before that.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .precision import bfloat16_forward

TRAIN_SEED_START = 1000
LOCATOR_DATASET_ID = 501
LOCATOR_DATASET = f"Dataset{LOCATOR_DATASET_ID}_FemurFieldOfView"
DATASET_ID = 502
DATASET_NAME = f"Dataset{DATASET_ID}_FemurRegion"
CONFIGURATION = "3d_femurseg"
LOCATOR_CONFIGURATION = "3d_locator"
MODEL_NAME = "FemurReal3dSmall"
MODEL_VERSION = "7"
# Share of each family among the training cases. v7 continues v6 (trained on exvivo 9, invivo 7, legacy 4) on
# mostly clinical CTs (spine, sacrum, organs, knees, CTs without a femur), with the old families kept in the mix.
FAMILY_MIX = (("clinical", 10), ("exvivo", 5), ("invivo", 3), ("legacy", 2))
# Base learning rate when continuing a model's weights (--base-model): as fine-tuning does (finetune.FINETUNE_LR).
CONTINUE_LR = 0.005
# Regions around bones that are not femur (vertebrae, sacrum, tibia, ...), with empty labels, per case at most:
# the 1 mm network sees what a locator's wrong find would show it, and learns to leave it out.
NEGATIVE_REGIONS = 2


def _architecture(features: list[int]) -> dict:
    stages = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": features,
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * stages,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
            "n_conv_per_stage": [2] * stages,
            "n_conv_per_stage_decoder": [2] * (stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


RECIPE_CONFIGURATIONS = {
    CONFIGURATION: {"spacing": [1.0, 1.0, 1.0], "patch_size": [80, 80, 80], "batch_size": 2,
                    "architecture": _architecture([8, 16, 32, 64, 128])},
    LOCATOR_CONFIGURATION: {"spacing": [3.0, 3.0, 3.0], "patch_size": [64, 64, 64], "batch_size": 2,
                            "architecture": _architecture([8, 16, 32, 64, 128])},
}
DATASETS = {CONFIGURATION: (DATASET_ID, DATASET_NAME), LOCATOR_CONFIGURATION: (LOCATOR_DATASET_ID, LOCATOR_DATASET)}
REGION_MARGIN_MM = (10.0, 60.0)
# Legacy phantoms are cut tight around their water box; in training two in three are set in a wider field of
# view (0-60 mm a side, air or water), as the ex-vivo family is. Without it the network learned to tell the
# legacy family by its frame: its legacy edge held in water and moved in air (the unbundled v5 candidate moved
# the padded sample by 0.0051-0.0056 Dice; v6, trained so, by 0.0030-0.0044).
LEGACY_WIDENING_MM = 60.0


def set_nnunet_paths(work_dir: Path) -> None:
    for variable, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(work_dir / sub)


def case_family(index: int) -> str:
    """The family of training case ``index``: FAMILY_MIX repeated, so any prefix of the cases is mixed."""
    cycle = [family for family, share in FAMILY_MIX for _ in range(share)]
    order = sorted(range(len(cycle)), key=lambda i: (i * 7919) % len(cycle))  # interleave the families
    return cycle[order[index % len(cycle)]]


def femur_regions(ct, label, rng) -> list:
    """(CT, label) cut to each femur's bounding box plus a random margin: what the 1 mm network sees at inference."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    mask = sitk.GetArrayViewFromImage(label) != 0
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    regions = []
    for box in ndimage.find_objects(pieces):
        if box is None:
            continue
        margin = rng.uniform(*REGION_MARGIN_MM, size=(3, 2)) / np.array(ct.GetSpacing()[::-1])[:, None]
        start = [max(0, int(b.start - m[0])) for b, m in zip(box, margin)]
        stop = [min(n, int(np.ceil(b.stop + m[1]))) for b, m, n in zip(box, margin, mask.shape)]
        index, size = start[::-1], [b - a for a, b in zip(start, stop)][::-1]
        piece = [sitk.RegionOfInterest(image, size, index) for image in (ct, label)]
        if np.count_nonzero(sitk.GetArrayViewFromImage(piece[1])) * np.prod(ct.GetSpacing()) > 15_000:
            regions.append(piece)  # not a sliver of femur at the edge of the field of view
    return regions


def negative_regions(ct, label, rng, count: int = NEGATIVE_REGIONS) -> list:
    """(CT, empty label) boxes around bright pieces that are not femur (at least 20 ml above 250 HU and 20 mm from
    any femur), the box of each plus a random 10-60 mm margin, at most ``count``, drawn at random."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    spacing_zyx = np.array(ct.GetSpacing()[::-1])
    femur = sitk.GetArrayViewFromImage(label) != 0
    near_femur = ndimage.distance_transform_edt(~femur, sampling=spacing_zyx) < 20.0 if femur.any() else femur
    bright = (sitk.GetArrayViewFromImage(ct) > 250) & ~near_femur
    pieces, _ = ndimage.label(bright, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(pieces.ravel())[1:] * float(np.prod(spacing_zyx)) / 1000.0
    candidates = [i for i in np.flatnonzero(sizes >= 20.0)]
    regions = []
    for index in rng.permutation(candidates)[:count] if candidates else []:
        box = ndimage.find_objects((pieces == index + 1).astype(np.uint8))[0]
        margin = rng.uniform(*REGION_MARGIN_MM, size=(3, 2)) / spacing_zyx[:, None]
        start = [max(0, int(b.start - m[0])) for b, m in zip(box, margin)]
        stop = [min(n, int(np.ceil(b.stop + m[1]))) for b, m, n in zip(box, margin, femur.shape)]
        stop = [min(n, max(b, a + 40)) for a, b, n in zip(start, stop, femur.shape)]
        piece_ct = sitk.RegionOfInterest(ct, [b - a for a, b in zip(start, stop)][::-1], start[::-1])
        empty = sitk.Image(piece_ct.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(piece_ct)
        regions.append((piece_ct, empty))
    return regions


def widen_field_of_view(ct, label, rng) -> tuple:
    """(CT, label) set in a field of view wider by 0-LEGACY_WIDENING_MM a side, of air or of the CT's own
    background (its border's median and noise level); one time in three unchanged."""
    import numpy as np
    import SimpleITK as sitk

    if rng.random() < 1 / 3:
        return ct, label
    array = sitk.GetArrayViewFromImage(ct)
    border = np.concatenate([array[:, :, :3].ravel(), array[:, :, -3:].ravel()]).astype(np.float32)
    background = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - background)))  # robust: the border cuts through the rods
    level = -1000.0 if rng.random() < 0.5 else background
    spacing = np.array(ct.GetSpacing())
    lower, upper = (np.round(rng.uniform(0, LEGACY_WIDENING_MM, 3) / spacing).astype(int) for _ in range(2))
    wide = [sitk.ConstantPad(image, lower.tolist(), upper.tolist(), 0) for image in (ct, label)]
    padded = sitk.GetArrayFromImage(wide[0]).astype(np.float32)
    inside = np.zeros(padded.shape, dtype=bool)
    inside[tuple(slice(lo, lo + n) for lo, n in zip(lower[::-1], array.shape))] = True
    padded[~inside] = rng.normal(level, noise, int(np.count_nonzero(~inside)))
    widened = sitk.GetImageFromArray(np.round(padded).astype(np.int16))
    widened.CopyInformation(wide[0])
    return widened, wide[1]


def write_training_dataset(work_dir: Path, count: int) -> None:
    """Training cases 0..count-1 (seed TRAIN_SEED_START + index), through the dataset exporter: the whole CT into
    the locator's dataset, each femur's region into the 1 mm network's; cases already there are skipped."""
    import numpy as np

    from .dataset import export_case
    from .synthetic.cases import generate_case

    description = "FemurSeg synthetic femur CTs (FemurSegLib.synthetic.cases), training subjects only"
    for index in range(count):
        family, seed = case_family(index), TRAIN_SEED_START + index
        case = f"{family}{seed}"
        if (work_dir / "raw" / DATASET_NAME / "femurseg" / f"{case}.done").exists():
            continue
        started = time.time()
        ct, label, info = generate_case(family, seed)
        if family == "legacy":
            ct, label = widen_field_of_view(ct, label, np.random.default_rng([seed, 1]))
        provenance = {"family": family, "seed": seed, "subjects": list(info.subjects), "sides": list(info.sides)}
        export_case(ct, label, work_dir / "raw" / LOCATOR_DATASET, case, replace=True, provenance=provenance,
                    description=description + ", whole fields of view", force=True)  # CTs without a femur too
        rng = np.random.default_rng(seed)
        regions = femur_regions(ct, label, rng) + (negative_regions(ct, label, rng) if family == "clinical" else [])
        for number, (region_ct, region_label) in enumerate(regions):
            export_case(region_ct, region_label, work_dir / "raw" / DATASET_NAME, f"{case}_{number}", replace=True,
                        provenance=provenance, description=description + ", the region around each femur",
                        force=True)  # regions around other bones are empty
        (work_dir / "raw" / DATASET_NAME / "femurseg" / f"{case}.done").touch()
        print(f"case {index + 1}/{count} {case}: {list(info.size)} voxels, {time.time() - started:.0f} s", flush=True)


def plan_and_preprocess(work_dir: Path, base_model: Path | None = None) -> None:
    """nnU-Net's fingerprint, planner and preprocessing; with ``base_model`` its plans instead of new ones (the
    weights continued need the same spacing, patch and normalisation)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    from .imageio import write_bytes_atomic

    for configuration, (dataset_id, dataset) in DATASETS.items():
        if base_model is not None:
            source = base_model / dataset / f"nnUNetTrainer__nnUNetPlans__{configuration}"
            target = work_dir / "preprocessed" / dataset
            target.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target / "nnUNetPlans.json", (source / "plans.json").read_bytes())
            write_bytes_atomic(target / "dataset_fingerprint.json", (source / "dataset_fingerprint.json").read_bytes())
            write_bytes_atomic(target / "dataset.json", (work_dir / "raw" / dataset / "dataset.json").read_bytes())
            preprocess([dataset_id], configurations=(configuration,), num_processes=(2,))
            continue
        extract_fingerprints([dataset_id], num_processes=2, check_dataset_integrity=True)
        plan_experiments([dataset_id])
        add_recipe_configuration(work_dir, configuration)
        preprocess([dataset_id], configurations=(configuration,), num_processes=(2,))


def add_recipe_configuration(work_dir: Path, configuration: str) -> None:
    """Write one of the recipe's configurations into its dataset's nnU-Net plans."""
    from .imageio import write_bytes_atomic

    plans_path = work_dir / "preprocessed" / DATASETS[configuration][1] / "nnUNetPlans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"][configuration] = {"inherits_from": "3d_fullres",
                                              "data_identifier": f"nnUNetPlans_{configuration}",
                                              **RECIPE_CONFIGURATIONS[configuration]}
    write_bytes_atomic(plans_path, json.dumps(plans, indent=2).encode())


def trained_folder(work_dir: Path, configuration: str) -> Path:
    return work_dir / "results" / DATASETS[configuration][1] / f"nnUNetTrainer__nnUNetPlans__{configuration}"


def train(work_dir: Path, configuration: str, epochs: int, iterations_per_epoch: int,
          initial_lr: float = 0.01, threads: int | None = None, base_model: Path | None = None) -> Path:
    """Train fold 'all' with the plain nnUNetTrainer up to ``epochs``, resuming from the last checkpoint; a first
    run with ``base_model`` starts from that model's weights (every layer) at CONTINUE_LR."""
    # Augmentation in the main process: as fast as 2 workers on 2 cores (DESIGN.md §4). Set only here: the
    # planner calls torch.set_num_threads(nnUNet_n_proc_DA), which refuses 0.
    os.environ["nnUNet_n_proc_DA"] = "0"
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.set_num_threads(threads or os.cpu_count() or 1)
    preprocessed = work_dir / "preprocessed" / DATASETS[configuration][1]
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    fold = trained_folder(work_dir, configuration) / "fold_all"
    # Continue an interrupted run (latest) or extend a finished one to more epochs (final keeps its epoch count).
    resume = next((fold / name for name in ("checkpoint_latest.pth", "checkpoint_final.pth")
                   if (fold / name).exists()), None)
    plans["continue_training"] = resume is not None
    trainer = nnUNetTrainer(plans, configuration, "all", dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = 4
    trainer.initial_lr = CONTINUE_LR if base_model is not None else initial_lr
    trainer.save_every = 1
    trainer.initialize()
    bfloat16_forward(trainer.network, trainer.device)  # on a CPU that has it natively: ~2x faster steps
    if resume is not None:
        trainer.load_checkpoint(str(resume))
    elif base_model is not None:
        checkpoint = (base_model / DATASETS[configuration][1] / f"nnUNetTrainer__nnUNetPlans__{configuration}"
                      / "fold_all" / "checkpoint_final.pth")
        weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["network_weights"]
        trainer.network.load_state_dict({k: v.float() for k, v in weights.items()})
    trainer.run_training()
    return Path(trainer.output_folder)


def _positive(text: str) -> int:
    """A count of at least 1 (``--locator-epochs -3`` was accepted and trained nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def add_recipe_arguments(parser) -> None:
    """The recipe's options, shared by ``femurseg train-bundled`` and ``python -m FemurSegLib.training``."""
    parser.add_argument("work_dir", type=Path, help="folder for nnU-Net's raw, preprocessed and results data")
    parser.add_argument("--cases", type=_positive, default=160, help="training cases (families mixed as FAMILY_MIX)")
    parser.add_argument("--iterations", type=_positive, default=50, help="iterations per epoch")
    parser.add_argument("--locator-epochs", type=_positive, default=40, help="epochs of the 3 mm locator")
    parser.add_argument("--fine-epochs", type=_positive, nargs="+", default=[120, 200],
                        help="continue the 1 mm network to each of these epoch counts in turn")
    parser.add_argument("--stage", choices=["data", "plan", "locator", "fine", "bundle", "all"], default="all",
                        help="run one phase (each resumes where it stopped) or all of them")
    parser.add_argument("--base-model", type=Path,
                        help="continue this model's weights with its plans (v7: the bundled v6) instead of new ones")
    parser.add_argument("--threads", type=_positive,
                        help="PyTorch threads (default: all cores; 1 each lets the locator and the 1 mm network train "
                             "side by side on 2 cores)")
    parser.add_argument("--model-dir", type=Path,
                        help=f"new folder for the trained model (default WORK_DIR/{MODEL_NAME}-v{MODEL_VERSION}); "
                             "a model bundled with FemurSeg is never overwritten")


def missing_stage_inputs(work_dir: Path, stage: str) -> list[tuple[str, Path]]:
    """(earlier stage, file) pairs that one stage run alone needs and that are not there yet."""
    needs = {"plan": [("data", work_dir / "raw" / name / "dataset.json") for _, name in DATASETS.values()],
             "locator": [("plan", work_dir / "preprocessed" / LOCATOR_DATASET / "nnUNetPlans.json")],
             "fine": [("plan", work_dir / "preprocessed" / DATASET_NAME / "nnUNetPlans.json")],
             "bundle": [("locator" if c == LOCATOR_CONFIGURATION else "fine", trained_folder(work_dir, c) / "fold_all"
                         / "checkpoint_final.pth") for c in RECIPE_CONFIGURATIONS]}
    def present(path: Path) -> bool:  # bundle_model takes the latest checkpoint where training was stopped early
        return path.is_file() or (path.name == "checkpoint_final.pth"
                                  and path.with_name("checkpoint_latest.pth").is_file())
    return [(earlier, path) for earlier, path in needs.get(stage, []) if not present(path)]


def run_recipe(args) -> None:
    """Run the recipe's phases named by ``args.stage`` (see ``add_recipe_arguments``)."""
    from .errors import FemurSegError
    from .models import BUNDLED_MODELS_DIR

    if any(later <= earlier for earlier, later in zip(args.fine_epochs, args.fine_epochs[1:])):
        raise FemurSegError(f"--fine-epochs {' '.join(map(str, args.fine_epochs))} must increase: each continues "
                            "the run to that many epochs in all, e.g. 120 200.")
    if args.cases < 2:
        raise FemurSegError(f"--cases {args.cases}: nnU-Net needs at least 2 training cases.")
    model_dir = (args.model_dir or args.work_dir / f"{MODEL_NAME}-v{MODEL_VERSION}").resolve()
    bundled = BUNDLED_MODELS_DIR.resolve()
    if model_dir.exists() and (model_dir.is_relative_to(bundled) or bundled.is_relative_to(model_dir)):
        raise FemurSegError(
            f"--model-dir '{model_dir}' holds a model bundled with FemurSeg, which train-bundled never overwrites. "
            f"Give a new folder (default WORK_DIR/{MODEL_NAME}-v{MODEL_VERSION}); review the result, then copy it "
            "into Resources/Models yourself."
        )
    work_dir = args.work_dir.resolve()
    missing = missing_stage_inputs(work_dir, args.stage)
    if missing:  # before any folder is made (an empty WORK_DIR got a half-built model folder)
        earlier, path = missing[0]
        raise FemurSegError(f"--stage {args.stage} needs '{path}', which --stage {earlier} makes; run the earlier "
                            f"stages first (or --stage all).")
    set_nnunet_paths(work_dir)
    started = time.time()
    if args.stage in ("data", "all"):
        write_training_dataset(work_dir, args.cases)
        print(f"data ready after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("plan", "all"):
        plan_and_preprocess(work_dir, args.base_model)
        print(f"preprocessed after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("locator", "all"):
        train(work_dir, LOCATOR_CONFIGURATION, args.locator_epochs, args.iterations, threads=args.threads,
              base_model=args.base_model)
        print(f"locator trained after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("fine", "all"):
        for epochs in args.fine_epochs:
            train(work_dir, CONFIGURATION, epochs, args.iterations, threads=args.threads, base_model=args.base_model)
        print(f"1 mm network trained after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("bundle", "all"):
        bundle_model(work_dir, model_dir)
        training = {"cases": args.cases, "family_mix": dict(FAMILY_MIX), "iterations": args.iterations,
                    "locator_epochs": args.locator_epochs, "fine_epochs": args.fine_epochs,
                    "base_model": args.base_model.name if args.base_model else None,
                    "configurations": {name: {k: v for k, v in settings.items() if k != "architecture"}
                                       for name, settings in RECIPE_CONFIGURATIONS.items()},
                    "wall_minutes": round((time.time() - started) / 60) if args.stage == "all" else None}
        write_model_card(model_dir, training, held_out=None)
        print(f"bundled into {model_dir}; run benchmarks/inference_benchmark.py --card to add held-out metrics")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train FemurSeg's bundled model (nnU-Net v2, CPU).")
    add_recipe_arguments(parser)
    run_recipe(parser.parse_args(argv))


def strip_checkpoint(source: Path, destination: Path) -> None:
    """Keep what inference needs (weights, init args, trainer name, mirroring axes), weights in fp16.

    Shared tensors are converted once (``decoder.encoder.*`` aliases the encoder), so the file shrinks instead
    of storing the alias twice; the predictor's ``load_state_dict`` casts back to fp32.
    """
    import torch

    checkpoint = torch.load(source, map_location="cpu", weights_only=False)  # our own training output
    converted: dict[int, torch.Tensor] = {}
    weights = {}
    for key, tensor in checkpoint["network_weights"].items():
        if tensor.is_floating_point():
            identity = tensor.untyped_storage().data_ptr()
            if identity not in converted:
                converted[identity] = tensor.half()
            weights[key] = converted[identity] if tensor.shape == converted[identity].shape else tensor.half()
        else:
            weights[key] = tensor
    init_args = dict(checkpoint["init_args"])
    init_args["device"] = "cpu"
    stripped = {
        "network_weights": weights,
        "init_args": init_args,
        "trainer_name": checkpoint["trainer_name"],
        "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
    }
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stripped, destination)


def bundle_model(work_dir: Path, model_dir: Path, checkpoint_name: str = "checkpoint_final.pth") -> Path:
    """Both configurations' plans/dataset JSON and stripped checkpoints in nnU-Net's results layout."""
    import shutil

    for _, dataset in DATASETS.values():
        shutil.rmtree(model_dir / dataset, ignore_errors=True)  # one model per folder: drop older files
    for configuration in RECIPE_CONFIGURATIONS:
        trained = trained_folder(work_dir, configuration)
        target = model_dir / DATASETS[configuration][1] / trained.name
        (target / "fold_all").mkdir(parents=True, exist_ok=True)
        for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            shutil.copy2(trained / name, target / name)
        source = trained / "fold_all" / checkpoint_name
        if not source.exists():
            source = trained / "fold_all" / "checkpoint_latest.pth"
        strip_checkpoint(source, target / "fold_all" / "checkpoint_final.pth")
    return model_dir


def write_model_card(model_dir: Path, training: dict, held_out: dict | None) -> None:
    """model_card.json (machine-readable) and MODEL_CARD.md (for people) beside the bundled model."""
    from .anatomy import load_shapes
    from .imageio import write_bytes_atomic

    shapes = load_shapes()
    split = {"training_subjects": sorted({s.subject for s in shapes if not s.held_out}),
             "held_out_subjects": sorted({s.subject for s in shapes if s.held_out})}
    fine = " ".join(str(e) for e in training.get("fine_epochs") or [])
    card = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "task": "proximal femur (periosteal surface, solid inside), left and right, in ex-vivo QCT and clinical hip, "
                "pelvis, abdomen and leg CT (only femurs with their head in view; none: an empty label)",
        "framework": f"nnU-Net v2 (nnunetv2 2.8.1), trainer nnUNetTrainer, configurations {LOCATOR_CONFIGURATION} "
                     f"(3 mm locator) and {CONFIGURATION} (1 mm)",
        "locator": LOCATOR_CONFIGURATION,
        "configuration": CONFIGURATION,
        "training_data": f"{training.get('cases')} synthetic CTs (FemurSegLib.synthetic.cases, mix {training.get('family_mix')}),"
                         f" seeds {TRAIN_SEED_START}-{TRAIN_SEED_START + int(training.get('cases') or 0) - 1}, "
                         "real femur and hip bone surfaces of the training subjects (Resources/Anatomy)",
        "subject_split": split,
        "held_out_data": "held-out subjects and seeds 1-999 of every family are never used for training",
        "recipe": f"femurseg train-bundled WORK_DIR --cases {training.get('cases')} --iterations "
                  f"{training.get('iterations')} --locator-epochs {training.get('locator_epochs')} --fine-epochs {fine}"
                  + (f" --base-model {training['base_model']}" if training.get("base_model") else ""),
        "training": training,
        "held_out_metrics": held_out,
        "limitations": "Trained on synthetic CTs rendered from real bone surfaces; checked on one real CT only "
                       "(TotalSegmentator's example, never trained on; README). "
                       "Correct its output before using it for finite-element models, and fine-tune on your own "
                       "corrected cases.",
    }
    write_bytes_atomic(model_dir / "model_card.json", (json.dumps(card, indent=2) + "\n").encode())
    metrics = "pending" if not held_out else "\n".join(
        f"| {family} | {key} | {value:.4f} |" for family, values in held_out.items() if isinstance(values, dict)
        for key, value in values.items() if isinstance(value, (int, float)))
    markdown = f"""# {MODEL_NAME} v{MODEL_VERSION}

{card['task']}. {card['framework']}.

- **Training data:** {card['training_data']}; {card['held_out_data']}.
- **Subjects:** training {', '.join(split['training_subjects'])}; held out {', '.join(split['held_out_subjects'])}.
- **Recipe:** `{card['recipe']}`{f" (2-core CPU, {training['wall_minutes']} minutes)" if training.get('wall_minutes') else ""}.
{"- **How this model was actually trained:** " + training["history"] if training.get("history") else ""}
- **Weights:** stripped of optimizer state, fp16 (loads with `torch.load(weights_only=True)`).
- **Limitations:** {card['limitations']}

## Held-out metrics (per family, FemurSeg engine defaults)

| family | metric | value |
|---|---|---|
{metrics}
"""
    write_bytes_atomic(model_dir / "MODEL_CARD.md", markdown.encode())


if __name__ == "__main__":
    main()
