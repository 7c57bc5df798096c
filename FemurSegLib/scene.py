"""MRML scene glue: volumes, segmentations and tables <-> SimpleITK images and FemurSegLib's algorithms.

Qt-free on purpose: every function takes the MRML scene and the segmentations module logic as arguments, so
desktop Slicer passes ``slicer.mrmlScene`` / ``slicer.modules.segmentations.logic()`` and tests pass a
trame-slicer ``SlicerApp``'s (DESIGN.md §5). Nothing here imports qt, ctk, ``slicer.app`` or ``slicer.modules``.

Geometry: a volume node's IJK->RAS (spacing, origin, directions) equals SimpleITK's geometry with the LPS->RAS
flip of the first two axes. Every failure raises FemurSegError and leaves the scene as it was: nodes are removed
again when a later step fails, and helper nodes that Slicer's logic needs in the scene are always removed.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
from scipy import ndimage
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from . import dataset, metrics, surface
from .errors import AlreadyExists, FemurSegError
from .fill import FillParameters, compute_fill
from .imageio import check_ct, check_volume, label_image_like, mask_array, read_label, require_same_grid
from .iopolicy import read_bytes
from .inference import femur_sides

SEGMENT_NNUNET = "Femur (nnU-Net)"
SEGMENT_FILL = "Femur (fill)"
SEGMENT_NNUNET_ONLY = "nnU-Net only"
SEGMENT_FILL_ONLY = "fill only"
# The review colours, defined here once for the Slicer panel and the browser page (README "Colours"): far apart in
# hue, so each reads on a grey CT; the drafts are drawn as outlines, their disagreement filled on top of them.
COLOR_NNUNET_LEFT = (1.0, 0.85, 0.1)  # yellow; also a femur whose side cannot be told
COLOR_NNUNET_RIGHT = (0.15, 0.85, 0.35)  # green
COLOR_NNUNET = COLOR_NNUNET_LEFT
COLOR_FILL = (0.25, 0.55, 1.0)  # blue
COLOR_NNUNET_ONLY = (1.0, 0.45, 0.0)  # orange
COLOR_FILL_ONLY = (0.9, 0.15, 0.9)  # magenta
NNUNET_COLORS = {"left": COLOR_NNUNET_LEFT, "right": COLOR_NNUNET_RIGHT}
LEGEND = (("nnU-Net, left femur (or side unknown)", COLOR_NNUNET_LEFT, "outline"),
          ("nnU-Net, right femur", COLOR_NNUNET_RIGHT, "outline"), ("fill", COLOR_FILL, "outline"),
          (SEGMENT_NNUNET_ONLY, COLOR_NNUNET_ONLY, "filled"), (SEGMENT_FILL_ONLY, COLOR_FILL_ONLY, "filled"))
OUTLINE_THICKNESS = 3  # pixels: a 1-pixel outline is lost on a high-resolution screen
WINDOW_PRESETS = {"bone": (1000.0, 400.0), "soft tissue": (400.0, 40.0)}  # (window, level) in HU, Slicer's CT presets
COMPARISON_TITLE = "fill vs nnU-Net (reference: nnU-Net)"
COMPARISON_COLUMNS = ("Femur", "Dice", "ASD mm", "HD95 mm", "nnU-Net ml", "fill ml", "fill − nnU-Net ml",
                      "fill − nnU-Net %")

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
LATERALITY_CODES = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class FemurComparison:
    """One row of the comparison table: one femur (or all together), fill against the nnU-Net reference."""

    femur: str  # "Femur left", "Femur right", "Femur" (side unknown) or "Both femurs"
    agreement: metrics.Agreement

    def cells(self) -> tuple[str, ...]:
        """The row as COMPARISON_COLUMNS shows it: ml to one decimal, differences signed, "–" where undefined."""
        a = self.agreement
        percent = 100.0 * a.volume_difference_ml / a.volume_ml_reference if a.volume_ml_reference else float("nan")
        return (self.femur, _number(a.dice, ".3f"), _number(a.asd_mm, ".2f"), _number(a.hd95_mm, ".1f"),
                _number(a.volume_ml_reference, ".1f"), _number(a.volume_ml_other, ".1f"),
                _number(a.volume_difference_ml, "+.1f"), _number(percent, "+.1f"))


@dataclass(frozen=True)
class WorstPlace:
    """An axial slice where fill and nnU-Net disagree most, for the "Jump to worst slice" list."""

    slice_index: int  # K index (slowest image axis)
    disagreement_ml: float  # the disagreeing volume in that slice
    ras: tuple[float, float, float]  # centre of that slice, for JumpAllSlices

    def describe(self) -> str:
        return f"slice {self.slice_index}: {self.disagreement_ml:.1f} ml disagree"


@dataclass(frozen=True)
class Comparison:
    """What compare_segmentations made: the table, the disagreement segments, the worst places and what looks
    wrong with the fill, for both GUIs to show the same way."""

    table_node: Any  # vtkMRMLTableNode: COMPARISON_COLUMNS, one row per entry of ``rows``
    disagreement_node: Any  # vtkMRMLSegmentationNode with "nnU-Net only" and "fill only"
    rows: tuple[FemurComparison, ...]  # per femur, then "Both femurs" when there are two
    agreement: metrics.Agreement  # all femurs together (for provenance)
    worst_places: tuple[WorstPlace, ...]  # most disagreement first; empty when fill and nnU-Net agree everywhere
    warnings: tuple[str, ...]  # an implausible fill (a femur missed, hip bone taken), in words

    def describe(self) -> str:
        """The status line: Dice per femur, which is the reference, and every warning."""
        dice = ", ".join(f"{row.femur} {row.agreement.dice:.3f}" for row in self.rows)
        text = f"Dice, {COMPARISON_TITLE}: {dice}."
        return text + (f" Warning: {'; '.join(self.warnings)}." if self.warnings else "")


def _number(value: float, spec: str) -> str:
    return "–" if not np.isfinite(value) else format(value, spec)


# --- volumes <-> SimpleITK ------------------------------------------------------------------------------------

def sitk_from_volume_node(volume_node: Any, what: str | None = None) -> sitk.Image:
    """The volume's voxels and geometry as a SimpleITK image (LPS); refuses what FemurSeg cannot segment."""
    if volume_node is None:
        raise FemurSegError("No CT volume is selected; load a CT (File > Add Data) and select it as input.")
    what = what or f"Volume '{volume_node.GetName()}'"
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise FemurSegError(
            f"{what} is a label map, not a CT; select the CT volume as input (load label files as segmentations)."
        )
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLVectorVolumeNode"):
        raise FemurSegError(f"{what} is a {volume_node.GetClassName()}; a single-channel CT volume is needed.")
    return _sitk_from_image_node(volume_node, what)


