"""The panels' FE model (FemurSegLib.fe_runner) on real Slicer libraries (trame-slicer's SlicerApp, no fakes): a
segment of the scene -> ``femurseg fe`` in a child process, polled as the panel's timer polls it; then Cancel.

Expected values come from the files the child wrote, read back with meshio and json, and from the calibration's
known rods (density = 0.8 HU).
"""

from __future__ import annotations

import json
import os
import signal
import time

import meshio
import pytest

slicer = pytest.importorskip("slicer")
trame_core = pytest.importorskip("trame_slicer.core")

from fe_shapes import toy_femur  # noqa: E402
from FemurSegLib import fe_runner, scene  # noqa: E402
from FemurSegLib.errors import AlreadyExists  # noqa: E402
from FemurSegLib.fe.pipeline import FEOptions  # noqa: E402

RODS = "density_mg_cm3,hu,material\n0,0,HA\n200,250,HA\n800,1000,HA\n"
OPTIONS = FEOptions(element_size=4.0, formats=("vtu",))


@pytest.fixture(scope="module")
def toy_in_scene():
    app = trame_core.SlicerApp()
    ct, label = toy_femur()
    ct_node = scene.add_volume_node(app.scene, ct, "toy")
    return app, ct_node, scene.add_label_as_segment(app.scene, app.segmentations_logic, label, ct_node)


def start(toy_in_scene, out, calibration="internal", replace=False):
    app, ct_node, segmentation = toy_in_scene
    return fe_runner.start_from_segment(app.scene, app.segmentations_logic, segmentation, None, ct_node, out,
                                        calibration, OPTIONS, replace)


def test_a_segment_becomes_an_fe_model_in_a_child_process(toy_in_scene, tmp_path):
    (tmp_path / "rods.csv").write_text(RODS)
    process = start(toy_in_scene, tmp_path / "fe", str(tmp_path / "rods.csv"))
    stages = []
    while not process.poll().finished:  # what the panel's QTimer does: the caller is never blocked
        stages.append(process.state.stage)
        time.sleep(0.05)
    state = process.state
    assert state.error is None and not state.cancelled, state.error
    assert "meshing and mapping" in stages and state.progress == 1.0
    assert sorted(p.name for p in (tmp_path / "fe").iterdir()) == ["femur.json", "femur.vtu"]
    provenance = json.loads((tmp_path / "fe" / "femur.json").read_text())
    assert provenance["calibration"]["slope"] == pytest.approx(0.8)
    assert state.elements == len(meshio.read(tmp_path / "fe" / "femur.vtu").cells[0].data) > 0
    assert state.stiffness_n_mm == pytest.approx(provenance["stance_stiffness_n_mm"]) and state.stiffness_n_mm > 0
    assert "elements, stance stiffness" in state.describe()
    assert not process._work_dir.exists(), "the CT and label in transit are removed"
    with pytest.raises(AlreadyExists, match="femur.vtu, femur.json already exist"):  # a second Build: refused
        start(toy_in_scene, tmp_path / "fe")


def test_cancel_stops_the_child_and_leaves_no_files(toy_in_scene, tmp_path):
    process = start(toy_in_scene, tmp_path / "fe")
    deadline = time.monotonic() + 60
    while process.poll().stage != "meshing and mapping":
        assert time.monotonic() < deadline and not process.state.finished, process.state
        time.sleep(0.05)
    process.cancel()  # what the panel's Cancel does
    state = process.wait_for_completion(timeout_s=30)
    assert state.cancelled and state.error is None and state.describe().startswith("FE model cancelled")
    assert not (tmp_path / "fe").exists() and not process._work_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(process._child.pid, signal.SIGKILL)  # the child's whole group is gone
