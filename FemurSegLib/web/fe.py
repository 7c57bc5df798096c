"""The page's "FE model" card: the segment chosen under Export -> ``femurseg fe`` in a child process
(:class:`FemurSegLib.fe_runner.FEProcess`, as the Slicer panel runs it), polled by an asyncio task that copies its
progress into the trame state, with Cancel. Kept apart from workflow.py and review.py: it only reads their export
choice and CT.

The model goes into ``<datasets root>/FE/<case>/`` (a typed path would let a stranger write anywhere); a rods file
is a path inside the folders the page may open. Every trigger argument is checked as the command line checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

from trame.widgets import html
from trame.widgets.vuetify3 import VBtn, VCard, VCardText, VCardTitle, VDivider, VProgressLinear, VSelect, VTextField

from .. import fe_runner
from ..errors import FemurSegError
from ..fe.materials import LAWS
from ..fe.pipeline import FORMATS, FEOptions
from .safety import check_case_name, resolve_inside

if TYPE_CHECKING:
    from .workflow import Workflow

FE_FOLDER = "FE"
POLL_S = 0.25


def fe_folder_inside(datasets_root: Path, case: str) -> Path:
    """``datasets_root/FE/<case>``, refused if it leads outside the root (a symlink)."""
    root = datasets_root.resolve()
    folder = root / FE_FOLDER / check_case_name(case)
    for part in (folder.parent, folder):
        if part.exists() and part.resolve() != part:
            raise FemurSegError(f"{part} leads outside {root} (a symlink?); refused.")
    return folder


def check_element_size(text: str) -> float:
    """The element size the page sent, in mm, if it is a positive number."""
    try:
        size = float(str(text).strip())
    except ValueError:
        raise FemurSegError(f"Element size '{text}' is not a number of millimetres.") from None
    if not math.isfinite(size) or size <= 0:
        raise FemurSegError(f"Element size {text} mm must be a positive number of millimetres.")
    return size


class FEModelCard:
    """FE builds for one page's Workflow; one at a time."""

    def __init__(self, workflow: Workflow) -> None:
        self.workflow, self.state = workflow, workflow.state
        self.process: fe_runner.FEProcess | None = None
        self.state.update({"fs_fe_running": False, "fs_fe_progress": 0.0, "fs_fe_stage": "", "fs_fe_result": ""})
        workflow.server.trigger("fs_fe_build")(self.build)
        workflow.server.trigger("fs_fe_cancel")(self.cancel)

    def build(self, case_name: str, law: str, element_size: str, formats: str, calibration: str, target_key: str,
              replace: bool) -> None:
        """Build the FE model of the Export choice into ``datasets_root/FE/<case>``."""
        def run() -> None:
            workflow = self.workflow
            if self.process is not None:
                raise FemurSegError("An FE model is already being built.")
            workflow.require_ct()
            folder = fe_folder_inside(workflow.datasets_root, str(case_name or ""))
            options = FEOptions(element_size=check_element_size(element_size), law=str(law),
                                formats=tuple(f.strip().lower() for f in str(formats or "").split(",") if f.strip()))
            rods = str(calibration or "").strip()
            rods = str(resolve_inside(rods, [workflow.datasets_root, *workflow.open_roots], "calibration rods file")
                       ) if rods else "internal"
            node, segment_id, words = workflow.review.target(str(target_key or ""))
            self.process = fe_runner.start_from_segment(workflow.slicer_app.scene, workflow.seg_logic, node,
                                                        segment_id, workflow.volume_node, folder, rods, options,
                                                        bool(replace))
            with self.state:
                self.state.update({"fs_fe_running": True, "fs_fe_progress": 0.0, "fs_fe_stage": "starting",
                                   "fs_fe_result": ""})
            workflow.say(f"Building the FE model of {words} into {FE_FOLDER}/{folder.name}/.")
            asyncio.get_event_loop().create_task(self._watch(self.process))
        self.workflow.guarded("FE model", run, f"{case_name} {law} {element_size} mm {formats} {calibration or ''} "
                                               f"{target_key} replace={replace}")

    async def _watch(self, process: fe_runner.FEProcess) -> None:
        """Mirror the child's progress into the page until it ends."""
        while not process.poll().finished:
            with self.state:
                self.state.fs_fe_progress = round(100 * process.state.progress, 1)
                self.state.fs_fe_stage = process.state.describe()
            await asyncio.sleep(POLL_S)
        if self.process is process:
            self.process = None
        state = process.state
        with self.state:
            self.state.update({"fs_fe_running": False, "fs_fe_result": state.describe()})
        self.workflow.say(state.describe(), "error" if state.error else "warning" if state.cancelled or
                          state.warnings else "success")

    def cancel(self) -> None:
        if self.process is not None:
            self.process.cancel()  # returns at once; the watcher reports the end

    def close(self) -> None:
        """Stop a running build (its files are removed)."""
        if self.process is not None:
            self.process.cancel()
            with contextlib.suppress(FemurSegError):
                self.process.wait_for_completion()

    @staticmethod
    def card() -> None:
        """The card's widgets (the panel places it after the export card, whose choice and case name it uses)."""
        VDivider()
        with VCard(variant="flat"):
            VCardTitle("FE model", classes="text-subtitle-1")
            with VCardText():
                html.Div("A finite-element model of the segment chosen under Export (one femur, one solid piece), "
                         f"into {FE_FOLDER}/<case name>/ of the datasets root.", classes="text-caption mb-2")
                with html.Div(classes="d-flex"):
                    VSelect(v_model=("fs_fe_law", "morgan"), items=(repr(list(LAWS)),), id="fs-fe-law",
                            label="Law", density="compact", hide_details=True, classes="mr-2")
                    VTextField(v_model=("fs_fe_size", "2"), id="fs-fe-size", label="Element size (mm)",
                               type="number", density="compact", hide_details=True, classes="mr-2")
                    VTextField(v_model=("fs_fe_formats", ",".join(FORMATS)), id="fs-fe-formats", label="Formats",
                               density="compact", hide_details=True)
                VTextField(v_model=("fs_fe_rods", ""), id="fs-fe-rods", density="compact", hide_details=True,
                           label="Calibration rods file (.csv, .json); empty: internal calibration", classes="my-2")
                VBtn("Build FE model", id="fs-fe-build", color="primary", size="small",
                     disabled=("fs_fe_running || !fs_ct_name",), classes="mr-2",
                     click="trigger('fs_fe_build', [fs_case, fs_fe_law, fs_fe_size, fs_fe_formats, fs_fe_rods, "
                           "fs_export_target, fs_replace])")
                VBtn("Cancel", id="fs-fe-cancel", click="trigger('fs_fe_cancel')", size="small", variant="tonal",
                     disabled=("!fs_fe_running",))
                VProgressLinear(v_if=("fs_fe_running",), id="fs-fe-progress", model_value=("fs_fe_progress",),
                                height=14, color="primary", classes="mt-2")
                html.Div("{{ fs_fe_stage }}", v_if=("fs_fe_running",), classes="text-caption")
                html.Div("{{ fs_fe_result }}", v_if=("fs_fe_result",), id="fs-fe-result", classes="text-body-2 mt-1")
