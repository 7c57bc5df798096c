"""The Slicer module's path on real Slicer libraries (trame-slicer's SlicerApp, no fakes): load -> segment -> fill
-> compare -> correct with real Segment Editor effects -> export, plus the bad inputs a user can give.

Expected values come from independent computations: metrics on the SimpleITK labels, segments read from their
internal labelmaps (not through the ExportSegmentsToLabelmapNode path under test), geometry via SimpleITK.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
trame_core = pytest.importorskip("trame_slicer.core")

from vtkmodules.util import numpy_support  # noqa: E402
from vtkmodules.vtkCommonCore import vtkPoints  # noqa: E402
from vtkmodules.vtkCommonMath import vtkMatrix4x4  # noqa: E402
from vtkmodules.vtkFiltersSources import vtkSphereSource  # noqa: E402

from FemurSegLib import metrics, scene as femur_scene  # noqa: E402
from FemurSegLib.errors import FemurSegError  # noqa: E402
from FemurSegLib.fill import FillParameters, compute_fill  # noqa: E402
from FemurSegLib.inference import InferenceCancelled, InferenceOptions, Segmenter  # noqa: E402
from FemurSegLib.models import BUNDLED_MODELS_DIR, DEFAULT_MODEL, resolve_model  # noqa: E402

SEED = 5
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class RecordingSegmenter:
    """The real Segmenter; keeps its last label so the test can compare the scene against it."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self.label: sitk.Image | None = None

    def run(self, ct, progress=None, cancel=None):
        result = self.segmenter.run(ct, progress=progress, cancel=cancel)
        self.label = result.label
        return result


@pytest.fixture(scope="module")
def app():
    return trame_core.SlicerApp()


@pytest.fixture(scope="module")
def segmenter():
    if not (BUNDLED_MODELS_DIR / DEFAULT_MODEL).is_dir():
        pytest.skip(f"bundled model {DEFAULT_MODEL} is not in {BUNDLED_MODELS_DIR} yet")
    return RecordingSegmenter(Segmenter(resolve_model(None).root, InferenceOptions(device="cpu", fast=True)))


@pytest.fixture(scope="module")
def flow(app, segmenter, phantom_factory):
    """load -> segment -> fill -> compare, once for the module."""
    ct, truth, shape = phantom_factory(SEED)
    ct_node = femur_scene.add_volume_node(app.scene, ct, "FemurPhantom05")
    nn_node, _ = femur_scene.segment_volume_node(app.scene, app.segmentations_logic, ct_node, segmenter)
    fill_node = femur_scene.fill_volume_node(app.scene, app.segmentations_logic, ct_node, FillParameters())
    comparison = femur_scene.compare_segmentations(app.scene, app.segmentations_logic, nn_node, fill_node, ct_node)
    return dict(ct=ct, truth=truth, shape=shape, ct_node=ct_node, nn_node=nn_node, fill_node=fill_node,
                comparison=comparison, nn_label=segmenter.label)


def segment_mask(segmentation_node, segment_name: str, ct_node) -> np.ndarray:
    """A segment as a (z, y, x) bool array on the CT grid, read from its internal labelmap."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    assert segment_id, f"no segment named {segment_name!r}"
    segment = segmentation.GetSegment(segment_id)
    labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    columns, rows, slices = ct_node.GetImageData().GetDimensions()
    full = np.zeros((slices, rows, columns), dtype=bool)
    i0, i1, j0, j1, k0, k1 = labelmap.GetExtent()
    if i1 < i0 or j1 < j0 or k1 < k0:
        return full
    segment_to_world, ct_to_world = vtkMatrix4x4(), vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(segment_to_world)
    ct_node.GetIJKToRASMatrix(ct_to_world)
    assert np.allclose([segment_to_world.GetElement(r, c) for r in range(4) for c in range(4)],
                       [ct_to_world.GetElement(r, c) for r in range(4) for c in range(4)], atol=1e-6)
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    values = values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1) == segment.GetLabelValue()
    ks, js, is_ = (slice(max(a, 0), min(b + 1, n)) for a, b, n in ((k0, k1, slices), (j0, j1, rows), (i0, i1, columns)))
    full[ks, js, is_] = values[ks.start - k0:ks.stop - k0, js.start - j0:js.stop - j0, is_.start - i0:is_.stop - i0]
    return full


def ras_of_index(ct: sitk.Image, index_xyz) -> np.ndarray:
    return LPS_TO_RAS @ np.array(ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_xyz]))


def ball(ct: sitk.Image, centre_ras: np.ndarray, radius_mm: float) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``centre_ras`` (z, y, x)."""
    k, j, i = np.indices(sitk.GetArrayFromImage(ct).shape)
    points = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    lps = np.array(ct.GetOrigin()) + (points * ct.GetSpacing()) @ np.array(ct.GetDirection()).reshape(3, 3).T
    distance = np.linalg.norm(lps @ LPS_TO_RAS.T - centre_ras, axis=1)
    return (distance <= radius_mm).reshape(k.shape)


