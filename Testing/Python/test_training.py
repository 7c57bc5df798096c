"""The training recipe's pieces that run in seconds: the plans it writes must resolve in nnU-Net.

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
    assert first.patch_size == training.PATCH_SIZE
    assert large.patch_size == training.FINE_TUNE_PATCH_SIZE
    # Both stages train the same network on the same preprocessed data, so weights carry from one to the other.
    assert large.network_arch_init_kwargs == first.network_arch_init_kwargs
    assert large.data_identifier == first.data_identifier
    assert large.spacing == first.spacing == [1.0, 1.0, 1.0]
