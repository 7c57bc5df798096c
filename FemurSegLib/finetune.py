"""Fine-tune a femur model on an exported nnU-Net dataset and install the result as a new model: the correction
loop's last step. The command line, desktop Slicer and the browser all run :func:`finetune` (the GUIs through
:class:`FemurSegLib.finetune_runner.FinetuneProcess`, so they stay live), so plans and normalisation are kept the
same way everywhere.

Steps, in a work folder ``<models folder>/.finetune-<name>/`` that survives an interruption:

1. **data**: the dataset's complete cases are checked (3D CT, label on its grid holding 0 and the femur value only)
   and written through the dataset exporter into a work dataset that carries the base model's dataset.json (its
   channel and label value). A base with a locator (the bundled model) has its 1 mm network trained on the region around
   each femur, so each case is cut the way the recipe cuts (:func:`training.femur_regions`); a single-configuration
   base (v3) takes the cases as they are.
2. **preprocessing**: nnU-Net's own preprocessor with the base model's plans.json (spacing, patch, CT normalisation
   with the base's intensity statistics), case by case in this process (no process pool to spawn).
3. **before**: the base model, FemurSeg engine defaults, on the validation cases: the dataset's imagesTs/labelsTs,
   or when it has none the last ``HOLD_OUT_FRACTION`` of imagesTr, held out from training.
4. **training**: nnU-Net's plain ``nnUNetTrainer`` (fold "all") from the base network's whole state dict (all
   layers, output layers included: nnU-Net's ``load_pretrained_weights`` would re-initialise those), a fresh
   optimizer, poly learning rate from ``FINETUNE_LR`` over the planned iterations, a checkpoint every epoch; the
   forward pass in bfloat16 on a CPU that has it natively (precision.py: about twice the iterations). With
   ``minutes`` the budget is the whole job's: the iteration count (and so the learning-rate schedule) is fitted to
   the time left, and training stops between iterations when the time is up, leaving room for the after-validation.
5. **after and install**: a stripped fp16 checkpoint (:func:`training.strip_checkpoint`), the locator copied
   unchanged, a model card with before/after Dice and ASD; measured, then installed with
   :func:`models.install_model` (an atomic rename). The work folder is removed.

Never overwrites a model (the new name must be free). Ctrl-C or a killed process leaves no installed model;
the same call again resumes: finished steps are skipped and training continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .dataset import (DATASET_FOLDER, MAX_DATASET_JSON_BYTES, STAGING_PREFIX, dataset_cases, dataset_json_problem,
                      export_case, femur_label, recover_dataset)
from .errors import FemurSegError
from .imageio import mask_array, read_ct, read_label, require_same_grid, write_bytes_atomic
from .iopolicy import read_bytes
from .modelschema import check_plans, load_json
from .models import ModelInfo, check_new_model_name, resolve_model, user_models_dir
from .precision import bfloat16_forward

ProgressCallback = Callable[[float, str], None]

FINETUNE_LR = 0.005  # half the recipe's 0.01: the weights start trained
ITERATIONS_PER_EPOCH = 50
DEFAULT_MINUTES = 30.0
MAX_MINUTES = 7 * 24 * 60.0
HOLD_OUT_FRACTION = 0.2
STATE_FILE = "finetune.json"
WORK_PREFIX = ".finetune-"
# Share of the progress bar per step.
SPANS = {"copying cases": (0.0, 0.04), "preprocessing": (0.04, 0.08),
         "validating the base model": (0.08, 0.15), "training": (0.15, 0.92),
         "validating the new model": (0.92, 0.99), "installing": (0.99, 1.0)}


@dataclass(frozen=True)
class FinetuneJob:
    """What a fine-tuning run will do, decided (and refused) before anything is written."""

    dataset_dir: Path
    base: ModelInfo
    name: str
    dataset_json: dict
    training: dict[str, tuple[Path, Path]]  # case -> (image, label)
    validation: dict[str, tuple[Path, Path]]
    validation_source: str
    epochs: int | None
    minutes: float | None
    iterations: int

    @property
    def work_dir(self) -> Path:
        return user_models_dir() / f"{WORK_PREFIX}{self.name}"

    @property
    def crop_to_femur_regions(self) -> bool:
        """A base with a locator: its 1 mm network has only ever seen the region around each femur."""
        return self.base.locator_folder is not None


@dataclass(frozen=True)
class FinetuneResult:
    model: ModelInfo
    card: dict


def plan_finetune(dataset_dir: str | os.PathLike, base: str | None = None, name: str | None = None,
                  epochs: int | None = None, minutes: float | None = None,
                  iterations: int = ITERATIONS_PER_EPOCH) -> FinetuneJob:
    """Check the request against the dataset and the base model; raise FemurSegError saying what to fix."""
    dataset_dir = Path(dataset_dir)
    if epochs is not None and minutes is not None:
        raise FemurSegError("Give an epoch count or a time budget in minutes, not both.")
    if epochs is not None and epochs < 1:
        raise FemurSegError(f"--epochs {epochs}: train at least 1 epoch.")
    if minutes is not None and not 0 < minutes <= MAX_MINUTES:
        raise FemurSegError(f"--minutes {minutes:g} is outside 0-{MAX_MINUTES:g}; give the time budget in minutes.")
    if iterations < 1:
        raise FemurSegError(f"--iterations {iterations}: an epoch needs at least 1 iteration.")
    if epochs is None and minutes is None:
        minutes = DEFAULT_MINUTES
    if not dataset_dir.is_dir():
        raise FemurSegError(f"Dataset folder '{dataset_dir}' does not exist; give the folder Export writes to "
                            "(…/DatasetNNN_Name).")
    if not DATASET_FOLDER.fullmatch(dataset_dir.name):
        raise FemurSegError(f"'{dataset_dir.name}' is not an nnU-Net dataset folder (DatasetNNN_Name).")
    base_model = resolve_model(base)
    if any(dataset_dir.glob(f"{STAGING_PREFIX}*")):  # an export was interrupted: finish it first
        recover_dataset(dataset_dir)
    dataset_json = _read_dataset_json(dataset_dir)
    base_json = load_json(base_model.trained_folder / "dataset.json", "dataset.json")
    _check_matches_base(dataset_json, base_json, dataset_dir, base_model)
    ending = dataset_json["file_ending"]
    training = {case: (images[0], label) for case, (images, label) in dataset_cases(dataset_dir, "train",
                                                                                       ending).items()}
    validation = {case: (images[0], label) for case, (images, label) in dataset_cases(dataset_dir, "test",
                                                                                         ending).items()}
    if len(training) < 2:
        raise FemurSegError(f"'{dataset_dir.name}' has {len(training)} training case(s) with image and label; "
                            "fine-tuning needs at least 2. Export more corrected cases first.")
    source = "imagesTs/labelsTs"
    if not validation:
        held = max(1, round(HOLD_OUT_FRACTION * len(training)))
        if len(training) - held < 2:
            raise FemurSegError(
                f"'{dataset_dir.name}' has {len(training)} training cases and no test cases: holding one out to "
                "measure the new model would leave fewer than 2 to train on. Export a test case (--test) or "
                "another training case.")
        names = sorted(training)[-held:]
        validation = {case: training.pop(case) for case in names}
        source = f"held out from imagesTr (the last {held} by name: {', '.join(names)})"
    if name is None:
        name = _default_name(base_model, dataset_dir)
    check_new_model_name(name)
    return FinetuneJob(dataset_dir.resolve(), base_model, name, dataset_json, training, validation, source,
                       epochs, minutes, iterations)


def _read_dataset_json(dataset_dir: Path) -> dict:
    path = dataset_dir / "dataset.json"
    if not os.path.lexists(path):
        raise FemurSegError(f"'{dataset_dir}' has no dataset.json: not an nnU-Net dataset. Export cases into it "
                            "first (femurseg export).")
    try:
        dataset_json = json.loads(read_bytes(path, "dataset.json", MAX_DATASET_JSON_BYTES))  # a regular file only
    except ValueError as error:
        raise FemurSegError(f"'{path}' cannot be read as JSON ({error}).") from None
    if not isinstance(dataset_json, dict):
        raise FemurSegError(f"'{path}' is not a JSON object.")
    return dataset_json


def _check_matches_base(dataset_json: dict, base_json: dict, dataset_dir: Path, base: ModelInfo) -> None:
    """Channels and labels must mean what the base model's mean (its normalisation is per channel kind)."""
    def channels(names: Any) -> dict[str, str]:
        return {str(k): str(v).lower() for k, v in names.items()} if isinstance(names, dict) else {}

    if channels(dataset_json.get("channel_names")) != channels(base_json.get("channel_names")):
        raise FemurSegError(
            f"The channels of '{dataset_dir.name}' ({dataset_json.get('channel_names')}) do not match those of model "
            f"'{base.name}' ({base_json.get('channel_names')}); it can only be fine-tuned on the same kind of images.")
    if femur_label(dataset_json.get("labels")) is None:
        raise FemurSegError(
            f"The labels of '{dataset_dir.name}' ({dataset_json.get('labels')}) do not match those of model "
            f"'{base.name}' ({base_json.get('labels')}): background 0 and exactly one femur label are needed.")
    problem = dataset_json_problem(dataset_json)
    if problem:
        raise FemurSegError(f"'{dataset_dir / 'dataset.json'}' cannot be used: {problem}.")