def _sitk_from_image_node(volume_node: Any, what: str) -> sitk.Image:
    if volume_node.GetParentTransformNode() is not None:
        raise FemurSegError(
            f"{what} is under transform '{volume_node.GetParentTransformNode().GetName()}'; harden the transform "
            "(Data module: right-click > Harden transform) so the segmentation matches what you see."
        )
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise FemurSegError(f"{what} holds no voxels; load the CT again.")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise FemurSegError(f"{what} has {components} components per voxel; a single-channel CT volume is needed.")
    columns, rows, slices = image_data.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(slices, rows, columns)
    image = sitk.GetImageFromArray(voxels.copy())
    image.SetSpacing(volume_node.GetSpacing())
    image.SetOrigin(tuple(LPS_TO_RAS @ np.array(volume_node.GetOrigin())))
    directions = vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(directions)
    ras = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    image.SetDirection(tuple((LPS_TO_RAS @ ras).ravel()))
    check_volume(image, what)
    return image


def _fill_image_node(node: Any, image: sitk.Image) -> Any:
    """Give ``node`` the voxels and geometry of ``image`` (inverse of _sitk_from_image_node)."""
    voxels = sitk.GetArrayFromImage(image)
    image_data = vtkImageData()
    image_data.SetDimensions(*image.GetSize())
    vtk_array = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image_data)
    node.SetSpacing(image.GetSpacing())
    node.SetOrigin(tuple(LPS_TO_RAS @ np.array(image.GetOrigin())))
    ras = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    directions = vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            directions.SetElement(r, c, ras[r, c])
    node.SetIJKToRASDirectionMatrix(directions)
    return node