def sphere_glyph(radius_mm: float):
    source = vtkSphereSource()
    source.SetRadius(radius_mm)
    source.SetPhiResolution(24)
    source.SetThetaResolution(24)
    source.Update()
    return source.GetOutput()


def paint(editor, effect_type, centre_ras, radius_mm: float) -> None:
    effect = editor.set_active_effect_type(effect_type)
    points = vtkPoints()
    points.InsertNextPoint(*centre_ras)
    effect.paint_glyph_at_world_coordinates(sphere_glyph(radius_mm), points)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".femurseg.lock"}


# --- geometry -------------------------------------------------------------------------------------------------

def test_volume_node_geometry_matches_simpleitk_with_lps_to_ras_flip(app):
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    node = femur_scene.add_volume_node(app.scene, image, "rotated")
    ijk_to_ras = vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        ras = [sum(ijk_to_ras.GetElement(r, c) * v for c, v in enumerate([*index, 1])) for r in range(3)]
        assert np.allclose(ras, ras_of_index(image, index), atol=1e-9)
    back = femur_scene.sitk_from_volume_node(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert np.allclose(back.GetDirection(), image.GetDirection()) and np.allclose(back.GetOrigin(), image.GetOrigin())
    femur_scene._remove_node(app.scene, node)


def test_laterality_from_the_femur_shape_in_the_scanner_frame():
    """A femur along z with its head towards -x (medial for a left femur) is left; along x its side is unknown."""
    ct = sitk.Image(80, 60, 180, sitk.sitkInt16)
    label = sitk.Image(80, 60, 180, sitk.sitkUInt8)
    label[45:57, 24:36, 0:150] = 1  # shaft along z
    label[25:57, 22:38, 150:175] = 1  # neck and head reaching towards low x at the top
    assert femur_scene.detect_laterality(label, ct) == "left"
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(label)[:, :, ::-1].copy())  # head towards +x
    assert femur_scene.detect_laterality(mirrored, ct) == "right"
    # The same voxels with the shaft along x (identity direction): a specimen lying on the table, side unknown.
    lying = sitk.GetImageFromArray(sitk.GetArrayFromImage(label).transpose(2, 1, 0).copy())
    assert femur_scene.detect_laterality(lying, lying) is None


