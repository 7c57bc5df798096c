"""Export a CT and its corrected femur label as one case of an nnU-Net v2 raw dataset, without ever losing data.

Layout: nnU-Net's, plus FemurSeg's own files, which nnU-Net never looks at::

    DatasetNNN_Name/
        dataset.json                       channel_names, labels, numTraining, file_ending (+ extra keys, kept)
        imagesTr/<case>_0000<ending>       labelsTr/<case><ending>       training cases
        imagesTs/<case>_0000<ending>       labelsTs/<case><ending>       test cases (test=True)
        femurseg/<case>.json               provenance of the case
        femurseg/replaced/<case>-<UTC>/    the previous files of a case exported again with replace=True
        femurseg/recovered/<UTC>/          leftovers of an interrupted export, moved aside
        .femurseg.lock                     serialises exporters (filelock's flock: freed by the kernel if one dies)

Crash safety. nnU-Net enumerates cases by the images in imagesTr, demands a label for each and numTraining equal
to their count, unless dataset.json lists the cases' files under its ``dataset`` key, which it then reads instead.
An export first writes and fsyncs every new file into a hidden staging folder ``DATASET_DIR/.femurseg-staging-*``
(not beside the final names: a half-written ``.x.part.nii.gz`` in imagesTr ends in file_ending and nnU-Net would
count it as a case), then writes the staging folder's ``journal.json``, the list of steps that publish the export
(each a rename or a hard link, atomic on one filesystem and fsynced). The journal's appearance (a rename) is the
commit point.

- A new case: the new label, the new image, dataset.json (new numTraining), the provenance. Before the image
  lands the case is absent, after it present and complete.
- ``replace`` of a training case: first a dataset.json that lists every training case under ``dataset``, the
  replaced one pointing at its staged new files (``LISTING_MARKER`` says FemurSeg wrote it); from then on nnU-Net
  reads the listing and sees the new case, complete. Then the old image, label and provenance move into
  femurseg/replaced/; the staged files are hard-linked to their final names (so the listing stays valid); the
  provenance lands; last, dataset.json without the listing. So at every instant nnU-Net sees the old case or the
  new one, complete, never neither and never old image with new label.

Invariant, wherever the process is killed: what nnU-Net enumerates is a set of complete cases, each from one
export; no image, label or provenance is ever deleted or overwritten (old versions are moved aside); dataset.json
is always complete and parseable (replaced by a rename), though a brand-new dataset has none until its first export
reaches that step. Every export, under the lock, first recovers (``recover_dataset`` does only that; fine-tuning
calls it when it finds a staging folder): a staging folder without a journal (killed before the commit) is removed,
so the dataset holds what it held before; one with a journal is replayed to its end (steps already done are
skipped), so a killed ``replace`` ends with the new case complete and the old one in femurseg/replaced/; orphan
images and labels go to femurseg/recovered/ and numTraining is recomputed from the files. Between the kill of a
new-case export and that recovery, numTraining can be one short (nnU-Net's verifier then fails loudly).

Refusals raise FemurSegError before the first rename and leave the dataset byte for byte as it was, except the
lock file, the empty folder of a dataset that did not exist, and the crash leftovers cleared as above.
The label must be binary: 0 is background and every other voxel holds one same value, 1 or the dataset's femur
value; a label with several non-zero values is refused, since which one is the femur would be a guess. A label
that is empty or covers more than MAX_LABEL_FRACTION of the volume is refused unless ``force`` (a threshold or
an inverted mask is not a femur). It is written as uint8 holding the femur value on exactly the CT's grid; the
CT is written in its own pixel type.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk
from filelock import FileLock, Timeout

from . import __version__
from .errors import AlreadyExists, FemurSegError
from .imageio import (check_ct, check_label, label_image_like, mask_array, read_ct, read_label, require_same_grid,
                      write_bytes_atomic)
from .iopolicy import read_bytes

DATASET_FOLDER = re.compile(r"Dataset\d{3}_[A-Za-z0-9_\-]+")
CASE_NAME = re.compile(r"[A-Za-z0-9_\-]+")
CHANNEL_SUFFIX = re.compile(r"(.+)_\d{4}")
FILE_ENDINGS = (".nii.gz", ".nrrd", ".nii", ".mha")
SPLITS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
FEMURSEG_FOLDER = "femurseg"
LOCK_FILE = ".femurseg.lock"
STAGING_PREFIX = ".femurseg-staging-"
JOURNAL = "journal.json"
LISTING_MARKER = "femurseg_publishing"  # in a dataset.json whose "dataset" listing a replace wrote
MAX_LABEL_FRACTION = 0.5
MAX_DATASET_JSON_BYTES = 256 * 1024**2  # a listing of 100 000 cases is ~20 MB
MAX_CASE_NAME = 200  # <case>_0000.nii.gz and the provenance's <case>.json stay far inside 255 bytes
LOCK_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ExportResult:
    """What export_case wrote, for the caller's report."""

    dataset_dir: Path
    case: str
    split: str  # "train" or "test"
    image_path: Path
    label_path: Path
    provenance_path: Path
    num_training: int
    replaced_dir: Path | None  # where the case's previous files went (replace=True)
    recovered: tuple[Path, ...]  # what recovery before this export moved: orphans aside, an interrupted export's files