def add_volume_node(scene: Any, image: sitk.Image, name: str) -> Any:
    """Add a scalar volume node holding ``image`` (e.g. a CT read with imageio.read_image)."""
    check_volume(image, f"Image '{name}'")
    node = _fill_image_node(slicer.vtkMRMLScalarVolumeNode(), image)
    node.SetName(name)
    with _removed_on_failure(scene, node):
        node.CreateDefaultDisplayNodes()
    return node


# --- segmentations --------------------------------------------------------------------------------------------

def femur_terminology(laterality: str | None) -> str:
    """Serialized SNOMED CT terminology entry for the femur (71341001), with laterality when known."""
    modifier = LATERALITY_CODES.get(laterality or "", ("", ""))
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, "123037004", "SCT", "Anatomical Structure", "71341001", "SCT", "Bone structure of femur",
        modifier[0], "SCT" if modifier[0] else "", modifier[1], "", "", "", "", "", "", "")


def detect_laterality(label: sitk.Image, ct: sitk.Image) -> str | None:
    """'left'/'right' of a one-femur label by the rule the segmentation uses (inference.femur_sides), else None."""
    mask = mask_array(label)
    if not mask.any():
        return None
    side = femur_sides([mask], label)[0]
    return side if side in LATERALITY_CODES else None


def femur_segment_name(side: str) -> str:
    """'Femur left (nnU-Net)' / 'Femur right (nnU-Net)'; SEGMENT_NNUNET when the side could not be told."""
    return f"Femur {side} (nnU-Net)" if side in LATERALITY_CODES else SEGMENT_NNUNET


def add_femur_segments(scene: Any, seg_logic: Any, label: sitk.Image, ct_volume_node: Any,
                       femurs: Sequence[Any]) -> Any | None:
    """The segmentation result as one node with a segment per femur (``inference.Femur``: side, label value),
    each with its SNOMED laterality; None when no femur was found (nothing is added)."""
    if not femurs:
        return None
    ct = sitk_from_volume_node(ct_volume_node)
    require_same_grid(ct, label, f"the CT '{ct_volume_node.GetName()}'", "the nnU-Net label")
    values = sitk.GetArrayViewFromImage(label)
    segmentation_node = slicer.vtkMRMLSegmentationNode()
    segmentation_node.SetName(f"{ct_volume_node.GetName()} {SEGMENT_NNUNET}")
    with _removed_on_failure(scene, segmentation_node):
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_volume_node)
        for femur in femurs:
            segment = _import_mask(seg_logic, segmentation_node, values == femur.value, ct,
                                   femur_segment_name(femur.side), NNUNET_COLORS.get(femur.side, COLOR_NNUNET))
            segment.SetTerminology(femur_terminology(femur.side if femur.side in LATERALITY_CODES else None))
        show_as_outline(segmentation_node)
    return segmentation_node


def show_as_outline(segmentation_node: Any) -> None:
    """Draw a draft as a thick outline in the slice views, so the drafts and their disagreement all stay visible."""
    display = segmentation_node.GetDisplayNode()
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(OUTLINE_THICKNESS)


def legend_html() -> str:
    """The legend both GUIs show beside the views (a Qt label and the page read the same HTML)."""
    swatch = ('<span style="display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle;'
              '{}"></span>{}')
    entries = []
    for label, color, style in LEGEND:
        rgb = "rgb({},{},{})".format(*(round(255 * c) for c in color))
        css = f"border:3px solid {rgb};" if style == "outline" else f"background:{rgb};"
        entries.append(swatch.format(css, f"{label} ({style})"))
    return "".join(entries)


def apply_window(volume_node: Any, preset: str) -> None:
    """Show the CT with a WINDOW_PRESETS window (e.g. "bone"), instead of the automatic one."""
    if preset not in WINDOW_PRESETS:
        raise FemurSegError(f"Window preset '{preset}' is not one of {', '.join(WINDOW_PRESETS)}.")
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None:
        raise FemurSegError("Load a CT first.")
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*WINDOW_PRESETS[preset])


def describe_result(femurs: Sequence[Any], warnings: Sequence[str]) -> str:
    """One status line for the GUIs: what was found, and every plausibility warning (guard.py)."""
    found = ", ".join(f"{femur_segment_name(f.side).removesuffix(' (nnU-Net)')} {f.volume_ml:.0f} ml" for f in femurs)
    others = [warning for warning in warnings if femurs or warning != "no femur found"]
    text = f"Found {found}." if femurs else "No femur found."
    return text + (f" Warning: {'; '.join(others)}." if others else "")


