"""The bad-input suite, one table over every command and front end: hostile or mistaken input to the command line
(every sub-command), batch, the warm worker's protocol, the Slicer module's logic (FemurSegLib.scene on real
slicer-core through trame-slicer's SlicerApp, as FemurSegLogic calls it), the segmentation child process that
Slicer and the browser start, and the browser's triggers (the functions the page's buttons and uploads call; two
uploads also go through real Chromium in test_web_browser.py). A new command or option is covered by adding a row.

Every case builds its inputs in its own folder (also the current directory while it runs), runs one front end
once, and checks the README's promise: exit code 2 (or, in Slicer and the page, the FemurSegError they show; or,
for a row marked "warning", exit 0 with one ``femurseg: warning:`` line), one line, no traceback, within
TIME_LIMIT_S, and not one byte changed or added under the case's folder, which holds its inputs, outputs,
datasets and the user models folder (every file hashed before and after, FIFOs and links by kind and target; the
exporter's lock file aside). Hostile checkpoints carry a payload that creates a marker file when unpickled;
test_the_hostile_checkpoint_runs_code_when_unpickled proves it would.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FemurSegLib.cli import main
from FemurSegLib.dataset import LOCK_FILE, export_case
from FemurSegLib.errors import FemurSegError
from FemurSegLib.models import BUNDLED_MODELS_DIR, TRUST_FILE, install_model, resolve_model

REPO = Path(__file__).resolve().parents[2]
MARKER = "MARKER"  # what a hostile checkpoint's payload creates in the case folder
TIME_LIMIT_S = 60.0  # per case: every refusal comes before the work it refuses


@dataclass(frozen=True)
class Outcome:
    code: int
    text: str  # the CLI's stderr, or the message Slicer / the page shows
    cli: bool  # the CLI's text must start with "femurseg: error: "


@dataclass(frozen=True)
class Attempt:
    run: Callable[[], Outcome]
    also_unchanged: tuple[Path, ...] = ()  # folders outside the case folder that must not change either


CASES: dict[str, tuple[Callable[[Path], Attempt], str, str]] = {}


def case(name: str, message: str, expect: str = "error"):
    """Register a case: ``build(folder) -> Attempt``, a regular expression its one line must match, and whether that
    line is an error (exit 2) or a warning (exit 0: the command did its work and said what it skipped)."""
    def register(build: Callable[[Path], Attempt]) -> Callable[[Path], Attempt]:
        assert name not in CASES, name
        CASES[name] = (build, message, expect)
        return build
    return register


def row(name: str, message: str, build: Callable[[Path], Attempt], expect: str = "error") -> None:
    """A table row: the same as @case, for one-line builders."""
    case(name, message, expect)(build)


# --- front ends -------------------------------------------------------------------------------------------------

def cli(*argv: object) -> Attempt:
    """``femurseg ARGV`` in this process (FemurSegLib.cli.main, what the console script runs)."""
    def run() -> Outcome:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exit_:
                code = exit_.code
        return Outcome(code, err.getvalue(), True)
    return Attempt(run)


def cli_process(*argv: object, unprivileged: bool = False, cwd: Path | None = None) -> Attempt:
    """``python -m FemurSegLib ARGV`` as a user runs it: its real stderr, C-level library output included."""
    command = [sys.executable, "-m", "FemurSegLib", *map(str, argv)]
    if unprivileged and os.geteuid() == 0:  # root ignores file modes: drop the capabilities that let it
        if shutil.which("capsh") is None:
            pytest.skip("running as root without capsh: cannot make a folder read-only for this process")
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", shlex.join(command)]

    def run() -> Outcome:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        return Outcome(done.returncode, done.stderr, True)
    return Attempt(run)


def library(action: Callable[[], object]) -> Attempt:
    """A FemurSegLib call a GUI makes; the GUI shows the FemurSegError's text as it is."""
    def run() -> Outcome:
        try:
            action()
        except FemurSegError as error:
            return Outcome(2, str(error), False)
        return Outcome(0, "", False)
    return Attempt(run)


@functools.cache
def slicer_app():
    trame_core = pytest.importorskip("trame_slicer.core")
    return trame_core.SlicerApp()


def in_slicer(action: Callable[[object], object]) -> Attempt:
    """``action(app)`` on a real Slicer scene; the scene must keep exactly the nodes it had."""
    def run() -> Outcome:
        app = slicer_app()
        count = app.scene.GetNumberOfNodes()
        outcome = library(lambda: action(app)).run()
        assert app.scene.GetNumberOfNodes() == count, "the scene changed"
        return outcome
    return Attempt(run)


# --- inputs -----------------------------------------------------------------------------------------------------

def ct_array(size: int = 24) -> np.ndarray:
    """A small CT: air at -1000 HU, a 'bone' box at 1200 HU, some noise so no two voxels need be equal."""
    array = np.random.default_rng(size).normal(-1000, 20, (size, size, size)).astype(np.int16)
    array[size // 4: 3 * size // 4, size // 3: 2 * size // 3, size // 4: 3 * size // 4] = 1200
    return array


def write(folder: Path, name: str, array: np.ndarray, spacing=(1.0, 1.0, 1.0), compress: bool = True) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path = folder / name
    sitk.WriteImage(image, str(path), compress)
    return path


def ct_file(folder: Path, name: str = "ct.nrrd", size: int = 24) -> Path:
    return write(folder, name, ct_array(size))


def label_file(folder: Path, name: str = "label.nrrd", size: int = 24) -> Path:
    return write(folder, name, (ct_array(size) > 0).astype(np.uint8))


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def nan_ct(folder: Path, name: str = "nan.nrrd") -> Path:
    return write(folder, name, np.full((24, 24, 24), np.nan, np.float32))


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: it stands for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path, variant: int = 0) -> None:
        self.marker, self.variant = marker, variant

    def __reduce__(self):
        return Path.touch, (self.marker, 0o666 - self.variant)


def checkpoint_of(model_root: Path) -> Path:
    return next(model_root.glob("Dataset*/*/fold_*/checkpoint_final.pth"))


def hostile_model(folder: Path, name: str = "HostileModel", variant: int = 0) -> Path:
    """A copy of the bundled model whose otherwise valid checkpoint also carries the payload."""
    root = folder / name
    shutil.copytree(resolve_model(None).root, root)
    checkpoint = checkpoint_of(root)
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["payload"] = Payload(folder / MARKER, variant)
    torch.save(content, checkpoint)
    return root


def bundled_copy(folder: Path, change: Callable[[Path], object]) -> Path:
    root = folder / "CopiedModel"
    shutil.copytree(resolve_model(None).root, root)
    change(root)
    return root


def dataset_with_case(folder: Path) -> Path:
    dataset = folder / "Dataset201_Existing"
    export_case(folder / "ct.nrrd", folder / "label.nrrd", dataset, "A1")
    return dataset


# --- the cases: checkpoints and models ----------------------------------------------------------------------------

@case("segment --model FOLDER with a hostile checkpoint (real process)", "full pickle loader.*not loaded")
def _(folder: Path) -> Attempt:
    return cli_process("segment", ct_file(folder), folder / "out.nrrd", "--model", hostile_model(folder))


@case("segment --model FOLDER that ships its own trust file", "full pickle loader")
def _(folder: Path) -> Attempt:
    root = hostile_model(folder)
    checkpoint = checkpoint_of(root)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    (root / TRUST_FILE).write_text(json.dumps({"checkpoints": {checkpoint.relative_to(root).as_posix(): digest}}))
    return cli("segment", ct_file(folder), folder / "out.nrrd", "--model", root)


@case("segment with a trusted installed model whose checkpoint was swapped", "changed since it was installed")
def _(folder: Path) -> Attempt:
    installed = install_model(hostile_model(folder), name="Trusted", trust_pickle=True)
    shutil.copy2(checkpoint_of(hostile_model(folder, "Other", variant=1)), checkpoint_of(installed.root))
    return cli("segment", ct_file(folder), folder / "out.nrrd", "--model", "Trusted")


@case("models install of a hostile checkpoint without --trust", "full pickle loader.*--trust")
def _(folder: Path) -> Attempt:
    return cli("models", "install", hostile_model(folder))


@case("models install of a truncated checkpoint", "is corrupt")
def _(folder: Path) -> Attempt:
    return cli("models", "install", bundled_copy(folder, lambda root: truncated(checkpoint_of(root))))


@case("models install --trust of a truncated checkpoint", "is corrupt")
def _(folder: Path) -> Attempt:
    return cli("models", "install", bundled_copy(folder, lambda root: truncated(checkpoint_of(root))), "--trust")