def _default_name(base: ModelInfo, dataset_dir: Path) -> str:
    """``<base>-<dataset name>``, then -2, -3, ... for the first free one (the same again after an interruption)."""
    suffix = dataset_dir.name.split("_", 1)[1]
    stem = base.name if base.name.endswith(f"-{suffix}") else f"{base.name}-{suffix}"
    for number in range(1, 1000):
        candidate = stem if number == 1 else f"{stem}-{number}"
        try:
            return check_new_model_name(candidate)
        except FemurSegError:
            continue
    raise FemurSegError(f"No free model name like '{stem}'; give one with --name.")


def finetune(job: FinetuneJob, device: str = "auto", progress: ProgressCallback | None = None,
             notify: Callable[[str], None] = print) -> FinetuneResult:
    """Run the job (see the module docstring); returns the installed model and its card."""
    report = progress or (lambda fraction, stage: None)
    started = time.monotonic()
    deadline = started + 60.0 * job.minutes if job.minutes is not None else None
    from filelock import FileLock, Timeout

    from .inference import resolve_device

    check_cases(job)
    torch_device = resolve_device(device, notify)  # refuses a missing GPU before anything is written
    budget = f"{job.epochs} epoch(s)" if job.epochs is not None else f"{job.minutes:g} min"
    notify(f"Fine-tuning '{job.base.name}' into '{job.name}' on {len(job.training)} training case(s) of "
           f"{job.dataset_dir.name}, validating on {len(job.validation)} ({job.validation_source}); budget {budget}.")
    models_dir = job.work_dir.parent
    created = not models_dir.exists()
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FemurSegError(f"Cannot write into the models folder '{models_dir}' ({error.strerror or error}); set "
                            "FEMURSEG_MODELS_DIR to a writable folder.") from None
    lock = FileLock(models_dir / f"{WORK_PREFIX}{job.name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FemurSegError(f"Model '{job.name}' is being fine-tuned by another process; wait for it or choose "
                            "another name.") from None
    try:
        return _run(job, torch_device, report, notify, started, deadline, _start_work_dir(job, notify))
    except KeyboardInterrupt:
        notify(f"Interrupted: no model was installed. Run the same command again to resume ({job.work_dir}).")
        raise
    finally:
        lock.release()
        if not job.work_dir.exists():  # installed, or refused before the first step: nothing left to resume
            Path(lock.lock_file).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    models_dir.rmdir()


