"""``femurseg batch`` as a user runs it: real CLI processes, the real bundled model, phantoms with exact labels.

Every number in results.csv is recomputed here from the files the batch wrote (labels, fill, CTs, truth) with
plain numpy, and surfaces are checked by counting triangle edges; the interrupt test sends a real SIGINT.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import meshio
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from vtkmodules.util import numpy_support
from vtkmodules.vtkIOGeometry import vtkSTLReader

from FemurSegLib import batch
from FemurSegLib.inference import Femur
from FemurSegLib.cli import main
from FemurSegLib.fe.pipeline import FEOptions
from FemurSegLib.report import CONTOUR_COLOURS

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["case", "side", "status", "volume_ml", "mean_hu", "fill_dice", "truth_dice", "warnings", "error",
           "seconds", "finished", "model", "ct", "label", "overlay", "surface", "fe", "fe_elements",
           "fe_stiffness_n_mm", "fe_warnings"]


def femurseg(*args: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "FemurSegLib", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600, **popen)


def read_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_text()
    assert text.endswith("\n"), "a partial last line"
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    assert header == COLUMNS and all(len(row) == len(COLUMNS) for row in rows)
    return [dict(zip(header, row)) for row in rows]


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def check_ok_row(row: dict[str, str], out: Path, ct_path: Path, truth_path: Path | None) -> np.ndarray:
    """The row's numbers, recomputed from the files; returns the label mask."""
    ct = sitk.ReadImage(str(ct_path))
    label_image = sitk.ReadImage(str(out / row["label"]))
    assert label_image.GetSize() == ct.GetSize() and label_image.GetOrigin() == ct.GetOrigin()
    label = sitk.GetArrayFromImage(label_image) != 0
    hu = sitk.GetArrayFromImage(ct).astype(float)
    assert row["status"] == "ok" and row["side"] == "femur" and row["error"] == ""
    assert float(row["volume_ml"]) == pytest.approx(label.sum() * np.prod(ct.GetSpacing()) / 1000, abs=1e-3)
    assert float(row["mean_hu"]) == pytest.approx(hu[label].mean(), abs=0.05)
    if truth_path is not None:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path))) != 0
        assert float(row["truth_dice"]) == pytest.approx(numpy_dice(label, truth), abs=1e-4)
        assert float(row["truth_dice"]) > 0.95
    with Image.open(out / row["overlay"]) as png:
        assert png.format == "PNG"
        picture = np.asarray(png.convert("RGB"))
    shown = {name for name, colour in CONTOUR_COLOURS.items()
             if np.all(picture == tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5)), axis=2).any()}
    assert shown >= ({"nnU-Net", "truth"} if truth_path is not None else {"nnU-Net"})
    assert float(row["seconds"]) > 0
    return label


def write_phantoms(phantom_factory, folder: Path, truth: Path, seeds, name) -> dict[str, tuple[Path, Path]]:
    cases = {}
    for seed in seeds:
        ct, label, _ = phantom_factory(seed)
        case = name(seed)
        suffix = ".nii.gz" if seed % 3 == 0 else ".nrrd"  # the label keeps the CT's format
        ct_path, truth_path = folder / f"{case}_0000{suffix}", truth / f"{case}.nrrd"
        sitk.WriteImage(ct, str(ct_path), True)
        sitk.WriteImage(label, str(truth_path), True)
        cases[case] = (ct_path, truth_path)
    return cases