def export_case(ct: sitk.Image | str | os.PathLike, label: sitk.Image | str | os.PathLike,
                dataset_dir: str | os.PathLike, case: str, test: bool = False, replace: bool = False,
                provenance: dict[str, Any] | None = None, label_name: str = "femur", file_ending: str = ".nii.gz",
                description: str | None = None, force: bool = False) -> ExportResult:
    """Add one case (CT + femur label) to the dataset, creating it if needed; see the module docstring.

    ``provenance`` holds what only the caller knows (model name/version of the draft, fill parameters, metrics
    of draft vs exported label, ...); source file names, time, version, split and paths are added here.
    ``label_name``, ``file_ending`` and ``description`` are used only when the dataset is created.
    ``force`` exports a label that is empty or covers most of the volume (refused otherwise).
    """
    dataset_dir = Path(dataset_dir)
    _check_dataset_dir(dataset_dir)
    _check_case_name(case)
    if file_ending not in FILE_ENDINGS:
        raise FemurSegError(f"File ending '{file_ending}' is not supported; use one of {', '.join(FILE_ENDINGS)}.")
    ct_image, ct_source = _load_volume(ct, "CT")
    label_image, label_source = _load_volume(label, "label")
    require_same_grid(ct_image, label_image, "the CT", "the label")
    foreground = _foreground_value(label_image, force)
    record = {**(provenance or {})}
    record.setdefault("sources", {"ct": ct_source, "label": label_source})
    _check_serialisable(record)
    try:
        dataset_dir.mkdir(exist_ok=True)
        with _locked(dataset_dir):
            recovered = _finish_interrupted(dataset_dir)
            dataset_json, json_exists = _load_dataset_json(dataset_dir, label_name, file_ending, description)
            recovered += _recover(dataset_dir, dataset_json, json_exists)
            femur_value = _femur_value(foreground, dataset_json, dataset_dir)
            label_image = label_image_like(mask_array(label_image), ct_image, femur_value)
            return _export_locked(dataset_dir, dataset_json, json_exists, ct_image, label_image, case,
                                  "test" if test else "train", replace, record, recovered)
    except OSError as error:
        raise FemurSegError(_write_failure(error, dataset_dir, case)) from None


def recover_dataset(dataset_dir: str | os.PathLike) -> list[Path]:
    """Finish or clear what an interrupted export left (see the module docstring); returns the paths it moved."""
    dataset_dir = Path(dataset_dir)
    _check_dataset_dir(dataset_dir)
    if not dataset_dir.is_dir():
        raise FemurSegError(f"Dataset folder '{dataset_dir}' does not exist; check the path.")
    with _locked(dataset_dir):
        moved = _finish_interrupted(dataset_dir)
        dataset_json, json_exists = _load_dataset_json(dataset_dir, "femur", FILE_ENDINGS[0], None)
        return moved + _recover(dataset_dir, dataset_json, json_exists)