def _flip_a_byte(root: Path) -> None:
    data = bytearray(checkpoint_of(root).read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint_of(root).write_bytes(bytes(data))


@case("models install --trust of a checkpoint with one flipped byte", "is corrupt.*CRC")
def _(folder: Path) -> Attempt:
    return cli("models", "install", bundled_copy(folder, _flip_a_byte), "--trust")


@case("segment --model FOLDER with a checkpoint that is not a checkpoint", "is corrupt")
def _(folder: Path) -> Attempt:
    root = bundled_copy(folder, lambda root: checkpoint_of(root).write_bytes(b"not a checkpoint\n" * 50))
    return cli("segment", ct_file(folder), folder / "out.nrrd", "--model", root)


def _foreign_class(root: Path) -> None:
    plans_path = next(root.glob("Dataset*/*/plans.json"))
    plans = json.loads(plans_path.read_text())
    for configuration in plans["configurations"].values():
        if "architecture" in configuration:
            configuration["architecture"]["network_class_name"] = "os.system"
    plans_path.write_text(json.dumps(plans))


@case("segment --model FOLDER whose plans.json names os.system", "outside the packages a model may use")
def _(folder: Path) -> Attempt:
    return cli("segment", ct_file(folder), folder / "out.nrrd", "--model", bundled_copy(folder, _foreign_class))


@case("models install of a zip without dataset.json names the zip", r"'[^']*broken\.zip[^']*' is not an nnU-Net")
def _(folder: Path) -> Attempt:
    trained = resolve_model(None).trained_folder
    archive = folder / "broken.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in trained.rglob("*"):
            if path.is_file() and path.name != "dataset.json":
                handle.write(path, f"{trained.parent.name}/{trained.name}/{path.relative_to(trained)}")
    return cli("models", "install", archive)


@case("segmentation worker (Slicer, browser) with a hostile model", "full pickle loader")
def _(folder: Path) -> Attempt:
    from FemurSegLib.imageio import read_ct
    from FemurSegLib.runner import SegmentationWorker

    ct, model = ct_file(folder), hostile_model(folder)

    def attempt() -> None:
        worker = SegmentationWorker()
        try:
            worker.segment(read_ct(ct), model=str(model), device="cpu").wait_for_completion(timeout_s=240)
        finally:
            worker.close()
    return library(attempt)


@case("Slicer logic's in-process Segmenter with a hostile model", "full pickle loader")
def _(folder: Path) -> Attempt:
    from FemurSegLib.inference import InferenceOptions, Segmenter

    model = hostile_model(folder)
    return library(lambda: Segmenter(resolve_model(str(model)).root, InferenceOptions(device="cpu")))


# --- output paths ------------------------------------------------------------------------------------------------

@case("segment with the output equal to the input CT", "is the input")
def _(folder: Path) -> Attempt:
    return cli("segment", ct_file(folder), folder / "ct.nrrd")


@case("fill with the output equal to the input CT", "is the input")
def _(folder: Path) -> Attempt:
    return cli("fill", ct_file(folder), folder / "ct.nrrd")


@case("fill with the output a symlink to the input CT", "is the input")
def _(folder: Path) -> Attempt:
    (folder / "link.nrrd").symlink_to(ct_file(folder))
    return cli("fill", folder / "ct.nrrd", folder / "link.nrrd")


@case("compare --json onto the reference label", "is the input")
def _(folder: Path) -> Attempt:
    reference = label_file(folder, "reference.nrrd")
    return cli("compare", reference, label_file(folder), "--json", reference)


@case("segment to a .png output", r"must end in \.nrrd")
def _(folder: Path) -> Attempt:
    return cli("segment", ct_file(folder), folder / "femur.png")


@case("fill to a .mhd output (two files, not atomic)", r"must end in \.nrrd")
def _(folder: Path) -> Attempt:
    return cli("fill", ct_file(folder), folder / "femur.mhd")


@case("segment into a read-only folder, refused before inference", "Cannot write into")
def _(folder: Path) -> Attempt:
    ct = ct_file(folder)
    (folder / "read-only").mkdir()
    attempt = cli_process("segment", ct, folder / "read-only" / "femur.nrrd", unprivileged=True)

    def run() -> Outcome:
        os.chmod(folder / "read-only", 0o555)
        try:
            return attempt.run()
        finally:
            os.chmod(folder / "read-only", 0o755)
    return Attempt(run)


@case("fill into a folder that does not exist", "does not exist")
def _(folder: Path) -> Attempt:
    return cli("fill", ct_file(folder), folder / "missing" / "fill.nrrd")


@case("fill onto an existing folder", "is a folder")
def _(folder: Path) -> Attempt:
    (folder / "out.nrrd").mkdir()
    return cli("fill", ct_file(folder), folder / "out.nrrd")


@case("phantom with the CT and the label the same file", "is the input")
def _(folder: Path) -> Attempt:
    return cli("phantom", folder / "same.nrrd", folder / "same.nrrd")


@case("demo --out naming a file", "is a file")
def _(folder: Path) -> Attempt:
    (folder / "notes.txt").write_text("mine")
    return cli("demo", "--out", folder / "notes.txt")


# --- input files ----------------------------------------------------------------------------------------------------

@case("segment a truncated .nii.gz CT", "truncated")
def _(folder: Path) -> Attempt:
    return cli("segment", truncated(ct_file(folder, "ct.nii.gz")), folder / "out.nrrd")


@case("fill a truncated .nii CT", "truncated: its header declares")
def _(folder: Path) -> Attempt:
    return cli("fill", truncated(ct_file(folder, "ct.nii")), folder / "out.nrrd")


@case("fill a truncated .mha CT (real process: no reader noise on stderr)", "truncated: its header declares")
def _(folder: Path) -> Attempt:
    return cli_process("fill", truncated(write(folder, "ct.mha", ct_array(), compress=False)), folder / "out.nrrd")


@case("fill a truncated .nrrd CT", "truncated or damaged")
def _(folder: Path) -> Attempt:
    return cli("fill", truncated(write(folder, "raw.nrrd", ct_array(), compress=False)), folder / "out.nrrd")


@case("compare with a truncated .nii.gz label", "truncated")
def _(folder: Path) -> Attempt:
    return cli("compare", label_file(folder), truncated(label_file(folder, "other.nii.gz")))


@case("fill an empty file", "could not be read as an image")
def _(folder: Path) -> Attempt:
    (folder / "empty.nii.gz").write_bytes(b"")
    return cli("fill", folder / "empty.nii.gz", folder / "out.nrrd")


@case("fill a 2D image", "is 2D")
def _(folder: Path) -> Attempt:
    sitk.WriteImage(sitk.Image(40, 30, sitk.sitkInt16), str(folder / "flat.nrrd"))
    return cli("fill", folder / "flat.nrrd", folder / "out.nrrd")


@case("segment an RGB image", "3 components per voxel")
def _(folder: Path) -> Attempt:
    sitk.WriteImage(sitk.Image([24, 24, 24], sitk.sitkVectorUInt8, 3), str(folder / "rgb.mha"))
    return cli("segment", folder / "rgb.mha", folder / "out.nrrd")


@case("segment an all-NaN CT", "NaN or infinite voxels")
def _(folder: Path) -> Attempt:
    return cli("segment", nan_ct(folder), folder / "out.nrrd")


@case("fill a CT with one infinite voxel", "1 NaN or infinite voxels")
def _(folder: Path) -> Attempt:
    array = ct_array().astype(np.float32)
    array[3, 4, 5] = np.inf
    return cli("fill", write(folder, "inf.nrrd", array), folder / "out.nrrd")


@case("segment an all-zero CT", "same value .0. in every voxel")
def _(folder: Path) -> Attempt:
    return cli("segment", write(folder, "zero.nrrd", np.zeros((24, 24, 24), np.int16)), folder / "out.nrrd")


@case("fill a 5x5x5 CT", "too small to hold a femur")
def _(folder: Path) -> Attempt:
    return cli("fill", ct_file(folder, size=5), folder / "out.nrrd")


@case("segment a CT whose spacing is in metres", "voxel spacing .* outside")
def _(folder: Path) -> Attempt:
    return cli("segment", write(folder, "metres.nrrd", ct_array(), (0.001, 0.001, 0.001)), folder / "out.nrrd")


@case("compare a CT given as the label", "looks like a CT")
def _(folder: Path) -> Attempt:
    return cli("compare", label_file(folder), ct_file(folder))


# --- parameters -------------------------------------------------------------------------------------------------------

for _name, _args, _message in [
    ("fill --closing-mm 30 (was MemoryError)", ("--closing-mm", "30"), "closing radius 30 mm is outside"),
    ("fill --threshold nan", ("--threshold", "nan"), "threshold nan HU is outside"),
    ("fill --max-ray-mm 1e6", ("--max-ray-mm", "1e6"), "maximum ray length"),
    ("fill --max-open 9", ("--max-open", "9"), "open directions 9"),
]:
    case(_name, _message)(lambda folder, args=_args: cli("fill", ct_file(folder), folder / "out.nrrd", *args))

for _name, _args, _message in [
    ("segment --tile-step 0", ("--tile-step", "0"), "Tile step 0.0 is out of range"),
    ("segment --tile-step 2", ("--tile-step", "2"), "Tile step 2.0 is out of range"),
    ("segment --device tpu", ("--device", "tpu"), "argument --device: invalid choice"),
]:
    case(_name, _message)(lambda folder, args=_args: cli("segment", ct_file(folder), folder / "out.nrrd", *args))


@case("phantom --seed -1", "argument --seed: -1 is negative")
def _(folder: Path) -> Attempt:
    return cli("phantom", folder / "ct.nrrd", folder / "label.nrrd", "--seed", "-1")


@case("web --port 70000", "port 70000 is outside")
def _(folder: Path) -> Attempt:
    return cli("web", "--port", "70000")


@case("train-bundled --model-dir onto the bundled model", "never overwrites")
def _(folder: Path) -> Attempt:
    attempt = cli("train-bundled", folder / "work", "--model-dir", resolve_model(None).root)
    return Attempt(attempt.run, also_unchanged=(BUNDLED_MODELS_DIR,))


# --- export ---------------------------------------------------------------------------------------------------------

def export_attempt(folder: Path, ct: Path | None = None, label: Path | None = None, *options: str) -> Attempt:
    """Export into a dataset that already holds case A1 (exported from ct.nrrd and label.nrrd)."""
    ct_file(folder), label_file(folder)
    dataset = dataset_with_case(folder)
    return cli("export", ct or folder / "ct.nrrd", label or folder / "label.nrrd", dataset, "--case", "B1", *options)


@case("export a CT given as the label: a short message", r"^(?=.*looks like a CT).{0,300}$")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, label=ct_file(folder, "ct-again.nrrd"))


@case("export an empty label", "label is empty.*--force")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, label=write(folder, "empty.nrrd", np.zeros((24, 24, 24), np.uint8)))


@case("export a label covering most of the volume", "covers 100% of the volume.*--force")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, label=write(folder, "full.nrrd", np.ones((24, 24, 24), np.uint8)))


@case("export a 5x5x5 case", "too small to hold a femur")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, ct_file(folder, "tiny.nrrd", 5), label_file(folder, "tiny-label.nrrd", 5))


@case("export an all-NaN CT", "NaN or infinite voxels")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, ct=nan_ct(folder))


@case("export a truncated label", "truncated")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, label=truncated(label_file(folder, "cut.nii.gz")))


@case("export an existing case without --replace", r"already exists.*\(--replace")
def _(folder: Path) -> Attempt:
    ct_file(folder), label_file(folder)
    return cli("export", folder / "ct.nrrd", folder / "label.nrrd", dataset_with_case(folder), "--case", "A1")


@case("export a label whose value is not the dataset's", r"mark the femur with 1 \('femur'\) and the background")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, label=write(folder, "three.nrrd", (ct_array() > 0).astype(np.uint8) * 3))


@case("export a label on another voxel grid", "not on the same voxel grid as the CT.* onto the grid of the CT")
def _(folder: Path) -> Attempt:
    return export_attempt(folder, label=write(folder, "shifted.nrrd", (ct_array() > 0).astype(np.uint8), (1, 1, 2)))


@case("export into a dataset whose dataset.json is corrupt", "does not parse as JSON")
def _(folder: Path) -> Attempt:
    attempt = export_attempt(folder)
    (folder / "Dataset201_Existing" / "dataset.json").write_text('{"labels": ')
    return attempt


# --- the Slicer module's logic on a real scene ---------------------------------------------------------------

@functools.cache
def bundled_segmenter():
    from FemurSegLib.inference import InferenceOptions, Segmenter

    return Segmenter(resolve_model(None).root, InferenceOptions(device="cpu"), notify=lambda message: None)