def add_label_as_segment(scene: Any, seg_logic: Any, label: sitk.Image, ct_volume_node: Any,
                         name: str = SEGMENT_NNUNET, color: Sequence[float] = COLOR_NNUNET,
                         laterality: str | None = "auto", node_name: str | None = None) -> Any:
    """A new segmentation node (CT as reference geometry) with one femur segment from a 0/non-0 label.

    ``laterality``: 'left', 'right', None (unknown) or 'auto' (detect_laterality).
    """
    ct = sitk_from_volume_node(ct_volume_node)
    require_same_grid(ct, label, f"the CT '{ct_volume_node.GetName()}'", f"the {name} label")
    if not mask_array(label).any():
        raise FemurSegError(f"The {name} label is empty (no femur voxels); check the input CT and the settings.")
    if laterality == "auto":
        laterality = detect_laterality(label, ct)
    if laterality not in (None, "left", "right"):
        raise FemurSegError(f"Laterality '{laterality}' is not one of left, right, auto or none.")
    segmentation_node = slicer.vtkMRMLSegmentationNode()
    segmentation_node.SetName(node_name or f"{ct_volume_node.GetName()} {name}")
    with _removed_on_failure(scene, segmentation_node):
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_volume_node)
        segment = _import_mask(seg_logic, segmentation_node, mask_array(label), ct, name, color)
        segment.SetTerminology(femur_terminology(laterality))
        show_as_outline(segmentation_node)
    return segmentation_node


def _import_mask(seg_logic: Any, segmentation_node: Any, mask: np.ndarray, ct: sitk.Image, name: str,
                 color: Sequence[float]) -> Any:
    """Add one segment from a boolean (z, y, x) mask on the CT grid; an empty mask gives an empty segment."""
    segmentation = segmentation_node.GetSegmentation()
    if not mask.any():
        segment_id = segmentation.AddEmptySegment("", name, list(color))
        return segmentation.GetSegment(segment_id)
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.CopyInformation(ct)
    labelmap_node = _fill_image_node(slicer.vtkMRMLLabelMapVolumeNode(), label)
    before = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
    if not seg_logic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node, ""):
        raise FemurSegError(f"Slicer could not import the {name} label into a segmentation.")
    added = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
             if segmentation.GetNthSegmentID(i) not in before]
    if len(added) != 1:
        raise FemurSegError(f"Importing the {name} label gave {len(added)} segments instead of one.")
    segment = segmentation.GetSegment(added[0])
    segment.SetName(name)
    segment.SetColor(*color)
    return segment