def _export_locked(dataset_dir: Path, dataset_json: dict[str, Any], json_exists: bool, ct_image: sitk.Image,
                   label_image: sitk.Image, case: str, split: str, replace: bool, record: dict[str, Any],
                   recovered: list[Path]) -> ExportResult:
    """Stage every file, then publish by renames in the order the module docstring's invariant needs."""
    ending = dataset_json["file_ending"]
    old_files = _case_files(dataset_dir, case, ending)
    if not replace and any(path.parent.name != FEMURSEG_FOLDER for path in old_files):
        raise AlreadyExists(f"Case '{case}' already exists in '{dataset_dir}'; choose another case name, or replace "
                            "it (", "; the old files are then kept in femurseg/replaced/).")
    image_folder, label_folder = SPLITS[split]
    image_path = dataset_dir / image_folder / f"{case}_0000{ending}"
    label_path = dataset_dir / label_folder / f"{case}{ending}"
    provenance_path = dataset_dir / FEMURSEG_FOLDER / f"{case}.json"
    now = datetime.now(timezone.utc)
    replaced_dir = dataset_dir / FEMURSEG_FOLDER / "replaced" / f"{case}-{_stamp(now)}" if old_files else None
    train_cases = _complete_cases(dataset_dir, "train", ending) - {case} | ({case} if split == "train" else set())
    json_changed = not json_exists or dataset_json.get("numTraining") != len(train_cases)
    dataset_json["numTraining"] = len(train_cases)
    record.update(case=case, split=split, exported_utc=now.isoformat(timespec="seconds"),
                  femurseg_version=__version__, files={"image": _relative(image_path, dataset_dir),
                                                       "label": _relative(label_path, dataset_dir)},
                  replaced=_relative(replaced_dir, dataset_dir) if replaced_dir else None)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dataset_dir))
    try:
        listed = any(path.parent.name in SPLITS["train"] for path in old_files)  # replacing a training case
        label_staged = _stage_image(label_image, staging / f"label{ending}")
        image_staged = _stage_image(ct_image, staging / f"image{ending}")
        json_path = dataset_dir / "dataset.json"
        final_json = [("move", _stage_bytes(staging / "dataset.json", _json_bytes(dataset_json)), json_path)] \
            if json_changed or listed else []
        provenance = ("move", _stage_bytes(staging / "provenance.json", _json_bytes(record)), provenance_path)
        steps = []
        if listed:
            listing = {known: _listed_files(known, ending) for known in sorted(train_cases - {case})}
            if split == "train":
                listing[case] = {"images": [_relative(image_staged, dataset_dir)],
                                 "label": _relative(label_staged, dataset_dir)}
            listed_json = {**dataset_json, "numTraining": len(listing), "dataset": listing, LISTING_MARKER: case}
            steps.append(("move", _stage_bytes(staging / "dataset-listed.json", _json_bytes(listed_json)), json_path))
        steps += [("move", old, replaced_dir / old.parent.name / old.name) for old in old_files]
        publish = "link" if listed else "move"  # a link keeps the listed staged file where the listing says
        steps += [(publish, label_staged, label_path), (publish, image_staged, image_path)]
        steps += [provenance, *final_json] if listed else [*final_json, provenance]
        for folder in {*SPLITS["train"], image_folder, label_folder, FEMURSEG_FOLDER}:
            (dataset_dir / folder).mkdir(exist_ok=True)
        _stage_bytes(staging / f"{JOURNAL}.part", _json_bytes(
            {"case": case, "steps": [[kind, _relative(a, dataset_dir), _relative(b, dataset_dir)]
                                     for kind, a, b in steps]}))
        _move(staging / f"{JOURNAL}.part", staging / JOURNAL)  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _replay(dataset_dir, staging)
    except OSError as error:  # committed: recovery finishes it, so the message must not say "unchanged"
        reason = error.strerror or str(error)
        raise FemurSegError(
            f"Export of case '{case}' into '{dataset_dir}' stopped while publishing its files ({reason}); they are "
            "staged, and the next export into this dataset (or recover_dataset) completes it."
        ) from None
    return ExportResult(dataset_dir, case, split, image_path, label_path, provenance_path, len(train_cases),
                        replaced_dir, tuple(recovered))


def _recover(dataset_dir: Path, dataset_json: dict[str, Any], json_exists: bool) -> list[Path]:
    """Move orphan images and labels aside and fix a stale numTraining (after _finish_interrupted)."""
    moved = []
    for leftover in dataset_dir.glob(".dataset.json.*.part.json"):  # write_bytes_atomic's temporary file
        leftover.unlink()
    ending = dataset_json["file_ending"]
    target = dataset_dir / FEMURSEG_FOLDER / "recovered" / _stamp(datetime.now(timezone.utc))
    for image_folder, label_folder in SPLITS.values():
        images = _files_by_case(dataset_dir / image_folder, ending, channel=True)
        labels = _files_by_case(dataset_dir / label_folder, ending, channel=False)
        orphans = [p for c in images.keys() - labels.keys() for p in images[c]]  # images first: see invariant
        orphans += [p for c in labels.keys() - images.keys() for p in labels[c]]
        for orphan in orphans:
            moved.append(target / orphan.parent.name / orphan.name)
            _move(orphan, moved[-1])
    num_training = len(_complete_cases(dataset_dir, "train", ending))
    if json_exists and dataset_json.get("numTraining") != num_training:
        dataset_json["numTraining"] = num_training
        write_bytes_atomic(dataset_dir / "dataset.json", _json_bytes(dataset_json))
    return moved