def in_slicer(array: np.ndarray, action: Callable[..., object], segment: np.ndarray | None = None) -> Attempt:
    """``action(app, ct_node[, segmentation_node])`` on a real Slicer scene holding the CT (and a segmentation
    made from ``segment``), as the user loaded them; the action must leave the scene with exactly those nodes."""
    def run() -> Outcome:
        from FemurSegLib import scene

        app = slicer_app()
        ct = sitk.GetImageFromArray(array)
        nodes = [scene.add_volume_node(app.scene, ct, "CT")]
        try:
            if segment is not None:
                label = sitk.GetImageFromArray(segment.astype(np.uint8))
                label.CopyInformation(ct)
                nodes.append(scene.add_label_as_segment(app.scene, app.segmentations_logic, label, nodes[0]))
            count = app.scene.GetNumberOfNodes()
            outcome = library(lambda: action(app, *nodes)).run()
            assert app.scene.GetNumberOfNodes() == count, "the scene changed"
            return outcome
        finally:
            for node in reversed(nodes):
                scene._remove_node(app.scene, node)
    return Attempt(run)


@case("Slicer: fill an all-NaN CT node", "NaN or infinite voxels")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    return in_slicer(np.full((24, 24, 24), np.nan, np.float32),
                     lambda app, node: scene.fill_volume_node(app.scene, app.segmentations_logic, node))


@case("Slicer: segment a blank CT node", "same value")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    return in_slicer(np.full((24, 24, 24), -1000, np.int16), lambda app, node: scene.segment_volume_node(
        app.scene, app.segmentations_logic, node, bundled_segmenter()))


@case("Slicer: fill a 5x5x5 CT node", "too small")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    return in_slicer(ct_array(5), lambda app, node: scene.fill_volume_node(app.scene, app.segmentations_logic, node))


@case("Slicer: load a CT file as the fill label", "looks like a CT")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    path = ct_file(folder)
    return in_slicer(ct_array(), lambda app, node: scene.load_fill_label(app.scene, app.segmentations_logic, path,
                                                                         node))


@case("Slicer: load a truncated fill label", "truncated")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    path = truncated(label_file(folder, "fill.nii.gz"))
    return in_slicer(ct_array(), lambda app, node: scene.load_fill_label(app.scene, app.segmentations_logic, path,
                                                                         node))


@case("Slicer: export a segment covering the whole CT", "covers 100% of the volume")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    ct_file(folder), label_file(folder)
    dataset = dataset_with_case(folder)
    return in_slicer(ct_array(), lambda app, node, segmentation: scene.export_segment(
        app.scene, app.segmentations_logic, segmentation, None, node, dataset, "B1"), segment=np.ones((24, 24, 24)))


@case("Slicer: export with a case name that is a path", "Case name '../B1' is invalid")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    ct_file(folder), label_file(folder)
    dataset = dataset_with_case(folder)
    return in_slicer(ct_array(), lambda app, node, segmentation: scene.export_segment(
        app.scene, app.segmentations_logic, segmentation, None, node, dataset, "../B1"), segment=ct_array() > 0)


def fe_from_segment(folder: Path, segment: np.ndarray, calibration: str = "internal") -> Attempt:
    """The panels' FE model of the scene's segment into ``folder/fe`` (fe_runner), waited for."""
    from FemurSegLib import fe_runner
    from FemurSegLib.fe.pipeline import FEOptions

    return in_slicer(ct_array(), lambda app, node, segmentation: fe_runner.start_from_segment(
        app.scene, app.segmentations_logic, segmentation, None, node, folder / "fe", calibration,
        FEOptions(element_size=3.0, formats=("vtu",))).wait_for_completion(TIME_LIMIT_S), segment=segment)


row("Slicer: FE model with rods out of order", "Rods out of order", lambda folder: fe_from_segment(
    folder, ct_array() > 0, str(csv_file(folder, "density_mg_cm3,hu\n0,0\n200,900\n800,400\n", "rods.csv"))))
row("Slicer: FE model into a folder that holds one (no Replace)", "femur.vtu, femur.json already exist", lambda f: then(
    (f / "fe").mkdir(), (f / "fe" / "femur.json").write_text("{}"), (f / "fe" / "femur.vtu").write_text("x"),
    fe_from_segment(f, ct_array() > 0)))
def two_pieces() -> np.ndarray:
    mask = np.zeros((24, 24, 24), bool)
    mask[2:8, 2:8, 2:8] = mask[14:22, 14:22, 14:22] = True
    return mask


row("Slicer: FE model of a segment in two pieces (the child's refusal)", "not one solid piece",
    lambda folder: fe_from_segment(folder, two_pieces()))


def page_fe(check: str, *args: object) -> Attempt:
    """A check the page's FE card (web/fe.py) makes of its trigger's arguments."""
    from FemurSegLib.web import fe

    return library(lambda: getattr(fe, check)(*args))


row("page: FE model of a case name that is a path", "may only use letters",
    lambda folder: page_fe("fe_folder_inside", folder, "../up"))
row("page: FE model with element size 'abc'", "is not a number", lambda folder: page_fe("check_element_size", "abc"))
row("page: FE model with element size 'inf'", "must be a positive number",
    lambda folder: page_fe("check_element_size", "inf"))


# --- the browser's upload handler ----------------------------------------------------------------------------------

def upload(folder: Path, source: Path, kind: str = "ct", name: str | None = None) -> Attempt:
    """What the page's upload triggers: validated_upload into the session's work folder (the case folder here)."""
    from FemurSegLib.web.safety import DEFAULT_MAX_UPLOAD_BYTES, validated_upload

    content = source.read_bytes()
    source.unlink()  # the browser holds the bytes; the server's folder starts without them
    return library(lambda: validated_upload(name or source.name, content, DEFAULT_MAX_UPLOAD_BYTES, folder, kind))


@case("upload a truncated .nii.gz CT", "uploaded CT 'scan.nii.gz' is truncated")
def _(folder: Path) -> Attempt:
    return upload(folder, truncated(ct_file(folder, "scan.nii.gz")))


@case("upload an all-NaN CT", "NaN or infinite voxels")
def _(folder: Path) -> Attempt:
    return upload(folder, nan_ct(folder))


@case("upload a blank CT", "same value")
def _(folder: Path) -> Attempt:
    return upload(folder, write(folder, "blank.nrrd", np.full((24, 24, 24), 7, np.int16)))


@case("upload a 5x5x5 CT", "too small")
def _(folder: Path) -> Attempt:
    return upload(folder, ct_file(folder, size=5))


@case("upload a CT as the fill label", "looks like a CT")
def _(folder: Path) -> Attempt:
    return upload(folder, ct_file(folder), kind="fill")


@case("upload a .png", "not an NRRD, NIfTI or MHA file")
def _(folder: Path) -> Attempt:
    (folder / "slice.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    return upload(folder, folder / "slice.png")


# --- the I/O policy, row by row over every command (FemurSegLib.iopolicy) -----------------------------------------

def fifo(folder: Path, name: str = "fifo.nrrd") -> Path:
    os.mkfifo(folder / name)
    return folder / name


def undecodable(folder: Path, suffix: str = ".nrrd", content: bytes | None = None) -> Path:
    """A path whose name is not valid UTF-8 (bytes 0xff 0xfe), as a Linux file system allows."""
    raw = os.fsencode(folder) + b"/bad-\xff\xfe" + suffix.encode()
    if content is not None:
        with open(raw, "wb") as handle:
            handle.write(content)
    return Path(os.fsdecode(raw))


def raw_voxels(path: Path, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ct_array(size).astype("<i2").tobytes())
    return path


def detached(folder: Path, name: str, data: str, kind: str = "nrrd", size: int = 24) -> Path:
    """A detached NRRD or MetaImage header naming ``data`` as its voxel file (which the row provides)."""
    if kind == "nrrd":
        text = (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {size} {size} {size}\nspacings: 1 1 1\n"
                f"encoding: raw\nendian: little\ndata file: {data}\n\n")
    else:
        text = (f"ObjectType = Image\nNDims = 3\nDimSize = {size} {size} {size}\nElementType = MET_SHORT\n"
                f"ElementSpacing = 1 1 1\nElementByteOrderMSB = False\nElementDataFile = {data}\n")
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def data_outside(folder: Path, kind: str) -> Path:
    raw_voxels(folder / "elsewhere" / "voxels.raw")
    suffix = ".nrrd" if kind == "nrrd" else ".mha"
    return detached(folder / "in", f"ct{suffix}", str(folder / "elsewhere" / "voxels.raw"), kind)


def dangling(folder: Path, name: str = "dangling.nrrd") -> Path:
    (folder / name).symlink_to(folder / "nothing-here.nrrd")
    return folder / name


def loop(folder: Path, name: str = "loop.nrrd") -> Path:
    (folder / f"{name}.other").symlink_to(folder / name)
    (folder / name).symlink_to(folder / f"{name}.other")
    return folder / name


def dicom_folder(folder: Path) -> Path:
    (folder / "DICOM").mkdir()
    (folder / "DICOM" / "IM0001.dcm").write_bytes(b"\0" * 132 + b"DICM")
    return folder / "DICOM"


def fifo_data(folder: Path) -> Path:
    fifo(folder, "voxels.raw")
    return detached(folder, "ct.nrrd", "voxels.raw")


def fe_out(folder: Path) -> Path:
    """An existing output folder for ``fe`` (it creates a missing one before reading its inputs)."""
    (folder / "fe-out").mkdir(exist_ok=True)
    return folder / "fe-out"


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "a FIFO": (fifo, "not a regular file"),
    "a dangling link": (dangling, "is a link to .*which does not exist"),
    "a link loop": (loop, "is a link loop"),
    "a DICOM folder": (dicom_folder, "is a folder, not a file.*DICOM"),
    "a device (/dev/zero)": (lambda folder: Path("/dev/zero"), "not a regular file"),
    "an undecodable name": (lambda folder: undecodable(folder, ".nrrd", ct_file(folder).read_bytes()),
                            "not valid UTF-8"),
    "a 300-byte name": (lambda folder: folder / ("n" * 300 + ".nrrd"), "name of 305 bytes, over the file system's 255"),
    "a missing file": (lambda folder: folder / "missing.nrrd", "does not exist"),
    "a detached NRRD with its data outside its folder": (lambda folder: data_outside(folder, "nrrd"), "outside"),
    "a detached MetaImage with its data outside its folder": (lambda folder: data_outside(folder, "meta"), "outside"),
    "a detached NRRD whose data file is a FIFO": (fifo_data, "data file of .*not a regular file"),
    "a detached NRRD whose data file is missing": (lambda folder: detached(folder, "ct.nrrd", "gone.raw"),
                                                   "does not exist"),
    "an NRRD with a LIST of data files": (lambda folder: detached(folder, "ct.nrrd", "LIST"), "list or pattern"),
    "a MetaImage with a data-file pattern": (lambda folder: detached(folder, "ct.mha", "slice%03d.raw 1 24 1",
                                                                     "meta"), "list or pattern"),
}