def segment_to_sitk(scene: Any, seg_logic: Any, segmentation_node: Any, segment_id: str | None,
                    ct_volume_node: Any, value: int = 1) -> sitk.Image:
    """One segment as a uint8 label (0 / ``value``) on exactly the CT's grid.

    Uses ExportSegmentsToLabelmapNode with a colour table that maps the segment's *name* to ``value``, so the
    value never depends on segment order. The temporary nodes Slicer needs in the scene are removed again.
    """
    ct = sitk_from_volume_node(ct_volume_node)
    segment_id = _single_segment_id(segmentation_node, segment_id)
    segment_name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
    colors = slicer.vtkMRMLColorTableNode()
    colors.SetTypeToUser()
    colors.SetNumberOfColors(value + 1)
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    colors.SetColor(value, segment_name, 1.0, 1.0, 1.0, 1.0)
    labelmap_node = slicer.vtkMRMLLabelMapVolumeNode()
    segment_ids = vtkStringArray()
    segment_ids.InsertNextValue(segment_id)
    nodes_before = _node_ids(scene)
    scene.AddNode(labelmap_node)
    try:
        exported = seg_logic.ExportSegmentsToLabelmapNode(
            segmentation_node, segment_ids, labelmap_node, ct_volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
        if not exported or labelmap_node.GetImageData() is None:
            raise FemurSegError(f"Slicer could not export segment '{segment_name}' to a label map.")
        label = _sitk_from_image_node(labelmap_node, f"Segment '{segment_name}'")
    finally:  # the label map and whatever the export added for it (display node, colour table copy)
        for node_id in _node_ids(scene) - nodes_before:
            if scene.GetNodeByID(node_id) is not None:
                scene.RemoveNode(scene.GetNodeByID(node_id))
    require_same_grid(ct, label, "the CT", f"segment '{segment_name}'")
    values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
    if not values <= {0, value}:
        raise FemurSegError(f"Segment '{segment_name}' exported with values {sorted(values)} instead of 0/{value}.")
    label = sitk.Cast(label, sitk.sitkUInt8)
    label.CopyInformation(ct)
    return label


def _single_segment_id(segmentation_node: Any, segment_id: str | None) -> str:
    if segmentation_node is None:
        raise FemurSegError("No segmentation is selected; segment, compute fill or load a result first.")
    segmentation = segmentation_node.GetSegmentation()
    if segment_id:
        if segmentation.GetSegment(segment_id) is None:
            raise FemurSegError(f"Segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'.")
        return segment_id
    if segmentation.GetNumberOfSegments() != 1:
        raise FemurSegError(
            f"Segmentation '{segmentation_node.GetName()}' has {segmentation.GetNumberOfSegments()} segments; "
            "select the femur segment to use."
        )
    return segmentation.GetNthSegmentID(0)


# --- the module's actions -------------------------------------------------------------------------------------

def segment_volume_node(scene: Any, seg_logic: Any, ct_volume_node: Any, segmenter: Any,
                        progress: ProgressCallback | None = None,
                        cancel: threading.Event | None = None) -> tuple[Any | None, Any]:
    """Run ``segmenter`` (inference.Segmenter) on the CT node: (the node add_femur_segments made, or None when no
    femur was found; the SegmentationResult with its warnings). Cancel adds nothing."""
    ct = sitk_from_volume_node(ct_volume_node)
    check_ct(ct, f"Volume '{ct_volume_node.GetName()}'")
    result = segmenter.run(ct, progress=progress, cancel=cancel)
    return add_femur_segments(scene, seg_logic, result.label, ct_volume_node, result.femurs), result


def fill_volume_node(scene: Any, seg_logic: Any, ct_volume_node: Any,
                     parameters: FillParameters | None = None, laterality: str | None = "auto") -> Any:
    """The fill baseline on the CT node; adds "Femur (fill)"."""
    ct = sitk_from_volume_node(ct_volume_node)
    check_ct(ct, f"Volume '{ct_volume_node.GetName()}'")
    label = compute_fill(ct, parameters or FillParameters())
    return add_label_as_segment(scene, seg_logic, label, ct_volume_node, SEGMENT_FILL, COLOR_FILL, laterality)


def load_fill_label(scene: Any, seg_logic: Any, path: str | os.PathLike, ct_volume_node: Any,
                    laterality: str | None = "auto") -> Any:
    """A fill result made elsewhere (e.g. medtool) as "Femur (fill)"; non-zero voxels are femur.

    Not resampled: a label on another grid than the CT is refused, since resampling would change the result.
    """
    label = read_label(path, "Fill label")
    return add_label_as_segment(scene, seg_logic, label, ct_volume_node, SEGMENT_FILL, COLOR_FILL, laterality)


def compare_segmentations(scene: Any, seg_logic: Any, reference_seg_node: Any, other_seg_node: Any,
                          ct_volume_node: Any, reference_segment_id: str | None = None,
                          other_segment_id: str | None = None) -> Comparison:
    """Fill (``other``) against nnU-Net (``reference``): a table row per reference femur segment (the fill split
    between them by the nearer femur) and one for both, "nnU-Net only"/"fill only" segments, the worst axial slices
    and warnings for an implausible fill. Both GUIs call it again after every edit of either draft."""
    ct = sitk_from_volume_node(ct_volume_node)
    segmentation = reference_seg_node.GetSegmentation() if reference_seg_node is not None else None
    femurs = [(segmentation.GetSegment(i).GetName().removesuffix(" (nnU-Net)"),
               mask_array(segment_to_sitk(scene, seg_logic, reference_seg_node, i, ct_volume_node)))
              for i in femur_segment_ids(reference_seg_node, reference_segment_id)]
    reference_mask = np.logical_or.reduce([mask for _, mask in femurs])
    other_mask = _femur_mask(scene, seg_logic, other_seg_node, other_segment_id, ct_volume_node)
    spacing_zyx = tuple(float(v) for v in reversed(ct.GetSpacing()))
    agreement = metrics.compare_masks(reference_mask, other_mask, spacing_zyx)
    parts = _split_by_nearest(other_mask, [mask for _, mask in femurs], ct)
    rows = [FemurComparison(name, _agreement_or_missed(mask, part, spacing_zyx))
            for (name, mask), part in zip(femurs, parts)]
    if len(rows) > 1:
        rows.append(FemurComparison("Both femurs", agreement))
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    places = tuple(WorstPlace(index, count * voxel_ml, _slice_centre_ras(ct, index))
                   for index, count in metrics.worst_slices(reference_mask, other_mask))

    table_node = slicer.vtkMRMLTableNode()
    table_node.SetName(f"{other_seg_node.GetName()} vs {reference_seg_node.GetName()} (reference)")
    for title in COMPARISON_COLUMNS:
        column = vtkStringArray()
        column.SetName(title)
        table_node.AddColumn(column)
    for row in rows:
        index = table_node.AddEmptyRow()
        for column, text in enumerate(row.cells()):
            table_node.SetCellText(index, column, text)

    disagreement_node = slicer.vtkMRMLSegmentationNode()
    disagreement_node.SetName(f"{ct_volume_node.GetName()} disagreement")
    with _removed_on_failure(scene, disagreement_node):
        disagreement_node.CreateDefaultDisplayNodes()
        disagreement_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_volume_node)
        _import_mask(seg_logic, disagreement_node, reference_mask & ~other_mask, ct, SEGMENT_NNUNET_ONLY,
                     COLOR_NNUNET_ONLY)
        _import_mask(seg_logic, disagreement_node, other_mask & ~reference_mask, ct, SEGMENT_FILL_ONLY,
                     COLOR_FILL_ONLY)
        disagreement_node.GetDisplayNode().SetOpacity2DFill(0.7)
        scene.AddNode(table_node)
    warnings = fill_warnings(rows[:len(femurs)], [mask for _, mask in femurs], other_mask)
    return Comparison(table_node, disagreement_node, tuple(rows), agreement, places, tuple(warnings))


