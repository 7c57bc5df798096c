"""The training recipe's pieces that run in seconds: plans written for nnU-Net, and the polish stage's transforms.

Training itself takes hours on this CPU; the recipe's results are checked by the benchmark and the model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from FemurSegLib import training
from FemurSegLib.models import resolve_model


@pytest.fixture()
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A work dir whose preprocessed plans are nnU-Net's planner output as the bundled model recorded it."""
    bundled = resolve_model(None).trained_folder
    plans = json.loads((bundled / "plans.json").read_text())
    for name in list(plans["configurations"]):
        if name.startswith("3d_femurseg"):
            del plans["configurations"][name]  # as nnU-Net's planner writes it, before the recipe adds its own
    preprocessed = tmp_path / "preprocessed" / training.DATASET_NAME
    preprocessed.mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans))
    shutil.copy2(bundled / "dataset.json", preprocessed / "dataset.json")
    for variable, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        monkeypatch.setenv(variable, str(tmp_path / sub))
    return tmp_path


def _plans(work_dir: Path) -> dict:
    return json.loads((work_dir / "preprocessed" / training.DATASET_NAME / "nnUNetPlans.json").read_text())


def test_recipe_configurations_resolve_in_nnunet(work_dir: Path) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    training.add_recipe_configurations(work_dir)
    manager = PlansManager(_plans(work_dir))
    first = manager.get_configuration(training.CONFIGURATION)
    large = manager.get_configuration(training.FINE_TUNE_CONFIGURATION)
    polish = manager.get_configuration(training.POLISH_CONFIGURATION)
    assert first.patch_size == training.PATCH_SIZE
    assert large.patch_size == polish.patch_size == training.FINE_TUNE_PATCH_SIZE
    # Every stage trains the same network on the same preprocessed data, so weights carry from stage to stage.
    for later in (large, polish):
        assert later.network_arch_init_kwargs == first.network_arch_init_kwargs
        assert later.data_identifier == first.data_identifier
        assert later.spacing == first.spacing == [1.0, 1.0, 1.0]


def _transform_names(composed) -> list[str]:
    return [type(getattr(t, "transform", t)).__name__ for t in composed.transforms]


def test_polish_stage_drops_only_image_quality_augmentations(work_dir: Path) -> None:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    training.add_recipe_configurations(work_dir)
    dataset_json = json.loads((work_dir / "preprocessed" / training.DATASET_NAME / "dataset.json").read_text())
    plans = {**_plans(work_dir), "continue_training": False}  # nnunetv2 2.8 requires the key
    trainer = nnUNetTrainer(plans, training.POLISH_CONFIGURATION, "all", dataset_json,
                            device=torch.device("cpu"))
    arguments = (training.FINE_TUNE_PATCH_SIZE, (0.5, 0.5, 0.5), None, (0, 1, 2), False)
    stock = _transform_names(trainer.get_training_transforms(*arguments))
    training._drop_image_quality_augmentations(trainer)
    polished = _transform_names(trainer.get_training_transforms(*arguments))

    dropped = [name for name in stock if name in training.IMAGE_QUALITY_AUGMENTATIONS]
    assert sorted(set(dropped)) == sorted(training.IMAGE_QUALITY_AUGMENTATIONS)  # nnU-Net still has all three
    assert polished == [name for name in stock if name not in training.IMAGE_QUALITY_AUGMENTATIONS]
    for kept in ("SpatialTransform", "MirrorTransform", "GaussianNoiseTransform", "ContrastTransform"):
        assert kept in polished
    # Set on the instance only: the class (and so the checkpoint's trainer_name) stays stock nnUNetTrainer.
    assert _transform_names(nnUNetTrainer.get_training_transforms(*arguments)) == stock
    assert type(trainer) is nnUNetTrainer