READERS: dict[str, Callable[[Path, Path], tuple]] = {
    "fill": lambda folder, path: ("fill", path, folder / "out.nrrd"),
    "segment": lambda folder, path: ("segment", path, folder / "out.nrrd"),
    "compare (reference)": lambda folder, path: ("compare", path, label_file(folder, "other.nrrd")),
    "compare (other)": lambda folder, path: ("compare", label_file(folder, "reference.nrrd"), path),
    "surface": lambda folder, path: ("surface", path, folder / "out.stl"),
    "export (CT)": lambda folder, path: ("export", path, label_file(folder, "l.nrrd"), folder / "Dataset301_New",
                                         "--case", "A"),
    "export (label)": lambda folder, path: ("export", ct_file(folder, "c.nrrd"), path, folder / "Dataset301_New",
                                            "--case", "A"),
    "fe (CT)": lambda folder, path: ("fe", path, label_file(folder, "l.nrrd"), fe_out(folder)),
    "fe (label)": lambda folder, path: ("fe", ct_file(folder, "c.nrrd"), path, fe_out(folder)),
}

for _reader, _argv in READERS.items():
    for _kind, (_make, _message) in BAD_INPUTS.items():
        if _reader.startswith(("compare", "surface", "export (label)")) and _kind == "a DICOM folder":
            _message = "is a folder, not a file"
        row(f"{_reader} of {_kind}", _message, lambda folder, argv=_argv, make=_make: cli(*argv(folder, make(folder))))


def hard_link(folder: Path, source: Path, name: str) -> Path:
    os.link(source, folder / name)
    return folder / name


def sym_link(folder: Path, source: Path, name: str) -> Path:
    (folder / name).symlink_to(source)
    return folder / name


def dotted(folder: Path, source: Path, name: str) -> Path:
    (folder / "sub").mkdir(exist_ok=True)
    return folder / "sub" / ".." / source.name


def existing_fifo(folder: Path, source: Path, name: str) -> Path:
    return fifo(folder, name)


def existing_folder(folder: Path, source: Path, name: str) -> Path:
    (folder / name).mkdir()
    return folder / name


BAD_OUTPUTS: dict[str, tuple[Callable[[Path, Path, str], Path], str]] = {
    "the input through a hard link": (hard_link, "is the input"),
    "the input through a symlink": (sym_link, "is the input"),
    "the input through sub/..": (dotted, "is the input"),
    "an undecodable name": (lambda folder, source, name: undecodable(folder, Path(name).suffix), "not valid UTF-8"),
    "a 300-byte name": (lambda folder, source, name: folder / ("o" * 300 + Path(name).suffix), "over the file system"),
    "an existing FIFO": (existing_fifo, "exists and is not a regular file"),
    "a dangling link": (lambda folder, source, name: dangling(folder, name), "exists and is not a regular file"),
    "a missing folder": (lambda folder, source, name: folder / "missing" / name, "does not exist; create it first"),
    "an existing folder": (existing_folder, "is a folder"),
}

WRITERS: dict[str, tuple[Callable[[Path], Path], Callable[[Path, Path, Path], tuple], str]] = {
    "fill": (ct_file, lambda folder, source, out: ("fill", source, out), "out.nrrd"),
    "segment": (ct_file, lambda folder, source, out: ("segment", source, out), "out.nrrd"),
    "surface": (label_file, lambda folder, source, out: ("surface", source, out), "out.stl"),
    "compare --json": (label_file, lambda folder, source, out: ("compare", source, label_file(folder, "b.nrrd"),
                                                                  "--json", out), "out.json"),
    "phantom (label onto the CT)": (lambda folder: folder / "ct.nrrd",
                                    lambda folder, source, out: ("phantom", source, out), "out.nrrd"),
}

def writer_row(folder: Path, source: Callable[[Path], Path], argv: Callable, make: Callable, name: str) -> Attempt:
    made = source(folder)
    return cli(*argv(folder, made, make(folder, made, name)))


for _writer, (_source, _argv, _name) in WRITERS.items():
    for _kind, (_make, _message) in BAD_OUTPUTS.items():
        if _writer.startswith("phantom") and _kind == "the input through a hard link":
            continue  # the phantom's CT does not exist before it runs: there is nothing to hard-link to
        row(f"{_writer} to {_kind}", _message, functools.partial(writer_row, source=_source, argv=_argv, make=_make,
                                                                 name=_name))


# --- surface: what would give a silent garbage surface --------------------------------------------------------

def half_label(folder: Path) -> Path:
    return write(folder, "half.nrrd", (ct_array() > 0).astype(np.float32) * 0.5)


for _name, _build, _message in [
    ("surface of a CT given as the label", lambda f: ("surface", ct_file(f), f / "out.stl"), "looks like a CT"),
    ("surface --value 0 (the background)", lambda f: ("surface", label_file(f), f / "out.stl", "--value", "0"),
     "not a foreground value"),
    ("surface --value -1", lambda f: ("surface", label_file(f), f / "out.stl", "--value", "-1"),
     "not a foreground value"),
    ("surface --value 256", lambda f: ("surface", label_file(f), f / "out.stl", "--value", "256"),
     "not a foreground value"),
    ("surface --value 7, absent from the label", lambda f: ("surface", label_file(f), f / "out.stl", "--value", "7"),
     "empty for value 7"),
    ("surface --value abc", lambda f: ("surface", label_file(f), f / "out.stl", "--value", "abc"),
     "argument --value: invalid int"),
    ("surface of a label holding 0.5", lambda f: ("surface", half_label(f), f / "out.stl"), "fractional"),
    ("surface of an empty label", lambda f: ("surface", write(f, "empty.nrrd", np.zeros((24,) * 3, np.uint8)),
                                              f / "out.stl"), "label is empty"),
    ("surface --decimate 0.9999999 (was 'watertight, 0 triangles')",
     lambda f: ("surface", label_file(f), f / "out.stl", "--decimate", "0.9999999"), "Decimation 0.9999999"),
    ("surface --decimate 1", lambda f: ("surface", label_file(f), f / "out.stl", "--decimate", "1"), "Decimation 1"),
    ("surface --decimate -0.1", lambda f: ("surface", label_file(f), f / "out.stl", "--decimate", "-0.1"),
     "Decimation -0.1"),
    ("surface --decimate nan", lambda f: ("surface", label_file(f), f / "out.stl", "--decimate", "nan"),
     "Decimation nan"),
    ("surface --smoothing 2", lambda f: ("surface", label_file(f), f / "out.stl", "--smoothing", "2"), "Smoothing 2"),
    ("surface --smoothing nan", lambda f: ("surface", label_file(f), f / "out.stl", "--smoothing", "nan"),
     "Smoothing nan"),
    ("surface to .ply", lambda f: ("surface", label_file(f), f / "out.ply"), r"must end in one of \.stl"),
    ("surface with --coordinates XYZ", lambda f: ("surface", label_file(f), f / "out.stl", "--coordinates", "XYZ"),
     "invalid choice"),
    ("surface of a .vtk label onto itself (was overwritten)",
     lambda f: ("surface", write(f, "label.vtk", (ct_array() > 0).astype(np.uint8)), f / "label.vtk"),
     "is the input"),
    ("surface of a 2D label", lambda f: ("surface", write(f, "flat.nrrd", np.ones((1, 30, 40), np.uint8)),
                                          f / "out.stl"), "single slice"),
]:
    row(_name, _message, lambda folder, build=_build: cli(*build(folder)))


# --- batch: the cohort's inputs are never written, names fit ----------------------------------------------------

