"""The page's review half: the comparison table, the worst places, window presets and the export choice.

Kept apart from workflow.py (opening, segmenting, fine-tuning). Everything shown is computed by
:mod:`FemurSegLib.scene`, as in the Slicer panel; the export target changes only when the user picks another.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import slicer

from .. import scene
from ..errors import FemurSegError
from .safety import SURFACES_FOLDER, check_case_name, check_split, dataset_dir_inside, surface_path_inside

if TYPE_CHECKING:
    from .workflow import Workflow

logger = logging.getLogger(__name__)
DRAFT_PREFIX = "draft:"  # export targets "draft:<segment name>": that draft's femur segments, whichever node holds it
EDIT_SETTLE_S = 0.6  # recompute this long after the last change of a draft: a stroke modifies it many times


class Review:
    """Comparison and export for one page's Workflow (its scene, drafts and state)."""

    def __init__(self, workflow: Workflow) -> None:
        self.workflow, self.state = workflow, workflow.state
        self.comparison: scene.Comparison | None = None
        self._signature: tuple = ()
        self._pending: asyncio.TimerHandle | None = None
        self.state.update({
            "fs_columns": list(scene.COMPARISON_COLUMNS), "fs_rows": [], "fs_comparison_title": scene.COMPARISON_TITLE,
            "fs_comparison_warning": "", "fs_worst_places": [], "fs_legend": scene.legend_html(),
            "fs_export_target": DRAFT_PREFIX + scene.SEGMENT_NNUNET, "fs_export_items": [], "fs_export_preview": "",
            "fs_replace": False,
        })
        server = workflow.server
        server.trigger("fs_export")(self.export)
        server.trigger("fs_export_surface")(self.export_surface)
        server.trigger("fs_jump")(self.jump)
        server.trigger("fs_window")(self.window)
        self.state.change("fs_export_target")(self._on_export_target)

    # -- comparison ---------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """A new CT: nothing compared yet (the scene was cleared with its nodes)."""
        self.comparison, self._signature = None, ()
        with self.state:
            self.state.update({"fs_rows": [], "fs_comparison_warning": "", "fs_worst_places": [],
                               "fs_export_preview": ""})

    def compare(self, jump: bool) -> None:
        """Compare the drafts again (after a new draft or an edit); ``jump`` to the worst slice for a new draft."""
        drafts, app = self.workflow.drafts, self.workflow.slicer_app
        if scene.SEGMENT_NNUNET not in drafts or scene.SEGMENT_FILL not in drafts:
            return
        scene.remove_comparison(app.scene, self.comparison)
        self.comparison = None
        self.comparison = scene.compare_segmentations(app.scene, self.workflow.seg_logic,
                                                      drafts[scene.SEGMENT_NNUNET], drafts[scene.SEGMENT_FILL],
                                                      self.workflow.volume_node)
        self._signature = self._draft_signature()
        places = [{"title": place.describe(), "index": index}
                  for index, place in enumerate(self.comparison.worst_places)]
        with self.state:
            self.state.fs_rows = [list(row.cells()) for row in self.comparison.rows]
            self.state.fs_comparison_warning = "; ".join(self.comparison.warnings)
            self.state.fs_worst_places = places
        if jump and places:
            self.jump(0)

    def jump(self, index: int) -> None:
        """Show the ``index``-th worst place in every slice view."""
        def run() -> None:
            places = self.comparison.worst_places if self.comparison is not None else ()
            if not 0 <= int(index) < len(places):
                raise FemurSegError("Compare nnU-Net and fill first (Segment and Compute fill).")
            place = places[int(index)]
            slicer.vtkMRMLSliceNode.JumpAllSlices(self.workflow.slicer_app.scene, *place.ras,
                                                  slicer.vtkMRMLSliceNode.CenteredJumpSlice)
            self.workflow.say(f"Showing {place.describe()}.")
        self.workflow.guarded("Jump to worst slice", run)

    def window(self, preset: str) -> None:
        self.workflow.guarded(f"Window {preset}",
                              lambda: scene.apply_window(self.workflow.volume_node, str(preset)))

    def on_edit(self, *_: Any) -> None:
        """A draft changed (a stroke, undo, islands...): recompute table and preview once the edit settles."""
        if self._pending is not None:
            self._pending.cancel()
        self._pending = asyncio.get_event_loop().call_later(EDIT_SETTLE_S, self._after_edit)

    def _after_edit(self) -> None:
        self._pending = None
        if self.comparison is not None and self._draft_signature() != self._signature:
            self.workflow.guarded("Comparing again", lambda: self.compare(jump=False))
        self.update_preview()

    def _draft_signature(self) -> tuple:
        """When the drafts' voxels last changed (their binary labelmaps' modification times)."""
        name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        times = []
        for node in self.workflow.drafts.values():
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                representation = segmentation.GetNthSegment(index).GetRepresentation(name)
                times.append(representation.GetMTime() if representation is not None else 0)
        return tuple(times)

    # -- the export choice --------------------------------------------------------------------------------------

    def update_items(self, segments: dict[str, tuple[Any, str, str]]) -> None:
        """The export choice: each draft's femur segments together, then every single segment."""
        items = [{"title": "nnU-Net draft: all femurs (both sides of a bilateral CT)",
                  "value": DRAFT_PREFIX + scene.SEGMENT_NNUNET},
                 {"title": "fill draft", "value": DRAFT_PREFIX + scene.SEGMENT_FILL}]
        items += [{"title": f"segment '{name}' only", "value": key} for key, (_, _, name) in segments.items()]
        if items != self.state.fs_export_items:
            with self.state:
                self.state.fs_export_items = items

    def target(self, key: str) -> tuple[Any, str | None, str]:
        """(node, segment id or None for its femur segments, words) of an export choice; refused when it is gone."""
        if key.startswith(DRAFT_PREFIX):
            draft = key.removeprefix(DRAFT_PREFIX)
            node = self.workflow.drafts.get(draft)
            if node is None:
                kind = "nnU-Net" if draft == scene.SEGMENT_NNUNET else "fill"
                raise FemurSegError(f"There is no {kind} draft yet to export: "
                                    f"{'Segment' if kind == 'nnU-Net' else 'Compute fill'} first, or choose another "
                                    "segment under 'Export'.")
            return node, None, f"the {'nnU-Net' if draft == scene.SEGMENT_NNUNET else 'fill'} draft"
        found = self.workflow.segments().get(key)
        if found is None:
            raise FemurSegError("The segment chosen under 'Export' is gone; choose what to export.")
        node, segment_id, name = found
        return node, segment_id, f"'{name}'"

    def _on_export_target(self, **_: Any) -> None:
        self.workflow.log_action("export choice", self.state.fs_export_target)
        self.update_preview()

    def update_preview(self) -> None:
        """Say what the label would hold now (or why there is nothing to export)."""
        if self.workflow.volume_node is None:
            return
        try:
            node, segment_id, _ = self.target(str(self.state.fs_export_target or ""))
            text = scene.describe_export(self.workflow.slicer_app.scene, self.workflow.seg_logic, node, segment_id,
                                         self.workflow.volume_node)
        except FemurSegError as error:
            text = str(error)
        with self.state:
            self.state.fs_export_preview = text

    # -- writing ------------------------------------------------------------------------------------------------

    def export(self, dataset_name: str, case_name: str, split: str, target_key: str, replace: bool) -> None:
        """Export the chosen segments with the CT as a case of ``datasets_root/dataset_name``."""
        def run() -> None:
            workflow = self.workflow
            workflow.require_ct()
            dataset_dir = dataset_dir_inside(workflow.datasets_root, str(dataset_name or ""))
            case = check_case_name(str(case_name or ""))
            node, segment_id, words = self.target(str(target_key or ""))
            provenance = {"source": "femurseg web", "ct": workflow.ct_source, "exported": words}
            if self.comparison is not None:
                provenance["fill_vs_nnunet"] = self.comparison.agreement.as_dict()
            result = scene.export_segment(workflow.slicer_app.scene, workflow.seg_logic, node, segment_id,
                                          workflow.volume_node, dataset_dir, case, test=check_split(split) == "test",
                                          replace=bool(replace), provenance=provenance)
            replaced = " (the old files are in femurseg/replaced/)" if result.replaced_dir else ""
            workflow.say(f"Exported {words} as case {result.case} ({result.split}) to {result.dataset_dir.name}: "
                         f"{result.image_path.name}, {result.label_path.name}; numTraining {result.num_training}"
                         f"{replaced}.", "success")
            with self.state:
                self.state.fs_ft_dataset = result.dataset_dir.name  # "Improve the model" uses what Export wrote
        self.workflow.guarded("Export", run, f"{dataset_name}/{case_name} ({split}) {target_key} replace={replace}")

    def export_surface(self, case_name: str, file_format: str, target_key: str, replace: bool) -> None:
        """The chosen segments' watertight surface (LPS, as ``femurseg surface``) into ``datasets_root/Surfaces``."""
        def run() -> None:
            workflow = self.workflow
            workflow.require_ct()
            path = surface_path_inside(workflow.datasets_root, str(case_name or ""), str(file_format or ""))
            node, segment_id, words = self.target(str(target_key or ""))
            check = scene.export_segment_surface(workflow.slicer_app.scene, workflow.seg_logic, node, segment_id,
                                                 workflow.volume_node, path, replace=bool(replace))
            workflow.say(f"Saved the surface of {words} as {SURFACES_FOLDER}/{path.name}: {check.describe()}.",
                         "warning" if check.problems() else "success")
        self.workflow.guarded("Surface export", run, f"{case_name}.{file_format} {target_key} replace={replace}")
