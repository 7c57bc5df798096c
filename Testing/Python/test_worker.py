"""The GUIs' warm worker (runner.SegmentationWorker + ``python -m FemurSegLib worker``), as a GUI drives it.

Real child processes and the real bundled model: the model is loaded once per child, a cancel kills the whole
process group, the next request starts a fresh child, a bad request is answered without ending the child, and a
request with another model starts another child. Labels are checked against the sample's exact label.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.demo import SAMPLE_CT, SAMPLE_LABEL
from FemurSegLib.errors import FemurSegError
from FemurSegLib.metrics import dice
from FemurSegLib.models import resolve_model
from FemurSegLib.runner import SegmentationWorker


def run_watching(worker: SegmentationWorker, ct: sitk.Image, **settings) -> tuple[list[str], sitk.Image | None]:
    """Poll a job like the GUIs do; the stages it went through and its label."""
    job = worker.segment(ct, device="cpu", **settings)
    stages: list[str] = []
    deadline = time.monotonic() + 240
    while not job.poll().finished and time.monotonic() < deadline:
        if not stages or stages[-1] != job.state.stage:
            stages.append(job.state.stage)
        time.sleep(0.02)
    return stages, job.result()


@pytest.fixture()
def worker():
    worker = SegmentationWorker()
    yield worker
    pid = worker.pid
    worker.close()
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def agreement_with_truth(label: sitk.Image) -> float:
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABEL))) != 0
    return dice(truth, sitk.GetArrayViewFromImage(label) != 0)


def test_model_loads_once_a_bad_request_keeps_the_worker_another_model_replaces_it(worker):
    ct = sitk.ReadImage(str(SAMPLE_CT))
    first_stages, first = run_watching(worker, ct)
    pid = worker.pid
    assert pid is not None and "loading model" in first_stages and "predicting" in first_stages
    assert first.GetSize() == ct.GetSize() and first.GetOrigin() == ct.GetOrigin()
    assert agreement_with_truth(first) > 0.95

    flat = sitk.Image(30, 20, sitk.sitkInt16)  # 2D: the worker refuses it and stays up
    job = worker.segment(flat, device="cpu")
    with pytest.raises(FemurSegError, match="2D"):
        job.wait_for_completion(timeout_s=60)
    assert worker.pid == pid

    second_stages, second = run_watching(worker, ct)
    assert worker.pid == pid, "the second Segment reused the loaded model's process"
    assert "loading model" not in second_stages
    assert np.array_equal(sitk.GetArrayViewFromImage(first), sitk.GetArrayViewFromImage(second))
    assert os.listdir(worker._work_dir) == [], "the CTs and labels in transit are removed"

    _, third = run_watching(worker, ct, model=str(resolve_model(None).root))
    assert worker.pid not in (None, pid), "another model (here: the same one named by its folder), another worker"
    assert np.array_equal(sitk.GetArrayViewFromImage(first), sitk.GetArrayViewFromImage(third))

    with pytest.raises(FemurSegError, match="already running"):
        worker.segment(ct, device="cpu")
        worker.segment(ct, device="cpu")
    worker.close()
    assert worker.pid is None


def test_cancel_kills_the_process_group_and_the_next_request_starts_fresh(worker):
    ct = sitk.ReadImage(str(SAMPLE_CT))
    job = worker.segment(ct, model="no-such-model", device="cpu")
    with pytest.raises(FemurSegError, match="No model named 'no-such-model'"):
        job.wait_for_completion(timeout_s=120)

    job = worker.segment(ct, device="cpu")
    deadline = time.monotonic() + 120
    while job.poll().stage != "predicting" and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = worker.pid
    started = time.perf_counter()
    job.cancel()
    assert time.perf_counter() - started < 2.0
    assert job.state.cancelled and job.state.finished and job.state.error is None and job.result() is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert os.listdir(worker._work_dir) == [], "nothing left behind"

    stages, label = run_watching(worker, ct)
    assert worker.pid not in (None, pid) and "loading model" in stages
    assert agreement_with_truth(label) > 0.95
