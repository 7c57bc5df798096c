"""The panel's model choice: bundled and installed models (fine-tuned ones with their before/after figures),
"Install model…" from an nnU-Net export zip, and "Improve the model": fine-tune the chosen model on the dataset
Export writes to, in a background process polled by a QTimer (Slicer stays live; Start turns into Cancel). When the
fine-tuning ends, the new model joins the list and is selected for Segment.
"""

from __future__ import annotations

from pathlib import Path

import qt

INSTALL_MODEL_ITEM = "Install model…"


class ModelSection:
    """Drives ``modelComboBox`` and the "Improve the model" widgets of the FemurSeg widget's ``ui``."""

    def __init__(self, widget) -> None:
        self.widget, self.ui = widget, widget.ui
        self.process = None  # FemurSegLib.finetune_runner.FinetuneProcess while one runs
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.timeout.connect(self.onPollFinetune)
        self.ui.modelComboBox.activated.connect(self.onModelActivated)
        self.ui.finetuneButton.clicked.connect(self.onFinetuneOrCancel)
        self.populate()

    def current(self) -> str | None:
        """The chosen model's folder (None: the bundled default)."""
        return self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or None

    def populate(self, select: str | None = None) -> None:
        from FemurSegLib import finetune, models

        self.ui.modelComboBox.clear()
        for model in models.list_models():
            label = f"{model.name} (bundled)" if model.bundled else model.name
            figures = finetune.summary(model.card)  # before -> after of a fine-tuned model
            self.ui.modelComboBox.addItem(f"{label}: {figures}" if figures else label, str(model.root))
        self.ui.modelComboBox.addItem(INSTALL_MODEL_ITEM, "")
        if select:
            self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(select))

    def onModelActivated(self, index: int) -> None:
        if self.ui.modelComboBox.itemText(index) != INSTALL_MODEL_ITEM:
            return
        source = qt.QFileDialog.getOpenFileName(self.widget.parent, "nnU-Net model (nnUNetv2_export_model_to_zip)",
                                                "", "Zip (*.zip)")
        installed = None
        with self.widget.reportErrors("Installing model"):
            if source:
                from FemurSegLib import models

                installed = models.install_model(Path(source))
                self.widget.setStatus(f"Installed model {installed.name}.")
        self.populate(select=str(installed.root) if installed is not None else None)

    def onFinetuneOrCancel(self) -> None:
        if self.process is not None:
            self.process.cancel()  # returns at once; onPollFinetune sees the end
            return
        widget = self.widget
        with widget.reportErrors("Fine-tuning"):
            self.process = widget.logic.startFinetune(widget.exportDatasetDir(), self.current(),
                                                      self.ui.finetuneMinutesSpinBox.value,
                                                      widget.logic.getParameterNode().device)
            self.ui.finetuneButton.text = "Cancel fine-tuning"
            self.ui.finetuneProgressBar.value = 0
            self.timer.start()

    def onPollFinetune(self) -> None:
        state = self.process.poll()
        self.ui.finetuneProgressBar.value = int(100 * state.progress)
        self.ui.finetuneStatusLabel.text = state.describe()
        if state.finished:
            self.timer.stop()
            self.process, self.ui.finetuneButton.text = None, "Start fine-tuning"
            if state.model_folder:
                self.populate(select=state.model_folder)  # the new model, with its before/after figures

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.cancel()
