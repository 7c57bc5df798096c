"""The training recipe's pieces that run in seconds: the plans it writes must resolve in nnU-Net.

Training itself takes hours on this CPU; the recipe's results are checked by the benchmark and the model card.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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


def test_grow_dataset_adds_cases_with_the_same_plans(work_dir: Path) -> None:
    """Growing the dataset preprocesses new phantoms with the plans the network was trained with."""
    import numpy as np
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    training.add_recipe_configurations(work_dir)
    plans_before = _plans(work_dir)
    raw = work_dir / "raw" / training.DATASET_NAME
    # In a child process, as the recipe runs: nnunetv2.paths reads the nnU-Net folders once, at import.
    script = ("import sys; from pathlib import Path; from FemurSegLib import training as t; w = Path(sys.argv[1]); "
              "t.set_nnunet_paths(w); t.write_phantom_dataset(w / 'raw' / t.DATASET_NAME, 1); t.grow_dataset(w, 2)")
    subprocess.run([sys.executable, "-c", script, str(work_dir)], check=True, capture_output=True)

    assert _plans(work_dir) == plans_before
    preprocessed = work_dir / "preprocessed" / training.DATASET_NAME
    assert json.loads((preprocessed / "dataset.json").read_text())["numTraining"] == 2
    manager = PlansManager(plans_before)
    configuration = manager.get_configuration(training.CONFIGURATION)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    for seed in (training.TRAIN_SEED_START, training.TRAIN_SEED_START + 1):
        case = f"phantom{seed}"
        expected, _, _ = DefaultPreprocessor(verbose=False).run_case(
            [str(raw / "imagesTr" / f"{case}_0000.nii.gz")], str(raw / "labelsTr" / f"{case}.nii.gz"),
            manager, configuration, dataset_json)
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = preprocessed / configuration.data_identifier
        stored, _, _, _ = infer_dataset_class(str(folder))(str(folder), [case]).load_case(case)
        np.testing.assert_allclose(np.asarray(stored), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arguments, problem", [
    (["--grow-epochs", "150", "120"], "Epoch counts must increase"),
    (["--extend-epochs", "30"], "Epoch counts must increase"),
    (["--grow-cases", "20"], "--grow-cases 20 is fewer than --cases 40"),
])
def test_recipe_refuses_a_schedule_it_cannot_run_before_touching_the_work_dir(tmp_path: Path, capsys, arguments,
                                                                              problem) -> None:
    from FemurSegLib.cli import main

    work_dir = tmp_path / "work"
    assert main(["train-bundled", str(work_dir), *arguments]) == 2
    assert problem in capsys.readouterr().err
    assert not work_dir.exists()