def cohort(folder: Path, name: str = "cts", count: int = 1) -> Path:
    (folder / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        ct_file(folder / name, f"case{index}.nrrd")
    return folder / name


def csv_file(folder: Path, text: str, name: str = "cases.csv") -> Path:
    (folder / name).write_text(text)
    return folder / name


def then(*steps: object) -> object:
    """The last of ``steps``: the ones before it are the files a row makes first, in order."""
    return steps[-1]


def batch_row(build: Callable[[Path], tuple]) -> Callable[[Path], Attempt]:
    return lambda folder: cli("batch", *build(folder), "--device", "cpu")


for _name, _build, _message in [
    ("batch b1/labels b1 (overwrote the CTs with their labels)",
     lambda f: (cohort(f, "b1/labels"), f / "b1"), "inside the input folder"),
    ("batch cts b2 --truth-dir b2/labels (overwrote the truth, Dice 1.0)",
     lambda f: (cohort(f), f / "b2", "--truth-dir", cohort(f, "b2/labels")), "inside the input folder"),
    ("batch cts cts", lambda f: (cohort(f), f / "cts"), "inside the input folder"),
    ("batch cts cts/out", lambda f: (cohort(f), f / "cts" / "out"), "inside the input folder"),
    ("batch cts out --truth-dir out", lambda f: (cohort(f), f / "out", "--truth-dir", cohort(f, "out")),
     "inside the input folder"),
    ("batch cts out --truth-dir out/labels/..", lambda f: (cohort(f), f / "out", "--truth-dir",
                                                           cohort(f, "out/labels") / ".."), "inside the input folder"),
    ("batch through a symlink to the CT folder", lambda f: (cohort(f), sym_link(f, cohort(f), "view")),
     "inside the input folder"),
    ("batch CSV listing its own output label as a CT",
     lambda f: then(cohort(f, "out/labels"), ct_file(f / "out" / "labels", "x.nrrd"),
                    (csv_file(f, "ct\nout/labels/x.nrrd\n"), f / "out")), "is the input"),
    ("batch CSV listing a CT hard-linked to its output label",
     lambda f: then(cohort(f), (f / "out" / "labels").mkdir(parents=True),
                    hard_link(f / "out" / "labels", f / "cts" / "case0.nrrd", "x.nrrd"),
                    (csv_file(f, "case,ct\nx,cts/case0.nrrd\n"), f / "out")), "is the input"),
    ("batch of a folder with an undecodable file name",
     lambda f: then(undecodable(cohort(f), ".nrrd", b"x"), (f / "cts", f / "out")), "not valid UTF-8"),
    ("batch of a 251-byte CT name (temporary names passed 255 bytes)",
     lambda f: then(write(cohort(f), "c" * 251 + ".nii", ct_array()), (f / "cts", f / "out")),
     "251 bytes: its files would pass"),
    ("batch CSV with a 300-byte case name",
     lambda f: then(cohort(f), (csv_file(f, f"case,ct\n{'k' * 300},cts/case0.nrrd\n"), f / "out")), "300 bytes"),
    ("batch CSV with a case name that is a path",
     lambda f: then(cohort(f), (csv_file(f, "case,ct\n../up,cts/case0.nrrd\n"), f / "out")), "no path separators"),
    ("batch CSV with a hidden case name",
     lambda f: then(cohort(f), (csv_file(f, "case,ct\n.hidden,cts/case0.nrrd\n"), f / "out")), "no leading dot"),
    ("batch CSV with an empty ct", lambda f: (csv_file(f, "case,ct\nA,\n"), f / "out"), "has no ct path"),
    ("batch CSV without rows", lambda f: (csv_file(f, "ct\n"), f / "out"), "needs a header row"),
    ("batch CSV that is not UTF-8",
     lambda f: then((f / "cases.csv").write_bytes(b"ct\n\xff\xfe.nrrd\n"), (f / "cases.csv", f / "out")),
     "Could not read the CSV"),
    ("batch CSV that is a FIFO", lambda f: (fifo(f, "cases.csv"), f / "out"), "neither a folder"),
    ("batch --truth-dir that is a file", lambda f: (cohort(f), f / "out", "--truth-dir", ct_file(f)),
     "Truth folder .* is not a folder"),
    ("batch --truth-dir that is missing", lambda f: (cohort(f), f / "out", "--truth-dir", f / "none"),
     "does not exist or is not a folder"),
    ("batch --shard 1/1", lambda f: (cohort(f), f / "out", "--shard", "1/1"), "must be I/N"),
    ("batch --shard -1/2", lambda f: (cohort(f), f / "out", "--shard=-1/2"), "must be I/N"),
    ("batch --shard a/b", lambda f: (cohort(f), f / "out", "--shard", "a/b"), "must be I/N"),
    ("batch --shard 0/0", lambda f: (cohort(f), f / "out", "--shard", "0/0"), "must be I/N"),
    ("batch --surface ply", lambda f: (cohort(f), f / "out", "--surface", "ply"), "invalid choice"),
    ("batch --decimate 1", lambda f: (cohort(f), f / "out", "--decimate", "1"), "Decimation 1"),
    ("batch --smoothing -1", lambda f: (cohort(f), f / "out", "--smoothing", "-1"), "Smoothing -1"),
    ("batch into a file", lambda f: (cohort(f), ct_file(f, "out.nrrd")), "is a file"),
    ("batch into an undecodable folder name", lambda f: (cohort(f), undecodable(f, "")), "not valid UTF-8"),
    ("batch --model that does not exist", lambda f: (cohort(f), f / "out", "--model", "NoSuchModel"),
     "No model named 'NoSuchModel'"),
]:
    row(_name, _message, batch_row(_build))

for _name, _build, _message in [  # batch --fe: its options are refused before the cohort starts
    ("batch --fe --fe-element-size 0", lambda f: (cohort(f), f / "out", "--fe", "--fe-element-size", "0"),
     "Element size 0.0 mm must be a positive"),
    ("batch --fe --fe-element-size nan", lambda f: (cohort(f), f / "out", "--fe", "--fe-element-size", "nan"),
     "Element size nan mm"),
    ("batch --fe --fe-law hooke", lambda f: (cohort(f), f / "out", "--fe", "--fe-law", "hooke"), "invalid choice"),
    ("batch --fe --fe-formats stl", lambda f: (cohort(f), f / "out", "--fe", "--fe-formats", "stl"), "stl unknown"),
    ("batch --fe --fe-formats ,", lambda f: (cohort(f), f / "out", "--fe", "--fe-formats", ","), "none"),
    ("batch --fe --fe-bins 0", lambda f: (cohort(f), f / "out", "--fe", "--fe-bins", "0"), "Material bins 0"),
    ("batch --fe --fe-calibration that is missing",
     lambda f: (cohort(f), f / "out", "--fe", "--fe-calibration", f / "rods.csv"), "does not exist"),
    ("batch --fe --fe-calibration a FIFO",
     lambda f: (cohort(f), f / "out", "--fe", "--fe-calibration", fifo(f, "rods.csv")), "not a file"),
    ("batch --fe --fe-calibration with rods out of order", lambda f: (cohort(f), f / "out", "--fe", "--fe-calibration",
     csv_file(f, "density_mg_cm3,hu\n0,0\n200,900\n800,400\n", "rods.csv")), "Rods out of order"),
]:
    row(_name, _message, batch_row(_build))


# --- models: a folder or zip from a stranger is data, checked as a schema (FemurSegLib.modelschema) ---------------

def plans_of(root: Path, configuration: str = "3d_femurseg") -> Path:
    return next(p for p in root.glob("Dataset*/*/plans.json") if p.parent.name.endswith(configuration))


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    replaced = change(data)
    path.write_text(json.dumps(data if replaced is None else replaced))


def edit_configuration(root: Path, change: Callable[[dict], object]) -> None:
    edit_json(plans_of(root), lambda plans: change(plans["configurations"]["3d_femurseg"]))


def _link_to_fifo(root: Path) -> None:
    os.mkfifo(root.parent / "outside-fifo")
    (root / "notes.txt").symlink_to(root.parent / "outside-fifo")


def _link_outside(root: Path) -> None:
    (root.parent / "secret.txt").write_text("outside")
    (root / "secret.txt").symlink_to(root.parent / "secret.txt")


def _link_loop(root: Path) -> None:
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")


SCHEMA: dict[str, tuple[Callable[[Path], object], str]] = {
    "model_card.json a JSON list": (lambda r: (r / "model_card.json").write_text("[1, 2]"), "holds a JSON list"),
    "model_card.json not JSON": (lambda r: (r / "model_card.json").write_text("{"), "cannot be read"),
    "a model card configuration '../x'": (lambda r: edit_json(r / "model_card.json",
                                                              lambda c: c.update(configuration="../x")),
                                          "not a plain name"),
    "dataset.json a JSON list": (lambda r: next(r.glob("Dataset*/*/dataset.json")).write_text("[]"),
                                 "holds a JSON list"),
    "dataset.json labels with a text value": (lambda r: [edit_json(p, lambda d: d.update(
        labels={"background": 0, "femur": "1"})) for p in r.glob("Dataset*/*/dataset.json")], "labels"),
    "dataset.json file_ending .exe": (lambda r: [edit_json(p, lambda d: d.update(file_ending=".exe"))
                                                  for p in r.glob("Dataset*/*/dataset.json")], "file_ending"),
    "plans configurations a JSON list": (lambda r: edit_json(plans_of(r), lambda p: p.update(configurations=[])),
                                         "no 'configurations' object"),
    "a plans patch size of 10000^3 (tried 4 TB)": (lambda r: edit_configuration(
        r, lambda c: c.update(patch_size=[10000] * 3)), "patch_size"),
    "a plans spacing of 0 mm": (lambda r: edit_configuration(r, lambda c: c.update(spacing=[0, 0, 0])), "spacing"),
    "a plans spacing of text": (lambda r: edit_configuration(r, lambda c: c.update(spacing="1")), "spacing"),
    "a plans dataset_name '../../../../../elsewhere/Dataset999_E'": (lambda r: [edit_json(
        p, lambda d: d.update(dataset_name="../../../../../elsewhere/Dataset999_E"))
        for p in r.glob("Dataset*/*/plans.json")], "dataset_name .* not a plain name"),
    "a plans_name with a slash": (lambda r: edit_json(plans_of(r), lambda p: p.update(plans_name="a/b")),
                                  "plans_name .* not a plain name"),
    "strides of 100": (lambda r: edit_configuration(r, lambda c: c["architecture"]["arch_kwargs"].update(
        strides=[[100, 100, 100]] * 5)), "strides"),
    "1000 network stages": (lambda r: edit_configuration(r, lambda c: c["architecture"]["arch_kwargs"].update(
        n_stages=1000)), "n_stages"),
    "an architecture that is a list": (lambda r: edit_configuration(r, lambda c: c.update(architecture=[])),
                                       "architecture"),
    "a configuration inheriting from itself": (lambda r: edit_configuration(
        r, lambda c: c.update(inherits_from="3d_femurseg")), "missing or looping"),
    "a dangling link inside": (lambda r: (r / "gone.txt").symlink_to(r / "nothing"), "holds a link"),
    "a link loop inside": (_link_loop, "holds a link"),
    "a link to a FIFO inside": (_link_to_fifo, "holds a link"),
    "a link to a file outside": (_link_outside, "holds a link"),
    "a FIFO inside": (lambda r: os.mkfifo(r / "pipe"), "not a regular file"),
}

MODEL_USERS: dict[str, Callable[[Path, Path], tuple]] = {
    "models install": lambda folder, root: ("models", "install", root),
    "segment --model": lambda folder, root: ("segment", ct_file(folder), folder / "out.nrrd", "--model", root),
    "finetune --from": lambda folder, root: ("finetune", then((folder / "Dataset301_Data").mkdir(),
                                                              folder / "Dataset301_Data"), "--from", root),
}

for _user, _argv in MODEL_USERS.items():
    for _kind, (_change, _message) in SCHEMA.items():
        row(f"{_user} of a model folder with {_kind}", _message,
            lambda folder, argv=_argv, change=_change: cli(*argv(folder, bundled_copy(folder, change))))


def model_zip(folder: Path, extra: Callable[[zipfile.ZipFile], object] = lambda archive: None,
              method: int = zipfile.ZIP_DEFLATED, name: str = "Packed.zip") -> Path:
    """The bundled model as nnUNetv2_export_model_to_zip packs it, plus what ``extra`` adds."""
    root = resolve_model(None).root
    with zipfile.ZipFile(folder / name, "w", method) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root).as_posix())
        extra(archive)
    return folder / name


def patch_central(archive: Path, member: str, offset: int, value: bytes) -> Path:
    """Overwrite bytes of ``member``'s central-directory record (method at 10, sizes at 20 and 24)."""
    data = bytearray(archive.read_bytes())
    at = data.index(b"PK\x01\x02")
    while True:
        length = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + length].decode() == member:
            break
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + offset:at + offset + len(value)] = value
    archive.write_bytes(bytes(data))
    return archive


def checkpoint_member(archive: Path) -> str:
    with zipfile.ZipFile(archive) as handle:
        return next(n for n in handle.namelist() if n.endswith("3d_femurseg/fold_all/checkpoint_final.pth"))