def _finish_interrupted(dataset_dir: Path) -> list[Path]:
    """Replay the staging folders that hold a journal (committed exports), remove the others; returns what moved."""
    moved = []
    for staging in sorted(dataset_dir.glob(f"{STAGING_PREFIX}*")):
        if (staging / JOURNAL).is_file():
            moved += _replay(dataset_dir, staging)
        shutil.rmtree(staging, ignore_errors=True)
    return moved


def _replay(dataset_dir: Path, staging: Path) -> list[Path]:
    """Do the journal's steps that are not done yet, in order, then remove the staging folder; returns the
    destinations it published. A staged file still in staging is not moved yet; a link is made while its final
    name is free; an old file goes to femurseg/replaced/ only while its backup does not exist (after the backup,
    a new file holds its name)."""
    journal = json.loads((staging / JOURNAL).read_bytes())
    done = []
    for kind, source, destination in journal["steps"]:
        source, destination = dataset_dir / source, dataset_dir / destination
        if not source.exists() or (destination.exists() and (kind == "link" or source.parent != staging)):
            continue
        if kind == "link":
            _link(source, destination, staging)
        else:
            _move(source, destination)
        done.append(destination)
    shutil.rmtree(staging)
    return done


def _listed_files(case: str, ending: str) -> dict[str, Any]:
    """A training case as dataset.json's ``dataset`` key lists it (paths relative to the dataset folder)."""
    return {"images": [f"{SPLITS['train'][0]}/{case}_0000{ending}"], "label": f"{SPLITS['train'][1]}/{case}{ending}"}


def _files_by_case(folder: Path, ending: str, channel: bool) -> dict[str, list[Path]]:
    """nnU-Net's case identifiers of the files in ``folder`` (images carry a _XXXX channel suffix)."""
    cases: dict[str, list[Path]] = {}
    for path in sorted(folder.glob(f"*{ending}")) if folder.is_dir() else []:
        stem = path.name[: -len(ending)]
        match = CHANNEL_SUFFIX.fullmatch(stem)
        if channel and not match:
            continue
        cases.setdefault(match.group(1) if channel else stem, []).append(path)
    return cases


def _complete_cases(dataset_dir: Path, split: str, ending: str) -> set[str]:
    return set(dataset_cases(dataset_dir, split, ending))


def dataset_cases(dataset_dir: Path, split: str, ending: str) -> dict[str, tuple[list[Path], Path]]:
    """The split's complete cases as nnU-Net enumerates them: case -> (its images, one per channel; its label).
    Images without a label (and labels without an image) are not cases; the next export moves them aside."""
    image_folder, label_folder = SPLITS[split]
    images = _files_by_case(dataset_dir / image_folder, ending, channel=True)
    labels = _files_by_case(dataset_dir / label_folder, ending, channel=False)
    return {case: (images[case], labels[case][0]) for case in sorted(images.keys() & labels.keys())}


def _case_files(dataset_dir: Path, case: str, ending: str) -> list[Path]:
    """The case's existing files, images first so that moving them away in order keeps the invariant."""
    candidates = [dataset_dir / folder / f"{case}_0000{ending}" for folder, _ in SPLITS.values()]
    candidates += [dataset_dir / folder / f"{case}{ending}" for _, folder in SPLITS.values()]
    candidates.append(dataset_dir / FEMURSEG_FOLDER / f"{case}.json")
    return [path for path in candidates if path.exists()]


def _load_dataset_json(dataset_dir: Path, label_name: str, file_ending: str,
                       description: str | None) -> tuple[dict[str, Any], bool]:
    """The dataset's dataset.json as it is (key order kept), or the one a new dataset gets."""
    path = dataset_dir / "dataset.json"
    if not path.exists():
        if not label_name or label_name == "background":
            raise FemurSegError(f"Label name '{label_name}' cannot name the femur; use e.g. 'femur'.")
        new = {"channel_names": {"0": "CT"}, "labels": {"background": 0, label_name: 1}, "numTraining": 0,
               "file_ending": file_ending, "name": dataset_dir.name.split("_", 1)[1]}
        return new | ({"description": description} if description else {}), False
    try:
        dataset_json = json.loads(read_bytes(path, "dataset.json", MAX_DATASET_JSON_BYTES))  # a regular file only
    except ValueError as error:
        raise FemurSegError(
            f"'{path}' does not parse as JSON ({error}); FemurSeg will not rewrite it. Fix or restore it, then "
            "export again."
        ) from None
    problem = dataset_json_problem(dataset_json)
    if problem:
        raise FemurSegError(f"'{path}' cannot be appended to: {problem}. Fix it or export into a new dataset folder.")
    return dataset_json, True


