"""What the FemurSeg panel's buttons do, on the Slicer scene of one trame-slicer app.

Long steps never block the server: segmentation runs in a warm child process (:class:`SegmentationWorker`, the
model stays loaded between Segments) and fine-tuning in another (:class:`FinetuneProcess`), polled by asyncio tasks
that copy their progress into the trame state; fill runs in a worker thread. Scene work (MRML is not thread-safe)
stays on the event loop and goes through :mod:`FemurSegLib.scene`, shared with desktop Slicer. Problems the user can
fix arrive as FemurSegError and are shown in the page as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import slicer
from trame_server import Server
from trame_slicer.app.logic import SegmentEditorLogic
from trame_slicer.core import SlicerApp
from trame_slicer.segmentation import SegmentationOpacityEnum, SegmentationOverwriteMode

from .. import scene
from ..dataset import case_name_from_file
from ..demo import SAMPLE_CT
from ..errors import AlreadyExists, FemurSegError
from ..fill import compute_fill
from ..finetune import summary
from ..finetune_runner import FinetuneProcess
from ..imageio import read_ct
from ..models import list_models
from ..runner import SegmentationJob, SegmentationWorker
from .fe import FEModelCard
from .review import Review
from .safety import check_minutes, check_upload_size, dataset_dir_inside, model_by_name, read_inside, validated_upload

logger = logging.getLogger(__name__)
POLL_S = 0.25


class Workflow:
    """The FemurSeg state of one page: the CT, the drafts on it, and the running segmentation."""

    def __init__(self, server: Server, slicer_app: SlicerApp, editor_logic: SegmentEditorLogic,
                 datasets_root: Path, open_roots: list[Path], max_upload_bytes: int) -> None:
        self.server, self.state = server, server.state
        self.slicer_app = slicer_app
        self.editor_logic = editor_logic
        self.datasets_root = datasets_root
        self.open_roots = open_roots
        self.max_upload_bytes = max_upload_bytes
        self.work_dir = Path(tempfile.mkdtemp(prefix="femurseg-web-"))
        self.ct_image: sitk.Image | None = None
        self.ct_path: Path | None = None
        self.ct_source = ""
        self.seg_logic = slicer_app.segmentations_logic
        self.volume_node: Any = None
        self.drafts: dict[str, Any] = {}  # segment name -> its segmentation node
        self.worker = SegmentationWorker()
        self.process: SegmentationJob | None = None
        self.finetune_process: FinetuneProcess | None = None
        self.state.update({
            "fs_message": "", "fs_message_type": "info", "fs_ct_name": "", "fs_busy": False, "fs_uploading": False,
            "fs_segmenting": False, "fs_progress": 0.0, "fs_stage": "", "fs_case": "case001",
            "fs_segment_items": [], "fs_target_segment": "", "fs_max_upload": max_upload_bytes,
            "fs_datasets_root": str(datasets_root), "fs_open_roots": ", ".join(str(r) for r in open_roots),
            "fs_model_items": [], "fs_model": "", "fs_ft_running": False, "fs_ft_progress": 0.0, "fs_ft_stage": "",
            "fs_ft_result": "",
        })
        self.review = Review(self)
        self.fe = FEModelCard(self)
        self._refresh_models()
        self.server.trigger("fs_upload")(self.upload)
        self.server.trigger("fs_upload_refused")(self.upload_refused)
        self.server.trigger("fs_open_path")(self.open_path)
        self.server.trigger("fs_load_fill_path")(self.load_fill_path)
        self.server.trigger("fs_finetune")(self.finetune)
        self.state.change("fs_target_segment")(self._on_target_segment)
        # Segments added or selected in the Segment Editor show up in (and drive) the panel's segment choice.
        editor = slicer_app.segmentation_editor
        editor.segmentation_modified.connect(self._update_segment_items)
        editor.segmentation_modified.connect(self.review.on_edit)
        editor.active_segment_id_changed.connect(self._on_editor_segment)

    def actions(self) -> dict[str, Callable]:
        """The panel's button callbacks."""
        return {"load_sample": self.load_sample, "segment": self.segment, "cancel": self.cancel,
                "compute_fill": self.compute_fill, "cancel_finetune": self.cancel_finetune}

    def close(self) -> None:
        """Stop a running segmentation or fine-tuning and remove this session's temporary files."""
        self.worker.close()  # cancels a running segmentation
        self.fe.close()  # cancels a running FE build
        if self.finetune_process is not None:
            self.finetune_process.cancel()
            with contextlib.suppress(FemurSegError):
                self.finetune_process.wait_for_completion()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- messages ---------------------------------------------------------------------------------------------

    def say(self, text: str, kind: str = "info") -> None:
        with self.state:
            self.state.fs_message, self.state.fs_message_type = text, kind

    @staticmethod
    def log_action(what: str, details: object = "") -> None:
        """One server-log line per user action, to follow a session afterwards."""
        logger.info("action: %s%s", what, f" {details}" if details != "" else "")

    def guarded(self, what: str, action: Callable[[], Any], details: object = "") -> Any:
        """Log the action and run it; show a FemurSegError (or any other failure) in the page instead of raising.
        What is there already is refused with this page's advice (the Replace box), not the command line's."""
        self.log_action(what, details)
        try:
            return action()
        except AlreadyExists as error:
            self.say(error.advice("tick Replace"), "error")
        except FemurSegError as error:
            self.say(str(error), "error")
        except Exception as error:  # the server must survive any single bad request
            logger.exception("%s failed", what)
            self.say(f"{what} failed unexpectedly: {error}", "error")
        return None

    # -- opening -----------------------------------------------------------------------------------------------

    def load_sample(self) -> None:
        self.guarded("Loading the sample", lambda: self._load_ct(SAMPLE_CT, read_ct(SAMPLE_CT, "sample CT"),
                                                                   SAMPLE_CT.name))

    def open_path(self, text: str) -> None:
        def run() -> None:
            path, image = read_inside(str(text or ""), self.open_roots, "CT", "ct")
            self._load_ct(path, image, path.name)
        self.guarded("Opening the CT", run, text)

    def load_fill_path(self, text: str) -> None:
        def run() -> None:
            path, image = read_inside(str(text or ""), self.open_roots, "fill label", "fill")
            self._show_fill(image, f"Loaded fill label {path.name}")
        self.guarded("Loading the fill", run, text)

    def upload_refused(self, name: str, size: int, _kind: str) -> None:
        self.guarded("Upload", lambda: check_upload_size(str(name), int(size), self.max_upload_bytes))

    def upload(self, file: dict, kind: str) -> None:
        """A file sent by the page: validated in a temporary file before anything is loaded."""
        def run() -> None:
            name = str(file.get("name", "upload"))
            content = file.get("content") or b""
            content = bytes(content) if not isinstance(content, bytes) else content
            path, image = validated_upload(name, content, self.max_upload_bytes, self.work_dir, kind)
            if kind == "ct":
                self._load_ct(path, image, name)
            else:
                path.unlink(missing_ok=True)
                self._show_fill(image, f"Loaded fill label {name}")
        try:
            self.guarded("Upload", run, f"{kind} {file.get('name', '')}")
        finally:
            with self.state:
                self.state.fs_uploading = False

    def _load_ct(self, path: Path, image: sitk.Image, name: str) -> None:
        """Replace the scene with this CT and an empty segmentation to edit by hand."""
        self.cancel()
        self.slicer_app.scene.Clear()
        self.drafts.clear()
        self.review.clear()
        if self.ct_path is not None and self.ct_path != path and self.ct_path.parent == self.work_dir:
            self.ct_path.unlink(missing_ok=True)  # the previous upload is no longer needed
        self.ct_image, self.ct_path, self.ct_source = image, path, name
        self.volume_node = scene.add_volume_node(self.slicer_app.scene, image, name)
        self.editor_logic.on_volume_changed(self.volume_node)
        self._editor_defaults()
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(self.volume_node)
        display.set_node_visible_in_group(self.volume_node, None)
        display.reset_views()
        with self.state:
            self.state.update({"fs_ct_name": name, "fs_progress": 0.0, "fs_case": case_name_from_file(name)})
        self._refresh_segments()
        self.say(f"Loaded {name} ({' x '.join(map(str, image.GetSize()))} voxels).", "success")

    def _editor_defaults(self) -> None:
        # Drafts, comparison segments and corrections overlap: editing one must never erase another.
        editor = self.slicer_app.segmentation_editor
        editor.set_overwrite_mode(SegmentationOverwriteMode.ALLOW_OVERLAP)
        # Show the edited segment in 3D too (trame-slicer's default is 2D only), kept in the editor's state.
        editor.set_surface_representation_enabled(True)
        display = self.editor_logic.data.segment_display
        display.show_3d = True
        # The editor's display panel re-applies its settings to the edited node: they must be the drafts' outlines
        # (scene.show_as_outline), opaque, or every display change would fill them again.
        display.opacity_mode = SegmentationOpacityEnum.OUTLINE
        display.border_thickness.value = scene.OUTLINE_THICKNESS
        display.opacity_2d.value = 1.0

    # -- drafts ------------------------------------------------------------------------------------------------

    def require_ct(self) -> sitk.Image:
        if self.ct_image is None:
            raise FemurSegError("Load a CT first.")
        return self.ct_image

    def _show_fill(self, label: sitk.Image, done: str) -> None:
        """Show a fill and say ``done``: with the comparison when there is an nnU-Net draft, a warning when the
        fill looks wrong (a femur missed, hip bone taken)."""
        self.require_ct()
        self._set_draft(scene.SEGMENT_FILL, scene.add_label_as_segment(
            self.slicer_app.scene, self.seg_logic, label, self.volume_node, scene.SEGMENT_FILL, scene.COLOR_FILL))
        comparison = self.review.comparison
        if comparison is None:
            self.say(f"{done}.", "success")
        else:
            self.say(f"{done}; {comparison.describe()}", "warning" if comparison.warnings else "success")

    def _set_draft(self, segment_name: str, node: Any) -> None:
        """Show a draft node (replacing an older one of its kind), compare when both exist."""
        old = self.drafts.pop(segment_name, None)
        self._remove_nodes([old] if old is not None else [])
        self._remove_empty_segmentations()
        self.drafts[segment_name] = node
        node.CreateClosedSurfaceRepresentation()
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_view()  # frame the new surfaces: the 3D view shows no volume rendering to frame it by
        self.review.compare(jump=True)
        if segment_name == scene.SEGMENT_NNUNET or self.state.fs_target_segment not in self.segments():
            self._edit(node)  # corrections go to nnU-Net's draft; a fill is edited only when the user picks it
            self._refresh_segments(select=f"{node.GetID()}:{node.GetSegmentation().GetNthSegmentID(0)}")
        else:
            self._refresh_segments()
        self.review.update_preview()

    def _remove_nodes(self, nodes: list[Any]) -> None:
        for node in nodes:
            if node is not None and node.GetScene() is self.slicer_app.scene:
                self.slicer_app.scene.RemoveNode(node)

    def _remove_empty_segmentations(self) -> None:
        """Drop the blank node made for hand editing once a draft arrives, unless the user drew in it."""
        for node in list(self.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode")):
            if node.GetSegmentation().GetNumberOfSegments() == 0:
                self.slicer_app.scene.RemoveNode(node)

    def _edit(self, node: Any) -> None:
        """Make ``node`` the one the Segment Editor tools work on."""
        editor = self.slicer_app.segmentation_editor
        if editor.active_segmentation_node is not node:
            editor.set_active_segmentation(node, self.volume_node)
            self._editor_defaults()

    def segments(self) -> dict[str, tuple[Any, str, str]]:
        """Every segment in the scene as ``"nodeID:segmentID" -> (node, segment id, name)``."""
        found = {}
        for node in self.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(index)
                name = segmentation.GetSegment(segment_id).GetName()
                found[f"{node.GetID()}:{segment_id}"] = (node, segment_id, name)
        return found

    def _update_segment_items(self, *_: Any) -> dict[str, tuple[Any, str, str]]:
        segments = self.segments()
        items = [{"title": name, "value": key} for key, (_, _, name) in segments.items()]
        if items != self.state.fs_segment_items:
            with self.state:
                self.state.fs_segment_items = items
        self.review.update_items(segments)
        return segments

    def _on_editor_segment(self, segment_id: str, *_: Any) -> None:
        node = self.slicer_app.segmentation_editor.active_segmentation_node
        if node is not None and segment_id:
            with self.state:
                self.state.fs_target_segment = f"{node.GetID()}:{segment_id}"

    def _refresh_segments(self, select: str | None = None) -> None:
        segments = self._update_segment_items()
        with self.state:
            if select in segments:
                self.state.fs_target_segment = select
            elif self.state.fs_target_segment not in segments:
                self.state.fs_target_segment = next(iter(segments), "")
        self.slicer_app.segmentation_editor.trigger_all_signals()

    def _on_target_segment(self, fs_target_segment: str, **_: Any) -> None:
        """The panel's segment choice drives the Segment Editor: tools act on that segment."""
        node_segment = self.segments().get(fs_target_segment or "")
        if node_segment is None:
            return
        node, segment_id, _ = node_segment
        self._edit(node)
        self.slicer_app.segmentation_editor.set_active_segment_id(segment_id)

    # -- segmentation ------------------------------------------------------------------------------------------

    def segment(self) -> None:
        def run() -> None:
            self.require_ct()
            if self.process is not None:
                raise FemurSegError("A segmentation is already running.")
            self.process = self.worker.segment(self.ct_image, model=model_by_name(self.state.fs_model))
            with self.state:
                self.state.update({"fs_segmenting": True, "fs_progress": 0.0, "fs_stage": "starting"})
            self.say("Segmenting…")
            asyncio.get_event_loop().create_task(self._watch(self.process))
        self.guarded("Segmentation", run)

    async def _watch(self, process: SegmentationJob) -> None:
        """Mirror the child's progress and the time so far into the page until it ends, then show its label."""
        started = time.monotonic()
        while True:
            state = process.poll()
            with self.state:
                self.state.fs_progress = round(100 * state.progress, 1)
                self.state.fs_stage = f"{state.stage}, {time.monotonic() - started:.0f} s"
            if state.finished:
                break
            await asyncio.sleep(POLL_S)
        if self.process is process:
            self.process = None
        with self.state:
            self.state.fs_segmenting = False
        if state.cancelled:
            self.say("Segmentation cancelled.", "warning")
        elif state.error:
            self.say(state.error, "error")
        elif state.output is not None:
            self.guarded("Showing the segmentation", lambda: self._finish_segment(process))

    def _finish_segment(self, process: SegmentationJob) -> None:
        label = process.result()
        self.require_ct()
        node = scene.add_femur_segments(self.slicer_app.scene, self.seg_logic, label, self.volume_node,
                                        process.state.femurs)
        if node is not None:
            self._set_draft(scene.SEGMENT_NNUNET, node)
        comparison = self.review.comparison if node is not None else None
        compared = f" Compared with fill: {comparison.describe()}" if comparison is not None else ""
        found = scene.describe_result(process.state.femurs, process.state.warnings)
        ok = node is not None and not process.state.warnings and not (comparison and comparison.warnings)
        self.say(f"{found}{compared} (model {self.state.fs_model})", "success" if ok else "warning")

    def cancel(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.cancel()

    async def compute_fill(self) -> None:
        self.log_action("Compute fill")
        try:
            ct = self.require_ct()
            with self.state:
                self.state.fs_busy = True
            self.say("Computing fill…")
            label = await asyncio.to_thread(compute_fill, ct)
            if ct is self.ct_image:
                self.guarded("Showing the fill", lambda: self._show_fill(label, "Fill computed"))
        except FemurSegError as error:
            self.say(str(error), "error")
        except Exception as error:
            logger.exception("fill failed")
            self.say(f"Fill failed unexpectedly: {error}", "error")
        finally:
            with self.state:
                self.state.fs_busy = False

    # -- models and fine-tuning ---------------------------------------------------------------------------------

    def _refresh_models(self, select: str | None = None) -> None:
        """The model choice: bundled and installed models, fine-tuned ones with their before/after figures."""
        models = list_models()
        items = [{"title": model.name + (" (bundled)" if model.bundled else "")
                  + (f": {summary(model.card)}" if summary(model.card) else ""), "value": model.name}
                 for model in models]
        with self.state:
            self.state.fs_model_items = items
            names = [model.name for model in models]
            if select in names:
                self.state.fs_model = select
            elif self.state.fs_model not in names:
                self.state.fs_model = names[0] if names else ""

    def finetune(self, dataset_name: str, minutes: str, base: str) -> None:
        """Fine-tune ``base`` on ``datasets_root/dataset_name`` within ``minutes``, in a child process."""
        def run() -> None:
            if self.finetune_process is not None:
                raise FemurSegError("A fine-tuning is already running.")
            dataset_dir = dataset_dir_inside(self.datasets_root, str(dataset_name or ""))
            budget = check_minutes(minutes)
            self.finetune_process = FinetuneProcess(dataset_dir, base=model_by_name(base), minutes=budget)
            job = self.finetune_process.job
            with self.state:
                self.state.update({"fs_ft_running": True, "fs_ft_progress": 0.0, "fs_ft_stage": "starting",
                                   "fs_ft_result": ""})
            self.say(f"Fine-tuning '{job.base.name}' into '{job.name}' on {len(job.training)} training case(s), "
                      f"validating on {len(job.validation)}; about {budget:g} min.")
            asyncio.get_event_loop().create_task(self._watch_finetune(self.finetune_process))
        self.guarded("Fine-tuning", run)

    async def _watch_finetune(self, process: FinetuneProcess) -> None:
        """Mirror the child's progress into the page; when it ends, list the new model and select it."""
        while True:
            state = process.poll()
            with self.state:
                self.state.fs_ft_progress = round(100 * state.progress, 1)
                self.state.fs_ft_stage = state.describe()
            if state.finished:
                break
            await asyncio.sleep(POLL_S)
        if self.finetune_process is process:
            self.finetune_process = None
        if state.model_name:
            self._refresh_models(select=state.model_name)
        with self.state:
            self.state.fs_ft_running = False
            self.state.fs_ft_result = state.describe()
        self.say(state.describe(), "error" if state.error else "warning" if state.cancelled else "success")

    def cancel_finetune(self) -> None:
        if self.finetune_process is not None:
            self.finetune_process.cancel()  # returns at once; the watcher reports the end