def test_ten_phantoms_and_a_corrupt_case(phantom_factory, tmp_path):
    inputs, truth, out = tmp_path / "cts", tmp_path / "truth", tmp_path / "out"
    inputs.mkdir(), truth.mkdir()
    cases = write_phantoms(phantom_factory, inputs, truth, range(1, 11), lambda seed: f"F{seed:02d}")
    (inputs / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\n\ngarbage")
    sitk.WriteImage(sitk.ReadImage(str(cases["F01"][1])), str(inputs / "F01.seg.nrrd"))  # not a CT: ignored
    cases["F10"][1].unlink()  # no truth: a warning, not a failure
    shifted = sitk.ReadImage(str(cases["F09"][1]))
    shifted.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(cases["F09"][1]))  # truth on another grid: a warning

    result = femurseg("batch", str(inputs), str(out), "--truth-dir", str(truth), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "11 cases (0 already done, 11 computed, 1 failed)" in result.stdout
    rows = {row["case"]: row for row in read_rows(out / "results.csv")}
    assert sorted(rows) == sorted([*cases, "broken"])
    for case, (ct_path, truth_path) in cases.items():
        good_truth = case not in ("F09", "F10")
        check_ok_row(rows[case], out, ct_path, truth_path if good_truth else None)
        assert rows[case]["label"].endswith(".nii.gz" if ct_path.name.endswith(".nii.gz") else ".nrrd")
        assert (rows[case]["warnings"] == "") == good_truth and (rows[case]["truth_dice"] == "") != good_truth
    assert "no truth label 'F10.*'" in rows["F10"]["warnings"]
    assert "not on the same voxel grid" in rows["F09"]["warnings"]
    assert rows["broken"]["status"] == "error" and "could not be read" in rows["broken"]["error"]
    assert rows["broken"]["volume_ml"] == "" and rows["broken"]["overlay"] == ""

    page = (out / "report.html").read_text()
    assert "11 cases, 10 ok rows, 0 with no femur, 1 errors, 2 with warnings" in page and page.count("<tr") == 12
    for case in cases:
        assert f'<img src="overlays/{case}.png"' in page
    assert "could not be read" in page

    # The same command as a SLURM array task: shard 1/2 holds F02, F04, ... F10, all done: no model is loaded.
    started = time.perf_counter()
    again = femurseg("batch", str(inputs), str(out), "--truth-dir", str(truth), "--shard", "1/2")
    assert again.returncode == 0 and "5 cases (5 already done, 0 computed, 0 failed)" in again.stdout, again
    assert time.perf_counter() - started < 60
    assert read_rows(out / "results.csv") == list(rows.values())


def test_interrupt_then_rerun_computes_only_the_rest(phantom_factory, tmp_path):
    inputs, truth, out = tmp_path / "cts", tmp_path / "truth", tmp_path / "out"
    inputs.mkdir(), truth.mkdir()
    cases = write_phantoms(phantom_factory, inputs, truth, range(11, 15), lambda seed: f"case{seed}")
    listing = tmp_path / "cases.csv"
    listing.write_text("case,ct\n" + "".join(f"{c},cts/{p.name}\n" for c, (p, _) in cases.items()))
    command = [sys.executable, "-m", "FemurSegLib", "batch", str(listing), str(out), "--fill", "--surface", "stl",
               "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    printed = ""  # off a terminal the batch prints one line per finished case: wait for the first one
    while " 1/4 " not in printed and process.poll() is None:
        printed += process.stderr.readline()
    process.send_signal(signal.SIGINT)  # Ctrl-C while the second case is computed
    _, stderr = process.communicate(timeout=120)
    stderr = printed + stderr
    interrupted_at = datetime.now().astimezone()
    assert process.returncode == 130 and "interrupted" in stderr, stderr

    first = {row["case"]: row for row in read_rows(out / "results.csv")}
    assert 1 <= len(first) < len(cases), "interrupted after the first case, before the last"
    assert not [str(p) for p in out.rglob(".*") if p.name != ".results.lock"], "temporary files left"
    for path in out.rglob("*.nrrd"):  # whatever was written is whole
        sitk.ReadImage(str(path))

    result = femurseg(*command[3:])
    assert result.returncode == 0, result.stderr
    assert f"4 cases ({len(first)} already done, {4 - len(first)} computed, 0 failed)" in result.stdout
    rows = {row["case"]: row for row in read_rows(out / "results.csv")}
    assert sorted(rows) == sorted(cases)
    for case, row in rows.items():
        if case in first:
            assert row == first[case], "a done case was computed again"
        else:
            assert datetime.fromisoformat(row["finished"]) > interrupted_at
        label = check_ok_row(row, out, cases[case][0], None)
        fill = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fill" / Path(row["label"]).name))) != 0
        assert float(row["fill_dice"]) == pytest.approx(numpy_dice(label, fill), abs=1e-4)
        reader = vtkSTLReader()
        reader.SetFileName(str(out / row["surface"]))
        reader.Update()
        triangles = numpy_support.vtk_to_numpy(reader.GetOutput().GetPolys().GetConnectivityArray()).reshape(-1, 3)
        edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
        assert np.all(np.unique(edges, axis=0, return_counts=True)[1] == 2), f"{case}: surface not watertight"
        assert row["warnings"] == ""


# --- the parts that need no model ---------------------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_every_case():
    cases = [batch.Case(f"c{i:02d}", Path(f"c{i:02d}.nrrd")) for i in range(11)]
    for count in range(1, 6):
        parts = [batch.shard(cases, index, count) for index in range(count)]
        names = [case.name for part in parts for case in part]
        assert sorted(names) == [case.name for case in cases] and len(names) == len(set(names))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert batch.parse_shard("3/8") == (3, 8)


def test_cases_from_a_folder_and_a_csv(tmp_path):
    for name in ("b_0000.nii.gz", "a.nrrd", "a-label.seg.nrrd", ".a.nrrd.part.nrrd", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [(c.name, c.ct.name) for c in batch.find_cases(tmp_path)] == [("a", "a.nrrd"), ("b", "b_0000.nii.gz")]
    listing = tmp_path / "list.csv"
    listing.write_text("ct,case\n/abs/x.nrrd,\nsub/y_0000.mha,why\n")
    assert [(c.name, str(c.ct)) for c in batch.find_cases(listing)] == [
        ("why", str(tmp_path / "sub" / "y_0000.mha")), ("x", "/abs/x.nrrd")]


def test_rows_of_an_empty_label_and_of_comparisons():
    ct = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    ct.SetSpacing((0.5, 1.0, 2.0))
    empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ct)
    case = batch.Case("x", Path("x.nrrd"))
    row, = batch.case_rows(case, batch.CaseResult(ct, empty, warnings=["no femur found"]), 1.0, "m")
    assert row["side"] == "none" and row["status"] == batch.NO_FEMUR_STATUS == "no femur"
    assert row["warnings"] == "no femur found"
    assert row["volume_ml"] == "0.000" and row["mean_hu"] == ""
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[1:3, 1:4, 2:5] = 1
    other = mask.copy()
    other[1, 1, 2:5] = 0
    label, fill = sitk.GetImageFromArray(mask), sitk.GetImageFromArray(other)
    for image in (label, fill):
        image.CopyInformation(ct)
    femur = Femur(side="left", value=1, volume_ml=0.018, warnings=("left: 0.0 ml is less than a femoral head",))
    row, = batch.case_rows(case, batch.CaseResult(ct, label, femurs=(femur,), fill=fill, truth=label), 1.0, "m")
    assert row["side"] == "left" and row["status"] == "ok" and row["warnings"] == femur.warnings[0]
    assert float(row["fill_dice"]) == pytest.approx(numpy_dice(mask != 0, other != 0), abs=1e-4)
    assert row["truth_dice"] == "1.0000"
    assert float(row["volume_ml"]) == pytest.approx(18 * 1.0 / 1000, abs=1e-6)
    assert float(row["mean_hu"]) == pytest.approx(np.arange(120).reshape(4, 5, 6)[mask != 0].mean(), abs=0.05)


def test_a_bilateral_case_gives_one_row_per_femur_each_compared_within_its_reach():
    values = np.zeros((6, 8, 20), dtype=np.uint8)
    values[1:5, 2:6, 2:8], values[1:5, 2:6, 12:18] = 1, 2  # left = 1, right = 2
    truth = (values != 0).astype(np.uint8)
    truth[1, 2:6, 12:18] = 0  # the right femur's truth lacks one slice
    ct, label, reference = (sitk.GetImageFromArray(a) for a in (values.astype(np.int16) * 500, values, truth))
    femurs = (Femur("left", 1, 0.096, ()), Femur("right", 2, 0.096, ()))
    rows = batch.case_rows(batch.Case("x", Path("x.nrrd")), batch.CaseResult(ct, label, femurs=femurs, truth=reference),
                           1.0, "m")
    assert [row["side"] for row in rows] == ["left", "right"]
    assert rows[0]["truth_dice"] == "1.0000"
    assert float(rows[1]["truth_dice"]) == pytest.approx(numpy_dice(values == 2, (truth != 0) & (values != 1)), abs=1e-4)
    assert [float(row["volume_ml"]) for row in rows] == pytest.approx([0.096, 0.096])


def test_done_means_same_settings(tmp_path):
    settings = batch.BatchSettings(fill=True)
    case = batch.Case("x", tmp_path / "x.nrrd")
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "x.json").write_text(
        '{"settings": ' + json.dumps(settings.record("m")) + ', "rows": [{"status": "ok"}]}')
    assert batch.is_done(tmp_path, case, settings.record("m"))
    assert not batch.is_done(tmp_path, case, settings.record("other model"))
    assert not batch.is_done(tmp_path, case, batch.BatchSettings(fill=False).record("m"))
    assert not batch.is_done(tmp_path, case, batch.BatchSettings(fill=True, surface_format="stl").record("m"))
    assert "fe" not in settings.record("m"), "folders made before --fe existed stay done"
    fe = batch.BatchSettings(fill=True, fe=FEOptions())
    assert not batch.is_done(tmp_path, case, fe.record("m"))
    assert json.loads(json.dumps(fe.record("m"))) == fe.record("m"), "the record survives its row file"
    assert fe.record("m") != batch.BatchSettings(fill=True, fe=FEOptions(element_size=3)).record("m")
    (tmp_path / "rods.csv").write_text("density_mg_cm3,hu\n0,0\n800,1000\n")
    rods = batch.BatchSettings(fill=True, fe=FEOptions(), fe_calibration=str(tmp_path / "rods.csv"))
    before = rods.record("m")
    (tmp_path / "rods.csv").write_text("density_mg_cm3,hu\n0,0\n800,1100\n")
    assert rods.record("m") != before, "corrected rod values redo the FE models"


def test_fe_models_per_femur_from_the_batch_label_and_fe_errors_as_rows(phantom_factory, tmp_path):
    """--fe: each femur's model from the label the batch wrote, made as ``femurseg fe`` makes it; a case with no
    femur gets none; an FE refusal is that case's error row and the batch goes on."""
    inputs, out = tmp_path / "cts", tmp_path / "out"
    inputs.mkdir()
    sitk.WriteImage(phantom_factory(1)[0], str(inputs / "F01.nrrd"), True)
    soft = np.random.default_rng(0).normal(-1000, 20, (40, 40, 40))
    soft[8:32, 8:32, 8:32] += 1040  # a block of soft tissue: a CT with no bone
    air = sitk.GetImageFromArray(soft.astype(np.int16))
    air.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(air, str(inputs / "air.nrrd"), True)
    options = ["--device", "cpu", "--fe", "--fe-formats", "vtu,inp", "--fe-law", "keller"]
    result = femurseg("batch", str(inputs), str(out), *options, "--fe-element-size", "8")
    assert result.returncode == 0, result.stderr
    rows = {row["case"]: row for row in read_rows(out / "results.csv")}
    assert rows["air"]["status"] == "no femur", rows["air"]
    assert rows["air"]["fe"] == rows["air"]["fe_elements"] == ""
    assert sorted(p.name for p in (out / "fe").iterdir()) == ["F01"]
    row = rows["F01"]
    assert row["status"] == "ok" and row["fe"] == "fe/F01"
    assert sorted(p.name for p in (out / "fe" / "F01").iterdir()) == ["femur.inp", "femur.json", "femur.vtu"]
    provenance = json.loads((out / "fe" / "F01" / "femur.json").read_text())
    assert int(row["fe_elements"]) == len(meshio.read(out / "fe" / "F01" / "femur.vtu").cells[0].data) \
        == provenance["mesh"]["elements"]
    assert float(row["fe_stiffness_n_mm"]) == pytest.approx(provenance["stance_stiffness_n_mm"], abs=0.05)
    assert row["fe_warnings"] == "; ".join(provenance["warnings"]) and "internal calibration" in row["fe_warnings"]
    assert provenance["label"]["path"] == str((out / row["label"]).resolve()) and provenance["law"]["name"] == "keller"
    assert "fe_elements" in (out / "report.html").read_text()

    again = femurseg("batch", str(inputs), str(out), *options, "--fe-element-size", "60")  # other settings: redone
    assert again.returncode == 0 and "2 cases (0 already done, 2 computed, 1 failed)" in again.stdout, again
    rows = {row["case"]: row for row in read_rows(out / "results.csv")}
    assert rows["F01"]["status"] == "error" and rows["F01"]["error"].startswith("FE model (femur): Element size 60")
    assert rows["air"]["status"] == "no femur"


def test_bad_batch_requests_give_one_line(tmp_path, capsys):
    no_ct_column = tmp_path / "paths.csv"
    no_ct_column.write_text("path\na.nrrd\n")
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "a.nrrd").write_bytes(b"")
    (twice / "a_0000.nii.gz").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    requests = {
        "missing input": [str(tmp_path / "nowhere"), str(tmp_path / "out")],
        "csv without ct": [str(no_ct_column), str(tmp_path / "out")],
        "duplicate names": [str(twice), str(tmp_path / "out")],
        "no images": [str(empty), str(tmp_path / "out")],
        "shard": [str(twice), str(tmp_path / "out"), "--shard", "2/2"],
        "truth dir": [str(twice), str(tmp_path / "out"), "--truth-dir", str(tmp_path / "none")],
        "smoothing": [str(twice), str(tmp_path / "out"), "--smoothing", "-1"],
        "fe element size": [str(twice), str(tmp_path / "out"), "--fe", "--fe-element-size", "0"],
        "fe rods": [str(twice), str(tmp_path / "out"), "--fe", "--fe-calibration", str(no_ct_column)],
    }
    for name, args in requests.items():
        assert main(["batch", *args]) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("femurseg: error:"), (name, lines)
    assert not (tmp_path / "out").exists()
