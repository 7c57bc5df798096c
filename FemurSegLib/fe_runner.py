"""FE models in a child process, for GUIs that must stay live (desktop Slicer, the browser app).

The child is ``python -m FemurSegLib fe CT LABEL OUT_DIR --progress-json …`` (the command line's own path, so every
front end builds the same model): the CT and the chosen femur go to it as files in a temporary folder, removed
when it ends; it prints ``{"progress": f, "stage": s}``, ``{"message": m}`` and at the end ``{"done": folder,
"elements": n, "stiffness_n_mm": k, "warnings": [...], "files": {...}}``. A request that cannot run (bad rods,
options, an output folder that is a file, model files already there without ``replace``) is refused here, before
any child starts. Cancel interrupts it and removes the model files it had written, so a cancelled or failed build
leaves the output folder as it was (files it replaced aside). The caller polls :meth:`FEProcess.poll` from its
event loop (a Qt timer, a trame async task) or blocks in :meth:`FEProcess.wait_for_completion` (scripts, tests).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from .childprocess import CommandJob, CommandProcess, apply_progress
from .errors import AlreadyExists, FemurSegError
from .fe.calibration import read_rods
from .fe.pipeline import STEM, FEOptions, output_files
from .imageio import write_image
from .iopolicy import shown

CANCEL_GRACE_S = 5.0  # the mesher does not look at signals; a meshing step that outlasts this is killed


@dataclass
class FEState:
    progress: float = 0.0
    stage: str = "starting"
    messages: list[str] = field(default_factory=list)
    elements: int | None = None  # once done
    stiffness_n_mm: float | None = None  # None when not solved
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # format -> path
    error: str | None = None
    finished: bool = False
    cancelled: bool = False

    def describe(self) -> str:
        """One line for a GUI: what runs now, or how it ended (the same words in Slicer and the browser)."""
        if not self.finished:
            return self.stage + (f": {self.messages[-1]}" if self.messages else "")
        if self.error:
            return f"FE model failed: {self.error}"
        if self.cancelled:
            return "FE model cancelled; no model files were left."
        stiffness = f", stance stiffness {self.stiffness_n_mm:.0f} N/mm" if self.stiffness_n_mm is not None else ""
        warnings = f" Warnings: {'; '.join(self.warnings)}." if self.warnings else ""
        return (f"FE model: {self.elements} elements{stiffness} -> "
                f"{', '.join(Path(p).name for p in self.files.values())} in "
                f"{Path(next(iter(self.files.values()))).parent}.{warnings}")


def fe_arguments(options: FEOptions, calibration: str) -> list[str]:
    """``femurseg fe``'s options for ``options`` (floor and Poisson's ratio are the command line's defaults)."""
    arguments = ["--calibration", calibration, "--law", options.law, "--element-size", repr(options.element_size),
                 "--formats", ",".join(options.formats), "--bins", str(options.bins),
                 "--solve" if options.solve else "--no-solve"]
    arguments += ["--quadratic"] if options.quadratic else []
    return arguments + (["--value", str(options.value)] if options.value is not None else [])


class FEProcess(CommandJob):
    """One background FE build of ``label`` (the femur, on the CT's grid) into ``out_dir``; read ``state`` at any
    time (after :meth:`poll`)."""

    what = "The FE model"

    def __init__(self, ct: sitk.Image, label: sitk.Image, out_dir: str | os.PathLike, calibration: str = "internal",
                 options: FEOptions = FEOptions(), replace: bool = False, python: str | None = None) -> None:
        out_dir = Path(out_dir)
        if calibration != "internal":
            read_rods(calibration)
        if out_dir.exists() and not out_dir.is_dir():
            raise FemurSegError(f"Output folder '{shown(out_dir)}' is a file; choose a folder name.")
        self.outputs = [*output_files(out_dir, options.formats).values(), out_dir / f"{STEM}.json"]
        there = [path.name for path in self.outputs if os.path.lexists(path)]
        if there and not replace:
            raise AlreadyExists(f"FE model files {', '.join(there)} already exist in '{shown(out_dir)}'; choose "
                                "another folder, or replace them (", ").")
        self._new = [path for path in self.outputs if not os.path.lexists(path)]  # removed again on cancel
        self._new_folder = None if out_dir.exists() else out_dir
        self.state = FEState()
        self._lock = threading.Lock()
        self._work_dir = Path(tempfile.mkdtemp(prefix="femurseg-fe-"))
        try:
            ct_path, label_path = self._work_dir / "ct.nrrd", self._work_dir / "femur-label.nrrd"
            write_image(ct, ct_path, compress=False)
            write_image(label, label_path)
            self._child = CommandProcess(["fe", str(ct_path), str(label_path), str(out_dir), "--progress-json",
                                          *fe_arguments(options, calibration)], self._on_event, python,
                                         CANCEL_GRACE_S)
        except BaseException:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            raise

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            apply_progress(self.state, event)
            if "done" in event:
                self.state.elements = int(event["elements"])
                stiffness = event.get("stiffness_n_mm")
                self.state.stiffness_n_mm = None if stiffness is None else float(stiffness)
                self.state.warnings = [str(w) for w in event.get("warnings", [])]
                self.state.files = {str(k): str(v) for k, v in event.get("files", {}).items()}

    def poll(self) -> FEState:
        """Update and return the state without blocking."""
        code = self._child.exit_code()
        if code is not None and not self.state.finished:
            with self._lock:
                self.state.finished = True
                if code == 0 and self.state.files:
                    self.state.cancelled = False  # it had finished before the cancel reached it
                elif not self.state.cancelled:
                    self.state.error = self._child.error("FE model failed")
            if self.state.cancelled or self.state.error:
                self._remove_new_outputs()
            shutil.rmtree(self._work_dir, ignore_errors=True)
        return self.state

    def _remove_new_outputs(self) -> None:
        for path in self._new:
            path.unlink(missing_ok=True)
        if self._new_folder is not None and self._new_folder.is_dir() and not any(self._new_folder.iterdir()):
            self._new_folder.rmdir()


def start_from_segment(scene: Any, seg_logic: Any, segmentation_node: Any, segment_id: str | None,
                       ct_volume_node: Any, out_dir: str | os.PathLike, calibration: str = "internal",
                       options: FEOptions = FEOptions(), replace: bool = False,
                       python: str | None = None) -> FEProcess:
    """The panels' FE model: the chosen (corrected) femur segment, or with none chosen the node's femur segment,
    as the label on the CT's grid (scene.femur_label, as Export takes it)."""
    from . import scene as femur_scene  # needs slicer: imported only by the GUIs that have it

    label = femur_scene.femur_label(scene, seg_logic, segmentation_node, segment_id, ct_volume_node)
    return FEProcess(femur_scene.sitk_from_volume_node(ct_volume_node), label, out_dir, calibration, options,
                     replace, python)
