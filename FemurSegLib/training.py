"""The recipe that trains FemurSeg's bundled model on phantoms, with nnU-Net's own planner and trainer.

Why this configuration (DESIGN.md §4; measured on the 2-core CPU): the default 3d_fullres plan costs ~50 s per
iteration, far beyond a two-hour budget. The bundled model keeps nnU-Net's 1 mm target spacing (accuracy at
1 mm is the goal) but uses a narrow U-Net (8 -> 128 features) on 64 x 64 x 96 patches, ~1 s per iteration:

1. 40 phantoms, 36 x 50 iterations at learning rate 0.01;
2. continued to 76 epochs as nnU-Net continues a run (the poly learning rate restarts at 0.0055; the 36-epoch
   run was still improving);
3. 160 more phantoms (200 in all), preprocessed with the same plans, and continued to 150 epochs, then once more
   to 170. The 76-epoch model scored Dice 0.9898 on training phantoms but 0.9838 on held-out seeds 1-4: a
   generalisation gap that more cases close (an epoch costs the same whatever the number of cases). The last 20
   epochs were kept because validation phantoms 11-20 (not the benchmark's 1-10) improved: Dice 0.9901 -> 0.9903,
   ASD 0.169 -> 0.166 mm.

About 2 h 45 min with data and planning. Tried on the way and not kept: continuing with nnU-Net's cross-entropy
only trainer (to remove a Dice-loss bias towards foreground) gained 0.0005 held-out Dice over 10 epochs.

FemurSeg's engine runs it with nnU-Net's sliding window at tile step 1.0 (the fewest patches), which keeps the
field of view it was trained on. An optional stage 2 (``--fine-tune-epochs``, configuration
``3d_femurseg_large``) fine-tunes on 96 x 96 x 160 patches for whole-volume inference (one tile, ~1.2 s); measured
on held-out seeds 1-3 it stayed at Dice 0.981 after 4 epochs while the stage-1 weights tiled reach 0.984, so the
bundled model skips it. (That run started from nnU-Net's ``load_pretrained_weights``, which re-initialises the
output layers; ``train`` now carries them over, so the 0.981 may understate what stage 2 can do.)

Tried and dropped (2026-11-23): polishing without nnU-Net's blur, low-resolution and gamma augmentations.
The model's errors are false positives within 1 mm outside the thin head/neck cortex; without those
augmentations they grew (held-out Dice 0.9805 -> 0.9784 on seed 1, 0.9812 -> 0.9790 on seed 3).

The checkpoint is trained by the plain ``nnUNetTrainer`` class (only the epoch and iteration counts are set on
the instance), so any nnU-Net v2 installation can load it. Training seeds start at ``TRAIN_SEED_START``;
held-out seeds (1-999) are never used here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TRAIN_SEED_START = 1000
DATASET_ID = 500
DATASET_NAME = f"Dataset{DATASET_ID}_FemurPhantom"
CONFIGURATION = "3d_femurseg"
MODEL_NAME = "FemurPhantom3dSmall"
MODEL_VERSION = "3"

ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 5,
        "features_per_stage": [8, 16, 32, 64, 128],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2, 2, 2],
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
PATCH_SIZE = [64, 64, 96]
BATCH_SIZE = 2
# Optional stage 2 (off for the bundled model) fine-tunes the stage-1 weights on nearly whole-volume patches, so
# that instance normalisation sees in training the field of view of whole-volume inference.
FINE_TUNE_CONFIGURATION = "3d_femurseg_large"
FINE_TUNE_PATCH_SIZE = [96, 96, 160]
FINE_TUNE_LEARNING_RATE = 0.003


def set_nnunet_paths(work_dir: Path) -> None:
    for variable, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(work_dir / sub)


def write_phantom_dataset(raw_dataset: Path, count: int) -> None:
    """Training cases from seeds TRAIN_SEED_START.. through the dataset exporter (skips cases already there)."""
    from .dataset import export_case
    from .phantom import generate_phantom

    for seed in range(TRAIN_SEED_START, TRAIN_SEED_START + count):
        case = f"phantom{seed}"
        if (raw_dataset / "labelsTr" / f"{case}.nii.gz").exists():
            continue
        ct, label, shape = generate_phantom(seed)
        export_case(ct, label, raw_dataset, case, provenance={"phantom_seed": seed, "side": shape.side},
                    description="FemurSeg synthetic proximal femur QCT phantoms")


def plan_and_preprocess(work_dir: Path) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([DATASET_ID], num_processes=2, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])
    add_recipe_configurations(work_dir)
    preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(2,))


def add_recipe_configurations(work_dir: Path) -> None:
    """Write the recipe's two configurations into nnU-Net's plans; both use stage 1's preprocessed data."""
    from .imageio import write_bytes_atomic

    plans_path = work_dir / "preprocessed" / DATASET_NAME / "nnUNetPlans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"][CONFIGURATION] = {
        "inherits_from": "3d_fullres",
        "patch_size": PATCH_SIZE,
        "batch_size": BATCH_SIZE,
        "architecture": ARCHITECTURE,
    }
    plans["configurations"][FINE_TUNE_CONFIGURATION] = {
        "inherits_from": CONFIGURATION,
        "patch_size": FINE_TUNE_PATCH_SIZE,
    }
    write_bytes_atomic(plans_path, json.dumps(plans, indent=2).encode())


