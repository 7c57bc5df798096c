"""The panel's review widgets: the comparison (table per femur, warnings, worst places, recomputed after every edit
of either draft), the colour legend, window presets, and what Export will write. The same FemurSegLib.scene
functions as the browser page compute and word all of it.
"""

from __future__ import annotations

import qt
import slicer
from slicer.util import VTKObservationMixin

EDIT_SETTLE_MS = 600  # compare again this long after the last change: a stroke modifies a segment many times


class ReviewSection(VTKObservationMixin):
    """Drives the Compare and Export widgets of the FemurSeg widget's ``ui`` (the Logic does the scene work)."""

    def __init__(self, widget) -> None:
        VTKObservationMixin.__init__(self)
        from FemurSegLib import scene

        self.widget, self.ui = widget, widget.ui
        self.comparison = None  # FemurSegLib.scene.Comparison of the last Compare
        self._observed: list = []
        self.timer = qt.QTimer()
        self.timer.setSingleShot(True)
        self.timer.setInterval(EDIT_SETTLE_MS)
        self.timer.timeout.connect(self.onEditSettled)
        self.ui.legendLabel.text = scene.legend_html()
        self.ui.comparisonTitleLabel.text = scene.COMPARISON_TITLE
        self.ui.boneWindowButton.clicked.connect(lambda: self.onWindow("bone"))
        self.ui.softTissueWindowButton.clicked.connect(lambda: self.onWindow("soft tissue"))
        self.ui.jumpToWorstSliceButton.clicked.connect(self.onJumpToWorstSlice)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.onInputVolumeChanged)
        self.ui.exportSegmentationSelector.currentNodeChanged.connect(lambda _: self.updateExportPreview())

    def cleanup(self) -> None:
        self.timer.stop()
        self.removeObservers()

    def compare(self) -> None:
        """Compare fill with nnU-Net (the reference) again, replacing the last comparison's nodes."""
        from FemurSegLib import scene

        p = self.widget._parameterNode
        scene.remove_comparison(slicer.mrmlScene, self.comparison)
        self.comparison = None
        self.comparison = self.widget.logic.compare(p.nnunetSegmentation, p.fillSegmentation, p.inputVolume)
        self.ui.comparisonTableView.setMRMLTableNode(self.comparison.table_node)
        self.ui.comparisonWarningLabel.text = "; ".join(self.comparison.warnings)
        self.ui.comparisonWarningLabel.visible = bool(self.comparison.warnings)
        self.ui.worstPlacesComboBox.clear()
        for place in self.comparison.worst_places:
            self.ui.worstPlacesComboBox.addItem(place.describe())
        self._observe([p.nnunetSegmentation, p.fillSegmentation])
        self.widget.setStatus(self.comparison.describe())

    def _observe(self, nodes: list) -> None:
        """Recompute after edits of the compared drafts (Segment Editor strokes, islands, undo...)."""
        for segmentation in self._observed:
            self.removeObserver(segmentation, slicer.vtkSegmentation.SegmentModified, self.onSegmentModified)
        self._observed = [node.GetSegmentation() for node in nodes if node is not None]
        for segmentation in self._observed:
            self.addObserver(segmentation, slicer.vtkSegmentation.SegmentModified, self.onSegmentModified)

    def onSegmentModified(self, caller, event) -> None:
        self.timer.start()  # restarts: one comparison once the edit settles

    def onEditSettled(self) -> None:
        if self.comparison is not None:
            with self.widget.reportErrors("Comparison"):
                self.compare()
        self.updateExportPreview()

    def onJumpToWorstSlice(self) -> None:
        places = self.comparison.worst_places if self.comparison is not None else ()
        index = max(self.ui.worstPlacesComboBox.currentIndex, 0)
        if index >= len(places):
            self.widget.setStatus("Compare nnU-Net with fill first.")
            return
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *places[index].ras,
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        self.widget.setStatus(f"Showing {places[index].describe()}.")

    def onWindow(self, preset: str) -> None:
        from FemurSegLib import scene

        with self.widget.reportErrors("Window"):
            scene.apply_window(self.widget._parameterNode.inputVolume, preset)

    def onInputVolumeChanged(self, node) -> None:
        """The case name comes from the CT's file name (or node name), never from the previous CT."""
        from FemurSegLib.dataset import case_name_from_file

        if node is not None and self.widget._parameterNode is not None:
            storage = node.GetStorageNode()
            name = storage.GetFileName() if storage is not None and storage.GetFileName() else node.GetName()
            self.widget._parameterNode.caseName = case_name_from_file(name)

    def updateExportPreview(self) -> None:
        """Say what Export will write into the label (segments, ml) before the user writes it."""
        from FemurSegLib import scene
        from FemurSegLib.errors import FemurSegError

        p = self.widget._parameterNode
        if p is None or p.exportSegmentation is None or p.inputVolume is None:
            self.ui.exportPreviewLabel.text = "Choose the segmentation to export."
            return
        try:
            self.ui.exportPreviewLabel.text = scene.describe_export(
                slicer.mrmlScene, slicer.modules.segmentations.logic(), p.exportSegmentation, None, p.inputVolume)
        except FemurSegError as error:
            self.ui.exportPreviewLabel.text = str(error)