def test_two_femurs_become_left_and_right_segments_with_snomed_laterality(app, tmp_path):
    from FemurSegLib.inference import Femur

    values = np.zeros((30, 20, 60), dtype=np.uint8)
    values[5:25, 5:15, 5:20], values[5:25, 5:15, 40:55] = 2, 1  # right femur at low x (LPS), left at high x
    ct = sitk.GetImageFromArray(values.astype(np.int16) * 700)
    ct_node = femur_scene.add_volume_node(app.scene, ct, "bilateral")
    label = sitk.GetImageFromArray(values)
    femurs = [Femur("left", 1, 3.0, ()), Femur("right", 2, 3.0, ())]
    node = femur_scene.add_femur_segments(app.scene, app.segmentations_logic, label, ct_node, femurs)
    codes = {"left": "7771000", "right": "24028007"}
    for femur in femurs:
        name = f"Femur {femur.side} (nnU-Net)"
        assert np.array_equal(segment_mask(node, name, ct_node), values == femur.value)
        segment = node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName(name))
        assert "^71341001^" in segment.GetTerminology() and f"^{codes[femur.side]}^" in segment.GetTerminology()
    assert femur_scene.add_femur_segments(app.scene, app.segmentations_logic, label, ct_node, []) is None
    assert femur_scene.describe_result([], ["no femur found"]) == "No femur found."
    assert femur_scene.describe_result(femurs, ["left: it is in several pieces"]) == \
        "Found Femur left 3 ml, Femur right 3 ml. Warning: left: it is in several pieces."
    # Export with no segment chosen (the Slicer panel) labels both femurs as femur; a chosen segment only itself.
    dataset_dir = tmp_path / "Dataset123_Bilateral"
    both = femur_scene.export_segment(app.scene, app.segmentations_logic, node, None, ct_node, dataset_dir, "both")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(both.label_path))), (values != 0).astype(np.uint8))
    segmentation = node.GetSegmentation()
    left_id = segmentation.GetSegmentIdBySegmentName("Femur left (nnU-Net)")
    left = femur_scene.export_segment(app.scene, app.segmentations_logic, node, left_id, ct_node, dataset_dir, "left")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(left.label_path))), (values == 1).astype(np.uint8))
    femur_scene._remove_node(app.scene, node)
    femur_scene._remove_node(app.scene, ct_node)


# --- the flow -------------------------------------------------------------------------------------------------

def test_segment_adds_the_segmenter_label_with_femur_terminology(flow):
    nn_mask = segment_mask(flow["nn_node"], femur_scene.SEGMENT_NNUNET, flow["ct_node"])
    assert np.array_equal(nn_mask, sitk.GetArrayFromImage(flow["nn_label"]) != 0)
    dice = metrics.compare_images(flow["truth"], flow["nn_label"]).dice
    assert dice > 0.5, f"bundled model's Dice on phantom {SEED} is {dice:.3f}"
    segment = flow["nn_node"].GetSegmentation().GetNthSegment(0)
    # The phantom lies with its shaft along x, as an ex-vivo specimen may: its side cannot be told, none is set.
    assert segment.GetName() == femur_scene.SEGMENT_NNUNET and "^71341001^" in segment.GetTerminology()
    assert "^7771000^" not in segment.GetTerminology() and "^24028007^" not in segment.GetTerminology()
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    reference = flow["nn_node"].GetNodeReference(role)
    assert reference is flow["ct_node"]


def test_fill_segment_equals_compute_fill(flow):
    expected = sitk.GetArrayFromImage(compute_fill(flow["ct"], FillParameters())) != 0
    assert np.array_equal(segment_mask(flow["fill_node"], femur_scene.SEGMENT_FILL, flow["ct_node"]), expected)


def table_rows(table_node) -> list[list[str]]:
    return [[table_node.GetCellText(row, column) for column in range(table_node.GetNumberOfColumns())]
            for row in range(table_node.GetNumberOfRows())]


