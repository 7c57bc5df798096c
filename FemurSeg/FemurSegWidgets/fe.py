"""The panel's "FE model" section: the chosen (corrected) femur segment -> calibrated tetrahedral FE model files,
built by ``femurseg fe`` in a background process (FemurSegLib.fe_runner) polled by a QTimer, so Slicer stays live;
Build turns into Cancel. The same options as the command line: calibration (a rods file, or internal when left
empty), law, element size, formats, output folder; the Replace box of the export section decides about files
that are there already.
"""

from __future__ import annotations

import shutil
import sys

import qt
import slicer


class FESection:
    """Drives the ``fe…`` widgets of the FemurSeg widget's ``ui``."""

    def __init__(self, widget) -> None:
        self.widget, self.ui = widget, widget.ui
        self.process = None  # FemurSegLib.fe_runner.FEProcess while one runs
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.timeout.connect(self.onPoll)
        self.ui.feBuildButton.clicked.connect(self.onBuildOrCancel)

    def onBuildOrCancel(self) -> None:
        if self.process is not None:
            self.process.cancel()  # returns at once; onPoll sees the end
            return
        from FemurSegLib import fe_runner
        from FemurSegLib.fe.pipeline import FEOptions

        ui, p = self.ui, self.widget._parameterNode
        with self.widget.reportErrors("FE model"):
            if not ui.feOutputPathLineEdit.currentPath:
                raise ValueError("Choose the output folder of the FE model first.")
            options = FEOptions(element_size=ui.feElementSizeSpinBox.value, law=ui.feLawComboBox.currentText,
                                formats=tuple(f.strip().lower() for f in ui.feFormatsLineEdit.text.split(",")
                                              if f.strip()))
            self.process = fe_runner.start_from_segment(
                slicer.mrmlScene, slicer.modules.segmentations.logic(), ui.feSegmentSelector.currentNode(),
                ui.feSegmentSelector.currentSegmentID() or None, p.inputVolume, ui.feOutputPathLineEdit.currentPath,
                ui.feCalibrationPathLineEdit.currentPath or "internal", options, p.replace,
                python=shutil.which("PythonSlicer") or sys.executable)
            ui.feBuildButton.text = "Cancel"
            ui.feProgressBar.value = 0
            self.timer.start()

    def onPoll(self) -> None:
        state = self.process.poll()
        self.ui.feProgressBar.value = int(100 * state.progress)
        self.ui.feStatusLabel.text = state.describe()
        if state.finished:
            self.timer.stop()
            self.process, self.ui.feBuildButton.text = None, "Build FE model"

    def cleanup(self) -> None:
        self.timer.stop()
        if self.process is not None:
            self.process.cancel()