def _trained_folder(work_dir: Path, configuration: str) -> Path:
    return work_dir / "results" / DATASET_NAME / f"nnUNetTrainer__nnUNetPlans__{configuration}"


def train(work_dir: Path, epochs: int, iterations_per_epoch: int, configuration: str = CONFIGURATION,
          initial_lr: float = 0.01, start_from: Path | None = None) -> Path:
    """Train fold 'all' with the plain nnUNetTrainer up to ``epochs``, resuming from the stage's last checkpoint.

    ``start_from`` initialises the whole network from another checkpoint of this recipe (fine-tuning on the same
    labels). Not nnU-Net's ``load_pretrained_weights``: it re-initialises the output layers, which suits a new
    label set, not this.
    """
    # Augmentation in the main process: as fast as 2 workers on 2 cores (DESIGN.md §4). Set only here: the
    # planner calls torch.set_num_threads(nnUNet_n_proc_DA), which refuses 0.
    os.environ["nnUNet_n_proc_DA"] = "0"
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    preprocessed = work_dir / "preprocessed" / DATASET_NAME
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    fold = _trained_folder(work_dir, configuration) / "fold_all"
    # Continue an interrupted run (latest) or extend a finished one to more epochs (final keeps its epoch count).
    resume = next((fold / name for name in ("checkpoint_latest.pth", "checkpoint_final.pth")
                   if (fold / name).exists()), None)
    plans["continue_training"] = resume is not None
    trainer = nnUNetTrainer(plans, configuration, "all", dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = 4
    trainer.initial_lr = initial_lr
    trainer.save_every = 1
    if resume is not None:
        trainer.load_checkpoint(str(resume))
    elif start_from is not None:
        trainer.initialize()
        # Our own checkpoint (it holds numpy logs, so not weights-only loadable); same architecture and labels.
        trainer.network.load_state_dict(torch.load(start_from, map_location="cpu", weights_only=False)["network_weights"])
    trainer.run_training()
    return Path(trainer.output_folder)


def grow_dataset(work_dir: Path, total_cases: int) -> None:
    """Add phantoms up to ``total_cases`` and preprocess them with the existing plans.

    The plans (and so the CT normalisation the network was trained with) are kept: no new fingerprint.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    from .imageio import write_bytes_atomic

    raw_dataset = work_dir / "raw" / DATASET_NAME
    write_phantom_dataset(raw_dataset, total_cases)
    preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(2,))
    # nnU-Net's preprocessing leaves the planner's dataset.json copy; the trained model should record the cases.
    write_bytes_atomic(work_dir / "preprocessed" / DATASET_NAME / "dataset.json", (raw_dataset / "dataset.json").read_bytes())


def add_recipe_arguments(parser) -> None:
    """The recipe's options, shared by ``femurseg train-bundled`` and ``python -m FemurSegLib.training``."""
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--cases", type=int, default=40, help="phantoms of the first two phases (and the plans)")
    parser.add_argument("--epochs", type=int, default=36)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--extend-epochs", type=int, default=76,
                        help="after --epochs, continue stage 1 to this many epochs (nnU-Net's continue-training)")
    parser.add_argument("--grow-cases", type=int, default=200,
                        help="then add phantoms up to this many, preprocessed with the same plans ...")
    parser.add_argument("--grow-epochs", type=int, nargs="+", default=[150, 170],
                        help="... and continue stage 1 to each of these epoch counts in turn (each continuation "
                             "restarts nnU-Net's poly learning rate from where it stands)")
    parser.add_argument("--fine-tune-epochs", type=int, default=0,
                        help="optional stage 2 for whole-volume inference (0: skip, as the bundled model does)")
    parser.add_argument("--stage", choices=["data", "plan", "train", "grow", "finetune", "bundle", "all"],
                        default="all")
    parser.add_argument("--model-dir", type=Path,
                        help=f"new folder for the trained model (default WORK_DIR/{MODEL_NAME}-v{MODEL_VERSION}); "
                             "a model bundled with FemurSeg is never overwritten")


