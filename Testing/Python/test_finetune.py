"""The correction loop closed: export -> finetune -> models list -> segment with the new model.

- through the command line, from a two-configuration base (a locator plus the 1 mm network, v4's layout), so the
  cases are cut to femur regions and the locator is carried over unchanged;
- through the Slicer path on real slicer-core (SlicerApp): scene export (into a dataset whose femur label is
  "bone": 2), the FinetuneProcess both panels run, cancel (no model installed) and resume, then the scene segmented
  with the new model;
- the refusals: one line, exit 2, nothing written.

Budgets are tiny (1-2 epochs of 1 iteration on 64^3 crops of legacy phantoms): the tests show that the loop runs
and keeps its books right; that fine-tuning improves a model is shown by benchmarks/finetune_benchmark.py. Expected
numbers are recomputed independently (SimpleITK's overlap filter on the labels that `femurseg segment` writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.dataset import export_case
from FemurSegLib.errors import FemurSegError
from FemurSegLib.finetune import _training_pieces, finetune, plan_finetune
from FemurSegLib.models import list_models, resolve_model, validate_model_folder
from FemurSegLib.synthetic.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[2]
TRAIN, TEST = ("p1001", "p1002"), "p7"
CASES = {"p1001": 1001, "p1002": 1002, "p7": 7}


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """Whole legacy phantoms (~1.5 M voxels): the femoral head in view, as a femur needs (femur_shape.py), and
    small enough for seconds per epoch (one iteration of an 80^3 patch)."""
    return {name: generate_phantom(seed)[:2] for name, seed in CASES.items()}


@pytest.fixture()
def models_dir(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv("FEMURSEG_MODELS_DIR", str(folder))  # children inherit it
    return folder


def femurseg(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "FemurSegLib", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".femurseg.lock"}


def two_configuration_base(root: Path) -> Path:
    """v4's layout (model card "locator" + "configuration", two trained folders) made of the bundled network, which
    serves as both: what matters here is the layout fine-tuning must keep, not the locator's resolution."""
    network = resolve_model(None).trained_folder
    locator = root / "Dataset501_FemurFieldOfView" / "nnUNetTrainer__nnUNetPlans__3d_locator"
    for target in (locator, root / "Dataset502_FemurRegion" / "nnUNetTrainer__nnUNetPlans__3d_femurseg"):
        shutil.copytree(network, target)
    plans = json.loads((locator / "plans.json").read_text())
    plans["configurations"]["3d_locator"] = plans["configurations"][network.name.split("__")[-1]]
    (locator / "plans.json").write_text(json.dumps(plans))
    (root / "model_card.json").write_text(json.dumps({"name": root.name, "version": "4", "locator": "3d_locator",
                                                      "configuration": "3d_femurseg"}))
    return root


def one_configuration_base(root: Path) -> Path:
    """The bundled 1 mm network alone, as an nnU-Net model from elsewhere (no model card, no locator)."""
    network = resolve_model(None).trained_folder
    shutil.copytree(network, root / network.parent.name / network.name)
    return root


def dice(truth: sitk.Image, other: sitk.Image) -> float:
    measures = sitk.LabelOverlapMeasuresImageFilter()
    measures.Execute(sitk.Cast(truth != 0, sitk.sitkUInt8), sitk.Cast(other != 0, sitk.sitkUInt8))
    return measures.GetDiceCoefficient()


# --- the whole loop ----------------------------------------------------------------------------------------------