def test_comparison_table_and_disagreement_match_independent_metrics(flow):
    fill_label = compute_fill(flow["ct"], FillParameters())
    expected = metrics.compare_images(flow["nn_label"], fill_label)
    table = flow["comparison"].table_node
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(femur_scene.COMPARISON_COLUMNS)
    difference = expected.volume_ml_other - expected.volume_ml_reference
    # one femur of unknown side: one row, ml to one decimal, difference fill - nnU-Net in ml and % of nnU-Net
    assert table_rows(table) == [["Femur", f"{expected.dice:.3f}", f"{expected.asd_mm:.2f}", f"{expected.hd95_mm:.1f}",
                                  f"{expected.volume_ml_reference:.1f}", f"{expected.volume_ml_other:.1f}",
                                  f"{difference:+.1f}", f"{100 * difference / expected.volume_ml_reference:+.1f}"]]
    assert flow["comparison"].agreement.dice == pytest.approx(expected.dice)
    nn, fill = sitk.GetArrayFromImage(flow["nn_label"]) != 0, sitk.GetArrayFromImage(fill_label) != 0
    disagreement = flow["comparison"].disagreement_node
    assert np.array_equal(segment_mask(disagreement, femur_scene.SEGMENT_NNUNET_ONLY, flow["ct_node"]), nn & ~fill)
    assert np.array_equal(segment_mask(disagreement, femur_scene.SEGMENT_FILL_ONLY, flow["ct_node"]), fill & ~nn)
    per_slice = (nn != fill).sum(axis=(1, 2))
    places = flow["comparison"].worst_places
    assert places[0].slice_index == int(np.argmax(per_slice))
    assert [p.disagreement_ml for p in places] == sorted((p.disagreement_ml for p in places), reverse=True)
    voxel_ml = np.prod(flow["ct"].GetSpacing()) / 1000
    for place in places:
        assert place.disagreement_ml == pytest.approx(per_slice[place.slice_index] * voxel_ml)
    assert all(abs(a.slice_index - b.slice_index) >= 5 for a in places for b in places if a is not b)
    size = flow["ct"].GetSize()
    centre = ((size[0] - 1) / 2, (size[1] - 1) / 2, places[0].slice_index)
    assert np.allclose(places[0].ras, ras_of_index(flow["ct"], centre))


def test_drafts_are_outlines_in_distinct_colours_under_filled_disagreement(flow):
    colours = [femur_scene.COLOR_NNUNET_LEFT, femur_scene.COLOR_NNUNET_RIGHT, femur_scene.COLOR_FILL,
               femur_scene.COLOR_NNUNET_ONLY, femur_scene.COLOR_FILL_ONLY]
    assert min(np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(colours) for b in colours[i + 1:]) > 0.4
    for node in (flow["nn_node"], flow["fill_node"]):
        display = node.GetDisplayNode()
        assert not display.GetVisibility2DFill() and display.GetVisibility2DOutline()
    assert flow["comparison"].disagreement_node.GetDisplayNode().GetVisibility2DFill()
    fill_segment = flow["fill_node"].GetSegmentation().GetNthSegment(0)
    assert np.allclose(fill_segment.GetColor(), femur_scene.COLOR_FILL)
    for label, colour, _ in femur_scene.LEGEND:
        assert label in femur_scene.legend_html()
        assert "rgb({},{},{})".format(*(round(255 * c) for c in colour)) in femur_scene.legend_html()


@pytest.fixture()
def bilateral(app):
    """Two femur blocks (right at low x, left at high x, LPS), and a CT on a non-cubic grid."""
    from FemurSegLib.inference import Femur

    values = np.zeros((30, 20, 70), dtype=np.uint8)
    values[5:25, 5:15, 5:20], values[5:25, 5:15, 45:60] = 2, 1
    ct = sitk.GetImageFromArray(values.astype(np.int16) * 700)
    ct.SetSpacing((0.8, 0.9, 1.5))
    ct_node = femur_scene.add_volume_node(app.scene, ct, "bilateral")
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(ct)
    nn_node = femur_scene.add_femur_segments(app.scene, app.segmentations_logic, label, ct_node,
                                             [Femur("left", 1, 3.0, ()), Femur("right", 2, 3.0, ())])
    yield dict(values=values, ct=ct, ct_node=ct_node, nn_node=nn_node, voxel_ml=0.8 * 0.9 * 1.5 / 1000)
    for node in (nn_node, ct_node):
        femur_scene._remove_node(app.scene, node)


def fill_node_of(app, bilateral, mask: np.ndarray):
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.CopyInformation(bilateral["ct"])
    return femur_scene.add_label_as_segment(app.scene, app.segmentations_logic, label, bilateral["ct_node"],
                                            femur_scene.SEGMENT_FILL, femur_scene.COLOR_FILL, laterality=None)