def dataset_json_problem(dataset_json: Any) -> str | None:
    """Why FemurSeg cannot use this dataset.json (append to it, or fine-tune on it), or None."""
    if not isinstance(dataset_json, dict):
        return "it is not a JSON object"
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in dataset_json]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if "dataset" in dataset_json:
        return "it lists its files under 'dataset', which FemurSeg does not maintain"
    if len(dataset_json["channel_names"]) != 1:
        return "it has several channels; FemurSeg exports a single CT channel"
    if dataset_json["file_ending"] not in FILE_ENDINGS:
        return f"its file_ending '{dataset_json['file_ending']}' is not one of {', '.join(FILE_ENDINGS)}"
    if femur_label(dataset_json["labels"]) is None:
        return "its labels must be background 0 plus exactly one femur label (value 1-255)"
    return None


def femur_label(labels: Any) -> tuple[str, int] | None:
    """The single non-background label, whatever its name (the seed's dataset calls it 'bone')."""
    if not isinstance(labels, dict) or labels.get("background") != 0:
        return None
    others = [(name, value) for name, value in labels.items() if name != "background"]
    if len(others) == 1 and type(others[0][1]) is int and 0 < others[0][1] < 256:
        return others[0]
    return None


def _femur_value(foreground: int, dataset_json: dict[str, Any], dataset_dir: Path) -> int:
    """The value the label is written with; the input's single foreground value must be 1 or that value."""
    name, value = femur_label(dataset_json["labels"])
    if foreground not in (1, value):
        raise FemurSegError(
            f"The label's femur voxels have value {foreground}, which is not in {dataset_dir / 'dataset.json'}'s "
            f"labels {dataset_json['labels']}; mark the femur with {' or '.join(dict.fromkeys(map(str, (value, 1))))} "
            f"('{name}') and the background with 0."
        )
    return value


def _check_dataset_dir(dataset_dir: Path) -> None:
    if not DATASET_FOLDER.fullmatch(dataset_dir.name):
        raise FemurSegError(
            f"'{dataset_dir.name}' is not a valid nnU-Net dataset folder name; use DatasetNNN_Name with a 3-digit id "
            "and letters, digits, '_' or '-' in the name, e.g. Dataset101_FemurCorrected."
        )
    if dataset_dir.exists() and not dataset_dir.is_dir():
        raise FemurSegError(f"'{dataset_dir}' is a file, not a dataset folder; choose another path.")
    if not dataset_dir.parent.is_dir():
        raise FemurSegError(f"Folder '{dataset_dir.parent}' does not exist (or is not a folder); create it first.")
    subfolders = (*SPLITS["train"], *SPLITS["test"], FEMURSEG_FOLDER)
    existing = [dataset_dir, *(dataset_dir / name for name in subfolders)] if dataset_dir.exists() else []
    for folder in existing or [dataset_dir.parent]:
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise FemurSegError(f"Folder '{folder}' is not writable; fix its permissions or choose another dataset.")


def case_name_from_file(file_name: str) -> str:
    """A case name from a CT's file name ("F7L fall.nii.gz" -> "F7L_fall"), so a GUI never offers the last CT's name
    for the next CT; characters a case name cannot hold become '_'."""
    stem = Path(file_name).name
    for ending in (*FILE_ENDINGS, ".nhdr", ".mhd", ".gz"):
        if stem.lower().endswith(ending):
            stem = stem[: -len(ending)]
            break
    case = re.sub(r"[^A-Za-z0-9_\-]+", "_", stem).strip("_")[:MAX_CASE_NAME]
    if CHANNEL_SUFFIX.fullmatch(case):
        case = case.rsplit("_", 1)[0]
    return case or "case001"