def test_command_line_loop_from_a_two_configuration_base(tmp_path, models_dir, cases):
    dataset = tmp_path / "Dataset101_FemurCorrected"
    for name, (ct, label) in cases.items():
        sitk.WriteImage(ct, str(tmp_path / f"{name}.nrrd"))
        sitk.WriteImage(label, str(tmp_path / f"{name}-label.nrrd"))
        exported = femurseg("export", str(tmp_path / f"{name}.nrrd"), str(tmp_path / f"{name}-label.nrrd"),
                            str(dataset), "--case", name, *(["--test"] if name == TEST else []))
        assert exported.returncode == 0, exported.stderr
    base = two_configuration_base(tmp_path / "Base-v4")
    base_files, dataset_files = digest(base), digest(dataset)

    run = femurseg("finetune", str(dataset), "--from", str(base), "--name", "Site", "--epochs", "1",
                   "--iterations", "1", "--device", "cpu")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"installed Site -> {models_dir / 'Site'}: Dice ")
    assert digest(base) == base_files and digest(dataset) == dataset_files, "the base and the dataset are untouched"
    assert sorted(p.name for p in models_dir.iterdir()) == ["Site"], "no work folder, lock or staging copy is left"

    model = validate_model_folder(models_dir / "Site")
    assert model.locator_folder is not None and digest(model.locator_folder) == digest(
        base / "Dataset501_FemurFieldOfView" / "nnUNetTrainer__nnUNetPlans__3d_locator"), "locator copied unchanged"
    card = model.card
    assert (card["locator"], card["configuration"], card["base_model"]["name"]) == ("3d_locator", "3d_femurseg",
                                                                                    "Base-v4")
    assert card["finetune"]["training_cases"] == list(TRAIN) and card["finetune"]["validation_cases"] == [TEST]
    assert card["finetune"]["cropped_to_femur_regions"] and card["finetune"]["epochs"] == card["finetune"][
        "iterations"] == 1
    from FemurSegLib.precision import native_bfloat16

    assert card["finetune"]["precision"] == ("bfloat16" if native_bfloat16() else "float32")
    import torch

    new = torch.load(model.trained_folder / "fold_all" / "checkpoint_final.pth", weights_only=True)
    old = torch.load(base / "Dataset502_FemurRegion" / "nnUNetTrainer__nnUNetPlans__3d_femurseg" / "fold_all" /
                     "checkpoint_final.pth", weights_only=True)
    assert new.keys() == {"network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    assert all(t.dtype == torch.float16 for t in new["network_weights"].values() if t.is_floating_point())
    assert any(not torch.equal(new["network_weights"][k], old["network_weights"][k]) for k in old["network_weights"])

    listing = femurseg("models", "list")
    assert "Site " in listing.stdout and "fine-tuned from Base-v4: Dice " in listing.stdout

    out = tmp_path / "p7-site.nrrd"
    segmented = femurseg("segment", str(tmp_path / f"{TEST}.nrrd"), str(out), "--model", "Site", "--device", "cpu")
    assert segmented.returncode == 0, segmented.stderr
    measured = dice(cases[TEST][1], sitk.ReadImage(str(out)))
    assert measured == pytest.approx(card["validation"]["after"]["per_case"][TEST]["dice"], abs=1e-9)


def test_slicer_loop_with_cancel_and_resume(tmp_path, models_dir, cases):
    pytest.importorskip("slicer")
    trame_core = pytest.importorskip("trame_slicer.core")
    from FemurSegLib import scene
    from FemurSegLib.finetune_runner import FinetuneProcess
    from FemurSegLib.inference import InferenceOptions, Segmenter

    app = trame_core.SlicerApp()
    dataset, nodes = tmp_path / "Dataset102_FemurSlicer", {}
    dataset.mkdir()  # the seed's label name, with another value than the base model's femur 1: fine-tuning maps it
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "bone": 2}, "numTraining": 0, "file_ending": ".nii.gz"}))
    for name, (ct, label) in cases.items():
        nodes[name] = scene.add_volume_node(app.scene, ct, name)
        corrected = scene.add_label_as_segment(app.scene, app.segmentations_logic, label, nodes[name])
        scene.export_segment(app.scene, app.segmentations_logic, corrected, None, nodes[name], dataset, name,
                             test=name == TEST)

    process = FinetuneProcess(dataset, name="Slicer", epochs=4, iterations=1, device="cpu")
    deadline = time.monotonic() + 300
    while not any(m.startswith("Epoch 1 done") for m in process.poll().messages) and not process.state.finished:
        assert time.monotonic() < deadline, "no epoch finished in 300 s"
        time.sleep(0.1)
    with pytest.raises(FemurSegError, match="is being fine-tuned by another process"):  # a second Start
        finetune(plan_finetune(dataset, name="Slicer", epochs=4, iterations=1), device="cpu", notify=print)
    assert (models_dir / ".finetune-Slicer.lock").is_file(), "the refused run left the running one's lock alone"
    process.cancel()  # what the panels' Cancel does
    state = process.wait_for_completion(timeout_s=60)
    assert state.cancelled and state.model_name is None and state.error is None
    assert "Slicer" not in [m.name for m in list_models()]
    assert sorted(p.name for p in models_dir.iterdir()) == [".finetune-Slicer", ".finetune-Slicer.lock"]

    state = FinetuneProcess(dataset, name="Slicer", epochs=4, iterations=1, device="cpu").wait_for_completion(300)
    assert "Resuming the interrupted fine-tuning of 'Slicer'." in state.messages
    assert any(m.startswith("Continuing training at epoch ") for m in state.messages), state.messages
    assert state.model_name == "Slicer" and state.model_folder == str(models_dir / "Slicer")
    model = next(m for m in list_models() if m.name == "Slicer")
    assert (model.card["finetune"]["runs"], model.card["finetune"]["epochs"], model.card["finetune"]["iterations"]) \
        == (2, 4, 4), "the second run trained only the epochs the first one did not finish"
    base_has_locator = resolve_model(None).locator_folder is not None
    assert model.card["finetune"]["cropped_to_femur_regions"] == base_has_locator
    assert model.card["finetune"]["training_cases"] == list(TRAIN)

    segmenter = Segmenter(model.root, InferenceOptions(device="cpu"), notify=lambda message: None)
    node, _ = scene.segment_volume_node(app.scene, app.segmentations_logic, nodes[TEST], segmenter)
    label = scene.segment_to_sitk(app.scene, app.segmentations_logic, node, None, nodes[TEST])
    assert dice(cases[TEST][1], label) == pytest.approx(
        model.card["validation"]["after"]["per_case"][TEST]["dice"], abs=1e-9)


