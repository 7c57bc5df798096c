"""Inference does not depend on the layout: margins, axis order and field of view leave the femur unchanged,
and inputs without a femur say so (issue: bundled model v3 scored Dice 0.000 on the sample padded by 60 voxels).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.demo import SAMPLE_CT, SAMPLE_LABEL
from FemurSegLib.inference import NO_FEMUR, InferenceOptions, Segmenter
from FemurSegLib.models import resolve_model

PAD = 60


def dice(truth: np.ndarray, other: np.ndarray) -> float:
    """Dice by SimpleITK's overlap filter (independent of FemurSegLib.metrics)."""
    measures = sitk.LabelOverlapMeasuresImageFilter()
    measures.Execute(sitk.GetImageFromArray(truth.astype(np.uint8)), sitk.GetImageFromArray(other.astype(np.uint8)))
    return measures.GetDiceCoefficient()


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(resolve_model(None).root, InferenceOptions(device="cpu"), notify=lambda message: None)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    ct = sitk.ReadImage(str(SAMPLE_CT))
    return sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABEL))) != 0, ct


def _image(array: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def _femur(segmenter: Segmenter, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    result = segmenter.run(_image(array, spacing))
    return sitk.GetArrayFromImage(result.label) != 0


@pytest.fixture(scope="module")
def plain_dice(segmenter, sample) -> float:
    ct, truth, _ = sample
    return dice(truth, _femur(segmenter, ct))


def _padded(array: np.ndarray, pad: np.ndarray | int, fill: np.ndarray) -> np.ndarray:
    out = fill.astype(array.dtype)
    pad = np.broadcast_to(pad, 3)
    out[tuple(slice(p, p + n) for p, n in zip(pad, array.shape))] = array
    return out


def test_the_plain_sample_is_segmented_well(plain_dice):
    assert plain_dice > 0.97


@pytest.mark.parametrize("margin", ["air", "noise"])
def test_a_60_voxel_margin_changes_nothing(segmenter, sample, plain_dice, margin):
    ct, truth, _ = sample
    shape = tuple(n + 2 * PAD for n in ct.shape)
    rng = np.random.default_rng(0)
    fill = np.full(shape, -1000.0) if margin == "air" else rng.normal(0.0, 40.0, shape)
    femur = _femur(segmenter, _padded(ct, PAD, fill))
    inner = femur[PAD:-PAD, PAD:-PAD, PAD:-PAD]
    assert not femur.sum() - inner.sum(), "no femur voxels in the margin"
    assert dice(truth, inner) >= plain_dice - 0.005


def test_another_axis_order_changes_nothing(segmenter, sample, plain_dice):
    ct, truth, _ = sample
    order = (2, 0, 1)  # the shaft (image x) becomes the slowest axis
    femur = _femur(segmenter, np.ascontiguousarray(ct.transpose(order)))
    assert dice(np.ascontiguousarray(truth.transpose(order)), femur) >= plain_dice - 0.005


def test_a_three_times_wider_field_of_view_changes_nothing(segmenter, sample, plain_dice):
    ct, truth, _ = sample
    shape = np.array(ct.shape) * 3
    offset = np.array(ct.shape)
    background = np.random.default_rng(1).normal(float(np.median(ct[:, :, :5])), 20.0, shape)
    femur = _femur(segmenter, _padded(ct, offset, background))
    inner = femur[tuple(slice(o, o + n) for o, n in zip(offset, ct.shape))]
    assert femur.sum() == inner.sum()
    assert dice(truth, inner) >= plain_dice - 0.005


@pytest.mark.parametrize("make", [
    pytest.param(lambda: np.random.default_rng(2).normal(-1000, 10, (80, 90, 100)).astype(np.int16), id="air"),
    pytest.param(lambda: np.random.default_rng(2).normal(40, 15, (80, 90, 100)).astype(np.int16), id="soft tissue"),
])
def test_femur_less_inputs_say_no_femur_found(segmenter, make):
    result = segmenter.run(_image(make(), (1.0, 1.0, 1.0)))
    assert result.femurs == () and NO_FEMUR in result.warnings
    assert not sitk.GetArrayViewFromImage(result.label).any()


@pytest.mark.parametrize("case", ["all-zero", "raw", "tiny", "femur-less"])
def test_cli_warns_or_refuses_in_one_line(tmp_path, sample, case):
    """`femurseg segment`: blank and tiny CTs are refused (exit 2, one line, nothing written); a CT in raw scanner
    numbers or without a femur is segmented with `femurseg: warning: …` lines (exit 0)."""
    ct, _, image = sample
    soft_tissue = np.random.default_rng(6).normal(40, 15, ct.shape).astype(np.int16)
    arrays = {"all-zero": np.zeros_like(ct), "raw": (ct.astype(np.int32) + 1024).astype(np.int16),
              "tiny": ct[:5, :5, :5].copy(), "femur-less": soft_tissue}
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(_image(arrays[case], image.GetSpacing()), str(path))
    out = tmp_path / "femur.nrrd"
    completed = subprocess.run([sys.executable, "-m", "FemurSegLib", "segment", str(path), str(out),
                                "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in completed.stderr
    if case in ("all-zero", "tiny"):
        assert completed.returncode == 2
        assert completed.stderr.startswith("femurseg: error: ") and len(completed.stderr.splitlines()) == 1
        assert not out.exists()
        return
    assert completed.returncode == 0, completed.stderr
    warnings = [line for line in completed.stderr.splitlines() if line.startswith("femurseg: warning: ")]
    assert warnings, completed.stderr
    if case == "raw":
        assert any("raw scanner numbers" in line for line in warnings)
    else:
        assert any(NO_FEMUR in line for line in warnings) and "no femur" in completed.stdout
    assert out.is_file()


def test_progress_json_carries_femurs_and_warnings(tmp_path, sample):
    ct, _, image = sample
    path = tmp_path / "ct.nrrd"
    soft_tissue = np.random.default_rng(3).normal(40, 15, ct.shape).astype(np.int16)
    sitk.WriteImage(_image(soft_tissue, image.GetSpacing()), str(path))
    completed = subprocess.run([sys.executable, "-m", "FemurSegLib", "segment", str(path), str(tmp_path / "f.nrrd"),
                                "--device", "cpu", "--progress-json"], capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    summary = next(event for event in events if "femurs" in event)
    assert summary["femurs"] == [] and NO_FEMUR in summary["warnings"]