def run_recipe(args) -> None:
    """Run the recipe's stages named by ``args.stage`` (see ``add_recipe_arguments``)."""
    from .errors import FemurSegError
    from .models import BUNDLED_MODELS_DIR

    schedule = [args.epochs, args.extend_epochs, *args.grow_epochs]
    if any(later <= earlier for earlier, later in zip(schedule, schedule[1:])):
        raise FemurSegError(f"Epoch counts must increase: --epochs {args.epochs}, --extend-epochs "
                            f"{args.extend_epochs}, --grow-epochs {' '.join(map(str, args.grow_epochs))}; each "
                            "continues the run to that many epochs in all, e.g. 36, 76, 150 170.")
    if args.grow_epochs and args.grow_cases < args.cases:
        raise FemurSegError(f"--grow-cases {args.grow_cases} is fewer than --cases {args.cases}; give the total "
                            "number of phantoms after growing, e.g. 200.")
    model_dir = (args.model_dir or args.work_dir / f"{MODEL_NAME}-v{MODEL_VERSION}").resolve()
    bundled = BUNDLED_MODELS_DIR.resolve()
    if model_dir.exists() and (model_dir.is_relative_to(bundled) or bundled.is_relative_to(model_dir)):
        raise FemurSegError(
            f"--model-dir '{model_dir}' holds a model bundled with FemurSeg, which train-bundled never overwrites. "
            f"Give a new folder (default WORK_DIR/{MODEL_NAME}-v{MODEL_VERSION}); review the result, then copy it "
            "into Resources/Models yourself."
        )
    work_dir = args.work_dir.resolve()
    set_nnunet_paths(work_dir)
    started = time.time()
    if args.stage in ("data", "all"):
        write_phantom_dataset(work_dir / "raw" / DATASET_NAME, args.cases)
        print(f"data ready after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("plan", "all"):
        plan_and_preprocess(work_dir)
        print(f"preprocessed after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("train", "all"):
        output = train(work_dir, args.epochs, args.iterations)
        if args.extend_epochs > args.epochs:
            output = train(work_dir, args.extend_epochs, args.iterations)
        print(f"trained into {output} after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("grow", "all") and args.grow_epochs:
        grow_dataset(work_dir, args.grow_cases)
        for epochs in args.grow_epochs:
            output = train(work_dir, epochs, args.iterations)
        print(f"continued on {args.grow_cases} cases into {output} after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("finetune", "all") and args.fine_tune_epochs > 0:
        stage_one = _trained_folder(work_dir, CONFIGURATION) / "fold_all" / "checkpoint_final.pth"
        output = train(work_dir, args.fine_tune_epochs, args.iterations, FINE_TUNE_CONFIGURATION,
                       FINE_TUNE_LEARNING_RATE, start_from=stage_one)
        print(f"fine-tuned into {output} after {time.time() - started:.0f} s", flush=True)
    if args.stage in ("bundle", "all"):
        target = bundle_model(work_dir, model_dir)
        training = {"cases": args.cases, "epochs": args.epochs, "extend_epochs": args.extend_epochs,
                    "grow_cases": args.grow_cases, "grow_epochs": args.grow_epochs, "iterations": args.iterations,
                    "patch_size": PATCH_SIZE, "batch_size": BATCH_SIZE,
                    "fine_tune_epochs": args.fine_tune_epochs, "fine_tune_patch_size": FINE_TUNE_PATCH_SIZE,
                    "fine_tune_learning_rate": FINE_TUNE_LEARNING_RATE,
                    "wall_minutes": round((time.time() - started) / 60) if args.stage == "all" else None}
        write_model_card(model_dir, training, held_out=None)
        print(f"bundled into {target}; run benchmarks/inference_benchmark.py --card to add held-out metrics")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train FemurSeg's bundled phantom model (nnU-Net v2, CPU).")
    add_recipe_arguments(parser)
    run_recipe(parser.parse_args(argv))


def strip_checkpoint(source: Path, destination: Path) -> None:
    """Keep what inference needs (weights, init args, trainer name, mirroring axes), weights in fp16.

    Shared tensors are converted once (``decoder.encoder.*`` aliases the encoder), so the file shrinks instead
    of storing the alias twice; the predictor's ``load_state_dict`` casts back to fp32.
    """
    import torch

    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
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
    """Copy plans/dataset JSON and a stripped checkpoint into ``model_dir`` in nnU-Net's results layout."""
    import shutil

    trained = _trained_folder(work_dir, CONFIGURATION)
    target = model_dir / DATASET_NAME / trained.name
    shutil.rmtree(model_dir / DATASET_NAME, ignore_errors=True)  # one model per folder: drop older configurations
    (target / "fold_all").mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy2(trained / name, target / name)
    strip_checkpoint(trained / "fold_all" / checkpoint_name, target / "fold_all" / "checkpoint_final.pth")
    return target


def write_model_card(model_dir: Path, training: dict, held_out: dict | None) -> None:
    """model_card.json (machine-readable) and MODEL_CARD.md (for people) beside the bundled model."""
    from .imageio import write_bytes_atomic

    all_cases = max(int(training.get("cases", 0)), int(training.get("grow_cases") or 0))
    grow_epochs = " ".join(str(epochs) for epochs in training.get("grow_epochs") or [])
    card = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "task": "proximal femur (periosteal surface, solid inside) in ex-vivo QCT, 1 mm isotropic",
        "framework": "nnU-Net v2 (nnunetv2 2.8.1), trainer nnUNetTrainer, configuration " + CONFIGURATION,
        "training_data": f"{all_cases} synthetic phantoms, seeds {TRAIN_SEED_START}-"
                         f"{TRAIN_SEED_START + all_cases - 1} (FemurSegLib.phantom)",
        "held_out_data": "phantom seeds 1-999 are never used for training",
        "recipe": f"femurseg train-bundled WORK_DIR --cases {training.get('cases')} --epochs {training.get('epochs')} "
                  f"--iterations {training.get('iterations')} --extend-epochs {training.get('extend_epochs')} "
                  f"--grow-cases {training.get('grow_cases')} --grow-epochs {grow_epochs} "
                  f"--fine-tune-epochs {training.get('fine_tune_epochs')}",
        "training": training,
        "held_out_metrics": held_out,
        "limitations": "Trained on synthetic phantoms only; not validated on real CT. Correct its output before "
                       "using it for finite-element models, and fine-tune on your own corrected cases.",
    }
    write_bytes_atomic(model_dir / "model_card.json", (json.dumps(card, indent=2) + "\n").encode())
    metrics = "pending" if not held_out else "\n".join(f"| {k} | {v:.4f} |" for k, v in held_out.items()
                                                       if isinstance(v, (int, float)))
    markdown = f"""# {MODEL_NAME} v{MODEL_VERSION}

{card['task']}. {card['framework']}.

- **Training data:** {card['training_data']}; {card['held_out_data']}.
- **Recipe:** `{card['recipe']}` (2-core CPU, about {training.get('wall_minutes') or '?'} minutes).
- **Weights:** stripped of optimizer state, fp16 (loads with `torch.load(weights_only=True)`).
- **Limitations:** {card['limitations']}

## Held-out metrics (mean over phantoms, FemurSeg engine defaults)

| metric | value |
|---|---|
{metrics}
"""
    write_bytes_atomic(model_dir / "MODEL_CARD.md", markdown.encode())


if __name__ == "__main__":
    main()