# --- one code path, decided by the base --------------------------------------------------------------------------

def test_only_a_base_with_a_locator_trains_on_femur_regions(tmp_path, cases):
    dataset = tmp_path / "Dataset103_Pieces"
    for name, (ct, label) in cases.items():
        export_case(ct, label, dataset, name, test=name == TEST)
    ct, label = (sitk.ConstantPad(image, [40] * 3, [40] * 3, value)  # room around the femur for its region
                 for image, value in zip(cases[TRAIN[0]], (-1000, 0)))
    whole = _training_pieces(plan_finetune(dataset, base=str(one_configuration_base(tmp_path / "A"))), TRAIN[0], ct,
                             label)
    assert list(whole) == [TRAIN[0]] and whole[TRAIN[0]][0] is ct
    regions = _training_pieces(plan_finetune(dataset, base=str(two_configuration_base(tmp_path / "B"))), TRAIN[0],
                               ct, label)
    assert list(regions) == [f"{TRAIN[0]}_0"]
    region_ct, region_label = regions[f"{TRAIN[0]}_0"]
    assert int(sitk.GetArrayViewFromImage(region_label).sum()) == int(sitk.GetArrayViewFromImage(label).sum())
    assert np.prod(region_ct.GetSize()) < np.prod(ct.GetSize()), "cut to the femur's box plus margin"


# --- refusals ----------------------------------------------------------------------------------------------------

def _edit_json(dataset: Path, **changes) -> None:
    path = dataset / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _replace(dataset: Path, case: str, image: sitk.Image | None = None, label: sitk.Image | None = None) -> None:
    for folder, name, new in (("imagesTr", f"{case}_0000.nii.gz", image), ("labelsTr", f"{case}.nii.gz", label)):
        if new is not None:
            sitk.WriteImage(new, str(dataset / folder / name))


def _single_slices(dataset: Path, cases) -> None:
    ct, label = cases["p1002"]
    _replace(dataset, "p1002", *(sitk.RegionOfInterest(image, [64, 64, 1], [0, 0, 30]) for image in (ct, label)))


REFUSALS = {  # name: (spoil the dataset, command-line options, what the one line says)
    "one training case": (lambda d, c: (d / "labelsTr" / "p1002.nii.gz").unlink(), [],
                          "fine-tuning needs at least 2"),
    "no test case to hold one out": (lambda d, c: shutil.rmtree(d / "imagesTs"), [],
                                     "would leave fewer than 2 to train on"),
    "other channels": (lambda d, c: _edit_json(d, channel_names={"0": "MRI"}), [], "do not match those of model"),
    "two labels": (lambda d, c: _edit_json(d, labels={"background": 0, "left": 1, "right": 2}), [],
                   "exactly one femur label"),
    "label values": (lambda d, c: _replace(d, "p1002", label=c["p1002"][1] * 2), [], "holds values [0, 2]"),
    "label on another grid": (lambda d, c: _replace(d, "p1002", label=sitk.RegionOfInterest(c["p1002"][1],
                                                                                           [64, 64, 60], [0, 0, 2])),
                              [], "is not on the same voxel grid"),
    "single-slice case": (_single_slices, [], "single slice"),
    "a taken name": (lambda d, c: None, ["--name", resolve_model(None).name], "already exists"),
    "zero epochs": (lambda d, c: None, ["--epochs", "0"], "train at least 1 epoch"),
    "epochs and minutes": (lambda d, c: None, ["--epochs", "1", "--minutes", "5"], "not allowed with argument"),
    "missing dataset": (lambda d, c: shutil.rmtree(d), [], "does not exist"),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_refusals_are_one_line_and_write_nothing(tmp_path, models_dir, cases, capsys, refusal):
    from FemurSegLib.cli import main

    dataset = tmp_path / "Dataset104_Refused"
    for name, (ct, label) in cases.items():
        export_case(ct, label, dataset, name, test=name == TEST)
    spoil, options, message = REFUSALS[refusal]
    spoil(dataset, cases)
    before = digest(dataset) if dataset.exists() else None
    budget = [] if "--epochs" in options else ["--epochs", "1"]
    try:
        code = main(["finetune", str(dataset), "--device", "cpu", *budget, *options])
    except SystemExit as usage_error:  # argparse's own (in one line, as femurseg's)
        code = usage_error.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("femurseg: error: ") and err.count("\n") == 1 and message in err, err
    assert not models_dir.exists(), "no models folder, work folder or lock was made"
    assert (digest(dataset) if dataset.exists() else None) == before


def test_a_missing_gpu_is_refused_before_any_work(tmp_path, models_dir, cases, capsys):
    import torch

    from FemurSegLib.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    dataset = tmp_path / "Dataset105_NoGpu"
    for name, (ct, label) in cases.items():
        export_case(ct, label, dataset, name, test=name == TEST)
    assert main(["finetune", str(dataset), "--epochs", "1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("femurseg: error: Device 'cuda' was requested") and err.count("\n") == 1
    assert not models_dir.exists()