def _start_work_dir(job: FinetuneJob, notify: Callable[[str], None]) -> bool:
    """Keep a work folder from an interrupted run on the same data and base; else start a new one. Returns True
    when resuming. Leftovers of an install that was killed mid-copy are removed."""
    for leftover in job.work_dir.parent.glob(f".{job.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    state = _read_state(job)
    if state.get("identity") == _identity(job):
        notify(f"Resuming the interrupted fine-tuning of '{job.name}'.")
        return True
    if job.work_dir.exists():
        notify(f"Discarding an interrupted fine-tuning of '{job.name}' on other data or settings.")
        shutil.rmtree(job.work_dir)
    return False


def _run(job: FinetuneJob, device, report: ProgressCallback, notify: Callable[[str], None], started: float,
         deadline: float | None, resumed: bool) -> FinetuneResult:
    from .models import install_model

    state = _read_state(job) if resumed else {}
    spent = float(state.get("seconds", 0.0))  # by earlier, interrupted runs
    state["runs"] = int(state.get("runs", 0)) + 1

    def save() -> None:
        state["seconds"] = spent + time.monotonic() - started
        _write_state(job, state)

    if not resumed:
        try:
            job.work_dir.mkdir(parents=True)
            pieces = _copy_cases(job, _step(report, "copying cases"))
        except BaseException:
            shutil.rmtree(job.work_dir, ignore_errors=True)  # a refused case leaves nothing behind
            raise
        state.update(identity=_identity(job), pieces=pieces)
        save()
    with _nnunet_paths(job.work_dir):
        _preprocess(job, _step(report, "preprocessing"))
        if "before" not in state:
            tick = time.monotonic()
            state["before"] = measure(job.base.root, job.validation, device, _step(report, "validating the base model"))
            state["before_seconds"] = time.monotonic() - tick
            save()
        notify(f"Base model '{job.base.name}' on {len(job.validation)} validation case(s): "
               f"{_figures(state['before'])}.")
        reserve = 1.2 * state["before_seconds"] + 15.0  # after-validation and install still fit in the budget
        epochs_done = _train(job, state, save, device, None if deadline is None else deadline - reserve,
                             _step(report, "training"), notify)
        staged = _bundle(job)
        after = measure(staged, job.validation, device, _step(report, "validating the new model"))
        _step(report, "installing")(0.0)
        card = _write_card(job, staged, state, after, epochs_done, device, spent + time.monotonic() - started)
        model = install_model(staged, name=job.name)
    shutil.rmtree(job.work_dir, ignore_errors=True)
    report(1.0, "done")
    notify(f"Installed '{model.name}': {summary(model.card)}.")
    return FinetuneResult(model=model, card=card)


def _step(report: ProgressCallback, step: str) -> Callable[[float], None]:
    """Progress within one step (0-1) as progress of the whole job (its share in SPANS)."""
    low, high = SPANS[step]
    return lambda fraction: report(low + (high - low) * min(1.0, max(0.0, fraction)), step)


# --- state --------------------------------------------------------------------------------------------------------

def _identity(job: FinetuneJob) -> dict:
    """What the work folder was made from: a changed case, base model or setting means starting again."""
    files = []
    for split, cases in (("train", job.training), ("validation", job.validation)):
        for case, paths in sorted(cases.items()):
            for path in paths:
                stat = path.stat()
                files.append([split, case, path.name, stat.st_size, stat.st_mtime_ns])
    checkpoint = job.base.trained_folder / f"fold_{_base_fold(job.base)}" / job.base.checkpoint_name
    stat = checkpoint.stat()
    return {"dataset": str(job.dataset_dir), "files": files, "base": str(job.base.root.resolve()),
            "base_checkpoint": [stat.st_size, stat.st_mtime_ns], "iterations": job.iterations,
            "crop": job.crop_to_femur_regions}


def _read_state(job: FinetuneJob) -> dict:
    try:
        state = json.loads((job.work_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(job: FinetuneJob, state: dict) -> None:
    write_bytes_atomic(job.work_dir / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())


@contextlib.contextmanager
def _nnunet_paths(work_dir: Path) -> Iterator[None]:
    """nnU-Net's folders in the work folder, and its settings, while the job runs (nnunetv2.paths reads them when
    used); restored after, so a process that segments next is unaffected."""
    names = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}
    saved = {name: os.environ.get(name) for name in [*names, "nnUNet_compile", "nnUNet_n_proc_DA"]}
    os.environ.update({name: str(work_dir / sub) for name, sub in names.items()})
    os.environ["nnUNet_compile"] = "false"  # compiling costs more than a short fine-tuning gains
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: as fast as 2 workers here (DESIGN.md §4)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- data ---------------------------------------------------------------------------------------------------------

def _plans(base: ModelInfo) -> dict:
    """The base model's plans, checked again as a schema where read: dataset_name and plans_name become folder
    names below the work folder, so they must be plain names (one was '../../../../../elsewhere/Dataset999_E')."""
    path = base.trained_folder / "plans.json"
    plans = load_json(path, "plans.json")
    check_plans(plans, _configuration(base), path)
    return plans


def _configuration(base: ModelInfo) -> str:
    return base.trained_folder.name.split("__")[-1]


def _base_fold(base: ModelInfo) -> str:
    """The fold whose weights start the fine-tuning: "all" when the base has it, else its first."""
    return "all" if "all" in base.folds else base.folds[0]


def check_cases(job: FinetuneJob) -> None:
    """Read and check every case before any work, so that a bad one is refused with nothing written (and nothing
    printed before the one line of the refusal); a base with a locator needs 2 femur regions to train on."""
    pieces = 0
    for case, (image_path, label_path) in [*job.validation.items(), *job.training.items()]:
        ct, label = _read_case(job, case, image_path, label_path)
        if case in job.training:
            pieces += len(_training_pieces(job, case, ct, label))
    if pieces < 2:
        raise FemurSegError(f"The training cases of '{job.dataset_dir.name}' hold {pieces} femur region(s) of at "
                            "least 15 ml; fine-tuning needs at least 2.")


def _read_case(job: FinetuneJob, case: str, image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """A case's CT and label: 3D, readable, on one grid (as nnU-Net needs), the label holding 0 and the femur."""
    femur_value = femur_label(job.dataset_json["labels"])[1]
    ct = read_ct(image_path, f"Case '{case}' image")
    label = read_label(label_path, f"Case '{case}' label")
    require_same_grid(ct, label, f"its image {image_path.name}", f"The label of case '{case}'")
    values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
    if not values <= {0, femur_value}:
        raise FemurSegError(
            f"The label of case '{case}' holds values {sorted(values)}; '{job.dataset_dir.name}' declares "
            f"background 0 and femur {femur_value}. Re-export the case with a binary label.")
    return ct, label


def _copy_cases(job: FinetuneJob, report: Callable[[float], None]) -> dict[str, list[str]]:
    """The training pieces written into the work dataset (with the base's dataset.json); returns case -> pieces."""
    base_json = load_json(job.base.trained_folder / "dataset.json", "dataset.json")
    target = job.work_dir / "raw" / _plans(job.base)["dataset_name"]
    target.mkdir(parents=True)
    write_bytes_atomic(target / "dataset.json", (json.dumps({**base_json, "numTraining": 0}, indent=4) + "\n")
                       .encode())
    pieces: dict[str, list[str]] = {}
    for index, (case, (image_path, label_path)) in enumerate(job.training.items()):
        parts = _training_pieces(job, case, *_read_case(job, case, image_path, label_path))
        for piece, (piece_ct, piece_label) in parts.items():  # the femur as 1: written with the base's value
            export_case(piece_ct, sitk.Cast(piece_label != 0, sitk.sitkUInt8), target, piece, replace=True,
                        force=True, provenance={"source": str(image_path), "dataset": str(job.dataset_dir)})
        pieces[case] = list(parts)
        report((index + 1) / len(job.training))
    return pieces


def _training_pieces(job: FinetuneJob, case: str, ct, label) -> dict[str, tuple[Any, Any]]:
    """The case as it is (single-configuration base), or each femur's region as the recipe cuts it (the same
    random margins on every run: seeded by the case name)."""
    if not job.crop_to_femur_regions:
        return {case: (ct, label)}
    from .training import femur_regions

    rng = np.random.default_rng(zlib.crc32(case.encode()))
    return {f"{case}_{number}": piece for number, piece in enumerate(femur_regions(ct, label, rng))}


def _preprocess(job: FinetuneJob, report: Callable[[float], None]) -> None:
    """nnU-Net's DefaultPreprocessor (or the one the plans name) with the base model's plans, case by case."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = _plans(job.base)
    plans_manager = PlansManager(plans)
    manager = plans_manager.get_configuration(_configuration(job.base))
    folder = job.work_dir / "preprocessed" / plans["dataset_name"]
    output = folder / manager.data_identifier
    if output.is_dir():
        return
    raw = job.work_dir / "raw" / plans["dataset_name"]
    dataset_json = json.loads((raw / "dataset.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / f"{plans['plans_name']}.json", json.dumps(plans, indent=2).encode())
    write_bytes_atomic(folder / "dataset.json", json.dumps(dataset_json, indent=2).encode())
    fingerprint = job.base.trained_folder / "dataset_fingerprint.json"  # the trainer copies it; nothing reads it
    write_bytes_atomic(folder / "dataset_fingerprint.json",
                       fingerprint.read_bytes() if fingerprint.is_file() else b"{}")
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    cases = dataset_cases(raw, "train", dataset_json["file_ending"])
    preprocessor = manager.preprocessor_class(verbose=False)
    with open(job.work_dir / "nnunet.log", "a") as log, contextlib.redirect_stdout(log):
        for index, (case, (images, label)) in enumerate(cases.items()):
            preprocessor.run_case_save(str(partial / case), [str(p) for p in images], str(label), plans_manager,
                                       manager, dataset_json)
            report((index + 1) / len(cases))
    os.replace(partial, output)  # complete or absent: a resumed run redoes an interrupted preprocessing


# --- validation ---------------------------------------------------------------------------------------------------

def measure(model_folder: str | os.PathLike, cases: dict[str, tuple[Path, Path]], device: Any = "auto",
            report: Callable[[float], None] | None = None) -> dict:
    """Dice and ASD of a model (FemurSeg engine defaults) against each case's label, and their means. A case where
    the model finds no femur scores Dice 0 and has no ASD (counted in ``no_femur``)."""
    from .inference import InferenceOptions, Segmenter
    from .metrics import compare_masks

    segmenter = Segmenter(model_folder, InferenceOptions(device=getattr(device, "type", device)),
                          notify=lambda message: None)
    per_case = {}
    for index, (case, (image, label)) in enumerate(sorted(cases.items())):
        ct = read_ct(image, f"Case '{case}' image")
        reference = mask_array(read_label(label, f"Case '{case}' label"))
        predicted = mask_array(segmenter.segment(ct))
        if predicted.any() and reference.any():
            agreement = compare_masks(reference, predicted, tuple(float(s) for s in reversed(ct.GetSpacing())))
            per_case[case] = {"dice": agreement.dice, "asd_mm": agreement.asd_mm}
        else:
            per_case[case] = {"dice": float(predicted.any() == reference.any()), "asd_mm": None}
        if report:
            report((index + 1) / len(cases))
    dice = [values["dice"] for values in per_case.values()]
    asd = [values["asd_mm"] for values in per_case.values() if values["asd_mm"] is not None]
    return {"cases": len(per_case), "dice": float(np.mean(dice)), "min_dice": float(np.min(dice)),
            "asd_mm": float(np.mean(asd)) if asd else None, "no_femur": len(dice) - len(asd), "per_case": per_case}


# --- training -----------------------------------------------------------------------------------------------------

def _train(job: FinetuneJob, state: dict, save: Callable[[], None], device, deadline: float | None,
           report: Callable[[float], None], notify: Callable[[str], None]) -> int:
    """Train to the planned iteration count or the deadline; returns the epochs trained in all (resumed ones too).

    nnU-Net's poly learning rate runs over iterations rather than epochs, so that it decays to nothing at the end of
    a time budget whatever the epoch length: with ``epochs`` the total is epochs x iterations; with a time budget it
    is fitted to the time left after a few iterations, and again after every epoch (measured time per iteration,
    checkpoints included). The deadline stops training between iterations in any case."""
    plans = _plans(job.base)
    configuration = _configuration(job.base)
    fold = (job.work_dir / "results" / plans["dataset_name"] /
            f"nnUNetTrainer__{plans['plans_name']}__{configuration}" / "fold_all")
    if (fold / "checkpoint_final.pth").is_file():
        return int(state["epochs_done"])
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    preprocessed = job.work_dir / "preprocessed" / plans["dataset_name"]
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    latest = fold / "checkpoint_latest.pth"
    with open(job.work_dir / "nnunet.log", "a") as log, contextlib.redirect_stdout(log):
        trainer = nnUNetTrainer({**plans, "continue_training": latest.is_file()}, configuration, "all", dataset_json,
                                device=device)
        trainer.num_iterations_per_epoch = job.iterations
        trainer.num_val_iterations_per_epoch = 1  # nnU-Net's pseudo Dice on training patches: one batch is enough
        trainer.initial_lr = FINETUNE_LR
        trainer.save_every = 1
        trainer.num_epochs = 10**6  # the loop below decides when to stop
        trainer.initialize()
        # bfloat16 on a CPU that has it natively: about twice the iterations in a time budget
        state["precision"] = "bfloat16" if bfloat16_forward(trainer.network, device) else "float32"
        if latest.is_file():
            trainer.load_checkpoint(str(latest))  # our own training output
            notify(f"Continuing training at epoch {trainer.current_epoch + 1}.")
        else:
            trainer.network.load_state_dict(_base_weights(job.base))  # every layer, output layers included
        done = int(state.get("iterations_done", 0))
        total = job.epochs * job.iterations if job.epochs else state.get("planned_iterations")
        trainer.on_train_start()
        started, first = time.monotonic(), done

        def fit_to_budget() -> int:
            """Iterations in all that fit before the deadline at this run's pace so far."""
            pace = (time.monotonic() - started) / max(1, done - first)
            return max(done + 1, done + int((deadline - time.monotonic()) / pace))

        while True:
            epoch = trainer.current_epoch
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            losses, out_of_time = [], False
            for _ in range(job.iterations):
                if total is not None and done >= total:
                    break
                trainer.lr_scheduler.max_steps = total or 10**9  # poly over iterations (nnU-Net's own scheduler)
                trainer.lr_scheduler.step(done)
                losses.append(trainer.train_step(next(trainer.dataloader_train)))
                done += 1
                if deadline is not None:
                    if done - first == 3 and job.epochs is None:  # a first estimate of the pace
                        total = fit_to_budget()
                    report((time.monotonic() - started) / max(1e-6, deadline - started))
                    out_of_time = time.monotonic() >= deadline
                    if out_of_time:
                        break
                else:
                    report(done / total)
            trainer.on_train_epoch_end(losses)
            with torch.no_grad():
                trainer.on_validation_epoch_start()
                trainer.on_validation_epoch_end([trainer.validation_step(next(trainer.dataloader_val))])
            last = out_of_time or (total is not None and done >= total)
            trainer.num_epochs = epoch + 1 if last else 10**6  # on_epoch_end keeps a checkpoint unless last
            trainer.on_epoch_end()
            if deadline is not None and job.epochs is None and not last:
                total = fit_to_budget()  # again, with this epoch's checkpoint and validation in the pace
            state.update(epochs_done=trainer.current_epoch, iterations_done=done, planned_iterations=total)
            save()
            notify(f"Epoch {trainer.current_epoch} done ({done}" + (f" of about {total}" if total else "")
                   + f" iterations): training loss {trainer.logger.get_value('train_losses', step=-1):.3f}, "
                   f"nnU-Net pseudo Dice {trainer.logger.get_value('ema_fg_dice', step=-1):.3f}.")
            if last:
                break
        trainer.on_train_end()  # checkpoint_final.pth
    return int(state["epochs_done"])


def _base_weights(base: ModelInfo) -> dict:
    """The base network's whole state dict, loaded as safely as the predictor would (the same trust gate)."""
    import torch

    from .models import needs_full_pickle, require_loadable_checkpoints

    require_loadable_checkpoints(base)
    path = base.trained_folder / f"fold_{_base_fold(base)}" / base.checkpoint_name
    return torch.load(path, map_location="cpu", weights_only=not needs_full_pickle(path))["network_weights"]


# --- the new model ------------------------------------------------------------------------------------------------

def _bundle(job: FinetuneJob) -> Path:
    """The new model folder in the work folder: the base's layout, JSON files and locator; the new weights."""
    from .training import strip_checkpoint

    plans = _plans(job.base)
    staged = job.work_dir / "model" / job.name
    shutil.rmtree(staged, ignore_errors=True)
    trained = staged / job.base.trained_folder.relative_to(job.base.root)
    (trained / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (job.base.trained_folder / name).is_file():
            shutil.copy2(job.base.trained_folder / name, trained / name)
    fold = (job.work_dir / "results" / plans["dataset_name"] /
            f"nnUNetTrainer__{plans['plans_name']}__{_configuration(job.base)}" / "fold_all")
    strip_checkpoint(fold / "checkpoint_final.pth", trained / "fold_all" / "checkpoint_final.pth")
    if (fold / "progress.png").is_file():
        shutil.copy2(fold / "progress.png", trained / "fold_all" / "progress.png")
    if job.base.locator_folder is not None:
        shutil.copytree(job.base.locator_folder, staged / job.base.locator_folder.relative_to(job.base.root))
    write_bytes_atomic(staged / "model_card.json", json.dumps(_card_layout(job)).encode())  # the full card follows
    return staged


def _card_layout(job: FinetuneJob) -> dict:
    """The model card keys that name the trained folders (models.validate_model_folder reads them)."""
    locator = {"locator": job.base.locator_folder.name.split("__")[-1]} if job.base.locator_folder else {}
    return {"configuration": _configuration(job.base), **locator}


def _write_card(job: FinetuneJob, staged: Path, state: dict, after: dict, epochs: int, device,
                seconds: float) -> dict:
    base_card = job.base.card
    previous = base_card.get("finetune_generation")
    generation = previous + 1 if isinstance(previous, int) else 1
    budget = {"epochs": job.epochs} if job.epochs is not None else {"minutes": job.minutes}
    pieces = state["pieces"]
    card = {
        "name": job.name,
        "version": f"{job.base.version}-ft{generation}",
        "task": base_card.get("task", "proximal femur in CT"),
        "framework": "nnU-Net v2 (nnunetv2 2.8.1), trainer nnUNetTrainer, fine-tuned by femurseg finetune",
        **_card_layout(job),
        "finetune_generation": generation,
        "base_model": {"name": job.base.name, "version": job.base.version, "fold": _base_fold(job.base)},
        "finetune": {
            "dataset": str(job.dataset_dir),
            "training_cases": sorted(pieces),
            "training_pieces": sum(len(v) for v in pieces.values()),
            "cropped_to_femur_regions": job.crop_to_femur_regions,
            "validation_cases": sorted(job.validation),
            "validation_source": job.validation_source,
            "budget": budget,
            "epochs": epochs,
            "iterations_per_epoch": job.iterations,
            "iterations": int(state.get("iterations_done", 0)),
            "learning_rate": FINETUNE_LR,
            "device": str(getattr(device, "type", device)),
            "precision": state.get("precision", "float32"),  # of the network's forward pass in training
            "minutes": round(seconds / 60.0, 1),  # interrupted runs included
            "runs": state["runs"],  # more than 1: resumed after an interruption
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "validation": {"before": state["before"], "after": after},
        "limitations": f"Fine-tuned from {job.base.name} on {len(pieces)} case(s) of {job.dataset_dir.name}; "
                       f"measured on {after['cases']} validation case(s) only. Check its output before use.",
    }
    write_bytes_atomic(staged / "model_card.json", (json.dumps(card, indent=2) + "\n").encode())
    rows = "\n".join(f"| {case} | {_number(state['before']['per_case'][case]['dice'])} | "
                     f"{_number(values['dice'])} | {_number(state['before']['per_case'][case]['asd_mm'], 3)} | "
                     f"{_number(values['asd_mm'], 3)} |" for case, values in after["per_case"].items())
    cropped = ", each femur's region cut as the recipe cuts" if job.crop_to_femur_regions else ""
    markdown = f"""# {job.name} (v{card['version']})

Fine-tuned from **{job.base.name}** (v{job.base.version}) on `{job.dataset_dir}`.

- **Training:** {len(pieces)} case(s) ({card['finetune']['training_pieces']} piece(s){cropped}), {epochs} epoch(s), \
{card['finetune']['iterations']} iterations, learning rate {FINETUNE_LR} (poly), {card['finetune']['minutes']} min on \
{card['finetune']['device']}.
- **Validation:** {job.validation_source}; FemurSeg engine defaults.
- **Before -> after:** {summary(card)}.
- **Weights:** stripped of optimizer state, fp16 (loads with `torch.load(weights_only=True)`).
- **Limitations:** {card['limitations']}

| case | Dice before | Dice after | ASD before (mm) | ASD after (mm) |
|---|---|---|---|---|
{rows}
"""
    write_bytes_atomic(staged / "MODEL_CARD.md", markdown.encode())
    return card


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _figures(metrics: dict) -> str:
    return f"Dice {_number(metrics.get('dice'))}, ASD {_number(metrics.get('asd_mm'), 3)} mm"


def summary(card: dict) -> str:
    """"Dice 0.9120 -> 0.9750, ASD ... on N validation case(s)" for a fine-tuned model's card; "" for others.
    Cards come from model folders: anything malformed gives "n/a", never an exception."""
    validation = card.get("validation") if isinstance(card, dict) else None
    before = validation.get("before") if isinstance(validation, dict) else None
    after = validation.get("after") if isinstance(validation, dict) else None
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    return (f"Dice {_number(before.get('dice'))} -> {_number(after.get('dice'))}, ASD "
            f"{_number(before.get('asd_mm'), 3)} -> {_number(after.get('asd_mm'), 3)} mm on "
            f"{_number(after.get('cases'), 0)} validation case(s)")