def _check_case_name(case: str) -> None:
    if not CASE_NAME.fullmatch(case):
        raise FemurSegError(
            f"Case name '{case}' is invalid: use only letters, digits, '_' and '-' (no path separators, dots or "
            "spaces), e.g. F7L_fall."
        )
    if CHANNEL_SUFFIX.fullmatch(case):
        raise FemurSegError(
            f"Case name '{case}' ends like an nnU-Net channel suffix (_0000); drop it, FemurSeg adds _0000 itself."
        )
    if len(case) > MAX_CASE_NAME:  # its image is <case>_0000.nii.gz: a file name holds at most 255 bytes
        raise FemurSegError(f"Case name '{case[:40]}...' has {len(case)} characters; use at most {MAX_CASE_NAME}.")


def _load_volume(source: sitk.Image | str | os.PathLike, what: str) -> tuple[sitk.Image, str | None]:
    """The CT or label, checked as one (see imageio.check_ct/check_label), and its file name for the provenance."""
    if isinstance(source, sitk.Image):
        (check_ct if what == "CT" else check_label)(source, f"The {what}")
        return source, None
    return (read_ct if what == "CT" else read_label)(source, what), Path(source).name


def _foreground_value(label_image: sitk.Image, force: bool) -> int:
    """The label's single femur value (1 for an empty label exported with ``force``)."""
    voxels = sitk.GetArrayViewFromImage(label_image)
    values = np.unique(voxels)
    foreground = values[values != 0]
    if foreground.size == 0:
        if force:
            return 1
        raise FemurSegError("The label is empty (every voxel is 0): nothing marks the femur. Segment it first, or "
                            "export a case without femur on purpose with force (--force).")
    if foreground.size > 1:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise FemurSegError(
            f"The label has {values.size} different values ({shown}); a femur label must be binary (0 = background, "
            "one value = femur). Merge or remove the other segments first."
        )
    fraction = np.count_nonzero(voxels) / voxels.size
    if fraction > MAX_LABEL_FRACTION and not force:
        raise FemurSegError(
            f"The label covers {fraction:.0%} of the volume; a femur covering most of its CT is likely a threshold or "
            "an inverted mask. Check it, or export it anyway with force (--force)."
        )
    return int(foreground[0])


def _check_serialisable(record: dict[str, Any]) -> None:
    try:
        json.dumps(record)
    except (TypeError, ValueError) as error:
        raise FemurSegError(
            f"The provenance cannot be stored as JSON ({error}); pass numbers, strings, lists and dicts."
        ) from None


@contextlib.contextmanager
def _locked(dataset_dir: Path) -> Iterator[None]:
    try:
        with FileLock(dataset_dir / LOCK_FILE, timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise FemurSegError(
            f"Another export into '{dataset_dir}' has held {LOCK_FILE} for {LOCK_TIMEOUT_S:.0f} s; wait for it to "
            "finish, then export again."
        ) from None


def _stage_image(image: sitk.Image, path: Path) -> Path:
    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError as error:
        raise OSError(errno.EIO, (str(error).strip() or "write failed").splitlines()[-1]) from None
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return path


def _stage_bytes(path: Path, data: bytes) -> Path:
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(handle, view):]
        os.fsync(handle)
    finally:
        os.close(handle)
    return path


def _move(source: Path, destination: Path) -> None:
    """Rename (atomic on one filesystem), then fsync the folder so the order survives a power cut too."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, destination)
    folder = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _link(source: Path, destination: Path, staging: Path) -> None:
    """Give a staged file its final name as well (a hard link; a copy renamed into place where the filesystem
    has none), so that a listing naming the staged file stays valid."""
    try:
        os.link(source, destination)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        copy = staging / f"{source.name}.copy"
        shutil.copyfile(source, copy)
        with open(copy, "rb") as handle:
            os.fsync(handle.fileno())
        _move(copy, destination)
        return
    folder = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=4) + "\n").encode("utf-8")


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%S%fZ")


def _relative(path: Path, dataset_dir: Path) -> str:
    return path.relative_to(dataset_dir).as_posix()


def _write_failure(error: OSError, dataset_dir: Path, case: str) -> str:
    """Every write is staged before the first rename, so a failed write has published nothing."""
    unchanged = "the dataset was left unchanged"
    if error.errno == errno.ENOSPC:
        return f"Disk full while exporting case '{case}' into '{dataset_dir}'; {unchanged}. Free space, export again."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Cannot write into '{dataset_dir}' ({error.strerror}); {unchanged}. Make it writable or pick another."
    return f"Could not export case '{case}' into '{dataset_dir}': {error.strerror or error}; {unchanged}."
