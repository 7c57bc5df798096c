"""The femurseg command line as a user calls it (the GUIs' warm worker: test_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from FemurSegLib.demo import SAMPLE_CT, SAMPLE_LABEL
from FemurSegLib.metrics import compare_images

REPO = Path(__file__).resolve().parents[2]


def femurseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "FemurSegLib", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_phantom_fill_compare_round_trip(tmp_path):
    ct, label, fill, report = (tmp_path / n for n in ("ct.nrrd", "label.nii.gz", "fill.mha", "metrics.json"))
    assert femurseg("phantom", str(ct), str(label), "--seed", "3").returncode == 0
    assert femurseg("fill", str(ct), str(fill), "--threshold", "350").returncode == 0
    result = femurseg("compare", str(label), str(fill), "--json", str(report))
    assert result.returncode == 0, result.stderr
    values = json.loads(report.read_text())
    expected = compare_images(sitk.ReadImage(str(label)), sitk.ReadImage(str(fill))).as_dict()
    for key in ("dice", "sensitivity", "specificity", "asd_mm", "hd95_mm", "volume_ml_reference", "volume_ml_other"):
        assert values[key] == pytest.approx(expected[key], abs=1e-9)
    # Geometry survives every format.
    written = sitk.ReadImage(str(fill))
    assert written.GetOrigin() == sitk.ReadImage(str(ct)).GetOrigin()


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    garbage = folder / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nthis is not an image\n")
    empty = folder / "empty.nii.gz"
    empty.write_bytes(b"")
    flat = folder / "flat.nrrd"
    sitk.WriteImage(sitk.Image(40, 30, sitk.sitkInt16), str(flat))
    single = folder / "single-slice.nrrd"
    sitk.WriteImage(sitk.Image(40, 30, 1, sitk.sitkInt16), str(single))
    four_d = folder / "four-d.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(four_d))
    vector = folder / "vector.mha"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(vector))
    return {"missing": folder / "missing.nrrd", "garbage": garbage, "empty": empty, "2D": flat,
            "single slice": single, "4D": four_d, "vector": vector}


@pytest.mark.parametrize("command", ["fill", "segment", "compare"])
def test_bad_inputs_give_one_line_and_no_output(tmp_path, command):
    for name, bad in write_bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{command}.nrrd"
        args = [command, str(bad), str(out)] if command != "compare" else [command, str(SAMPLE_LABEL), str(bad)]
        result = femurseg(*args)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("femurseg: error:"), (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert not out.exists() and not list(tmp_path.glob(".out-*")), f"{name}: output left behind"


def test_compare_refuses_different_grids(tmp_path):
    other = tmp_path / "other.nrrd"
    image = sitk.ReadImage(str(SAMPLE_LABEL))
    image.SetSpacing((1.0, 1.0, 1.2))
    sitk.WriteImage(image, str(other))
    result = femurseg("compare", str(SAMPLE_LABEL), str(other))
    assert result.returncode == 2 and "same voxel grid" in result.stderr


def test_output_into_missing_folder_is_refused(tmp_path):
    result = femurseg("fill", str(SAMPLE_CT), str(tmp_path / "no" / "such" / "fill.nrrd"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_every_cli_argument_has_help_and_usage_errors_are_one_line():
    import argparse

    from FemurSegLib.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {action.dest}" for name, command in commands.items()
               for action in command._actions if not action.help]
    assert missing == []
    result = femurseg("segment", "ct.nrrd")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("femurseg: error: the following arguments are required: out_label")
