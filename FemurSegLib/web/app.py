"""The page: trame-slicer's views, Segment Editor and undo/redo, with the FemurSeg panel in the side drawer.

Composed from trame-slicer's own logic and UI pieces (rather than subclassing its demo SegmentationApp) so the
drawer can hold two tabs, FemurSeg and Segment Editor, and FemurSeg decides what happens when a CT is loaded.
"""

from __future__ import annotations

from pathlib import Path

from trame.app import TrameApp
from trame.widgets.vuetify3 import VTab, VTabs, VWindow, VWindowItem
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import LayoutButtonLogic, SegmentEditorLogic
from trame_slicer.app.ui import (
    LayoutButton,
    SegmentEditorToolbarUI,
    SegmentEditorUI,
    SegmentEditorUndoRedoUI,
    ViewerLayout,
)
from trame_slicer.core import SlicerApp
from trame_slicer.rca_view import register_rca_factories

from .panel import FemurSegPanel
from .workflow import Workflow


class FemurSegWebApp(TrameApp):
    """One browser session's app: a Slicer scene, its views and the FemurSeg workflow on it."""

    def __init__(self, datasets_root: Path, open_roots: list[Path], max_upload_bytes: int, server=None) -> None:
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.workflow = Workflow(self.server, self.slicer_app, self.editor_logic, datasets_root, open_roots,
                                 max_upload_bytes)
        self._build_ui()
        self.state.trame__title = "FemurSeg"

    def _build_ui(self) -> None:
        with ViewerLayout(self.server, title="FemurSeg", is_drawer_visible=True) as self.ui:
            self.ui.drawer.width = 460
            with self.ui.drawer:
                with VTabs(v_model=("fs_tab", "femurseg"), density="compact", grow=True):
                    VTab("FemurSeg", value="femurseg", id="fs-tab-femurseg")
                    VTab("Segment Editor", value="editor", id="fs-tab-editor")
                with VWindow(v_model=("fs_tab",), style="height: calc(100% - 48px); overflow-y: auto;"):
                    with VWindowItem(value="femurseg"):
                        FemurSegPanel(self.workflow.actions())
                    with VWindowItem(value="editor", style="height: 100%;"):
                        editor_ui = SegmentEditorUI()
            with self.ui.toolbar:
                layout_button = LayoutButton(classes="mt-1")
                SegmentEditorToolbarUI(editor_ui=editor_ui)
            with self.ui.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=editor_ui)
            with self.ui.content:
                self.layout_logic.layout_manager.initialize_layout_grid(self.ui)
        self.editor_logic.set_ui(editor_ui)
        self.layout_logic.set_ui(layout_button)