def flipped_member(folder: Path) -> Path:
    archive = model_zip(folder, method=zipfile.ZIP_STORED)
    with zipfile.ZipFile(archive) as handle:
        info = handle.getinfo(checkpoint_member(archive))
    data = bytearray(archive.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    return archive


def entry(name: str, mode: int | None = None, content: bytes = b"x"):
    def add(archive: zipfile.ZipFile) -> None:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        if mode is not None:
            info.external_attr = mode << 16
        archive.writestr(info, content)
    return add


for _name, _build, _message in [
    ("a zip member with a CRC error", flipped_member, "damaged.*CRC"),
    ("a zip member packed with method 99", lambda f: patch_central(model_zip(f), "model_card.json", 10,
                                                                   (99).to_bytes(2, "little")), "method 99"),
    ("a zip member that understates its size", lambda f: patch_central(
        (a := model_zip(f, method=zipfile.ZIP_STORED)), checkpoint_member(a), 24, (1000).to_bytes(4, "little")),
     "declares|damaged"),
    ("a zip member that overstates its size", lambda f: patch_central(
        (a := model_zip(f, method=zipfile.ZIP_STORED)), checkpoint_member(a), 24, (10**8).to_bytes(4, "little")),
     "declares|damaged"),
    ("a zip bomb (unpacked 3.5 GB under the 4 GB cap)", lambda f: model_zip(f, entry(
        "Dataset502_FemurRegion/zeros.bin", content=bytes(64 << 20))), "times larger than it is packed"),
    ("a zip with a symlink member", lambda f: model_zip(f, entry("link", 0o120777, b"/etc/passwd")), "unsafe entry"),
    ("a zip with a device member", lambda f: model_zip(f, entry("dev", 0o020666)), "unsafe entry"),
    ("a zip with a '..' member", lambda f: model_zip(f, entry("../escaped.txt")), "unsafe entry"),
    ("a zip with an absolute member", lambda f: model_zip(f, entry("/tmp/escaped.txt")), "unsafe entry"),
    ("a zip with an encrypted member", lambda f: patch_central(model_zip(f), "model_card.json", 8,
                                                               (1).to_bytes(2, "little")), "encrypted"),
    ("a zip of 20 001 entries", lambda f: model_zip(f, lambda a: [a.writestr(f"n/{i}", b"")
                                                                   for i in range(20_001)]), "200\\d\\d entries"),
    ("a text file named .zip", lambda f: then((f / "model.zip").write_text("not a zip"), f / "model.zip"),
     "not a readable zip"),
    ("a FIFO named .zip", lambda f: fifo(f, "model.zip"), "not a regular file"),
    ("a zip whose plans.json is a list", lambda f: model_zip(f, lambda a: a.writestr(
        "Dataset502_FemurRegion/nnUNetTrainer__nnUNetPlans__3d_femurseg/plans.json", "[]"), name="Dup.zip"),
     "twice|JSON list"),
]:
    row(f"models install of {_name}", _message, lambda folder, build=_build: cli("models", "install", build(folder)))


def installed_link(folder: Path) -> str:
    (folder / "user-models").mkdir()
    shutil.copytree(resolve_model(None).root, folder / "real-model")
    (folder / "user-models" / "Linked").symlink_to(folder / "real-model")
    return "Linked"


def broken_installed(folder: Path, name: str = "Broken") -> str:
    bundled_copy(folder, lambda root: (root / "model_card.json").write_text("[]"))
    (folder / "user-models").mkdir(exist_ok=True)
    os.rename(folder / "CopiedModel", folder / "user-models" / name)
    return name


for _name, _argv, _message, _expect in [
    ("models remove of a symlinked model", lambda f: ("models", "remove", installed_link(f)), "is a link to", "error"),
    ("models remove '../x'", lambda f: ("models", "remove", "../x"), "No installed model", "error"),
    ("models remove of the bundled model", lambda f: ("models", "remove", resolve_model(None).name),
     "bundled with FemurSeg", "error"),
    ("models remove of a missing model", lambda f: ("models", "remove", "Nope"), "No installed model named 'Nope'",
     "error"),
    ("models install --name '../x'", lambda f: ("models", "install", model_zip(f), "--name", "../x"),
     "may only use", "error"),
    ("models install under the bundled model's name",
     lambda f: ("models", "install", model_zip(f), "--name", resolve_model(None).name), "already exists", "error"),
    ("models install of a missing path", lambda f: ("models", "install", f / "nothing.zip"), "does not exist",
     "error"),
    ("models install of a symlink to a model folder", lambda f: ("models", "install", then(
        shutil.copytree(resolve_model(None).root, f / "real"), sym_link(f, f / "real", "alias"))), "is a link",
     "error"),
    ("models install of a folder whose name is undecodable", lambda f: ("models", "install", shutil.copytree(
        resolve_model(None).root, undecodable(f, ""))), "not valid UTF-8", "error"),
    ("models list with one broken installed model (crashed every command)",
     lambda f: then(broken_installed(f), ("models", "list")), "skipped the installed model 'Broken'", "warning"),
    ("models list with an installed folder whose name is undecodable", lambda f: then(
        (f / "user-models").mkdir(), shutil.copytree(resolve_model(None).root, undecodable(f / "user-models", "")),
        ("models", "list")), "skipped the installed model 'bad-\\\\xff\\\\xfe'.*not valid UTF-8", "warning"),
    ("segment --model naming a broken installed model", lambda f: (
        "segment", ct_file(f), f / "out.nrrd", "--model", broken_installed(f)), "installed model 'Broken'", "error"),
]:
    row(_name, _message, lambda folder, argv=_argv: cli(*argv(folder)), _expect)


# --- resources bounded before work (FemurSegLib.budget) -----------------------------------------------------------

def spaced_ct(folder: Path, spacing: float, size: int = 24, name: str = "spaced.nrrd") -> Path:
    return write(folder, name, ct_array(size), (spacing,) * 3, compress=False)


row("segment (Slicer's in-process Segmenter) of a CT of 50 mm voxels (ran 137 s, 6 GB)", "resampled to the network",
    lambda folder: then(path := spaced_ct(folder, 50.0, 64), library(lambda: bundled_segmenter().run(
        read_ct_image(path)))))
row("segment of a CT of 50 mm voxels", "resampled to the network",
    lambda folder: cli("segment", spaced_ct(folder, 50.0, 64), folder / "out.nrrd", "--device", "cpu"))
row("fill of a CT of 0.05 mm voxels (ran past 150 s at 5.7 GB)", "many minutes of work",
    lambda folder: cli("fill", spaced_ct(folder, 0.05, 144), folder / "out.nrrd"))
for _value in ("1e-9", "0.05", "nan", "-1", "inf"):
    row(f"segment --tile-step {_value} (1e-9 hung)", "Tile step .* is out of range: .* \\[0.1, 1\\]",
        lambda folder, value=_value: cli("segment", ct_file(folder), folder / "out.nrrd", "--tile-step", value))
for _option, _value, _message in [
    ("--threshold", "-2000", "threshold -2000 HU is outside"), ("--threshold", "5000", "threshold 5000 HU"),
    ("--threshold", "inf", "threshold inf HU"), ("--closing-mm", "-1", "closing radius -1 mm"),
    ("--closing-mm", "nan", "closing radius nan"), ("--max-ray-mm", "-5", "maximum ray length"),
    ("--max-ray-mm", "nan", "maximum ray length"), ("--max-open", "-1", "open directions -1"),
    ("--max-open", "1.5", "argument --max-open: invalid int"), ("--threshold", "abc", "invalid float"),
]:
    row(f"fill {_option} {_value}", _message,
        lambda folder, option=_option, value=_value: cli("fill", ct_file(folder), folder / "out.nrrd", option, value))


def read_ct_image(path: Path):
    from FemurSegLib.imageio import read_ct
    return read_ct(path)


# --- the command line's own usage errors, and the other commands ------------------------------------------------

for _name, _argv, _message in [
    ("no command", (), "required: COMMAND"),
    ("an unknown command", ("frobnicate",), "invalid choice: 'frobnicate'"),
    ("segment without arguments", ("segment",), "the following arguments are required"),
    ("export without --case", ("export", "a.nrrd", "b.nrrd", "Dataset101_X"), "--case"),
    ("models frobnicate", ("models", "frobnicate"), "invalid choice"),
    ("models install without a target", ("models", "install"), "Give the model zip or folder"),
    ("models remove without a name", ("models", "remove"), "Give the name of the model"),
    ("web --port abc", ("web", "--port", "abc"), "invalid _port value"),
    ("web --port 0", ("web", "--port", "0"), "port 0 is outside"),
    ("demo --device tpu", ("demo", "--device", "tpu"), "invalid choice"),
    ("phantom --family martian", ("phantom", "a.nrrd", "b.nrrd", "--family", "martian"), "invalid choice"),
    ("segment --side middle", ("segment", "a.nrrd", "b.nrrd", "--side", "middle"), "invalid choice"),
    ("finetune --epochs -3", ("finetune", "Dataset301_X", "--epochs", "-3"), "-3 is negative"),
    ("train-bundled --locator-epochs -3 (was accepted)", ("train-bundled", "w", "--locator-epochs", "-3"),
     "argument --locator-epochs: -3 is not a positive"),
    ("train-bundled --cases 0", ("train-bundled", "w", "--cases", "0"), "argument --cases: 0 is not a positive"),
    ("train-bundled --fine-epochs 10 -1", ("train-bundled", "w", "--fine-epochs", "10", "-1"),
     "argument --fine-epochs: -1 is not a positive"),
    ("train-bundled --threads 0", ("train-bundled", "w", "--threads", "0"), "argument --threads: 0 is not a positive"),
    ("train-bundled --stage bundle on an empty folder (left a half-built model)", ("train-bundled", "w", "--stage",
                                                                                  "bundle"), "which --stage fine"),
    ("train-bundled --stage plan on an empty folder", ("train-bundled", "w", "--stage", "plan"), "which --stage data"),
    ("train-bundled --stage locator on an empty folder", ("train-bundled", "w", "--stage", "locator"),
     "which --stage plan"),
    ("train-bundled --stage fine on an empty folder", ("train-bundled", "w", "--stage", "fine"), "which --stage plan"),
    ("train-bundled --stage everything", ("train-bundled", "w", "--stage", "everything"), "invalid choice"),
    ("finetune --epochs 2 --minutes 3", ("finetune", "Dataset301_X", "--epochs", "2", "--minutes", "3"),
     "not allowed with argument"),
]:
    row(f"femurseg {_name}", _message, lambda folder, argv=_argv: cli(*argv))

for _name, _argv, _message in [
    ("finetune of a missing dataset", lambda f: ("finetune", f / "Dataset301_None"), "does not exist"),
    ("finetune of a folder not named DatasetNNN_Name", lambda f: ("finetune", cohort(f)), "not an nnU-Net dataset"),
    ("finetune --minutes -1", lambda f: ("finetune", f, "--minutes", "-1"), "--minutes -1 is outside"),
    ("finetune --minutes nan", lambda f: ("finetune", f, "--minutes", "nan"), "--minutes nan is outside"),
    ("finetune --minutes 1e9", lambda f: ("finetune", f, "--minutes", "1e9"), "is outside"),
    ("finetune --epochs 0", lambda f: ("finetune", f, "--epochs", "0"), "at least 1 epoch"),
    ("finetune --iterations 0", lambda f: ("finetune", f, "--iterations", "0"), "at least 1 iteration"),
    ("finetune --from a model that does not exist",
     lambda f: ("finetune", then((f / "Dataset301_D").mkdir(), f / "Dataset301_D"), "--from", "NoSuchModel"),
     "No model named"),
    ("demo --out an undecodable folder name", lambda f: ("demo", "--out", undecodable(f, "")), "not valid UTF-8"),
    ("phantom to an undecodable CT name", lambda f: ("phantom", undecodable(f), f / "label.nrrd"), "not valid UTF-8"),
    ("phantom to a .png", lambda f: ("phantom", f / "ct.png", f / "label.nrrd"), r"must end in \.nrrd"),
    ("compare --json to a .txt", lambda f: ("compare", label_file(f), label_file(f, "b.nrrd"), "--json", f / "m.txt"),
     r"must end in \.json"),
    ("compare two labels on other grids", lambda f: (
        "compare", label_file(f), write(f, "b.nrrd", (ct_array(30) > 0).astype(np.uint8))), "not on the same voxel"),
    ("export a CT with collinear direction vectors (was 'truncated or damaged')",
     lambda f: ("export", collinear(f), label_file(f), f / "Dataset301_X", "--case", "A"), "degenerate direction"),
    ("fill a CT with a zero direction vector", lambda f: ("fill", collinear(f, zero=True), f / "out.nrrd"),
     "degenerate direction"),
    ("export with a case name of 300 characters (left a staging folder)", lambda f: (
        "export", ct_file(f), label_file(f), f / "Dataset301_X", "--case", "c" * 300), "300 characters; use at most"),
]:
    row(_name, _message, lambda folder, argv=_argv: cli(*argv(folder)))


row("fe --calibration a FIFO", "does not exist or is not a file", lambda folder: cli(
    "fe", ct_file(folder), label_file(folder), fe_out(folder), "--calibration", fifo(folder, "rods.csv")))
row("fe into the folder of its label, named femur.vtu", "is the input", lambda folder: cli(
    "fe", ct_file(folder), then((folder / "femur.vtu").write_bytes(b"label"), folder / "femur.vtu"), folder))
row("fe --element-size 0", "element|size", lambda folder: cli(
    "fe", ct_file(folder), label_file(folder), fe_out(folder), "--element-size", "0"))
row("fe --formats stl", "format|stl", lambda folder: cli(
    "fe", ct_file(folder), label_file(folder), fe_out(folder), "--formats", "stl"))


for _name, _out in [("the bundled sample data", REPO / "Resources" / "SampleData" / "out"),
                    ("the bundled models", BUNDLED_MODELS_DIR)]:
    row(f"demo --out into {_name}", "inside the input folder", lambda folder, out=_out: Attempt(
        cli("demo", "--out", out).run, also_unchanged=(REPO / "Resources" / "SampleData", BUNDLED_MODELS_DIR)))


def collinear(folder: Path, zero: bool = False) -> Path:
    """An NRRD whose space directions are parallel (or one is zero): ITK's reader takes it, the voxels have no place."""
    raw_voxels(folder / "v.raw")
    third = "(0,0,0)" if zero else "(2,0,0)"
    text = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 24 24 24\n"
            f"space directions: (1,0,0) (0,1,0) {third}\nencoding: raw\nendian: little\ndata file: v.raw\n\n")
    (folder / "collinear.nrrd").write_text(text)
    return folder / "collinear.nrrd"