def remove_comparison(scene: Any, comparison: Comparison | None) -> None:
    """Take an earlier comparison's table and disagreement segments out of the scene (before comparing again)."""
    if comparison is not None:
        for node in (comparison.table_node, comparison.disagreement_node):
            _remove_node(scene, node)


def fill_warnings(rows: Sequence[FemurComparison], femur_masks: Sequence[np.ndarray],
                  fill_mask: np.ndarray) -> list[str]:
    """What makes a fill implausible as a femur segmentation, judged against nnU-Net's femurs (one row each):
    a femur it mostly misses, much more bone than the femur (hip bone, potting), one piece spanning two femurs."""
    found = []
    for row in rows:
        a = row.agreement
        if a.sensitivity < 0.5:
            found.append(f"the fill misses {100 * (1 - a.sensitivity):.0f}% of {row.femur} (nnU-Net)")
        elif a.volume_ml_other > 1.3 * a.volume_ml_reference:
            found.append(f"the fill has {100 * (a.volume_ml_other / a.volume_ml_reference - 1):.0f}% more volume "
                         f"than {row.femur} (nnU-Net): hip bone or potting?")
        elif a.dice < 0.7:
            found.append(f"fill and nnU-Net disagree on {row.femur} (Dice {a.dice:.2f})")
    if len(femur_masks) > 1:
        pieces, _ = ndimage.label(fill_mask, structure=np.ones((3, 3, 3), dtype=bool))
        touched = [set(np.unique(pieces[mask]).tolist()) - {0} for mask in femur_masks]
        if set.intersection(*touched):
            found.append("the fill is one piece joining both femurs (through the hip bone?)")
    return found


def _agreement_or_missed(reference: np.ndarray, other: np.ndarray, spacing_zyx: tuple[float, ...]) -> metrics.Agreement:
    """compare_masks, or for a femur the fill has no voxel of: the agreement of missing it (Dice 0)."""
    if other.any():
        return metrics.compare_masks(reference, other, spacing_zyx)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    return metrics.Agreement(dice=0.0, sensitivity=0.0, specificity=1.0, asd_mm=float("nan"), hd95_mm=float("nan"),
                             volume_ml_reference=np.count_nonzero(reference) * voxel_ml, volume_ml_other=0.0)


