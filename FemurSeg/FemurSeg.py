"""FemurSeg: segment the proximal femur in CT with nnU-Net, compare with the fill baseline, correct, export.

Thin glue: the widget reads the panel and calls the Logic; the Logic passes slicer.mrmlScene and the
segmentations logic to FemurSegLib (Qt-free, tested outside Slicer), which holds every algorithm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated, Iterator

import qt
import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# Source tree: FemurSegLib is beside FemurSeg/ (FemurSegWidgets inside it); installed extension: both beside this file.
for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if ((_folder / "FemurSegLib").is_dir() or (_folder / "FemurSegWidgets").is_dir()) and str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# Keep in sync with requirements.txt (Testing/Python/test_module_static.py checks it).
PINNED_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "nnunetv2==2.8.1", "filelock==4.2.12"]
REQUIRED_MODULES = ["torch", "torchvision", "nnunetv2", "filelock", "SimpleITK"]


class FemurSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FemurSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["FemurSeg contributors"]
        self.parent.helpText = ("Segments the proximal femur in CT with nnU-Net, compares it with the fill baseline, "
                                "hands it to Segment Editor and exports corrected cases as an nnU-Net dataset.")
        self.parent.acknowledgementText = "Built on nnU-Net v2 (Isensee et al.), SimpleITK and 3D Slicer."
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """The bundled phantom CT and its label, in the Sample Data module."""
    import SampleData

    root = Path(__file__).resolve().parent
    sample_dir = next((p / "Resources" / "SampleData" for p in (root, root.parent)
                       if (p / "Resources" / "SampleData" / "FemurPhantom05.nrrd").is_file()), None)
    if sample_dir is None:
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="FemurSeg", sampleName="FemurPhantom05",
        thumbnailFileName=str(root / "Resources" / "Icons" / "FemurPhantom05.png"),
        uris=[(sample_dir / "FemurPhantom05.nrrd").as_uri(), (sample_dir / "FemurPhantom05-label.nrrd").as_uri()],
        fileNames=["FemurPhantom05.nrrd", "FemurPhantom05-label.nrrd"],
        nodeNames=["FemurPhantom05", "FemurPhantom05 truth"],
        loadFileType=["VolumeFile", "SegmentationFile"])


@parameterNodeWrapper
class FemurSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    fast: bool = True
    fillThresholdHU: Annotated[float, WithinRange(-1000.0, 3000.0)] = 350.0
    nnunetSegmentation: slicer.vtkMRMLSegmentationNode
    fillSegmentation: slicer.vtkMRMLSegmentationNode
    exportSegmentation: slicer.vtkMRMLSegmentationNode
    datasetFolder: Path
    datasetId: Annotated[int, WithinRange(1, 999)] = 501
    datasetName: str = "FemurCorrected"
    caseName: str = ""
    testSplit: bool = False
    replace: bool = False  # an existing case or surface file is refused unless this is ticked


class FemurSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = self.models = self.fe = None
        self._process = None  # runner.SegmentationJob while a segmentation runs in the logic's warm worker
        self._started = 0.0  # when it started, for the elapsed time
        self.review = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPollSegmentation)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FemurSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FemurSegLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for button, handler in [(self.ui.segmentButton, self.onSegmentOrCancel),
                                (self.ui.computeFillButton, self.onComputeFill),
                                (self.ui.loadFillButton, self.onLoadFill),
                                (self.ui.compareButton, self.onCompare), (self.ui.exportButton, self.onExport),
                                (self.ui.correctButton, self.onCorrectInSegmentEditor),
                                (self.ui.exportSurfaceButton, self.onExportSurface)]:
            button.clicked.connect(handler)
        from FemurSegWidgets.models import ModelSection

        from FemurSegWidgets.fe import FESection
        from FemurSegWidgets.review import ReviewSection

        self.models = ModelSection(self)  # model list, install, improve (fine-tune)
        self.review = ReviewSection(self)  # comparison, legend, windows, case name, export preview
        self.fe = FESection(self)  # FE model of the corrected femur, built in a background process
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.logic is not None and self.logic.worker is not None:
            self.logic.worker.close()  # ends the warm worker, cancelling a running segmentation
        if self.models is not None:
            self.models.cleanup()  # cancels a running fine-tuning
        if self.review is not None:
            self.review.cleanup()
        if self.fe is not None:
            self.fe.cleanup()  # cancels a running FE build
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # --- segmentation (background process, polled by a QTimer so the GUI stays live) -------------------------
    def onSegmentOrCancel(self) -> None:
        if self._process is not None:
            self._process.cancel()
            return
        with self.reportErrors("Segmentation"):
            if not self.logic.ensureDependencies():
                return
            self._process = self.logic.startSegmentation(self._parameterNode.inputVolume, self.models.current(),
                                                         self._parameterNode.device, self._parameterNode.fast)
            self.ui.segmentButton.text = "Cancel"
            self.ui.progressBar.value = 0
            self._started = time.monotonic()
            self._timer.start()

    def onPollSegmentation(self) -> None:
        state = self._process.poll()
        self.ui.progressBar.value = int(100 * state.progress)
        self.setStatus(f"Segmenting: {state.stage}, {time.monotonic() - self._started:.0f} s"
                       + (f" ({state.messages[-1]})" if state.messages else ""))
        if not state.finished:
            return
        self._timer.stop()
        process, self._process = self._process, None
        self.ui.segmentButton.text = "Segment"
        with self.reportErrors("Segmentation"):
            node = self.logic.finishSegmentation(process, self._parameterNode.inputVolume)
            if process.state.cancelled:
                self.setStatus("Segmentation cancelled; nothing was added.")
                return
            self._parameterNode.nnunetSegmentation = self._parameterNode.exportSegmentation = node or None
            self.setStatus(_scene().describe_result(process.state.femurs, process.state.warnings))

    # --- fill, comparison, correction, export --------------------------------------------------------------
    def onComputeFill(self) -> None:
        with self.reportErrors("Fill"):
            node = self.logic.computeFill(self._parameterNode.inputVolume, self._parameterNode.fillThresholdHU)
            self._parameterNode.fillSegmentation = node
            self.setStatus(f"Added '{node.GetName()}'.")

    def onLoadFill(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "Fill label", "", "Images (*.nrrd *.nii *.nii.gz *.mha)")
        if path:
            with self.reportErrors("Loading fill result"):
                self._parameterNode.fillSegmentation = self.logic.loadFill(path, self._parameterNode.inputVolume)
                self.setStatus(f"Loaded fill result from {Path(path).name}.")

    def onCompare(self) -> None:
        with self.reportErrors("Comparison"):
            self.review.compare()

    def onCorrectInSegmentEditor(self) -> None:
        segmentation = self._parameterNode.exportSegmentation or self._parameterNode.nnunetSegmentation
        if segmentation is None or self._parameterNode.inputVolume is None:
            self.setStatus("Select the CT and a segmentation first.")
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(self._parameterNode.inputVolume)

    def exportDatasetDir(self) -> Path:
        """The dataset folder Export writes to (and "Improve the model" trains on)."""
        p = self._parameterNode
        if str(p.datasetFolder or "") in ("", "."):
            raise ValueError("Choose a dataset folder first (Export to nnU-Net dataset).")
        return Path(p.datasetFolder) / f"Dataset{p.datasetId:03d}_{p.datasetName}"

    def onExport(self) -> None:
        p = self._parameterNode
        with self.reportErrors("Export"):
            if not p.caseName:
                raise ValueError("Choose a case name first.")
            datasetDir = self.exportDatasetDir()
            comparison = self.review.comparison
            provenance = {"model": self.ui.modelComboBox.currentText, "fill_threshold_hu": p.fillThresholdHU,
                          "draft_vs_fill": comparison.agreement.as_dict() if comparison is not None else None}
            result = self.logic.export(p.exportSegmentation, p.inputVolume, datasetDir, p.caseName, p.testSplit,
                                       provenance, p.replace)
            self.setStatus(f"Exported case '{result.case}' ({result.split}) to {result.dataset_dir}.")

    def onExportSurface(self) -> None:
        path = qt.QFileDialog.getSaveFileName(self.parent, "Surface (LPS)", "", "Surfaces (*.stl *.vtk *.vtp *.obj)",
                                              None, qt.QFileDialog.DontConfirmOverwrite)  # the Replace box decides
        with self.reportErrors("Surface export"):
            if path:
                p = self._parameterNode
                check = self.logic.exportSurface(p.exportSegmentation, p.inputVolume, path, p.replace)
                self.setStatus(f"Saved {Path(path).name}: {check.describe()}.")

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.app.processEvents()

    @contextlib.contextmanager
    def reportErrors(self, what: str) -> Iterator[None]:
        """FemurSegError/ValueError are the user's to fix: show their one line; anything else with details."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - a GUI action must never leave an uncaught exception
            from FemurSegLib.errors import AlreadyExists, FemurSegError

            if isinstance(error, AlreadyExists):  # this panel's advice, not the command line's --replace
                error = FemurSegError(error.advice("check Replace"))
            self.setStatus(f"{what} failed: {error}")
            if isinstance(error, (FemurSegError, ValueError)):
                slicer.util.errorDisplay(str(error), windowTitle=f"FemurSeg: {what}")
            else:
                logging.exception("FemurSeg: %s failed", what)
                slicer.util.errorDisplay(f"{what} failed: {error}", detailedText=traceback.format_exc())


class FemurSegLogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry points; each passes the scene and segmentations logic to FemurSegLib.scene."""
    worker = None  # runner.SegmentationWorker: keeps the model loaded between Segments

    def getParameterNode(self):
        return FemurSegParameterNode(super().getParameterNode())

    @staticmethod
    def missingModules() -> list[str]:
        return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install the pinned packages after asking; PyTorch via the PyTorch Utils extension when present."""
        missing = self.missingModules()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"FemurSeg needs {', '.join(missing)}. Install {', '.join(PINNED_PACKAGES)} now? This downloads "
                "several GB and takes minutes.", "FemurSeg: install Python packages"):
            return False
        if "torch" in missing and importlib.util.find_spec("PyTorchUtils") is not None:
            import PyTorchUtils
            torch, torchvision = (pin.partition("==")[2] for pin in PINNED_PACKAGES[:2])
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=f"=={torch}",
                                                          torchvisionVersionRequirement=f"=={torchvision}")
        slicer.util.pip_install(" ".join(PINNED_PACKAGES))
        slicer.util.infoDisplay("Packages installed. Restart Slicer before segmenting.", "FemurSeg")
        return False

    def segmentBlocking(self, ctNode, model: str | None = None, device: str = "auto", fast: bool = True,
                        progress=None, cancel: threading.Event | None = None):
        """In-process segmentation for scripts and tests (blocks the GUI): (femur node or None, result)."""
        from FemurSegLib import inference, models, scene

        segmenter = inference.Segmenter(models.resolve_model(model).root, inference.InferenceOptions(device, fast))
        return scene.segment_volume_node(slicer.mrmlScene, _segmentations(), ctNode, segmenter, progress, cancel)

    def startSegmentation(self, ctNode, model: str | None, device: str, fast: bool):
        """Segment the CT in the warm worker process (see FemurSegLib.runner); poll the returned job."""
        from FemurSegLib import runner

        self.worker = self.worker or runner.SegmentationWorker(python=shutil.which("PythonSlicer") or sys.executable)
        return self.worker.segment(_scene().sitk_from_volume_node(ctNode), model, device, fast)

    def startFinetune(self, datasetDir: Path, model: str | None, minutes: float, device: str = "auto"):
        """Fine-tune ``model`` on the dataset in a child process (see FemurSegLib.finetune_runner); a request that
        cannot run (too few cases, other labels, a taken name) is refused at once with FemurSegError."""
        from FemurSegLib.finetune_runner import FinetuneProcess

        return FinetuneProcess(datasetDir, model, minutes=minutes, device=device,
                               python=shutil.which("PythonSlicer") or sys.executable)

    def finishSegmentation(self, job, ctNode):
        """The finished job's femurs as segments ("Femur left (nnU-Net)", ...); None if cancelled or none found."""
        if (label := job.result()) is not None:
            return _scene().add_femur_segments(slicer.mrmlScene, _segmentations(), label, ctNode, job.state.femurs)

    def exportSurface(self, segmentationNode, ctNode, path: str, replace: bool = False):
        return _scene().export_segment_surface(slicer.mrmlScene, _segmentations(), segmentationNode, None, ctNode, path,
                                               replace=replace)

    def computeFill(self, ctNode, thresholdHU: float):
        from FemurSegLib.fill import FillParameters

        return _scene().fill_volume_node(slicer.mrmlScene, _segmentations(), ctNode,
                                         FillParameters(threshold_hu=thresholdHU))

    def loadFill(self, path: str, ctNode):
        return _scene().load_fill_label(slicer.mrmlScene, _segmentations(), path, ctNode)

    def compare(self, referenceNode, otherNode, ctNode):
        return _scene().compare_segmentations(slicer.mrmlScene, _segmentations(), referenceNode, otherNode,
                                              ctNode)

    def export(self, segmentationNode, ctNode, datasetDir, case: str, test: bool = False, provenance=None,
               replace: bool = False):
        return _scene().export_segment(slicer.mrmlScene, _segmentations(), segmentationNode, None, ctNode,
                                       datasetDir, case, test=test, replace=replace, provenance=provenance)