# --- the warm worker's protocol: one real worker process answers every worker row ---------------------------------

@functools.cache
def shared_worker() -> subprocess.Popen:
    """``python -m FemurSegLib worker`` with the bundled model, as Slicer and the browser start it; it must answer
    every bad request with an error event and keep serving."""
    process = subprocess.Popen([sys.executable, "-m", "FemurSegLib", "worker", "--device", "cpu"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    atexit.register(process.kill)
    return process


def worker_request(line: str) -> Attempt:
    """Send one request line; the outcome is its error event (2) or its done event (0), and the worker lives on."""
    def run() -> Outcome:
        process = shared_worker()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()
        for text in process.stdout:
            event = json.loads(text)
            if "error" in event or "done" in event:
                assert process.poll() is None, "the worker died"
                return Outcome(2 if "error" in event else 0, event.get("error", ""), False)
        raise AssertionError("the worker ended")
    return Attempt(run)


def request(**fields: object) -> str:
    return json.dumps({"id": 1, **fields}, default=str)


for _name, _build, _message in [
    ('"ct": 123 (killed the worker)', lambda f: request(ct=123, out=str(f / "out.nrrd")), "'ct' must be a file path"),
    ('"out": null', lambda f: request(ct=str(ct_file(f)), out=None), "'out' must be a file path"),
    ('"out" equal to "ct" (replaced the CT)', lambda f: request(ct=str(ct_file(f)), out=str(f / "ct.nrrd")),
     "is the input"),
    ('"out" a hard link to "ct"', lambda f: request(ct=str(ct_file(f)), out=str(hard_link(f, f / "ct.nrrd", "h.nrrd"))),
     "is the input"),
    ('"out" a .png', lambda f: request(ct=str(ct_file(f)), out=str(f / "out.png")), r"must end in \.nrrd"),
    ('"out" a folder', lambda f: request(ct=str(ct_file(f)), out=str(existing_folder(f, f, "o.nrrd"))), "is a folder"),
    ('"ct" a FIFO', lambda f: request(ct=str(fifo(f)), out=str(f / "out.nrrd")), "not a regular file"),
    ('"ct" a detached header reading outside', lambda f: request(ct=str(data_outside(f, "nrrd")),
                                                                 out=str(f / "out.nrrd")), "outside"),
    ('"ct" missing', lambda f: request(ct=str(f / "none.nrrd"), out=str(f / "out.nrrd")), "does not exist"),
    ('"id" a list', lambda f: json.dumps({"id": [1], "ct": "a", "out": "b"}), "'id' must be a number or text"),
    ('"id" true', lambda f: json.dumps({"id": True, "ct": "a", "out": "b"}), "'id' must be a number or text"),
    ("not JSON", lambda f: "{ct: a}", "not a JSON object"),
    ("a JSON list", lambda f: "[1, 2]", "not a JSON object"),
    ("no fields", lambda f: "{}", "'id' must be"),
]:
    row(f"worker request with {_name}", _message, lambda folder, build=_build: worker_request(build(folder)))


# --- the browser's triggers: an API for strangers (FemurSegLib.web.safety, what workflow.py's triggers call) -------

def web(action: Callable[[], object]) -> Attempt:
    return library(action)


def safety():
    return pytest.importorskip("FemurSegLib.web.safety")


def busy_port() -> int:
    listener = socket.create_server(("127.0.0.1", 0))
    BUSY.append(listener)
    return listener.getsockname()[1]


BUSY: list[socket.socket] = []

for _text in ("abc", "-5", "nan", "inf", "0", "", "[1]"):
    row(f"web fine-tune budget {_text!r}", "Time budget",
        lambda folder, text=_text: web(lambda: safety().check_minutes(text)))
for _value in ("validation", "", None, "TEST", ["test"]):
    row(f"web export split {_value!r}", "must be train or test",
        lambda folder, value=_value: web(lambda: safety().check_split(value)))
for _value in ("/etc", "../../x", 123, "NoSuchModel", ["FemurReal3dSmall-v7"]):
    row(f"web model choice {_value!r}", "is not in the model list",
        lambda folder, value=_value: web(lambda: safety().model_by_name(value)))
row("web model choice: the bundled model's server path (the fine-tune trigger took any path)",
    "is not in the model list", lambda folder: web(lambda: safety().model_by_name(str(resolve_model(None).root))))
for _value in ("../Dataset101_X", "/tmp/Dataset101_X", "Dataset1_X", "Dataset101_X/../../y", ""):
    row(f"web dataset folder {_value!r}", "not a plain nnU-Net dataset name",
        lambda folder, value=_value: web(lambda: safety().dataset_dir_inside(folder, value)))
for _value in ("../B", "", "a b", "B/1"):
    row(f"web case name {_value!r}", "may only use letters",
        lambda folder, value=_value: web(lambda: safety().check_case_name(value)))
row("web surface format ply", "must be one of", lambda folder: web(lambda: safety().surface_path_inside(
    folder, "A", "ply")))
row("web surface case '../x'", "may only use letters", lambda folder: web(lambda: safety().surface_path_inside(
    folder, "../x", "stl")))


def allowed_root(folder: Path) -> Path:
    (folder / "root").mkdir(exist_ok=True)
    return folder / "root"


for _name, _build, _message in [
    ("a path outside the allowed folders", lambda f: (str(ct_file(f)), "outside the folders"), "outside the folders"),
    ("a missing path", lambda f: (str(allowed_root(f) / "none.nrrd"), ""), "does not exist"),
    ("a symlink in the root to a file outside", lambda f: (
        str(sym_link(allowed_root(f), ct_file(f), "link.nrrd")), ""), "outside the folders"),
    ("an empty path", lambda f: ("", ""), "Type the path"),
    ("a detached NRRD in the root whose data file is a server file outside it (read a 2.6 MB file)",
     lambda f: (str(detached(allowed_root(f), "ct.nrrd", str(raw_voxels(f / "server" / "secret.raw")))), ""),
     "outside"),
    ("a detached NRRD in the root whose data file is a FIFO", lambda f: (str(then(
        fifo(allowed_root(f), "v.raw"), detached(allowed_root(f), "ct.nrrd", "v.raw"))), ""), "not a regular file"),
    ("a detached MetaImage in the root reading '../'", lambda f: (str(then(raw_voxels(f / "up.raw"), detached(
        allowed_root(f), "ct.mha", "../up.raw", "meta"))), ""), "outside"),
]:
    row(f"web open by path: {_name}", _message, lambda folder, build=_build: then(
        root := allowed_root(folder), text := build(folder)[0],
        web(lambda: safety().read_inside(text, [root], "CT", "ct"))))


def upload_bytes(folder: Path, name: str, content: bytes, kind: str = "ct") -> Attempt:
    from FemurSegLib.web.safety import DEFAULT_MAX_UPLOAD_BYTES, validated_upload

    return library(lambda: validated_upload(name, content, DEFAULT_MAX_UPLOAD_BYTES, folder, kind))


for _name, _build, _message in [
    ("a 170-byte .mha whose ElementDataFile names a server file (read a 2.6 MB file)", lambda f: upload_bytes(
        f, "scan.mha", detached(f, "h.mha", str(raw_voxels(f / "srv" / "secret.raw")), "meta").read_bytes()),
     "takes its voxels from another file"),
    ("a detached NRRD header naming a server file", lambda f: upload_bytes(
        f, "scan.nrrd", detached(f, "h.nrrd", str(raw_voxels(f / "srv" / "s.raw"))).read_bytes()),
     "takes its voxels from another file"),
    ("a MetaImage with a LIST of data files", lambda f: upload_bytes(
        f, "scan.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
                       b"ElementDataFile = LIST\n/etc/passwd\n"), "list or pattern"),
    ("a fill label that is a detached header", lambda f: upload_bytes(
        f, "fill.nrrd", detached(f, "h.nrrd", "h.raw").read_bytes(), "fill"), "does not exist"),
    ("an .nhdr", lambda f: upload_bytes(f, "scan.nhdr", b"NRRD0004\n"), "not an NRRD, NIfTI or MHA"),
    ("an .mhd", lambda f: upload_bytes(f, "scan.mhd", b"NDims = 3\n"), "not an NRRD, NIfTI or MHA"),
    ("a name that is a path", lambda f: upload_bytes(f, "../../etc/scan.png", b"x"), "not an NRRD"),
]:
    row(f"web upload of {_name}", _message, lambda folder, build=_build: build(folder))

row("web upload of kind 'pelvis'", "must be ct or fill", lambda folder: upload_bytes(
    folder, "scan.nrrd", ct_file(folder).read_bytes(), "pelvis"))
row("export into a dataset whose dataset.json is a FIFO", "not a regular file", lambda folder: then(
    (folder / "Dataset301_F").mkdir(), fifo(folder / "Dataset301_F", "dataset.json"),
    cli("export", ct_file(folder), label_file(folder), folder / "Dataset301_F", "--case", "A")))
row("finetune of a dataset whose dataset.json is a FIFO", "not a regular file", lambda folder: then(
    (folder / "Dataset301_F").mkdir(), fifo(folder / "Dataset301_F", "dataset.json"),
    cli("finetune", folder / "Dataset301_F", "--epochs", "1")))
row("web upload over the size limit", "uploads are limited", lambda folder: web(
    lambda: safety().check_upload_size("big.nrrd", 10 * 1024**3, 512 * 1024**2)))
row("femurseg web on a port in use (was a traceback)", "Cannot serve on 127.0.0.1:\\d+ \\(Address already in use",
    lambda folder: cli("web", "--port", busy_port(), "--datasets-root", folder / "datasets"))


# --- the Slicer module's logic, more cases ------------------------------------------------------------------------

@case("Slicer: load a FIFO as the fill label", "not a regular file")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    path = fifo(folder)
    return in_slicer(ct_array(), lambda app, node: scene.load_fill_label(app.scene, app.segmentations_logic, path,
                                                                         node))


@case("Slicer: load a detached fill label reading outside its folder", "outside")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    path = data_outside(folder, "nrrd")
    return in_slicer(ct_array(), lambda app, node: scene.load_fill_label(app.scene, app.segmentations_logic, path,
                                                                         node))


@case("Slicer: fill a CT node of 0.05 mm voxels", "many minutes of work")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    def fine(app, node):
        node.SetSpacing(0.05, 0.05, 0.05)
        return scene.fill_volume_node(app.scene, app.segmentations_logic, node)
    return in_slicer(ct_array(144), fine)


@case("Slicer: export a segment's surface onto a folder", "is a folder|already exists")
def _(folder: Path) -> Attempt:
    from FemurSegLib import scene

    (folder / "out.stl").mkdir()
    return in_slicer(ct_array(), lambda app, node, segmentation: scene.export_segment_surface(
        app.scene, app.segmentations_logic, segmentation, None, node, folder / "out.stl"), segment=ct_array() > 0)


# --- the suite -----------------------------------------------------------------------------------------------

def snapshot(*folders: Path) -> dict[str, str]:
    """SHA-256 of every regular file, the target of every link and a mark for every folder, FIFO or other node, by
    path (nothing but regular files is opened); the exporter's lock file aside."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.name == LOCK_FILE:
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                kind = f"link to {os.readlink(path)}"
            elif stat.S_ISDIR(mode):
                kind = "dir"
            elif stat.S_ISREG(mode):
                kind = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                kind = f"node {stat.S_IFMT(mode):o}"
            found[str(path)] = kind
    return found


def test_the_suite_has_at_least_200_cases() -> None:
    assert len(CASES) >= 200, len(CASES)


def test_the_hostile_checkpoint_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The payload is real: nnU-Net's own loader call (weights_only=False) would create the marker."""
    checkpoint = checkpoint_of(hostile_model(tmp_path))
    torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert (tmp_path / MARKER).exists()


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # the zip row that holds plans.json twice
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_and_changes_nothing(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEMURSEG_MODELS_DIR", str(tmp_path / "user-models"))
    monkeypatch.chdir(tmp_path)  # a relative write lands in the case folder, where the snapshot sees it
    build, message, expect = CASES[name]
    attempt = build(tmp_path)
    watched = (tmp_path, *attempt.also_unchanged)
    before = snapshot(*watched)
    started = time.monotonic()
    outcome = attempt.run()
    elapsed = time.monotonic() - started
    lines = outcome.text.strip().splitlines()
    assert outcome.code == (2 if expect == "error" else 0), outcome
    assert len(lines) == 1 and "Traceback" not in outcome.text, outcome.text
    if outcome.cli:
        assert lines[0].startswith(f"femurseg: {expect}: "), lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert not re.search(r"\bthe the\b", lines[0], re.IGNORECASE), lines[0]
    assert not (tmp_path / MARKER).exists(), "the hostile checkpoint's code ran"
    assert snapshot(*watched) == before, "a file changed, appeared or vanished"
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.0f} s"


# --- what the policy must still allow, and where things are found ---------------------------------------------------

def test_the_bundled_model_is_never_a_folder_of_its_name_in_the_current_directory(tmp_path, monkeypatch):
    """`train-bundled .` leaves FemurReal3dSmall-v7/ in the current directory; the name still means the bundled one."""
    monkeypatch.chdir(tmp_path)
    bundled = resolve_model(None)
    shutil.copytree(bundled.root, tmp_path / bundled.name)
    edit_json(tmp_path / bundled.name / "model_card.json", lambda card: card.update(version="impostor"))
    assert bundled.root == BUNDLED_MODELS_DIR / bundled.name and bundled.bundled
    by_name = resolve_model(bundled.name)
    assert by_name.root == bundled.root and by_name.version != "impostor"
    assert resolve_model(f"./{bundled.name}").version == "impostor"  # a path is still a path


@pytest.mark.parametrize("xdg", ["", "relative/data"])
def test_an_empty_or_relative_xdg_data_home_is_ignored(xdg, monkeypatch):
    from FemurSegLib.models import user_models_dir

    monkeypatch.delenv("FEMURSEG_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", xdg)
    assert user_models_dir() == Path.home() / ".local" / "share" / "FemurSeg" / "models"


def test_a_zip_installed_model_is_readable_by_others_and_a_broken_one_is_skipped(tmp_path, monkeypatch):
    from FemurSegLib.iopolicy import UMASK
    from FemurSegLib.models import scan_models

    monkeypatch.setenv("FEMURSEG_MODELS_DIR", str(tmp_path / "user-models"))
    installed = install_model(model_zip(tmp_path), name="Zipped")
    assert stat.S_IMODE(installed.root.stat().st_mode) == 0o777 & ~UMASK
    broken_installed(tmp_path, "Broken")
    models, problems = scan_models()
    assert [m.name for m in models if not m.bundled] == ["Zipped"] and len(problems) == 1 and "Broken" in problems[0]
    assert resolve_model("Zipped").root == installed.root


@pytest.mark.parametrize("kind", ["nrrd", "meta"])
def test_a_detached_header_beside_its_data_still_reads(kind, tmp_path):
    from FemurSegLib.imageio import read_ct

    raw_voxels(tmp_path / "voxels.raw")
    header = detached(tmp_path, f"ct.{'nrrd' if kind == 'nrrd' else 'mha'}", "voxels.raw", kind)
    assert np.array_equal(sitk.GetArrayFromImage(read_ct(header)), ct_array(24))


def test_a_name_of_250_bytes_is_written_through_a_temporary_name_within_255(tmp_path):
    from FemurSegLib.imageio import write_image
    from FemurSegLib.iopolicy import NAME_MAX_BYTES, temporary_affixes

    name = "x" * 243 + ".nii.gz"
    prefix, suffix = temporary_affixes(name, ".nii.gz")
    assert len(prefix.encode()) + 8 + len(suffix.encode()) <= NAME_MAX_BYTES
    write_image(sitk.GetImageFromArray(ct_array()), tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_the_worker_still_segments_after_every_bad_request(tmp_path):
    """The worker rows above all went to one process: it must still be alive and do a good request."""
    outcome = worker_request(request(ct=str(ct_file(tmp_path)), out=str(tmp_path / "femur.nrrd"))).run()
    assert outcome.code == 0 and (tmp_path / "femur.nrrd").is_file()


def test_a_batch_with_a_245_character_name_and_a_fifo_data_file_runs_to_its_end(tmp_path, monkeypatch):
    """Both aborted or hung every run: the long name's temporary files passed 255 bytes, the FIFO never ended. (The
    batch uses the suite's already loaded bundled Segmenter instead of loading its own copy.)"""
    from FemurSegLib import batch
    from FemurSegLib.batch import BatchSettings, run_batch

    monkeypatch.setattr(batch, "_load_segmenter", lambda root, device: bundled_segmenter())
    cts = cohort(tmp_path, count=0)
    long_name = "c" * 245
    ct_file(cts, f"{long_name}.nrrd")
    fifo(cts, "voxels.raw")
    detached(cts, "piped.nrrd", "voxels.raw")
    before = snapshot(cts)
    summary = run_batch(cts, tmp_path / "out", BatchSettings(device="cpu"))
    rows = {row["case"]: row for row in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert summary.total == 2 and summary.errors == 1
    assert rows["piped"]["status"] == "error" and "not a regular file" in rows["piped"]["error"]
    assert rows[long_name]["status"] != "error" and (tmp_path / "out" / "labels" / f"{long_name}.nrrd").is_file()
    assert snapshot(cts) == before


def test_a_fifo_planted_as_a_batch_row_file_counts_as_not_done(tmp_path):
    from FemurSegLib.batch import Case, is_done

    (tmp_path / "rows").mkdir()
    fifo(tmp_path / "rows", "x.json")
    assert not is_done(tmp_path, Case("x", tmp_path / "x.nrrd"), {})