def _split_by_nearest(mask: np.ndarray, femur_masks: Sequence[np.ndarray], ct: sitk.Image) -> list[np.ndarray]:
    """``mask`` cut into one part per femur: each voxel goes to the femur whose centroid is nearest (in mm)."""
    if len(femur_masks) == 1:
        return [mask]
    to_mm = np.array(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing())

    def millimetres(indices_zyx: np.ndarray) -> np.ndarray:
        return indices_zyx[:, ::-1].astype(float) @ to_mm.T

    centroids = np.array([millimetres(np.argwhere(m)).mean(axis=0) for m in femur_masks])
    voxels = np.argwhere(mask)
    nearest = np.argmin(np.linalg.norm(millimetres(voxels)[:, None, :] - centroids[None], axis=2), axis=1)
    parts = []
    for index in range(len(femur_masks)):
        part = np.zeros_like(mask)
        part[tuple(voxels[nearest == index].T)] = True
        parts.append(part)
    return parts


def _slice_centre_ras(ct: sitk.Image, k: int) -> tuple[float, float, float]:
    centre = ((ct.GetSize()[0] - 1) / 2.0, (ct.GetSize()[1] - 1) / 2.0, float(k))
    return tuple(float(v) for v in LPS_TO_RAS @ np.array(ct.TransformContinuousIndexToPhysicalPoint(centre)))


def _femur_mask(scene: Any, seg_logic: Any, segmentation_node: Any, segment_id: str | None,
                ct_volume_node: Any) -> np.ndarray:
    return mask_array(femur_label(scene, seg_logic, segmentation_node, segment_id, ct_volume_node))


def femur_segment_ids(segmentation_node: Any, segment_id: str | None) -> list[str]:
    """The chosen segment; with none chosen, the node's only segment, or its femur segments (SNOMED CT femur)
    together: a bilateral CT's "Femur left" and "Femur right" are both femur, as in the training data. A node of
    several segments none of which is a femur needs a choice."""
    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    if segment_id is not None or segmentation is None or segmentation.GetNumberOfSegments() < 2:
        return [_single_segment_id(segmentation_node, segment_id)]
    femurs = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
              if "^71341001^" in segmentation.GetNthSegment(i).GetTerminology()]
    return femurs or [_single_segment_id(segmentation_node, None)]  # the latter raises: which one is the femur?


def femur_label(scene: Any, seg_logic: Any, segmentation_node: Any, segment_id: str | None, ct_volume_node: Any,
                value: int = 1) -> sitk.Image:
    """The segments of ``femur_segment_ids`` as one 0 / ``value`` label on the CT's grid."""
    ids = femur_segment_ids(segmentation_node, segment_id)
    if len(ids) == 1:
        return segment_to_sitk(scene, seg_logic, segmentation_node, ids[0], ct_volume_node, value)
    masks = [mask_array(segment_to_sitk(scene, seg_logic, segmentation_node, i, ct_volume_node)) for i in ids]
    return label_image_like(np.logical_or.reduce(masks), sitk_from_volume_node(ct_volume_node), value)


def dataset_femur_value(dataset_dir: str | os.PathLike) -> int:
    """The femur label value of an existing dataset.json (e.g. 1 for 'bone', 2 for 'femur': 2), 1 for a new one.

    A dataset.json that cannot be read gives 1 here; export_case then refuses it with its own message.
    """
    path = Path(dataset_dir) / "dataset.json"
    try:
        labels = json.loads(read_bytes(path, "dataset.json", dataset.MAX_DATASET_JSON_BYTES)).get("labels")
    except (FemurSegError, ValueError, AttributeError):  # missing, not a regular file, not JSON
        return 1
    femur = dataset.femur_label(labels)
    return femur[1] if femur else 1