def test_a_fill_of_one_femur_plus_hip_bone_is_a_warning_with_rows_per_femur(app, bilateral):
    """In vivo the fill took one femur and the hip bone beside it and missed the other: the table says so per side."""
    values, ml = bilateral["values"], bilateral["voxel_ml"]
    fill = values == 1
    fill[5:25, 5:15, 60:68] = True  # "hip bone" against the left femur, nearer it than the right one
    fill_node = fill_node_of(app, bilateral, fill)
    comparison = femur_scene.compare_segmentations(app.scene, app.segmentations_logic, bilateral["nn_node"],
                                                   fill_node, bilateral["ct_node"])
    rows = table_rows(comparison.table_node)
    assert [row[0] for row in rows] == ["Femur left", "Femur right", "Both femurs"]
    left_ml, right_ml, fill_ml = (values == 1).sum() * ml, (values == 2).sum() * ml, fill.sum() * ml
    assert rows[0][4:8] == [f"{left_ml:.1f}", f"{fill_ml:.1f}", f"{fill_ml - left_ml:+.1f}",
                            f"{100 * (fill_ml - left_ml) / left_ml:+.1f}"]
    assert rows[0][1] == f"{metrics.dice(values == 1, fill):.3f}"
    assert rows[1][1:8] == ["0.000", "–", "–", f"{right_ml:.1f}", "0.0", f"{-right_ml:+.1f}", "-100.0"]
    assert rows[2][1] == f"{metrics.dice(values != 0, fill):.3f}"
    warnings = " | ".join(comparison.warnings)
    assert "misses 100% of Femur right" in warnings and "more volume than Femur left" in warnings
    assert "Warning:" in comparison.describe() and "reference: nnU-Net" in comparison.describe()
    femur_scene.remove_comparison(app.scene, comparison)
    assert comparison.table_node.GetScene() is None and comparison.disagreement_node.GetScene() is None

    joined = values != 0
    joined[10:20, 8:12, 20:45] = True  # a bridge from one femur to the other, as through the pelvis
    joined_node = fill_node_of(app, bilateral, joined)
    comparison = femur_scene.compare_segmentations(app.scene, app.segmentations_logic, bilateral["nn_node"],
                                                   joined_node, bilateral["ct_node"])
    assert any("one piece joining both femurs" in w for w in comparison.warnings)
    femur_scene.remove_comparison(app.scene, comparison)
    same_node = fill_node_of(app, bilateral, values != 0)
    agreeing = femur_scene.compare_segmentations(app.scene, app.segmentations_logic, bilateral["nn_node"],
                                                 same_node, bilateral["ct_node"])
    assert agreeing.warnings == () and agreeing.worst_places == ()
    assert [row.agreement.dice for row in agreeing.rows] == [1.0, 1.0, 1.0]
    femur_scene.remove_comparison(app.scene, agreeing)
    for node in (fill_node, joined_node, same_node):
        femur_scene._remove_node(app.scene, node)


def test_export_preview_surface_replace_and_windows(app, bilateral, tmp_path):
    from FemurSegLib.errors import AlreadyExists

    values, ml, node, ct_node = bilateral["values"], bilateral["voxel_ml"], bilateral["nn_node"], bilateral["ct_node"]
    left, right = (values == 1).sum() * ml, (values == 2).sum() * ml
    assert femur_scene.describe_export(app.scene, app.segmentations_logic, node, None, ct_node) == (
        f"The label will hold Femur left (nnU-Net) {left:.1f} ml + Femur right (nnU-Net) {right:.1f} ml "
        f"({left + right:.1f} ml of femur).")
    right_id = node.GetSegmentation().GetSegmentIdBySegmentName("Femur right (nnU-Net)")
    assert femur_scene.describe_export(app.scene, app.segmentations_logic, node, right_id, ct_node) == \
        f"The label will hold Femur right (nnU-Net) {right:.1f} ml."

    path = tmp_path / "femur.stl"
    femur_scene.export_segment_surface(app.scene, app.segmentations_logic, node, None, ct_node, path)
    first = path.read_bytes()
    with pytest.raises(AlreadyExists) as refused:
        femur_scene.export_segment_surface(app.scene, app.segmentations_logic, node, right_id, ct_node, path)
    assert path.read_bytes() == first
    assert "(--replace)" in str(refused.value) and "(tick Replace)" in refused.value.advice("tick Replace")
    femur_scene.export_segment_surface(app.scene, app.segmentations_logic, node, right_id, ct_node, path,
                                       replace=True)
    assert path.read_bytes() != first
    dataset_dir = tmp_path / "Dataset124_Twice"
    femur_scene.export_segment(app.scene, app.segmentations_logic, node, None, ct_node, dataset_dir, "c1")
    with pytest.raises(AlreadyExists, match="already exists"):
        femur_scene.export_segment(app.scene, app.segmentations_logic, node, None, ct_node, dataset_dir, "c1")

    for preset, (window, level) in femur_scene.WINDOW_PRESETS.items():
        femur_scene.apply_window(ct_node, preset)
        display = ct_node.GetDisplayNode()
        assert (display.GetWindow(), display.GetLevel(), display.GetAutoWindowLevel()) == (window, level, 0)
    with pytest.raises(FemurSegError, match="not one of"):
        femur_scene.apply_window(ct_node, "lung")


