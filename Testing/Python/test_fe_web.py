"""The browser's FE model card (FemurSegLib.web.fe) through the page's own triggers on an in-process app (real
trame server, real SlicerApp scene, the real child process; no browser: test_web_browser.py drives the page)."""

from __future__ import annotations

import asyncio
import json

import pytest
import SimpleITK as sitk

pytest.importorskip("trame_slicer.core")

from fe_shapes import toy_femur  # noqa: E402


def test_the_page_builds_the_fe_model_of_the_export_choice_and_refuses_bad_requests(tmp_path):
    from trame.app import get_server

    from FemurSegLib import scene
    from FemurSegLib.web.app import FemurSegWebApp

    ct, label = toy_femur()
    sitk.WriteImage(ct, str(tmp_path / "toy.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "toy-label.nrrd"))
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    app = FemurSegWebApp(datasets, [tmp_path], 10**8, server=get_server("fe-web", client_type="vue3"))
    workflow, state, fill = app.workflow, app.workflow.state, "draft:" + scene.SEGMENT_FILL

    async def page() -> None:
        workflow.open_path(str(tmp_path / "toy.nrrd"))
        workflow.load_fill_path(str(tmp_path / "toy-label.nrrd"))
        for size, rods, message in (("-1", "", "must be a positive number"),
                                    ("4", "/etc/passwd", "outside the folders this server may read")):
            workflow.fe.build("toy", "morgan", size, "vtu", rods, fill, False)
            assert state.fs_message_type == "error" and message in state.fs_message and not state.fs_fe_running
        workflow.fe.build("toy", "keller", "4", "vtu", "", fill, False)
        assert state.fs_fe_running, state.fs_message
        while state.fs_fe_running:
            await asyncio.sleep(0.1)

    asyncio.run(page())
    out = datasets / "FE" / "toy"
    assert sorted(p.name for p in out.iterdir()) == ["femur.json", "femur.vtu"], state.fs_message
    provenance = json.loads((out / "femur.json").read_text())
    assert provenance["law"]["name"] == "keller"
    assert f"{provenance['mesh']['elements']} elements" in state.fs_fe_result and state.fs_message == state.fs_fe_result
    workflow.close()
