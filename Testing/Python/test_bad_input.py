"""The bad-input suite: hostile or mistaken input to the command line, the Slicer module's logic (FemurSegLib.scene
on real slicer-core through trame-slicer's SlicerApp, as FemurSegLogic calls it), the segmentation child process
that Slicer and the browser start, and the browser's upload handler (the function the page's upload calls; two
uploads also go through real Chromium in test_web_browser.py).

Every case builds its inputs in its own folder, runs one front end once, and checks the README's promise: exit
code 2 (or, in Slicer and the page, the FemurSegError they show), one line, no traceback, and not one byte
changed or added under the case's folder, which holds its inputs, outputs, datasets and the user models folder
(every file hashed before and after; the exporter's lock file aside). Hostile checkpoints carry a payload that
creates a marker file when unpickled; test_the_hostile_checkpoint_runs_code_when_unpickled proves it would.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
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


@dataclass(frozen=True)
class Outcome:
    code: int
    text: str  # the CLI's stderr, or the message Slicer / the page shows
    cli: bool  # the CLI's text must start with "femurseg: error: "


@dataclass(frozen=True)
class Attempt:
    run: Callable[[], Outcome]
    also_unchanged: tuple[Path, ...] = ()  # folders outside the case folder that must not change either


CASES: dict[str, tuple[Callable[[Path], Attempt], str]] = {}


def case(name: str, message: str):
    """Register a case: ``build(folder) -> Attempt``, and a regular expression its one line must match."""
    def register(build: Callable[[Path], Attempt]) -> Callable[[Path], Attempt]:
        assert name not in CASES, name
        CASES[name] = (build, message)
        return build
    return register


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


# --- the suite -----------------------------------------------------------------------------------------------

def snapshot(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file and a mark for every folder and link, by path; the exporter's lock file aside."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.name == LOCK_FILE:
                continue
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else \
                hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path)] = kind
    return found


def test_the_suite_has_at_least_40_kinds() -> None:
    assert len(CASES) >= 40, len(CASES)


def test_the_hostile_checkpoint_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The payload is real: nnU-Net's own loader call (weights_only=False) would create the marker."""
    checkpoint = checkpoint_of(hostile_model(tmp_path))
    torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert (tmp_path / MARKER).exists()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_and_changes_nothing(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEMURSEG_MODELS_DIR", str(tmp_path / "user-models"))
    build, message = CASES[name]
    attempt = build(tmp_path)
    watched = (tmp_path, *attempt.also_unchanged)
    before = snapshot(*watched)
    outcome = attempt.run()
    lines = outcome.text.strip().splitlines()
    assert outcome.code == 2, outcome
    assert len(lines) == 1 and "Traceback" not in outcome.text, outcome.text
    if outcome.cli:
        assert lines[0].startswith("femurseg: error: "), lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert not re.search(r"\bthe the\b", lines[0], re.IGNORECASE), lines[0]
    assert not (tmp_path / MARKER).exists(), "the hostile checkpoint's code ran"
    assert snapshot(*watched) == before, "a file changed, appeared or vanished"