def test_correct_with_segment_editor_then_export_round_trips(app, flow, tmp_path):
    from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectIslands, SegmentationEffectPaint
    from undo_stack import UndoStack

    ct, ct_node, nn_node = flow["ct"], flow["ct_node"], flow["nn_node"]
    editor = app.segmentation_editor
    editor.set_undo_stack(UndoStack(undo_limit=10))
    editor.set_active_segmentation(nn_node, ct_node)
    current = lambda: segment_mask(nn_node, femur_scene.SEGMENT_NNUNET, ct_node)  # noqa: E731
    before = current()
    truth = sitk.GetArrayFromImage(flow["truth"]) != 0

    # paint a region the draft misses (a truth surface voxel), erase one inside it, as a user would
    missing = np.argwhere(truth & ~before) if (truth & ~before).any() else np.argwhere(truth)
    paint_centre = ras_of_index(ct, missing[len(missing) // 2][::-1])
    paint(editor, SegmentationEffectPaint, paint_centre, 4.0)
    painted = current()
    inner, outer = ball(ct, paint_centre, 3.0), ball(ct, paint_centre, 5.0)
    assert painted[inner].all() and np.array_equal(painted[~outer], before[~outer])

    erase_index = np.argwhere(painted & ~outer)[0]
    erase_centre = ras_of_index(ct, erase_index[::-1])
    paint(editor, SegmentationEffectErase, erase_centre, 3.0)
    erased = current()
    inner, outer = ball(ct, erase_centre, 2.0), ball(ct, erase_centre, 4.0)
    assert not erased[inner].any() and np.array_equal(erased[~outer], painted[~outer])

    # a false island far from the femur, then Islands > keep largest removes it again
    background = np.argwhere(~ndilate(erased, 8))
    island_centre = ras_of_index(ct, background[len(background) // 2][::-1])
    paint(editor, SegmentationEffectPaint, island_centre, 2.5)
    with_island = current()
    assert with_island.sum() > erased.sum()
    island = with_island & ~erased
    expected = largest_face_connected(with_island)  # Slicer's Islands effect: 6-connectivity
    assert not (expected & island).any()
    editor.set_active_effect_type(SegmentationEffectIslands).keep_largest_island()
    assert np.array_equal(current(), expected)
    editor.undo_stack.undo()
    assert np.array_equal(current(), with_island)
    editor.undo_stack.redo()
    corrected = current()
    assert np.array_equal(corrected, expected)
    editor.deactivate_effect()

    dataset_dir = tmp_path / "Dataset501_FemurSlicer"
    result = femur_scene.export_segment(app.scene, app.segmentations_logic, nn_node, None, ct_node, dataset_dir,
                                        "phantom05", provenance={"model": DEFAULT_MODEL})
    exported = sitk.ReadImage(str(result.label_path))
    assert np.array_equal(sitk.GetArrayFromImage(exported), corrected.astype(np.uint8))
    assert json.loads((dataset_dir / "dataset.json").read_text())["labels"] == {"background": 0, "femur": 1}
    exported_ct = sitk.ReadImage(str(result.image_path))
    assert np.array_equal(sitk.GetArrayFromImage(exported_ct), sitk.GetArrayFromImage(ct))
    assert np.allclose(exported_ct.GetOrigin(), ct.GetOrigin()) and np.allclose(exported.GetOrigin(), ct.GetOrigin())
    assert json.loads(result.provenance_path.read_text())["slicer"]["segments"] == [femur_scene.SEGMENT_NNUNET]


def ndilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=iterations)


def largest_face_connected(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@pytest.mark.parametrize("label_name, value", [("bone", 1), ("femur", 2)])
def test_export_uses_the_existing_dataset_json_label_value(app, flow, tmp_path, label_name, value):
    dataset_dir = tmp_path / f"Dataset50{value}_Existing"
    dataset_dir.mkdir()
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, label_name: value},
                    "numTraining": 0, "file_ending": ".nii.gz", "name": "Existing"}
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset_json))
    count = app.scene.GetNumberOfNodes()
    result = femur_scene.export_segment(app.scene, app.segmentations_logic, flow["fill_node"], None, flow["ct_node"],
                                        dataset_dir, "fill05", test=True)
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(result.label_path)))
    fill = segment_mask(flow["fill_node"], femur_scene.SEGMENT_FILL, flow["ct_node"])
    assert set(np.unique(exported).tolist()) == {0, value}
    assert np.array_equal(exported == value, fill)
    assert json.loads((dataset_dir / "dataset.json").read_text())["labels"] == dataset_json["labels"]
    assert app.scene.GetNumberOfNodes() == count  # the temporary label map and its helpers are gone