def export_segment(scene: Any, seg_logic: Any, segmentation_node: Any, segment_id: str | None,
                   ct_volume_node: Any, dataset_dir: str | os.PathLike, case: str, test: bool = False,
                   replace: bool = False, provenance: dict[str, Any] | None = None,
                   force: bool = False) -> dataset.ExportResult:
    """Export the CT and one (corrected) segment, or with none chosen the node's femur segments
    (``femur_segment_ids``), as an nnU-Net case through dataset.export_case.

    The label gets dataset.json's femur value through the colour table (by segment name, not order).
    """
    ct = sitk_from_volume_node(ct_volume_node)
    value = dataset_femur_value(dataset_dir)
    label = femur_label(scene, seg_logic, segmentation_node, segment_id, ct_volume_node, value)
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetSegment(i).GetName() for i in femur_segment_ids(segmentation_node, segment_id)]
    record = dict(provenance or {})
    record.setdefault("slicer", {"ct_node": ct_volume_node.GetName(), "segmentation_node": segmentation_node.GetName(),
                                 "segments": names})
    return dataset.export_case(ct, label, dataset_dir, case, test=test, replace=replace, provenance=record,
                               force=force)


def describe_export(scene: Any, seg_logic: Any, segmentation_node: Any, segment_id: str | None,
                    ct_volume_node: Any) -> str:
    """What export_segment would write into the label, segment by segment with volumes, for the GUIs to show
    before the user writes it (a fill or one femur of two is then seen, not found later in the dataset)."""
    ids = femur_segment_ids(segmentation_node, segment_id)
    segmentation = segmentation_node.GetSegmentation()
    masks = [mask_array(segment_to_sitk(scene, seg_logic, segmentation_node, i, ct_volume_node)) for i in ids]
    voxel_ml = float(np.prod(ct_volume_node.GetSpacing())) / 1000.0
    parts = " + ".join(f"{segmentation.GetSegment(i).GetName()} {np.count_nonzero(m) * voxel_ml:.1f} ml"
                       for i, m in zip(ids, masks))
    total = np.count_nonzero(np.logical_or.reduce(masks)) * voxel_ml
    return f"The label will hold {parts}" + (f" ({total:.1f} ml of femur)." if len(ids) > 1 else ".")


def export_segment_surface(scene: Any, seg_logic: Any, segmentation_node: Any, segment_id: str | None,
                           ct_volume_node: Any, path: str | os.PathLike,
                           options: surface.SurfaceOptions = surface.SurfaceOptions(),
                           replace: bool = False) -> surface.SurfaceCheck:
    """One segment's (none chosen: the node's femur segments together) watertight surface for meshing, made
    from its voxels exactly as ``femurseg surface`` does. An existing file is refused unless ``replace``: the
    GUIs' one rule for what is there already, as for dataset cases.

    Slicer's closed-surface representation is for display (its smoothing and decimation are the viewer's); the
    file is made from the segment's labelmap on the CT grid, so it is the same for the CLI, batch and both GUIs.
    """
    if os.path.lexists(path) and not replace:
        raise AlreadyExists(f"Surface file '{Path(path).name}' already exists; choose another name, or replace it (",
                            ").")
    label = femur_label(scene, seg_logic, segmentation_node, segment_id, ct_volume_node)
    return surface.write_label_surface(label, path, options)


# --- scene bookkeeping ----------------------------------------------------------------------------------------

class _removed_on_failure:
    """Add ``node`` to the scene; if the block raises, remove it (and its display/storage nodes) again."""

    def __init__(self, scene: Any, node: Any) -> None:
        self.scene, self.node = scene, node

    def __enter__(self) -> Any:
        self.scene.AddNode(self.node)
        return self.node

    def __exit__(self, error_type, error, traceback) -> bool:
        if error_type is not None:
            _remove_node(self.scene, self.node)
        return False


def _node_ids(scene: Any) -> set[str]:
    return {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}


def _remove_node(scene: Any, node: Any) -> None:
    for helper in list(_helper_nodes(node)):
        if helper.GetScene() is scene:
            scene.RemoveNode(helper)
    if node.GetScene() is scene:
        scene.RemoveNode(node)


def _helper_nodes(node: Any) -> Iterator[Any]:
    """The display and storage nodes that Slicer made for ``node``."""
    for kind in ("Display", "Storage"):
        count = getattr(node, f"GetNumberOf{kind}Nodes", lambda: 0)()
        for index in range(count):
            helper = getattr(node, f"GetNth{kind}Node")(index)
            if helper is not None:
                yield helper