def _segmentations():
    return slicer.modules.segmentations.logic()


def _scene():
    """FemurSegLib.scene, imported late: it needs packages that ensureDependencies may still have to install."""
    from FemurSegLib import scene

    return scene


class FemurSegTest(ScriptedLoadableModuleTest):
    """Testing/Python/test_scene.py's flow in desktop Slicer: phantom, segment, fill, compare, export, read back."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_PhantomFlow()

    def test_PhantomFlow(self) -> None:
        import numpy as np
        import SimpleITK as sitk
        from FemurSegLib import metrics, scene
        from FemurSegLib.synthetic import phantom

        self.assertEqual(FemurSegLogic.missingModules(), [], "install FemurSeg's Python packages first")
        logic = FemurSegLogic()
        ct, truth, _shape = phantom.generate_phantom(5)
        ctNode = scene.add_volume_node(slicer.mrmlScene, ct, "FemurPhantom05")
        self.delayDisplay("Segmenting (blocking)")
        nnNode, _result = logic.segmentBlocking(ctNode, device="cpu", fast=True)
        nnArray = slicer.util.arrayFromSegmentBinaryLabelmap(nnNode, nnNode.GetSegmentation().GetNthSegmentID(0),
                                                             ctNode) != 0
        self.assertGreater(metrics.compare_masks(sitk.GetArrayFromImage(truth) != 0, nnArray, (1.0, 1.0, 1.0)).dice,
                           0.5)
        fillNode = logic.computeFill(ctNode, 350.0)
        comparison = logic.compare(nnNode, fillNode, ctNode)
        self.assertEqual(comparison.table_node.GetCellText(0, 0), "Femur")
        datasetDir = Path(tempfile.mkdtemp()) / "Dataset501_FemurSegTest"
        result = logic.export(nnNode, ctNode, datasetDir, "phantom05")
        exported = sitk.GetArrayFromImage(sitk.ReadImage(str(result.label_path)))
        self.assertTrue(np.array_equal(exported != 0, nnArray))
        self.assertEqual(set(np.unique(exported).tolist()), {0, 1})
        shutil.rmtree(datasetDir.parent, ignore_errors=True)
