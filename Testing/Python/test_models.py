"""Model folders and zips: nnU-Net's own export installs and runs; malformed and unsafe ones are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from FemurSegLib.demo import SAMPLE_CT
from FemurSegLib.errors import FemurSegError
from FemurSegLib.inference import InferenceOptions, Segmenter
from FemurSegLib.metrics import compare_images
from FemurSegLib.models import (TRUST_FILE, install_model, list_models, remove_model, require_loadable_checkpoints,
                                resolve_model, validate_model_folder)


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    folder = tmp_path / "user-models"
    monkeypatch.setenv("FEMURSEG_MODELS_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def bundled():
    return resolve_model(None)


def results_tree(bundled, root: Path) -> Path:
    """An nnUNet_results folder holding the bundled model as nnU-Net training leaves it."""
    trained = root / bundled.trained_folder.parent.name / bundled.trained_folder.name
    shutil.copytree(bundled.trained_folder, trained)
    fold = trained / "fold_all"
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": 0.99}}))
    (fold / "progress.png").write_bytes(b"")
    return trained


def test_bundled_model_is_valid_with_a_card(bundled):
    assert bundled.folds == ("all",) and bundled.femur_label == 1
    card = bundled.root / "model_card.json"
    assert card.is_file() and (bundled.root / "MODEL_CARD.md").is_file()
    assert json.loads(card.read_text())["version"]
    assert any(m.name == bundled.name and m.bundled for m in list_models())


def test_zip_from_nnunets_own_exporter_installs_and_runs(bundled, tmp_path, models_dir):
    results = tmp_path / "results"
    trained = results_tree(bundled, results)
    archive = tmp_path / "exported.zip"
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path))
    exporter = Path(sys.executable).parent / "nnUNetv2_export_model_to_zip"
    configuration = trained.name.split("__")[-1]
    subprocess.run([str(exporter), "-d", trained.parent.name, "-o", str(archive), "-c", configuration, "-f", "all"],
                   env=env, check=True, capture_output=True)
    model = install_model(archive, name="exported")
    assert model.root == models_dir / "exported"
    ct = sitk.ReadImage(str(SAMPLE_CT))
    installed = Segmenter(model.root, InferenceOptions(device="cpu"), notify=lambda m: None).segment(ct)
    # The exporter packs one trained folder: compare with the bundled 1 mm network run alone (no locator).
    original = Segmenter(bundled.trained_folder, InferenceOptions(device="cpu"), notify=lambda m: None).segment(ct)
    assert compare_images(original, installed).dice == 1.0, "same weights, same voxels"
    assert resolve_model("exported").root == model.root
    remove_model("exported")
    assert not (models_dir / "exported").exists()


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def model_files(bundled, prefix: str) -> dict[str, bytes]:
    trained = bundled.trained_folder
    return {f"{prefix}{p.relative_to(trained)}": p.read_bytes() for p in trained.rglob("*") if p.is_file()}


@pytest.mark.parametrize("drop, message", [
    ("dataset.json", "no dataset.json and plans.json"),
    ("fold_all/checkpoint_final.pth", "no fold_N folder|lacks checkpoint_final.pth"),
])
def test_incomplete_zip_is_refused_and_nothing_installed(bundled, tmp_path, models_dir, drop, message):
    prefix = f"{bundled.trained_folder.parent.name}/{bundled.trained_folder.name}/"
    files = {k: v for k, v in model_files(bundled, prefix).items() if not k.endswith(drop)}
    with pytest.raises(FemurSegError, match=message):
        install_model(make_zip(tmp_path / "broken.zip", files))
    assert not models_dir.exists()  # a refused first install leaves no models folder behind


def test_zip_that_lost_its_dataset_folder_is_refused_clearly(bundled, tmp_path, models_dir):
    files = model_files(bundled, f"MyFemurModel/{bundled.trained_folder.name}/")
    with pytest.raises(FemurSegError, match="DatasetXXX_"):
        install_model(make_zip(tmp_path / "renamed.zip", files))


def test_zip_slip_is_refused_before_anything_is_written(tmp_path, models_dir):
    archive = make_zip(tmp_path / "evil.zip", {"../../escaped.txt": b"x", "Dataset001_A/x/plans.json": b"{}"})
    with pytest.raises(FemurSegError, match="unsafe entry"):
        install_model(archive)
    assert not (tmp_path / "escaped.txt").exists() and not (models_dir.parent / "escaped.txt").exists()


def test_not_a_zip_is_refused(tmp_path, models_dir):
    fake = tmp_path / "model.zip"
    fake.write_text("not a zip")
    with pytest.raises(FemurSegError, match="not a readable zip"):
        install_model(fake)


class NotATensor:
    """Any class instance in a checkpoint makes the weights-only loader refuse it."""


def test_checkpoint_that_needs_full_pickle_requires_trust(bundled, tmp_path, models_dir):
    folder = tmp_path / "pickled" / bundled.trained_folder.parent.name / bundled.trained_folder.name
    shutil.copytree(bundled.trained_folder, folder)
    checkpoint = folder / "fold_all" / "checkpoint_final.pth"
    content = torch.load(checkpoint, weights_only=True)
    content["extra"] = NotATensor()
    torch.save(content, checkpoint)
    with pytest.raises(FemurSegError, match="trust"):
        install_model(tmp_path / "pickled")
    assert not (models_dir / "pickled").exists()
    with pytest.raises(FemurSegError, match="full pickle loader"):  # the same folder used in place
        require_loadable_checkpoints(validate_model_folder(tmp_path / "pickled"))
    installed = install_model(tmp_path / "pickled", trust_pickle=True)
    assert installed.name == "pickled" and (installed.root / TRUST_FILE).is_file()
    require_loadable_checkpoints(installed)  # trusted at install: the gate lets exactly this file through
    # A copy of the installed folder, trust file included, used in place is not trusted.
    shutil.copytree(installed.root, tmp_path / "copied")
    with pytest.raises(FemurSegError, match="full pickle loader"):
        require_loadable_checkpoints(validate_model_folder(tmp_path / "copied"))


def test_folder_with_two_labels_is_refused(bundled, tmp_path):
    folder = tmp_path / "two" / bundled.trained_folder.parent.name / bundled.trained_folder.name
    shutil.copytree(bundled.trained_folder, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "femur": 1, "pelvis": 2}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(FemurSegError, match="exactly one femur label"):
        validate_model_folder(tmp_path / "two")


def test_unknown_model_name_lists_what_is_installed(models_dir):
    with pytest.raises(FemurSegError, match="No model named 'nope'.*FemurReal3dSmall"):
        resolve_model("nope")


def test_removing_a_bundled_model_is_refused(bundled, models_dir):
    with pytest.raises(FemurSegError, match="bundled"):
        remove_model(bundled.name)