def test_a_failure_after_adding_a_segmentation_removes_it_and_its_display_node(app, flow):
    count = app.scene.GetNumberOfNodes()
    with pytest.raises(FemurSegError, match="simulated"):
        with femur_scene._removed_on_failure(app.scene, slicer.vtkMRMLSegmentationNode()) as node:
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(flow["ct_node"])
            assert app.scene.GetNumberOfNodes() == count + 2
            raise FemurSegError("simulated failure")
    assert app.scene.GetNumberOfNodes() == count


def test_load_fill_label_on_ct_grid_and_refuse_other_grid(app, flow, tmp_path):
    fill_label = compute_fill(flow["ct"], FillParameters(threshold_hu=500))
    path = tmp_path / "medtool-fill.nrrd"
    sitk.WriteImage(fill_label * 255, str(path))
    node = femur_scene.load_fill_label(app.scene, app.segmentations_logic, path, flow["ct_node"])
    assert np.array_equal(segment_mask(node, femur_scene.SEGMENT_FILL, flow["ct_node"]),
                          sitk.GetArrayFromImage(fill_label) != 0)
    femur_scene._remove_node(app.scene, node)
    cropped = tmp_path / "cropped.nrrd"
    sitk.WriteImage(fill_label[2:, :, :], str(cropped))
    count = app.scene.GetNumberOfNodes()
    with pytest.raises(FemurSegError, match="not on the same voxel grid"):
        femur_scene.load_fill_label(app.scene, app.segmentations_logic, cropped, flow["ct_node"])
    assert app.scene.GetNumberOfNodes() == count


# --- bad input ------------------------------------------------------------------------------------------------

def test_no_volume_is_refused(app, segmenter):
    count = app.scene.GetNumberOfNodes()
    with pytest.raises(FemurSegError, match="No CT volume is selected"):
        femur_scene.segment_volume_node(app.scene, app.segmentations_logic, None, segmenter)
    assert app.scene.GetNumberOfNodes() == count


def test_label_map_node_as_input_is_refused(app, segmenter, flow):
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetName("truth")
    femur_scene._fill_image_node(labelmap, flow["truth"])
    app.scene.AddNode(labelmap)
    count = app.scene.GetNumberOfNodes()
    with pytest.raises(FemurSegError, match="is a label map, not a CT"):
        femur_scene.segment_volume_node(app.scene, app.segmentations_logic, labelmap, segmenter)
    assert app.scene.GetNumberOfNodes() == count
    femur_scene._remove_node(app.scene, labelmap)


def test_2d_image_is_refused(app, segmenter):
    count = app.scene.GetNumberOfNodes()
    with pytest.raises(FemurSegError, match="2D"):
        femur_scene.add_volume_node(app.scene, sitk.Image(64, 64, sitk.sitkInt16), "radiograph")
    one_slice = sitk.Image(64, 64, 1, sitk.sitkInt16)
    node = slicer.vtkMRMLScalarVolumeNode()
    femur_scene._fill_image_node(node, one_slice)
    app.scene.AddNode(node)
    with pytest.raises(FemurSegError, match="single slice"):
        femur_scene.segment_volume_node(app.scene, app.segmentations_logic, node, segmenter)
    femur_scene._remove_node(app.scene, node)
    assert app.scene.GetNumberOfNodes() == count


def test_cancel_mid_run_leaves_the_scene_unchanged(app, segmenter, flow):
    cancel = threading.Event()
    stages: list[str] = []

    def progress(fraction: float, stage: str) -> None:
        stages.append(stage)
        if stage == "predicting":
            cancel.set()

    count = app.scene.GetNumberOfNodes()
    with pytest.raises(InferenceCancelled):
        femur_scene.segment_volume_node(app.scene, app.segmentations_logic, flow["ct_node"], segmenter,
                                        progress=progress, cancel=cancel)
    assert "predicting" in stages and "done" not in stages
    assert app.scene.GetNumberOfNodes() == count


def test_export_failures_leave_scene_and_dataset_intact(app, flow, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    count = app.scene.GetNumberOfNodes()
    with pytest.raises(FemurSegError, match="does not exist"):
        femur_scene.export_segment(app.scene, app.segmentations_logic, flow["fill_node"], None, flow["ct_node"],
                                   blocker / "Dataset601_Blocked", "case1")
    assert app.scene.GetNumberOfNodes() == count

    dataset_dir = tmp_path / "Dataset602_Intact"
    femur_scene.export_segment(app.scene, app.segmentations_logic, flow["fill_node"], None, flow["ct_node"],
                               dataset_dir, "case1")
    digest = tree_digest(dataset_dir)

    def refuse(source, destination):
        raise PermissionError(13, "Permission denied", str(destination))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(FemurSegError) as error:
        femur_scene.export_segment(app.scene, app.segmentations_logic, flow["fill_node"], None, flow["ct_node"],
                                   dataset_dir, "case2")
    monkeypatch.undo()
    assert "\n" not in str(error.value) and "ermission" in str(error.value)
    assert tree_digest(dataset_dir) == digest
    assert app.scene.GetNumberOfNodes() == count


def test_segmentation_with_several_segments_needs_a_segment_choice(app, flow, tmp_path):
    with pytest.raises(FemurSegError, match="has 2 segments"):
        femur_scene.export_segment(app.scene, app.segmentations_logic, flow["comparison"].disagreement_node, None,
                                   flow["ct_node"], tmp_path / "Dataset603_Two", "case1")
    assert not (tmp_path / "Dataset603_Two").exists()


@pytest.mark.parametrize("case, words", [("raw scanner values", "raw scanner numbers"), ("soft tissue", "No femur found"),
                                         ("lumbar spine", "No femur found")])
def test_implausible_cts_are_named_in_the_status(app, segmenter, flow, case, words):
    """What the guard says reaches the status line the panel and the page show; a CT of the lumbar spine, sacrum
    and hip bones (a held-out clinical render, no femur in view) adds no segment and says what was left out."""
    if case == "raw scanner values":
        ct = sitk.Cast(flow["ct"], sitk.sitkInt32) + 1024
    elif case == "lumbar spine":
        from FemurSegLib.synthetic.cases import generate_case

        ct = generate_case("clinical", 6, held_out=True, view="spine")[0]
    else:
        ct = sitk.GetImageFromArray(np.random.default_rng(4).normal(40, 15, (60, 80, 80)).astype(np.int16))
    node = femur_scene.add_volume_node(app.scene, ct, case)
    nodes_before = app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    added, result = femur_scene.segment_volume_node(app.scene, app.segmentations_logic, node, segmenter)
    assert words in femur_scene.describe_result(result.femurs, result.warnings)
    if case != "raw scanner values":
        assert added is None and app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodes_before
    for leftover in filter(None, (added, node)):
        femur_scene._remove_node(app.scene, leftover)
